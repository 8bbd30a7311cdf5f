"""Log-probabilities (and entropies) of labelled positions straight from hidden states and the output head,
without ever holding the whole (N, V) logits or their gradient.

The usual path runs the head on the N selected positions, giving logits (N, V), then a log-softmax and a gather
(:func:`align.losses.token_logprobs`); with the backward that is several (N, V) float32 tensors alive at once —
for a 2048-token micro-batch and a 49k vocabulary, 400 MB each. Here the N rows are processed ``chunk`` rows at
a time:

* forward: each chunk's logits are computed, reduced to the row's logsumexp, label logit (and entropy), and
  freed; only O(N) numbers are kept;
* backward: each chunk's logits are recomputed and turned into the chunk's logit gradient, which gives that
  chunk's rows of ``grad_hidden`` and is summed over chunks into ``grad_weight`` (and ``grad_bias``).

The peak extra memory is O(chunk × V) instead of O(N × V), for one extra head matmul in the backward (4 instead
of 3). When the head needs no gradient (LoRA, a frozen head or tied embedding) the forward forms each row's
gradient w.r.t. its hidden state while the chunk's logits are at hand (one (c, V) @ (V, H) matmul, two with the
entropy) and the backward only rescales those (N, H) rows by the upstream gradients: no recomputation, the
same number of matmuls as the full path.

The logits are those of :class:`align.models.SelectiveLM` (``_final_logits``)::

    a = hidden @ weight.T + bias
    a = softcap · tanh(a / softcap)        (when softcap, Gemma's final_logit_softcapping)
    a = scale · a                          (when scale, Cohere's logit_scale)
    z = a / temperature
    logp = z[label] − logsumexp(z)         entropy = −Σ_v p_v log p_v,  p = softmax(z)

The softmax is computed in float32 per chunk (float64 for float64 inputs); the matmuls run in the inputs' dtype,
or in the autocast dtype when autocast is on (as ``nn.Linear`` would). Gradients flow to ``hidden``, ``weight``
and ``bias`` (a weight tied to the input embedding just receives its share through autograd), and through the
entropy too (its gradient costs nothing extra: the softmax is recomputed anyway). Labels < 0 give logp 0 and no
gradient (the convention of :func:`align.losses.token_logprobs`); their entropy is still computed.
"""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor

