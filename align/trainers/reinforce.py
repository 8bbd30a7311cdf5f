"""Vanilla policy gradient for language models (`align reinforce --config FILE`), on the shared RL runner.

One step (Williams 1992; Sutton et al. 2000; Ψ as in Schulman et al. 2016 §2):

1. sample num_generations completions for each prompt of the step with the current policy, score them with the
   reward sources; log π_ref when beta > 0 and the critic's V_t when Ψ needs values;
2. per-token rewards ``r_t = −β·KL_t`` plus the sequence score at the last token (as PPO with kl_in=reward);
3. Ψ_t by name (:data:`align.advantages.PSI_ESTIMATORS`): ``return``, ``reward_to_go``,
   ``reward_to_go_baseline`` (baseline: value, batch_mean or group_mean), ``gae``, ``td_residual``
   (steps 1–3: :func:`align.trainers.rl.psi_rollout`, shared with TRPO);
4. one AdamW update of ``L = −agg(Ψ_t log π_θ(a_t|s_t)) + vf_coef·½(V_t − R̂_t)²`` on the rollouts
   (``POLICY_LOSSES["reinforce"]``, :func:`align.losses.policy_gradient_loss`), with the critic (if any)
   regressed on Monte-Carlo rewards-to-go R̂_t (GAE returns for psi=gae).
"""

from __future__ import annotations

import torch

from ..config import ReinforceConfig
from ..losses import POLICY_LOSSES, aggregate_count, value_loss
from ..rollout import Rollout, logprob_request, scatter_logprobs, scatter_tokens, sequence_inputs
from .rl import RLSetup, RLStage, check_pg_config, pg_has_critic, pg_module, psi_rollout, run_rl_stage

Tensor = torch.Tensor


class ReinforceStep:
    """One REINFORCE step: rollouts, Ψ, and one optimizer update of the policy-gradient (+ value) loss."""

    def __init__(self, setup: RLSetup):
        self.setup, self.cfg, self.run, self.model = setup, setup.cfg, setup.run, setup.model

    def __call__(self, step: int) -> dict[str, float]:
        r, psi, targets, out = psi_rollout(self.setup, step)
        with self.run.timer("training"):
            out.update(self.update(r, psi, targets))
        return out

    def update(self, r: Rollout, psi: Tensor, targets: Tensor | None) -> dict[str, float]:
        cfg, run, model = self.cfg, self.run, self.model
        model.train()
        # the whole batch's denominators (r is the whole rollout), so that micro-batches and processes add up to
        # the batch's loss; DDP / FSDP average the processes' gradients
        n_pg, n_tok = float(aggregate_count(r.completion_mask, cfg.loss_agg)), float(r.completion_mask.sum())
        pg_items, tok_items = max(n_pg, 1.0) / run.world, max(n_tok, 1.0) / run.world
        sums: dict[str, float] = {}
        micro = run.shares(torch.arange(len(r)), cfg.gradient_accumulation_steps, r.sequence_lengths(),
                           cfg.max_tokens_per_micro_batch)
        for idx, weight in run.accumulate(micro):
            sub = r.subset(idx)
            c = sub.completion_ids.shape[1]
            mask = sub.completion_mask
            inp = sequence_inputs(sub.prompt_ids, sub.prompt_mask, sub.completion_ids, mask)
            res = model(inp["input_ids"], inp["select"], inp["attention_mask"], inp["position_ids"],
                        logprobs=logprob_request(sub.completion_ids, mask, cfg.temperature, with_entropy=True))
            lps, values = res if targets is not None else (res, None)
            logp, _ = scatter_logprobs(lps, mask)
            loss, _ = POLICY_LOSSES["reinforce"](logp, psi[idx, :c], mask, cfg.loss_agg, max_len=cfg.max_new_tokens,
                                                 num_items=pg_items)
            parts = {"policy_loss": loss.detach()}
            if values is not None:
                vl, _ = value_loss(scatter_tokens(values, mask), sub.values, targets[idx, :c], mask,
                                   num_items=tok_items)
                loss = loss + cfg.vf_coef * vl
                parts["value_loss"] = vl.detach()
            run.backward(loss * weight)
            parts["entropy"] = lps.entropy.detach().sum() / tok_items
            for key, v in parts.items():
                sums[key] = sums.get(key, 0.0) + float(v) * weight
        out = run.optimizer_step()
        # each micro-batch term is divided by (global count / world): the sum over processes / world is the whole
        # batch's value
        out.update(run.mean_over_processes(sums))
        model.eval()
        return out


REINFORCE = RLStage("reinforce", ReinforceStep, check=check_pg_config, module=pg_module,
                    has_critic=pg_has_critic)


def train_reinforce(cfg: ReinforceConfig) -> dict[str, float]:
    """Run REINFORCE as configured; returns the last logged metrics."""
    return run_rl_stage(cfg, REINFORCE)
