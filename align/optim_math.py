"""Second-order step math for TRPO (Schulman et al. 2015, appendix C), on flat parameter vectors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Tensor = torch.Tensor

__all__ = ["LineSearchResult", "backtracking_line_search", "conjugate_gradient", "flat_grad",
           "hessian_vector_product", "max_step_size"]


def conjugate_gradient(
    Avp: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10, residual_tol: float = 1e-10
) -> tuple[Tensor, Tensor]:
    """Solve ``A x = b`` for a symmetric positive-definite ``A`` known only through ``v ↦ A v``.

    Conjugate gradient (Nocedal & Wright, Alg. 5.2) from ``x₀ = 0``; TRPO uses it with ``A`` the
    Fisher-vector product (plus damping) and ``b`` the policy gradient, to get the natural-gradient direction
    ``x ≈ A⁻¹ g`` without forming ``A``. Each iteration calls ``Avp`` once.

    Shapes: ``b`` (P,); ``Avp`` maps (P,) → (P,). Stops after ``iters`` iterations or once the squared
    residual ``‖b − A x‖²`` falls below ``residual_tol``, or if a search direction has ``pᵀAp ≤ 0`` (``A`` not
    positive definite along it; the current ``x`` is returned). Returns ``(x, residual_norm)`` with
    ``residual_norm = ‖r‖`` from the CG recurrence (no extra ``Avp`` call), a 0-dim tensor.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r.dot(r)
    for _ in range(iters):
        if rr.item() < residual_tol:
            break
        Ap = Avp(p)
        pAp = p.dot(Ap)
        if pAp.item() <= 0:
            break
        alpha = rr / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = r.dot(r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, rr.sqrt()


def max_step_size(step_dir: Tensor, Avp_of_step_dir: Tensor, max_kl: float) -> Tensor:
    """Largest scale ``β`` of a step ``s`` that keeps the quadratic KL model within ``δ = max_kl``.

    ``½ (βs)ᵀ A (βs) = δ``  ⇒  ``β = sqrt(2δ / sᵀAs)``. Shapes: ``step_dir`` and ``Avp_of_step_dir = A s`` (P,);
    returns a 0-dim tensor. ``sᵀAs`` must be positive (true for a positive-definite ``A`` and ``s ≠ 0``).
    """
    if not max_kl > 0 or not math.isfinite(max_kl):
        raise ValueError(f"max_kl must be a positive finite number, got {max_kl}")
    sAs = step_dir.dot(Avp_of_step_dir)
    return torch.sqrt(2.0 * max_kl / sAs)


def flat_grad(output: Tensor, params: list[Tensor], create_graph: bool = False,
              retain_graph: bool | None = None) -> Tensor:
    """``∂ output / ∂ params`` as one flat vector (P,) in the order of `params` (zeros for unused ones)."""
    grads = torch.autograd.grad(output, params, create_graph=create_graph, retain_graph=retain_graph,
                                allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def hessian_vector_product(grad: Tensor, params: list[Tensor], v: Tensor) -> Tensor:
    """``H v = ∂(∇f · v) / ∂θ`` from ``grad = ∇f`` (P,) built with ``create_graph=True`` (Pearlmutter 1994).

    One backward through the graph of ``grad`` per call; the graph is kept, so the conjugate-gradient loop calls
    this ``iters`` times after a single forward and first backward. With ``f`` the mean KL(π_old ‖ π_θ) at
    ``θ = θ_old`` this is the Fisher-vector product of TRPO. Shapes: ``grad``, ``v`` (P,) → (P,).
    """
    return flat_grad(grad.dot(v.to(grad.dtype)), params, retain_graph=True)


@dataclass
class LineSearchResult:
    """Outcome of :func:`backtracking_line_search`: whether and where a step was accepted, and why others were
    not."""

    accepted: bool
    fraction: float  # of the full step that was taken (0 when rejected)
    steps: int  # candidate steps evaluated
    improvement: float  # actual surrogate improvement of the accepted step (0 when rejected)
    expected: float  # linear prediction g·(fraction·full step) for the accepted step (full step when rejected)
    kl: float  # KL(π_old ‖ π) of the accepted step (0 when rejected)
    rejected_kl: int = 0  # candidates rejected for KL > max_kl·(1 + kl_tolerance)
    rejected_improvement: int = 0  # candidates rejected for too little (or negative) improvement
    rejected_nonfinite: int = 0  # candidates whose surrogate or KL was not finite
    last_reason: str = ""  # why the last candidate was rejected ("" when one was accepted)


def backtracking_line_search(
    evaluate: Callable[[float], tuple[float, float]],
    expected_improvement: float,
    max_kl: float,
    max_steps: int = 10,
    backtrack_ratio: float = 0.5,
    accept_ratio: float = 0.1,
    kl_tolerance: float = 0.0,
) -> LineSearchResult:
    """TRPO's line search on the full natural-gradient step (Schulman et al. 2015, appendix C).

    Tries the fractions ``f = backtrack_ratio^k``, k = 0 … max_steps−1, of the full step; ``evaluate(f)`` returns
    ``(improvement, kl)``: the actual change of the surrogate ``L(θ_old + f·s) − L(θ_old)`` and the mean
    ``KL(π_old ‖ π)`` there. The first candidate with ``kl ≤ max_kl·(1 + kl_tolerance)``, ``improvement > 0``
    and ``improvement ≥ accept_ratio · f · expected_improvement`` is accepted. When none is, the result says so
    (``accepted=False``) with a count per reason; the caller restores ``θ_old``.
    """
    kl_limit = max_kl * (1.0 + kl_tolerance)
    res = LineSearchResult(False, 0.0, 0, 0.0, expected_improvement, 0.0)
    frac = 1.0
    for k in range(max_steps):
        improvement, kl = evaluate(frac)
        res.steps = k + 1
        if not (math.isfinite(improvement) and math.isfinite(kl)):
            res.rejected_nonfinite += 1
            res.last_reason = "non-finite surrogate or KL"
        elif kl > kl_limit:
            res.rejected_kl += 1
            res.last_reason = f"KL {kl:.3g} > {kl_limit:.3g}"
        elif improvement <= 0 or improvement < accept_ratio * frac * expected_improvement:
            res.rejected_improvement += 1
            res.last_reason = (f"improvement {improvement:.3g} < {accept_ratio:g} x expected "
                               f"{frac * expected_improvement:.3g}" if improvement > 0 else
                               f"surrogate did not improve ({improvement:.3g})")
        else:
            res.accepted, res.fraction, res.improvement, res.kl = True, frac, improvement, kl
            res.expected, res.last_reason = frac * expected_improvement, ""
            return res
        frac *= backtrack_ratio
    return res
