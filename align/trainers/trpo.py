"""Trust region policy optimisation for language models (`align trpo --config FILE`), on the shared rollout loop.

One step (Schulman et al. 2015, "Trust Region Policy Optimization", §6 and appendix C):

1. rollouts, per-token rewards and the advantage Â_t = Ψ_t exactly as in REINFORCE
   (:func:`align.trainers.rl.psi_rollout`: any Ψ of the policy-gradient list; a critic, when Ψ needs one, is
   fitted by regression after the policy step);
2. at θ_old, the gradient ``g = ∇_θ L(θ_old)`` of the surrogate ``L(θ) = agg(π_θ(a_t|s_t)/π_old(a_t|s_t) · Â_t)``
   and the graph of ``∇_θ KL̄(θ)``, ``KL̄ = mean_t KL(π_old(·|s_t) ‖ π_θ(·|s_t))`` over the rollout's tokens
   (the exact KL between the next-token distributions, :func:`align.losses.categorical_kl`);
3. the natural-gradient direction ``x ≈ (F + λI)⁻¹ g`` by conjugate gradient, where ``F v`` is the Fisher-vector
   product in Gauss–Newton form ``F v = mean_t J_tᵀ(diag p_t − p_t p_tᵀ)J_t v`` (:mod:`align.fisher`: a
   Jacobian-vector and a vector-Jacobian product per call, no second derivatives of the network), or with
   ``fisher_product="kl_hessian"`` the Hessian-vector product of KL̄ by double backward (equal at θ_old: the
   reference implementation), and λ the damping;
4. the largest step of the quadratic model, ``s = β x`` with ``½ sᵀ(F + λI)s = δ`` (δ = max_kl), and a
   backtracking line search on ``θ_old + f·s``, f = 1, ½, ¼, …: the first candidate whose actual surrogate gain
   is positive (and at least accept_ratio of its linear prediction ``f·gᵀs``) with ``KL̄ ≤ δ(1 + kl_tolerance)``
   is taken; if none is, θ stays θ_old and the reason is logged.

The policy is moved only by that step; every trainable parameter of the policy takes part (all weights, or the
LoRA adapters with use_lora, which makes the Fisher-vector products cheap). The KL here is to π_old, the policy
that sampled the step; the optional penalty to the frozen reference (beta) lives in the reward as in PPO.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config import AlignError, TRPOConfig
from ..data import split_evenly
from ..fisher import GaussNewtonFisher
from ..losses import POLICY_LOSSES, aggregate_count, categorical_kl, value_loss
from ..models import adapter_parameters
from ..optim_math import (LineSearchResult, backtracking_line_search, conjugate_gradient, flat_grad,
                          hessian_vector_product, max_step_size)
from ..rollout import Rollout, logprobs_from_selected, scatter_tokens, sequence_inputs
from .critic import PolicyAndValue, policy_of
from .rl import (RLSetup, RLStage, check_pg_config, pg_has_critic, pg_module, psi_rollout, refuse_token_budget,
                 run_rl_stage)

Tensor = torch.Tensor
logger = logging.getLogger(__name__)

# how TrustRegionProblem multiplies by the Fisher matrix (equal at θ_old; the second is the reference)
FISHER_PRODUCTS = ("gauss_newton", "kl_hessian")

# ---------------------------------------------------------------------------------------------------------------
# the algorithm


def surrogate(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, agg: str = "token-mean",
              num_items: float | Tensor | None = None) -> Tensor:
    """TRPO's surrogate objective ``L(θ) = agg(ρ_t Â_t)``, ``ρ_t = π_θ(a_t|s_t) / π_old(a_t|s_t)`` (to maximise;
    Schulman et al. 2015 eq. 14): minus ``POLICY_LOSSES["trpo"]``. Shapes: (B, T) each → scalar."""
    return -POLICY_LOSSES["trpo"](logp, old_logp, adv, mask, agg=agg, num_items=num_items)[0]


def trainable(lm: nn.Module) -> list[nn.Parameter]:
    """The policy's trainable parameters: with one base (`share_base`), not those of adapters that are not the
    policy's (a critic's adapter on the policy's base weights is trained by the critic's fit)."""
    model = getattr(lm, "model", lm)
    others: set[int] = set()
    if getattr(model, "peft_config", None):
        active = set(model.active_adapters)
        for name in model.peft_config:
            if name not in active:
                others |= {id(p) for p in adapter_parameters(model, name)}
    return [p for p in lm.parameters() if p.requires_grad and id(p) not in others]


@contextlib.contextmanager
def differentiable_attention():
    """Run attention with the composite (math) kernel: its backward is differentiable, which the Fisher-vector
    products' double backward needs (the fused flash / memory-efficient kernels have no double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


