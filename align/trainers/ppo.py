"""PPO for language models (`align ppo --config FILE`): a policy, a critic, GAE and a KL penalty to a frozen
reference, on the shared rollout loop.

One step (Ouyang et al. 2022; Ziegler et al. 2019; Schulman et al. 2017):

1. sample one completion per prompt with the current policy π_old, keeping log π_old of each token;
2. score it with the reward sources (reward model and/or functions) → the score s;
   compute log π_ref and the critic's values V_t of the rollout;
3. per-token rewards ``r_t = −β·KL_t`` (+ ``s`` at the last token) with a KL estimator (k1/k2/k3) of
   ``log π_old − log π_ref``; GAE(γ, λ) gives advantages A_t and value targets R_t; A is whitened;
4. num_ppo_epochs passes over the rollouts in num_mini_batches minibatches, each one optimizer update of
   ``L = L_clip(ρ, A; ε) + vf_coef·L_V(V, V_old, R; ε_V) − entropy_coef·H [+ β·KL in the loss]``;
   the passes stop early once the mean approximate KL(π_old ‖ π) passes target_approx_kl;
5. β is updated by its controller (fixed / adaptive / doubling) and the learning-rate schedule advances.

The top of this file is the algorithm as pure functions of tensors; `train_ppo` below wires it to models, data
and the shared loop. The trained modules (policy and critic, or policy and a value head) are one
`PolicyAndValue` module: one optimizer, one DDP wrapper, one checkpoint.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import torch
from torch import nn

from ..advantages import gae
from ..config import AlignError, PPOConfig
from ..heads import apply_scalar_lora, load_scalar_model, token_values
from ..kl_control import KLController
from ..losses import (aggregate, clipped_surrogate_loss, entropy_from_logits, explained_variance, kl_estimate,
                      masked_mean, masked_whiten, value_loss)
from ..models import SelectiveLM, lm_parts, make_trainable
from ..rollout import Rollout, logprobs_from_selected, make_generator, scatter_tokens, sequence_inputs
from .loop import Run, resolve_max_steps, seed_everything
from .rl import (Reference, RolloutSampler, apply_gradients, check_rl_config, disable_dropout, gold_sources,
                 greedy_eval, load_rl_inputs, reward_sources)
from .sft import prepare_model

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------------------------
# the algorithm: pure functions


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Rewards of each completion token: ``r_t = −β·KL_t``, plus the sequence score at its last valid token.

    (InstructGPT's per-token KL penalty, Ouyang et al. 2022 eq. 2; Ziegler et al. 2019 eq. 1.) Shapes:
    scores (B,), kl and mask (B, C) → (B, C), 0 on masked positions. A row with no valid token gets nothing."""
    valid = mask.bool()
    r = torch.where(valid, -beta * kl, torch.zeros_like(kl))
    idx = torch.arange(mask.shape[1], device=mask.device)
    last = (idx * valid).argmax(-1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    r[rows, last] += torch.where(valid.any(-1), scores.to(r.dtype), torch.zeros_like(scores, dtype=r.dtype))
    return r


def token_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str) -> Tensor:
    """Per-token KL(π ‖ π_ref) estimate on the sampled tokens, 0 on masked positions. (B, C) → (B, C)."""
    kl = kl_estimate(logprobs, ref_logprobs, estimator)
    return torch.where(mask.bool(), kl, torch.zeros_like(kl))


def _kl_to_ref(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, estimator: str) -> Tensor:
    # KL(π_θ ‖ π_ref) on tokens sampled by π_old (≈ π_θ within a step), as GRPO's loss term
    return kl_estimate(logp, ref_logp, estimator)


def _kl_to_old(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, estimator: str) -> Tensor:
    # KL(π_old ‖ π_θ) on tokens sampled by π_old: the PPO paper's penalty (Schulman et al. 2017, eq. 8)
    return kl_estimate(old_logp, logp, estimator)


