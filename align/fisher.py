"""Gauss–Newton Fisher-vector products of a categorical (softmax) policy, for TRPO's conjugate gradient.

For a policy ``π_θ(·|s_i) = softmax(z_i)``, ``z_i = logits_i / temperature`` (V,), the Fisher matrix over the N
selected positions of a batch is exactly the Gauss–Newton matrix of the mean KL(π_old ‖ π_θ) at ``θ = θ_old``::

    F v = (1/N) Σ_i J_iᵀ (diag(p_i) − p_i p_iᵀ) J_i v,     p_i = softmax(z_i) at θ_old,   J_i = ∂z_i/∂θ  (V, P)

(at θ_old the KL's Hessian has no term in the second derivatives of z: ∇_z KL = p_θ − p_old vanishes there).
One product is a Jacobian-vector product ``u = J v`` (the (N, V) change of the logits along v), the cheap per-row
``M u = p ⊙ u − p (pᵀu)``, and a vector-Jacobian product ``Jᵀ (M u) / N``: no second derivatives of the network.

Two ways to get ``u = J v`` (``method``):

- ``"vjp"`` (default, the fastest on CPU): the double-vjp trick. At construction, one forward at θ_old and one
  backward ``g(w) = Jᵀ w`` of the logits with a dummy cotangent ``w`` (N, V), kept with ``create_graph``;
  ``g`` is linear in ``w``, so ``J v = ∂(g(w) · v)/∂w``: one backward through that graph per product, then one
  backward through the kept forward graph for ``Jᵀ(M u)``. The graph of the first backward must be differentiable,
  so the forward runs with the math attention kernel (fused kernels have no double backward).
- ``"jvp"``: forward-mode AD (``torch.autograd.forward_ad`` dual tensors through
  ``torch.func.functional_call``): a new forward of the model per product with the tangent v (math attention
  kernel: the fused kernels have no forward-mode formula), then one backward through the forward graph kept
  from construction (which may use any attention kernel). It keeps less memory than ``"vjp"`` (no graph of a
  backward) but costs about 3 forwards per JVP.

Measured on CPU, 1 thread, float32, tiny Llama (per product; construction excluded):
hidden 64 × 2 layers, 16 × (8 + 8) tokens: double backward of the KL 14 ms, ``"vjp"`` 7.9 ms, ``"jvp"`` 15.5 ms;
hidden 256 × 4 layers, 16 × (16 + 16): 371 ms, 229 ms, 293 ms (construction: 496, 171, 57 ms).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import nn

Tensor = torch.Tensor

__all__ = ["GaussNewtonFisher", "gauss_newton_fvp", "softmax_fisher_apply", "METHODS"]

METHODS = ("vjp", "jvp")


def math_attention():
    """Scaled-dot-product attention with the composite (math) kernel, which has forward-mode and double-backward
    formulas (the fused flash / memory-efficient kernels have neither)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def softmax_fisher_apply(probs: Tensor, u: Tensor) -> Tensor:
    """``(diag(p) − p pᵀ) u`` for each row: ``p ⊙ u − p (pᵀu)``, the Fisher matrix of a categorical distribution
    in its logits (the Hessian of log-sum-exp). Shapes: ``probs``, ``u`` (..., V) → (..., V)."""
    return probs * (u - (probs * u).sum(-1, keepdim=True))


def _flat(params: Sequence[Tensor], grads: Sequence[Tensor | None], dtype: torch.dtype) -> Tensor:
    return torch.cat([(torch.zeros(p.numel(), dtype=dtype, device=p.device) if g is None else
                       g.reshape(-1).to(dtype)) for p, g in zip(params, grads)])


