"""align.chunked: log-probs and entropies from hidden states and the head weight, chunk rows at a time, equal
to the full (N, V) computation in values and gradients, with peak memory bounded by chunk x V."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from align.chunked import chunked_logprobs, head_logprobs, linear_head


def full_reference(hidden, weight, labels, temperature=1.0, bias=None, softcap=None, scale=None):
    """The materialised computation: log_softmax((hidden @ W.T + b) / T).gather(labels), and the entropy."""
    a = F.linear(hidden, weight, bias).float() if hidden.dtype != torch.float64 else F.linear(hidden, weight, bias)
    if softcap:
        a = torch.tanh(a / softcap) * softcap
    if scale:
        a = a * scale
    logp_all = torch.log_softmax(a / temperature, dim=-1)
    lp = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(labels < 0, 0.0)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return lp, ent


def make(n=13, v=50, h=8, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / h ** 0.5 * 3).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    # upstream gradients that differ per row, so a wrong row assignment would show
    c_lp = torch.randn(n, generator=g, dtype=torch.float64).float()
    c_ent = torch.randn(n, generator=g, dtype=torch.float64).float()
    return hidden, weight, b, labels, c_lp, c_ent


def grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 3, 5, 13, 64])  # chunk = 1, N % chunk != 0, chunk = N, chunk > N
def test_values_and_gradients_match_full(chunk, temperature):
    hidden, weight, bias, labels, c_lp, _ = make()
    lp, ent = chunked_logprobs(hidden, weight, labels, temperature, chunk=chunk, bias=bias)
    assert ent is None and lp.shape == (13,) and lp.dtype == torch.float32
    ref, _ = full_reference(hidden, weight, labels, temperature, bias)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)
    got = grads((lp * c_lp).sum(), hidden, weight, bias)
    want = grads((ref * c_lp).sum(), hidden, weight, bias)
    for name, a, b in zip(("hidden", "weight", "bias"), got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_entropy_and_its_gradient_match_full(chunk, temperature):
    hidden, weight, bias, labels, c_lp, c_ent = make()
    lp, ent = chunked_logprobs(hidden, weight, labels, temperature, chunk=chunk, bias=bias, with_entropy=True)
    ref_lp, ref_ent = full_reference(hidden, weight, labels, temperature, bias)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    # the entropy alone, and the entropy with the log-probs (an entropy bonus in a policy loss)
    for w_lp in (0.0, 1.0):
        lp, ent = chunked_logprobs(hidden, weight, labels, temperature, chunk=chunk, bias=bias, with_entropy=True)
        ref_lp, ref_ent = full_reference(hidden, weight, labels, temperature, bias)
        loss = (ent * c_ent).sum() + (w_lp * (lp * c_lp).sum() if w_lp else 0)
        ref_loss = (ref_ent * c_ent).sum() + (w_lp * (ref_lp * c_lp).sum() if w_lp else 0)
        for a, b in zip(grads(loss, hidden, weight, bias), grads(ref_loss, hidden, weight, bias)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_entropy_without_gradient_and_no_bias():
    hidden, weight, _, labels, c_lp, _ = make(bias=False)
    lp, ent = chunked_logprobs(hidden, weight, labels, 0.7, chunk=4, with_entropy=True)
    ref_lp, ref_ent = full_reference(hidden, weight, labels, 0.7)
    torch.testing.assert_close(ent.detach(), ref_ent.detach(), atol=1e-5, rtol=0)
    # only the log-probs reach the loss: the entropy's gradient is None in backward
    for a, b in zip(grads((lp * c_lp).sum(), hidden, weight), grads((ref_lp * c_lp).sum(), hidden, weight)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("softcap,scale", [(5.0, None), (None, 0.25), (3.0, 2.0)])
def test_softcap_and_logit_scale(softcap, scale):
    hidden, weight, bias, labels, c_lp, c_ent = make()
    lp, ent = chunked_logprobs(hidden, weight, labels, 0.7, chunk=4, bias=bias, with_entropy=True,
                               softcap=softcap, scale=scale)
    ref_lp, ref_ent = full_reference(hidden, weight, labels, 0.7, bias, softcap, scale)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    loss, ref_loss = (lp * c_lp + ent * c_ent).sum(), (ref_lp * c_lp + ref_ent * c_ent).sum()
    for a, b in zip(grads(loss, hidden, weight, bias), grads(ref_loss, hidden, weight, bias)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk,temperature,softcap,bias", [(1, 1.0, None, False), (5, 0.7, None, True),
                                                           (64, 0.7, 3.0, True), (4, 1.0, 3.0, False)])
def test_frozen_head_matches_full(chunk, temperature, softcap, bias):
    """A head that needs no gradient (LoRA, frozen embeddings): the hidden-state gradients are formed in the
    forward (no recomputation in the backward) and equal the full computation's."""
    hidden, weight, b, labels, c_lp, c_ent = make(bias=bias)
    weight.requires_grad_(False)
    if b is not None:
        b.requires_grad_(False)
    labels[3] = -100
    for w_lp, w_ent in ((1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
        lp, ent = chunked_logprobs(hidden, weight, labels, temperature, chunk=chunk, bias=b, with_entropy=True,
                                   softcap=softcap, scale=1.3)
        ref_lp, ref_ent = full_reference(hidden, weight, labels, temperature, b, softcap, 1.3)
        torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
        loss = (w_lp * lp * c_lp + w_ent * ent * c_ent).sum()
        ref_loss = (w_lp * ref_lp * c_lp + w_ent * ref_ent * c_ent).sum()
        torch.testing.assert_close(grads(loss, hidden)[0], grads(ref_loss, hidden)[0], atol=1e-5, rtol=0)
    # without the entropy output too
    lp, _ = chunked_logprobs(hidden, weight, labels, temperature, chunk=chunk, bias=b, softcap=softcap)
    ref_lp, _ = full_reference(hidden, weight, labels, temperature, b, softcap)
    torch.testing.assert_close(grads((lp * c_lp).sum(), hidden)[0], grads((ref_lp * c_lp).sum(), hidden)[0],
                               atol=1e-5, rtol=0)


def test_frozen_head_backward_runs_no_matmul():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    def matmuls(hidden, weight, labels):
        lp, ent = chunked_logprobs(hidden, weight, labels, chunk=4, with_entropy=True)
        loss = (lp + ent).sum()
        with Ops() as ops:
            loss.backward()
        return sum(n.split(".")[0] in ("mm", "addmm", "addmm_", "matmul", "bmm") for n in ops.names)

    hidden, weight, _, labels, _, _ = make(bias=False)
    assert matmuls(hidden, weight, labels) > 0  # trained head: logits recomputed, weight gradient
    hidden, weight, _, labels, _, _ = make(bias=False)
    assert matmuls(hidden, weight.requires_grad_(False), labels) == 0


def test_ignored_labels_give_zero_and_no_gradient():
    hidden, weight, bias, labels, c_lp, _ = make()
    labels[[0, 5, 12]] = -100
    lp, _ = chunked_logprobs(hidden, weight, labels, chunk=4, bias=bias)
    assert (lp[[0, 5, 12]] == 0).all()
    ref, _ = full_reference(hidden, weight, labels, 1.0, bias)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)
    gh, gw, gb = grads((lp * c_lp).sum(), hidden, weight, bias)
    assert (gh[[0, 5, 12]] == 0).all()
    for a, b in zip((gh, gw, gb), grads((ref * c_lp).sum(), hidden, weight, bias)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_leading_dimensions_and_empty_input():
    hidden, weight, bias, labels, _, _ = make(n=12)
    lp, ent = chunked_logprobs(hidden.view(3, 4, -1), weight, labels.view(3, 4), chunk=5, bias=bias,
                               with_entropy=True)
    assert lp.shape == ent.shape == (3, 4)
    torch.testing.assert_close(lp.reshape(-1), chunked_logprobs(hidden, weight, labels, bias=bias)[0])
    lp0, ent0 = chunked_logprobs(hidden[:0], weight, labels[:0], bias=bias, with_entropy=True)
    assert lp0.shape == ent0.shape == (0,)
    (lp0.sum() + ent0.sum()).backward()
    assert hidden.grad is not None and (hidden.grad == 0).all()


def test_rejects_bad_arguments():
    hidden, weight, _, labels, _, _ = make()
    with pytest.raises(ValueError, match="temperature"):
        chunked_logprobs(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="chunk"):
        chunked_logprobs(hidden, weight, labels, chunk=0)
    with pytest.raises(ValueError, match="labels"):
        chunked_logprobs(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="head weight"):
        chunked_logprobs(hidden, weight.t(), labels)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_gradcheck_float64(softcap):
    hidden, weight, bias, labels, _, _ = make(n=5, v=7, h=3, dtype=torch.float64)
    labels[1] = -100

    def fn(h, w, b):
        return chunked_logprobs(h, w, labels, 0.7, chunk=2, bias=b, with_entropy=True, softcap=softcap, scale=1.5)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-6, atol=1e-8)
    lp, _ = fn(hidden, weight, bias)
    assert lp.dtype == torch.float64
    # a frozen head: gradients w.r.t. the hidden states only, formed in the forward
    frozen_w, frozen_b = weight.detach(), bias.detach()
    assert torch.autograd.gradcheck(lambda h: fn(h, frozen_w, frozen_b), (hidden,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("frozen_head", [False, True])
def test_bfloat16_inputs_softmax_in_float32(frozen_head):
    hidden, weight, bias, labels, c_lp, c_ent = make(n=40, v=300, h=16, dtype=torch.bfloat16)
    if frozen_head:
        weight.requires_grad_(False)
        bias.requires_grad_(False)
    lp, ent = chunked_logprobs(hidden, weight, labels, 0.7, chunk=16, bias=bias, with_entropy=True)
    assert lp.dtype == ent.dtype == torch.float32
    # the usual path: bf16 head, logits upcast to float32 for the softmax
    ref_lp, ref_ent = full_reference(hidden, weight, labels, 0.7, bias)
    torch.testing.assert_close(lp, ref_lp, atol=2e-2, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=2e-2, rtol=0)
    loss, ref_loss = (lp * c_lp + ent * c_ent).sum(), (ref_lp * c_lp + ref_ent * c_ent).sum()
    trained = (hidden,) if frozen_head else (hidden, weight, bias)
    got, want = grads(loss, *trained), grads(ref_loss, *trained)
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        assert (a.float() - b.float()).norm() <= 2e-2 * b.float().norm()
    # and both are close to the exact (float64) result
    exact, _ = full_reference(*(t.detach().double() for t in (hidden, weight)), labels, 0.7, bias.detach().double())
    assert (lp.double() - exact).abs().max() < 5e-2


@pytest.mark.parametrize("frozen_head", [False, True])
def test_cpu_autocast_uses_the_autocast_dtype(frozen_head):
    hidden, weight, bias, labels, c_lp, _ = make(n=20, v=100, h=16)
    if frozen_head:
        weight.requires_grad_(False)
        bias.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _ = chunked_logprobs(hidden, weight, labels, chunk=8, bias=bias)
        ref, _ = full_reference(hidden, weight, labels, 1.0, bias)  # F.linear in bf16 under autocast
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref, atol=1e-2, rtol=0)
    trained = (hidden,) if frozen_head else (hidden, weight, bias)
    got, want = grads((lp * c_lp).sum(), *trained), grads((ref * c_lp).sum(), *trained)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32  # gradients in the parameters' dtype
        assert (a - b).norm() <= 2e-2 * b.norm()


def test_tied_embedding_gets_both_gradients():
    """A head weight shared with the input embedding receives the embedding's and the head's gradient."""
    g = torch.Generator().manual_seed(1)
    emb = torch.nn.Embedding(30, 8)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(30, 8, generator=g))
    ids = torch.randint(0, 30, (11,), generator=g)
    labels = torch.randint(0, 30, (11,), generator=g)
    proj = torch.randn(8, 8, generator=g)

    def loss(path):
        hidden = torch.tanh(emb(ids) @ proj)
        if path == "chunked":
            lp, ent = chunked_logprobs(hidden, emb.weight, labels, 0.7, chunk=3, with_entropy=True)
        else:
            lp, ent = full_reference(hidden, emb.weight, labels, 0.7)
        return -(lp.sum() + 0.1 * ent.sum())

    g1 = torch.autograd.grad(loss("chunked"), emb.weight)[0]
    g2 = torch.autograd.grad(loss("full"), emb.weight)[0]
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# through a causal LM: align.models.SelectiveLM's logits vs head_logprobs on its hidden states


@pytest.mark.parametrize("arch,softcap,lora", [("llama", None, False), ("phi", None, False), ("gpt2", None, False),
                                               ("llama", 2.0, False), ("llama", None, True), ("gpt2", 2.0, True)])
def test_head_logprobs_match_selective_lm(arch, softcap, lora):
    """Same log-probs, entropies and parameter gradients as SelectiveLM's logits (+ LoRA: a frozen head)."""
    from align.losses import entropy_from_logits, token_logprobs
    from align.models import SelectiveLM, apply_lora
    from align.tiny import build_model, build_tokenizer

    model = build_model(build_tokenizer(), arch=arch, hidden_size=16, num_layers=1, num_heads=2)
    if softcap:
        model.config.final_logit_softcapping = softcap  # _final_logits reads it from any config
    if lora:
        model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["all-linear"])
    parts = linear_head(model)
    assert parts is not None
    if arch == "phi":
        assert parts[1] is not None  # phi's head has a bias
    if arch == "gpt2":
        assert parts[0] is model.get_input_embeddings().weight  # tied
    assert parts[2] == softcap
    assert parts[0].requires_grad != lora
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(7, 100, (3, 9), generator=g)
    select = torch.rand(3, 9, generator=g) > 0.4
    labels = torch.randint(7, 100, (int(select.sum()),), generator=g)
    lm = SelectiveLM(model)

    def run(chunked):
        model.zero_grad()
        logits, hidden = lm(ids, select=select, return_hidden=True)
        if chunked:
            lp, ent = head_logprobs(model, hidden, labels, 0.7, chunk=4, with_entropy=True)
        else:
            lp = token_logprobs(logits.unsqueeze(0), labels.unsqueeze(0), 0.7)[0]
            ent = entropy_from_logits((logits / 0.7).unsqueeze(0))[0]
        (lp.sum() + 0.1 * ent.sum()).backward()
        return lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                           if p.grad is not None}

    lp1, ent1, g1 = run(True)
    lp2, ent2, g2 = run(False)
    torch.testing.assert_close(lp1, lp2, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent1, ent2, atol=1e-5, rtol=0)
    assert g1 and g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_head_logprobs_falls_back_for_a_non_linear_head():
    from align.tiny import build_model, build_tokenizer

    model = build_model(build_tokenizer(), arch="llama", hidden_size=16, num_layers=1, num_heads=2)
    head = model.get_output_embeddings()

    class Wrapped(torch.nn.Module):  # e.g. a LoRA / modules_to_save wrapper
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    hidden = torch.randn(6, 16)
    labels = torch.randint(0, head.out_features, (6,))
    want, _ = chunked_logprobs(hidden, head.weight, labels, 0.7)
    model.set_output_embeddings(Wrapped(head))
    assert linear_head(model) is None
    got, ent = head_logprobs(model, hidden, labels, 0.7, with_entropy=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert ent.shape == (6,)


# ---------------------------------------------------------------------------------------------------------------
# memory: the chunked path never allocates anything (N, V)-sized


N, V, H, CHUNK = 1024, 32768, 64, 64


def _problem():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / 8).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, labels


