"""The built-in tiny model: a character-level tokenizer and small random causal LMs, built offline.

Everything here is made from code, never downloaded, so the whole pipeline (SFT -> reward model -> PPO/GRPO)
runs on a machine without internet access.

Tokenizer
    One token per character: a byte-level BPE with no merges whose vocabulary holds all 256 byte symbols, so
    every ASCII character is one token (digits, letters, space, newline, tab and punctuation get the low ids
    7..103) and other text falls back to one token per UTF-8 byte. 263 tokens in all. Special tokens::

        id 0 <pad>   id 1 <bos>   id 2 <eos>   id 3 <unk>
        id 4 <|system|>   id 5 <|user|>   id 6 <|assistant|>

    The byte-level form (space is the symbol 'Ġ' inside the vocabulary) is there for one reason:
    ``AutoTokenizer.from_pretrained`` rebuilds any saved qwen2 tokenizer as ``Qwen2Tokenizer``, whose pipeline
    is byte-level; ours is that same pipeline, so every architecture's saved tokenizer encodes identically.

    No token is added automatically: ``tok("What is 47+38?")["input_ids"]`` has exactly 14 ids, and
    ``decode(encode(x)) == x`` for any NFC-normalised text (all ASCII text). ``<bos>`` exists (and is set as
    ``bos_token``) for code that wants one, but a plain prompt + completion never needs it, and a BOS that
    appears only sometimes would make prompt encodings differ between data paths. ``padding_side`` is left at
    the library default (right); code that generates sets it to left itself.

    The chat template renders::

        <|system|>{system}\\n<|user|>{user}\\n<|assistant|>{answer}<eos>

    and ``add_generation_prompt=True`` appends ``<|assistant|>``. Rendering a conversation without its last
    assistant turn plus the generation prompt is therefore an exact prefix of the full rendering, and the
    assistant content + eos is wrapped in ``{% generation %}`` so ``return_assistant_tokens_mask=True`` works.

Models
    ``build_model`` builds one of ``ARCHS`` from a config with our size arguments mapped to the architecture's
    own names, initialised deterministically from ``seed`` without touching the global RNG.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from typing import Any

import torch

from .config import Checked, _f

__all__ = [
    "ARCHS",
    "DEFAULT_TINY",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "build_tokenizer",
    "model_config",
    "build_model",
    "save_tiny_model",
    "TinyModelConfig",
    "run_tiny_model",
]

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK) + ROLE_TOKENS

# The characters that come first in the vocabulary (ids 7..103), in a fixed order; the other byte symbols follow.
CHARACTERS = tuple(string.digits + string.ascii_lowercase + string.ascii_uppercase + " \n\t" + string.punctuation)

# Qwen2's pre-tokenizer split; with no merges it cannot change the tokens, but ``AutoTokenizer`` rebuilds a saved
# qwen2 tokenizer with exactly this pipeline, so ours is identical to keep encodings equal across architectures.
_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)


def _byte_symbols() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode symbols (space -> 'Ġ', ...)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{%- else -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

ARCHS = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox", "phi")

# Size of the built-in pipeline model (165k parameters), chosen by the SFT experiment on the addition task (numbers
# in data/README.md). With SFT on data/addition/sft.jsonl at learning_rate 3e-3, batch 64, 50 warmup steps and a
# cosine decay, it learns 2-digit addition, with the demonstrator's forgotten carry, within 500-900 steps in every
# seed tried; 1500 steps leave a margin. 8 heads (head_dim 8) matter: with 4 heads the same run learned later
# (about 1000 steps) and one seed in three not within 2000 steps; 3 layers or a 128-wide MLP were no faster.
DEFAULT_TINY: dict[str, Any] = dict(
    arch="llama",
    hidden_size=64,
    num_layers=2,
    num_heads=8,
    intermediate_size=256,
    max_position_embeddings=64,
)


def build_tokenizer():
    """Character-level ``PreTrainedTokenizerFast`` with pad/bos/eos/unk, role tokens and a chat template.

    Technically a byte-level BPE with no merges: every ASCII character is one token and any other text falls
    back to one token per UTF-8 byte, so ``decode(encode(x)) == x`` for every string. Deterministic: the
    vocabulary is a fixed list, so every call gives identical ids.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = _byte_symbols()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab.setdefault(symbols[ord(ch)], len(vocab))
    for b in range(256):
        vocab.setdefault(symbols[b], len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def model_config(
    tokenizer,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 64,
):
    """A ``PretrainedConfig`` for ``arch`` with our size names mapped to the architecture's names.

    ``intermediate_size`` defaults to ``4 * hidden_size``. Every architecture uses full multi-head attention
    (no grouped KV heads) and the token ids of ``tokenizer``.
    """
    from transformers import AutoConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    inter = intermediate_size or 4 * hidden_size
    ids = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if arch == "gpt2":
        sizes = dict(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_inner=inter,
                     n_positions=max_position_embeddings)
    else:
        sizes = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                     intermediate_size=inter, max_position_embeddings=max_position_embeddings)
        if arch != "gpt_neox":
            sizes["num_key_value_heads"] = num_heads
    return AutoConfig.for_model(arch, **sizes, **ids)