__all__ = ["chunked_logprobs", "linear_head", "head_logprobs", "whole_head_logprobs"]


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """dtype of the head matmuls: the autocast dtype when autocast is on for the device (what ``F.linear`` would
    use), else the promotion of the inputs' dtypes."""
    dev = hidden.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (RuntimeError, TypeError):  # pragma: no cover - a device type autocast does not know
        pass
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(h: Tensor, w: Tensor, b: Tensor | None, softcap: float | None, factor: float,
                  fdt: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """(z (c, V) in `fdt`, tanh(a / softcap) (c, V) or None) of one chunk. `w`, `b` are already in the matmul
    dtype; `factor` is scale / temperature."""
    a = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()
    z = a if a.dtype == fdt else a.to(fdt)
    del a
    if softcap:
        t = z.div_(softcap).tanh_()  # z is a fresh tensor: in place
        return t * (softcap * factor), t
    if factor != 1.0:
        z.mul_(factor)
    return z, None


def _dz_da(t: Tensor | None, factor: float) -> Tensor | float:
    """dz/da of z = factor · softcap · tanh(a / softcap) (or factor · a): factor (1 − tanh²), in place on t."""
    return t.square_().neg_().add_(1.0).mul_(factor) if t is not None else factor


def _chunk_forward(h: Tensor, w: Tensor, b: Tensor | None, y: Tensor, softcap: float | None, factor: float,
                   fdt: torch.dtype, with_entropy: bool, eager: bool) -> tuple[Tensor, ...]:
    """(logsumexp, label logit, entropy or None, dlogp/dh or None, dH/dh or None) of one chunk's rows.

    The last two (c, H), only when `eager` (the head needs no gradient): the per-row gradients of the log-prob
    and of the entropy w.r.t. the hidden state, so that the backward is just a rescaling by the upstream
    gradients. Its (c, V) temporaries die on return."""
    z, t = _chunk_logits(h, w, b, softcap, factor, fdt)
    picked = z.gather(-1, y).squeeze(-1)
    m = z.amax(dim=-1, keepdim=True)
    if not (with_entropy or eager):  # logsumexp in place: one (c, V) buffer
        lse = z.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))
        return lse, picked, None, None, None
    q = z.sub_(m)
    del z
    p = q.exp() if with_entropy else q.exp_()  # the entropy needs log p too, the gradient only p
    total = p.sum(-1, keepdim=True)
    log_total = total.log()
    lse = (log_total + m).squeeze(-1)
    p.div_(total)
    ent = None
    if with_entropy:
        q.sub_(log_total)  # log p, element by element (no cancellation at low entropy)
        ent = p.mul(q).sum(-1).neg_()
    if not eager:
        return lse, picked, ent, None, None
    d = _dz_da(t, factor)
    scaled = t is not None or d != 1.0
    del t
    cdt = w.dtype
    d_ent = None
    if with_entropy:  # dH/dz = −p (log p + H)
        gb = q.add_(ent.unsqueeze(-1)).mul_(p).neg_()  # q is not needed after this
        if scaled:
            gb.mul_(d)
        d_ent = (gb if gb.dtype == cdt else gb.to(cdt)) @ w
        del gb
    del q  # (the same buffer as p without the entropy)
    # dlogp/dz = onehot(y) − p
    ga = p.neg_().scatter_add_(-1, y, torch.ones(y.shape, dtype=p.dtype, device=p.device))
    if scaled:
        ga.mul_(d)
    d_lp = (ga if ga.dtype == cdt else ga.to(cdt)) @ w
    return lse, picked, ent, d_lp, d_ent


def _chunk_backward(h: Tensor, w: Tensor, b: Tensor | None, y: Tensor, lse: Tensor, ent: Tensor | None,
                    g_lp: Tensor | None, g_ent: Tensor | None, softcap: float | None, factor: float,
                    fdt: torch.dtype) -> Tensor:
    """The gradient (c, V) in `fdt` of the loss w.r.t. the chunk's head outputs ``a = h @ w.T + b``, from the
    recomputed logits."""
    z, t = _chunk_logits(h, w, b, softcap, factor, fdt)
    q = z.sub_(lse.unsqueeze(-1))  # log softmax(z), in place
    del z
    # dlogp/dz = onehot(y) − p;   dH/dz = −p (log p + H)
    if g_ent is not None:
        p = q.exp()
        g = q.add_(ent.unsqueeze(-1)).mul_(g_ent.unsqueeze(-1))
        if g_lp is not None:
            g.add_(g_lp.unsqueeze(-1))
        g.mul_(p).neg_()
        del p
    else:  # one (c, V) buffer
        g = q.exp_().mul_(g_lp.neg().unsqueeze(-1))
    if g_lp is not None:
        g.scatter_add_(-1, y, g_lp.unsqueeze(-1))
    d = _dz_da(t, factor)
    return g.mul_(d) if t is not None or d != 1.0 else g


