"""Scoring with a trained reward model: a Python API, the reward-function protocol, and `align score`.

    scorer = RewardModelScorer("out/rm")
    scorer(prompts, completions)            # -> list[float], the reward-function protocol of align.rewards
    scorer.score_texts(prompts, completions)  # -> (B,) float32 tensor
    scorer.score_ids(sequences)             # -> (B,) for token-id lists already in the RM's vocabulary

    align score --reward_model out/rm --data rows.jsonl [--output scored.jsonl]

A sequence is encoded exactly as in reward-model training: the prompt (string, or chat messages rendered with
the generation prompt) followed by the completion and EOS; the reward is read at the last token.

Tokenizers: the scorer works on *text*. A policy with another tokenizer passes its raw prompts and its decoded
completions, which the scorer re-encodes with the reward model's tokenizer, so a reward model trained with one
tokenizer scores a policy that uses another. When the policy's tokenizer is the same (same vocabulary, special
tokens and chat template, see :meth:`RewardModelScorer.same_tokenizer`), :meth:`score_token_ids` skips the
decode/encode round trip and scores the policy's ids directly; both paths give the same rewards.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .config import DTYPE_CHOICES, AlignError, Checked, _f
from .data import (Rows, batched, encode_completion, encode_prompt, is_chat, left_pad, read_rows, require_text,
                   short_repr, write_atomic)
from .heads import SharedScalarModel, add_scalar_adapter, load_scalar_model, sequence_scores
from .models import default_device, frozen_dtype, load_tokenizer


class RewardModelScorer:
    """A frozen reward model and its tokenizer, callable as a reward function.

    ``path``: a directory saved by ``align rm`` (full or LoRA) or any ``*ForSequenceClassification`` checkpoint
    with one label. ``dtype``: ``"auto"`` (float32 on CPU, bfloat16 on capable GPUs), a dtype name or a
    ``torch.dtype``. ``batch_size``: sequences per forward (sorted by length to limit padding).
    ``max_length``: if > 0, longer sequences keep their last ``max_length`` tokens (the reward is read at the
    end); 0 keeps everything.

    ``host``: a causal-LM peft model (the policy of a LoRA RL run) on the base model the reward model's LoRA
    adapter was trained on (:func:`align.heads.is_adapter_of`): the adapter is then loaded as the host's frozen
    adapter 'reward' and scores with the host's base weights (:class:`align.heads.SharedScalarModel`), instead
    of a second copy of them; the scores are those of the reward model loaded on its own (up to float
    rounding: the adapter is not merged). ``dtype`` is then the host's."""

    def __init__(self, path: str, device: torch.device | str | None = None, dtype: torch.dtype | str = "auto",
                 batch_size: int = 32, max_length: int = 0, trust_remote_code: bool = False, host=None):
        self.device = torch.device(device) if device is not None else default_device()
        if isinstance(dtype, str):
            dtype = frozen_dtype(dtype, self.device)
        self.tokenizer = load_tokenizer(path, trust_remote_code)
        if host is not None:
            name, head = add_scalar_adapter(host, path, "reward")
            self.model = SharedScalarModel(host, [name], head).to(self.device)
        else:
            self.model = load_scalar_model(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                           device=self.device, pad_token_id=self.tokenizer.pad_token_id,
                                           require_head=True)
        self.model.eval().requires_grad_(False)  # shared: the head (the host keeps its adapter frozen)
        self.batch_size = max(1, int(batch_size))
        self.max_length = int(max_length)
        self.path = path
        self._same: dict[int, bool] = {}
        # model -> context in which its weights are whole (a training run sets it when it shards the model)
        self.gather: Any = lambda model: contextlib.nullcontext()

    # -- encoding ----------------------------------------------------------------------------------------------
    def encode(self, prompt: Any, completion: Any) -> list[int]:
        """RM token ids of prompt + completion + EOS, as in reward-model training."""
        return encode_prompt(self.tokenizer, prompt) + encode_completion(self.tokenizer, completion, prompt,
                                                                         add_eos=True)

    def same_tokenizer(self, tokenizer) -> bool:
        """Whether `tokenizer` encodes exactly like the RM's (vocabulary, eos/pad ids, chat template), so ids
        can be scored without a decode/encode round trip."""
        if tokenizer is None or tokenizer is self.tokenizer:
            return True
        key = id(tokenizer)
        if key not in self._same:
            mine = self.tokenizer
            self._same[key] = (tokenizer.get_vocab() == mine.get_vocab()
                               and tokenizer.eos_token_id == mine.eos_token_id
                               and getattr(tokenizer, "chat_template", None) == getattr(mine, "chat_template", None))
        return self._same[key]

    # -- scoring -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score_ids(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Rewards (B,) float32 on CPU of token-id sequences in the RM's vocabulary (scored at the last token)."""
        if not len(sequences):
            return torch.zeros(0)
        seqs = [list(s)[-self.max_length:] if self.max_length > 0 else list(s) for s in sequences]
        for k, s in enumerate(seqs):
            if not s:
                raise AlignError(f"reward model {self.path}: sequence {k} is empty")
        order = sorted(range(len(seqs)), key=lambda k: len(seqs[k]))
        out = torch.empty(len(seqs), dtype=torch.float32)
        with self.gather(self.model):
            for chunk in batched(order, self.batch_size):
                ids, att = left_pad([seqs[k] for k in chunk], self.tokenizer.pad_token_id)
                r = sequence_scores(self.model, ids.to(self.device), att.to(self.device))
                out[torch.tensor(list(chunk))] = r.float().cpu()
        return out

    def score_texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> torch.Tensor:
        """Rewards (B,) of (prompt, completion) pairs given as text (or chat messages)."""
        if len(prompts) != len(completions):
            raise AlignError(f"reward model {self.path}: {len(prompts)} prompts but {len(completions)} completions")
        return self.score_ids([self.encode(p, c) for p, c in zip(prompts, completions)])

    def score_token_ids(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                        tokenizer=None) -> torch.Tensor:
        """Rewards (B,) of prompts and completions given as ids of `tokenizer` (default: the RM's own).

        Same tokenizer: ids are concatenated (special tokens other than a final EOS dropped from the
        completion, EOS appended if missing). Different tokenizer: decoded (skipping special tokens) and
        re-encoded with the RM's tokenizer; prompts are decoded as rendered (chat template included)."""
        if self.same_tokenizer(tokenizer):
            tok = self.tokenizer
            special = set(tok.all_special_ids)
            eos = tok.eos_token_id
            seqs = []
            for p, c in zip(prompt_ids, completion_ids):
                body = [t for t in c if t not in special]
                seqs.append(list(p) + body + ([eos] if eos is not None else []))
            return self.score_ids(seqs)
        prompts = [tokenizer.decode(p, skip_special_tokens=False) for p in prompt_ids]
        comps = [tokenizer.decode(c, skip_special_tokens=True) for c in completion_ids]
        return self.score_ids([self.tokenizer(p, add_special_tokens=False)["input_ids"]
                               + encode_completion(self.tokenizer, c, None, add_eos=True)
                               for p, c in zip(prompts, comps)])

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        """The reward-function protocol: one float per (raw prompt, decoded completion); other columns ignored.
        A non-finite score is an error naming the reward model and the first prompt and completion that got
        one."""
        scores = self.score_texts(prompts, completions).tolist()
        bad = next((i for i, r in enumerate(scores) if not math.isfinite(r)), None)
        if bad is not None:
            raise AlignError(f"reward model {self.path}: score {scores[bad]} for prompt "
                             f"{short_repr(prompts[bad], 80)}, completion {short_repr(completions[bad], 80)} "
                             f"(check its weights, or its dtype: float16 overflows easily)")
        return scores


