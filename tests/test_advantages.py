"""Tests for align.advantages: hand-computed cases, slow per-row oracles, masking invariance."""

import math

import pytest
import torch

from align.advantages import (
    GROUP_ADVANTAGES,
    discounted_returns,
    gae,
    group_advantages,
    reward_to_go,
    td_residual,
    zero_std_group_fraction,
)

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def with_garbage(x, mask, value=1e9):
    return torch.where(mask.bool(), x, torch.full_like(x, value))


# ------------------------------------------------------------------------------------------- returns, by hand

# Row 0: rewards [1, 2, 4] then padding; row 1: one valid token with reward 3.
R = [[1.0, 2.0, 4.0, 0.0], [3.0, 0.0, 0.0, 0.0]]
MASK = [[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]


def test_reward_to_go_by_hand():
    m = t(MASK)
    # gamma 0.5: G2 = 4; G1 = 2 + 0.5 * 4 = 4; G0 = 1 + 0.5 * 4 = 3; row 1: G0 = 3
    out = reward_to_go(with_garbage(t(R), m), m, 0.5)
    close(out, [[3.0, 4.0, 4.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    # gamma 1: G = [7, 6, 4]
    close(reward_to_go(t(R), m, 1.0)[0], [7.0, 6.0, 4.0, 0.0])


def test_discounted_returns_by_hand():
    m = t(MASK)
    # gamma 0.5: 1 + 0.5 * 2 + 0.25 * 4 = 1 + 1 + 1 = 3; row 1: 3
    close(discounted_returns(with_garbage(t(R), m), m, 0.5), [3.0, 3.0])
    close(discounted_returns(t(R), m, 1.0), [7.0, 3.0])  # 1 + 2 + 4


def test_td_residual_and_gae_by_hand():
    m = t(MASK)
    rewards = with_garbage(t(R), m)
    values = with_garbage(t([[1.0, 1.0, 2.0, 0.0], [0.5, 0.0, 0.0, 0.0]]), m, -1e9)
    # gamma 0.5, V after the last valid token = 0:
    #   d2 = 4 + 0 - 2 = 2; d1 = 2 + 0.5 * 2 - 1 = 2; d0 = 1 + 0.5 * 1 - 1 = 0.5; row 1: d0 = 3 + 0 - 0.5 = 2.5
    close(td_residual(rewards, values, m, 0.5), [[0.5, 2.0, 2.0, 0.0], [2.5, 0.0, 0.0, 0.0]])
    # lam 0.5 (gamma * lam = 0.25): A2 = 2; A1 = 2 + 0.25 * 2 = 2.5; A0 = 0.5 + 0.25 * 2.5 = 1.125
    # returns = A + V = [2.125, 3.5, 4]; row 1: A = 2.5, return = 3
    adv, ret = gae(rewards, values, m, gamma=0.5, lam=0.5)
    close(adv, [[1.125, 2.5, 2.0, 0.0], [2.5, 0.0, 0.0, 0.0]])
    close(ret, [[2.125, 3.5, 4.0, 0.0], [3.0, 0.0, 0.0, 0.0]])


# -------------------------------------------------------------------------------------------- slow oracles


def slow_gae_row(rewards, values, gamma, lam):
    """Textbook GAE on one episode given as python lists (V after the end = 0)."""
    n = len(rewards)
    adv = [0.0] * n
    for s in range(n):
        total = 0.0
        for l in range(n - s):
            k = s + l
            v_next = values[k + 1] if k + 1 < n else 0.0
            delta = rewards[k] + gamma * v_next - values[k]
            total += (gamma * lam) ** l * delta
        adv[s] = total
    return adv


def slow_rtg_row(rewards, gamma):
    return [sum(gamma ** (k - s) * rewards[k] for k in range(s, len(rewards))) for s in range(len(rewards))]


def slow_per_row(fn, rewards, values, mask, *args):
    """Apply an episode function to the valid tokens of each row, scatter back, zeros elsewhere."""
    out = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = [i for i in range(rewards.shape[1]) if mask[b, i] != 0]
        r = [rewards[b, i].item() for i in idx]
        v = [values[b, i].item() for i in idx]
        res = fn(r, v, *args)
        for i, x in zip(idx, res):
            out[b, i] = x
    return out


def random_inputs(seed, b=5, tt=8, right_padded=True):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, tt, generator=gen, dtype=D)
    values = torch.randn(b, tt, generator=gen, dtype=D)
    if right_padded:
        lengths = torch.randint(0, tt + 1, (b,), generator=gen)
        lengths[0] = tt  # one full row
        mask = (torch.arange(tt)[None] < lengths[:, None]).to(D)
    else:  # left padding and holes
        mask = (torch.rand(b, tt, generator=gen) < 0.6).to(D)
    return rewards, values, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.7), (0.5, 1.0), (0.99, 0.0)])
