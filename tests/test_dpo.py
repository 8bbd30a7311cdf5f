"""DPO family (offline `align dpo`, `align online_dpo`): every loss by hand, per-comparison averaging, limits of the
equations, the shared-prompt forward against separate sequences and a slow loop, cached against live reference
log-probabilities, accumulation and two processes against one, exact resume, online pairs, bad input."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main
from align.comparisons import best_worst_pairs, collate_logps, response_logps, tokenize_comparisons
from align.data import Rows
from align.losses import DPO_LOSSES, REFERENCE_FREE_DPO_LOSSES, dpo_loss
from align.models import SelectiveLM, load_causal_lm, load_tokenizer
from conftest import addition_rows, needs_torchrun, read_metrics, run_torchrun, write_jsonl


def nls(x: float) -> float:  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(str(out), "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------------------------------------------------------
# the losses, by hand
#
# One pair: log π_θ(y_c) = −2, log π_θ(y_r) = −5, log π_ref(y_c) = −3, log π_ref(y_r) = −4, |y_c| = 2, |y_r| = 4.
# h = (−2 − (−3)) − (−5 − (−4)) = 1 − (−1) = 2.

PAIR = [torch.tensor([v]) for v in (-2.0, -5.0, -3.0, -4.0, 2.0, 4.0)]


def one(name, **kw) -> tuple[float, float, float]:
    kw.setdefault("beta", 0.5)
    loss, rc, rr = DPO_LOSSES[name](*PAIR, **kw)
    return loss.item(), rc.item(), rr.item()


def test_each_loss_by_hand():
    # sigmoid, β = 0.5: β·h = 1; −log σ(1) = log(1 + e^−1) = 0.313262; rewards β·(+1) = 0.5, β·(−1) = −0.5
    assert one("sigmoid") == pytest.approx((0.313262, 0.5, -0.5), abs=1e-6)
    # cDPO, ε = 0.1: 0.9·0.313262 + 0.1·(−log σ(−1) = 1.313262) = 0.281936 + 0.131326 = 0.413262
    assert one("sigmoid", label_smoothing=0.1)[0] == pytest.approx(0.413262, abs=1e-6)
    # margin m = 1: −log σ(1 − 1) = log 2
    assert one("sigmoid", margin=torch.tensor([1.0]))[0] == pytest.approx(math.log(2), abs=1e-6)
    # robust, ε = 0.1: (0.9·0.313262 − 0.1·1.313262) / (1 − 0.2) = 0.150610 / 0.8 = 0.188262
    assert one("robust", label_smoothing=0.1)[0] == pytest.approx(0.188262, abs=1e-6)
    # hinge: relu(1 − β·h) = relu(1 − 1) = 0; β = 0.25: relu(1 − 0.5) = 0.5; margin 0.5 at β = 0.5: 0.5
    assert one("hinge")[0] == 0.0
    assert one("hinge", beta=0.25)[0] == pytest.approx(0.5)
    assert one("hinge", margin=torch.tensor([0.5]))[0] == pytest.approx(0.5)
    # ipo, τ = β = 0.5, per-token log-ratios: h̄ = 1/2 − (−1)/4 = 0.75; (0.75 − 1/(2·0.5))² = (−0.25)² = 0.0625
    assert one("ipo")[0] == pytest.approx(0.0625, abs=1e-7)
    # simpo, β = 2, γ = 0.5: rewards 2·(−2/2) = −2 and 2·(−5/4) = −2.5; −log σ(−2 + 2.5 − 0.5) = log 2
    assert one("simpo", beta=2.0, gamma=0.5) == pytest.approx((math.log(2), -2.0, -2.5), abs=1e-6)
    # orpo, λ = β = 0.5: average log-probs −1 and −1.25; log(1 − e^−1) = −0.458675, log(1 − e^−1.25) = −0.337580;
    # log odds ratio = (−1 + 1.25) − (−0.458675 + 0.337580) = 0.25 + 0.121096 = 0.371096;
    # loss = NLL 1 + 0.5·(−log σ(0.371096) = 0.524716) = 1.262358; rewards 0.5·(−1), 0.5·(−1.25)
    assert one("orpo") == pytest.approx((1.262358, -0.5, -0.625), abs=1e-6)
    # the reference-free losses ignore the reference
    for name in REFERENCE_FREE_DPO_LOSSES:
        moved = DPO_LOSSES[name](PAIR[0], PAIR[1], PAIR[2] + 7, PAIR[3] - 3, PAIR[4], PAIR[5], beta=0.5)
        assert moved[0].item() == one(name)[0]


def test_limits_of_the_equations():
    c, r = torch.tensor([-2.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    ref_c, ref_r, lc, lr = PAIR[2:]
    # β → 0: DPO's loss → log 2 − β·h/2 (first order, here h = 2) and its gradient → −β/2 · ∇h (σ(0) = 1/2):
    # −β/2 on the chosen, +β/2 on the rejected
    beta = 1e-6
    loss = DPO_LOSSES["sigmoid"](c, r, ref_c, ref_r, lc, lr, beta=beta)[0].sum()
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2) - beta * 2 / 2, abs=1e-7)
    assert c.grad.item() == pytest.approx(-beta / 2, rel=1e-5) and r.grad.item() == pytest.approx(beta / 2, rel=1e-5)
    # policy = reference: h = 0, DPO's loss is log 2 and both rewards are 0 for any β
    for b in (0.01, 0.1, 5.0):
        assert DPO_LOSSES["sigmoid"](ref_c, ref_r, ref_c, ref_r, lc, lr, beta=b) == \
            pytest.approx((math.log(2), 0.0, 0.0))
    # robust with ε = 0 is DPO; cDPO's optimum is finite: z* = log((1 − ε)/ε) has zero gradient
    assert one("robust") == one("sigmoid")
    eps = 0.2
    z = torch.tensor([math.log((1 - eps) / eps)], requires_grad=True)  # β·h with β = 1, h = z
    DPO_LOSSES["sigmoid"](z, torch.zeros(1), torch.zeros(1), torch.zeros(1), lc, lr, beta=1.0,
                          label_smoothing=eps)[0].sum().backward()
    assert abs(z.grad.item()) < 1e-6
    # IPO regresses h̄ to 1/(2τ): zero loss there; as τ → ∞ the target → 0 and the loss → h̄² = 0.5625
    h_bar_target = torch.tensor([1.0])  # 1/(2·0.5): chosen log-ratio 1 per token over 2 tokens, rejected 0
    assert DPO_LOSSES["ipo"](ref_c + 2 * h_bar_target, ref_r, ref_c, ref_r, lc, lr, beta=0.5)[0].item() == 0.0
    assert one("ipo", beta=1e9)[0] == pytest.approx(0.75 ** 2)
    # ORPO with λ → 0 is the chosen response's SFT loss (mean token NLL): 2/2 = 1
    assert one("orpo", beta=1e-9)[0] == pytest.approx(1.0)
    # SimPO with equal average log-probs: −log σ(−γ) = softplus(γ)
    # (−4 over 2 tokens and −8 over 4: both −2 per token, so r_c = r_r)
    assert DPO_LOSSES["simpo"](torch.tensor([-4.0]), torch.tensor([-8.0]), ref_c, ref_r, lc, lr, beta=2.0,
                               gamma=0.7)[0].item() == pytest.approx(nls(-0.7), abs=1e-6)


def test_dpo_loss_weighs_each_comparison_the_same_and_adds_rpo():
    # comparison 0: a ranked list of 3 (pairs (0,1), (0,2), (1,2)); comparison 1: one pair (3, 4)
    logps = torch.tensor([-1.0, -2.0, -4.0, -3.0, -3.5])
    ref = torch.tensor([-1.5, -1.0, -3.0, -2.0, -4.0])
    lengths = torch.tensor([2, 3, 4, 2, 5])
    better, worse = torch.tensor([0, 0, 1, 3]), torch.tensor([1, 2, 2, 4])
    group = torch.tensor([0, 0, 0, 1])
    for name in DPO_LOSSES:
        loss, stats = dpo_loss(name, logps, ref, lengths, better, worse, group, 2, beta=0.3, rpo_alpha=0.5)
        # the slow loop: each pair's loss + 0.5 · NLL of its chosen, averaged within its comparison, summed
        per = [DPO_LOSSES[name](logps[[b]], logps[[w]], ref[[b]], ref[[w]], lengths[[b]].float(),
                                lengths[[w]].float(), beta=0.3)[0].item() - 0.5 * logps[b].item() / lengths[b].item()
               for b, w in zip(better.tolist(), worse.tolist())]
        assert loss.item() == pytest.approx(sum(per[:3]) / 3 + per[3], rel=1e-6), name
        assert stats["nll"].tolist() == pytest.approx([0.5, 0.5, 2 / 3, 1.5])


# ---------------------------------------------------------------------------------------------------------------
# the forward: shared prompt = separate sequences = a slow loop


def comparison_rows() -> list[dict]:
    rows = [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": str(int(r["answer"]) - 10)}
            for r in addition_rows(10, seed=5)]
    rows += [{"prompt": "What is 12+19?", "responses": ["31", "21", "301", "3"]},
             {"prompt": "What is 10+99?", "responses": ["109", "19"], "margin": 0.5},
             {"prompt": "What is 55+55?", "responses": ["110", "100", "111"], "ranking": [1, 3, 2]}]
    return rows


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def comps(tok):
    rows = comparison_rows()
    return tokenize_comparisons(Rows(rows, "rows.jsonl", list(range(1, len(rows) + 1))), tok, 32)[0]


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa")])
def test_shared_prompt_forward_equals_separate_sequences_and_a_slow_loop(arch, attn, tiny_model_dir, tok, comps,
                                                                         tmp_path):
    from transformers import AutoModelForCausalLM

    from align.tiny import save_tiny_model

    path = tiny_model_dir if arch == "llama" else save_tiny_model(tmp_path / arch, arch=arch, hidden_size=32,
                                                                  num_layers=2, num_heads=4, intermediate_size=64)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()
    with torch.no_grad():
        shared_batch = collate_logps(comps, tok.pad_token_id, share_prompt=True)
        shared = response_logps(SelectiveLM(model), shared_batch, "cpu")
        separate = response_logps(SelectiveLM(model), collate_logps(comps, tok.pad_token_id), "cpu")
        slow = []
        for c in comps:
            for q in c.sequences:  # one unpadded sequence at a time, full log-softmax
                lp = model(torch.tensor([q])).logits[0].log_softmax(-1)
                slow.append(sum(lp[t - 1, q[t]].item() for t in range(c.prompt_len, len(q))))
    torch.testing.assert_close(shared, torch.tensor(slow), atol=2e-5, rtol=0)
    torch.testing.assert_close(separate, torch.tensor(slow), atol=2e-5, rtol=0)
    # the output head ran once per predicting position: the prompt's last token once for all of its responses
    n_tokens = sum(len(q) - c.prompt_len for c in comps for q in c.sequences)
    n_responses = sum(len(c.sequences) for c in comps)
    assert int(shared_batch["select"].sum()) == n_tokens - n_responses + len(comps)
    assert shared_batch["input_ids"].numel() < collate_logps(comps, tok.pad_token_id)["input_ids"].numel()


# ---------------------------------------------------------------------------------------------------------------
# the stage, end to end


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    prompts = [{"prompt": r["prompt"], "answer": r["answer"]} for r in addition_rows(16, seed=7)]
    (d / "rewards.py").write_text(REWARDS)
    return {"prefs": write_jsonl(d / "prefs.jsonl", comparison_rows()),
            "prompts": write_jsonl(d / "prompts.jsonl", prompts), "rewards": str(d / "rewards.py")}


BASE = ["--disable_tqdm", "true", "--logging_steps", "1", "--max_length", "32", "--learning_rate", "1e-3",
        "--seed", "3", "--lr_scheduler_type", "cosine", "--beta", "0.2"]


def dpo(model, files, out, *extra) -> str:
    argv = ["dpo", "--model", model, "--train_data", files["prefs"], "--output_dir", str(out), *BASE, *extra]
    assert main(argv) == 0
    return str(out)


def test_dpo_first_step_cached_reference_and_live_reference(tiny_model_dir, files, tmp_path):
    cached = dpo(tiny_model_dir, files, tmp_path / "cached", "--max_steps", "2", "--per_device_train_batch_size", "4",
                 "--eval_data", files["prefs"])
    m = read_metrics(cached)
    # step 1 starts at policy = reference: h = 0 for every pair, loss log 2, rewards 0
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(m[0]["rewards_chosen"]) < 1e-5 and m[0]["rewards_accuracies"] <= 0.5
    for key in ("rewards_rejected", "rewards_margins", "logps_chosen", "logps_rejected", "nll_loss", "grad_norm",
                "eval_loss", "eval_rewards_accuracies"):
        assert math.isfinite(m[-1][key]), key
    assert m[0]["pairs"] >= 4  # 4 comparisons, ranked lists among them give more than one pair
    # the cache holds the reference's log-probabilities of every response, as a live forward computes them
    from align.comparisons import load_comparisons

    tok = load_tokenizer(tiny_model_dir)
    comps, _ = load_comparisons(files["prefs"], "train", tok, 32)
    with torch.no_grad():
        live_ref = response_logps(SelectiveLM(load_causal_lm(tiny_model_dir).eval()),
                                  collate_logps(comps, tok.pad_token_id, True), "cpu")
    cache = load_file(os.path.join(cached, "ref_log_probs.safetensors"))
    torch.testing.assert_close(cache["train"], live_ref, atol=1e-5, rtol=0)
    assert set(cache) == {"train", "eval"}
    # without precomputation the reference (a second copy) runs beside the policy: the same training
    live = dpo(tiny_model_dir, files, tmp_path / "live", "--max_steps", "2", "--per_device_train_batch_size", "4",
               "--precompute_ref_log_probs", "false")
    assert not os.path.exists(os.path.join(live, "ref_log_probs.safetensors"))
    assert max_diff(weights(cached), weights(live)) < 1e-6
    assert max_diff(weights(cached), load_file(os.path.join(tiny_model_dir, "model.safetensors"))) > 1e-4
    # the live reference in bf16 (frozen_dtype): the same training up to bf16 rounding of its log-probs
    bf16 = dpo(tiny_model_dir, files, tmp_path / "bf16", "--max_steps", "2", "--per_device_train_batch_size", "4",
               "--precompute_ref_log_probs", "false", "--frozen_dtype", "bfloat16")
    first = read_metrics(bf16)[0]["loss"]  # log 2 up to the bf16 reference's rounding
    assert first != pytest.approx(math.log(2), abs=1e-6) and first == pytest.approx(math.log(2), abs=1e-3)
    assert 0 < max_diff(weights(live), weights(bf16)) < 1e-3


def test_accumulation_and_separate_sequences_give_the_same_update(tiny_model_dir, files, tmp_path):
    a = dpo(tiny_model_dir, files, tmp_path / "b4", "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--rpo_alpha", "0.5")
    b = dpo(tiny_model_dir, files, tmp_path / "b1x4", "--max_steps", "2", "--per_device_train_batch_size", "1",
            "--gradient_accumulation_steps", "4", "--rpo_alpha", "0.5", "--share_prompt", "false")
    assert max_diff(weights(a), weights(b)) < 1e-6
    assert [r["loss"] for r in read_metrics(a)] == pytest.approx([r["loss"] for r in read_metrics(b)], abs=1e-6)


def test_dpo_resumes_exactly(tiny_model_dir, files, tmp_path):
    common = ("--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "3",
              "--loss_type", "ipo")
    out = dpo(tiny_model_dir, files, tmp_path / "run", *common)
    full_m, full_w = read_metrics(out), weights(out)
    dpo(tiny_model_dir, files, out, *common, "--resume_from_checkpoint", "latest")
    res_m = read_metrics(out)
    assert [r["step"] for r in res_m] == [1, 2, 3, 4]
    assert [r["loss"] for r in res_m] == [r["loss"] for r in full_m]
    assert all(torch.equal(full_w[k], weights(out)[k]) for k in full_w)


@needs_torchrun
def test_two_processes_equal_one_process_with_double_accumulation(tiny_model_dir, files, tmp_path):
    common = ["dpo", "--model", tiny_model_dir, "--train_data", files["prefs"], "--max_steps", "2",
              "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4", *BASE]
    run_torchrun(29637, *common, "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "ddp"))
    assert main([*common, "--gradient_accumulation_steps", "4", "--output_dir", str(tmp_path / "one")]) == 0
    assert max_diff(weights(tmp_path / "ddp"), weights(tmp_path / "one")) < 1e-6
    # the reference cache was computed in chunks spread over the two processes: the same values
    assert torch.equal(load_file(str(tmp_path / "ddp" / "ref_log_probs.safetensors"))["train"],
                       load_file(str(tmp_path / "one" / "ref_log_probs.safetensors"))["train"])


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_train_without_a_reference(tiny_model_dir, files, tmp_path, loss_type):
    out = dpo(tiny_model_dir, files, tmp_path / loss_type, "--max_steps", "1", "--per_device_train_batch_size", "4",
              "--loss_type", loss_type)
    assert not os.path.exists(os.path.join(out, "ref_log_probs.safetensors"))
    assert math.isfinite(read_metrics(out)[0]["loss"])


@pytest.mark.parametrize("rows,extra,message", [
    ([{"prompt": "What is 1+2?", "chosen": "3"}], [], "rows.jsonl: line 1, field 'rejected'"),
    ([{"prompt": "What is 1+2?", "chosen": "3", "rejected": "3"}], [], "chosen and rejected are identical"),
    ([{"prompt": "What is 1+2?", "chosen": "3", "rejected": "4", "margin": "big"}], [], "field 'margin'"),
    ([{"prompt": "What is 1+2?", "chosen": "3", "rejected": "4"}], ["--loss_type", "hinge", "--label_smoothing",
                                                                    "0.1"], "label_smoothing applies to"),
    ([{"prompt": "What is 1+2?", "chosen": "3", "rejected": "4"}], ["--loss_type", "dpo"], "loss_type"),
])
def test_bad_input_fails_in_one_line_before_writing(tiny_model_dir, tmp_path, capsys, rows, extra, message):
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "never"
    assert main(["dpo", "--model", tiny_model_dir, "--train_data", data, "--output_dir", str(out), *BASE,
                 *extra]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any(message in line for line in err), err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# online DPO

REWARDS = '''
def ordsum(prompts, completions, **kw):
    """Varies from completion to completion of a random model: groups almost never tie."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