def build_model(tokenizer, seed: int = 0, **sizes):
    """A randomly initialised float32 ``AutoModelForCausalLM`` of the architecture and sizes ``sizes`` (the
    keyword arguments of :func:`model_config`: arch, hidden_size, num_layers, num_heads, ...).

    The same arguments and ``seed`` give bit-identical weights; the global torch RNG is left untouched.
    pad/bos/eos ids are set in both ``model.config`` and ``model.generation_config``.
    """
    from transformers import AutoModelForCausalLM

    config = model_config(tokenizer, **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    model.eval()
    return model


def save_tiny_model(output_dir: str | os.PathLike, arch: str = "llama", **model_kwargs) -> str:
    """Build the tokenizer and a tiny ``arch`` model and save both (safetensors) to ``output_dir``.

    ``model_kwargs`` go to :func:`build_model` (sizes, ``seed``). Returns ``output_dir`` as a string; load it
    back offline with ``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``.
    """
    path = os.fspath(output_dir)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, arch=arch, **model_kwargs)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@dataclass
class TinyModelConfig(Checked):
    """`align tiny-model`: build the built-in tiny model and its tokenizer offline and save them."""

    output_dir: str = _f("", "Folder to save the model and tokenizer into (save_pretrained, safetensors).")
    arch: str = _f(DEFAULT_TINY["arch"], f"Architecture: one of {', '.join(ARCHS)}.", choices=ARCHS)
    hidden_size: int = _f(DEFAULT_TINY["hidden_size"], "Width of the residual stream (n_embd for gpt2).", ge=1)
    num_layers: int = _f(DEFAULT_TINY["num_layers"], "Number of transformer blocks.", ge=1)
    num_heads: int = _f(DEFAULT_TINY["num_heads"], "Attention heads; must divide hidden_size.", ge=1)
    intermediate_size: int = _f(DEFAULT_TINY["intermediate_size"], "MLP width; 0 means 4 * hidden_size.", ge=0)
    max_position_embeddings: int = _f(DEFAULT_TINY["max_position_embeddings"],
                                         "Longest sequence the model is configured for.", ge=1)
    seed: int = _f(0, "Seed of the random initialisation.", ge=0)


def run_tiny_model(cfg: TinyModelConfig) -> dict[str, Any]:
    """CLI runner: save the tiny model described by ``cfg``; returns the path and the parameter count."""
    from .config import AlignError

    if not cfg.output_dir:
        raise AlignError("tiny-model: output_dir is required (--output_dir DIR)")
    if cfg.arch not in ARCHS:
        raise AlignError(f"tiny-model: field 'arch': {cfg.arch!r} is not one of {', '.join(ARCHS)}")
    if cfg.hidden_size % cfg.num_heads:
        raise AlignError(f"tiny-model: hidden_size={cfg.hidden_size} is not divisible by num_heads={cfg.num_heads}")
    path = save_tiny_model(cfg.output_dir, arch=cfg.arch, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                           num_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size or None,
                           max_position_embeddings=cfg.max_position_embeddings, seed=cfg.seed)
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        n_params = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    return {"output_dir": path, "arch": cfg.arch, "num_parameters": n_params}


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
