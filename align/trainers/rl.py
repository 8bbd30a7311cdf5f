"""Plumbing shared by the RL stages (PPO, GRPO, ...): the prompt data, the reward sources, the reference
policy and the greedy gold evaluation. Everything here reads a config; nothing here is algorithm math.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..config import AlignError
from ..data import Rows, encode_prompt, left_pad, read_rows, require_text
from ..models import SelectiveLM, frozen_dtype, load_causal_lm, load_tokenizer, sync_special_tokens
from ..rewards import load_function
from .loop import check_output_dir

REWARD_MODEL_NAME = "reward_model"


@dataclass
class PromptData:
    """Validated prompts of an RL stage: the raw prompts, their token ids and the other columns."""

    prompts: list[Any]
    ids: list[list[int]]
    columns: dict[str, list[Any]]

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, indices: Sequence[int], pad_id: int, device: torch.device | str = "cpu"
              ) -> tuple[list[Any], dict[str, list[Any]], torch.Tensor, torch.Tensor]:
        """(prompts, columns, left-padded ids (B, P), mask (B, P)) of the rows `indices`."""
        ids, mask = left_pad([self.ids[i] for i in indices], pad_id)
        cols = {k: [v[i] for i in indices] for k, v in self.columns.items()}
        return [self.prompts[i] for i in indices], cols, ids.to(device), mask.to(device)


def load_prompt_data(data: Rows, tokenizer, max_length: int, max_new_tokens: int) -> PromptData:
    """Validate every row (a non-empty 'prompt' string or chat, the same other columns as the first row) and
    encode the prompts; a prompt that leaves no room for max_new_tokens within max_length is an error."""
    keys = [k for k in data.rows[0] if k != "prompt"]
    prompts, ids = [], []
    columns: dict[str, list[Any]] = {k: [] for k in keys}
    budget = max_length - max_new_tokens
    for i in range(len(data)):
        prompt = require_text(data, i, "prompt", allow_chat=True)
        for k in keys:
            if k not in data.rows[i]:
                raise AlignError(f"{data.where(i, k)}: missing column (the first row has it)")
            columns[k].append(data.rows[i][k])
        p = encode_prompt(tokenizer, prompt)
        if len(p) > budget:
            raise AlignError(f"{data.where(i, 'prompt')}: prompt is {len(p)} tokens; with max_new_tokens="
                             f"{max_new_tokens} that exceeds max_length={max_length}")
        prompts.append(prompt)
        ids.append(p)
    return PromptData(prompts, ids, columns)


def check_rl_config(cfg) -> None:
    """One-line errors for RL settings that cannot work, before anything is loaded or written."""
    if not cfg.reward_model and not cfg.reward_funcs:
        raise AlignError("no reward source: set reward_model and/or reward_funcs")
    n_sources = (1 if cfg.reward_model else 0) + len(cfg.reward_funcs)
    if cfg.reward_weights and len(cfg.reward_weights) != n_sources:
        raise AlignError(f"reward_weights has {len(cfg.reward_weights)} values for {n_sources} reward sources "
                         f"(reward_model first, then reward_funcs)")
    for w in cfg.reward_weights:
        try:
            float(w)
        except (TypeError, ValueError):
            raise AlignError(f"reward_weights: {w!r} is not a number") from None
    if cfg.max_new_tokens < 1:
        raise AlignError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    if cfg.temperature <= 0:
        raise AlignError(f"temperature must be > 0, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise AlignError(f"top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.beta < 0:
        raise AlignError(f"beta must be >= 0, got {cfg.beta}")
    for spec in list(cfg.reward_funcs) + list(cfg.gold_reward_funcs):
        load_function(spec)  # bad specs fail here, with the spec named


def reward_sources(cfg, device: torch.device) -> dict[str, Callable[..., Sequence[float]]]:
    """name -> reward function: the reward model (if set, first) then reward_funcs, in config order."""
    sources: dict[str, Callable[..., Sequence[float]]] = {}
    if cfg.reward_model:
        from ..scoring import RewardModelScorer

        sources[REWARD_MODEL_NAME] = RewardModelScorer(cfg.reward_model, device=device, dtype=cfg.dtype,
                                                       batch_size=max(cfg.per_device_eval_batch_size, 1),
                                                       trust_remote_code=cfg.trust_remote_code)
    for spec in cfg.reward_funcs:
        sources[source_name(spec)] = load_function(spec)
    return sources


def gold_sources(cfg) -> dict[str, Callable[..., Sequence[float]]]:
    return {source_name(spec): load_function(spec) for spec in cfg.gold_reward_funcs}


def source_name(spec: str) -> str:
    """Short metric name of a reward spec: 'exact_match', 'rewards.py:fn' -> 'fn', 'pkg.mod:fn' -> 'fn'."""
    return spec.rsplit(":", 1)[-1] if ":" in spec else spec


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


class Reference:
    """The frozen reference policy: a separate model, or (LoRA) the trained model with its adapter disabled,
    which keeps one copy of the base weights."""

    def __init__(self, lm: SelectiveLM | None, adapter_host: nn.Module | None = None):
        self.lm = lm
        self.adapter_host = adapter_host

    @classmethod
    def load(cls, cfg, policy: nn.Module, tokenizer, device: torch.device) -> "Reference":
        if cfg.use_lora and (not cfg.ref_model or cfg.ref_model == cfg.model):
            return cls(None, adapter_host=policy)
        model = load_causal_lm(cfg.ref_model or cfg.model, dtype=frozen_dtype(cfg.dtype, device),
                               trust_remote_code=cfg.trust_remote_code, device=device)
        sync_special_tokens(model, tokenizer)
        model.eval().requires_grad_(False)
        return cls(SelectiveLM(model))

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        """Context giving a SelectiveLM-like module that computes the reference's logits."""
        if self.lm is not None:
            yield self.lm
            return
        with self.adapter_host.disable_adapter():
            yield SelectiveLM(self.adapter_host)