def test_gae_matches_slow_oracle_right_padding(seed, gamma, lam):
    rewards, values, mask = random_inputs(seed)
    expected_adv = slow_per_row(slow_gae_row, rewards, values, mask, gamma, lam)
    adv, ret = gae(with_garbage(rewards, mask), with_garbage(values, mask, -1e9), mask, gamma, lam)
    close(adv, expected_adv)
    close(ret, torch.where(mask.bool(), expected_adv + values, torch.zeros_like(values)))


def test_gae_skips_masked_positions_anywhere():
    # Masked positions (left padding, holes) are removed from the time axis: same as the oracle on valid tokens.
    rewards, values, mask = random_inputs(7, b=4, tt=9, right_padded=False)
    expected = slow_per_row(slow_gae_row, rewards, values, mask, 0.9, 0.8)
    close(gae(with_garbage(rewards, mask), with_garbage(values, mask), mask, 0.9, 0.8)[0], expected)
    expected_rtg = slow_per_row(lambda r, v, g: slow_rtg_row(r, g), rewards, values, mask, 0.9)
    close(reward_to_go(with_garbage(rewards, mask), mask, 0.9), expected_rtg)
    first = [int(mask[b].nonzero()[0]) if mask[b].any() else None for b in range(4)]
    expected_ret = [0.0 if i is None else expected_rtg[b, i].item() for b, i in enumerate(first)]
    close(discounted_returns(with_garbage(rewards, mask), mask, 0.9), expected_ret)


@pytest.mark.parametrize("seed", [3, 4])
def test_reward_to_go_and_returns_match_oracle(seed):
    rewards, values, mask = random_inputs(seed)
    expected = slow_per_row(lambda r, v, g: slow_rtg_row(r, g), rewards, values, mask, 0.8)
    close(reward_to_go(with_garbage(rewards, mask), mask, 0.8), expected)
    close(discounted_returns(with_garbage(rewards, mask), mask, 0.8), expected[:, 0])


@pytest.mark.parametrize("seed", [5, 6])
def test_gae_lambda_limits(seed):
    rewards, values, mask = random_inputs(seed)
    g_rewards, g_values = with_garbage(rewards, mask), with_garbage(values, mask)
    # lambda = 1: Monte-Carlo, reward-to-go minus V
    adv1, ret1 = gae(g_rewards, g_values, mask, 0.9, 1.0)
    close(adv1, torch.where(mask.bool(), reward_to_go(rewards, mask, 0.9) - values, torch.zeros_like(values)))
    close(ret1, reward_to_go(rewards, mask, 0.9))
    # lambda = 0: one-step TD residual
    adv0, _ = gae(g_rewards, g_values, mask, 0.9, 0.0)
    close(adv0, td_residual(g_rewards, g_values, mask, 0.9))


# ----------------------------------------------------------------------------------------- group advantages

GROUP = [1.0, 0.0, 0.0, 1.0]


def test_group_zscore_by_hand():
    # mean 0.5; unbiased std: squares 4 * 0.25 = 1, / (4 - 1) -> sqrt(1/3) = 0.5773503
    # adv = +-0.5 / (0.5773503 + 1e-4) = +-0.8658754
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    close(group_advantages(t(GROUP), 4, "zscore"), [a, -a, -a, a])
    close(group_advantages(t(GROUP), 4, "zscore")[0], 0.8658754, atol=1e-7)


def test_group_mean_and_leave_one_out_by_hand():
    close(group_advantages(t(GROUP), 4, "mean"), [0.5, -0.5, -0.5, 0.5])  # R - 0.5
    # R=1: 1 - (0 + 0 + 1)/3 = 2/3; R=0: 0 - (1 + 0 + 1)/3 = -2/3
    close(group_advantages(t(GROUP), 4, "leave_one_out"), [2 / 3, -2 / 3, -2 / 3, 2 / 3])