def constant(prompts, completions, **kw):
    return [1.0 for _ in completions]
'''

ONLINE = ["--disable_tqdm", "true", "--logging_steps", "1", "--seed", "3", "--max_new_tokens", "4",
          "--max_length", "32", "--learning_rate", "1e-3", "--num_generations", "3", "--per_device_train_batch_size",
          "4", "--beta", "0.2"]


def online(model, files, out, *extra) -> str:
    argv = ["online_dpo", "--model", model, "--train_data", files["prompts"], "--output_dir", str(out), *ONLINE,
            *extra]
    assert main(argv) == 0
    return str(out)


def test_best_worst_pairs():
    # groups of 3: [1, 5, 2] -> (1, 0); [4, 4, 4] -> none (all equal); [0, 3, 3] -> (7, 6), the first of equal maxima
    rewards = torch.tensor([1.0, 5.0, 2.0, 4.0, 4.0, 4.0, 0.0, 3.0, 3.0])
    better, worse = best_worst_pairs(rewards, 3)
    assert better.tolist() == [1, 7] and worse.tolist() == [0, 6]


def test_online_dpo_trains_on_its_own_pairs_and_resumes_exactly(tiny_model_dir, files, tmp_path):
    common = ("--max_steps", "3", "--save_steps", "2", "--reward_funcs", f"{files['rewards']}:ordsum",
              "--gold_reward_funcs", "exact_match", "--gradient_accumulation_steps", "2", "--eval_data",
              files["prompts"], "--eval_max_samples", "4")
    out = online(tiny_model_dir, files, tmp_path / "run", *common)
    full_m, full_w = read_metrics(out), weights(out)
    r0 = full_m[0]
    for key in ("reward", "gold_exact_match", "kl", "loss", "rewards_chosen", "rewards_accuracies",
                "rewards_margins", "logps_chosen", "logps_rejected", "pairs", "pair_frac", "grad_norm"):
        assert key in r0 and math.isfinite(r0[key]), key
    assert r0["pairs"] >= 1 and abs(r0["kl"]) < 1e-4  # the first samples come from the reference itself
    assert r0["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert "eval_exact_match" in full_m[-1]
    online(tiny_model_dir, files, out, *common, "--resume_from_checkpoint", "latest")
    res_m = read_metrics(out)
    assert [r["step"] for r in res_m] == [1, 2, 3]
    assert [r["loss"] for r in res_m] == [r["loss"] for r in full_m]
    assert all(torch.equal(full_w[k], weights(out)[k]) for k in full_w)


def test_online_dpo_groups_of_equal_rewards_give_no_pair_and_no_update(tiny_model_dir, files, tmp_path):
    out = online(tiny_model_dir, files, tmp_path / "tie", "--max_steps", "2", "--reward_funcs",
                 f"{files['rewards']}:constant", "--loss_type", "simpo")
    assert [r["pairs"] for r in read_metrics(out)] == [0, 0]
    assert max_diff(weights(out), load_file(os.path.join(tiny_model_dir, "model.safetensors"))) == 0


def test_recipes_and_pipeline_know_the_stages(monkeypatch):
    from align.pipeline import PipelineConfig, stage_config
    from align.stages import RL_STAGES

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(root)
    assert {"dpo", "online_dpo"} <= set(RL_STAGES)
    for stage in ("dpo", "online_dpo"):
        recipe = getattr(PipelineConfig(), stage)
        cfg = stage_config(stage, recipe, {"model": "runs/tiny/sft", "output_dir": "x"}, {})
        assert cfg.model == "runs/tiny/sft" and cfg.max_steps > 0
        if stage == "dpo":
            assert all(os.path.isfile(p) for p in cfg.train_data.split(","))