# ---------------------------------------------------------------------------------------------------------------
# align score


@dataclass
class ScoreConfig(Checked):
    """Add reward columns to a data file with a reward model."""

    reward_model: str = _f("", "Reward-model directory (saved by `align rm`) or hub id.")
    data: str = _f("", "Rows to score (jsonl/json/parquet/csv or hub id): prompt+completion -> 'reward'; "
                       "prompt+chosen+rejected -> 'reward_chosen', 'reward_rejected'; prompt+responses -> "
                       "'rewards' (a list); messages (last turn from the assistant) or text -> 'reward'.")
    split: str = _f("train", "Split to read when data is a hub dataset id.")
    column_map: dict = _f({}, "Rename data columns on reading, {our name: the data's name}, e.g. "
                         "{prompt: question, answer: final_answer} for a hub data set with other names.")
    output: str = _f("", "Output JSON-lines file (written atomically); default: DATA with .scored.jsonl.")
    reward_column: str = _f("reward", "Name of the added column (suffixed _chosen/_rejected, or 's' for lists).")
    batch_size: int = _f(32, "Sequences per forward pass.", ge=1)
    max_length: int = _f(0, "If > 0, score only the last max_length tokens of longer sequences.", ge=0)
    dtype: str = _f("auto", "auto (fp32 on CPU, bf16 on capable GPUs), float32, bfloat16 or float16.",
                    choices=DTYPE_CHOICES)
    device: str = _f("", "Device (cpu, cuda, cuda:1); default: a GPU when there is one.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub to run.")