def _full_step(hidden, weight, labels):
    lp = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    lp.sum().backward()


def _chunked_step(hidden, weight, labels, with_entropy=True):
    lp, ent = chunked_logprobs(hidden, weight, labels, chunk=CHUNK, with_entropy=with_entropy)
    (lp.sum() + (ent.sum() if with_entropy else 0.0)).backward()


def test_largest_tensor_is_chunk_by_vocab():
    """Every tensor any aten op produces in forward + backward (seen by a dispatch mode): none is N x V."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            self.ops += 1
            return out

    sizes = {}
    for name, step in (("full", _full_step), ("chunked", _chunked_step)):
        hidden, weight, labels = _problem()
        with Largest() as mode:
            step(hidden, weight, labels)
        assert hidden.grad is not None and weight.grad is not None
        sizes[name] = mode.largest
    assert sizes["full"] >= N * V  # the mode sees the (N, V) logits of the full path
    assert sizes["chunked"] == max(CHUNK * V, V * H)


def _peak_cpu_bytes(fn) -> int:
    """Peak of the CPU allocator's total allocated bytes while `fn` runs, above the level at its start, from the
    profiler's allocation events (each carries the allocator's running total)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(ev):
        if type(ev.extra_fields).__name__ == "_ExtraFields_Allocation" and str(ev.extra_fields.device) == "cpu":
            events.append((ev.start_time_ns, ev.extra_fields.alloc_size, ev.extra_fields.total_allocated))
        for c in ev.children:
            walk(c)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    if not events:
        pytest.skip("the profiler recorded no CPU allocation events")
    events.sort()
    start = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - start


