"""Tests for align.losses: hand-computed values (arithmetic in comments), loop oracles, masking invariance."""

import math

import pytest
import torch
import torch.nn.functional as F

from align.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    aggregate,
    bradley_terry_loss,
    clipped_surrogate_loss,
    entropy_from_logits,
    explained_variance,
    kl_estimate,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    token_logprobs,
    value_loss,
)

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def with_garbage(x, mask, value=1e9):
    return torch.where(mask.bool(), x, torch.full_like(x, value))


def random_mask(b, tt, gen, min_len=0):
    """Right-padded mask with lengths in [min_len, tt]."""
    lengths = torch.randint(min_len, tt + 1, (b,), generator=gen)
    return (torch.arange(tt)[None, :] < lengths[:, None]).to(D)


# -------------------------------------------------------------------------------------------------- masked stats

X = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
M = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]  # valid entries: 1, 2, 4


def test_masked_sum_mean_by_hand():
    x, m = t(X), t(M)
    close(masked_sum(x, m), 7.0)  # 1 + 2 + 4
    close(masked_mean(x, m), 7.0 / 3.0)  # 7 / 3 valid entries
    close(masked_sum(x, m, dim=-1), [3.0, 4.0])  # 1+2, 4
    close(masked_mean(x, m, dim=-1), [1.5, 4.0])  # 3/2, 4/1
    close(masked_mean(x, m, dim=0), [2.5, 2.0, 0.0])  # (1+4)/2, 2/1, no valid entry -> 0


def test_masked_var_by_hand():
    x, m = t(X), t(M)
    # mean 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9 = 14/3
    close(masked_var(x, m), (14.0 / 3.0) / 2.0)  # unbiased: / (3 - 1) = 7/3
    close(masked_var(x, m, unbiased=False), (14.0 / 3.0) / 3.0)  # biased: / 3 = 14/9
    # per row: row 0 {1, 2}: mean 1.5, squares 0.25 + 0.25 = 0.5, / (2-1) = 0.5; row 1 {4}: one entry -> 0
    close(masked_var(x, m, dim=-1), [0.5, 0.0])


def test_masked_stats_ignore_garbage_and_match_torch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=gen, dtype=D)
    m = random_mask(4, 7, gen, min_len=1)
    valid = x[m.bool()]
    g = with_garbage(x, m)
    close(masked_sum(g, m), valid.sum())
    close(masked_mean(g, m), valid.mean())
    close(masked_var(g, m), valid.var())  # torch.var is unbiased
    close(masked_var(g, m, unbiased=False), valid.var(unbiased=False))
    for b in range(4):
        row = x[b][m[b].bool()]
        close(masked_mean(g, m, dim=-1)[b], row.mean())
    # bool mask gives the same as a float mask
    close(masked_mean(g, m.bool()), valid.mean())


def test_masked_whiten():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, generator=gen, dtype=D) * 3 + 2
    m = random_mask(3, 6, gen, min_len=2)
    valid = x[m.bool()]
    out = masked_whiten(with_garbage(x, m), m, eps=0.0)
    close(out[m.bool()], (valid - valid.mean()) / valid.std())
    assert torch.all(out[~m.bool()] == 0)
    out = masked_whiten(with_garbage(x, m), m, shift_mean=False, eps=0.0)
    close(out[m.bool()], (valid - valid.mean()) / valid.std() + valid.mean())
    # hand case on X/M: (x - 7/3) / sqrt(7/3)
    w = masked_whiten(t(X), t(M), eps=0.0)
    s = math.sqrt(7.0 / 3.0)
    close(w, [[(1 - 7 / 3) / s, (2 - 7 / 3) / s, 0.0], [(4 - 7 / 3) / s, 0.0, 0.0]])


# ---------------------------------------------------------------------------------------------------- aggregate

LOSS = [[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]]
LMASK = [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]  # row 2 empty: ignored


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", (1 + 2 + 3 + 10 + 20) / 5),  # 36 / 5 = 7.2
        ("seq-mean-token-mean", (6 / 3 + 30 / 2) / 2),  # (2 + 15) / 2 = 8.5
        ("seq-mean-token-sum", (6 + 30) / 2),  # 18
        ("seq-mean-token-sum-norm", (6 / 4 + 30 / 4) / 2),  # T = 4: (1.5 + 7.5) / 2 = 4.5
    ],
)
def test_aggregate_by_hand(mode, expected):
    close(aggregate(t(LOSS), t(LMASK), mode), expected)


