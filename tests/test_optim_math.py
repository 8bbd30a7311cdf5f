"""Tests for align.optim_math: conjugate gradient and the TRPO step size."""

import math

import pytest
import torch

from align.optim_math import conjugate_gradient, max_step_size

D = torch.float64


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def test_cg_solves_random_spd_system():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, generator=gen, dtype=D)
    a = m @ m.T + 0.5 * torch.eye(5, dtype=D)  # symmetric positive definite
    b = torch.randn(5, generator=gen, dtype=D)
    calls = []

    def avp(v):
        calls.append(1)
        return a @ v

    x, res = conjugate_gradient(avp, b, iters=10)
    close(x, torch.linalg.solve(a, b))
    close(a @ x, b)
    assert res.dim() == 0 and res.item() < 1e-5
    assert len(calls) <= 10


def test_cg_by_hand_diagonal():
    # A = diag(2, 8), b = [2, 8] -> x = [1, 1]. Two distinct eigenvalues: CG converges in 2 iterations.
    a = torch.diag(torch.tensor([2.0, 8.0], dtype=D))
    x, res = conjugate_gradient(lambda v: a @ v, torch.tensor([2.0, 8.0], dtype=D), iters=2)
    close(x, [1.0, 1.0])
    close(res, 0.0)
    # one iteration from x0 = 0: r = b, alpha = b.b / b.Ab = (4 + 64) / (8 + 512) = 68/520; x = alpha * b
    x1, res1 = conjugate_gradient(lambda v: a @ v, torch.tensor([2.0, 8.0], dtype=D), iters=1)
    close(x1, [2 * 68 / 520, 8 * 68 / 520])
    # residual b - A x1 = [2 - 4*68/520, 8 - 64*68/520]
    close(res1, math.hypot(2 - 4 * 68 / 520, 8 - 64 * 68 / 520))


def test_cg_zero_rhs_returns_zero_without_calls():
    def avp(v):
        raise AssertionError("Avp should not be called for b = 0")

    x, res = conjugate_gradient(avp, torch.zeros(3, dtype=D))
    close(x, [0.0, 0.0, 0.0])
    close(res, 0.0)


def test_max_step_size_by_hand():
    # A = diag(2, 4), s = [1, 2]: As = [2, 8], s.As = 2 + 16 = 18; delta = 0.01
    # beta = sqrt(2 * 0.01 / 18) = sqrt(1/900) = 1/30 = 0.0333333
    s = torch.tensor([1.0, 2.0], dtype=D)
    a_s = torch.tensor([2.0, 8.0], dtype=D)
    beta = max_step_size(s, a_s, 0.01)
    close(beta, 1 / 30)
    # the scaled step sits exactly on the KL boundary: 0.5 * beta^2 * s.As = 0.5 * 18 / 900 = 0.01
    close(0.5 * beta**2 * s.dot(a_s), 0.01)
    with pytest.raises(ValueError, match="max_kl"):
        max_step_size(s, a_s, 0.0)
