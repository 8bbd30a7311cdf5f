"""TRPO: the Fisher-vector product against the explicit KL Hessian and Fisher matrix of a tiny model, the exact
KL by hand, the line search by hand (every rejection reason), the trust region holding on real steps, micro-batch
invariance, a rejected step leaving the policy untouched and logged, and tiny end-to-end runs that save (full
weights; LoRA with a value head and accumulation). Conjugate gradient and the step size are tested in
test_optim_math.py."""

import copy
import logging
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main
from align.data import encode_prompt, left_pad
from align.losses import categorical_kl
from align.models import SelectiveLM, load_causal_lm, load_tokenizer
from align.optim_math import backtracking_line_search, flat_grad, hessian_vector_product
from align.rollout import Rollout, generate, logprobs_from_selected, sequence_inputs
from align.trainers.trpo import TrustRegionProblem, differentiable_attention, surrogate, trpo_update
from conftest import read_metrics

PROMPTS = ["What is 12+34?", "What is 56+78?", "Hi", "What is 9+91?"]
TEMP = 0.8


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir)
    ids, att = left_pad([encode_prompt(tok, p) for p in PROMPTS], tok.pad_token_id)
    s = generate(model, ids, att, 4, temperature=TEMP, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                 generator=torch.Generator().manual_seed(0))
    r = Rollout(**vars(s))
    adv = torch.randn(r.completion_mask.shape, generator=torch.Generator().manual_seed(1))
    return model, r, adv