def test_aggregate_sum_norm_custom_max_len():
    # (6/10 + 30/10) / 2 = (0.6 + 3.0) / 2 = 1.8
    close(aggregate(t(LOSS), t(LMASK), "seq-mean-token-sum-norm", max_len=10), 1.8)


def slow_aggregate(loss, mask, mode, max_len=None):
    """Obviously correct python loops over rows and tokens."""
    rows = []
    for b in range(loss.shape[0]):
        vals = [loss[b, i].item() for i in range(loss.shape[1]) if mask[b, i] != 0]
        if vals:
            rows.append(vals)
    if mode == "token-mean":
        flat = [v for r in rows for v in r]
        return sum(flat) / len(flat)
    if mode == "seq-mean-token-mean":
        per = [sum(r) / len(r) for r in rows]
    elif mode == "seq-mean-token-sum":
        per = [sum(r) for r in rows]
    else:
        norm = loss.shape[1] if max_len is None else max_len
        per = [sum(r) / norm for r in rows]
    return sum(per) / len(per)


@pytest.mark.parametrize("mode", list(AGGREGATIONS))
def test_aggregate_matches_loop_oracle_and_ignores_garbage(mode):
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        loss = torch.randn(5, 9, generator=gen, dtype=D)
        mask = random_mask(5, 9, gen)
        mask[0, 0] = 1.0  # at least one valid token
        expected = slow_aggregate(loss, mask, mode)
        close(aggregate(loss, mask, mode), expected)
        close(aggregate(with_garbage(loss, mask), mask, mode), expected)
        close(aggregate(loss, mask, mode, max_len=13), slow_aggregate(loss, mask, mode, max_len=13))


@pytest.mark.parametrize("mode", list(AGGREGATIONS))
def test_aggregate_gradient_zero_and_finite_on_masked(mode):
    gen = torch.Generator().manual_seed(3)
    mask = random_mask(4, 6, gen, min_len=1)
    loss = with_garbage(torch.randn(4, 6, generator=gen, dtype=D), mask).requires_grad_()
    aggregate(loss, mask, mode).backward()
    assert torch.isfinite(loss.grad).all()
    assert torch.all(loss.grad[~mask.bool()] == 0)


@pytest.mark.parametrize("mode", list(AGGREGATIONS))
def test_aggregate_num_items_makes_microbatches_exact(mode):
    # Sum of micro-batch losses, each normalised by the whole batch's count, equals the whole-batch loss.
    gen = torch.Generator().manual_seed(4)
    loss = torch.randn(6, 5, generator=gen, dtype=D)
    mask = random_mask(6, 5, gen, min_len=1)
    whole = aggregate(loss, mask, mode)
    n = mask.sum() if mode == "token-mean" else (mask.sum(-1) > 0).sum().to(D)
    shards = [(loss[:2], mask[:2]), (loss[2:3], mask[2:3]), (loss[3:], mask[3:])]
    total = sum(aggregate(lo, ma, mode, num_items=n) for lo, ma in shards)
    close(total, whole)


