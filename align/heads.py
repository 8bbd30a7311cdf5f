"""Scalar-head models: reward models and value models (critics).

A scalar model is a transformers ``AutoModelForSequenceClassification`` with ``num_labels=1``: the backbone of a
causal LM plus a linear ``score`` head (hidden -> 1). Loading it from a causal-LM checkpoint (the SFT output,
a hub id, a LoRA adapter directory) keeps the backbone and creates the head deterministically from ``seed``;
loading it from a saved reward model (full or LoRA) restores the trained head. Saved with ``save_pretrained``,
it loads back with ``AutoModelForSequenceClassification.from_pretrained``.

Reading scores never uses pad-token ids: the score of a sequence is taken at its last position whose
``attention_mask`` is 1, and positions are ``cumsum(attention_mask) - 1``, so left padding, right padding and
extra padding on either side give the same rewards (pad may equal eos, as with many hub tokenizers).

    model = load_scalar_model(path)                         # AutoModelForSequenceClassification, num_labels=1
    r = sequence_scores(model, input_ids, attention_mask)   # (B,)    reward of each sequence
    v = token_values(model, input_ids, attention_mask)      # (B, T)  a scalar per position (PPO critic)

The functions accept the transformers model, a peft wrapper around it, or a :class:`ScalarModel` (the
``nn.Module`` to hand to ``accelerate.prepare`` so DDP/FSDP hooks are on the forward path).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os

import torch
from torch import nn

from .config import AlignError
from .data import position_ids_from_mask
from .models import (_has_safetensors, _is_adapter_dir, _load_failure, _record_source, adapter_base, add_adapter,
                     apply_lora, check_model_path, inner_model, lm_parts, make_trainable, no_split_modules, same_model,
                     seeded, unwrap_peft, use_adapters)

SCORE_MODULE = "score"


@contextlib.contextmanager
def _quiet_loading():
    """Silence transformers' load report (an RM made from a causal LM always 'misses' its new head)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def scalar_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone returning hidden states, score head hidden -> 1) of a scalar model, looking through
    :class:`ScalarModel`, DDP-style ``.module`` and peft wrappers. Under LoRA the head is peft's
    ``ModulesToSaveWrapper`` (trainable copy), which is called like the head itself."""
    if isinstance(model, ScalarModel):
        model = model.model
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config"):
        model = model.module
    if isinstance(model, SharedScalarModel):
        return model.backbone, model.score
    base = unwrap_peft(model)
    backbone = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = getattr(base, SCORE_MODULE, None)
    if backbone is None or head is None or backbone is base:
        raise AlignError(f"{type(base).__name__}: not a scalar-head model (no backbone or '{SCORE_MODULE}' head)")
    return backbone, head


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last position with mask 1 (0 for an all-pad row). (B, T) -> (B,) long."""
    t = attention_mask.shape[-1]
    ar = torch.arange(t, device=attention_mask.device)
    return (ar * (attention_mask != 0)).argmax(-1)


def _hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, nn.Module]:
    backbone, head = scalar_parts(model)
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return hidden, head


