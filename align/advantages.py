"""Returns and advantage estimators, as pure functions on tensors.

Shapes: ``B`` sequences, ``T`` token positions; ``N = num_groups · G`` completions for group-relative methods.

Time runs over the *valid* tokens of a row: masked positions are skipped as if deleted (they neither receive
nor pass on reward, and do not count as a time step). With the usual right padding this is simply "the episode
ends at the last valid token, and everything after it (values included) is 0"; it also makes left padding or a
masked prompt prefix harmless. Masked positions of every (B, T) output are exactly 0, and whatever the inputs
hold there is never read.
"""

from __future__ import annotations

from typing import Callable

import torch

from .losses import _valid, kl_estimate, masked_whiten

Tensor = torch.Tensor

__all__ = [
    "GROUP_ADVANTAGES",
    "PSI_ESTIMATORS",
    "SEQUENCE_BASELINES",
    "discounted_returns",
    "gae",
    "group_advantages",
    "policy_gradient_psi",
    "reward_to_go",
    "sequence_baseline",
    "td_residual",
    "zero_std_group_fraction",
]


def _reverse_scan(rewards: Tensor, mask: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """Reward-to-go at each valid position, and the total return seen from before the first valid token."""
    valid = _valid(mask)
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = torch.where(valid[:, t], rewards[:, t] + gamma * running, running)
        out[:, t] = torch.where(valid[:, t], running, torch.zeros_like(running))
    return out, running


def reward_to_go(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Discounted reward-to-go: ``G_t = Σ_{t' ≥ t} γ^{t'−t} r_{t'}`` over valid positions.

    (Ψ_t option 2 of the policy-gradient estimators, Schulman et al. 2016 §2.) Shapes: ``rewards``, ``mask``
    (B, T) → (B, T); 0 on masked positions.
    """
    return _reverse_scan(rewards, mask, gamma)[0]


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Total discounted return of each sequence: ``R = Σ_k γ^k r_k`` over its valid tokens ``k = 0, 1, …``.

    (Ψ_t option 1: the same return for every token of the sequence, as in vanilla REINFORCE.) Shapes:
    ``rewards``, ``mask`` (B, T) → (B,). Equals :func:`reward_to_go` at the first valid token.
    """
    return _reverse_scan(rewards, mask, gamma)[1]


def _next_values(values: Tensor, mask: Tensor) -> Tensor:
    """``V`` at the next valid position of each row, 0 after the last valid one. (B, T) → (B, T)."""
    valid = _valid(mask)
    out = torch.zeros_like(values)
    nxt = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        out[:, t] = nxt
        nxt = torch.where(valid[:, t], values[:, t], nxt)
    return out


def td_residual(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """One-step TD residual ``δ_t = r_t + γ V_{t+1} − V_t``, with ``V`` = 0 after the last valid token.

    Shapes: ``rewards``, ``values``, ``mask`` (B, T) → (B, T); 0 on masked positions.
    """
    valid = _valid(mask)
    delta = rewards + gamma * _next_values(values, mask) - values
    return torch.where(valid, delta, torch.zeros_like(delta))


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) and the matching value targets.

    ``A_t = Σ_{l ≥ 0} (γλ)^l δ_{t+l}``, ``δ_t = r_t + γ V_{t+1} − V_t``, computed backwards as
    ``A_t = δ_t + γλ A_{t+1}``; returns ``R_t = A_t + V_t``. The episode ends at the last valid token (``V`` and
    ``A`` after it are 0). ``λ = 1`` gives ``reward_to_go − V`` (Monte-Carlo), ``λ = 0`` gives ``δ_t``.

    Shapes: ``rewards``, ``values``, ``mask`` (B, T) → ``(advantages, returns)``, (B, T) each, 0 on masked
    positions. Not whitened: see :func:`align.losses.masked_whiten`.
    """
    valid = _valid(mask)
    zero = torch.zeros_like(rewards[:, 0])
    adv = torch.zeros_like(rewards)
    next_v, next_a = zero, zero
    for t in range(rewards.shape[1] - 1, -1, -1):
        v_t = values[:, t]
        a_t = rewards[:, t] + gamma * next_v - v_t + gamma * lam * next_a
        m_t = valid[:, t]
        adv[:, t] = torch.where(m_t, a_t, zero)
        next_v = torch.where(m_t, v_t, next_v)
        next_a = torch.where(m_t, a_t, next_a)
    returns = torch.where(valid, adv + values, torch.zeros_like(adv))
    return adv, returns


# ----------------------------------------------------------------------------------------------------------------
# Group-relative advantages (GRPO family)
# ----------------------------------------------------------------------------------------------------------------
# Each entry maps grouped rewards (num_groups, G) to advantages of the same shape.


def _zscore(r: Tensor, beta: float, eps: float, scale: str) -> Tensor:
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True) if scale == "group" else r.std()
    return centred / (std + eps)


def _mean(r: Tensor, beta: float, eps: float, scale: str) -> Tensor:
    return r - r.mean(dim=1, keepdim=True)


def _softmax(r: Tensor, beta: float, eps: float, scale: str) -> Tensor:
    # torch.softmax subtracts the row max before exponentiating, so large β·R cannot overflow.
    return torch.softmax(beta * r, dim=1) - 1.0 / r.shape[1]


def _leave_one_out(r: Tensor, beta: float, eps: float, scale: str) -> Tensor:
    g = r.shape[1]
    return r - (r.sum(dim=1, keepdim=True) - r) / (g - 1)


GROUP_ADVANTAGES: dict[str, Callable[[Tensor, float, float, str], Tensor]] = {
    "zscore": _zscore,
    "mean": _mean,
    "softmax": _softmax,
    "leave_one_out": _leave_one_out,
}

_SCALES = ("group", "batch")


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size}")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: Tensor,
    group_size: int,
    kind: str = "zscore",
    beta: float = 1.0,
    eps: float = 1e-4,
    scale: str = "group",
) -> Tensor:
    """Advantage of each completion relative to the other completions of its prompt.

    ``rewards`` (N,) holds ``N / G`` contiguous groups of ``G = group_size`` completions (rows
    ``[g·G, (g+1)·G)`` share a prompt); returns (N,) advantages, one per completion (broadcast over its tokens by
    the loss). Kinds, with ``R`` a group's rewards:

    - ``"zscore"``: ``(R_i − mean R) / (std R + eps)`` (GRPO, Shao et al. 2024, §4.1.2). ``std`` is the
      *unbiased* (Bessel, ``/(G−1)``) standard deviation, as ``torch.std`` and TRL use. ``scale="batch"``
      divides by the unbiased std of all N rewards instead of each group's (the batch-level scaling of
      Hu et al. 2025, REINFORCE++), which does not blow up small reward differences in near-constant groups.
    - ``"mean"``: ``R_i − mean R`` (Dr. GRPO, Liu et al. 2025: no std division).
    - ``"softmax"``: ``exp(β R_i) / Σ_j exp(β R_j) − 1/G`` (numerically stable; sums to 0 in each group).
    - ``"leave_one_out"``: ``R_i − 1/(G−1) Σ_{j≠i} R_j`` (RLOO, Ahmadian et al. 2024).

    ``beta`` is used by ``"softmax"`` only, ``eps`` by ``"zscore"`` only, and ``scale`` applies to ``"zscore"``
    only. A group whose rewards are all equal gets exactly 0 advantage with every kind (it carries no signal).
    """
    try:
        fn = GROUP_ADVANTAGES[kind]
    except KeyError:
        raise ValueError(
            f"unknown group advantage kind {kind!r}; valid kinds: {', '.join(GROUP_ADVANTAGES)}"
        ) from None
    if scale not in _SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid scales: {', '.join(_SCALES)}")
    if scale != "group" and kind != "zscore":
        raise ValueError(f"scale={scale!r} applies only to kind='zscore', not {kind!r}")
    r = _grouped(rewards, group_size)
    adv = fn(r, beta, eps, scale)
    # Floating-point means of equal numbers need not equal them exactly; constant groups are forced to 0.
    constant = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True))
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    return adv.reshape(-1)


def zero_std_group_fraction(rewards: Tensor, group_size: int) -> Tensor:
    """Fraction of groups whose rewards are all equal (zero std, hence zero advantage and no gradient).

    ``rewards`` (N,) in contiguous groups of ``group_size``; returns a 0-dim float tensor in [0, 1].
    """
    r = _grouped(rewards, group_size)
    return (r.amax(dim=1) == r.amin(dim=1)).float().mean()


# ----------------------------------------------------------------------------------------------------------------
# Policy-gradient Ψ_t (vanilla policy gradient / REINFORCE, and TRPO's advantage)
# ----------------------------------------------------------------------------------------------------------------
# ``g = E[Σ_t Ψ_t ∇_θ log π_θ(a_t | s_t)]`` with Ψ_t one of the estimators below (Schulman et al. 2016, §2; the
# list in our policy-optimisation notes). Each entry maps ``(rewards, mask, gamma, lam, values, baseline)`` to Ψ
# (B, T), 0 on masked positions. ``values`` (B, T) are critic values V(s_t); ``baseline`` is b(s_t), either
# (B, T) per token or (B,) per sequence (broadcast over its tokens).


def _psi_return(rewards, mask, gamma, lam, values, baseline):
    total = discounted_returns(rewards, mask, gamma)
    return torch.where(_valid(mask), total.unsqueeze(-1).expand_as(rewards), torch.zeros_like(rewards))


def _psi_reward_to_go(rewards, mask, gamma, lam, values, baseline):
    return reward_to_go(rewards, mask, gamma)


def _psi_reward_to_go_baseline(rewards, mask, gamma, lam, values, baseline):
    if baseline is None:
        raise ValueError("psi 'reward_to_go_baseline' needs a baseline (values or a per-sequence mean)")
    b = baseline.unsqueeze(-1) if baseline.dim() == rewards.dim() - 1 else baseline
    out = reward_to_go(rewards, mask, gamma) - b
    return torch.where(_valid(mask), out, torch.zeros_like(out))


def _psi_q_value(rewards, mask, gamma, lam, values, baseline):
    if values is None:
        raise ValueError("psi 'q_value' needs critic values")
    q = rewards + gamma * _next_values(values, mask)
    return torch.where(_valid(mask), q, torch.zeros_like(q))


def _psi_gae(rewards, mask, gamma, lam, values, baseline):
    if values is None:
        raise ValueError("psi 'gae' needs critic values")
    return gae(rewards, values, mask, gamma, lam)[0]


def _psi_td_residual(rewards, mask, gamma, lam, values, baseline):
    if values is None:
        raise ValueError("psi 'td_residual' needs critic values")
    return td_residual(rewards, values, mask, gamma)


PSI_ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "return": _psi_return,  # Σ_{t'} γ^{t'} r_{t'}: the whole trajectory's return at every token
    "reward_to_go": _psi_reward_to_go,  # Σ_{t' ≥ t} γ^{t'−t} r_{t'}
    "q_value": _psi_q_value,  # Q(s_t, a_t) ≈ r_t + γ V(s_{t+1}), the critic's one-step estimate
    "reward_to_go_baseline": _psi_reward_to_go_baseline,  # Σ_{t' ≥ t} γ^{t'−t} r_{t'} − b(s_t)
    "gae": _psi_gae,  # Σ_l (γλ)^l δ_{t+l}, an estimate of A^π(s_t, a_t)
    "td_residual": _psi_td_residual,  # δ_t = r_t + γ V(s_{t+1}) − V(s_t)
}


def policy_gradient_psi(
    kind: str,
    rewards: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    values: Tensor | None = None,
    baseline: Tensor | None = None,
) -> Tensor:
    """Ψ_t of the policy gradient ``g = E[Σ_t Ψ_t ∇ log π(a_t|s_t)]``, chosen by name from `PSI_ESTIMATORS`.

    - ``"return"``: ``R = Σ_k γ^k r_k`` (Monte-Carlo, the same for every token of a sequence);
    - ``"reward_to_go"``: ``G_t = Σ_{t' ≥ t} γ^{t'−t} r_{t'}`` (drops rewards earned before ``a_t``);
    - ``"q_value"``: ``Q(s_t, a_t) ≈ r_t + γ V_{t+1}`` from the critic (needs ``values``; ``V`` = 0 after the
      last valid token, so the last token's Q is its reward);
    - ``"reward_to_go_baseline"``: ``G_t − b(s_t)`` with ``baseline`` b: critic values (B, T) or a per-sequence
      mean (B,) from :func:`sequence_baseline`;
    - ``"gae"``: ``Â_t^{GAE(γ, λ)}`` (needs ``values``; λ = 1 equals ``G_t − V_t``, λ = 0 the TD residual);
    - ``"td_residual"``: ``δ_t = r_t + γ V_{t+1} − V_t`` (needs ``values``).

    Shapes: ``rewards``, ``mask``, ``values`` (B, T); ``baseline`` (B, T) or (B,) → (B, T), 0 on masked
    positions. ``lam`` is read by ``"gae"`` only, ``baseline`` by ``"reward_to_go_baseline"`` only.
    """
    try:
        fn = PSI_ESTIMATORS[kind]
    except KeyError:
        raise ValueError(f"unknown psi {kind!r}; valid: {', '.join(PSI_ESTIMATORS)}") from None
    return fn(rewards, mask, gamma, lam, values, baseline)


def _batch_mean(returns: Tensor, group_size: int) -> Tensor:
    return returns.mean().expand_as(returns)


def _group_mean(returns: Tensor, group_size: int) -> Tensor:
    return _grouped(returns, group_size).mean(dim=1, keepdim=True).expand(-1, group_size).reshape(-1)


SEQUENCE_BASELINES: dict[str, Callable[[Tensor, int], Tensor]] = {
    "batch_mean": _batch_mean,
    "group_mean": _group_mean,
}


def sequence_baseline(returns: Tensor, kind: str, group_size: int = 1) -> Tensor:
    """A per-sequence baseline b from the sequences' total returns: (N,) → (N,).

    - ``"batch_mean"``: ``b_i = mean_j R_j`` over the whole batch;
    - ``"group_mean"``: ``b_i = mean_{j ∈ g(i)} R_j`` over the ``group_size`` completions of i's prompt (rows
      ``[g·G, (g+1)·G)``), as in Dr. GRPO. Including ``R_i`` itself scales the expected gradient by
      ``(G−1)/G`` and adds no bias to its direction.

    A baseline that does not depend on the action keeps the gradient unbiased and lowers its variance.
    """
    try:
        fn = SEQUENCE_BASELINES[kind]
    except KeyError:
        raise ValueError(f"unknown baseline {kind!r}; valid: {', '.join(SEQUENCE_BASELINES)}") from None
    return fn(returns, group_size)


# ----------------------------------------------------------------------------------------------------------------
# What the RL stages feed their losses: shaped per-token rewards, PPO's advantages, Ψ and GRPO's group scaling
# ----------------------------------------------------------------------------------------------------------------


def token_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str) -> Tensor:
    """Per-token KL(π ‖ π_ref) estimate on the sampled tokens, 0 on masked positions. (B, C) → (B, C)."""
    kl = kl_estimate(logprobs, ref_logprobs, estimator)
    return torch.where(mask.bool(), kl, torch.zeros_like(kl))


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


def kl_shaped_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor | None, mask: Tensor, beta: float,
                      estimator: str) -> tuple[Tensor, Tensor | None]:
    """(per-token rewards (B, C): the score at the last token and −β·KL_t when there are reference
    log-probabilities; the per-token KL (B, C) to the reference, or None without one)."""
    if ref_logprobs is None:
        return per_token_rewards(scores, torch.zeros_like(logprobs), mask, 0.0), None
    kl = token_kl(logprobs, ref_logprobs, mask, estimator)
    return per_token_rewards(scores, kl, mask, beta), kl


def ppo_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float,
                   whiten: bool) -> tuple[Tensor, Tensor]:
    """GAE advantages (whitened over the valid tokens if asked) and value targets R_t = A_t + V_t (unwhitened).
    Shapes: (B, C) each → ((B, C), (B, C)), 0 on masked positions."""
    adv, returns = gae(rewards, values, mask, gamma, lam)
    if whiten:
        adv = masked_whiten(adv, mask)
    return adv, returns


def needs_values(psi: str, baseline: str) -> bool:
    """Whether Ψ reads critic values: q_value, gae, td_residual, and reward_to_go_baseline with baseline=value."""
    return psi in ("q_value", "gae", "td_residual") or (psi == "reward_to_go_baseline" and baseline == "value")


def psi_and_value_targets(rewards: Tensor, mask: Tensor, *, psi: str, baseline: str = "batch_mean",
                          gamma: float = 1.0, lam: float = 1.0, values: Tensor | None = None, group_size: int = 1,
                          whiten: bool = False) -> tuple[Tensor, Tensor | None]:
    """Ψ_t of every token and the critic's regression targets.

    ``baseline`` of psi=reward_to_go_baseline: ``"value"`` uses ``values`` (V(s_t) per token); ``"batch_mean"``
    and ``"group_mean"`` use :func:`sequence_baseline` of the sequences' total returns ``R = Σ_t γ^t r_t``
    (groups: rows ``[g·G, (g+1)·G)``, G = ``group_size``). Value targets (when ``values`` is given): the
    λ-returns ``A_t + V_t`` for psi=gae (as PPO), the rewards-to-go ``G_t`` otherwise (Monte-Carlo regression).
    ``whiten`` normalises Ψ to mean 0, std 1 over the valid tokens.

    Shapes: ``rewards``, ``mask``, ``values`` (B, T) → (Ψ (B, T), targets (B, T) or None), 0 where masked.
    """
    b = None
    if psi == "reward_to_go_baseline":
        b = values if baseline == "value" else sequence_baseline(discounted_returns(rewards, mask, gamma),
                                                                baseline, group_size)
    out = policy_gradient_psi(psi, rewards, mask, gamma, lam, values, b)
    targets = None
    if values is not None:
        targets = gae(rewards, values, mask, gamma, lam)[1] if psi == "gae" else reward_to_go(rewards, mask, gamma)
    if whiten:
        out = masked_whiten(out, mask)
    return out, targets


def grpo_advantages(rewards: Tensor, group_size: int, kind: str = "zscore", scale_rewards: str = "group",
                    softmax_beta: float = 1.0, eps: float = 1e-4) -> Tensor:
    """Group-relative advantage of each completion: :func:`group_advantages` with TRL's ``scale_rewards``:
    ``"group"`` divides zscore advantages by each group's std, ``"batch"`` by the std of all rewards given (pass
    the whole step's, every process's), ``"none"`` by nothing (zscore becomes ``R − mean R``, Dr. GRPO).
    ``"batch"`` applies to zscore only; the other kinds never divide by a std.

    Shapes: rewards (N,) in contiguous groups of ``group_size`` → (N,). All-equal groups get exactly 0."""
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")
    if scale_rewards == "none" and kind == "zscore":
        kind = "mean"
    scale = "batch" if scale_rewards == "batch" else "group"
    return group_advantages(rewards, group_size, kind, beta=softmax_beta, eps=eps, scale=scale)


def group_reward_std(rewards: Tensor, group_size: int) -> Tensor:
    """Mean over groups of each group's (unbiased) reward std: (N,) → 0-dim. 0 when every group is constant."""
    return rewards.view(-1, group_size).float().std(dim=1).mean()