def test_aggregate_token_mean_without_num_items_is_biased_across_microbatches():
    # Shard A: one token of loss 1; shard B: three tokens of loss 3.
    # Whole batch token-mean: (1 + 9) / 4 = 2.5; mean of shard means: (1 + 3) / 2 = 2.0 -> differ.
    loss = t([[1.0, 0.0, 0.0], [3.0, 3.0, 3.0]])
    mask = t([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    close(aggregate(loss, mask, "token-mean"), 2.5)
    shard_mean = (aggregate(loss[:1], mask[:1]) + aggregate(loss[1:], mask[1:])) / 2
    close(shard_mean, 2.0)
    exact = aggregate(loss[:1], mask[:1], num_items=4) + aggregate(loss[1:], mask[1:], num_items=4)
    close(exact, 2.5)  # 1/4 + 9/4


def test_aggregate_unknown_mode_names_valid_ones():
    with pytest.raises(ValueError, match="token-mean.*seq-mean-token-mean"):
        aggregate(t(LOSS), t(LMASK), "sum")


def test_aggregate_all_masked_is_zero():
    close(aggregate(t(LOSS), torch.zeros(3, 4, dtype=D), "token-mean"), 0.0)
    close(aggregate(t(LOSS), torch.zeros(3, 4, dtype=D), "seq-mean-token-mean"), 0.0)


# ------------------------------------------------------------------------------------------- logprobs / entropy


def test_token_logprobs_by_hand():
    # logits [0, ln 2, ln 5] -> softmax = [1, 2, 5] / 8; label 2 -> ln(5/8) = -0.4700036; label 0 -> ln(1/8)
    logits = t([[[0.0, math.log(2), math.log(5)], [0.0, math.log(2), math.log(5)]]])
    labels = torch.tensor([[2, 0]])
    close(token_logprobs(logits, labels), [[math.log(5 / 8), math.log(1 / 8)]])
    close(token_logprobs(logits, labels)[0, 0], -0.4700036, atol=1e-7)
    # temperature 2 on logits [0, 2 ln 2, 2 ln 5] gives the same softmax [1, 2, 5] / 8
    close(token_logprobs(2 * logits, labels, temperature=2.0), [[math.log(5 / 8), math.log(1 / 8)]])


def test_token_logprobs_matches_log_softmax_gather():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 11, generator=gen, dtype=D) * 4
    labels = torch.randint(0, 11, (3, 4), generator=gen)
    ref = F.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    close(token_logprobs(logits, labels), ref)
    ref_t = F.log_softmax(logits / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    close(token_logprobs(logits, labels, temperature=0.7), ref_t)
    # float32 path
    out32 = token_logprobs(logits.float(), labels, temperature=0.7)
    assert out32.dtype == torch.float32
    close(out32, ref_t.float(), atol=1e-5)


def test_token_logprobs_bf16_upcasts_per_row_and_ignores_negative_labels():
    gen = torch.Generator().manual_seed(6)
    logits = (torch.randn(2, 3, 7, generator=gen) * 3).bfloat16()
    labels = torch.randint(0, 7, (2, 3), generator=gen)
    labels[1, 2] = -100
    out = token_logprobs(logits, labels, temperature=1.3)
    assert out.dtype == torch.float32
    ref = F.log_softmax(logits.float() / 1.3, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    ref[1, 2] = 0.0
    close(out, ref, atol=1e-5)


def test_token_logprobs_gradient_matches_log_softmax():
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(2, 3, 5, generator=gen, dtype=D, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    labels = torch.randint(0, 5, (2, 3), generator=gen)
    token_logprobs(a, labels, temperature=0.5).sum().backward()
    F.log_softmax(b / 0.5, -1).gather(-1, labels[..., None]).sum().backward()
    close(a.grad, b.grad)


def test_token_logprobs_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), temperature=0.0)


def test_entropy_by_hand():
    # uniform over 4 tokens: H = ln 4 = 1.3862944; [0, 0, -inf]: p = [0.5, 0.5, 0] -> H = ln 2 = 0.6931472
    logits = t([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, float("-inf"), float("-inf")]]])
    close(entropy_from_logits(logits), [[1.3862944, 0.6931472]], atol=1e-7)
    # softmax [1, 2, 5] / 8: H = -(1/8 ln 1/8 + 2/8 ln 2/8 + 5/8 ln 5/8)
    h = -(1 / 8 * math.log(1 / 8) + 2 / 8 * math.log(2 / 8) + 5 / 8 * math.log(5 / 8))
    close(entropy_from_logits(t([[[0.0, math.log(2), math.log(5)]]])), [[h]])