@dataclass
class _Held:
    """One micro-batch held through a TRPO step: the rollout rows, their advantages and π_old."""

    sub: Rollout
    inputs: dict[str, Tensor]
    adv: Tensor  # (b, C)
    old_logp: Tensor  # (b, C) log π_old(a_t|s_t), recomputed at θ_old (ratios are exactly 1 there)
    old_logprobs: Tensor  # (N, V) log π_old(·|s_t) at the N valid positions, for the KL of each candidate


def _forward(lm: nn.Module, held: _Held, temperature: float) -> tuple[Tensor, Tensor]:
    """(logits (N, V), logp (b, C)) of the policy on a held micro-batch."""
    x = held.inputs
    logits = lm(x["input_ids"], x["select"], x["attention_mask"], x["position_ids"])
    logp, _ = logprobs_from_selected(logits, held.sub.completion_ids, held.sub.completion_mask, temperature)
    return logits, logp


def _spaced(n: int, fraction: float) -> Tensor:
    """max(1, round(fraction·n)) evenly spaced indices of range(n) (all of them for fraction 1)."""
    k = max(1, round(fraction * n))
    return torch.arange(k) * n // k


def _set_params(params: list[Tensor], flat: Tensor) -> None:
    with torch.no_grad():
        at = 0
        for p in params:
            n = p.numel()
            p.copy_(flat[at:at + n].view_as(p).to(p.dtype))
            at += n


