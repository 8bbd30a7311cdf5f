"""Models: loading by hub id or local path, dtype policy, LoRA, and a forward that computes logits only where
they are used.

Every model goes through `from_pretrained`, the built-in tiny model included (it is saved first, see
`align.tiny`), so the code path users take with hub models is the one the tests exercise.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import torch
from torch import nn

from .config import AlignError


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device | None = None) -> tuple[torch.dtype, str]:
    """(dtype of trained weights, accelerate mixed-precision mode) for a config `dtype` value.

    auto: float32 on CPU (the fastest and exact choice there); on a GPU with bf16 support, float32 master
    weights with bf16 autocast. An explicit float16/bfloat16 loads the weights in that dtype."""
    device = device or default_device()
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.float32, "bf16"
        return torch.float32, "no"
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise AlignError(f"dtype '{name}' is not one of auto, float32, bfloat16, float16")
    return table[name], "no"


def frozen_dtype(name: str, device: torch.device | None = None, frozen: str = "auto") -> torch.dtype:
    """dtype for models that are never trained (reference, reward) given the config's `dtype` (`name`) and
    `frozen_dtype` (`frozen`): under auto, bf16 where `dtype` gives bf16 autocast (capable GPUs), else the
    trained weights' dtype; an explicit name is taken as it is (bf16 on a CPU too)."""
    if frozen != "auto":
        return resolve_dtype(frozen, device)[0]
    w, mp = resolve_dtype(name, device)
    return torch.bfloat16 if mp == "bf16" else w


def _offline() -> bool:
    """Whether the Hugging Face libraries are told not to use the network (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    flags = [os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", "")]
    if any(f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def _in_hub_cache(repo_id: str) -> bool:
    """Whether a hub model id has a config.json or adapter_config.json in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return True
    for name in ("config.json", "adapter_config.json"):
        try:
            if isinstance(try_to_load_from_cache(repo_id, name), str):
                return True
        except Exception:  # an id the hub would reject
            return False
    return False


def check_model_path(path: str, what: str = "model") -> None:
    """Fail early, in one line that says what to do, when `path` is neither a model directory nor a hub id that
    can be loaded (offline: one in the local cache)."""
    if not path:
        raise AlignError(f"no {what} given")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(
                os.path.join(path, "adapter_config.json")):
            hint = "give a folder written by save_pretrained (or by an align stage), or a hub id"
            if os.path.isfile(os.path.join(path, "trainer_state.json")):
                hint = ("it is a training checkpoint: give the run's output_dir once the run has finished (continue "
                        "it with --resume_from_checkpoint)")
            elif os.path.isdir(os.path.join(path, "checkpoints")):
                hint = ("it holds checkpoints but no final model: its run did not finish (continue it with "
                        "--resume_from_checkpoint latest)")
            raise AlignError(f"{path}: not a model directory (no config.json or adapter_config.json); {hint}")
        return
    if os.path.exists(path):
        raise AlignError(f"{path}: is a file, not a model directory or hub id")
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise AlignError(f"{path}: model directory not found")
    if _offline() and not _in_hub_cache(path):
        raise AlignError(f"{path}: no such local directory, and not in the Hugging Face cache while offline "
                         f"(HF_HUB_OFFLINE=1); download it once with network access (`hf download {path}`) "
                         f"or give a local model directory")


def _load_failure(path: str, what: str, e: BaseException) -> AlignError:
    """One line for a failed from_pretrained: what went wrong and what to do."""
    name = type(e).__name__
    text = _first_line(e)
    if name == "GatedRepoError" or "gated repo" in text.lower():
        return AlignError(f"{path}: a gated model on the hub: accept its licence on huggingface.co and log in "
                          f"(`hf auth login`)")
    if name == "RepositoryNotFoundError" or "is not a local folder and is not a valid model identifier" in text:
        return AlignError(f"{path}: no such local directory or hub model (a private one needs `hf auth login`)")
    if "couldn't connect" in text.lower() or name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return AlignError(f"{path}: cannot reach the Hugging Face hub and the model is not in the local cache; "
                          f"check the network, download it first (`hf download {path}`), or give a local directory")
    return AlignError(f"{path}: cannot load {what}: {text}")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """AutoTokenizer with a pad token (EOS when the tokenizer has none). A tokenizer without an EOS token is an
    error: completions could not end, and SFT examples would not teach the model to stop."""
    from transformers import AutoTokenizer

    check_model_path(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise _load_failure(path, "its tokenizer", e) from None
    if tok.eos_token is None or tok.eos_token_id is None:
        pad = "" if tok.pad_token is not None else " (nor a pad token)"
        where = os.path.join(path, "tokenizer_config.json") if os.path.isdir(path) else "its tokenizer_config.json"
        raise AlignError(f"{path}: the tokenizer has no EOS token{pad}; set \"eos_token\" in {where} to the token "
                         f"that ends a text (e.g. \"</s>\" or \"<|endoftext|>\")")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _is_adapter_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "adapter_config.json"))