def test_entropy_matches_formula_and_bf16():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 9, generator=gen, dtype=D) * 2
    logp = F.log_softmax(logits, -1)
    ref = -(logp.exp() * logp).sum(-1)
    close(entropy_from_logits(logits), ref)
    bf = logits.bfloat16()
    out = entropy_from_logits(bf)
    assert out.dtype == torch.float32
    lp = F.log_softmax(bf.float(), -1)
    close(out, -(lp.exp() * lp).sum(-1), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    close(kl_estimate(logp, ref, "k1"), [0.6931472], atol=1e-7)  # ln 0.5 - ln 0.25 = ln 2
    close(kl_estimate(logp, ref, "k2"), [0.2402265], atol=1e-7)  # 0.5 * (ln 2)^2 = 0.5 * 0.480453
    close(kl_estimate(logp, ref, "k3"), [0.1931472], atol=1e-7)  # r = 0.25/0.5 = 0.5: 0.5 - 1 - ln 0.5
    # identical policies: every estimator is 0
    for kind in KL_ESTIMATORS:
        close(kl_estimate(ref, ref, kind), [0.0])


def exact_expectation(p, q, kind):
    """E_{x ~ p}[k(x)] by summing over the whole support."""
    return (p * kl_estimate(p.log(), q.log(), kind)).sum()


def test_k1_k3_unbiased_exactly():
    gen = torch.Generator().manual_seed(9)
    for _ in range(5):
        p = torch.softmax(torch.randn(6, generator=gen, dtype=D) * 2, 0)
        q = torch.softmax(torch.randn(6, generator=gen, dtype=D) * 2, 0)
        true_kl = (p * (p.log() - q.log())).sum()
        close(exact_expectation(p, q, "k1"), true_kl, atol=1e-12)
        close(exact_expectation(p, q, "k3"), true_kl, atol=1e-12)
        assert torch.all(kl_estimate(p.log(), q.log(), "k3") >= 0)


def test_k2_close_for_near_distributions_only():
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(6, generator=gen, dtype=D)
    p = torch.softmax(logits, 0)
    q = torch.softmax(logits + 0.01 * torch.randn(6, generator=gen, dtype=D), 0)
    true_kl = (p * (p.log() - q.log())).sum()
    # bias is third order in the log-ratio: relative error O(0.01)
    assert abs(exact_expectation(p, q, "k2") - true_kl) < 0.02 * true_kl
    q_far = torch.softmax(logits + 3 * torch.randn(6, generator=gen, dtype=D), 0)
    kl_far = (p * (p.log() - q_far.log())).sum()
    assert abs(exact_expectation(p, q_far, "k2") - kl_far) > 0.1 * kl_far  # biased when far


def test_kl_unknown_kind():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(t([0.0]), t([0.0]), "k4")


# ------------------------------------------------------------------------------------------------ Bradley-Terry


def test_bradley_terry_by_hand():
    loss = bradley_terry_loss(t([1.0, 0.0, 2.0]), t([0.0, 0.0, 0.0]), margin=t([0.0, 0.0, 1.0]))
    # -log sigma(1) = log(1 + e^-1) = 0.3132617; -log sigma(0) = ln 2; -log sigma(2 - 0 - 1) = 0.3132617
    close(loss, [0.3132617, 0.6931472, 0.3132617], atol=1e-7)
    close(bradley_terry_loss(t([1.0]), t([0.0])), [0.3132617], atol=1e-7)  # no margin
    close(bradley_terry_loss(t([3.0]), t([1.0]), margin=1.0), [0.3132617], atol=1e-7)  # float margin


def test_bradley_terry_stable_and_gradient():
    # gap -1000: loss = 1000 (log(1 + e^1000) without overflow); gap +1000: loss = 0
    close(bradley_terry_loss(t([-1000.0, 1000.0]), t([0.0, 0.0])), [1000.0, 0.0])
    rc = t([1.0]).requires_grad_()
    bradley_terry_loss(rc, t([0.0])).sum().backward()
    close(rc.grad, [-0.2689414], atol=1e-7)  # d/dr_c = -sigma(-1) = -1/(1 + e) = -0.2689414


# -------------------------------------------------------------------------------------------- clipped surrogate

# eps = 0.2. Row 0 has A = +1, row 1 has A = -1; position 3 is padding (garbage).
RATIOS = [[1.1, 1.5, 0.5, 1.0], [0.5, 1.5, 0.9, 1.0]]
PMASK = [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]]
# per-token -min(rA, clip(r, 0.8, 1.2) A):
#   r=1.1, A=+1: -min(1.1, 1.1) = -1.1                    (inside the clip range)
#   r=1.5, A=+1: -min(1.5, 1.2) = -1.2                    clipped term active
#   r=0.5, A=+1: -min(0.5, 0.8) = -0.5                    outside but unclipped active (pessimistic)
#   r=0.5, A=-1: -min(-0.5, -0.8) = 0.8                   clipped term active
#   r=1.5, A=-1: -min(-1.5, -1.2) = 1.5                   outside but unclipped active
#   r=0.9, A=-1: -min(-0.9, -0.9) = 0.9                   inside
# token-mean: (-1.1 - 1.2 - 0.5 + 0.8 + 1.5 + 0.9) / 6 = 0.4 / 6; clip_frac = 2 / 6
# ratio_mean = (1.1 + 1.5 + 0.5 + 0.5 + 1.5 + 0.9) / 6 = 6.0 / 6 = 1.0
# approx_kl = mean of r - 1 - ln r:
#   1.1: 0.1 - 0.0953102 = 0.0046898; 1.5: 0.5 - 0.4054651 = 0.0945349 (x2); 0.5: -0.5 + 0.6931472 = 0.1931472 (x2)
#   0.9: -0.1 + 0.1053605 = 0.0053605; sum = 0.5854145; / 6 = 0.0975691