class TrustRegionProblem:
    """The local model of one TRPO step, built at θ_old from one forward per micro-batch of the rollout:

    - ``g`` (P,): the gradient of the surrogate L at θ_old (summed over micro-batches and processes);
    - ``fvp(v)`` = ``(F + λI) v``: the Fisher matrix of the policy at θ_old times v (no new forward), in
      Gauss–Newton form (``fisher="gauss_newton"``, :class:`align.fisher.GaussNewtonFisher`) or as the Hessian
      of the mean KL̄(π_old ‖ π_θ) by double backward through the kept graph of ``∇KL̄``
      (``fisher="kl_hessian"``); the two are equal at θ_old;
    - ``evaluate(θ)`` = (``L(θ) − L(θ_old)``, ``KL̄(θ)``) with the parameters set to θ (no gradient).

    ``params`` are the trainable parameters of `lm`; ``micro_batches`` splits the rollout (each keeps its graph
    until :meth:`release`); ``reduce`` sums a tensor over processes; the KL is a mean over all valid tokens of
    all processes, the surrogate aggregated with ``agg`` over the whole batch. ``fisher_fraction`` < 1 estimates
    F on evenly spaced rows of each micro-batch only (Schulman et al.'s subsampled Fisher), which makes each
    product that much cheaper at the price of one more forward of those rows; g, the surrogate and the KL
    of the line search always use every row."""

    def __init__(self, lm: nn.Module, r: Rollout, adv: Tensor, *, temperature: float = 1.0,
                 agg: str = "token-mean", damping: float = 0.0, micro_batches: int = 1,
                 fisher_fraction: float = 1.0, reduce: Callable[[Tensor], Tensor] | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                 fisher: str = "gauss_newton"):
        if not 0 < fisher_fraction <= 1:
            raise ValueError(f"fisher_fraction must be in (0, 1], got {fisher_fraction}")
        if fisher not in FISHER_PRODUCTS:
            raise ValueError(f"fisher must be one of {', '.join(FISHER_PRODUCTS)}, got {fisher!r}")
        self.lm, self.temperature, self.agg, self.damping = lm, temperature, agg, damping
        self.reduce = reduce or (lambda t: t)
        self.autocast = autocast or contextlib.nullcontext
        self.params = trainable(lm)
        if not self.params:
            raise AlignError("the policy has no trainable parameters")
        mask = r.completion_mask
        micro = split_evenly(torch.arange(len(r)), micro_batches)
        fisher_rows = [_spaced(len(idx), fisher_fraction) for idx in micro]
        n_fisher = sum(mask[idx[rows]].sum() for idx, rows in zip(micro, fisher_rows))
        counts = self.reduce(torch.stack([mask.sum().float(), aggregate_count(mask, agg),
                                          torch.as_tensor(n_fisher).float()]).to(adv.device))
        self.n_tok, self.n_items, n_fisher = (max(float(x), 1.0) for x in counts)
        self.held: list[_Held] = []
        self.kl_grads: list[Tensor] = []
        self.gauss_newton: GaussNewtonFisher | None = None
        fisher_logits: list[Tensor] = []
        g, surr_old = None, torch.zeros((), dtype=torch.float64, device=adv.device)
        for idx, rows in zip(micro, fisher_rows):
            sub = r.subset(idx)
            c = sub.completion_ids.shape[1]
            inputs = sequence_inputs(sub.prompt_ids, sub.prompt_mask, sub.completion_ids, sub.completion_mask)
            h = _Held(sub, inputs, adv[idx.to(adv.device), :c], None, None)  # type: ignore[arg-type]
            whole = len(rows) == len(idx)
            with differentiable_attention() if whole else contextlib.nullcontext(), self.autocast():
                logits, logp = _forward(lm, h, temperature)
                h.old_logp = logp.detach()
                h.old_logprobs = torch.log_softmax(logits.detach().float() / temperature, dim=-1)
                surr = surrogate(logp, h.old_logp, h.adv, sub.completion_mask, agg, self.n_items)
            gi = flat_grad(surr, self.params, retain_graph=whole).float()
            g = gi if g is None else g + gi
            f_logits = logits
            if not whole:  # a second forward of the Fisher rows only
                fs = sub.subset(rows)
                fh = _Held(fs, sequence_inputs(fs.prompt_ids, fs.prompt_mask, fs.completion_ids,
                                               fs.completion_mask), h.adv, h.old_logp, h.old_logprobs)
                with differentiable_attention(), self.autocast():
                    f_logits, _ = _forward(lm, fh, temperature)
            if fisher == "gauss_newton":
                fisher_logits.append(f_logits)
            else:
                f_old = torch.log_softmax(f_logits.detach().float() / temperature, dim=-1)
                kl = categorical_kl(f_old, f_logits, temperature).sum() / n_fisher
                self.kl_grads.append(flat_grad(kl, self.params, create_graph=True))
            surr_old += surr.detach().double()
            self.held.append(h)
        if fisher == "gauss_newton":  # the logits' graphs are kept by the Fisher until release()
            self.gauss_newton = GaussNewtonFisher.from_logits(fisher_logits, temperature, self.params, n_fisher)
        self.g = self.reduce(g)
        self.surrogate_old = float(self.reduce(surr_old))
        self.theta_old = torch.cat([p.detach().reshape(-1).float() for p in self.params])

    def fvp(self, v: Tensor) -> Tensor:
        """``(F + λI) v``, F the Fisher matrix (the Hessian of KL̄) at θ_old. Shapes: (P,) → (P,) float32."""
        if self.gauss_newton is not None:
            fv = self.gauss_newton.fvp(v).float()
        else:
            fv = sum(hessian_vector_product(gk, self.params, v).float() for gk in self.kl_grads)
        return self.reduce(fv) + self.damping * v

    def release(self) -> None:
        """Free the graphs kept for the Fisher-vector products (fvp is unusable afterwards)."""
        self.kl_grads = []
        if self.gauss_newton is not None:
            self.gauss_newton.release()

    def set_params(self, theta: Tensor) -> None:
        _set_params(self.params, theta)

    @torch.no_grad()
    def evaluate(self, theta: Tensor) -> tuple[float, float]:
        """Set the parameters to θ and return (``L(θ) − L(θ_old)``, ``KL̄(π_old ‖ π_θ)``)."""
        self.set_params(theta)
        tot = torch.zeros(2, dtype=torch.float64, device=self.theta_old.device)
        for h in self.held:
            with self.autocast():
                logits, logp = _forward(self.lm, h, self.temperature)
                s = surrogate(logp, h.old_logp, h.adv, h.sub.completion_mask, self.agg, self.n_items)
                kl = categorical_kl(h.old_logprobs, logits, self.temperature).sum()
            tot += torch.stack([s.double(), kl.double()]).to(tot.device)
        tot = self.reduce(tot)
        return float(tot[0]) - self.surrogate_old, float(tot[1]) / self.n_tok


