"""Second-order step math for TRPO (Schulman et al. 2015, appendix C), on flat parameter vectors."""

from __future__ import annotations

import math
from typing import Callable

import torch

Tensor = torch.Tensor

__all__ = ["conjugate_gradient", "max_step_size"]


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
