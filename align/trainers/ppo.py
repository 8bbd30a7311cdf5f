"""PPO for language models (`align ppo --config FILE`): a policy, a critic, GAE and a KL penalty to a frozen
reference, on the shared RL runner.

One step (Ouyang et al. 2022; Ziegler et al. 2019; Schulman et al. 2017):

1. sample one completion per prompt with the current policy π_old, keeping log π_old of each token;
2. score it with the reward sources (reward model and/or functions) → the score s;
   compute log π_ref and the critic's values V_t of the rollout;
3. per-token rewards ``r_t = −β·KL_t`` (+ ``s`` at the last token) with a KL estimator (k1/k2/k3) of
   ``log π_old − log π_ref``; GAE(γ, λ) gives advantages A_t and value targets R_t; A is whitened
   (:mod:`align.advantages`);
4. num_ppo_epochs passes over the rollouts in num_mini_batches minibatches, each one optimizer update of
   ``L = L_clip(ρ, A; ε) + vf_coef·L_V(V, V_old, R; ε_V) − entropy_coef·H [+ β·KL in the loss]``
   (``POLICY_LOSSES["ppo"]``, :func:`align.losses.ppo_loss`); the passes stop early once the mean approximate
   KL(π_old ‖ π) passes target_approx_kl;
5. β is updated by its controller (fixed / adaptive / doubling) and the learning-rate schedule advances.

The trained modules (policy and critic, or policy and a value head) are one `PolicyAndValue` module
(`trainers/critic.py`): one optimizer, one DDP wrapper, one checkpoint.

With ``use_lora`` (and ``share_base``, the default) the run holds one copy of the base weights: the policy is
the base with its adapter, the reference the base with adapters off, and a LoRA reward model and the critic are
adapters of their own on the same base, each with its head (`critic.plan_base_sharing` says which, in one line).
"""

from __future__ import annotations

import torch

from ..advantages import per_token_rewards, ppo_advantages, token_kl
from ..config import AlignError, PPOConfig
from ..data import split_evenly
from ..kl_control import KLController
from ..losses import POLICY_LOSSES, explained_variance, masked_mean, value_loss
from ..rollout import (Rollout, logprob_request, make_generator, scatter_logprobs, scatter_tokens,
                       sequence_inputs)
from .critic import PolicyAndValue, rollout_values, with_critic
from .rl import RLSetup, RLStage, check_rl_config, rollout_metrics, run_rl_stage

Tensor = torch.Tensor


def check_ppo_config(cfg: PPOConfig) -> None:
    check_rl_config(cfg)
    if cfg.per_device_train_batch_size < cfg.num_mini_batches * cfg.gradient_accumulation_steps:
        raise AlignError(f"per_device_train_batch_size={cfg.per_device_train_batch_size} rollouts cannot fill "
                         f"num_mini_batches x gradient_accumulation_steps = "
                         f"{cfg.num_mini_batches * cfg.gradient_accumulation_steps} micro-batches")
    if cfg.kl_to == "old" and cfg.kl_in != "loss":
        raise AlignError("kl_to=old (the PPO paper's KL[pi_old, pi]) only makes sense with kl_in=loss")
    if cfg.kl_controller != "fixed" and cfg.beta <= 0:
        raise AlignError(f"kl_controller={cfg.kl_controller} needs an initial beta > 0")
    if cfg.value_model and cfg.value_model != "policy" and cfg.value_model.endswith((".py", ".jsonl")):
        raise AlignError(f"value_model {cfg.value_model}: expected a model directory, hub id or 'policy'")


TOKEN_MEANS = ("clip_frac", "approx_kl", "vf_clip_frac")  # a micro-batch's mean over its tokens (the rest: loss terms)


