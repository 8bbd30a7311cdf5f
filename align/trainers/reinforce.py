"""Vanilla policy gradient for language models (`align reinforce --config FILE`), and the plumbing it shares with
TRPO (`align trpo`, which imports it).

One step (Williams 1992; Sutton et al. 2000; Ψ as in Schulman et al. 2016 §2):

1. sample num_generations completions for each prompt of the step with the current policy, score them with the
   reward sources; log π_ref when beta > 0 and the critic's V_t when Ψ needs values;
2. per-token rewards ``r_t = −β·KL_t`` plus the sequence score at the last token (as PPO with kl_in=reward);
3. Ψ_t by name (:data:`align.advantages.PSI_ESTIMATORS`): ``return``, ``reward_to_go``,
   ``reward_to_go_baseline`` (baseline: value, batch_mean or group_mean), ``gae``, ``td_residual``;
4. one AdamW update of ``L = −agg(Ψ_t log π_θ(a_t|s_t)) + vf_coef·½(V_t − R̂_t)²`` on the rollouts, with the
   critic (if any) regressed on Monte-Carlo rewards-to-go R̂_t (GAE returns for psi=gae).

The top of this file turns a `Rollout` into Ψ and value targets (pure functions); `run_pg_stage` loads models
and data for both stages and hands a step object (`ReinforceStep` here, `TRPOStep` in trpo.py) to the shared loop.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..advantages import discounted_returns, gae, policy_gradient_psi, reward_to_go, sequence_baseline
from ..config import AlignError, PolicyGradientConfig, ReinforceConfig
from ..losses import (aggregate_count, entropy_from_logits, explained_variance, masked_mean, masked_whiten,
                      policy_gradient_loss, value_loss)
from ..models import SelectiveLM
from ..rollout import Rollout, logprobs_from_selected, scatter_tokens, sequence_inputs
from .loop import Run, resolve_max_steps, save_final, seed_everything
from .ppo import PolicyAndValue, PPOStep, build_critic, chunks, per_token_rewards, save_outputs, token_kl
from .rl import (Reference, RolloutSampler, check_rl_config, disable_dropout, gold_sources, greedy_eval,
                 load_rl_inputs, reward_sources)
from .sft import prepare_model

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------------------------
# Ψ and value targets: pure functions


def needs_values(psi: str, baseline: str) -> bool:
    """Whether Ψ reads critic values: gae, td_residual, and reward_to_go_baseline with baseline=value."""
    return psi in ("gae", "td_residual") or (psi == "reward_to_go_baseline" and baseline == "value")


def psi_and_value_targets(rewards: Tensor, mask: Tensor, *, psi: str, baseline: str = "batch_mean",
                          gamma: float = 1.0, lam: float = 1.0, values: Tensor | None = None, group_size: int = 1,
                          whiten: bool = False) -> tuple[Tensor, Tensor | None]:
    """Ψ_t of every token and the critic's regression targets.

    ``baseline`` of psi=reward_to_go_baseline: ``"value"`` uses ``values`` (V(s_t) per token); ``"batch_mean"``
    and ``"group_mean"`` use :func:`align.advantages.sequence_baseline` of the sequences' total returns
    ``R = Σ_t γ^t r_t`` (groups: rows ``[g·G, (g+1)·G)``, G = ``group_size``). Value targets (when ``values`` is
    given): the λ-returns ``A_t + V_t`` for psi=gae (as PPO), the rewards-to-go ``G_t`` otherwise (Monte-Carlo
    regression). ``whiten`` normalises Ψ to mean 0, std 1 over the valid tokens.

    Shapes: ``rewards``, ``mask``, ``values`` (B, T) → (Ψ (B, T), targets (B, T) or None), 0 where masked.
    """
    b = None
    if psi == "reward_to_go_baseline":
        b = values if baseline == "value" else sequence_baseline(discounted_returns(rewards, mask, gamma),
                                                                baseline, group_size)
    out = policy_gradient_psi(psi, rewards, mask, gamma, lam, values, b)
    targets = None
    if values is not None:
        targets = gae(rewards, values, mask, gamma, lam)[1] if psi == "gae" else reward_to_go(rewards, mask, gamma)
    if whiten:
        out = masked_whiten(out, mask)
    return out, targets


def rollout_rewards(r: Rollout, beta: float, estimator: str) -> tuple[Tensor, Tensor | None]:
    """Per-token rewards (B, C) of a rollout (score at the last token, −β·KL_t when it has reference
    log-probabilities) and the per-token KL (B, C) to the reference (None without one)."""
    mask = r.completion_mask
    if r.ref_logprobs is None:
        return per_token_rewards(r.rewards, torch.zeros_like(r.logprobs), mask, 0.0), None
    kl = token_kl(r.logprobs, r.ref_logprobs, mask, estimator)
    return per_token_rewards(r.rewards, kl, mask, beta), kl


# ---------------------------------------------------------------------------------------------------------------
# the trained module and what both stages share


def policy_of(net: nn.Module) -> SelectiveLM:
    """The policy (a SelectiveLM) of the trained module: the module itself, or the policy of a PolicyAndValue."""
    return net.policy if isinstance(net, PolicyAndValue) else net


def build_pg_module(cfg: PolicyGradientConfig, tokenizer, dtype: torch.dtype, policy: nn.Module) -> nn.Module:
    """The policy with a critic (PolicyAndValue, built as in PPO) when Ψ needs values, else the policy alone."""
    if needs_values(cfg.psi, cfg.baseline):
        critic, value_head = build_critic(cfg, tokenizer, dtype, policy)
        return PolicyAndValue(policy, critic, value_head)
    return SelectiveLM(policy)


def check_pg_config(cfg: PolicyGradientConfig) -> None:
    check_rl_config(cfg)
    if cfg.num_generations < 1:
        raise AlignError(f"num_generations must be >= 1, got {cfg.num_generations}")
    if cfg.psi == "reward_to_go_baseline" and cfg.baseline == "group_mean" and cfg.num_generations < 2:
        raise AlignError("baseline=group_mean needs num_generations >= 2 (with one completion per prompt the "
                         "group mean is the completion's own return and Psi is 0)")
    if cfg.per_device_train_batch_size * cfg.num_generations < cfg.gradient_accumulation_steps:
        raise AlignError(f"{cfg.per_device_train_batch_size * cfg.num_generations} rollouts per process cannot "
                         f"fill gradient_accumulation_steps={cfg.gradient_accumulation_steps} micro-batches")
    if not 0 <= cfg.lam <= 1 or not 0 <= cfg.gamma <= 1:
        raise AlignError("gamma and lam must be in [0, 1]")
    if needs_values(cfg.psi, cfg.baseline) and cfg.value_model.endswith((".py", ".jsonl")):
        raise AlignError(f"value_model {cfg.value_model}: expected a model directory, hub id or 'policy'")


class PGStepBase:
    """What a policy-gradient step does before its update: sample and score the rollouts, compute Ψ and the value
    targets, and summarise the rollouts as metrics (averaged over processes)."""

    def __init__(self, cfg: PolicyGradientConfig, run: Run, model: nn.Module, sampler: RolloutSampler):
        self.cfg, self.run, self.model, self.sampler = cfg, run, model, sampler

    @property
    def net(self) -> nn.Module:
        return self.run.unwrap()

    @property
    def has_critic(self) -> bool:
        return isinstance(self.net, PolicyAndValue)

    def rollout(self, step: int) -> tuple[Rollout, Tensor, Tensor | None, Tensor | None]:
        """(rollout, Ψ (B, C), value targets (B, C) or None, KL to the reference (B, C) or None)."""
        cfg, net = self.cfg, self.net
        value_fn = (lambda r: PPOStep._values(net, r)) if self.has_critic else None
        r = self.sampler(step, policy_of(net).model, value_fn)
        rewards, kl = rollout_rewards(r, cfg.beta, cfg.kl_estimator)
        psi, targets = psi_and_value_targets(rewards, r.completion_mask, psi=cfg.psi, baseline=cfg.baseline,
                                             gamma=cfg.gamma, lam=cfg.lam, values=r.values,
                                             group_size=r.group_size, whiten=cfg.whiten_advantages)
        return r, psi, targets, kl

    def rollout_metrics(self, r: Rollout, psi: Tensor, targets: Tensor | None, kl: Tensor | None
                        ) -> dict[str, float]:
        mask = r.completion_mask
        zero = torch.zeros(())
        local: dict[str, Tensor] = {
            "reward": r.rewards.mean(), "reward_std": r.rewards.std() if len(r) > 1 else zero,
            **{f"reward_{k}": v.mean() for k, v in r.reward_components.items()},
            **{f"gold_{k}": v.mean() for k, v in r.gold_rewards.items()},
            "psi_mean": masked_mean(psi, mask), "psi_abs_mean": masked_mean(psi.abs(), mask),
            "response_length": r.lengths.float().mean(), "eos_frac": r.eos.float().mean(),
        }
        if kl is not None:
            local.update(kl=kl.sum(-1).mean(), kl_per_token=masked_mean(kl, mask))
        if targets is not None:
            local.update(value_mean=masked_mean(r.values, mask),
                         explained_variance=torch.nan_to_num(explained_variance(r.values, targets, mask), nan=0.0))
        names = list(local)
        summed = self.run.reduce_sum([float(local[k]) for k in names])
        return {k: v / self.run.world for k, v in zip(names, summed)}


# ---------------------------------------------------------------------------------------------------------------
# REINFORCE


class ReinforceStep(PGStepBase):
    """One REINFORCE step: rollouts, Ψ, and one optimizer update of the policy-gradient (+ value) loss."""

    def __call__(self, step: int) -> dict[str, float]:
        run = self.run
        r, psi, targets, kl = self.rollout(step)
        with run.timer("training"):
            stats = self.update(r, psi, targets)
        out = self.rollout_metrics(r, psi, targets, kl)
        out.update(stats)
        return out

    def update(self, r: Rollout, psi: Tensor, targets: Tensor | None) -> dict[str, float]:
        cfg, run, model = self.cfg, self.run, self.model
        model.train()
        micro = chunks(torch.arange(len(r)), cfg.gradient_accumulation_steps)
        # the global denominators, so that micro-batches and processes add up to the whole batch's loss
        n_pg, n_tok = run.reduce_sum([float(aggregate_count(r.completion_mask, cfg.loss_agg)),
                                      float(r.completion_mask.sum())])
        pg_items, tok_items = max(n_pg, 1.0) / run.world, max(n_tok, 1.0) / run.world
        sums: dict[str, float] = {}
        for k, idx in enumerate(micro):
            sub = r.subset(idx)
            c = sub.completion_ids.shape[1]
            mask = sub.completion_mask
            inp = sequence_inputs(sub.prompt_ids, sub.prompt_mask, sub.completion_ids, mask)
            with run.no_sync(last=k == len(micro) - 1), run.accelerator.autocast():
                out = model(inp["input_ids"], inp["select"], inp["attention_mask"], inp["position_ids"])
                logits, values = out if self.has_critic else (out, None)
                logp, _ = logprobs_from_selected(logits, sub.completion_ids, mask, cfg.temperature)
                loss, st = policy_gradient_loss(logp, psi[idx, :c], mask, cfg.loss_agg, max_len=cfg.max_new_tokens,
                                                num_items=pg_items)
                parts = {"policy_loss": loss.detach()}
                if values is not None:
                    vl, _ = value_loss(scatter_tokens(values, mask), sub.values, targets[idx, :c], mask,
                                       num_items=tok_items)
                    loss = loss + cfg.vf_coef * vl
                    parts["value_loss"] = vl.detach()
                run.backward(loss)
            with torch.no_grad():
                z = logits.detach().float() / cfg.temperature
                parts["entropy"] = entropy_from_logits(z).sum() / tok_items
            for key, v in parts.items():
                sums[key] = sums.get(key, 0.0) + float(v)
        out = run.optimizer_step()
        names = list(sums)
        totals = run.reduce_sum([sums[k] for k in names])
        # each micro-batch term is divided by (global count / world): the sum over processes / world is the whole
        # batch's value
        out.update({k: v / run.world for k, v in zip(names, totals)})
        model.eval()
        return out


# ---------------------------------------------------------------------------------------------------------------
# the stages


def run_pg_stage(cfg: PolicyGradientConfig, stage: str, check: Callable[[Any], None],
                 make_step: Callable[..., Callable[[int], dict[str, float]]]) -> dict[str, float]:
    """Load, validate, train and save a policy-gradient stage (REINFORCE or TRPO); `make_step(cfg, run, model,
    sampler)` gives the step. Writes nothing before all input is valid. Returns the last logged metrics."""
    tokenizer, data, eval_rows, eval_funcs = load_rl_inputs(cfg, check)

    seed_everything(cfg.seed)
    run = Run(cfg, stage)
    policy = prepare_model(cfg, tokenizer, run.weights_dtype)
    disable_dropout(policy)
    module = build_pg_module(cfg, tokenizer, run.weights_dtype, policy)
    reference = Reference.load(cfg, policy, tokenizer, run.device) if cfg.beta > 0 else None
    weights = [float(w) for w in cfg.reward_weights] or None
    max_steps = resolve_max_steps(cfg, len(data), cfg.per_device_train_batch_size * run.world)
    model = run.prepare(module, max_steps)
    sampler = RolloutSampler(cfg, run, tokenizer, data, reward_sources(cfg, run.device), weights,
                             gold_sources(cfg), reference, cfg.num_generations)
    step_fn = make_step(cfg, run, model, sampler)

    def eval_fn(step: int) -> dict[str, float]:
        if not run.is_main:
            return {}
        return greedy_eval(policy_of(run.unwrap()).model, tokenizer, eval_rows, eval_funcs, cfg.max_new_tokens,
                           cfg.per_device_eval_batch_size, cfg.eval_max_samples)

    metrics = run.train(step_fn, eval_fn if eval_rows is not None else None)
    if isinstance(run.unwrap(), PolicyAndValue):
        save_outputs(run, tokenizer)
    else:
        save_final(run, run.unwrap().model, tokenizer)
    return metrics


def train_reinforce(cfg: ReinforceConfig) -> dict[str, float]:
    """Run REINFORCE as configured; returns the last logged metrics."""
    return run_pg_stage(cfg, "reinforce", check_pg_config, ReinforceStep)