def trpo_update(lm: nn.Module, r: Rollout, adv: Tensor, *, max_kl: float, temperature: float = 1.0,
                agg: str = "token-mean", cg_iters: int = 10, cg_damping: float = 0.1,
                cg_residual_tol: float = 1e-10, line_search_steps: int = 10, backtrack_ratio: float = 0.5,
                accept_ratio: float = 0.1, kl_tolerance: float = 0.0, micro_batches: int = 1,
                fisher_fraction: float = 1.0, reduce: Callable[[Tensor], Tensor] | None = None,
                autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                fisher: str = "gauss_newton") -> tuple[LineSearchResult, dict[str, float]]:
    """One TRPO step of the trainable parameters of `lm` (a SelectiveLM-like module) on rollout `r` with
    advantages `adv` (B, C): conjugate gradient on :class:`TrustRegionProblem`'s ``fvp`` for ``x ≈ (F+λI)⁻¹g``,
    the step ``s = sqrt(2δ / xᵀ(F+λI)x) · x``, then :func:`align.optim_math.backtracking_line_search`. Leaves
    `lm` at θ_old + f·s (accepted) or θ_old (rejected). Returns (line-search result, metrics)."""
    prob = TrustRegionProblem(lm, r, adv, temperature=temperature, agg=agg, damping=cg_damping,
                              micro_batches=micro_batches, fisher_fraction=fisher_fraction, reduce=reduce,
                              autocast=autocast, fisher=fisher)
    g = prob.g
    stats: dict[str, float] = {"surrogate": prob.surrogate_old, "grad_norm": float(g.norm())}
    x, residual = conjugate_gradient(prob.fvp, g, cg_iters, cg_residual_tol)
    stats["cg_residual"] = float(residual)
    stats["cg_residual_rel"] = float(residual) / max(stats["grad_norm"], 1e-30)
    fx = prob.fvp(x) if float(x.abs().max()) > 0 else torch.zeros_like(x)
    shs = float(x.dot(fx))
    prob.release()  # free the double-backward graphs before the line search
    if not shs > 0 or not math.isfinite(shs):
        res = LineSearchResult(False, 0.0, 0, 0.0, 0.0, 0.0, last_reason="zero or non-finite natural gradient")
        return res, {**stats, **_line_search_stats(res, 0.0)}
    full = max_step_size(x, fx, max_kl) * x
    theta_old = prob.theta_old
    res = backtracking_line_search(lambda f: prob.evaluate(theta_old + f * full), float(g.dot(full)), max_kl,
                                   line_search_steps, backtrack_ratio, accept_ratio, kl_tolerance)
    prob.set_params(theta_old + res.fraction * full if res.accepted else theta_old)
    return res, {**stats, **_line_search_stats(res, float(full.norm()))}


def _line_search_stats(res: LineSearchResult, full_norm: float) -> dict[str, float]:
    return {
        "trpo_accepted": float(res.accepted), "step_kl": res.kl, "line_search_steps": float(res.steps),
        "step_fraction": res.fraction, "step_norm": res.fraction * full_norm,
        "improvement_expected": res.expected, "improvement_actual": res.improvement,
        "improvement_ratio": res.improvement / res.expected if res.accepted and res.expected else 0.0,
        "ls_rejected_kl": float(res.rejected_kl), "ls_rejected_improvement": float(res.rejected_improvement),
        "ls_rejected_nonfinite": float(res.rejected_nonfinite),
    }


# ---------------------------------------------------------------------------------------------------------------
# the stage