def token_values(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The head's scalar at every position, ``V_t = w · h_t``: input_ids, attention_mask (B, T) -> (B, T)
    float32. Values at masked positions are meaningless; the caller masks them."""
    hidden, head = _hidden_states(model, input_ids, attention_mask, position_ids)
    return head(hidden).squeeze(-1).float()


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Score of each sequence at its last non-pad token (from ``attention_mask``, never from pad ids):
    (B, T) -> (B,) float32. The head runs on those B hidden states only."""
    hidden, head = _hidden_states(model, input_ids, attention_mask, position_ids)
    idx = last_token_index(attention_mask)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    return head(last).squeeze(-1).float()


def scores_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
              rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Head outputs at chosen positions (rows, cols) (N,) of a forward with an explicit attention mask (2-D or a
    prepared 4-D mask, see :func:`segment_attention_mask`) and position ids: (N,) float32."""
    hidden, head = _hidden_states(model, input_ids, attention_mask, position_ids)
    return head(hidden[rows, cols]).squeeze(-1).float()


def supports_segment_mask(model: nn.Module) -> bool:
    """Whether the model's attention (a scalar-head model or a causal LM, in any wrapper) accepts a custom 4-D
    mask (sdpa and eager do; flash-attention does not)."""
    return getattr(inner_model(model).config, "_attn_implementation", None) in (None, "sdpa", "eager")


def segment_attention_mask(segments: torch.Tensor, model: nn.Module, dtype: torch.dtype | None = None
                           ) -> torch.Tensor:
    """4-D attention mask (B, 1, T, T) for rows that hold one shared prefix followed by several branches.

    ``segments`` (B, T) long: 0 for the shared prefix (a prompt), k >= 1 for the tokens of branch k (a
    response), -1 for padding. Token i attends to token j <= i when j is in the prefix or in i's own branch, so
    every branch sees exactly what it would see as a separate sequence ``prefix + branch`` (give it position ids
    that continue the prefix's). Padding attends only to itself (finite, unused). Boolean (True = attend) for
    sdpa; additive (0 / dtype min) for eager attention."""
    t = segments.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    qi, kj = segments.unsqueeze(-1), segments.unsqueeze(-2)  # (B, T, 1), (B, 1, T)
    allowed = causal & (kj >= 0) & ((kj == 0) | (kj == qi)) & (qi >= 0)
    allowed = allowed | torch.eye(t, dtype=torch.bool, device=segments.device)
    allowed = allowed.unsqueeze(1)
    inner = inner_model(model)  # a scalar-head model or a causal LM
    if getattr(inner.config, "_attn_implementation", None) == "eager":
        dtype = dtype or next(inner.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return allowed


class ScalarModel(nn.Module):
    """``nn.Module`` wrapper whose forward returns sequence scores (B,) or, with ``per_token=True``, token
    values (B, T). Prepare this (not the transformers model) with accelerate so distributed hooks see the
    forward that computes the loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def _no_split_modules(self) -> list[str]:
        """The wrapped model's block classes (FSDP's transformer auto-wrap shards them)."""
        return no_split_modules(self.model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, per_token: bool = False,
                select: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Scores (B,) at each row's last non-pad token; (B, T) with ``per_token``; (N,) at positions
        ``select = (rows, cols)`` (then ``attention_mask`` may be a 4-D segment mask and ``position_ids`` must be
        given)."""
        if select is not None:
            return scores_at(self.model, input_ids, attention_mask, position_ids, *select)
        fn = token_values if per_token else sequence_scores
        return fn(self.model, input_ids, attention_mask, position_ids)


# ---------------------------------------------------------------------------------------------------------------
# loading


def init_score_head(model: nn.Module, seed: int = 0) -> None:
    """Deterministic head init without touching the global RNG: weight ~ N(0, 1/(H+1)), bias 0."""
    _init_head(scalar_parts(model)[1], seed)


def _init_head(head: nn.Linear, seed: int) -> None:
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        w = torch.randn(head.weight.shape, generator=g, dtype=torch.float32) / math.sqrt(head.in_features + 1)
        head.weight.copy_(w.to(head.weight.dtype))
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


def _adapter_task_type(path: str) -> str:
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
        return str(json.load(fh).get("task_type") or "")


def _check_single_label(model, path: str) -> None:
    n = getattr(model.config, "num_labels", 1)
    if n != 1:
        raise AlignError(f"{path}: sequence-classification model has num_labels={n}; a reward/value model needs 1")


def load_scalar_model(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                      device: torch.device | str | None = None, seed: int = 0, pad_token_id: int | None = None,
                      merge_adapter: bool = True, require_head: bool = False):
    """An ``AutoModelForSequenceClassification`` with one label from any of:

    * a saved scalar model (``*ForSequenceClassification`` checkpoint): loaded as is, head included;
    * a LoRA adapter of a scalar model (task_type SEQ_CLS): loaded on its base and merged (unless
      ``merge_adapter`` is False);
    * a causal LM (hub id, directory, or LoRA adapter of one, merged): backbone kept, new ``score`` head
      initialised from ``seed`` (see :func:`init_score_head`).

    ``pad_token_id`` (the tokenizer's), when given, is written into the config. ``require_head``: a model without a
    trained score head (a causal LM) is an error instead of getting a new head: a reward model used to score
    must have learned its head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    check_model_path(path)
    new_head = False
    try:
        with _quiet_loading():
            if _is_adapter_dir(path) and _adapter_task_type(path) == "SEQ_CLS":
                from peft import PeftModel

                # its base, loaded the same way (it may be a causal-LM adapter: the SFT output of a LoRA run);
                # the adapter restores the trained score head
                base = load_scalar_model(adapter_base(path), dtype=dtype, trust_remote_code=trust_remote_code,
                                         seed=seed)
                model = PeftModel.from_pretrained(base, path)
                if merge_adapter:
                    # a plain model as from_pretrained gives it: trainable (peft froze the base it loaded on)
                    model = model.merge_and_unload().requires_grad_(True)
                    _record_source(model, path)
            elif _is_adapter_dir(path):
                from .models import load_causal_lm

                lm = load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code)
                config = lm.config
                config.num_labels = 1
                model = AutoModelForSequenceClassification.from_config(config, dtype=dtype,
                                                                       trust_remote_code=trust_remote_code)
                src = getattr(lm, lm.base_model_prefix)
                dst = getattr(model, model.base_model_prefix)
                dst.load_state_dict(src.state_dict())
                del lm
                new_head = True
            else:
                config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
                archs = getattr(config, "architectures", None) or []
                is_scalar = any(a.endswith("ForSequenceClassification") for a in archs)
                kw = {} if is_scalar else {"num_labels": 1}
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=_has_safetensors(path),
                    output_loading_info=True, **kw)
                new_head = any(k.split(".")[0] == SCORE_MODULE for k in info.get("missing_keys", ()))
    except AlignError:
        raise
    except Exception as e:
        raise _load_failure(path, "as a reward/value model", e) from None
    _check_single_label(model, path)
    if new_head and require_head:
        raise AlignError(f"{path}: not a reward model: it has no trained score head (it is a causal language model, "
                         f"and scoring with it would use a random head); train one with `align rm --model {path}` "
                         f"and give that run's output_dir")
    if new_head:
        init_score_head(model, seed)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if device is not None:
        model.to(device)
    return model


def apply_scalar_lora(model, r: int, alpha: int, dropout: float, target_modules: list[str]):
    """LoRA adapters on the backbone of a scalar model; the ``score`` head stays fully trainable and is saved
    with the adapter (peft task_type SEQ_CLS, ``modules_to_save=['score']``)."""
    targets = list(target_modules)
    if targets != ["all-linear"] and SCORE_MODULE in targets:
        targets = [t for t in targets if t != SCORE_MODULE]
    return apply_lora(model, r, alpha, dropout, targets, task_type="SEQ_CLS", modules_to_save=[SCORE_MODULE])


def load_trained_scalar_model(path: str, cfg, weights_dtype: torch.dtype, pad_token_id: int | None,
                              lora_seed: int | None = None):
    """A scalar model a stage trains (the reward model, the PPO critic): :func:`load_scalar_model` (a new head
    from ``cfg.seed``) with LoRA (``cfg.use_lora``, see :func:`apply_scalar_lora`; its initial weights drawn from
    ``lora_seed`` when given, else from the global random stream) and gradient checkpointing as configured."""
    model = load_scalar_model(path, dtype=weights_dtype, trust_remote_code=cfg.trust_remote_code, seed=cfg.seed,
                              pad_token_id=pad_token_id)

    def lora(m):
        with seeded(lora_seed):
            return apply_scalar_lora(m, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)

    lora = lora if cfg.use_lora else None
    return make_trainable(model, cfg.gradient_checkpointing, lora)


# ---------------------------------------------------------------------------------------------------------------
# scalar models that share a causal LM's base weights


class AdapterBackbone(nn.Module):
    """The backbone (decoder) of a causal-LM peft model ``host`` run with its LoRA adapters ``adapters`` active
    (their updates summed): the backbone of a scalar model that keeps no base weights of its own. The host is
    referenced, not registered: its parameters belong to the module that owns it (the policy)."""

    def __init__(self, host: nn.Module, adapters: list[str]):
        super().__init__()
        self._host = (host,)  # a tuple: not a submodule
        self.adapters = list(adapters)

    @property
    def host(self) -> nn.Module:
        return self._host[0]

    def forward(self, **kwargs):
        backbone, _ = lm_parts(self.host)
        with use_adapters(self.host, self.adapters):
            return backbone(**kwargs)


class SharedScalarModel(nn.Module):
    """A reward or value model made of LoRA adapters on the base weights of a causal-LM peft model (``host``, the
    policy) and a score head of its own, so the base weights are held once for both. It is called like any
    scalar model (:func:`sequence_scores`, :func:`token_values`, ...: :func:`scalar_parts` gives its backbone,
    the host's run with ``adapters`` active, and ``score``). Its own parameters are the head's only; its
    adapters' weights are the host's (trainable or frozen as the host has them, see
    :func:`align.models.freeze_adapters`)."""

    def __init__(self, host: nn.Module, adapters: list[str], score: nn.Linear):
        super().__init__()
        self.backbone = AdapterBackbone(host, adapters)
        self.score = score

    @property
    def host(self) -> nn.Module:
        return self.backbone.host

    @property
    def adapters(self) -> list[str]:
        return self.backbone.adapters

    @property
    def config(self):
        """The host's transformers config (attention implementation, dtype, ...)."""
        return unwrap_peft(self.host).config


_HEAD_KEY = f"base_model.model.{SCORE_MODULE}."  # where peft saves a scalar adapter's head (modules_to_save)
_ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter_of(path: str, model: str) -> bool:
    """Whether ``path`` is a LoRA adapter directory of a scalar model (what `align rm --use_lora` saves, or a LoRA
    PPO run's value_model) trained on ``model`` itself, with safetensors weights: one that can run on ``model``'s
    base weights as a named adapter (:func:`add_scalar_adapter`)."""
    if not _is_adapter_dir(path) or not os.path.isfile(os.path.join(path, _ADAPTER_WEIGHTS)):
        return False
    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
            info = json.load(fh)
        return (info.get("peft_type") == "LORA" and info.get("task_type") == "SEQ_CLS"
                and same_model(str(info.get("base_model_name_or_path") or ""), model))
    except (OSError, ValueError):
        return False


def _registry(host: nn.Module) -> dict[str, tuple[str, nn.Linear]]:
    """The scalar adapters loaded on `host`: real path -> (adapter name, score head)."""
    return host.__dict__.setdefault("_align_scalar_adapters", {})


def add_scalar_adapter(host: nn.Module, path: str, name: str) -> tuple[str, nn.Linear]:
    """The scalar-model adapter saved in ``path`` (see :func:`is_adapter_of`) as a frozen LoRA adapter of the
    causal-LM peft model ``host``: (its adapter name, its trained score head, frozen, on the host's device and
    dtype). Loaded once per host: a second call with the same path (the reward model as the critic's starting
    point) returns the first one's name and head."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    key = os.path.realpath(path)
    if key in _registry(host):
        return _registry(host)[key]
    config = LoraConfig.from_pretrained(path)
    # on a causal LM: no head to wrap (the head is kept apart), no dropout (frozen, inference only)
    config = dataclasses.replace(config, task_type="CAUSAL_LM", modules_to_save=None, inference_mode=True,
                                 lora_dropout=0.0)
    state = load_file(os.path.join(path, _ADAPTER_WEIGHTS))
    head_state = {k[len(_HEAD_KEY):]: v for k, v in state.items() if k.startswith(_HEAD_KEY)}
    lora_state = {k: v for k, v in state.items() if not k.startswith(_HEAD_KEY)}
    if "weight" not in head_state:
        raise AlignError(f"{path}: adapter without a trained '{SCORE_MODULE}' head ({_HEAD_KEY}weight)")
    try:
        add_adapter(host, name, config, trainable=False)
        result = set_peft_model_state_dict(host, lora_state, adapter_name=name)
    except (ValueError, KeyError, RuntimeError) as e:
        raise AlignError(f"{path}: cannot load it as adapter '{name}' of the policy's base model: {e}") from None
    if getattr(result, "unexpected_keys", None):
        raise AlignError(f"{path}: adapter weights that the base model has no place for: "
                         f"{', '.join(result.unexpected_keys[:3])}")
    ref = next(unwrap_peft(host).parameters())
    w = head_state["weight"]
    head = nn.Linear(w.shape[1], w.shape[0], bias="bias" in head_state, dtype=ref.dtype, device=ref.device)
    head.load_state_dict(head_state)
    head.requires_grad_(False)
    _registry(host)[key] = (name, head)
    return name, head


def new_score_head(host: nn.Module, seed: int, dtype: torch.dtype | None = None) -> nn.Linear:
    """A score head for the backbone of the causal LM ``host``, shaped as its ``*ForSequenceClassification`` head
    (hidden -> 1, with a bias where that class has one) and initialised as :func:`init_score_head` does."""
    from transformers import AutoModelForSequenceClassification

    base = unwrap_peft(host)
    config = copy.deepcopy(base.config)
    config.num_labels = 1
    try:
        with torch.device("meta"), _quiet_loading():
            layout = getattr(AutoModelForSequenceClassification.from_config(config), SCORE_MODULE)
    except Exception as e:
        raise AlignError(f"{type(base).__name__}: cannot make a value head for it: {e}") from None
    ref = next(base.parameters())
    head = nn.Linear(layout.in_features, layout.out_features, bias=layout.bias is not None, device=ref.device,
                     dtype=dtype or ref.dtype)
    _init_head(head, seed)
    return head


def save_scalar_adapter(model: SharedScalarModel, adapter: str, base: str, out_dir: str,
                        host_state: dict[str, torch.Tensor] | None = None,
                        head_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write adapter ``adapter`` of a :class:`SharedScalarModel`'s host and the model's score head into
    ``out_dir`` as a LoRA adapter of a scalar model on ``base``, in the layout `align rm --use_lora` saves (the
    head as peft's ``modules_to_save``): :func:`load_scalar_model`, AutoPeftModelForSequenceClassification and
    ``align export`` load it. ``host_state`` / ``head_state``: the host's and the head's whole state dicts
    when their weights are sharded (FSDP2: gathered by the caller), else they are read from the modules."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = copy.deepcopy(model.host.peft_config[adapter])
    config.task_type = "SEQ_CLS"
    config.modules_to_save = [SCORE_MODULE]
    config.base_model_name_or_path = base
    config.inference_mode = True
    state = get_peft_model_state_dict(model.host, state_dict=host_state, adapter_name=adapter,
                                      save_embedding_layers=False)
    state.update({_HEAD_KEY + k: v for k, v in (head_state or model.score.state_dict()).items()})
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(out_dir, _ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    config.save_pretrained(out_dir)