def _split(v: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """The flat vector v (P,) as one tensor per parameter (shape and dtype of each)."""
    total = sum(p.numel() for p in params)
    if v.shape != (total,):
        raise ValueError(f"v must have shape ({total},) (the trainable parameters), got {tuple(v.shape)}")
    out, at = [], 0
    for p in params:
        out.append(v[at:at + p.numel()].view_as(p).to(device=p.device, dtype=p.dtype))
        at += p.numel()
    return out


class _Part:
    """What one micro-batch keeps between products."""

    def __init__(self, inputs: dict[str, Tensor], logits: Tensor, probs: Tensor):
        self.inputs = inputs
        self.logits = logits  # (n, V), graph to the parameters at θ_old
        self.probs = probs  # (n, V) softmax(logits / temperature) at θ_old, float32 or float64
        self.w: Tensor | None = None  # (n, V) dummy cotangent ("vjp")
        self.jtw: list[Tensor] = []  # Jᵀw for the parameters the logits depend on ("vjp")
        self.jtw_index: list[int] = []  # their positions in params


class GaussNewtonFisher:
    """The Fisher matrix of a categorical policy at θ_old in Gauss–Newton form, applied by :meth:`fvp`::

        F v = (1/N) Σ_i J_iᵀ (diag(p_i) − p_i p_iᵀ) J_i v,   z_i = logits_i / temperature,  p_i = softmax(z_i),
        J_i = ∂z_i/∂θ,

    summed over the selected positions i of every micro-batch (and, through ``reduce``, of every process), with
    N = ``n_tokens``. At θ_old this equals the Hessian of the mean ``KL(π_old ‖ π_θ)`` (the product TRPO's
    conjugate gradient needs), without differentiating the network twice.

    Arguments:

    - ``lm``: a :class:`align.models.SelectiveLM`-like module, ``lm(input_ids, select=, attention_mask=,
      position_ids=)`` → logits (n, V) at the n selected positions (its parameters at θ_old; dropout off);
    - ``inputs_list``: micro-batches, dicts with input_ids, select, attention_mask, position_ids (B, T) as
      :func:`align.rollout.sequence_inputs` makes them;
    - ``temperature``: the sampling temperature (> 0) of the policy;
    - ``params``: the P-dimensional θ, a list of tensors of `lm` (all trainable weights, or LoRA adapters only);
      a parameter the logits do not depend on (or one not in `lm`) has a zero block;
    - ``n_tokens``: N, the number of selected positions over all micro-batches and processes;
    - ``reduce``: sums a tensor over processes (``None``: one process);
    - ``method``: ``"vjp"`` or ``"jvp"``, how J v is computed (module docstring);
    - ``autocast``: a context-manager factory wrapped around every forward (mixed precision), or ``None``.

    Construction runs one forward per micro-batch (and for ``"vjp"`` one backward with ``create_graph``) and
    keeps the graphs until :meth:`release`. Products are only valid while the parameters stay at θ_old (and
    the kept graphs refuse to run once they are modified in place). :meth:`from_logits` builds it from logits
    already computed (e.g. the forward that also gives TRPO's gradient), saving that forward.
    """

    def __init__(self, lm: nn.Module, inputs_list: Sequence[dict[str, Tensor]], temperature: float,
                 params: Sequence[Tensor], n_tokens: float, reduce: Callable[[Tensor], Tensor] | None = None, *,
                 method: str = "vjp", autocast: Callable[[], contextlib.AbstractContextManager] | None = None):
        self._setup(lm, temperature, params, n_tokens, reduce, method, autocast)
        for x in inputs_list:
            if not bool(x["select"].any()):
                continue
            # "vjp" differentiates the backward of this forward, so it needs the math kernel; "jvp" keeps it
            # for the backward only, which any kernel supports
            with self._kernel(), self.autocast():
                logits = self._forward(lm, x)
            with self._kernel():
                self._add(x, logits)

    @classmethod
    def from_logits(cls, logits_list: Sequence[Tensor], temperature: float, params: Sequence[Tensor],
                    n_tokens: float, reduce: Callable[[Tensor], Tensor] | None = None) -> "GaussNewtonFisher":
        """The ``"vjp"`` Fisher from logits (n_k, V) per micro-batch, already computed at θ_old with their graph
        to `params` (the graph must be differentiable twice: computed with the math attention kernel, e.g. in
        ``torch.nn.attention.sdpa_kernel([SDPBackend.MATH])``; any other use of it must keep
        ``retain_graph=True``). Every backward through those graphs here runs with the math kernel too (what
        a model with gradient checkpointing needs to recompute the same forward)."""
        self = cls.__new__(cls)
        self._setup(None, temperature, params, n_tokens, reduce, "vjp", None)
        for logits in logits_list:
            if logits.shape[0]:
                self._add({}, logits)
        return self

    def _setup(self, lm, temperature, params, n_tokens, reduce, method, autocast) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.lm, self.temperature, self.method = lm, float(temperature), method
        self.params = list(params)
        if not self.params:
            raise ValueError("no parameters")
        self.n_tokens = max(float(n_tokens), 1.0)
        self.reduce = reduce or (lambda t: t)
        self.autocast = autocast or contextlib.nullcontext
        self.dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        self.parts: list[_Part] = []
        self._names: list[str | None] = []
        if method == "jvp":
            names = {id(p): n for n, p in lm.named_parameters(remove_duplicate=False)}
            self._names = [names.get(id(p)) for p in self.params]  # None: not in lm, no effect on the logits

    def _kernel(self):
        """The attention kernel of the kept forward, also for every backward through it: a model with gradient
        checkpointing recomputes its forward there, which must match the first."""
        return math_attention() if self.method == "vjp" else contextlib.nullcontext()

    @staticmethod
    def _forward(lm: nn.Module, x: dict[str, Tensor], params: dict[str, Tensor] | None = None) -> Tensor:
        kw = dict(select=x["select"], attention_mask=x["attention_mask"], position_ids=x["position_ids"])
        if params is None:
            return lm(x["input_ids"], **kw)
        return torch.func.functional_call(lm, params, (x["input_ids"],), kw)

    def _add(self, x: dict[str, Tensor], logits: Tensor) -> None:
        z = logits.detach().to(self.dtype) / self.temperature
        part = _Part(x, logits, torch.softmax(z, dim=-1))
        if self.method == "vjp":
            part.w = torch.zeros_like(logits, requires_grad=True)
            jtw = torch.autograd.grad(logits, self.params, part.w, create_graph=True, allow_unused=True)
            part.jtw_index = [k for k, g in enumerate(jtw) if g is not None and g.requires_grad]
            part.jtw = [jtw[k] for k in part.jtw_index]
        self.parts.append(part)

    def _jvp(self, part: _Part, vs: list[Tensor]) -> Tensor | None:
        """u = J v (n, V), the change of the (untempered) logits along v; None when it is 0."""
        if self.method == "vjp":
            if not part.jtw:
                return None
            (u,) = torch.autograd.grad(part.jtw, part.w, [vs[k] for k in part.jtw_index], retain_graph=True,
                                       allow_unused=True)
            return u
        import torch.autograd.forward_ad as fwAD

        with math_attention(), self.autocast(), fwAD.dual_level(), torch.no_grad():
            duals = {n: fwAD.make_dual(p.detach(), t) for n, p, t in zip(self._names, self.params, vs)
                     if n is not None}
            if not duals:
                return None
            return fwAD.unpack_dual(self._forward(self.lm, part.inputs, duals)).tangent

    def fvp(self, v: Tensor) -> Tensor:
        """``F v`` (no damping; the caller adds λv). Shapes: v (P,) → (P,) float32 (float64 for a float64
        model), P the total size of ``params``; summed over micro-batches and processes."""
        vs = _split(v, self.params)
        out = torch.zeros(v.shape[0], dtype=self.dtype, device=v.device)
        for part in self.parts:
            with self._kernel():
                u = self._jvp(part, vs)
            if u is None:
                continue
            # z = logits / T: J_z = J / T, so the cotangent of the logits is M (J v) / (T² N)
            cot = softmax_fisher_apply(part.probs, u.to(self.dtype)) / (self.temperature ** 2 * self.n_tokens)
            with self._kernel():
                grads = torch.autograd.grad(part.logits, self.params, cot.to(part.logits.dtype), retain_graph=True,
                                            allow_unused=True)
            out += _flat(self.params, grads, self.dtype).to(out.device)
        return self.reduce(out)

    __call__ = fvp

    def release(self) -> None:
        """Free the kept graphs (:meth:`fvp` is unusable afterwards)."""
        self.parts = []


def gauss_newton_fvp(lm: nn.Module, inputs_list: Sequence[dict[str, Tensor]], temperature: float,
                     params: Sequence[Tensor], n_tokens: float, v: Tensor,
                     reduce: Callable[[Tensor], Tensor] | None = None, method: str = "vjp") -> Tensor:
    """One Gauss–Newton Fisher-vector product ``F v`` (P,) → (P,) at the current parameters; see
    :class:`GaussNewtonFisher` (build that once to apply F to many vectors)."""
    fisher = GaussNewtonFisher(lm, inputs_list, temperature, params, n_tokens, reduce, method=method)
    try:
        return fisher.fvp(v)
    finally:
        fisher.release()