class TRPOStep:
    """One TRPO step as a callable for Run.train: rollouts and Ψ (shared with REINFORCE), the trust-region step
    of the policy, then the critic's regression (when Ψ uses one) with AdamW."""

    def __init__(self, setup: RLSetup):
        self.setup, self.cfg, self.run = setup, setup.cfg, setup.run

    def __call__(self, step: int) -> dict[str, float]:
        cfg, run = self.cfg, self.run
        r, adv, targets, out = psi_rollout(self.setup, step)
        # this process's rows of the whole rollout; the problem sums its gradients and products over processes
        mine = torch.cat([idx for idx, w in run.shares(torch.arange(len(r)), cfg.gradient_accumulation_steps)
                          if w])
        r, adv = r.subset(mine), adv[mine.to(adv.device)]
        targets = None if targets is None else targets[mine.to(targets.device)]
        with run.timer("training"):
            res, stats = trpo_update(
                policy_of(run.unwrap()), r, adv, max_kl=cfg.max_kl, temperature=cfg.temperature, agg=cfg.loss_agg,
                cg_iters=cfg.cg_iters, cg_damping=cfg.cg_damping, cg_residual_tol=cfg.cg_residual_tol,
                line_search_steps=cfg.line_search_steps, backtrack_ratio=cfg.backtrack_ratio,
                accept_ratio=cfg.accept_ratio, kl_tolerance=cfg.kl_tolerance,
                micro_batches=cfg.gradient_accumulation_steps, fisher_fraction=cfg.fisher_fraction,
                reduce=run.all_sum, autocast=run.accelerator.autocast, fisher=cfg.fisher_product)
        if res.steps == 0 and run.is_main:
            logger.info("step %d: no TRPO step: %s", step + 1, res.last_reason)
        elif not res.accepted and run.is_main:
            logger.warning("step %d: TRPO line search rejected all %d candidate steps (%d for KL > max_kl, %d for "
                           "too little improvement, %d non-finite); last: %s; the policy is unchanged",
                           step + 1, res.steps, res.rejected_kl, res.rejected_improvement, res.rejected_nonfinite,
                           res.last_reason)
        if targets is not None:
            with run.timer("critic"):
                stats.update(self.fit_critic(r, targets))
            stats["learning_rate"] = run.scheduler.get_last_lr()[0]
            run.scheduler.step()  # the schedule is the critic's; it advances once per TRPO step
        out.update(stats)
        return out

    def fit_critic(self, r: Rollout, targets: Tensor) -> dict[str, float]:
        """vf_iters AdamW updates of the critic on ½(V_t − R̂_t)² (token mean over the whole batch). The policy
        is not touched: a value head on the policy's trunk is fitted as a probe of the trunk's features."""
        cfg, run = self.cfg, self.run
        net: PolicyAndValue = run.unwrap()
        critic_params = net.critic_parameters()
        critic_ids = {id(p) for p in critic_params}  # with one base, the critic's adapter is on the policy
        (n_tok,) = run.reduce_sum([float(r.completion_mask.sum())])
        losses = []
        net.train()
        for _ in range(cfg.vf_iters):
            total = 0.0
            for idx in split_evenly(torch.arange(len(r)), cfg.gradient_accumulation_steps):
                sub = r.subset(idx)
                c = sub.completion_ids.shape[1]
                x = sequence_inputs(sub.prompt_ids, sub.prompt_mask, sub.completion_ids, sub.completion_mask)
                with run.accelerator.autocast():
                    v = net.values(x["input_ids"], x["select"], x["attention_mask"], x["position_ids"])
                    vl, _ = value_loss(scatter_tokens(v, sub.completion_mask), sub.values,
                                       targets[idx.to(targets.device), :c], sub.completion_mask,
                                       num_items=max(n_tok, 1.0))
                run.backward(vl)
                total += float(vl.detach())
            for p in net.policy.parameters():
                if id(p) not in critic_ids:
                    p.grad = None
            # the unwrapped module has no DDP hooks: its gradients are summed over processes here
            run.optimizer_step(schedule=False, params=critic_params, sum_grads=True)
            losses.append(run.reduce_sum([total])[0])
        net.eval()
        return {"value_loss": losses[0], "value_loss_last": losses[-1]}


def check_trpo_config(cfg: TRPOConfig) -> None:
    check_pg_config(cfg)
    refuse_token_budget(cfg, "trpo")
    for var, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(var, "false").lower() == "true":
            raise AlignError(f"trpo runs under plain data parallel only, not {name}: the conjugate-gradient step "
                             f"and the line search set every policy parameter whole on each process (launch with "
                             f"recipes/accelerate/ddp.yaml or cpu2.yaml, or use use_lora to make the policy small)")


TRPO = RLStage("trpo", TRPOStep, check=check_trpo_config, module=pg_module, has_critic=pg_has_critic)


def train_trpo(cfg: TRPOConfig) -> dict[str, float]:
    """Run TRPO as configured; returns the last logged metrics. Writes nothing before all input is valid."""
    return run_rl_stage(cfg, TRPO)