def _full_logprobs(lm, r, temperature):
    x = sequence_inputs(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    z = lm(x["input_ids"], x["select"], x["attention_mask"], x["position_ids"])
    return torch.log_softmax(z / temperature, -1), z


# ---------------------------------------------------------------------------------------------------------------
# pure pieces by hand


def test_categorical_kl_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
    logits = torch.log(torch.tensor([[0.25, 0.75, 1e-30]]))  # p = [.25, .75, ~0]
    # KL = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln 2 + .5 ln(2/3); the third token has p_old = 0 and adds 0
    expect = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert categorical_kl(old, logits).item() == pytest.approx(expect, abs=1e-6)
    # temperature 2 halves the logits: softmax([ln .5, ln 1.5]) after dividing ln(.25), ln(.75) by 2 ~ sqrt ratio
    p = torch.softmax(logits[:, :2] / 2, -1)[0]
    expect_t = 0.5 * math.log(0.5 / p[0].item()) + 0.5 * math.log(0.5 / p[1].item())
    assert categorical_kl(old[:, :2], logits[:, :2], temperature=2.0).item() == pytest.approx(expect_t, abs=1e-6)
    assert categorical_kl(old, old).item() == 0.0


def test_hessian_vector_product_of_a_quadratic():
    # f = 1/2 th^T A th  ->  grad = A th, H = A; with A = [[2, 1], [1, 3]] and v = [1, -1]: Hv = [1, -2]
    a = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    th = torch.tensor([0.3, -0.7], dtype=torch.float64, requires_grad=True)
    grad = flat_grad(0.5 * th @ a @ th, [th], create_graph=True)
    hv = hessian_vector_product(grad, [th], torch.tensor([1.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(hv, torch.tensor([1.0, -2.0], dtype=torch.float64))
    # the graph is kept: a second product from the same gradient
    hv2 = hessian_vector_product(grad, [th], torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(hv2, torch.tensor([1.0, 3.0], dtype=torch.float64))


def test_line_search_by_hand_and_every_rejection_reason():
    # expected improvement 2.0 for the full step; candidates f = 1, 0.5, 0.25, 0.125
    script = {1.0: (1.0, 0.05), 0.5: (-0.1, 0.004), 0.25: (0.01, 0.001), 0.125: (0.2, 0.0005)}
    tried = []

    def evaluate(f):
        tried.append(f)
        return script[f]

    res = backtracking_line_search(evaluate, 2.0, max_kl=0.01, max_steps=4, backtrack_ratio=0.5, accept_ratio=0.1)
    # f=1: KL .05 > .01; f=.5: gain < 0; f=.25: gain .01 < .1 * .25 * 2 = .05; f=.125: .2 >= .1 * .125 * 2 = .025
    assert tried == [1.0, 0.5, 0.25, 0.125]
    assert res.accepted and res.fraction == 0.125 and res.steps == 4
    assert (res.rejected_kl, res.rejected_improvement) == (1, 2)
    assert res.improvement == 0.2 and res.kl == 0.0005 and res.expected == pytest.approx(0.25)
    # KL within the tolerance: .012 <= .01 * (1 + .5) is accepted at once
    res = backtracking_line_search(lambda f: (1.0, 0.012), 2.0, 0.01, kl_tolerance=0.5)
    assert res.accepted and res.steps == 1
    # nothing acceptable: rejected, counted by reason, with the last reason in words
    res = backtracking_line_search(lambda f: (float("nan"), 0.0) if f == 1 else (1.0, 1.0), 2.0, 0.01, max_steps=3)
    assert not res.accepted and res.fraction == 0.0 and res.steps == 3
    assert (res.rejected_nonfinite, res.rejected_kl) == (1, 2) and "KL" in res.last_reason


def test_surrogate_is_the_unclipped_ratio_times_advantage():
    logp = torch.log(torch.tensor([[0.6, 0.2, 0.9]]))
    old = torch.log(torch.tensor([[0.3, 0.4, 0.9]]))  # ratios 2, 0.5, (masked)
    adv = torch.tensor([[1.0, -2.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    # token mean of [2*1, 0.5*-2] = (2 - 1) / 2 = 0.5
    assert surrogate(logp, old, adv, mask).item() == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------------------
# the Fisher-vector product on a tiny model


@pytest.mark.parametrize("product", ["gauss_newton", "kl_hessian"])
def test_fisher_vector_product_matches_explicit_kl_hessian_and_fisher(tiny, product):
    from torch.func import functional_call

    model, r, adv = tiny
    lm = SelectiveLM(copy.deepcopy(model))
    # few trainable parameters (96) so the explicit matrices are cheap: the last layer's norms and the final norm
    keep = ("model.model.layers.1.input_layernorm.weight", "model.model.layers.1.post_attention_layernorm.weight",
            "model.model.norm.weight")
    for n, p in lm.named_parameters():
        p.requires_grad_(n in keep)
    names = [n for n, p in lm.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in lm.named_parameters() if p.requires_grad]
    theta0 = torch.cat([p.detach().reshape(-1) for n, p in lm.named_parameters() if p.requires_grad])
    x = sequence_inputs(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)

    def logp_of(theta):
        params, at = {}, 0
        for n, sh in zip(names, shapes):
            params[n] = theta[at:at + sh.numel()].view(sh)
            at += sh.numel()
        z = functional_call(lm, params, (x["input_ids"], x["select"], x["attention_mask"], x["position_ids"]))
        return torch.log_softmax(z / TEMP, -1)

    with torch.no_grad():
        old = logp_of(theta0)
    n_tok = old.shape[0]
    assert n_tok == int(r.completion_mask.sum())
    with differentiable_attention():
        # explicit Hessian of the mean KL(pi_old || pi_theta) at theta_old
        hess = torch.autograd.functional.hessian(lambda t: (old.exp() * (old - logp_of(t))).sum() / n_tok, theta0)
        # explicit Fisher: mean over positions of sum_v p_v grad log p_v grad log p_v^T
        jac = torch.autograd.functional.jacobian(logp_of, theta0, vectorize=True, strategy="forward-mode")
    fisher = torch.einsum("nv,nvi,nvj->ij", old.exp(), jac, jac) / n_tok
    torch.testing.assert_close(hess, fisher, atol=1e-5, rtol=1e-4)  # at theta_old the two are the same matrix

    prob = TrustRegionProblem(lm, r, adv, temperature=TEMP, damping=0.0, fisher=product)
    prob2 = TrustRegionProblem(lm, r, adv, temperature=TEMP, damping=0.1, micro_batches=2, fisher=product)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        v = torch.randn(theta0.shape, generator=gen)
        expect = fisher @ v
        torch.testing.assert_close(prob.fvp(v), expect, atol=1e-5, rtol=1e-4)
        # two micro-batches give the same product; damping adds lambda v
        torch.testing.assert_close(prob2.fvp(v), expect + 0.1 * v, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(prob.g, prob2.g, atol=1e-6, rtol=1e-5)
    # fisher_fraction 0.5: F from rows 0 and 2 only (evenly spaced), g still from every row
    half = TrustRegionProblem(lm, r, adv, temperature=TEMP, fisher_fraction=0.5, fisher=product)
    only = TrustRegionProblem(lm, r.subset([0, 2]), adv[[0, 2]], temperature=TEMP, fisher=product)
    torch.testing.assert_close(half.fvp(v), only.fvp(v), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(half.g, prob.g, atol=1e-6, rtol=1e-5)
    # g is the policy gradient: token mean of A * grad log pi at theta_old
    lm.zero_grad()
    logp, _ = logprobs_from_selected(lm(x["input_ids"], x["select"], x["attention_mask"], x["position_ids"]),
                                     r.completion_ids, r.completion_mask, TEMP)
    ((adv * logp)[r.completion_mask.bool()].mean()).backward()
    g = torch.cat([p.grad.reshape(-1) for n, p in lm.named_parameters() if p.requires_grad])
    torch.testing.assert_close(prob.g, g, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the trust region on real steps


@pytest.mark.parametrize("max_kl,tol", [(1e-3, 0.0), (1e-2, 0.0), (5e-2, 0.5)])
def test_trpo_step_stays_in_the_trust_region(tiny, max_kl, tol):
    model, r, adv = tiny
    old = SelectiveLM(model)
    lm = SelectiveLM(copy.deepcopy(model))
    res, stats = trpo_update(lm, r, adv, max_kl=max_kl, temperature=TEMP, kl_tolerance=tol)
    assert res.accepted and stats["trpo_accepted"] == 1.0
    # measured independently: the mean exact KL(pi_old || pi_new) over the rollout's tokens
    with torch.no_grad():
        lp_old, _ = _full_logprobs(old, r, TEMP)
        _, z_new = _full_logprobs(lm, r, TEMP)
        kl = categorical_kl(lp_old, z_new, TEMP).mean().item()
        logp_new, _ = logprobs_from_selected(z_new, r.completion_ids, r.completion_mask, TEMP)
        logp_old, _ = logprobs_from_selected(lp_old, r.completion_ids, r.completion_mask)
        gain = surrogate(logp_new, logp_old, adv, r.completion_mask).item() - surrogate(
            logp_old, logp_old, adv, r.completion_mask).item()
    assert 0 < kl <= max_kl * (1 + tol) + 1e-7
    assert kl == pytest.approx(stats["step_kl"], rel=1e-4, abs=1e-8)
    assert gain > 0 and gain == pytest.approx(stats["improvement_actual"], rel=1e-3, abs=1e-6)
    assert stats["cg_residual"] < stats["grad_norm"]


def test_rejected_step_leaves_the_policy_untouched(tiny):
    model, r, adv = tiny
    lm = SelectiveLM(copy.deepcopy(model))
    before = [p.detach().clone() for p in lm.parameters()]
    # no step can give 1e6 x its linear prediction: all rejected for too little improvement
    res, stats = trpo_update(lm, r, adv, max_kl=0.01, accept_ratio=1e6, line_search_steps=3)
    assert not res.accepted and res.rejected_improvement == 3 and stats["step_kl"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, lm.parameters()))


# ---------------------------------------------------------------------------------------------------------------
# end to end

BASE = ["--disable_tqdm", "true", "--logging_steps", "1", "--seed", "3", "--max_new_tokens", "3",
        "--per_device_train_batch_size", "2", "--num_generations", "2", "--max_length", "32", "--beta", "0"]
def test_trpo_runs_logs_and_saves(tiny_model_dir, diversity_data, tmp_path):
    prompts, reward = diversity_data
    out = str(tmp_path / "o")
    assert main(["trpo", "--model", tiny_model_dir, "--train_data", prompts, "--output_dir", out, *BASE,
                 "--max_steps", "2", "--reward_funcs", reward, "--gold_reward_funcs", "exact_match",
                 "--baseline", "group_mean", "--max_kl", "0.02", "--eval_data", prompts,
                 "--eval_max_samples", "4"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "gold_exact_match", "step_kl", "line_search_steps", "improvement_expected",
                "improvement_actual", "cg_residual", "trpo_accepted", "psi_mean"):
        assert key in rows[0] and math.isfinite(rows[0][key]), key
    assert "eval_exact_match" in rows[-1]
    assert any(r["trpo_accepted"] == 1.0 for r in rows)
    assert all(r["step_kl"] <= 0.02 for r in rows)
    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    after = load_file(os.path.join(out, "model.safetensors"))
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 0


def test_rejection_is_logged_and_nothing_moves(tiny_model_dir, diversity_data, tmp_path, caplog):
    prompts, reward = diversity_data
    out = str(tmp_path / "rej")
    with caplog.at_level(logging.WARNING, logger="align.trainers.trpo"):
        assert main(["trpo", "--model", tiny_model_dir, "--train_data", prompts, "--output_dir", out, *BASE,
                     "--max_steps", "1", "--reward_funcs", reward, "--accept_ratio", "1e6",
                     "--line_search_steps", "2"]) == 0
    assert "line search rejected all 2 candidate steps" in caplog.text and "the policy is unchanged" in caplog.text
    row = read_metrics(out)[0]
    assert row["trpo_accepted"] == 0.0 and row["ls_rejected_improvement"] == 2.0 and row["step_kl"] == 0.0
    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    after = load_file(os.path.join(out, "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_trpo_with_lora_critic_and_accumulation(tiny_model_dir, diversity_data, tmp_path):
    prompts, reward = diversity_data
    out = str(tmp_path / "lora")
    assert main(["trpo", "--model", tiny_model_dir, "--train_data", prompts, "--output_dir", out, *BASE,
                 "--max_steps", "2", "--reward_funcs", reward, "--use_lora", "true", "--lora_r", "2",
                 "--psi", "gae", "--value_model", "policy", "--gradient_accumulation_steps", "2",
                 "--beta", "0.1", "--vf_iters", "2"]) == 0
    rows = read_metrics(out)
    for key in ("value_loss", "explained_variance", "kl", "step_kl"):
        assert key in rows[0], key
    assert all(r["step_kl"] <= 0.01 for r in rows)
    assert os.path.isfile(os.path.join(out, "adapter_config.json"))
    assert os.path.isfile(os.path.join(out, "value_head.safetensors"))


@pytest.mark.parametrize("var,name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_trpo_refuses_sharded_strategies_in_one_line(var, name, tiny_model_dir, diversity_data, tmp_path,
                                                      monkeypatch, capsys):
    """What `accelerate launch` with an FSDP / DeepSpeed config tells the process: TRPO stops before anything is
    loaded or written, naming the strategy and what to use instead."""
    monkeypatch.setenv(var, "true")
    prompts, reward = diversity_data
    out = tmp_path / "o"
    assert main(["trpo", "--model", tiny_model_dir, "--train_data", prompts, "--reward_funcs", reward,
                 "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"not {name}" in err[0] and "ddp.yaml" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("stage", ["trpo", "online_dpo"])
def test_token_budget_is_refused_where_updates_are_not_cut_by_length(stage, tiny_model_dir, diversity_data, tmp_path,
                                                                   capsys):
    prompts, reward = diversity_data
    out = tmp_path / "o"
    assert main([stage, "--model", tiny_model_dir, "--train_data", prompts, "--reward_funcs", reward,
                 "--output_dir", str(out), "--max_tokens_per_micro_batch", "256"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: max_tokens_per_micro_batch applies to ppo, grpo and reinforce, not {stage} (its "
                   f"micro-batches are gradient_accumulation_steps equal parts)"]
    assert not out.exists()
