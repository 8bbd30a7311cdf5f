"""Pure tensor math shared by every training stage.

Nothing here knows about configs, models, tokenizers or files: each function takes tensors (and plain numbers)
and returns tensors. Shapes use these letters:

    B  batch (sequences)        T  time (tokens)        V  vocabulary

Masks are ``(B, T)`` tensors of 0/1 (bool or any numeric dtype); a non-zero entry marks a valid token. Every
masked reduction here *selects* valid entries (``torch.where``) instead of multiplying by the mask, so whatever
sits in masked positions (padding logits, 1e9, inf) never reaches a result or a gradient.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "KL_PENALTIES",
    "LOSS_TYPES",
    "POLICY_LOSSES",
    "aggregate",
    "aggregate_count",
    "bradley_terry_loss",
    "categorical_kl",
    "clipped_surrogate_loss",
    "comparison_loss",
    "entropy_from_logits",
    "explained_variance",
    "grpo_loss",
    "kl_estimate",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_gradient_loss",
    "ppo_loss",
    "register_policy_loss",
    "token_logprobs",
    "trpo_loss",
    "value_loss",
]


# ----------------------------------------------------------------------------------------------------------------
# Masked reductions
# ----------------------------------------------------------------------------------------------------------------


def _valid(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _select(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` where the mask is set, exactly 0 elsewhere (no ``0 * inf = nan`` as with ``x * mask``)."""
    return torch.where(_valid(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _count(x: Tensor, mask: Tensor, dim: int | None) -> Tensor:
    """Number of valid entries of ``x`` (mask broadcast to ``x``), as ``x``'s dtype."""
    ones = _valid(mask).expand_as(x).to(x.dtype)
    return ones.sum() if dim is None else ones.sum(dim)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of the valid entries of ``x``.

    Shapes: ``x`` (B, T), ``mask`` broadcastable to ``x``; returns a scalar (``dim=None``) or ``x`` reduced over
    ``dim``.  Equation: ``Σ_i m_i x_i``.
    """
    selected = _select(x, mask)
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of the valid entries of ``x``: ``Σ_i m_i x_i / Σ_i m_i``.

    Shapes as :func:`masked_sum`. A reduction with no valid entry returns 0 (not NaN), so an empty row or an
    all-padding micro-batch contributes nothing instead of poisoning the loss.
    """
    return masked_sum(x, mask, dim) / _count(x, mask, dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, dim: int | None = None, unbiased: bool = True) -> Tensor:
    """Variance of the valid entries of ``x``.

    ``Σ_i m_i (x_i − μ)² / (n − 1)`` with ``μ`` the masked mean and ``n = Σ_i m_i`` (``/ n`` when
    ``unbiased=False``). Shapes as :func:`masked_sum`. With fewer than two valid entries the unbiased
    denominator is clamped to 1, so one entry gives variance 0 and none gives 0.
    """
    mean = masked_mean(x, mask, dim)
    centred = x - (mean if dim is None else mean.unsqueeze(dim))
    sq = masked_sum(centred * centred, mask, dim)
    n = _count(x, mask, dim)
    return sq / ((n - 1) if unbiased else n).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten ``x`` with statistics of its valid entries only: ``(x − μ) / sqrt(σ² + eps)``.

    ``μ`` and ``σ²`` (unbiased) are taken over all valid entries of the whole tensor. With
    ``shift_mean=False`` the mean is added back (``(x − μ)/σ + μ``): only the scale changes, as PPO
    implementations do for advantages that should keep their sign balance. Shape of ``x`` is kept; masked
    positions of the result are 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _select(out, mask)


# ----------------------------------------------------------------------------------------------------------------
# Loss aggregation: one function, named modes
# ----------------------------------------------------------------------------------------------------------------


def _outer_mean(per_seq: Tensor, seq_valid: Tensor, num_items: float | Tensor | None) -> Tensor:
    """Mean over sequences that have at least one valid token (or sum / ``num_items``)."""
    total = masked_sum(per_seq, seq_valid)
    denom = _count(per_seq, seq_valid, None).clamp(min=1) if num_items is None else num_items
    return total / denom


def _token_mean(loss: Tensor, mask: Tensor, max_len: int | None, num_items) -> Tensor:
    denom = _count(loss, mask, None).clamp(min=1) if num_items is None else num_items
    return masked_sum(loss, mask) / denom


def _seq_mean_token_mean(loss: Tensor, mask: Tensor, max_len: int | None, num_items) -> Tensor:
    return _outer_mean(masked_mean(loss, mask, dim=-1), _valid(mask).any(-1), num_items)


def _seq_mean_token_sum(loss: Tensor, mask: Tensor, max_len: int | None, num_items) -> Tensor:
    return _outer_mean(masked_sum(loss, mask, dim=-1), _valid(mask).any(-1), num_items)


def _seq_mean_token_sum_norm(loss: Tensor, mask: Tensor, max_len: int | None, num_items) -> Tensor:
    norm = mask.shape[-1] if max_len is None else max_len
    return _outer_mean(masked_sum(loss, mask, dim=-1) / norm, _valid(mask).any(-1), num_items)


AGGREGATIONS: dict[str, Callable[..., Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregate(
    loss: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    max_len: int | None = None,
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss ``(B, T)`` with mask ``(B, T)`` to a scalar.

    Modes (``L`` the loss, ``m`` the mask, ``S`` the sequences with at least one valid token):

    - ``"token-mean"``: ``Σ_{b,t} m L / Σ_{b,t} m`` — every token weighs the same (DAPO).
    - ``"seq-mean-token-mean"``: ``1/|S| Σ_b (Σ_t m L / Σ_t m)`` — every sequence weighs the same (GRPO paper).
    - ``"seq-mean-token-sum"``: ``1/|S| Σ_b Σ_t m L``.
    - ``"seq-mean-token-sum-norm"``: ``1/|S| Σ_b Σ_t m L / max_len`` with a constant ``max_len`` (default
      ``T = mask.shape[1]``), free of length bias (Dr. GRPO, Liu et al. 2025, eq. 3).

    ``max_len`` is used only by ``"seq-mean-token-sum-norm"``.

    ``num_items`` replaces the outer denominator (the token count ``Σ m`` for ``"token-mean"``, ``|S|`` for the
    ``seq-mean-*`` modes) to make gradient accumulation exact. With a batch split into micro-batches, pass the
    count over the *whole* batch (all micro-batches, and all ranks when gradients are averaged across ranks
    that count is multiplied accordingly) and **sum** the micro-batch losses instead of averaging them: the sum
    then equals the loss of the whole batch. Without it, the mean of micro-batch token-means weighs a token of a
    short micro-batch more than one of a long micro-batch.
    """
    try:
        fn = AGGREGATIONS[mode]
    except KeyError:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGGREGATIONS)}") from None
    return fn(loss, mask, max_len, num_items)


# ----------------------------------------------------------------------------------------------------------------
# Log-probabilities and entropy from logits
# ----------------------------------------------------------------------------------------------------------------

_FULL_PRECISION = (torch.float32, torch.float64)


def token_logprobs(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    ``log π(y_t) = z_{t,y_t} − logsumexp_v z_{t,v}`` with ``z = logits / temperature``.

    Shapes: ``logits`` (B, T, V), ``labels`` (B, T) → (B, T). The caller aligns them (for a causal LM,
    ``logits[:, :-1]`` with ``input_ids[:, 1:]``). Labels < 0 (``-100``, ignored) give 0.

    Memory: for float32/float64 logits this is a gather minus a logsumexp, never a (B, T, V) log-softmax
    result. Half-precision logits are upcast to float32 one sequence at a time (a full-size float32 copy of a
    bf16 vocabulary projection is the largest tensor in an RL step) and the result is float32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ignored = labels < 0
    safe = labels.clamp(min=0).unsqueeze(-1)

    def rows(z: Tensor, y: Tensor) -> Tensor:
        if temperature != 1.0:
            z = z / temperature
        return z.gather(-1, y).squeeze(-1) - torch.logsumexp(z, dim=-1)

    if logits.dtype in _FULL_PRECISION:
        out = rows(logits, safe)
    else:
        out = torch.stack([rows(logits[i].float(), safe[i]) for i in range(logits.shape[0])])
    return out.masked_fill(ignored, 0.0)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` at each position: ``H = −Σ_v p_v log p_v``.

    Shapes: (B, T, V) → (B, T). Tokens with ``-inf`` logits (masked vocabulary) count as ``0·log 0 = 0``.
    Half-precision logits are upcast one sequence at a time; the result is then float32.
    """

    def rows(z: Tensor) -> Tensor:
        return torch.special.entr(torch.softmax(z, dim=-1)).sum(-1)

    if logits.dtype in _FULL_PRECISION:
        return rows(logits)
    return torch.stack([rows(logits[i].float()) for i in range(logits.shape[0])])


# ----------------------------------------------------------------------------------------------------------------
# KL estimators
# ----------------------------------------------------------------------------------------------------------------


def _kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return logp - ref_logp


def _kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return 0.5 * (logp - ref_logp) ** 2


def _kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    log_r = ref_logp - logp
    # exp(x) − x − 1 computed as expm1(x) − x: exact near x = 0 where exp(x) − 1 cancels.
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of ``KL(π ‖ π_ref)`` from tokens sampled from ``π``.

    With ``log r = log π_ref(x) − log π(x)`` (Schulman, "Approximating KL divergence", 2020):

    - ``"k1"``: ``−log r = log π − log π_ref`` — unbiased, high variance, can be negative.
    - ``"k2"``: ``½ (log r)²`` — biased (exact to second order for nearby policies), low variance, ≥ 0.
    - ``"k3"``: ``r − 1 − log r`` — unbiased and ≥ 0 (GRPO's KL term). Large ``|log r|`` makes ``r`` explode;
      callers may clamp.

    Shapes: any, elementwise (typically (B, T) → (B, T)); the caller masks and aggregates with :func:`aggregate`.
    """
    try:
        fn = KL_ESTIMATORS[kind]
    except KeyError:
        raise ValueError(f"unknown KL estimator {kind!r}; valid kinds: {', '.join(KL_ESTIMATORS)}") from None
    return fn(logp, ref_logp)


# ----------------------------------------------------------------------------------------------------------------
# Reward model loss
# ----------------------------------------------------------------------------------------------------------------


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float | None = None) -> Tensor:
    """Bradley–Terry pairwise loss per pair: ``−log σ(r_c − r_r − margin)``.

    (Ouyang et al. 2022 eq. 1; the margin as in Llama 2, Touvron et al. 2023 eq. 2.) Shapes: ``r_chosen``,
    ``r_rejected`` and ``margin`` (N,) (or broadcastable) → (N,); the caller aggregates. Computed with
    ``logsigmoid``, finite for any finite reward gap.
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


# ----------------------------------------------------------------------------------------------------------------
# Policy and value losses
# ----------------------------------------------------------------------------------------------------------------


def clipped_surrogate_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    agg: str = "token-mean",
    max_len: int | None = None,
    num_items: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017, eq. 7), negated for minimisation.

    ``L_t = −min(ρ_t A_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_t)``, ``ρ_t = exp(log π_θ − log π_old)``,
    ``ε_low = epsilon``, ``ε_high = epsilon_high`` (default ``epsilon``; a larger one is DAPO's clip-higher),
    aggregated with :func:`aggregate` (``agg``, ``max_len``, ``num_items``).

    Shapes: ``logp``, ``old_logp``, ``mask`` (B, T); ``advantages`` (B, T) per token or (B,) per sequence
    (broadcast over T). Returns ``(loss, stats)``: ``loss`` a scalar; ``stats`` detached 0-dim tensors over
    valid tokens:

    - ``clip_frac``: fraction of tokens whose clipped term is the active (strictly larger) one, i.e. tokens
      whose gradient is zero because of clipping.
    - ``approx_kl``: mean of the k3 estimator ``(ρ − 1) − log ρ``, an unbiased, non-negative estimate of
      ``KL(π_old ‖ π_θ)`` from tokens sampled by ``π_old``.
    - ``ratio_mean``: mean of ``ρ``.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    # Zero the log-ratio on masked positions before exp: garbage there can neither overflow nor produce NaN
    # gradients through the unselected branch of a later torch.where.
    log_ratio = _select(logp - old_logp, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - epsilon, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    loss = aggregate(per_token, mask, agg, max_len=max_len, num_items=num_items)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float | None = None,
    agg: str = "token-mean",
    max_len: int | None = None,
    num_items: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Value-function loss, optionally clipped around the rollout values (PPO as in OpenAI baselines).

    Unclipped: ``½ (V − R)²``. With ``clip_range = c``:
    ``½ max((V − R)², (clip(V, V_old − c, V_old + c) − R)²)``. Aggregated with :func:`aggregate`.

    Shapes: ``values``, ``old_values``, ``returns``, ``mask`` (B, T). Returns ``(loss, stats)`` with
    ``stats["vf_clip_frac"]`` (detached): fraction of valid tokens where the clipped term is strictly larger,
    i.e. whose gradient is cut by clipping (0 without ``clip_range``).
    """
    err = _select(values - returns, mask)
    sq = err * err
    if clip_range is None:
        per_token = 0.5 * sq
        clip_frac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        err_clipped = _select(v_clipped - returns, mask)
        sq_clipped = err_clipped * err_clipped
        per_token = 0.5 * torch.maximum(sq, sq_clipped)
        with torch.no_grad():
            clip_frac = masked_mean((sq_clipped > sq).to(values.dtype), mask)
    loss = aggregate(per_token, mask, agg, max_len=max_len, num_items=num_items)
    return loss, {"vf_clip_frac": clip_frac.detach()}


@torch.no_grad()
def explained_variance(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Explained variance of ``pred`` for ``target`` over valid entries: ``1 − Var[R − V] / Var[R]``.

    1 is a perfect value function, 0 no better than a constant, < 0 worse. Shapes: (B, T) each; returns a
    detached 0-dim tensor, NaN when ``target`` has zero variance (undefined).
    """
    var_target = masked_var(target, mask, unbiased=False)
    var_resid = masked_var(target - pred, mask, unbiased=False)
    nan = torch.full_like(var_target, float("nan"))
    return torch.where(var_target > 0, 1.0 - var_resid / var_target, nan)


# ----------------------------------------------------------------------------------------------------------------
# Vanilla policy gradient and the exact KL between categorical distributions (REINFORCE, TRPO)
# ----------------------------------------------------------------------------------------------------------------


def policy_gradient_loss(
    logp: Tensor,
    psi: Tensor,
    mask: Tensor,
    agg: str = "seq-mean-token-sum",
    max_len: int | None = None,
    num_items: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Vanilla policy-gradient (REINFORCE) loss, whose gradient is minus ``g = E[Σ_t Ψ_t ∇ log π(a_t|s_t)]``.

    ``L = −agg(Ψ_t · log π_θ(a_t|s_t))`` with Ψ held constant (Williams 1992; Ψ from
    :func:`align.advantages.policy_gradient_psi`). The default ``"seq-mean-token-sum"`` is the textbook estimator:
    a sum over each trajectory's tokens, a mean over trajectories. ``agg``, ``max_len`` and ``num_items`` as in
    :func:`aggregate`.

    Shapes: ``logp``, ``mask`` (B, T); ``psi`` (B, T) or (B,) per sequence (broadcast over T). Returns ``(loss,
    stats)`` with detached ``psi_mean`` and ``psi_std`` over valid tokens.
    """
    if psi.dim() == logp.dim() - 1:
        psi = psi.unsqueeze(-1).expand_as(logp)
    psi = _select(psi.detach(), mask)
    loss = aggregate(-psi * _select(logp, mask), mask, agg, max_len=max_len, num_items=num_items)
    with torch.no_grad():
        stats = {"psi_mean": masked_mean(psi, mask),
                 "psi_std": masked_var(psi, mask, unbiased=False).clamp(min=0).sqrt()}
    return loss, stats


def categorical_kl(old_logprobs: Tensor, logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Exact ``KL(π_old ‖ π_θ)`` between the full next-token distributions at each position.

    ``KL = Σ_v π_old(v) (log π_old(v) − log π_θ(v))`` with ``π_θ = softmax(logits / temperature)`` and
    ``old_logprobs`` = ``log π_old`` (already normalised, at the same temperature). Its Hessian in θ at
    ``θ = θ_old`` is the Fisher information matrix of the policy at that state (TRPO, Schulman et al. 2015,
    appendix C), and its gradient there is 0.

    Shapes: ``old_logprobs``, ``logits`` (..., V) → (...). Computed in float32 at least. Tokens with
    ``π_old(v) = 0`` contribute exactly 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits.float() if logits.dtype not in _FULL_PRECISION else logits
    if temperature != 1.0:
        z = z / temperature
    old = old_logprobs.float() if old_logprobs.dtype not in _FULL_PRECISION else old_logprobs
    logp = torch.log_softmax(z, dim=-1)
    p_old = old.exp()
    return torch.where(p_old > 0, p_old * (old - logp), torch.zeros((), dtype=logp.dtype, device=logp.device)).sum(-1)


def aggregate_count(mask: Tensor, mode: str = "token-mean") -> Tensor:
    """The outer denominator :func:`aggregate` uses for ``mode`` without ``num_items``, unclamped: the number of
    valid tokens for ``"token-mean"``, of sequences with at least one valid token for the ``seq-mean-*`` modes.

    Summed over the micro-batches (and processes) of a batch, it is the ``num_items`` that makes accumulated
    losses equal the whole batch's. Shapes: (B, T) → 0-dim float32 tensor."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGGREGATIONS)}")
    valid = _valid(mask)
    return (valid.sum() if mode == "token-mean" else valid.any(-1).sum()).float()


# ----------------------------------------------------------------------------------------------------------------
# Comparisons (reward models)
# ----------------------------------------------------------------------------------------------------------------


def comparison_loss(rewards: Tensor, better: Tensor, worse: Tensor, margins: Tensor, pair_group: Tensor,
                    response_group: Tensor, num_groups: int, center_coef: float = 0.0) -> tuple[Tensor, Tensor]:
    """Summed Bradley–Terry loss of a batch of comparisons, each comparison (prompt) weighing the same.

    With r the rewards of the batch's distinct responses, P_g the (better c, worse w) pairs of comparison g
    and R_g its responses:

        L = Σ_g [ 1/|P_g| Σ_{(c,w)∈P_g} −log σ(r_c − r_w − m_cw)  +  λ · 1/|R_g| Σ_{i∈R_g} r_i² ]

    (Ouyang et al. 2022 eq. 1 averages the K(K−1)/2 pairs of a prompt the same way; the margin is Llama 2's;
    the second term, λ = ``center_coef``, is reward centring: a penalty on the mean squared reward that keeps
    rewards near zero. For a pair it is λ(r_c² + r_w²)/2; TRL's ``center_rewards_coefficient`` penalises
    (r_c + r_w)² instead, the offset only.) Returns the SUM over groups (the caller divides by the global
    number of comparisons) and the per-pair BT losses (P,).

    Shapes: ``rewards`` (N,), ``response_group`` (N,) long in [0, G); ``better``, ``worse`` (P,) long indices
    into ``rewards``; ``margins`` (P,); ``pair_group`` (P,) long in [0, G). Every group has at least one pair.
    """
    per_pair = bradley_terry_loss(rewards[better], rewards[worse], margins)
    pairs_per_group = torch.bincount(pair_group, minlength=num_groups).to(rewards.dtype)
    loss = (per_pair / pairs_per_group[pair_group]).sum()
    if center_coef:
        resp_per_group = torch.bincount(response_group, minlength=num_groups).to(rewards.dtype)
        loss = loss + center_coef * (rewards.pow(2) / resp_per_group[response_group]).sum()
    return loss, per_pair


# ----------------------------------------------------------------------------------------------------------------
# Policy objectives: one table, one entry per algorithm
# ----------------------------------------------------------------------------------------------------------------
#
# Each entry is a pure function ``(logp, old_logp, advantages, mask, *, ...) -> (loss, detached stats)`` whose
# loss is minimised; the RL stages look theirs up here by name (``POLICY_LOSSES["ppo"]``), so a new objective is
# one registered function, not a branch inside a trainer.

POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {}


def register_policy_loss(name: str):
    """Decorator: add a policy objective to :data:`POLICY_LOSSES` under ``name``."""

    def add(fn):
        POLICY_LOSSES[name] = fn
        return fn

    return add


register_policy_loss("reinforce")(policy_gradient_loss)

# GRPO's loss_type -> aggregation mode of :func:`aggregate`. TRL's names: "dapo" normalises by the valid tokens of
# the whole step's batch (all micro-batches and processes: our token-mean with num_items); "grpo" averages each
# sequence's token mean; "dr_grpo" sums each sequence's tokens and divides by the constant max_new_tokens.
LOSS_TYPES: dict[str, str] = {"dapo": "token-mean", "grpo": "seq-mean-token-mean",
                              "dr_grpo": "seq-mean-token-sum-norm", **{m: m for m in AGGREGATIONS}}


def _kl_to_ref(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, estimator: str) -> Tensor:
    # KL(π_θ ‖ π_ref) on tokens sampled by π_old (≈ π_θ within a step), as GRPO's loss term
    return kl_estimate(logp, ref_logp, estimator)


def _kl_to_old(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, estimator: str) -> Tensor:
    # KL(π_old ‖ π_θ) on tokens sampled by π_old: the PPO paper's penalty (Schulman et al. 2017, eq. 8)
    return kl_estimate(old_logp, logp, estimator)


# kl_to -> per-token KL term of an objective: (logp, old_logp, ref_logp, estimator) -> (B, T)
KL_PENALTIES: dict[str, Callable[[Tensor, Tensor, Tensor | None, str], Tensor]] = {
    "ref": _kl_to_ref,
    "old": _kl_to_old,
}


@register_policy_loss("ppo")
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
    (see :func:`aggregate`) for exact gradient accumulation.

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


@register_policy_loss("grpo")
def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, epsilon: float = 0.2,
              epsilon_high: float | None = None, agg: str = "token-mean", max_len: int | None = None,
              num_items: float | Tensor | None = None, beta: float = 0.0, ref_logp: Tensor | None = None,
              kl_estimator: str = "k3") -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO objective (DeepSeekMath eq. 3 with our aggregation modes), negated for minimisation.

    ``L = agg_t(−min(ρ_t Â, clip(ρ_t, 1 − ε, 1 + ε_high) Â) + β · KL_t)``, ``ρ_t = exp(log π_θ − log π_old)``,
    ``KL_t`` the per-token estimator ``kl_estimator`` of KL(π_θ ‖ π_ref) (k3: ``π_ref/π_θ − log(π_ref/π_θ) − 1``,
    eq. 4). The KL term is aggregated like the surrogate (as TRL does). ``agg``, ``max_len`` and ``num_items``
    as in :func:`aggregate`.

    Shapes: logp, old_logp, mask, ref_logp (B, T); advantages (B,) per completion. Returns (loss, detached
    stats: policy_loss, clip_frac, approx_kl, ratio_mean, and kl_penalty when beta > 0)."""
    pg, stats = clipped_surrogate_loss(logp, old_logp, advantages, mask, epsilon=epsilon,
                                       epsilon_high=epsilon_high, agg=agg, max_len=max_len, num_items=num_items)
    stats = {"policy_loss": pg.detach(), **stats}
    loss = pg
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = aggregate(kl_estimate(logp, ref_logp, kl_estimator), mask, agg, max_len=max_len, num_items=num_items)
        loss = loss + beta * kl
        stats["kl_penalty"] = kl.detach()
    return loss, stats


@register_policy_loss("trpo")
def trpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, agg: str = "token-mean",
              num_items: float | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Minus TRPO's surrogate objective ``L(θ) = agg(ρ_t Â_t)``, ``ρ_t = π_θ(a_t|s_t) / π_old(a_t|s_t)``
    (Schulman et al. 2015 eq. 14): PPO's objective without clipping. Shapes: (B, T) each → (scalar, stats)."""
    return clipped_surrogate_loss(logp, old_logp, advantages, mask, epsilon=math.inf, agg=agg, num_items=num_items)


# ----------------------------------------------------------------------------------------------------------------
# Direct preference optimisation: one table, one entry per loss (TRL's names)
# ----------------------------------------------------------------------------------------------------------------
#
# Each entry maps the log-probabilities of P (chosen, rejected) pairs to per-pair losses and implicit rewards:
#
#     fn(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, *, beta, label_smoothing, gamma,
#        margin) -> (loss (P,), chosen_reward (P,), rejected_reward (P,))
#
# ``chosen``/``rejected`` are log π_θ(y|x) summed over each response's tokens (P,), ``ref_*`` the same under the
# frozen reference π_ref (ignored by the reference-free losses, zeros for ``reference_free``), ``*_len`` the token
# counts (P,) (for the length-normalised losses). ``margin`` (P,) or None: a per-pair offset m subtracted from the
# argument of the preference term (ODPO, Amini et al. 2024; the RM stage's margin). With
# h = (log π_θ(y_c) − log π_ref(y_c)) − (log π_θ(y_r) − log π_ref(y_r)) the DPO log-ratio difference, the
# reward of a response is β·(log π_θ(y) − log π_ref(y)) (its average-per-token log-probability scaled by β for
# simpo and orpo), as TRL logs it. All are finite for finite inputs (logsigmoid, no log of a sigmoid).

__all__ += ["DPO_LOSSES", "REFERENCE_FREE_DPO_LOSSES", "dpo_args_problem", "dpo_loss", "register_dpo_loss"]

DPO_LOSSES: dict[str, Callable[..., tuple[Tensor, Tensor, Tensor]]] = {}
REFERENCE_FREE_DPO_LOSSES: set[str] = set()


def register_dpo_loss(name: str, reference_free: bool = False):
    """Decorator: add a preference loss to :data:`DPO_LOSSES` under ``name`` (``reference_free``: it never reads
    reference log-probabilities, so no reference model is loaded)."""

    def add(fn):
        DPO_LOSSES[name] = fn
        if reference_free:
            REFERENCE_FREE_DPO_LOSSES.add(name)
        return fn

    return add


def _offset(z: Tensor, margin: Tensor | None) -> Tensor:
    return z if margin is None else z - margin


def _smoothed_logistic(z: Tensor, label_smoothing: float) -> Tensor:
    """−(1−ε) log σ(z) − ε log σ(−z): the logistic loss of a label that is flipped with probability ε."""
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


@register_dpo_loss("sigmoid")
def dpo_sigmoid_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                     chosen_len: Tensor, rejected_len: Tensor, *, beta: float, label_smoothing: float = 0.0,
                     gamma: float = 0.0, margin: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7): ``L = −log σ(β·h − m)``; with label smoothing ε, conservative DPO
    (cDPO, Mitchell 2023): ``−(1−ε) log σ(β·h − m) − ε log σ(−(β·h − m))``. Shapes: (P,) each → (P,) × 3."""
    rc, rr = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    return _smoothed_logistic(_offset(rc - rr, margin), label_smoothing), rc, rr


@register_dpo_loss("robust")
def dpo_robust_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                    chosen_len: Tensor, rejected_len: Tensor, *, beta: float, label_smoothing: float = 0.0,
                    gamma: float = 0.0, margin: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Robust DPO (Chowdhury et al. 2024, eq. 9), an unbiased loss under labels flipped with probability
    ε < ½: ``L = (−(1−ε) log σ(z) + ε log σ(−z)) / (1 − 2ε)``, ``z = β·h − m``; ε = 0 is DPO. Shapes as
    :func:`dpo_sigmoid_loss`."""
    rc, rr = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    z = _offset(rc - rr, margin)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps), rc, rr


@register_dpo_loss("hinge")
def dpo_hinge_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                   chosen_len: Tensor, rejected_len: Tensor, *, beta: float, label_smoothing: float = 0.0,
                   gamma: float = 0.0, margin: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SLiC's calibration loss on the DPO log-ratios (Zhao et al. 2023, eq. 1 with π_ref; TRL's "hinge"):
    ``L = max(0, 1 − (β·h − m))``; 1/β is the margin the log-ratio difference must reach. Shapes as
    :func:`dpo_sigmoid_loss`."""
    rc, rr = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    return torch.relu(1 - _offset(rc - rr, margin)), rc, rr


@register_dpo_loss("ipo")
def dpo_ipo_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                 chosen_len: Tensor, rejected_len: Tensor, *, beta: float, label_smoothing: float = 0.0,
                 gamma: float = 0.0, margin: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al. 2023, eq. 17), τ = β: ``L = (h̄ − (½ + m)/τ)²`` with h̄ the log-ratio difference of
    average-per-token log-probabilities (as TRL, confirmed with the authors); it regresses h̄ to 1/(2τ) instead
    of pushing it to infinity. Shapes as :func:`dpo_sigmoid_loss`."""
    rc, rr = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    h_bar = (chosen - ref_chosen) / chosen_len.clamp(min=1) - (rejected - ref_rejected) / rejected_len.clamp(min=1)
    target = 0.5 / beta if margin is None else (0.5 + margin) / beta
    return (h_bar - target) ** 2, rc, rr


@register_dpo_loss("simpo", reference_free=True)
def simpo_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
               chosen_len: Tensor, rejected_len: Tensor, *, beta: float, label_smoothing: float = 0.0,
               gamma: float = 0.0, margin: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024, eq. 6): no reference; the reward is the length-normalised log-probability
    ``r = β/|y| · log π_θ(y|x)`` and ``L = −log σ(r_c − r_r − γ − m)`` (label smoothing as in cDPO, like TRL's
    CPOTrainer). Shapes as :func:`dpo_sigmoid_loss`."""
    rc, rr = beta * chosen / chosen_len.clamp(min=1), beta * rejected / rejected_len.clamp(min=1)
    return _smoothed_logistic(_offset(rc - rr - gamma, margin), label_smoothing), rc, rr


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, accurate at both ends (Mächler 2012); x is clamped to ≤ −1e-6 so that a
    response of probability 1 (in float32) has finite odds."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@register_dpo_loss("orpo", reference_free=True)
def orpo_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
              chosen_len: Tensor, rejected_len: Tensor, *, beta: float, label_smoothing: float = 0.0,
              gamma: float = 0.0, margin: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO (Hong et al. 2024, eqs. 6-7): the chosen response's SFT loss plus λ = β times the odds-ratio term,
    no reference: with p = exp(log π_θ(y|x)/|y|) the average-per-token likelihood and odds(y) = p/(1 − p),
    ``L = −log π_θ(y_c|x)/|y_c| − λ log σ(log odds(y_c) − log odds(y_r) − m)``. Rewards β·log p (TRL's).
    Shapes as :func:`dpo_sigmoid_loss`."""
    ac, ar = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
    log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
    return -ac - beta * F.logsigmoid(_offset(log_odds, margin)), beta * ac, beta * ar


def dpo_args_problem(loss_type: str, beta: float, label_smoothing: float) -> str | None:
    """Why (loss_type, beta, label_smoothing) cannot train, as one line, or None when they can."""
    if loss_type not in DPO_LOSSES:
        return f"loss_type {loss_type!r} is not one of {', '.join(DPO_LOSSES)}"
    if beta <= 0:
        return f"beta must be > 0, got {beta}"
    if not 0 <= label_smoothing < 0.5:
        return f"label_smoothing must be in [0, 0.5), got {label_smoothing}"
    if label_smoothing and loss_type not in ("sigmoid", "robust", "simpo"):
        return f"label_smoothing applies to loss_type sigmoid, robust and simpo, not {loss_type}"
    return None


def dpo_loss(loss_type: str, logps: Tensor, ref_logps: Tensor, lengths: Tensor, better: Tensor, worse: Tensor,
             pair_group: Tensor, num_groups: int, *, beta: float, label_smoothing: float = 0.0,
             gamma: float = 0.0, margins: Tensor | None = None, rpo_alpha: float = 0.0
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """Summed preference loss of a batch of comparisons, each comparison (prompt) weighing the same:

        L = Σ_g 1/|P_g| Σ_{(c,r)∈P_g} [ ℓ(c, r) + α · (−log π_θ(y_c|x) / |y_c|) ]

    with ℓ = ``DPO_LOSSES[loss_type]`` and α = ``rpo_alpha`` (RPO, Pang et al. 2024: the chosen response's
    average token NLL). A ranked list's K(K−1)/2 pairs share one comparison's weight, as in
    :func:`comparison_loss`. Returns the SUM over groups (the caller divides by the global number of
    comparisons) and detached per-pair tensors (P,): loss, rewards_chosen, rewards_rejected, logps_chosen,
    logps_rejected, nll (the chosen response's average token NLL).

    Shapes: ``logps``, ``ref_logps`` (N,) summed log-probabilities of the batch's N responses (policy and
    reference); ``lengths`` (N,) their token counts; ``better``, ``worse``, ``pair_group`` (P,) long (indices
    into the responses; the comparison of each pair, in [0, G)); ``margins`` (P,) or None."""
    lengths = lengths.to(logps.dtype)
    c, r = logps[better], logps[worse]
    per_pair, rc, rr = DPO_LOSSES[loss_type](c, r, ref_logps[better], ref_logps[worse], lengths[better],
                                             lengths[worse], beta=beta, label_smoothing=label_smoothing,
                                             gamma=gamma, margin=margins)
    nll = -c / lengths[better].clamp(min=1)
    total = per_pair + rpo_alpha * nll if rpo_alpha else per_pair
    pairs_per_group = torch.bincount(pair_group, minlength=num_groups).to(logps.dtype)
    loss = (total / pairs_per_group[pair_group]).sum()
    stats = {"loss": total.detach(), "rewards_chosen": rc.detach(), "rewards_rejected": rr.detach(),
             "logps_chosen": c.detach(), "logps_rejected": r.detach(), "nll": nll.detach()}
    return loss, stats
