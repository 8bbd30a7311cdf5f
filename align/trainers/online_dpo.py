"""Online DPO (`align online_dpo --config FILE`; Guo et al. 2024, "Direct language model alignment from online AI
feedback"; TRL's OnlineDPOTrainer) on the shared RL runner.

One step:

1. the shared sampler draws num_generations (G ≥ 2) completions for each of the step's prompts from the current
   policy (each prompt prefilled once), and the reward sources (reward_model and/or reward_funcs, weighted) score
   them; gold functions are logged, never trained on;
2. each group whose rewards are not all equal gives one pair, its best completion as chosen and its worst as
   rejected (:func:`align.comparisons.best_worst_pairs`); groups of equal rewards give none, and cost no training
   or reference forward;
3. the reference's and the policy's log-probabilities of the paired completions (each prompt encoded once for its
   pair), and one AdamW update of the DPO-family loss (:func:`align.losses.dpo_loss`, ``loss_type`` by TRL's name)
   averaged over the step's pairs on all processes, in gradient_accumulation_steps micro-batches. A step with no
   pair anywhere makes no update (the schedule still advances).

Metrics: the RL stages' rollout metrics (reward, reward_<source>, gold_<name>, response_length, eos_frac), the DPO
metrics of `align dpo` on the step's pairs (loss, rewards_chosen, rewards_rejected, rewards_accuracies,
rewards_margins, logps_chosen, logps_rejected, nll_loss), pairs (over all processes), pair_frac (groups that gave
a pair) and kl: Σ_t log π_old − log π_ref per paired completion (k1, a sequence-level KL estimate measured on the
completions that are trained on). The reference is the starting model (or ``ref_model``; with LoRA the policy with
its adapter disabled); simpo and orpo load none.
"""

from __future__ import annotations

import torch

from ..comparisons import PreferenceStats, best_worst_pairs
from ..config import AlignError, OnlineDPOConfig
from ..losses import REFERENCE_FREE_DPO_LOSSES, dpo_args_problem, dpo_loss
from ..models import GroupLM
from ..rollout import Rollout, group_completion_logprobs, logprob_request, scatter_logprobs, sequence_inputs
from .rl import Reference, RLSetup, RLStage, check_rl_config, refuse_token_budget, rollout_metrics, run_rl_stage

Tensor = torch.Tensor


def check_online_dpo_config(cfg: OnlineDPOConfig) -> None:
    """One-line errors for settings that cannot train, before anything is loaded or written."""
    check_rl_config(cfg)
    refuse_token_budget(cfg, "online_dpo")
    problem = dpo_args_problem(cfg.loss_type, cfg.beta, cfg.label_smoothing)
    if problem:
        raise AlignError(problem)
    if cfg.num_generations < 2:
        raise AlignError(f"num_generations must be >= 2 (a pair needs two completions), got {cfg.num_generations}")
    if cfg.rpo_alpha < 0:
        raise AlignError(f"rpo_alpha must be >= 0, got {cfg.rpo_alpha}")
    if cfg.per_device_train_batch_size < 1 or cfg.gradient_accumulation_steps < 1:
        raise AlignError("per_device_train_batch_size and gradient_accumulation_steps must be >= 1")


def pair_rollout(r: Rollout, better: Tensor, worse: Tensor) -> Rollout:
    """The paired completions as a rollout of groups of two, [chosen 0, rejected 0, chosen 1, ...] (trimmed)."""
    sub = r.subset(torch.stack([better, worse], dim=1).flatten())
    sub.group_size = 2
    return sub