# kl_to -> per-token KL term of the objective for kl_in="loss"
KL_PENALTIES: dict[str, Callable[[Tensor, Tensor, Tensor | None, str], Tensor]] = {
    "ref": _kl_to_ref,
    "old": _kl_to_old,
}


def ppo_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float,
                   whiten: bool) -> tuple[Tensor, Tensor]:
    """GAE advantages (whitened over the valid tokens if asked) and value targets R_t = A_t + V_t (unwhitened).
    Shapes: (B, C) each → ((B, C), (B, C)), 0 on masked positions."""
    adv, returns = gae(rewards, values, mask, gamma, lam)
    if whiten:
        adv = masked_whiten(adv, mask)
    return adv, returns


def ppo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, values: Tensor, old_values: Tensor,
             returns: Tensor, mask: Tensor, *, cliprange: float | None = 0.2, cliprange_value: float | None = 0.2,
             vf_coef: float = 0.1, entropy: Tensor | None = None, entropy_coef: float = 0.0,
             kl_coef: float = 0.0, kl_to: str = "ref", ref_logp: Tensor | None = None, kl_estimator: str = "k1",
             num_items: float | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO objective on one (micro-)batch, negated for minimisation; every term is a token mean.

    ``L = L_clip + vf_coef·L_V − entropy_coef·H + kl_coef·KL`` with ``L_clip`` the clipped surrogate
    (``cliprange=None``: unclipped ``−ρA``), ``L_V`` the value loss clipped around ``old_values``
    (``cliprange_value=None``: unclipped), ``H`` the entropy (needs ``entropy``) and ``KL`` the penalty
    ``KL_PENALTIES[kl_to]`` (needs ``ref_logp`` for "ref"). ``num_items`` replaces the token count of every mean
    (see :func:`align.losses.aggregate`) for exact gradient accumulation.

    Shapes: all (B, C). Returns (loss, detached stats: policy_loss, value_loss, clip_frac, approx_kl,
    vf_clip_frac, and entropy / kl_penalty when used)."""
    eps = math.inf if cliprange is None else cliprange
    pg, pg_stats = clipped_surrogate_loss(logp, old_logp, advantages, mask, epsilon=eps, num_items=num_items)
    vl, v_stats = value_loss(values, old_values, returns, mask, clip_range=cliprange_value, num_items=num_items)
    loss = pg + vf_coef * vl
    stats = {"policy_loss": pg.detach(), "value_loss": vl.detach(), "clip_frac": pg_stats["clip_frac"],
             "approx_kl": pg_stats["approx_kl"], "vf_clip_frac": v_stats["vf_clip_frac"]}
    if entropy is not None and entropy_coef:
        ent = aggregate(entropy, mask, num_items=num_items)
        loss = loss - entropy_coef * ent
    if kl_coef:
        kl = aggregate(KL_PENALTIES[kl_to](logp, old_logp, ref_logp, kl_estimator), mask, num_items=num_items)
        loss = loss + kl_coef * kl
        stats["kl_penalty"] = kl.detach()
    return loss, stats


def chunks(index: Tensor, n: int) -> list[Tensor]:
    """`index` cut into n contiguous, nearly equal parts (sizes differ by at most one)."""
    size, rem = divmod(len(index), n)
    out, at = [], 0
    for c in range(n):
        k = size + (1 if c < rem else 0)
        out.append(index[at:at + k])
        at += k
    return out


# ---------------------------------------------------------------------------------------------------------------
# the trained modules


class PolicyAndValue(nn.Module):
    """The policy and its critic as one module: a separate scalar-head model (`critic`) or a linear value head
    on the policy's last hidden states (`value_head`). The forward computes logits and values only at the
    selected positions (those that predict a completion token, V_t being the value before token t)."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None = None, value_head: nn.Linear | None = None):
        super().__init__()
        if (critic is None) == (value_head is None):
            raise ValueError("give exactly one of critic and value_head")
        self.policy = SelectiveLM(policy)
        self.critic = critic
        self.value_head = value_head

    def forward(self, input_ids: Tensor, select: Tensor, attention_mask: Tensor,
                position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(logits (N, V), values (N,) float32) at the N selected positions of (B, T) inputs."""
        if self.value_head is not None:
            logits, hidden = self.policy(input_ids, select=select, attention_mask=attention_mask,
                                         position_ids=position_ids, return_hidden=True)
            return logits, self.value_head(hidden).squeeze(-1).float()
        logits = self.policy(input_ids, select=select, attention_mask=attention_mask, position_ids=position_ids)
        return logits, self.values(input_ids, select, attention_mask, position_ids)

    def values(self, input_ids: Tensor, select: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """Values (N,) float32 at the selected positions, without the policy's output head."""
        if self.value_head is not None:
            backbone, _ = lm_parts(self.policy.model)
            out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False)
            hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
            return self.value_head(hidden[select]).squeeze(-1).float()
        return token_values(self.critic, input_ids, attention_mask, position_ids)[select]