_NO_GRADS = (None,) * 11


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                chunk: int, softcap: float | None, scale: float | None, with_entropy: bool,
                cdt: torch.dtype, eager: bool):
        ctx.set_materialize_grads(False)
        n = hidden.shape[0]
        fdt = torch.float64 if cdt == torch.float64 else torch.float32
        factor = (scale or 1.0) / temperature
        dev = hidden.device
        ignored = labels < 0
        safe = labels.clamp(min=0).unsqueeze(-1)
        lse = torch.empty(n, dtype=fdt, device=dev)
        picked = torch.empty(n, dtype=fdt, device=dev)
        ent = torch.empty(n, dtype=fdt, device=dev) if with_entropy else None
        d_lp = torch.empty(hidden.shape, dtype=cdt, device=dev) if eager else None
        d_ent = torch.empty(hidden.shape, dtype=cdt, device=dev) if eager and with_entropy else None
        with torch.autocast(dev.type, enabled=False):
            w = weight.to(cdt)
            b = bias.to(cdt) if bias is not None else None
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                out = _chunk_forward(hidden[s:e].to(cdt), w, b, safe[s:e], softcap, factor, fdt, with_entropy,
                                     eager)
                for buf, val in zip((lse, picked, ent, d_lp, d_ent), out):
                    if buf is not None:
                        buf[s:e] = val
                del out
        logp = (picked - lse).masked_fill_(ignored, 0.0)
        if eager:  # the backward needs neither the head nor the hidden states
            ctx.save_for_backward(labels, d_lp, d_ent)
        else:
            ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
        ctx.cfg = (chunk, softcap, factor, cdt, fdt, eager, hidden.dtype)
        if with_entropy:
            return logp, ent
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp: Tensor | None, g_ent: Tensor | None = None):
        chunk, softcap, factor, cdt, fdt, eager, hdt = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if (g_lp is None and g_ent is None) or not (need_h or need_w or need_b):
            return _NO_GRADS
        if eager:
            labels, d_lp, d_ent = ctx.saved_tensors
            grad_h = torch.zeros(d_lp.shape, dtype=fdt, device=d_lp.device)
            if g_lp is not None:
                grad_h.addcmul_(g_lp.to(fdt).masked_fill(labels < 0, 0.0).unsqueeze(-1), d_lp)
            if g_ent is not None:
                grad_h.addcmul_(g_ent.to(fdt).unsqueeze(-1), d_ent)
            return (grad_h.to(hdt),) + _NO_GRADS[1:]
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        n = hidden.shape[0]
        dev = hidden.device
        safe = labels.clamp(min=0).unsqueeze(-1)
        if g_lp is not None:
            g_lp = g_lp.to(fdt).masked_fill(labels < 0, 0.0)
        if g_ent is not None:
            g_ent = g_ent.to(fdt)
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if need_h else None
        # weight/bias gradients are summed over chunks in float32 (float64 for float64 inputs), rounded once
        wacc = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        grad_w = torch.zeros(weight.shape, dtype=wacc, device=dev) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=fdt, device=dev) if need_b else None
        with torch.autocast(dev.type, enabled=False):
            w = weight.to(cdt)
            b = bias.to(cdt) if bias is not None else None
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                h = hidden[s:e].to(cdt)
                ga = _chunk_backward(h, w, b, safe[s:e], lse[s:e], None if ent is None else ent[s:e],
                                     None if g_lp is None else g_lp[s:e], None if g_ent is None else g_ent[s:e],
                                     softcap, factor, fdt)
                if need_b:
                    grad_b += ga.sum(0)
                if ga.dtype != cdt:
                    ga = ga.to(cdt)
                if need_h:
                    if grad_h.dtype == cdt:
                        torch.mm(ga, w, out=grad_h[s:e])
                    else:
                        grad_h[s:e] = ga @ w
                if need_w:
                    if grad_w.dtype == cdt:
                        grad_w.addmm_(ga.t(), h)
                    else:
                        grad_w += ga.t() @ h
                del ga
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return (grad_h, grad_w, grad_b) + _NO_GRADS[3:]