def _policy_inputs():
    mask = t(PMASK)
    old = t([[-1.0, -2.0, -0.5, 0.0], [-3.0, -1.5, -0.7, 0.0]])
    logp = old + t(RATIOS).log()
    logp = with_garbage(logp, mask, 1e9)  # exp(1e9 - old) would overflow if it were read
    return logp, old, mask


def test_clipped_surrogate_by_hand():
    logp, old, mask = _policy_inputs()
    adv_seq = t([1.0, -1.0])
    loss, stats = clipped_surrogate_loss(logp, old, adv_seq, mask, epsilon=0.2)
    close(loss, 0.4 / 6)
    close(stats["clip_frac"], 2 / 6)
    close(stats["ratio_mean"], 1.0)
    close(stats["approx_kl"], 0.0975691, atol=1e-7)
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())
    # per-token advantages (with garbage on padding) give the same result as per-sequence ones
    adv_tok = with_garbage(t([[1.0, 1.0, 1.0, 0.0], [-1.0, -1.0, -1.0, 0.0]]), mask, 1e9)
    loss_tok, stats_tok = clipped_surrogate_loss(logp, old, adv_tok, mask, epsilon=0.2)
    close(loss_tok, 0.4 / 6)
    close(stats_tok["clip_frac"], 2 / 6)


def test_clipped_surrogate_gradient():
    logp, old, mask = _policy_inputs()
    logp.requires_grad_()
    loss, _ = clipped_surrogate_loss(logp, old, t([1.0, -1.0]), mask, epsilon=0.2)
    loss.backward()
    # d/dlogp of -A r / 6 is -A r / 6 where the unclipped term is active, 0 where clipping is active or padding
    expected = t([[-1.1, 0.0, -0.5, 0.0], [0.0, 1.5, 0.9, 0.0]]) / 6
    close(logp.grad, expected)


def test_clipped_surrogate_epsilon_high():
    # r=1.5, A=+1 with eps_high = 0.28: -min(1.5, 1.28) = -1.28 (clipped)
    # r=0.5, A=-1 with eps_low = 0.2: -min(-0.5, -0.8) = 0.8 (clipped)
    # mean over 2 tokens: (-1.28 + 0.8) / 2 = -0.24
    old = t([[0.0, 0.0]])
    logp = t([[math.log(1.5), math.log(0.5)]])
    loss, stats = clipped_surrogate_loss(logp, old, t([[1.0, -1.0]]), t([[1.0, 1.0]]), 0.2, epsilon_high=0.28)
    close(loss, -0.24)
    close(stats["clip_frac"], 1.0)