@pytest.mark.parametrize("with_entropy", [False, True])
def test_peak_memory_is_bounded_by_chunk_not_tokens(with_entropy):
    fv = 4  # float32 bytes
    peaks = {}
    for name, step in (("full", _full_step), ("chunked", lambda *a: _chunked_step(*a, with_entropy=with_entropy))):
        hidden, weight, labels = _problem()
        peaks[name] = _peak_cpu_bytes(lambda: step(hidden, weight, labels))
    # full: at least the (N, V) logits (in fact several (N, V) tensors)
    assert peaks["full"] >= N * V * fv
    # chunked: the (V, H) weight gradient, O(N) and (N, H) vectors, and one (chunk, V) float32 buffer for the
    # log-probs (two with the entropy), with one buffer of slack
    buffers = 2 if with_entropy else 1
    bound = (buffers + 1) * CHUNK * V * fv + V * H * fv + 4 * N * H * fv
    assert peaks["chunked"] <= bound, (peaks, bound)
    assert peaks["chunked"] * 10 < peaks["full"], peaks


# ---------------------------------------------------------------------------------------------------------------
# through the stages: SelectiveLM / GroupLM log-prob requests chunk when the (N, V) logits pass the budget


def _stage_weights(stage: str, model: str, data: str, reward: str, out, extra: list[str]) -> dict:
    from safetensors.torch import load_file

    from align.cli import main

    argv = [stage, "--model", model, "--train_data", data, "--reward_funcs", reward, "--output_dir", str(out),
            "--max_steps", "2", "--max_new_tokens", "4", "--learning_rate", "1e-3", "--disable_tqdm", "true",
            "--seed", "3", "--max_length", "32", *extra]
    assert main(argv) == 0
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("stage,extra", [
    ("grpo", ["--num_generations", "2", "--per_device_train_batch_size", "4", "--beta", "0.04"]),
    ("ppo", ["--per_device_train_batch_size", "4", "--value_model", "policy", "--entropy_coef", "0.01"]),
    ("reinforce", ["--num_generations", "2", "--per_device_train_batch_size", "2", "--beta", "0.1"]),
])
def test_stages_with_chunked_logprobs_train_like_the_full_head(stage, extra, tiny_model_dir, diversity_data,
                                                               tmp_path, monkeypatch):
    """A budget of 64 logit elements makes every training, reference and old-log-prob forward of the tiny model
    (vocabulary ~260) run the head one row at a time: same weights after 2 steps as with the whole head."""
    import align.models as M

    prompts, reward = diversity_data
    full = _stage_weights(stage, tiny_model_dir, prompts, reward, tmp_path / "full", extra)
    calls = []
    real = M.SelectiveLM.head_output

    def spy(self, hidden, request):
        out = real(self, hidden, request)
        if request is not None:
            calls.append(hidden.shape[0])
        return out

    monkeypatch.setattr(M, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(M.SelectiveLM, "head_output", spy)
    chunked = _stage_weights(stage, tiny_model_dir, prompts, reward, tmp_path / "chunked", extra)
    assert calls and max(calls) > 1  # requests with several rows went through the chunked path
    assert max((full[k] - chunked[k]).abs().max().item() for k in full) < 1e-5
    assert max((full[k] - load_start(tiny_model_dir)[k]).abs().max().item() for k in full) > 1e-4


def load_start(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_selective_and_group_lm_requests_equal_logits_path(tiny_model_dir, monkeypatch):
    """SelectiveLM and GroupLM with a LogprobRequest, chunked one row at a time: the log-probs, entropies and
    every gradient of the logits path (token_logprobs / entropy_from_logits on the (N, V) logits)."""
    from align.losses import entropy_from_logits, token_logprobs
    from align.models import GroupLM, LogprobRequest, SelectiveLM, load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(tiny_model_dir)
    ids = torch.randint(5, 60, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    select = torch.zeros_like(ids, dtype=torch.bool)
    select[:, 3:] = True
    select[0, 6] = False
    labels = torch.randint(5, 60, (int(select.sum()),))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)

    def grads_of(fn):
        model.zero_grad()
        lp, ent = fn()
        (lp.sum() + 0.3 * ent.sum()).backward()
        return lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    lm = SelectiveLM(model)

    def by_logits():
        z = lm(ids, select=select, attention_mask=mask, position_ids=pos) / 0.7
        return token_logprobs(z * 0.7, labels, 0.7), entropy_from_logits(z)

    def by_request():
        out = lm(ids, select=select, attention_mask=mask, position_ids=pos,
                 logprobs=LogprobRequest(labels, 0.7, True))
        return out.logp, out.entropy

    a, b = grads_of(by_logits), None
    monkeypatch.setattr(SelectiveLM, "logprob_chunk", 1)
    b = grads_of(by_request)
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)
    for n in a[2]:
        torch.testing.assert_close(a[2][n], b[2][n], atol=1e-5, rtol=1e-4)

    # GroupLM: two prompts, three completions
    prompts, pmask = ids[:2, :4], mask[:2, :4]
    comp, cmask = ids[:, 4:], torch.ones_like(ids[:, 4:])
    cmask[2, 2] = 0
    index = torch.tensor([0, 0, 1])
    g = GroupLM(model)
    n = int(cmask.sum())
    monkeypatch.setattr(SelectiveLM, "logprob_chunk", 0)
    full = g(prompts, attention_mask=pmask, completion_ids=comp, completion_mask=cmask, prompt_index=index,
             logprobs=LogprobRequest(labels[:n], 1.0, True))
    monkeypatch.setattr(SelectiveLM, "logprob_chunk", 2)
    part = g(prompts, attention_mask=pmask, completion_ids=comp, completion_mask=cmask, prompt_index=index,
             logprobs=LogprobRequest(labels[:n], 1.0, True))
    torch.testing.assert_close(full.logp, part.logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.entropy, part.entropy, atol=1e-5, rtol=1e-5)