def greedy_eval(model: nn.Module, tokenizer, data: Rows, funcs: Sequence[str], max_new_tokens: int,
                batch_size: int, max_samples: int = 0) -> dict[str, float]:
    """Greedy generation on the eval prompts scored with `funcs`: eval_reward and eval_<name> per function."""
    from ..evaluate import evaluate_model

    res = evaluate_model(model, tokenizer, data, list(funcs), max_new_tokens=max_new_tokens, batch_size=batch_size,
                         max_samples=max_samples)
    out = {"eval_reward": float(res["reward_mean"])}
    for spec in funcs:
        out[f"eval_{source_name(spec)}"] = float(res[f"reward_{spec}"])
    return out


class RolloutSampler:
    """One step's rollouts for any RL stage: this process's share of the step's prompts, num_generations
    completions each sampled with the current policy, scored by the reward sources, with the reference
    log-probabilities (when a `Reference` is given) and critic values (when a `value_fn` is given).

    Which prompts a step uses and how they are sampled depend on (seed, step, rank) only, so a resumed run draws
    the same rollouts as an uninterrupted one."""

    def __init__(self, cfg, run, tokenizer, data: PromptData, sources: dict, weights: Sequence[float] | None,
                 gold: dict, reference: Reference | None = None, num_generations: int = 1):
        self.cfg, self.run, self.tokenizer, self.data = cfg, run, tokenizer, data
        self.sources, self.weights, self.gold, self.reference = sources, weights, gold, reference
        self.num_generations = num_generations
        self.global_prompts = cfg.per_device_train_batch_size * run.world

    def __call__(self, step: int, policy: nn.Module,
                 value_fn: Callable[[Any], torch.Tensor] | None = None):
        """The `Rollout` of `step` sampled from `policy` (a causal LM, in eval mode during sampling)."""
        from ..data import global_batch_indices, split_micro_batches
        from ..rollout import generate, make_generator, make_rollout

        cfg, run = self.cfg, self.run
        indices = global_batch_indices(step, len(self.data), self.global_prompts, cfg.seed)
        mine = split_micro_batches(indices, run.world, run.rank, 1)[0]
        prompts, cols, ids, mask = self.data.batch(mine, self.tokenizer.pad_token_id, run.device)
        was_training = policy.training
        policy.eval()
        try:
            with torch.no_grad(), run.accelerator.autocast():
                with run.timer("generation"):
                    samples = generate(policy, ids, mask, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                       cfg.top_k, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                                       generator=make_generator(run.device, cfg.seed, step, run.rank),
                                       num_return_sequences=self.num_generations)
                return make_rollout(samples, self.tokenizer, prompts, cols, self.sources, self.weights,
                                    cfg.missing_eos_penalty, self.gold,
                                    ref_fn=self._ref_logprobs if self.reference is not None else None,
                                    value_fn=value_fn, timer=run.timer)
        finally:
            policy.train(was_training)

    def _ref_logprobs(self, r) -> torch.Tensor:
        from ..rollout import completion_logprobs

        with self.reference.active() as ref:
            return completion_logprobs(ref, r, self.cfg.temperature)[0]


def apply_gradients(run, max_grad_norm: float) -> float | None:
    """Clip the accumulated gradient (max_grad_norm <= 0: no clipping), apply it with the run's optimizer and zero
    it, *without* advancing the learning-rate schedule: RL stages that make several updates per batch of
    rollouts advance the schedule once per step. Returns the gradient norm before clipping (None: not clipped)."""
    norm = None
    if max_grad_norm and max_grad_norm > 0:
        norm = float(run.accelerator.clip_grad_norm_(run.model.parameters(), max_grad_norm))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return norm


def load_rl_inputs(cfg, check: Callable[[Any], None]) -> tuple[Any, PromptData, Any, list[str]]:
    """Everything an RL stage reads before it builds a model, validated in this order: output_dir, the config
    (``check``), the tokenizer, the training prompts, the eval rows; so bad input stops the run before anything
    is written. Returns (tokenizer, prompt data, eval rows or None, eval reward functions)."""
    check_output_dir(cfg)
    check(cfg)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    data = load_prompt_data(read_rows(cfg.train_data, cfg.train_split, cfg.column_map), tokenizer,
                            cfg.max_length, cfg.max_new_tokens)
    eval_rows, eval_funcs = load_eval(cfg)
    return tokenizer, data, eval_rows, eval_funcs


def load_eval(cfg) -> tuple[Any, list[str]]:
    """(validated eval rows or None, reward functions to score them with: gold_reward_funcs, else reward_funcs)
    of an RL config."""
    from ..evaluate import prompt_columns

    if not cfg.eval_data:
        return None, []
    funcs = list(cfg.gold_reward_funcs or cfg.reward_funcs)
    rows = read_rows(cfg.eval_data, cfg.eval_split, cfg.column_map)
    prompt_columns(rows, len(rows))
    if not funcs:
        raise AlignError("eval_data is set but there is no reward function to score it with (set "
                         "gold_reward_funcs, e.g. exact_match)")
    return rows, funcs