class PPOStep:
    """One PPO step (rollout, advantages, epochs of minibatch updates, β update) as a callable for Run.train."""

    def __init__(self, setup: RLSetup):
        self.cfg, self.run, self.model, self.sampler = setup.cfg, setup.run, setup.model, setup.sampler
        self.controller: KLController = setup.state
        self.split_backward = self.splits(setup.run)

    @staticmethod
    def splits(run) -> bool:
        """Whether each micro-batch runs the policy's forward and backward, then the critic's (one process, a
        critic of its own): the peak then holds one model's activations, not both, for the same gradients (the
        loss is a policy term plus a value term, and each parameter gets its gradient from one of them). Not
        under DDP/FSDP/DeepSpeed, whose wrappers expect one forward and one backward of the whole module, nor
        with a value head on the policy's trunk (the trunk is shared)."""
        return run.strategy == "single process" and run.unwrap().value_head is None

    def __call__(self, step: int) -> dict[str, float]:
        cfg, run = self.cfg, self.run
        net: PolicyAndValue = run.unwrap()
        r = self.sampler(step, net.policy.model, value_fn=lambda r: rollout_values(net, r))  # the whole rollout
        mask = r.completion_mask
        beta = self.controller.beta
        kl = token_kl(r.logprobs, r.ref_logprobs, mask, cfg.kl_estimator)
        rewards = per_token_rewards(r.rewards, kl, mask, beta if cfg.kl_in == "reward" else 0.0)
        adv, returns = ppo_advantages(rewards, r.values, mask, cfg.gamma, cfg.lam, cfg.whiten_advantages)
        with run.timer("training"):
            train_stats = self.update(step, r, adv, returns, beta if cfg.kl_in == "loss" else 0.0)
        run.scheduler.step()

        out = rollout_metrics(
            run, r, kl,
            non_score_reward=(-beta * kl.sum(-1)).mean() if cfg.kl_in == "reward" else torch.zeros(()),
            explained_variance=torch.nan_to_num(explained_variance(r.values, returns, mask), nan=0.0),
            value_mean=masked_mean(r.values, mask), advantage_std=masked_mean(adv * adv, mask).sqrt())
        out.update(train_stats)
        measured = out["kl"] if cfg.kl_to == "ref" else train_stats["approx_kl_last_epoch"]
        out["beta"] = beta
        self.controller.update(measured, len(r))
        return out

    def update(self, step: int, r: Rollout, adv: Tensor, returns: Tensor, loss_beta: float) -> dict[str, float]:
        """num_ppo_epochs passes of num_mini_batches optimizer updates (phase 4). The minibatches are drawn from
        the whole rollout with a permutation keyed by (seed, step, epoch); each process trains on its share of
        each (`Run.shares`), so the updates do not depend on the number of processes."""
        cfg, run, model = self.cfg, self.run, self.model
        model.train()
        sums: dict[str, float] = {}
        tokens_seen = 0.0  # valid tokens of every micro-batch of every update: the weight of the token means
        updates = 0
        last_epoch_kl: list[float] = []
        stopped = False
        lr = run.scheduler.get_last_lr()[0]
        grad_norms = []
        lengths = r.sequence_lengths()  # micro-batches of rows of similar length: less padding (`Run.shares`)
        for epoch in range(cfg.num_ppo_epochs):
            perm = torch.randperm(len(r), generator=make_generator("cpu", cfg.seed, step, "minibatches", epoch))
            epoch_kl: list[float] = []
            for mb in split_evenly(perm, cfg.num_mini_batches):
                n_tok = float(r.completion_mask[mb].sum())
                num_items = max(n_tok, 1.0) / run.world  # DDP / FSDP average the processes' gradients
                mb_kl = 0.0
                micro = run.shares(mb, cfg.gradient_accumulation_steps, lengths, cfg.max_tokens_per_micro_batch)
                for idx, weight in run.accumulate(micro):
                    stats = self._micro_step(r, idx, adv, returns, loss_beta, num_items, epoch == 0, weight)
                    n_valid = float(r.completion_mask[idx].sum()) * weight
                    mb_kl += float(stats["approx_kl"]) * n_valid
                    for key, v in stats.items():
                        # token means weigh by their tokens; the loss terms are shares of the minibatch's loss
                        w = n_valid if key in TOKEN_MEANS else weight
                        sums[key] = sums.get(key, 0.0) + float(v) * w
                    tokens_seen += n_valid
                # the schedule advances once per PPO step (in __call__), not once per update
                grad_norms.append(run.optimizer_step(schedule=False).get("grad_norm"))
                updates += 1
                (kl_sum,) = run.reduce_sum([mb_kl])
                epoch_kl.append(kl_sum / max(n_tok, 1.0))
                if cfg.target_approx_kl > 0 and sum(epoch_kl) / len(epoch_kl) > cfg.target_approx_kl:
                    stopped = True
                    break
            last_epoch_kl = epoch_kl
            if stopped:
                break
        # the same names on every process: each runs the same micro-batches
        sums = run.sum_over_processes({**sums, "_tokens": tokens_seen})
        tokens_seen = sums.pop("_tokens")
        ent = sums.pop("entropy", None)
        n_ent = sums.pop("_entropy_count", 0.0)
        # a loss term of a micro-batch is its share of the minibatch's (over the minibatch's tokens / processes):
        # their sum over processes / processes is the minibatch's loss, averaged over the updates
        out = {k: v / max(tokens_seen, 1.0) if k in TOKEN_MEANS else v / max(updates, 1) / run.world
               for k, v in sums.items()}
        if ent is not None and n_ent:
            out["entropy"] = ent / n_ent
        out.update(ppo_updates=float(updates), early_stopped=float(stopped), learning_rate=lr,
                   approx_kl_last_epoch=sum(last_epoch_kl) / max(len(last_epoch_kl), 1))
        if grad_norms and grad_norms[0] is not None:
            out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        model.eval()
        return out

    def _micro_step(self, r: Rollout, idx: Tensor, adv: Tensor, returns: Tensor, loss_beta: float,
                    num_items: float, with_entropy: bool, weight: float = 1.0) -> dict[str, Tensor]:
        cfg = self.cfg
        sub = r.subset(idx)
        c = sub.completion_ids.shape[1]
        idx = idx.to(adv.device)
        mask = sub.completion_mask
        inp = sequence_inputs(sub.prompt_ids, sub.prompt_mask, sub.completion_ids, mask)
        args = (inp["input_ids"], inp["select"], inp["attention_mask"], inp["position_ids"])
        request = logprob_request(sub.completion_ids, mask, cfg.temperature,
                                  with_entropy=with_entropy or cfg.entropy_coef != 0)
        if self.split_backward:  # the policy's part now, the critic's after its backward (see `splits`)
            out, values = self.run.unwrap().policy(*args, logprobs=request), None
        else:
            out, values = self.model(*args, logprobs=request)
        logp, ent = scatter_logprobs(out, mask)
        cliprange_value = cfg.cliprange_value or None
        loss, stats = POLICY_LOSSES["ppo"](
            logp, sub.logprobs, adv[idx, :c], sub.values if values is None else scatter_tokens(values, mask),
            sub.values, returns[idx, :c], mask, cliprange=cfg.cliprange if cfg.use_clipping else None,
            cliprange_value=cliprange_value, vf_coef=0.0 if values is None else cfg.vf_coef,
            entropy=ent if cfg.entropy_coef != 0 else None,
            entropy_coef=cfg.entropy_coef, kl_coef=loss_beta, kl_to=cfg.kl_to, ref_logp=sub.ref_logprobs,
            kl_estimator=cfg.kl_estimator, num_items=num_items)
        self.run.backward(loss * weight)
        if with_entropy:
            ent_tok = out.entropy.detach().float()
            stats["entropy"] = ent_tok.sum()
            stats["_entropy_count"] = torch.tensor(float(ent_tok.numel()))
        if values is None:
            del out, logp, ent, loss  # the policy's graph is gone; now the critic's
            values = self.run.unwrap().values(*args)
            vl, v_stats = value_loss(scatter_tokens(values, mask), sub.values, returns[idx, :c], mask,
                                     clip_range=cliprange_value, num_items=num_items)
            self.run.backward(cfg.vf_coef * vl * weight)
            stats.update(value_loss=vl.detach(), vf_clip_frac=v_stats["vf_clip_frac"])
        return stats


def _controller(setup: RLSetup) -> KLController:
    cfg = setup.cfg
    return KLController(cfg.beta, cfg.kl_controller, cfg.target_kl, cfg.kl_horizon)


PPO = RLStage("ppo", PPOStep, check=check_ppo_config, module=with_critic, uses_reference=lambda cfg: True,
              num_generations=lambda cfg: 1, state=_controller, has_critic=lambda cfg: True)


def train_ppo(cfg: PPOConfig) -> dict[str, float]:
    """Run PPO as configured; returns the last logged metrics. Writes nothing before all input is valid."""
    return run_rl_stage(cfg, PPO)
