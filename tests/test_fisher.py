"""Gauss–Newton Fisher-vector products (align/fisher.py) against the exact KL Hessian (double backward) and an
explicit Fisher matrix from per-position Jacobians; invariance to padding and micro-batching, temperature, LoRA
adapters, parameters without gradient, symmetry and positive semi-definiteness."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from align.fisher import GaussNewtonFisher, gauss_newton_fvp, softmax_fisher_apply
from align.losses import categorical_kl
from align.models import SelectiveLM, apply_lora
from align.optim_math import flat_grad, hessian_vector_product
from align.rollout import sequence_inputs
from align.tiny import build_model, build_tokenizer

METHODS = ["vjp", "jvp"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    return SelectiveLM(build_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=0))


def batch(tok, seed, b=4, p=5, c=4, extra_pad=0):
    """Random rollouts: prompts (b, p + extra_pad) left-padded to random lengths >= 1, completions (b, c) with
    random trailing padding (every row keeps one token)."""
    g = torch.Generator().manual_seed(seed)
    v = len(tok)
    prompt_ids = torch.randint(3, v, (b, p), generator=g)
    prompt_mask = (torch.arange(p) >= p - torch.randint(1, p + 1, (b, 1), generator=g)).long()
    prompt_ids[prompt_mask == 0] = tok.pad_token_id
    completion_ids = torch.randint(3, v, (b, c), generator=g)
    completion_mask = (torch.arange(c) < torch.randint(1, c + 1, (b, 1), generator=g)).long()
    completion_ids[completion_mask == 0] = tok.pad_token_id
    if extra_pad:
        prompt_ids = torch.cat([torch.full((b, extra_pad), tok.pad_token_id), prompt_ids], 1)
        prompt_mask = torch.cat([torch.zeros(b, extra_pad, dtype=torch.long), prompt_mask], 1)
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def micro(tok, seed, splits=(slice(0, 2), slice(2, 4)), **kw):
    """sequence_inputs of each micro-batch (rows `splits` of one batch) and the number of selected positions."""
    pi, pm, ci, cm = batch(tok, seed, **kw)
    return [sequence_inputs(pi[s], pm[s], ci[s], cm[s]) for s in splits], int(cm.sum())


def call(lm, x):
    return lm(x["input_ids"], select=x["select"], attention_mask=x["attention_mask"],
              position_ids=x["position_ids"])


def kl_hessian_vp(lm, inputs, temperature, params, n, v):
    """Oracle: the Hessian of the mean KL(π_old ‖ π_θ) at θ_old times v, by double backward."""
    total = 0
    for x in inputs:
        with sdpa_kernel([SDPBackend.MATH]):
            logits = call(lm, x)
            old = torch.log_softmax(logits.detach() / temperature, -1)
            kl = categorical_kl(old, logits, temperature).sum() / n
        total = total + hessian_vector_product(flat_grad(kl, params, create_graph=True), params, v)
    return total


def rand_vec(params, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(p.numel() for p in params), generator=g, dtype=params[0].dtype)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_softmax_fisher_apply_by_hand():
    p = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)
    u = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, 2.0]], dtype=torch.float64)
    expect = torch.stack([(torch.diag(pi) - torch.outer(pi, pi)) @ ui for pi, ui in zip(p, u)])
    torch.testing.assert_close(softmax_fisher_apply(p, u), expect)
    assert softmax_fisher_apply(p, torch.ones_like(u)).abs().max() < 1e-15  # shifting all logits changes nothing


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_the_kl_hessian(lm, tok, method, temperature):
    params = list(lm.parameters())
    inputs, n = micro(tok, 0)
    fisher = GaussNewtonFisher(lm, inputs, temperature, params, n, method=method)
    for seed in (1, 2):  # the kept graphs serve several products
        v = rand_vec(params, seed)
        fv = fisher.fvp(v)
        assert fv.dtype == torch.float32 and fv.shape == v.shape
        assert rel(fv, kl_hessian_vp(lm, inputs, temperature, params, n, v)) < 1e-5
    fisher.release()


def test_matches_the_explicit_fisher_matrix(tok):
    """float64, one layer, θ = the decoder layer and final norm: F = (1/N) Σ_i J_iᵀ(diag p_i − p_i p_iᵀ)J_i from
    the full Jacobian of the (tempered) logits."""
    model = build_model(tok, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16, seed=3).double()
    small = SelectiveLM(model)
    params = list(model.model.layers.parameters()) + list(model.model.norm.parameters())
    temperature = 0.8
    inputs, n = micro(tok, 4, b=3, p=3, c=3, splits=(slice(0, 3),))
    (x,) = inputs
    z = call(small, x) / temperature
    k, v_size = z.shape
    eye = torch.eye(k * v_size, dtype=z.dtype).view(k * v_size, k, v_size)
    jac = torch.autograd.grad(z, params, eye, is_grads_batched=True, allow_unused=True)
    jac = torch.cat([j.reshape(k * v_size, -1) for j in jac], 1).view(k, v_size, -1)  # (N, V, P)
    p = torch.softmax(z.detach(), -1)
    m = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    fisher = torch.einsum("nvp,nvw,nwq->pq", jac, m, jac) / n
    assert torch.allclose(fisher, fisher.T, atol=1e-14)
    assert torch.linalg.eigvalsh(fisher).min() > -1e-12
    for method in METHODS:
        v = rand_vec(params, 5)
        fv = GaussNewtonFisher(small, inputs, temperature, params, n, method=method).fvp(v)
        assert fv.dtype == torch.float64
        # Llama's RMSNorm and rotary tables compute in float32 even in a float64 model, so the two Jacobians
        # (per-row backward here, one JVP there) agree to float32 rounding only
        assert rel(fv, fisher @ v) < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_padding_and_micro_batching_do_not_change_the_product(lm, tok, method):
    params = list(lm.parameters())
    v = rand_vec(params, 6)
    two, n = micro(tok, 7)
    one, _ = micro(tok, 7, splits=(slice(0, 4),))
    padded, _ = micro(tok, 7, splits=(slice(0, 4),), extra_pad=3)
    ref = GaussNewtonFisher(lm, one, 1.0, params, n, method=method).fvp(v)
    assert rel(GaussNewtonFisher(lm, two, 1.0, params, n, method=method).fvp(v), ref) < 1e-5
    assert rel(GaussNewtonFisher(lm, padded, 1.0, params, n, method=method).fvp(v), ref) < 1e-5


def test_lora_adapters_only(tok):
    model = build_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=1)
    model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["all-linear"])
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():  # B = 0 at init would make every A block of F zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    lora = SelectiveLM(model)
    params = [p for p in lora.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    inputs, n = micro(tok, 9)
    v = rand_vec(params, 10)
    ref = kl_hessian_vp(lora, inputs, 0.9, params, n, v)
    for method in METHODS:
        assert rel(GaussNewtonFisher(lora, inputs, 0.9, params, n, method=method).fvp(v), ref) < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_parameters_without_gradient_get_zero_blocks(lm, tok, method):
    params = list(lm.parameters())
    head = torch.nn.Linear(32, 1)  # e.g. a value head: not on the path to the logits, not in lm
    inputs, n = micro(tok, 11)
    v = rand_vec(params, 12)
    extra = torch.randn(head.weight.numel() + head.bias.numel())
    ref = GaussNewtonFisher(lm, inputs, 1.0, params, n, method=method).fvp(v)
    fv = GaussNewtonFisher(lm, inputs, 1.0, params + list(head.parameters()), n, method=method).fvp(
        torch.cat([v, extra]))
    assert rel(fv[:v.numel()], ref) < 1e-6
    assert fv[v.numel():].abs().max() == 0


def test_symmetric_and_positive_semidefinite(lm, tok):
    params = list(lm.parameters())
    inputs, n = micro(tok, 13)
    fisher = GaussNewtonFisher(lm, inputs, 1.0, params, n)
    v, w = rand_vec(params, 14), rand_vec(params, 15)
    fv, fw = fisher.fvp(v), fisher.fvp(w)
    assert abs(float(w @ fv - v @ fw)) <= 1e-5 * abs(float(w @ fv)) + 1e-9
    assert float(v @ fv) >= 0 and float(w @ fw) >= 0
    assert float(v @ fv) > 0  # a random direction does change the policy


def test_from_logits_free_function_and_reduce(lm, tok):
    params = list(lm.parameters())
    inputs, n = micro(tok, 16)
    v = rand_vec(params, 17)
    ref = GaussNewtonFisher(lm, inputs, 0.7, params, n).fvp(v)
    with sdpa_kernel([SDPBackend.MATH]):
        logits = [call(lm, x) for x in inputs]
    assert rel(GaussNewtonFisher.from_logits(logits, 0.7, params, n).fvp(v), ref) < 1e-6
    assert rel(gauss_newton_fvp(lm, inputs, 0.7, params, n, v), ref) < 1e-6
    # two processes with the same data: the sum over processes doubles the product
    assert rel(gauss_newton_fvp(lm, inputs, 0.7, params, n, v, reduce=lambda t: 2 * t), 2 * ref) < 1e-6
    with pytest.raises(ValueError):
        GaussNewtonFisher(lm, inputs, 0.7, params, n, method="nope")
    with pytest.raises(ValueError):
        GaussNewtonFisher(lm, inputs, 0.7, params, n).fvp(v[:-1])


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing(tok, method):
    """A checkpointed model recomputes its forward in each backward: with the same attention kernel."""
    model = build_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()  # transformers checkpoints in training mode only (the tiny model has no dropout)
    ck = SelectiveLM(model)
    params = list(ck.parameters())
    inputs, n = micro(tok, 18)
    v = rand_vec(params, 19)
    with sdpa_kernel([SDPBackend.MATH]):
        ref = kl_hessian_vp(ck, inputs, 0.8, params, n, v)
    assert rel(GaussNewtonFisher(ck, inputs, 0.8, params, n, method=method).fvp(v), ref) < 1e-5