def adapter_base(path: str) -> str:
    """The base model an adapter directory was trained on (``base_model_name_or_path`` of its config)."""
    import json

    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
        base = json.load(fh).get("base_model_name_or_path")
    if not base:
        raise AlignError(f"{path}/adapter_config.json: no base_model_name_or_path (the model the adapter is for)")
    return str(base)


def _record_source(model, path: str) -> None:
    """Make `path` the model's recorded origin, so that an adapter trained on it (peft reads ``name_or_path``)
    names `path` as its base: an adapter trained on a merged adapter then loads on that merged model, not on
    the first base (which would silently drop the first adapter's update)."""
    model.config._name_or_path = path
    model.name_or_path = path


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                   device: torch.device | str | None = None, merge_adapter: bool = True):
    """AutoModelForCausalLM from a hub id or directory (safetensors only). A directory holding a LoRA adapter
    is loaded on its base model (itself loaded the same way, so adapters trained on adapters stack) and, by
    default, merged so that later stages see a plain model."""
    from transformers import AutoModelForCausalLM

    check_model_path(path)
    try:
        if _is_adapter_dir(path):
            from peft import PeftModel

            # the base may itself be an adapter (a LoRA stage trained on a LoRA stage's output): merged first
            base = load_causal_lm(adapter_base(path), dtype=dtype, trust_remote_code=trust_remote_code)
            model = PeftModel.from_pretrained(base, path)
            if merge_adapter:
                # a plain model as from_pretrained gives it: trainable (peft froze the base it loaded on)
                model = model.merge_and_unload().requires_grad_(True)
                _record_source(model, path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                         use_safetensors=_has_safetensors(path))
    except AlignError:
        raise
    except Exception as e:
        raise _load_failure(path, "as a causal language model", e) from None
    if device is not None:
        model.to(device)
    return model


def _has_safetensors(path: str) -> bool | None:
    if os.path.isdir(path):
        return any(f.endswith(".safetensors") for f in os.listdir(path)) or None
    return True  # hub: require safetensors weights


def sync_special_tokens(model, tokenizer) -> None:
    """Make the model's config and generation config agree with the tokenizer's pad/eos ids."""
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = tokenizer.pad_token_id
        if getattr(cfg, "eos_token_id", None) is None:
            cfg.eos_token_id = tokenizer.eos_token_id


def apply_lora(model, r: int, alpha: int, dropout: float, target_modules: list[str], task_type: str = "CAUSAL_LM",
               modules_to_save: list[str] | None = None):
    """Wrap `model` with LoRA adapters; 'all-linear' targets every linear layer but the output head."""
    from peft import LoraConfig, get_peft_model

    targets: Any = "all-linear" if list(target_modules) == ["all-linear"] else list(target_modules)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task_type,
                     modules_to_save=modules_to_save)
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise AlignError(f"lora_target_modules {target_modules}: {_first_line(e)}") from None


def make_trainable(model, gradient_checkpointing: bool, lora=None):
    """Turn on gradient checkpointing (non-reentrant, no KV cache) and wrap with `lora(model)` when given;
    with both, the inputs require grad so checkpointed blocks stay on the graph. Returns the model to train."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora is not None:
        if gradient_checkpointing:
            model.enable_input_require_grads()
        model = lora(model)
    return model


def unwrap_peft(model):
    """The transformers model under a peft wrapper (adapters stay injected), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def no_split_modules(*models: nn.Module | None) -> list[str]:
    """The union of the transformers models' ``_no_split_modules`` (their block classes), through align's and
    peft's wrappers: wrapper modules report them so that FSDP's transformer auto-wrap finds the blocks."""
    out: list[str] = []
    for m in models:
        if m is None:
            continue
        names = getattr(unwrap_peft(inner_model(m)), "_no_split_modules", None) or []
        out += [n for n in names if n not in out]
    return out