def build_critic(cfg: PPOConfig, tokenizer, dtype: torch.dtype, policy: nn.Module
                 ) -> tuple[nn.Module | None, nn.Linear | None]:
    """(critic, None) for a separate value model, or (None, value_head) for value_model='policy'."""
    choice = cfg.value_model or cfg.reward_model or cfg.model
    if choice == "policy":
        _, head = lm_parts(policy)
        value_head = nn.Linear(head.in_features, 1, dtype=dtype)
        nn.init.zeros_(value_head.weight)
        nn.init.zeros_(value_head.bias)
        return None, value_head
    critic = load_scalar_model(choice, dtype=dtype, trust_remote_code=cfg.trust_remote_code, seed=cfg.seed,
                               pad_token_id=tokenizer.pad_token_id)
    n_critic = critic.get_input_embeddings().num_embeddings
    n_policy = policy.get_input_embeddings().num_embeddings
    if n_critic != n_policy:
        raise AlignError(f"value_model {choice}: vocabulary of {n_critic} tokens, the policy has {n_policy}; "
                         f"the critic reads the policy's token ids, so it must share its tokenizer")
    disable_dropout(critic)
    lora = (lambda m: apply_scalar_lora(m, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
            ) if cfg.use_lora else None
    critic = make_trainable(critic, cfg.gradient_checkpointing, lora)
    return critic, None


def check_ppo_config(cfg: PPOConfig) -> None:
    check_rl_config(cfg)
    if cfg.num_ppo_epochs < 1 or cfg.num_mini_batches < 1:
        raise AlignError("num_ppo_epochs and num_mini_batches must be >= 1")
    if cfg.per_device_train_batch_size < cfg.num_mini_batches * cfg.gradient_accumulation_steps:
        raise AlignError(f"per_device_train_batch_size={cfg.per_device_train_batch_size} rollouts cannot fill "
                         f"num_mini_batches x gradient_accumulation_steps = "
                         f"{cfg.num_mini_batches * cfg.gradient_accumulation_steps} micro-batches")
    if cfg.kl_to == "old" and cfg.kl_in != "loss":
        raise AlignError("kl_to=old (the PPO paper's KL[pi_old, pi]) only makes sense with kl_in=loss")
    if cfg.cliprange <= 0 or cfg.cliprange_value < 0:
        raise AlignError("cliprange must be > 0 and cliprange_value >= 0")
    if not 0 <= cfg.lam <= 1 or not 0 <= cfg.gamma <= 1:
        raise AlignError("gamma and lam must be in [0, 1]")
    if cfg.kl_controller != "fixed" and cfg.target_kl <= 0:
        raise AlignError(f"kl_controller={cfg.kl_controller} needs target_kl > 0")
    if cfg.kl_controller == "adaptive" and cfg.kl_horizon <= 0:
        raise AlignError("kl_controller=adaptive needs kl_horizon > 0")
    if cfg.kl_controller != "fixed" and cfg.beta <= 0:
        raise AlignError(f"kl_controller={cfg.kl_controller} needs an initial beta > 0")
    if cfg.value_model and cfg.value_model != "policy" and cfg.value_model.endswith((".py", ".jsonl")):
        raise AlignError(f"value_model {cfg.value_model}: expected a model directory, hub id or 'policy'")


# ---------------------------------------------------------------------------------------------------------------
# the stage


def train_ppo(cfg: PPOConfig) -> dict[str, float]:
    """Run PPO as configured; returns the last logged metrics. Writes nothing before all input is valid."""
    tokenizer, data, eval_rows, eval_funcs = load_rl_inputs(cfg, check_ppo_config)

    seed_everything(cfg.seed)
    run = Run(cfg, "ppo")
    policy = prepare_model(cfg, tokenizer, run.weights_dtype)
    disable_dropout(policy)
    critic, value_head = build_critic(cfg, tokenizer, run.weights_dtype, policy)
    module = PolicyAndValue(policy, critic, value_head)
    reference = Reference.load(cfg, policy, tokenizer, run.device)
    weights = [float(w) for w in cfg.reward_weights] or None
    sampler = RolloutSampler(cfg, run, tokenizer, data, reward_sources(cfg, run.device), weights,
                             gold_sources(cfg), reference)

    global_batch = cfg.per_device_train_batch_size * run.world
    max_steps = resolve_max_steps(cfg, len(data), global_batch)
    controller = KLController(cfg.beta, cfg.kl_controller, cfg.target_kl, cfg.kl_horizon)
    model = run.prepare(module, max_steps, extra_state=controller)
    trainer = PPOStep(cfg, run, model, sampler, controller)

    def eval_fn(step: int) -> dict[str, float]:
        if not run.is_main:
            return {}
        return greedy_eval(run.unwrap().policy.model, tokenizer, eval_rows, eval_funcs, cfg.max_new_tokens,
                           cfg.per_device_eval_batch_size, cfg.eval_max_samples)

    metrics = run.train(trainer, eval_fn if eval_rows is not None else None)
    save_outputs(run, tokenizer)
    return metrics


class PPOStep:
    """One PPO step (rollout, advantages, epochs of minibatch updates, β update) as a callable for Run.train."""

    def __init__(self, cfg: PPOConfig, run: Run, model: nn.Module, sampler: RolloutSampler,
                 controller: KLController):
        self.cfg, self.run, self.model, self.sampler, self.controller = cfg, run, model, sampler, controller
        self.global_batch = cfg.per_device_train_batch_size * run.world

    # -- phase 1-2: rollout -----------------------------------------------------------------------------------
    def rollout(self, step: int) -> Rollout:
        """Sample, score, and add reference log-probabilities and the critic's values (the shared sampler)."""
        net: PolicyAndValue = self.run.unwrap()
        return self.sampler(step, net.policy.model, value_fn=lambda r: self._values(net, r))

    @staticmethod
    def _values(net: PolicyAndValue, r: Rollout) -> Tensor:
        inp = sequence_inputs(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
        v = net.values(inp["input_ids"], inp["select"], inp["attention_mask"], inp["position_ids"])
        return scatter_tokens(v.float(), r.completion_mask)

    # -- the step ---------------------------------------------------------------------------------------------
    def __call__(self, step: int) -> dict[str, float]:
        cfg, run = self.cfg, self.run
        r = self.rollout(step)
        mask = r.completion_mask
        beta = self.controller.beta
        kl = token_kl(r.logprobs, r.ref_logprobs, mask, cfg.kl_estimator)
        rewards = per_token_rewards(r.rewards, kl, mask, beta if cfg.kl_in == "reward" else 0.0)
        adv, returns = ppo_advantages(rewards, r.values, mask, cfg.gamma, cfg.lam, cfg.whiten_advantages)
        with run.timer("training"):
            train_stats = self.update(step, r, adv, returns, beta if cfg.kl_in == "loss" else 0.0)
        run.scheduler.step()

        kl_seq = kl.sum(-1)
        local = {
            "reward": r.rewards.mean(), "reward_std": r.rewards.std() if len(r) > 1 else torch.zeros(()),
            **{f"reward_{k}": v.mean() for k, v in r.reward_components.items()},
            **{f"gold_{k}": v.mean() for k, v in r.gold_rewards.items()},
            "kl": kl_seq.mean(), "kl_per_token": masked_mean(kl, mask),
            "non_score_reward": (-beta * kl_seq).mean() if cfg.kl_in == "reward" else torch.zeros(()),
            "explained_variance": _nan_to_zero(explained_variance(r.values, returns, mask)),
            "value_mean": masked_mean(r.values, mask), "advantage_std": masked_mean(adv * adv, mask).sqrt(),
            "response_length": r.lengths.float().mean(), "eos_frac": r.eos.float().mean(),
        }
        names = list(local)
        summed = run.reduce_sum([float(local[k]) for k in names])
        out = {k: v / run.world for k, v in zip(names, summed)}
        out.update(train_stats)
        measured = out["kl"] if cfg.kl_to == "ref" else train_stats["approx_kl_last_epoch"]
        out["beta"] = beta
        self.controller.update(measured, self.global_batch)
        return out

    # -- phase 4: epochs of minibatch updates -----------------------------------------------------------------
    def update(self, step: int, r: Rollout, adv: Tensor, returns: Tensor, loss_beta: float) -> dict[str, float]:
        cfg, run, model = self.cfg, self.run, self.model
        model.train()
        sums: dict[str, float] = {}
        n_micro = 0
        updates = 0
        last_epoch_kl: list[float] = []
        stopped = False
        lr = run.scheduler.get_last_lr()[0]
        grad_norms = []
        for epoch in range(cfg.num_ppo_epochs):
            perm = torch.randperm(len(r), generator=make_generator("cpu", cfg.seed, step, run.rank, epoch))
            epoch_kl: list[float] = []
            for mb in chunks(perm, cfg.num_mini_batches):
                micro = chunks(mb, cfg.gradient_accumulation_steps)
                (n_tok,) = run.reduce_sum([float(r.completion_mask[mb].sum())])
                num_items = max(n_tok, 1.0) / run.world
                mb_kl = 0.0
                for k, idx in enumerate(micro):
                    with run.no_sync(last=k == len(micro) - 1), run.accelerator.autocast():
                        stats = self._micro_step(r, idx, adv, returns, loss_beta, num_items, with_entropy=epoch == 0)
                    n_valid = float(r.completion_mask[idx].sum())
                    mb_kl += float(stats["approx_kl"]) * n_valid
                    for key, v in stats.items():
                        sums[key] = sums.get(key, 0.0) + float(v)
                    n_micro += 1
                # the schedule advances once per PPO step (in __call__), not once per update
                grad_norms.append(apply_gradients(run, cfg.max_grad_norm))
                updates += 1
                (kl_sum,) = run.reduce_sum([mb_kl])
                epoch_kl.append(kl_sum / max(n_tok, 1.0))
                if cfg.target_approx_kl > 0 and sum(epoch_kl) / len(epoch_kl) > cfg.target_approx_kl:
                    stopped = True
                    break
            last_epoch_kl = epoch_kl
            if stopped:
                break
        ent = sums.pop("entropy", None)
        n_ent = sums.pop("_entropy_count", 0.0)
        out = {k: v / n_micro for k, v in sums.items()}
        if ent is not None and n_ent:
            out["entropy"] = ent / n_ent
        out.update(ppo_updates=float(updates), early_stopped=float(stopped), learning_rate=lr,
                   approx_kl_last_epoch=sum(last_epoch_kl) / max(len(last_epoch_kl), 1))
        if grad_norms and grad_norms[0] is not None:
            out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        model.eval()
        return out

    def _micro_step(self, r: Rollout, idx: Tensor, adv: Tensor, returns: Tensor, loss_beta: float,
                    num_items: float, with_entropy: bool) -> dict[str, Tensor]:
        cfg, run = self.cfg, self.run
        sub = r.subset(idx)
        c = sub.completion_ids.shape[1]
        idx = idx.to(adv.device)
        a, ret = adv[idx, :c], returns[idx, :c]
        inp = sequence_inputs(sub.prompt_ids, sub.prompt_mask, sub.completion_ids, sub.completion_mask)
        logits, values = self.model(inp["input_ids"], inp["select"], inp["attention_mask"], inp["position_ids"])
        need_entropy_grad = cfg.entropy_coef != 0
        logp, ent = logprobs_from_selected(logits, sub.completion_ids, sub.completion_mask, cfg.temperature,
                                           with_entropy=need_entropy_grad)
        v = scatter_tokens(values, sub.completion_mask)
        loss, stats = ppo_loss(logp, sub.logprobs, a, v, sub.values, ret, sub.completion_mask,
                               cliprange=cfg.cliprange if cfg.use_clipping else None,
                               cliprange_value=cfg.cliprange_value or None, vf_coef=cfg.vf_coef, entropy=ent,
                               entropy_coef=cfg.entropy_coef, kl_coef=loss_beta, kl_to=cfg.kl_to,
                               ref_logp=sub.ref_logprobs, kl_estimator=cfg.kl_estimator, num_items=num_items)
        run.backward(loss)
        if with_entropy:
            with torch.no_grad():
                if ent is None:
                    z = logits.detach() if cfg.temperature == 1.0 else logits.detach() / cfg.temperature
                    ent_tok = entropy_from_logits(z).float()
                else:
                    ent_tok = ent.detach()[sub.completion_mask.bool()]
                stats["entropy"] = ent_tok.sum()
                stats["_entropy_count"] = torch.tensor(float(ent_tok.numel()))
        return stats


def _nan_to_zero(x: Tensor) -> Tensor:
    return torch.nan_to_num(x, nan=0.0)


# ---------------------------------------------------------------------------------------------------------------
# outputs


def save_outputs(run: Run, tokenizer) -> None:
    """The policy (or its LoRA adapter) and tokenizer in output_dir with save_pretrained; a separate critic in
    output_dir/value_model; a value head on the policy trunk in output_dir/value_head.safetensors."""
    from accelerate.utils import DistributedType
    from safetensors.torch import save_file

    out_dir = run.cfg.output_dir
    run.accelerator.wait_for_everyone()
    full = None
    if run.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        full = run.accelerator.get_state_dict(run.model)  # collective: every process calls it

    def part(prefix: str) -> dict[str, Any] | None:
        if full is None:
            return None
        return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}

    if run.is_main:
        net: PolicyAndValue = run.unwrap()
        kw = {"state_dict": part("policy.model.")} if full is not None else {}
        net.policy.model.save_pretrained(out_dir, safe_serialization=True, **kw)
        tokenizer.save_pretrained(out_dir)
        if net.critic is not None:
            vdir = os.path.join(out_dir, "value_model")
            kw = {"state_dict": part("critic.")} if full is not None else {}
            net.critic.save_pretrained(vdir, safe_serialization=True, **kw)
            tokenizer.save_pretrained(vdir)
        else:
            head = part("value_head.") or {k: v for k, v in net.value_head.state_dict().items()}
            save_file({k: v.detach().float().cpu().contiguous() for k, v in head.items()},
                      os.path.join(out_dir, "value_head.safetensors"))
    run.accelerator.wait_for_everyone()
