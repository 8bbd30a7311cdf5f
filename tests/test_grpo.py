"""GRPO: the stage's own math and wiring (the advantage functions and aggregation modes themselves are tested in
test_advantages.py and test_losses.py): settings reaching the math, the loss against a slow loop and split into
micro-batches, zero-std groups, stored old log-probabilities for mu > 1, no reference with beta = 0, the
prompt-once sampling path, reference resets, reward-model replay, exact resume and input validation."""

import math
import os

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main
import align.advantages as A
from align.comparisons import group_comparisons
from align.losses import LOSS_TYPES, POLICY_LOSSES, grpo_loss
from align.models import GroupLM
from align.trainers import grpo as G
from conftest import addition_rows, mixed_prompts, read_metrics, write_jsonl

BASE = ["--disable_tqdm", "true", "--logging_steps", "1", "--seed", "3", "--max_new_tokens", "4",
        "--max_length", "32", "--learning_rate", "1e-3", "--num_generations", "4",
        "--per_device_train_batch_size", "8"]

REWARDS = '''
def ordsum(prompts, completions, **kw):
    """Varies from completion to completion of a random model: groups almost never tie."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


def constant(prompts, completions, **kw):
    return [1.0 for _ in completions]


def mixed(prompts, completions, **kw):
    """Constant for prompts with a 1 in them (zero-std groups), varying for the others."""
    return [0.0 if "1" in p else float(sum(map(ord, c)) % 5) for p, c in zip(prompts, completions)]
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in addition_rows(24, seed=7)]
    prefs = [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": str(int(r["answer"]) + 1)}
             for r in addition_rows(6, seed=8)]
    (d / "rewards.py").write_text(REWARDS)
    return {"prompts": write_jsonl(d / "rl.jsonl", rows), "prefs": write_jsonl(d / "prefs.jsonl", prefs),
            "rewards": str(d / "rewards.py")}


def grpo(model, files, out, *extra):
    argv = ["grpo", "--model", model, "--train_data", files["prompts"], "--output_dir", str(out), *BASE, *extra]
    assert main(argv) == 0
    return str(out)


def fn(files, name):
    return f"{files['rewards']}:{name}"


# ---------------------------------------------------------------------------------------------------------------
# pure pieces


def test_scale_rewards_maps_onto_the_advantage_table_by_hand():
    r = torch.tensor([1.0, 3.0, 0.0, 0.0, 2.0, 6.0, 5.0, 5.0])  # two groups of 4
    # group 1: mean 1, centred [0, 2, -1, -1]; group 2: mean 4.5, centred [-2.5, 1.5, 0.5, 0.5]
    centred = torch.tensor([0.0, 2.0, -1.0, -1.0, -2.5, 1.5, 0.5, 0.5])
    none = A.grpo_advantages(r, 4, "zscore", "none")
    torch.testing.assert_close(none, centred)  # no std: Dr. GRPO's R - mean
    # batch: one std over all 8 rewards (unbiased): mean 22/8 = 2.75, sum of squares 100 -> var (100 - 8*2.75^2)/7
    batch_std = math.sqrt((100 - 8 * 2.75 ** 2) / 7)
    torch.testing.assert_close(A.grpo_advantages(r, 4, "zscore", "batch"), centred / (batch_std + 1e-4))
    # group: each group's unbiased std: sqrt(6/3) and sqrt(9/3)
    group = centred / torch.tensor([math.sqrt(2)] * 4 + [math.sqrt(3)] * 4)
    torch.testing.assert_close(A.grpo_advantages(r, 4, "zscore", "group", eps=0.0), group)
    # softmax with temperature 0.5 sums to zero per group and ignores scale_rewards=none
    soft = A.grpo_advantages(r, 4, "softmax", "none", softmax_beta=0.5)
    torch.testing.assert_close(soft, torch.softmax(0.5 * r.view(2, 4), 1).flatten() - 0.25)
    assert soft.view(2, 4).sum(1).abs().max() < 1e-6
    assert A.group_reward_std(r, 4).item() == pytest.approx((math.sqrt(2) + math.sqrt(3)) / 2)


def _slow_grpo_loss(logp, old, adv, mask, eps_lo, eps_hi, beta, ref, mode, max_len):
    """One token at a time: -min(rA, clip(r)A) + beta*k3, then the aggregation written out."""
    per_seq, count_tok, total_tok, n_seq = [], 0, 0.0, 0
    for b in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            r = math.exp(logp[b, t] - old[b, t])
            a = float(adv[b])
            term = -min(r * a, min(max(r, 1 - eps_lo), 1 + eps_hi) * a)
            x = float(ref[b, t] - logp[b, t])
            terms.append(term + beta * (math.exp(x) - x - 1))
        if terms:
            n_seq += 1
            count_tok += len(terms)
            total_tok += sum(terms)
            per_seq.append({"seq-mean-token-mean": sum(terms) / len(terms), "seq-mean-token-sum": sum(terms),
                            "seq-mean-token-sum-norm": sum(terms) / max_len}.get(mode, 0.0))
    if mode == "token-mean":
        return total_tok / count_tok
    return sum(per_seq) / n_seq


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_grpo_loss_matches_a_slow_loop_and_splits_exactly(loss_type):
    g = torch.Generator().manual_seed(0)
    b, t = 6, 5
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    old = logp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    ref = logp + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                         [1, 1, 0, 0, 0]])
    mode = LOSS_TYPES[loss_type]
    kw = dict(epsilon=0.2, epsilon_high=0.28, agg=mode, max_len=8, beta=0.04)
    loss, stats = grpo_loss(logp, old, adv, mask, ref_logp=ref, **kw)
    expect = _slow_grpo_loss(logp, old, adv, mask, 0.2, 0.28, 0.04, ref, mode, 8)
    assert loss.item() == pytest.approx(expect, rel=1e-12)
    assert stats["kl_penalty"].item() > 0 and "clip_frac" in stats
    # two micro-batches with the whole batch's count as num_items sum to the whole loss
    n = float(mask.sum()) if mode == "token-mean" else float(b)
    halves = [grpo_loss(logp[i], old[i], adv[i], mask[i], ref_logp=ref[i], num_items=n, **kw)[0]
              for i in (slice(0, 2), slice(2, 6))]
    assert (halves[0] + halves[1]).item() == pytest.approx(loss.item(), rel=1e-12)


def test_group_comparisons_pair_only_completions_ranked_apart():
    texts = ["12", "13", "12", "14", "5", "5", "5", "5"]
    labels = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    out = group_comparisons(labels, texts, 4)
    # group 1: distinct texts at rows 0, 1, 3 ("12" once); "12" (label 1) beats "13" and "14", which tie
    assert out == [([0, 1, 3], [(0, 1), (0, 2)])]  # group 2: one distinct text, no comparison
    assert G.rows_with_gradient(torch.tensor([0.0, 0.5, 0.0, -1.0]), beta=0.0).tolist() == [1, 3]
    assert G.rows_with_gradient(torch.tensor([0.0, 0.5]), beta=0.1).tolist() == [0, 1]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "phi"])
def test_prompt_once_training_forward_equals_the_full_forward(arch, tmp_path):
    """GroupLM encodes each prompt once for all its completions: same logits and gradients as the forward over
    every prompt + completion, with partial groups, prompts of different lengths and completions cut at EOS."""
    from align.data import encode_prompt, left_pad
    from align.models import SelectiveLM, load_causal_lm, load_tokenizer
    from align.rollout import Rollout, generate, make_generator, sequence_inputs
    from align.tiny import save_tiny_model

    path = save_tiny_model(tmp_path / arch, arch=arch, hidden_size=32, num_layers=2, num_heads=4,
                           intermediate_size=64)
    tok, model = load_tokenizer(path), load_causal_lm(path)
    ids, att = left_pad([encode_prompt(tok, p) for p in ["What is 1+2?", "Hi", "What is 33+44?"]], tok.pad_token_id)
    free = generate(model, ids, att, 5, eos_id=None, pad_id=tok.pad_token_id, generator=make_generator("cpu", 1),
                    num_return_sequences=3)
    # the second token of row 0 as EOS: the same random numbers end row 0 early (each row's tokens depend on its
    # own numbers), and rows that never draw it run to 5 tokens
    eos = int(free.completion_ids[0, 1])
    s = generate(model, ids, att, 5, eos_id=eos, pad_id=tok.pad_token_id, generator=make_generator("cpu", 1),
                 num_return_sequences=3)
    r = Rollout(**vars(s), group_size=3)
    assert (r.completion_mask.sum(-1) < 5).any() and (r.completion_mask.sum(-1) == 5).any()
    idx = torch.tensor([0, 2, 3, 4, 5, 7])  # prompt 0 twice, prompt 1 three times, prompt 2 once
    sub, first, prompt_index = G.group_inputs(r, idx, 3)
    assert prompt_index.tolist() == [0, 0, 1, 1, 1, 2] and first.tolist() == [0, 2, 5]

    def run(fn):
        lm = GroupLM(model)
        lm.zero_grad()
        logits = fn(lm)
        (logits.float().log_softmax(-1)[:, 7:40].sum()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}

    inp = sequence_inputs(sub.prompt_ids, sub.prompt_mask, sub.completion_ids, sub.completion_mask)
    full, g_full = run(lambda lm: lm(inp["input_ids"], select=inp["select"], attention_mask=inp["attention_mask"],
                                     position_ids=inp["position_ids"]))
    once, g_once = run(lambda lm: lm(sub.prompt_ids[first], attention_mask=sub.prompt_mask[first],
                                     completion_ids=sub.completion_ids, completion_mask=sub.completion_mask,
                                     prompt_index=prompt_index))
    assert once.shape == full.shape == (int(sub.completion_mask.sum()), len(tok))
    torch.testing.assert_close(once, full, atol=2e-5, rtol=1e-5)
    assert g_once.keys() == g_full.keys() and len(g_full) > 0
    for k in g_full:
        torch.testing.assert_close(g_once[k], g_full[k], atol=2e-5, rtol=1e-4)
    assert isinstance(GroupLM(model), SelectiveLM)


# ---------------------------------------------------------------------------------------------------------------
# the stage


def test_settings_reach_the_math_and_skipping_zero_advantage_rows_changes_nothing(tiny_model_dir, files,
                                                                                  tmp_path, monkeypatch):
    seen = []
    real_adv = A.group_advantages

    def spy(rewards, group_size, kind, beta, eps, scale):
        seen.append((group_size, kind, beta, scale))
        return real_adv(rewards, group_size, kind, beta, eps, scale)

    monkeypatch.setattr(A, "group_advantages", spy)
    common = ("--max_steps", "2", "--reward_funcs", fn(files, "mixed"), "--advantage", "softmax",
              "--softmax_beta", "2.5", "--scale_rewards", "none", "--gradient_accumulation_steps", "2")
    out = grpo(tiny_model_dir, files, tmp_path / "skip", *common)
    assert seen == [(4, "softmax", 2.5, "group")] * 2
    rows = read_metrics(out)
    assert all(0 < r["zero_std_frac"] < 1 and r["trained_frac"] == 1 - r["zero_std_frac"] for r in rows)
    # the same run computing every completion gives the same model
    monkeypatch.setattr(G, "rows_with_gradient", lambda adv, beta: torch.arange(adv.shape[0]))
    full = grpo(tiny_model_dir, files, tmp_path / "full", *common)
    assert [r["trained_frac"] for r in read_metrics(full)] == [1.0, 1.0]
    for key in ("reward", "loss", "zero_std_frac"):
        assert [r[key] for r in read_metrics(full)] == pytest.approx([r[key] for r in rows], rel=1e-5, abs=1e-7)
    a, b = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(full, "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_all_equal_rewards_give_zero_advantage_and_no_update(tiny_model_dir, files, tmp_path):
    out = grpo(tiny_model_dir, files, tmp_path / "o", "--max_steps", "2", "--reward_funcs", fn(files, "constant"))
    rows = read_metrics(out)
    assert [r["zero_std_frac"] for r in rows] == [1.0, 1.0]
    assert [r["reward_group_std"] for r in rows] == [0.0, 0.0] and rows[0]["advantage_abs_mean"] == 0.0
    before, after = load_file(os.path.join(tiny_model_dir, "model.safetensors")), load_file(
        os.path.join(out, "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # zero gradient: AdamW does not move


def test_mu_iterations_use_the_stored_old_logprobs(tiny_model_dir, files, tmp_path, monkeypatch):
    calls = []
    real = POLICY_LOSSES["grpo"]

    def spy(logp, old_logp, *a, **kw):
        calls.append((logp.detach().clone(), old_logp.clone()))
        return real(logp, old_logp, *a, **kw)

    monkeypatch.setitem(POLICY_LOSSES, "grpo", spy)
    grpo(tiny_model_dir, files, tmp_path / "o", "--max_steps", "1", "--num_iterations", "3", "--learning_rate",
         "3e-3", "--reward_funcs", fn(files, "ordsum"))
    assert len(calls) == 3  # one micro-batch per iteration
    first, second, third = calls
    assert torch.equal(first[1], second[1]) and torch.equal(first[1], third[1])  # pi_old kept from sampling
    assert (first[0] - first[1]).abs().max() < 1e-5  # ratio 1 before any update (cached vs full forward)
    assert (second[0] - second[1]).abs().max() > 1e-3  # the policy moved, pi_old did not


def test_beta_zero_loads_no_reference_and_beta_positive_logs_kl(tiny_model_dir, files, tmp_path, monkeypatch):
    import align.trainers.rl as rl

    created = []
    real = rl.Reference.load.__func__

    def spy(cls, *a, **kw):
        created.append(1)
        return real(cls, *a, **kw)

    monkeypatch.setattr(rl.Reference, "load", classmethod(spy))
    out = grpo(tiny_model_dir, files, tmp_path / "b0", "--max_steps", "1", "--reward_funcs", fn(files, "ordsum"))
    assert created == [] and "kl" not in read_metrics(out)[0]
    out = grpo(tiny_model_dir, files, tmp_path / "b1", "--max_steps", "2", "--reward_funcs", fn(files, "ordsum"),
               "--beta", "0.1", "--ref_update_every", "1", "--learning_rate", "3e-3")
    assert created == [1]
    rows = read_metrics(out)
    assert rows[0]["kl"] < 1e-5  # the reference is the initial policy
    assert rows[1]["kl"] < 1e-5 and rows[1]["ref_updated"] == 1.0  # reset to the policy that sampled
    assert rows[0]["kl_penalty"] >= 0 and rows[0]["ref_updated"] == 0.0


def test_reference_reset_every_n_steps(tiny_model_dir, files, tmp_path):
    out = grpo(tiny_model_dir, files, tmp_path / "o", "--max_steps", "4", "--reward_funcs", fn(files, "ordsum"),
               "--beta", "0.1", "--ref_update_every", "2", "--learning_rate", "3e-3")
    rows = read_metrics(out)
    assert [r["ref_updated"] for r in rows] == [0.0, 0.0, 1.0, 0.0]
    kl = [r["kl"] for r in rows]
    assert kl[0] < 1e-5 and kl[2] < 1e-5  # steps that sample from the reference itself
    assert kl[1] > 1e-4 and kl[3] > 1e-4


def test_the_stage_prefills_each_prompt_once_and_matches_repeated_prompts(tiny_model_dir, files, tmp_path,
                                                                          monkeypatch):
    import align.trainers.rl as ro  # the sampler's generate

    captured = []
    real = ro.generate

    def spy(model, ids, mask, *a, **kw):
        captured.append((model, ids.clone(), mask.clone(), a, kw))
        return real(model, ids, mask, *a, **kw)

    monkeypatch.setattr(ro, "generate", spy)
    grpo(tiny_model_dir, files, tmp_path / "o", "--max_steps", "1", "--reward_funcs", fn(files, "ordsum"),
         "--gradient_accumulation_steps", "2")
    (model, ids, mask, a, kw), = captured
    assert ids.shape[0] == 4 and kw["num_return_sequences"] == 4  # 16 completions: 4 prompts x G = 4
    rep_ids, rep_mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)
    kw1 = {**kw, "num_return_sequences": 1}
    once = real(model, ids, mask, *a, **{**kw, "greedy": True})
    reps = real(model, rep_ids, rep_mask, *a, **{**kw1, "greedy": True})
    assert once.completion_ids.tolist() == reps.completion_ids.tolist()
    # sampling: the same generator state draws the same tokens with the same log-probabilities
    from align.rollout import make_generator

    s1 = real(model, ids, mask, *a, **{**kw, "generator": make_generator("cpu", 5)})
    s2 = real(model, rep_ids, rep_mask, *a, **{**kw1, "generator": make_generator("cpu", 5)})
    assert s1.completion_ids.tolist() == s2.completion_ids.tolist()
    torch.testing.assert_close(s1.logprobs, s2.logprobs, atol=2e-5, rtol=0)


def test_lora_reference_reset_is_a_frozen_adapter_copy_on_the_one_base(tiny_model_dir, files, tmp_path,
                                                                         monkeypatch):
    """Iterative GRPO with LoRA: a reset copies the policy's adapter into a frozen 'reference' adapter on the same
    base (no merged full copy of the model is made); the run equals the merged-copy reference (the way a reset
    works without a shared base) up to float rounding, saves the policy's adapter alone and resumes exactly."""
    import align.trainers.iterative as I

    made = []
    real_merged = I.merged_copy
    monkeypatch.setattr(I, "merged_copy", lambda *a: made.append(1) or real_merged(*a))
    common = ("--max_steps", "4", "--reward_funcs", fn(files, "ordsum"), "--beta", "0.1", "--ref_update_every", "2",
              "--learning_rate", "3e-2", "--use_lora", "true", "--lora_r", "4", "--save_steps", "3")
    out = grpo(tiny_model_dir, files, tmp_path / "adapter", *common)
    assert made == []
    rows = read_metrics(out)
    assert [r["ref_updated"] for r in rows] == [0.0, 0.0, 1.0, 0.0]
    assert rows[2]["kl"] < 1e-6 and rows[3]["kl"] > 1e-4  # step 3 samples from the reference itself
    assert sorted(f for f in os.listdir(out) if os.path.isdir(os.path.join(out, f))) == ["checkpoints"]
    assert not any("reference" in k for k in load_file(os.path.join(out, "adapter_model.safetensors")))

    # the same run with the reference reset to a merged full copy of the policy (the keeper without a host)
    init = I.ReferenceKeeper.__init__

    def merged_keeper(self, *a, **kw):
        init(self, *a, **kw)
        self.host = None

    with monkeypatch.context() as m:
        m.setattr(I.ReferenceKeeper, "__init__", merged_keeper)
        ref = grpo(tiny_model_dir, files, tmp_path / "merged", *common)
    assert made == [1]
    for a, b in zip(rows, read_metrics(ref)):
        for k in ("kl", "loss", "reward"):
            assert abs(a[k] - b[k]) <= 1e-5 + 1e-4 * abs(b[k]), (a["step"], k, a[k], b[k])
    wa = load_file(os.path.join(out, "adapter_model.safetensors"))
    wb = load_file(os.path.join(ref, "adapter_model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5

    # resumed from step 3 (after the reset): the same run, bit for bit
    grpo(tiny_model_dir, files, out, *common, "--resume_from_checkpoint", "latest")
    assert [r["kl"] for r in read_metrics(out)] == [r["kl"] for r in rows]
    wr = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert all(torch.equal(wa[k], wr[k]) for k in wa)


def test_iterative_grpo_with_reward_model_replay_resumes_exactly(tiny_model_dir, tiny_rm_dir, files, tmp_path):
    common = ("--max_steps", "4", "--save_steps", "3", "--reward_model", tiny_rm_dir, "--reward_funcs",
              fn(files, "ordsum"), "--reward_weights", "1.0,0.5", "--gold_reward_funcs", "exact_match",
              "--beta", "0.05", "--ref_update_every", "2", "--rm_update", "true", "--rm_label_funcs",
              fn(files, "ordsum"), "--rm_replay_data", files["prefs"], "--rm_replay_ratio", "0.5",
              "--rm_learning_rate", "1e-3", "--num_iterations", "2", "--gradient_accumulation_steps", "2",
              "--loss_type", "dr_grpo", "--epsilon_high", "0.28", "--lr_scheduler_type", "cosine",
              "--eval_data", files["prompts"], "--eval_max_samples", "4")
    out = grpo(tiny_model_dir, files, tmp_path / "run", *common)
    full_m = read_metrics(out)
    full_w = load_file(os.path.join(out, "model.safetensors"))
    full_rm = load_file(os.path.join(out, "reward_model", "model.safetensors"))
    r0 = full_m[0]
    for key in ("reward", "reward_reward_model", "reward_ordsum", "gold_exact_match", "kl", "entropy", "clip_frac",
                "approx_kl", "reward_group_std", "zero_std_frac", "rm_loss", "rm_accuracy", "grad_norm",
                "time_generation", "time_training", "time_reward_model"):
        assert key in r0 and math.isfinite(r0[key]), key
    assert r0["rm_new_comparisons"] == 4 and r0["rm_replay_comparisons"] == 4  # ratio 0.5: as many replayed
    assert "eval_exact_match" in full_m[-1]
    # the reward model kept training: its backbone moved away from the model it started from
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert max((start[k] - full_rm[k]).abs().max().item() for k in start if k.startswith("model.")) > 0
    # resume from step 3 (after a reference reset at step 2, with the reward model mid-training)
    grpo(tiny_model_dir, files, out, *common, "--resume_from_checkpoint", "latest")
    res_m = read_metrics(out)
    assert [r["step"] for r in res_m] == [1, 2, 3, 4]
    for k in ("reward", "reward_reward_model", "kl", "loss", "rm_loss", "learning_rate"):
        assert [r[k] for r in res_m] == [r[k] for r in full_m], k
    res_w = load_file(os.path.join(out, "model.safetensors"))
    res_rm = load_file(os.path.join(out, "reward_model", "model.safetensors"))
    assert all(torch.equal(full_w[k], res_w[k]) for k in full_w)
    assert all(torch.equal(full_rm[k], res_rm[k]) for k in full_rm)


@pytest.mark.parametrize("extra,message", [
    (["--per_device_train_batch_size", "6"], "per_device_train_batch_size=6 must be a multiple of "
                                             "num_generations=4"),
    (["--num_generations", "1", "--per_device_train_batch_size", "4"], "field 'num_generations': 1 is not >= 2"),
    (["--advantage", "softmax", "--scale_rewards", "batch"], "scale_rewards=batch"),
    (["--ref_update_every", "2"], "ref_update_every needs beta > 0"),
    (["--rm_update", "true"], "rm_update needs reward_model"),
    (["--rm_replay_data", "x.jsonl"], "rm_update is false"),
])
def test_bad_settings_fail_in_one_line_before_writing(tiny_model_dir, files, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    argv = ["grpo", "--model", tiny_model_dir, "--train_data", files["prompts"], "--output_dir", str(out), *BASE,
            "--reward_funcs", "exact_match", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_token_budget_gives_the_update_of_whole_groups(tiny_model_dir, files, tmp_path, monkeypatch):
    """GRPO with max_tokens_per_micro_batch: prompts of ~15 to ~100 tokens, 4 groups of 4 per step cut into
    micro-batches of at most 250 padded tokens (groups ordered by length): the first update's summed gradient
    equals that of one micro-batch of all 16 completions, and the logged loss and statistics match. (Later
    weights are compared loosely: AdamW divides each gradient by its own running scale, so float rounding in a
    near-zero gradient moves that weight by up to the learning rate.)"""
    import align.trainers.grpo as GR
    from align.trainers.loop import Run

    data = mixed_prompts(tmp_path / "mixed.jsonl")
    counts: list[int] = []
    grads: list[torch.Tensor] = []
    real_micro, real_opt = GR.GRPOStep._micro_step, Run.optimizer_step

    def counting(self, r, idx, *a, **kw):
        counts.append(len(idx))
        return real_micro(self, r, idx, *a, **kw)

    def recording(self, *a, **kw):
        if not grads:
            grads.append(torch.cat([p.grad.flatten() for p in self.model.parameters() if p.grad is not None]))
        return real_opt(self, *a, **kw)

    monkeypatch.setattr(GR.GRPOStep, "_micro_step", counting)
    monkeypatch.setattr(Run, "optimizer_step", recording)
    common = ("--max_steps", "2", "--reward_funcs", fn(files, "ordsum"), "--beta", "0.1", "--max_length", "128",
              "--per_device_train_batch_size", "16")
    argv = ["grpo", "--model", tiny_model_dir, "--train_data", data, *BASE]
    assert main([*argv, "--output_dir", str(tmp_path / "budget"), *common, "--max_tokens_per_micro_batch", "250"]) == 0
    cut, counts[:], g_cut = list(counts), [], grads.pop()
    assert main([*argv, "--output_dir", str(tmp_path / "whole"), *common]) == 0
    assert counts == [16, 16] and len(cut) > 2 * len(counts), cut
    g_whole = grads.pop()
    assert (g_cut - g_whole).abs().max() <= 1e-5 * g_whole.abs().max()
    a = load_file(str(tmp_path / "budget" / "model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 0.5e-3  # learning rate 1e-3
    for ra, rb in zip(read_metrics(tmp_path / "budget"), read_metrics(tmp_path / "whole")):
        for k in ("loss", "kl_penalty", "clip_frac", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-7), k