def chunked_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0, chunk: int = 1024,
                     bias: Tensor | None = None, with_entropy: bool = False, softcap: float | None = None,
                     scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """(logp, entropy or None) of `labels` under ``softmax(head(hidden) / temperature)``, `chunk` rows at a time.

    Shapes: hidden (..., H), weight (V, H), bias (V,) or None, labels (...) long → logp (...) and entropy (...)
    in float32 (float64 for float64 inputs). `softcap` and `scale` are the final-logit soft-cap and logit scale
    of the model's config (``final_logit_softcapping``, ``logit_scale``), applied in that order before the
    temperature. Labels < 0 give logp 0 (no gradient). The entropy is differentiable.

    Peak extra memory is a few (chunk, V) float32 tensors (plus a (V, H) float32 gradient accumulator when the
    weight needs a gradient); the backward recomputes each chunk's logits. With grad mode on, a `hidden` that
    requires grad and a head (weight, bias) that does not, the hidden-state gradients are formed in the forward
    instead (two (N, H) buffers; nothing recomputed): call it under ``torch.no_grad()`` when no backward will
    follow."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., {hidden.shape[-1]}) does not match the head weight {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    if softcap is not None and softcap <= 0:
        softcap = None
    if scale is not None and scale == 1:
        scale = None
    lead = labels.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).long()
    cdt = _compute_dtype(hidden, weight)
    # a frozen head (LoRA, a frozen tied embedding): the hidden-state gradient is computed in the forward, from
    # the logits at hand, and the backward does not recompute them
    eager = (torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
             and (bias is None or not bias.requires_grad))
    out = _ChunkedLogprobs.apply(h2, weight, bias, y, float(temperature), int(chunk), softcap,
                                 float(scale) if scale is not None else None, bool(with_entropy), cdt, eager)
    if with_entropy:
        logp, ent = out
        return logp.reshape(lead), ent.reshape(lead)
    return out.reshape(lead), None


def linear_head(model: nn.Module) -> tuple[Tensor, Tensor | None, float | None, float | None] | None:
    """(weight, bias, softcap, scale) of a causal LM's output head when it is a plain ``nn.Linear`` (through peft
    and align's wrappers), with the soft-cap and scale ``align.models._final_logits`` applies; None when the head
    is anything else (a LoRA-wrapped or ``modules_to_save`` head, a custom module), so that callers fall back to
    running the head."""
    from .models import lm_parts, unwrap_peft

    _, head = lm_parts(model)
    if type(head) is not nn.Linear:
        return None
    cfg = unwrap_peft(model).config
    cap = getattr(cfg, "final_logit_softcapping", None) or None
    scale = getattr(cfg, "logit_scale", None)
    scale = float(scale) if scale and isinstance(scale, (int, float)) and scale != 1 else None
    return head.weight, head.bias, (float(cap) if cap else None), scale


def head_logprobs(model: nn.Module, hidden: Tensor, labels: Tensor, temperature: float = 1.0, chunk: int = 1024,
                  with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """:func:`chunked_logprobs` of a causal LM's head on selected hidden states (N, H), the same values as
    ``token_logprobs(_final_logits(model, head(hidden)), labels, temperature)``. A head that is not a plain
    linear layer is run whole (the (N, V) logits are then materialised, as before)."""
    parts = linear_head(model)
    if parts is None:
        return whole_head_logprobs(model, hidden, labels, temperature, with_entropy)
    w, b, cap, scale = parts
    return chunked_logprobs(hidden, w, labels, temperature, chunk, bias=b, with_entropy=with_entropy,
                            softcap=cap, scale=scale)


def whole_head_logprobs(model: nn.Module, hidden: Tensor, labels: Tensor, temperature: float = 1.0,
                        with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """The same as :func:`head_logprobs` the usual way: the head runs on all N rows at once and the (N, V)
    logits are materialised (small vocabularies and batches, or heads that are not a plain linear layer)."""
    from .losses import entropy_from_logits, token_logprobs
    from .models import _final_logits, lm_parts, unwrap_peft

    _, head = lm_parts(model)
    logits = _final_logits(unwrap_peft(model), head(hidden))
    ent = None
    if with_entropy:
        ent = entropy_from_logits(logits if temperature == 1.0 else logits / temperature).float()
    return token_logprobs(logits, labels, temperature).float(), ent
