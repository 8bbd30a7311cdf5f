"""The floor every RL stage stands on: one runner (`run_rl_stage`) that loads and validates the inputs, builds
the policy, reference, reward sources, sampler and evaluation, trains on the shared loop and saves; the rollout
sampler; the frozen reference; and the rollout metrics every stage logs.

An RL stage is an :class:`RLStage`: a name, its config checks, and a `make_step` hook that turns the set-up into
the step function for `Run.train` (sample with `setup.sampler`, compute advantages and the loss from
`align.advantages` / `align.losses`, update). Nothing here is algorithm math.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..advantages import kl_shaped_rewards, needs_values, psi_and_value_targets
from ..config import AlignError
from ..data import PromptData, global_batch_indices, load_prompt_data, prompt_columns, read_rows, split_evenly
from ..evaluate import greedy_eval
from ..losses import explained_variance, masked_mean
from ..models import (SelectiveLM, disable_dropout, frozen_dtype, load_causal_lm, load_tokenizer, load_trained_lm,
                      same_model, sync_special_tokens, use_adapters)
from ..rewards import REWARD_MODEL_NAME, check_reward_columns, functions, reward_sources
from ..rollout import (Rollout, completion_logprobs, completion_uniforms, generate, group_completion_logprobs,
                       make_rollout)
from .checkpoints import check_output_dir
from .critic import PolicyAndValue, plan_base_sharing, policy_of, rollout_values, save_policy_and_critic, with_critic
from .loop import Run, resolve_max_steps, seed_everything
from .outputs import push_final

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------------------------
# checks and inputs


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
    functions(list(cfg.reward_funcs) + list(cfg.gold_reward_funcs))  # bad specs fail here, with the spec named


def refuse_token_budget(cfg, stage: str) -> None:
    """For the RL stages whose updates are not cut by `Run.shares` with row lengths (TRPO, online DPO)."""
    if cfg.max_tokens_per_micro_batch:
        raise AlignError(f"max_tokens_per_micro_batch applies to ppo, grpo and reinforce, not {stage} (its "
                         f"micro-batches are gradient_accumulation_steps equal parts)")


def check_pg_config(cfg) -> None:
    """check_rl_config plus the Ψ settings of the vanilla policy-gradient stages (REINFORCE, TRPO)."""
    check_rl_config(cfg)
    if cfg.psi == "reward_to_go_baseline" and cfg.baseline == "group_mean" and cfg.num_generations < 2:
        raise AlignError("baseline=group_mean needs num_generations >= 2 (with one completion per prompt the "
                         "group mean is the completion's own return and Psi is 0)")
    if cfg.per_device_train_batch_size * cfg.num_generations < cfg.gradient_accumulation_steps:
        raise AlignError(f"{cfg.per_device_train_batch_size * cfg.num_generations} rollouts per process cannot "
                         f"fill gradient_accumulation_steps={cfg.gradient_accumulation_steps} micro-batches")
    if needs_values(cfg.psi, cfg.baseline) and cfg.value_model.endswith((".py", ".jsonl")):
        raise AlignError(f"value_model {cfg.value_model}: expected a model directory, hub id or 'policy'")


def load_rl_inputs(cfg, check: Callable[[Any], None]) -> tuple[Any, PromptData, Any, list[str]]:
    """Everything an RL stage reads before it builds a model, validated in this order: output_dir, the config
    (``check``), the tokenizer, the training prompts, the eval rows; so bad input stops the run before anything
    is written. Returns (tokenizer, prompt data, eval rows or None, eval reward functions)."""
    check_output_dir(cfg)
    check(cfg)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    rows = read_rows(cfg.train_data, cfg.train_split, cfg.column_map)
    data = load_prompt_data(rows, tokenizer, cfg.max_length, cfg.max_new_tokens)
    # the columns each reward function needs, reported with file, row and field
    check_reward_columns([*cfg.reward_funcs, *cfg.gold_reward_funcs, *getattr(cfg, "rm_label_funcs", [])], rows)
    eval_rows, eval_funcs = None, []
    if cfg.eval_data:
        eval_funcs = list(cfg.gold_reward_funcs or cfg.reward_funcs)
        eval_rows = read_rows(cfg.eval_data, cfg.eval_split, cfg.column_map)
        prompt_columns(eval_rows, len(eval_rows))
        check_reward_columns(eval_funcs, eval_rows)
        if not eval_funcs:
            raise AlignError("eval_data is set but there is no reward function to score it with (set "
                             "gold_reward_funcs, e.g. exact_match)")
    return tokenizer, data, eval_rows, eval_funcs


# ---------------------------------------------------------------------------------------------------------------
# the reference and the sampler


class Reference:
    """The frozen reference policy: a separate model, or (LoRA) the trained model with its adapter disabled,
    which keeps one copy of the base weights (after an iterative-GRPO reset: with a frozen copy of the policy's
    adapter instead, `iterative.ReferenceKeeper`)."""

    def __init__(self, lm: SelectiveLM | None, adapter_host: nn.Module | None = None,
                 gather: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.lm = lm
        self.adapter_host = adapter_host
        self.adapters: list[str] = []  # the host's adapters the reference computes with (none: the base model)
        self.gather = gather  # makes the reference's weights whole while it is used (sharded under FSDP2)

    @classmethod
    def load(cls, cfg, policy: nn.Module, tokenizer, run: Run) -> "Reference":
        """The reference of an RL config: the policy with its adapter disabled (LoRA, no other ref_model), else
        ref_model (default: model) loaded frozen, placed per the strategy (`Run.shard_frozen`)."""
        if cfg.use_lora and (not cfg.ref_model or same_model(cfg.ref_model, cfg.model)):
            return cls(None, adapter_host=policy, gather=run.full_weights)
        model = load_causal_lm(cfg.ref_model or cfg.model,
                               dtype=frozen_dtype(cfg.dtype, run.device, cfg.frozen_dtype),
                               trust_remote_code=cfg.trust_remote_code, device=run.device)
        sync_special_tokens(model, tokenizer)
        model.eval().requires_grad_(False)
        model = run.shard_frozen(model)
        return cls(SelectiveLM(model), gather=lambda: run.whole(model))

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        """Context giving a SelectiveLM-like module that computes the reference's logits (every process must
        enter: under FSDP2 its weights are gathered)."""
        with self.gather():
            if self.lm is not None:
                yield self.lm
                return
            # every adapter off (the policy's, and a reward model's or critic's on the same base), or only the frozen
            # copy of the policy's that iterative GRPO resets it to; without peft's disable_adapter, which would
            # leave only the active adapter trainable on exit
            with use_adapters(self.adapter_host, self.adapters):
                yield SelectiveLM(self.adapter_host)


class RolloutSampler:
    """One step's rollouts for any RL stage: the step's ``global_prompts`` prompts, num_generations completions
    each sampled with the current policy, scored by the reward sources, with the reference log-probabilities
    (when a `Reference` is given; with ``prompt_once`` each prompt is encoded once for its group) and critic
    values (when a `value_fn` is given).

    Each process samples, scores and runs the reference and critic on its share of the prompts; the result is
    then gathered, so every process returns the whole step's rollout, rows in global order, and the stages
    compute advantages and split the training over processes from the same data (`Run.shares`). A completion's
    random stream is keyed by (seed, step, its global index) (:func:`align.rollout.completion_uniforms`): which
    prompts a step uses and which completions it draws depend neither on the number of processes nor on
    resuming, so one process with gradient accumulation, N processes and a resumed run train on the same
    rollouts."""

    def __init__(self, cfg, run: Run, tokenizer, data: PromptData, sources: dict, reference: Reference | None,
                 num_generations: int, global_prompts: int, prompt_once: bool = False):
        self.cfg, self.run, self.tokenizer, self.data, self.sources = cfg, run, tokenizer, data, sources
        self.reference, self.num_generations, self.global_prompts = reference, num_generations, global_prompts
        self.prompt_once = prompt_once
        self.weights = [float(w) for w in cfg.reward_weights] or None
        self.gold = functions(cfg.gold_reward_funcs)

    def __call__(self, step: int, policy: nn.Module, value_fn: Callable[[Rollout], Tensor] | None = None
                 ) -> Rollout:
        """The whole `Rollout` of `step` sampled from `policy` (a causal LM, in eval mode during sampling)."""
        cfg, run = self.cfg, self.run
        indices = global_batch_indices(step, len(self.data), self.global_prompts, cfg.seed)
        parts = split_evenly(list(range(len(indices))), run.world)
        mine = [indices[i] for i in parts[run.rank]]
        first = (parts[run.rank][0] if parts[run.rank] else 0) * self.num_generations  # global completion index
        prompts, cols, ids, mask = self.data.batch(mine, self.tokenizer.pad_token_id, run.device)
        uniforms = completion_uniforms(len(mine) * self.num_generations, cfg.max_new_tokens, cfg.seed, step,
                                       "completion", first=first)
        was_training = policy.training
        policy.eval()
        try:
            # FSDP2: the policy's weights are gathered once for the whole rollout, not once per token
            with torch.no_grad(), run.accelerator.autocast(), run.full_weights():
                with run.timer("generation"):
                    samples = generate(policy, ids, mask, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                       cfg.top_k, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                                       num_return_sequences=self.num_generations, uniforms=uniforms)
                local = make_rollout(samples, self.tokenizer, prompts, cols, self.sources, self.weights,
                                     cfg.missing_eos_penalty, self.gold,
                                     ref_fn=self._ref_logprobs if self.reference is not None else None,
                                     value_fn=value_fn, timer=run.timer)
        finally:
            policy.train(was_training)
        return gather_rollout(run, local, self.tokenizer.pad_token_id)

    def _ref_logprobs(self, r: Rollout) -> Tensor:
        with self.reference.active() as ref:
            if self.prompt_once and r.group_size > 1:
                return group_completion_logprobs(ref.model, r, self.cfg.temperature)
            return completion_logprobs(ref, r, self.cfg.temperature)[0]


def gather_rollout(run: Run, r: Rollout, pad_id: int) -> Rollout:
    """Every process's rollout concatenated in process order, on every process (the rollout itself on one
    process): prompts left-padded and completions right-padded to the longest of any process (``pad_id``, mask
    0), the texts, prompts and columns gathered as objects."""
    if run.world == 1:
        return r
    p, c = (int(x) for x in run.gather(torch.tensor([[r.prompt_ids.shape[1], r.completion_ids.shape[1]]],
                                                    device=run.device)).max(0).values)

    def left(t: Tensor, value: int) -> Tensor:
        return torch.nn.functional.pad(t, (p - t.shape[1], 0), value=value)

    def right(t: Tensor | None, value: float) -> Tensor | None:
        return None if t is None else torch.nn.functional.pad(t, (0, c - t.shape[1]), value=value)

    out = dataclasses.replace(
        r, prompt_ids=left(r.prompt_ids, pad_id), prompt_mask=left(r.prompt_mask, 0),
        completion_ids=right(r.completion_ids, pad_id), completion_mask=right(r.completion_mask, 0),
        logprobs=right(r.logprobs, 0.0), ref_logprobs=right(r.ref_logprobs, 0.0), values=right(r.values, 0.0))
    for f in dataclasses.fields(out):
        v = getattr(out, f.name)
        if isinstance(v, Tensor):
            setattr(out, f.name, run.gather(v))
        elif isinstance(v, dict):
            setattr(out, f.name, {k: run.gather(x) if isinstance(x, Tensor) else run.gather_objects(x)
                                  for k, x in v.items()})
        elif isinstance(v, list):
            setattr(out, f.name, run.gather_objects(v))
    return out


def rollout_metrics(run: Run, r: Rollout, kl: Tensor | None = None, **extra: Tensor) -> dict[str, float]:
    """What every RL stage logs about a step's whole rollout (the sampler's, the same on every process): the
    reward's mean and std, each source's and gold function's mean, the KL to the reference (per completion and
    per token, when ``kl`` (B, C) is given), the response length and the EOS fraction; plus the stage's own
    ``extra`` metrics (0-dim values, averaged over processes)."""
    rewards = r.rewards
    out: dict[str, Any] = {
        "reward": rewards.mean(), "reward_std": rewards.std() if len(rewards) > 1 else torch.zeros(()),
        **{f"reward_{k}": v.mean() for k, v in r.reward_components.items()},
        **{f"gold_{k}": v.mean() for k, v in r.gold_rewards.items()},
        "response_length": r.lengths.float().mean(), "eos_frac": r.eos.float().mean(),
    }
    if kl is not None:
        out.update(kl=kl.sum(-1).mean(), kl_per_token=masked_mean(kl, r.completion_mask))
    return {**{k: float(v) for k, v in out.items()}, **run.mean_over_processes(extra)}


def psi_rollout(setup: "RLSetup", step: int) -> tuple[Rollout, Tensor, Tensor | None, dict[str, float]]:
    """A step's rollouts for the vanilla policy-gradient stages (REINFORCE, TRPO): per-token rewards (score at
    the last token, −β·KL_t with a reference), Ψ by name and, with a critic, its regression targets. Returns
    (rollout, Ψ (B, C), value targets (B, C) or None, rollout metrics)."""
    cfg, run = setup.cfg, setup.run
    net = run.unwrap()
    value_fn = (lambda r: rollout_values(net, r)) if isinstance(net, PolicyAndValue) else None
    r = setup.sampler(step, policy_of(net).model, value_fn)
    rewards, kl = kl_shaped_rewards(r.rewards, r.logprobs, r.ref_logprobs, r.completion_mask, cfg.beta,
                                    cfg.kl_estimator)
    psi, targets = psi_and_value_targets(rewards, r.completion_mask, psi=cfg.psi, baseline=cfg.baseline,
                                         gamma=cfg.gamma, lam=cfg.lam, values=r.values, group_size=r.group_size,
                                         whiten=cfg.whiten_advantages)
    mask = r.completion_mask
    extra = {"psi_mean": masked_mean(psi, mask), "psi_abs_mean": masked_mean(psi.abs(), mask)}
    if targets is not None:
        extra.update(value_mean=masked_mean(r.values, mask),
                     explained_variance=torch.nan_to_num(explained_variance(r.values, targets, mask), nan=0.0))
    return r, psi, targets, rollout_metrics(run, r, kl, **extra)


def pg_module(cfg, tokenizer, dtype: torch.dtype, policy: nn.Module, share_base: bool = False) -> nn.Module:
    """The trained module of the vanilla policy-gradient stages: the policy with a critic (PolicyAndValue) when Ψ
    needs values (on the policy's base weights with ``share_base``), else the policy alone."""
    if needs_values(cfg.psi, cfg.baseline):
        return with_critic(cfg, tokenizer, dtype, policy, share_base=share_base)
    return SelectiveLM(policy)


def pg_has_critic(cfg) -> bool:
    """Whether a vanilla policy-gradient run has a critic of its own (Ψ needs values, not from a value head)."""
    return needs_values(cfg.psi, cfg.baseline) and cfg.value_model != "policy"


# ---------------------------------------------------------------------------------------------------------------
# the runner


@dataclass
class RLSetup:
    """What `run_rl_stage` has built when it calls a stage's hooks (`state` sees it before `model` and `sampler`
    are set; `make_step` sees all of it)."""

    cfg: Any
    run: Run
    tokenizer: Any
    data: PromptData
    policy: nn.Module  # the causal LM being trained (a peft model with use_lora)
    reference: Reference | None
    sources: dict[str, Callable]
    inputs: Any = None  # what the stage's `load` hook read
    state: Any = None  # the stage's checkpointed state (KL controller, iterative-GRPO state, ...)
    model: nn.Module | None = None  # the prepared trained module (call it for training forwards)
    sampler: RolloutSampler | None = None


def _policy_only(cfg, tokenizer, dtype: torch.dtype, policy: nn.Module) -> nn.Module:
    return SelectiveLM(policy)


@dataclass(frozen=True)
class RLStage:
    """How one RL algorithm differs from the others; `run_rl_stage` does the rest."""

    name: str
    make_step: Callable[[RLSetup], Callable[[int], dict[str, float]]]  # the step function for Run.train
    check: Callable[[Any], None] = check_rl_config  # config checks, before anything is read or written
    load: Callable[[Any], Any] = lambda cfg: None  # extra inputs, read and validated before anything is written
    module: Callable[..., nn.Module] = _policy_only  # (cfg, tokenizer, dtype, policy) -> the trained module
    uses_reference: Callable[[Any], bool] = lambda cfg: cfg.beta > 0
    num_generations: Callable[[Any], int] = lambda cfg: cfg.num_generations
    prompts_per_process: Callable[[Any], int] = lambda cfg: cfg.per_device_train_batch_size  # per step
    state: Callable[[RLSetup], Any] = lambda setup: None  # extra checkpointed state (state_dict/load_state_dict)
    prompt_once: bool = False  # the reference encodes each prompt once for its group
    finish: Callable[[RLSetup], None] = lambda setup: None  # after the policy is saved, on the main process
    # whether the reward model and the critic may run as LoRA adapters on the policy's base weights (one copy of
    # them; `module` then takes share_base=True when the critic can): see critic.plan_base_sharing
    share_base: Callable[[Any], bool] = lambda cfg: cfg.share_base
    has_critic: Callable[[Any], bool] = lambda cfg: False  # a critic of its own besides the policy (not a head)


def run_rl_stage(cfg, stage: RLStage) -> dict[str, float]:
    """Load, validate, train and save an RL stage; returns the last logged metrics. Writes nothing before all
    input is valid."""
    tokenizer, data, eval_rows, eval_funcs = load_rl_inputs(cfg, stage.check)
    inputs = stage.load(cfg)

    seed_everything(cfg.seed)
    run = Run(cfg, stage.name)
    policy = load_trained_lm(cfg, tokenizer, run.weights_dtype)
    disable_dropout(policy)
    sharing = (plan_base_sharing(cfg, stage.name, run.sharded and not run.fsdp2, stage.has_critic(cfg))  # FSDP2 shares
               if cfg.use_lora and stage.share_base(cfg) else None)
    if sharing is not None and run.is_main:
        print(sharing.line, file=sys.stderr, flush=True)
    shared_rm = sharing is not None and sharing.reward_model
    sources = reward_sources(cfg, run.device, host=policy if shared_rm else None)
    if REWARD_MODEL_NAME in sources and not shared_rm and not getattr(cfg, "rm_update", False):  # a frozen one
        scorer = sources[REWARD_MODEL_NAME]
        run.shard_frozen(scorer.model)
        scorer.gather = run.whole
    shared_critic = sharing is not None and sharing.critic
    module = stage.module(cfg, tokenizer, run.weights_dtype, policy, **({"share_base": True} if shared_critic else {}))
    reference = Reference.load(cfg, policy, tokenizer, run) if stage.uses_reference(cfg) else None
    setup = RLSetup(cfg, run, tokenizer, data, policy, reference, sources, inputs)
    setup.state = stage.state(setup)
    global_prompts = stage.prompts_per_process(cfg) * run.world
    setup.model = run.prepare(module, resolve_max_steps(cfg, len(data), global_prompts), extra_state=setup.state)
    setup.sampler = RolloutSampler(cfg, run, tokenizer, data, setup.sources, reference, stage.num_generations(cfg),
                                   global_prompts, stage.prompt_once)
    step_fn = stage.make_step(setup)

    def eval_fn(step: int) -> dict[str, float]:
        with run.full_weights():  # every process gathers (FSDP2); the main process evaluates
            if not run.is_main:
                return {}
            return greedy_eval(policy_of(run.unwrap()).model, tokenizer, eval_rows, eval_funcs, cfg.max_new_tokens,
                               cfg.per_device_eval_batch_size, cfg.eval_max_samples)

    metrics = run.train(step_fn, eval_fn if eval_rows is not None else None)
    save_policy_and_critic(run, tokenizer, push=False)
    if run.is_main:
        stage.finish(setup)
    push_final(run)  # after the stage's own outputs (e.g. iterative GRPO's reward model) are written
    return metrics