class OnlineDPOStep:
    """One online-DPO step (sample, pair, one update) for Run.train."""

    def __init__(self, setup: RLSetup):
        self.cfg, self.run, self.model, self.sampler = setup.cfg, setup.run, setup.model, setup.sampler
        uses_ref = setup.cfg.loss_type not in REFERENCE_FREE_DPO_LOSSES
        # the sampler computes no reference log-probabilities: only the paired completions need them
        self.reference = Reference.load(setup.cfg, setup.policy, setup.tokenizer, setup.run) \
            if uses_ref else None
        # recomputing activations (gradient checkpointing) and a KV cache do not mix in transformers
        self.prompt_once = not setup.cfg.gradient_checkpointing

    def __call__(self, step: int) -> dict[str, float]:
        cfg, run = self.cfg, self.run
        r = self.sampler(step, run.unwrap().model)  # the whole step's rollout, on every process
        better, worse = best_worst_pairs(r.rewards, r.group_size)
        global_pairs = float(len(better))
        with run.timer("training"):
            out, kl_sum = self.update(r, better, worse, global_pairs)
        (kl_sum,) = run.reduce_sum([kl_sum])
        kl_n = 2.0 * len(better)
        metrics = rollout_metrics(run, r)
        metrics["pair_frac"] = len(better) / max(len(r) // r.group_size, 1)
        metrics.update(out)
        metrics.update(pairs=global_pairs, kl=kl_sum / max(kl_n, 1.0), beta=cfg.beta)
        return metrics

    def update(self, r: Rollout, better: Tensor, worse: Tensor, global_pairs: float) -> tuple[dict, float]:
        """One optimizer update on the step's pairs, this process's share of them in gradient_accumulation_steps
        micro-batches (`Run.shares`; the loss is the mean over all pairs). Returns the DPO metrics and this
        process's Σ KL over its paired completions."""
        cfg, run = self.cfg, self.run
        if global_pairs == 0:  # nothing to learn anywhere: no update, the schedule advances
            lr = run.scheduler.get_last_lr()[0]
            run.scheduler.step()
            return {"learning_rate": lr, **PreferenceStats().summary(0)}, 0.0
        pairs = torch.arange(len(better), device=better.device)
        micro = [(better[i], worse[i], w) for i, w in run.shares(pairs, cfg.gradient_accumulation_steps)]
        stats, kl_sum = PreferenceStats(), 0.0
        self.model.train()
        for b, w, weight in run.accumulate(micro):
            sub = pair_rollout(r, b, w)
            loss, s, kl = self._micro_step(sub)
            run.backward(loss * (weight * run.world / global_pairs))
            if weight:
                stats, kl_sum = stats + s, kl_sum + kl
        out = run.optimizer_step()
        self.model.eval()
        out.update(stats.reduced(run.reduce_sum).summary(global_pairs))
        return out, kl_sum

    def _micro_step(self, sub: Rollout) -> tuple[Tensor, PreferenceStats, float]:
        cfg, dev = self.cfg, sub.completion_ids.device
        n = len(sub)
        mask = sub.completion_mask
        if self.reference is not None:
            with torch.no_grad(), self.reference.active() as ref:
                ref_tok = group_completion_logprobs(ref.model, sub, cfg.temperature)
            ref_logps = ref_tok.sum(-1)
            kl = float(((sub.logprobs - ref_tok) * mask).sum())
        else:
            ref_logps, kl = torch.zeros(n, device=dev), 0.0
        request = logprob_request(sub.completion_ids, mask, cfg.temperature)
        if self.prompt_once:
            out = self.model(sub.prompt_ids[0::2], attention_mask=sub.prompt_mask[0::2],
                             completion_ids=sub.completion_ids, completion_mask=mask,
                             prompt_index=torch.arange(n, device=dev) // 2, logprobs=request)
        else:
            inp = sequence_inputs(sub.prompt_ids, sub.prompt_mask, sub.completion_ids, mask)
            out = self.model(inp["input_ids"], select=inp["select"], attention_mask=inp["attention_mask"],
                             position_ids=inp["position_ids"], logprobs=request)
        logps = scatter_logprobs(out, mask)[0].sum(-1)
        p = torch.arange(n // 2, device=dev)
        loss, pairs = dpo_loss(cfg.loss_type, logps, ref_logps, mask.sum(-1), 2 * p, 2 * p + 1, p, n // 2,
                               beta=cfg.beta, label_smoothing=cfg.label_smoothing, gamma=cfg.simpo_gamma,
                               rpo_alpha=cfg.rpo_alpha)
        return loss, PreferenceStats.of(loss, pairs), kl


def _group_module(cfg: OnlineDPOConfig, tokenizer, dtype: torch.dtype, policy) -> GroupLM:
    return GroupLM(policy)


ONLINE_DPO = RLStage("online_dpo", OnlineDPOStep, check=check_online_dpo_config, module=_group_module,
                     uses_reference=lambda cfg: False,  # the step holds its own (see OnlineDPOStep)
                     prompts_per_process=lambda cfg: cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps)


def train_online_dpo(cfg: OnlineDPOConfig) -> dict[str, float]:
    """Run online DPO as configured; returns the last logged metrics. Writes nothing before all input is valid."""
    return run_rl_stage(cfg, ONLINE_DPO)