def inner_model(model: nn.Module) -> nn.Module:
    """The transformers model inside its wrappers: DDP/DeepSpeed ``.module``, align's SelectiveLM / ScalarModel
    ``.model``, peft."""
    while not hasattr(model, "config"):
        inner = getattr(model, "module", None) or getattr(model, "model", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return unwrap_peft(model)


def lm_parts(model) -> tuple[nn.Module, nn.Module]:
    """(backbone returning hidden states, output head) of a causal LM, looking through peft wrappers."""
    base = unwrap_peft(model)
    backbone = base.get_decoder()
    head = base.get_output_embeddings()
    if backbone is base or head is None:
        raise AlignError(f"{type(base).__name__}: cannot split the model into backbone and output head")
    return backbone, head


def _final_logits(base, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(base.config, "logit_scale", None)
    if scale and isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    return logits


# a (rows x vocabulary) float32 logits tensor above this many elements (64 MB) is computed in chunks of rows
CHUNK_ELEMENTS = 2**24


@dataclass
class LogprobRequest:
    """Ask a :class:`SelectiveLM` for the log-probabilities of ``labels`` (N,) (the tokens at its N selected
    positions) at ``temperature`` (and the entropies), instead of the (N, V) logits."""

    labels: torch.Tensor
    temperature: float = 1.0
    with_entropy: bool = False


class Logprobs(NamedTuple):
    logp: torch.Tensor  # (N,) float32
    entropy: torch.Tensor | None  # (N,) float32


class SelectiveLM(nn.Module):
    """A causal LM whose forward returns logits only at selected positions.

    The output head (often the biggest matrix of a small model) and everything after it run only where a
    logit is used: completion tokens in SFT, sampled tokens in RL. Wrapping the model in a module keeps
    DDP/FSDP/DeepSpeed hooks on the path (they wrap this module's forward).

    Given a :class:`LogprobRequest` it returns :class:`Logprobs` instead: when the (N, V) logits would pass
    ``CHUNK_ELEMENTS`` (large vocabularies, long completions) they are computed ``logprob_chunk`` rows at a time
    and never held whole, in the forward or the backward (:mod:`align.chunked`); ``logprob_chunk`` None picks
    the chunk from that budget, 0 never chunks."""

    logprob_chunk: int | None = None

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def head_output(self, hidden: torch.Tensor, request: "LogprobRequest | None"):
        """The head on selected hidden states (N, H): logits (N, V), or Logprobs for a request."""
        _, head = lm_parts(self.model)
        if request is None:
            return _final_logits(unwrap_peft(self.model), head(hidden))
        from .chunked import head_logprobs, whole_head_logprobs

        vocab = head.weight.shape[0] if hasattr(head, "weight") else 0
        rows = self.logprob_chunk
        if rows is None:
            rows = 0 if hidden.shape[0] * vocab <= CHUNK_ELEMENTS else max(1, CHUNK_ELEMENTS // max(vocab, 1))
        if rows == 0:
            return Logprobs(*whole_head_logprobs(self.model, hidden, request.labels, request.temperature,
                                                 request.with_entropy))
        return Logprobs(*head_logprobs(self.model, hidden, request.labels, request.temperature, rows,
                                       request.with_entropy))

    @property
    def _no_split_modules(self) -> list[str]:
        """The transformer block classes of the wrapped model: what FSDP's auto-wrap shards one by one."""
        return no_split_modules(self.model)

    def forward(self, input_ids: torch.Tensor, select: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_hidden: bool = False, logprobs: LogprobRequest | None = None):
        """input_ids (B,T); select (B,T) bool or None for all positions.
        Returns logits (N,V) for the N selected positions in row-major order (or (B,T,V) if select is None) —
        or, with ``logprobs``, their `Logprobs` — and the selected hidden states (N,H) when return_hidden."""
        backbone, _ = lm_parts(self.model)
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        if select is not None:
            hidden = hidden[select]
        result = self.head_output(hidden, logprobs)
        return (result, hidden) if return_hidden else result


class GroupLM(SelectiveLM):
    """A :class:`SelectiveLM` whose forward can encode each distinct prompt once for all its completions.

    Called as a SelectiveLM (``input_ids, select, attention_mask, position_ids``) it is one. Called with
    ``completion_ids`` it takes the U distinct prompts ``input_ids``/``attention_mask`` (U, P) (left-padded), the
    B completions ``completion_ids``/``completion_mask`` (B, C) (right-padded) and ``prompt_index`` (B,) long (the
    prompt of each completion), runs the prompts through the model once with a KV cache, gathers that cache to
    the B rows (a differentiable index, so gradients reach the prompt's computation from every completion) and
    runs the completions on top of it. It returns the logits (N, V) at the N valid completion tokens in
    row-major order — the same positions and values (up to float rounding) as ``SelectiveLM`` on the
    concatenated prompt + completion inputs, with the prompt tokens computed U times instead of B times.

    Completion token 0 is predicted from the prompt's last hidden state, token t > 0 from completion token t − 1,
    at position ids that continue the prompt's real tokens; tokens after a completion's EOS are masked keys that
    no valid token can see (causal attention). Gradient checkpointing and a KV cache do not mix in
    transformers: train with the plain SelectiveLM call when it is on."""

    def forward(self, input_ids: torch.Tensor, select: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_hidden: bool = False, completion_ids: torch.Tensor | None = None,
                completion_mask: torch.Tensor | None = None, prompt_index: torch.Tensor | None = None,
                logprobs: LogprobRequest | None = None):
        if completion_ids is None:
            return super().forward(input_ids, select, attention_mask, position_ids, return_hidden, logprobs)
        from .data import position_ids_from_mask

        backbone, head = lm_parts(self.model)
        pmask = attention_mask.long()
        ppos = position_ids_from_mask(pmask)
        cache, arg = new_cache(self.model, backbone)
        out = backbone(input_ids=input_ids, attention_mask=pmask, position_ids=ppos, use_cache=True,
                       **{arg: cache})
        h_prompt = (out[0] if isinstance(out, tuple) else out.last_hidden_state)[:, -1]  # (U, H)
        parts = [h_prompt[prompt_index].unsqueeze(1)]
        c = completion_ids.shape[1]
        if c > 1:
            cache.batch_select_indices(prompt_index)
            att = torch.cat([pmask[prompt_index], completion_mask[:, :-1].long()], dim=1)
            pos = ppos[prompt_index, -1:] + 1 + torch.arange(c - 1, device=ppos.device)
            out = backbone(input_ids=completion_ids[:, :-1], attention_mask=att, position_ids=pos, use_cache=True,
                           **{arg: cache})
            parts.append(out[0] if isinstance(out, tuple) else out.last_hidden_state)
        hidden = torch.cat(parts, dim=1)[completion_mask.bool()]  # (N, H)
        return self.head_output(hidden, logprobs)


def new_cache(model: nn.Module, module: nn.Module | None = None) -> tuple[Any, str]:
    """An empty ``DynamicCache`` for `model` and the keyword of ``module.forward`` (default: the model's) that
    takes it (``cache`` in recent transformers, ``past_key_values`` before). Each forward fills it in place."""
    import inspect

    from transformers import DynamicCache

    base = unwrap_peft(model)
    params = inspect.signature((module or base).forward).parameters
    arg = "cache" if "cache" in params else "past_key_values"
    try:
        cache = DynamicCache(config=base.config)
    except TypeError:  # older transformers
        cache = DynamicCache()
    return cache, arg


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (modules and config attributes), so the policy that is trained is the
    one that sampled: ratios are exactly 1 before the first update, in train() mode too."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        cfg = getattr(m, "config", None)
        if cfg is not None and not isinstance(cfg, dict):
            for k, v in list(vars(cfg).items()):
                if isinstance(v, float) and (k.endswith("dropout") or k.endswith("pdrop")):
                    setattr(cfg, k, 0.0)


def load_trained_lm(cfg, tokenizer, weights_dtype: torch.dtype):
    """The causal LM a stage trains, from ``cfg.model``: special tokens aligned with the tokenizer, LoRA
    (``cfg.use_lora``) and gradient checkpointing (``cfg.gradient_checkpointing``) as configured."""
    model = load_causal_lm(cfg.model, dtype=weights_dtype, trust_remote_code=cfg.trust_remote_code)
    sync_special_tokens(model, tokenizer)
    lora = (lambda m: apply_lora(m, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
            ) if cfg.use_lora else None
    return make_trainable(model, cfg.gradient_checkpointing, lora)


# ---------------------------------------------------------------------------------------------------------------
# several LoRA adapters on one base


def same_model(a: str, b: str) -> bool:
    """Whether two model references name the same model: the same local directory (however spelled), or the same
    hub id."""
    if os.path.isdir(a) and os.path.isdir(b):
        return os.path.samefile(a, b)
    return a == b


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def use_adapters(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Inside, every LoRA layer of the peft model `model` computes with the adapters ``names`` (their updates
    summed; an empty list: none, i.e. the base model), then the previous choice is restored.

    Unlike peft's ``set_adapter`` / ``disable_adapter``, it never changes ``requires_grad``: peft makes the
    adapter it activates trainable and freezes every other one, which would make a frozen adapter (a reward
    model's) trainable, and would silently drop the gradients of an adapter whose forward was recorded before
    the switch (autograd skips a leaf that no longer requires grad at backward time). Which adapters train is
    set once, by :func:`freeze_adapters`."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    names = list(names)
    layers = _tuner_layers(model)
    # modules_to_save copies have one active adapter: they are only switched off (for the base model)
    aux = [m for m in model.modules() if isinstance(m, AuxiliaryTrainingWrapper)] if not names else []
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    saved_aux = [m._disable_adapters for m in aux]
    for m in layers:
        if names:
            m._active_adapter = names
        m._disable_adapters = not names
    for m in aux:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, (active, disabled) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = active, disabled
        for m, disabled in zip(aux, saved_aux):
            m._disable_adapters = disabled


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Inside, the global CPU random stream starts from ``seed`` (a fork: the stream outside is untouched); a
    no-op for None."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def add_adapter(model: nn.Module, name: str, config, trainable: bool, seed: int | None = None) -> None:
    """Add the LoRA adapter ``name`` (a peft ``LoraConfig``) to the peft model `model`, inactive (see
    :func:`use_adapters`), trainable or frozen; its initial weights are drawn from ``seed`` (see :func:`seeded`).
    peft's add_adapter resets ``requires_grad`` of every adapter; here each adapter keeps its own."""
    frozen: set[str] = model.__dict__.setdefault("_align_frozen_adapters", set())
    with seeded(seed):
        model.add_adapter(name, config)
    if not trainable:
        frozen.add(name)
    freeze_adapters(model, frozen)


def add_lora_adapter(model: nn.Module, name: str, r: int, alpha: int, dropout: float, target_modules: list[str],
                     seed: int | None = None) -> None:
    """A new trainable LoRA adapter ``name`` on the causal-LM peft model `model` (see :func:`add_adapter`), with the
    targets of :func:`apply_lora` less the output head ('all-linear' leaves it out already)."""
    from peft import LoraConfig

    if list(target_modules) == ["all-linear"]:
        targets: Any = "all-linear"
    else:
        head = unwrap_peft(model).get_output_embeddings()
        head_names = {n for n, m in unwrap_peft(model).named_modules() if m is head}
        head_names |= {n.rsplit(".", 1)[-1] for n in head_names}
        targets = [t for t in target_modules if t not in head_names]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    try:
        add_adapter(model, name, config, trainable=True, seed=seed)
    except ValueError as e:
        raise AlignError(f"lora_target_modules {target_modules}: {_first_line(e)}") from None


def freeze_adapters(model: nn.Module, frozen: set[str] | list[str]) -> None:
    """Make the weights of the adapters in ``frozen`` untrainable and those of every other adapter of the peft
    model `model` trainable (the base weights are left as they are: frozen by peft)."""
    frozen = set(frozen)
    for m in _tuner_layers(model):
        for layer_name in m.adapter_layer_names:
            for key, layer in getattr(m, layer_name).items():
                layer.requires_grad_(key not in frozen)


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters of adapter ``name`` of the peft model `model`."""
    out = []
    for m in _tuner_layers(model):
        for layer_name in m.adapter_layer_names:
            layers = getattr(m, layer_name)
            if name in layers:
                item = layers[name]
                out += [item] if isinstance(item, nn.Parameter) else list(item.parameters())
    return out


@contextlib.contextmanager
def only_adapter(model: nn.Module, name: str = "default") -> Iterator[None]:
    """Inside, ``save_pretrained`` of the peft model `model` writes its adapter ``name`` alone, as when it is the
    model's only adapter (peft would save every other one too, in sub-folders named after them)."""
    import functools

    model.save_pretrained = functools.partial(type(model).save_pretrained, model, selected_adapters=[name])
    try:
        yield
    finally:
        del model.save_pretrained