def test_clipped_surrogate_agg_modes():
    # row 0: one token r=1, A=2 -> -2; row 1: three tokens r=1, A=-1 -> 1 each
    # token-mean: (-2 + 3) / 4 = 0.25; seq-mean-token-mean: (-2 + 1) / 2 = -0.5; seq-mean-token-sum: (-2 + 3)/2
    logp = torch.zeros(2, 3, dtype=D)
    mask = t([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    adv = t([2.0, -1.0])
    close(clipped_surrogate_loss(logp, logp, adv, mask)[0], 0.25)
    close(clipped_surrogate_loss(logp, logp, adv, mask, agg="seq-mean-token-mean")[0], -0.5)
    close(clipped_surrogate_loss(logp, logp, adv, mask, agg="seq-mean-token-sum")[0], 0.5)
    # sum-norm with max_len 4: (-2/4 + 3/4) / 2 = 0.125
    close(clipped_surrogate_loss(logp, logp, adv, mask, agg="seq-mean-token-sum-norm", max_len=4)[0], 0.125)


# ------------------------------------------------------------------------------------------------------- value


def test_value_loss_by_hand():
    values = t([[2.0, 0.0, 1.5, 0.0]])
    old = t([[1.0, 1.0, 1.0, 0.0]])
    returns = t([[0.0, 0.0, 3.0, 0.0]])
    mask = t([[1.0, 1.0, 1.0, 0.0]])
    values, returns = with_garbage(values, mask), with_garbage(returns, mask, -1e9)
    # unclipped: 0.5 * ((2-0)^2 + (0-0)^2 + (1.5-3)^2) / 3 = 0.5 * (4 + 0 + 2.25) / 3 = 1.0416667
    loss, stats = value_loss(values, old, returns, mask)
    close(loss, 0.5 * 6.25 / 3)
    close(stats["vf_clip_frac"], 0.0)
    # clip 0.2 around old = 1: clipped V = 1.2, 0.8, 1.2
    #   token 0: max(4, (1.2-0)^2 = 1.44) = 4           unclipped active
    #   token 1: max(0, (0.8-0)^2 = 0.64) = 0.64        clipped active
    #   token 2: max(2.25, (1.2-3)^2 = 3.24) = 3.24     clipped active
    # loss = 0.5 * (4 + 0.64 + 3.24) / 3 = 0.5 * 7.88 / 3 = 1.3133333; vf_clip_frac = 2/3
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    close(loss, 0.5 * 7.88 / 3)
    close(stats["vf_clip_frac"], 2 / 3)
    # V = 1.1 inside [0.8, 1.2]: both terms equal 0.5 * 1.21 = 0.605 -> clipping not active
    loss, stats = value_loss(t([[1.1]]), t([[1.0]]), t([[0.0]]), t([[1.0]]), clip_range=0.2)
    close(loss, 0.605)
    close(stats["vf_clip_frac"], 0.0)


def test_value_loss_gradient():
    values = t([[2.0, 0.0, 1.5, 5.0]]).requires_grad_()
    old = t([[1.0, 1.0, 1.0, 0.0]])
    returns = t([[0.0, 0.0, 3.0, 0.0]])
    mask = t([[1.0, 1.0, 1.0, 0.0]])
    loss, _ = value_loss(values, old, returns, mask, clip_range=0.2)
    loss.backward()
    # token 0 unclipped active: d/dV 0.5 (V-R)^2 / 3 = (2 - 0) / 3; tokens 1, 2 clipped (V outside range): 0
    close(values.grad, [[2.0 / 3, 0.0, 0.0, 0.0]])


def test_explained_variance_by_hand():
    target = t([[1.0, 2.0, 3.0, 4.0, 0.0]])
    mask = t([[1.0, 1.0, 1.0, 1.0, 0.0]])
    close(explained_variance(with_garbage(target, mask), with_garbage(target, mask, 7.0), mask), 1.0)
    close(explained_variance(torch.full_like(target, 2.5), target, mask), 0.0)  # constant = mean
    # pred [1, 2, 3, 5]: residual [0, 0, 0, -1]: var = 1/4 - (1/4)^2 = 0.1875; var target = 1.25
    # EV = 1 - 0.1875 / 1.25 = 1 - 0.15 = 0.85
    close(explained_variance(t([[1.0, 2.0, 3.0, 5.0, 9.0]]), target, mask), 0.85)
    assert torch.isnan(explained_variance(target, torch.ones_like(target), mask))