def _row_items(data: Rows, i: int, scorer: RewardModelScorer, col: str) -> list[tuple[str, int | None, list[int]]]:
    """(output column, list position or None, RM token ids) for everything to score in row i."""
    row = data.rows[i]
    if "completion" in row:
        prompt = require_text(data, i, "prompt", allow_chat=True)
        return [(col, None, scorer.encode(prompt, require_text(data, i, "completion", allow_chat=True)))]
    if "chosen" in row or "rejected" in row:
        prompt = require_text(data, i, "prompt", allow_chat=True)
        return [(f"{col}_{side}", None, scorer.encode(prompt, require_text(data, i, side, allow_chat=True)))
                for side in ("chosen", "rejected")]
    if "responses" in row:
        prompt = require_text(data, i, "prompt", allow_chat=True)
        lst = row["responses"]
        if not isinstance(lst, list) or not lst or is_chat(lst):
            raise AlignError(f"{data.where(i, 'responses')}: expected a non-empty list of responses")
        out = []
        for k, r in enumerate(lst):
            if not (is_chat(r) or (isinstance(r, str) and r.strip())):
                raise AlignError(f"{data.where(i, 'responses')}: response {k + 1}: empty or not a string")
            out.append((f"{col}s", k, scorer.encode(prompt, r)))
        return out
    if "messages" in row:
        msgs = require_text(data, i, "messages", allow_chat=True)
        if not is_chat(msgs) or msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise AlignError(f"{data.where(i, 'messages')}: expected a chat ending with an assistant message")
        return [(col, None, scorer.encode(msgs[:-1], msgs[-1:]))]
    if "text" in row:
        text = require_text(data, i, "text")
        tok = scorer.tokenizer
        ids = tok(text, add_special_tokens=True)["input_ids"]
        if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
            ids = ids + [tok.eos_token_id]
        return [(col, None, ids)]
    raise AlignError(f"{data.where(i)}: nothing to score (need prompt+completion, prompt+chosen+rejected, "
                     f"prompt+responses, messages or text; found {', '.join(row) or 'none'})")


def default_output(data: str) -> str:
    if not os.path.isfile(data):
        raise AlignError(f"{data}: set --output (the data is not a local file)")
    stem = data
    for suf in (".jsonl", ".json", ".parquet", ".csv"):
        if stem.endswith(suf):
            stem = stem[: -len(suf)]
            break
    return stem + ".scored.jsonl"


def run_score(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every row of cfg.data and write them with the added reward column(s). All rows are read and
    encoded before the model runs; nothing is written unless every row is valid."""
    if not cfg.data:
        raise AlignError("no data given (set --data)")
    output = cfg.output or default_output(cfg.data)
    if os.path.abspath(output) == os.path.abspath(cfg.data):
        raise AlignError(f"{output}: output would overwrite the input data")
    if cfg.batch_size <= 0:
        raise AlignError(f"batch_size must be > 0, got {cfg.batch_size}")
    data = read_rows(cfg.data, cfg.split, cfg.column_map)
    scorer = RewardModelScorer(cfg.reward_model, device=cfg.device or None, dtype=cfg.dtype,
                               batch_size=cfg.batch_size, max_length=cfg.max_length,
                               trust_remote_code=cfg.trust_remote_code)
    items = [(i, c, k, ids) for i in range(len(data)) for c, k, ids in _row_items(data, i, scorer, cfg.reward_column)]
    rewards = scorer.score_ids([ids for *_, ids in items]).tolist()
    bad = next((n for n, r in enumerate(rewards) if not math.isfinite(r)), None)
    if bad is not None:
        raise AlignError(f"{data.where(items[bad][0])}: reward model {cfg.reward_model} scores it "
                         f"{rewards[bad]} (non-finite); nothing written")
    rows = [dict(r) for r in data.rows]
    for (i, c, k, _), r in zip(items, rewards):
        if k is None:
            rows[i][c] = r
        else:
            if k == 0:
                rows[i][c] = [None] * len(data.rows[i]["responses"])
            rows[i][c][k] = r
    write_atomic(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    summary: dict[str, Any] = {"output": output, "rows": len(rows), "scored": len(rewards),
                               "reward_mean": sum(rewards) / len(rewards)}
    chosen, rejected = f"{cfg.reward_column}_chosen", f"{cfg.reward_column}_rejected"
    pairs = [(r[chosen], r[rejected]) for r in rows if chosen in r]
    if pairs:
        summary["pairwise_accuracy"] = sum(1.0 for a, b in pairs if a > b) / len(pairs)
    return summary