def test_group_softmax_by_hand():
    # beta 1: e / (2e + 2) - 1/4 = 0.3655293 - 0.25 = 0.1155293; 1 / (2e + 2) - 1/4 = 0.1344707 - 0.25
    e = math.e
    hi, lo = e / (2 * e + 2) - 0.25, 1 / (2 * e + 2) - 0.25
    close(group_advantages(t(GROUP), 4, "softmax"), [hi, lo, lo, hi])
    close(group_advantages(t(GROUP), 4, "softmax")[0], 0.1155293, atol=1e-7)
    # beta 2: e^2 / (2e^2 + 2) - 1/4
    hi2 = e**2 / (2 * e**2 + 2) - 0.25
    close(group_advantages(t(GROUP), 4, "softmax", beta=2.0)[0], hi2)


def test_group_zscore_batch_scale_by_hand():
    rewards = t(GROUP + [3.0, 3.0, 3.0, 3.0])
    # batch of 8: mean 14/8 = 1.75; squares 0.5625 + 3.0625 + 3.0625 + 0.5625 + 4 * 1.5625 = 13.5
    # unbiased var 13.5 / 7 = 1.9285714, std = 1.3887301; group 0: +-0.5 / (1.3887301 + 1e-4)
    a = 0.5 / (math.sqrt(13.5 / 7) + 1e-4)
    close(group_advantages(rewards, 4, "zscore", scale="batch"), [a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("kind", list(GROUP_ADVANTAGES))
def test_all_equal_group_is_exactly_zero(kind):
    # 0.1 * 3 is not exactly representable: a float mean may differ from 0.1 in the last bit
    for dtype in (torch.float32, torch.float64):
        rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.2, 0.3, 1e6, 1e6, 1e6], dtype=dtype)
        adv = group_advantages(rewards, 3, kind)
        assert torch.all(adv[:3] == 0) and torch.all(adv[6:] == 0)
        assert torch.all(adv[3:6] != 0)


def slow_group(rewards, g, kind, beta=1.0, eps=1e-4):
    out = []
    for s in range(0, len(rewards), g):
        grp = rewards[s : s + g]
        mean = sum(grp) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (g - 1))
        z = sum(math.exp(beta * x) for x in grp)
        for i, x in enumerate(grp):
            if kind == "zscore":
                out.append((x - mean) / (std + eps))
            elif kind == "mean":
                out.append(x - mean)
            elif kind == "softmax":
                out.append(math.exp(beta * x) / z - 1 / g)
            else:
                out.append(x - (sum(grp) - x) / (g - 1))
    return out


@pytest.mark.parametrize("kind", list(GROUP_ADVANTAGES))
def test_group_advantages_match_loop_oracle(kind):
    gen = torch.Generator().manual_seed(11)
    rewards = torch.randn(15, generator=gen, dtype=D)
    close(group_advantages(rewards, 5, kind, beta=0.7), slow_group(rewards.tolist(), 5, kind, beta=0.7))


def test_softmax_sums_to_zero_and_is_stable():
    gen = torch.Generator().manual_seed(12)
    rewards = torch.randn(12, generator=gen, dtype=D) * 100
    adv = group_advantages(rewards, 4, "softmax", beta=50.0)  # beta * R up to ~1e4: exp would overflow
    assert torch.isfinite(adv).all()
    close(adv.view(3, 4).sum(1), [0.0, 0.0, 0.0], atol=1e-12)
    close(group_advantages(rewards, 4, "mean").view(3, 4).sum(1), [0.0, 0.0, 0.0], atol=1e-12)


def test_zero_std_group_fraction():
    rewards = t(GROUP + [3.0, 3.0, 3.0, 3.0] + [2.0, 2.0, 2.0, 2.0])
    close(zero_std_group_fraction(rewards, 4), 2 / 3, atol=1e-7)  # groups 1 and 2 of 3 are constant
    close(zero_std_group_fraction(t(GROUP), 4), 0.0)


def test_group_advantage_errors():
    with pytest.raises(ValueError, match="zscore, mean, softmax, leave_one_out"):
        group_advantages(t(GROUP), 4, "rank")
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(t(GROUP), 3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(t(GROUP), 1)
    with pytest.raises(ValueError, match="only to kind='zscore'"):
        group_advantages(t(GROUP), 4, "mean", scale="batch")
    with pytest.raises(ValueError, match="valid scales"):
        group_advantages(t(GROUP), 4, scale="global")
