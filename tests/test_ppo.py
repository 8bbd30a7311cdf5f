"""PPO: per-token rewards and KL controllers by hand, the loss variants, masking invariance of the whole
rollout -> advantages -> loss path, tiny end-to-end runs (saving, reward model + critic, LoRA reference,
value head on the trunk), exact resume, and input validation that writes nothing."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main
from align.data import encode_prompt, left_pad
from align.kl_control import KLController
from align.models import load_causal_lm, load_tokenizer
from align.rollout import Rollout, generate, logprobs_from_selected, scatter_tokens, sequence_inputs
from align.advantages import per_token_rewards, ppo_advantages, token_kl
from align.losses import ppo_loss
from align.trainers.critic import PolicyAndValue
from conftest import addition_rows, mixed_prompts, read_metrics, write_jsonl

BASE = ["--disable_tqdm", "true", "--logging_steps", "1", "--seed", "3", "--max_new_tokens", "4",
        "--per_device_train_batch_size", "4", "--max_length", "32", "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in addition_rows(24, seed=7)]
    return write_jsonl(tmp_path_factory.mktemp("ppo") / "rl.jsonl", rows)


def ppo(model, data, out, *extra):
    argv = ["ppo", "--model", model, "--train_data", data, "--output_dir", str(out), *BASE, *extra]
    assert main(argv) == 0
    return str(out)


# ---------------------------------------------------------------------------------------------------------------
# pure pieces, by hand


def test_per_token_rewards_put_the_score_on_the_last_valid_token():
    scores = torch.tensor([1.0, -2.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 9.0, 9.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    r = per_token_rewards(scores, kl, mask, beta=0.5)
    # row 0: -0.5*[0.1, 0.2, 0.3] + [0, 0, 1]; row 1: one token, -0.5*0.4 - 2; row 2: no valid token, nothing
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, 0.85], [-2.2, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_adaptive_controller_follows_ziegler_by_hand():
    c = KLController(0.1, "adaptive", target=6.0, horizon=100)
    # KL 9: error = clip(9/6 - 1, -0.2, 0.2) = 0.2; beta *= 1 + 0.2 * 10/100 = 1.02
    assert c.update(9.0, 10) == pytest.approx(0.102)
    # KL 5.4: error = 5.4/6 - 1 = -0.1; beta *= 1 - 0.1 * 50/100 = 0.95
    assert c.update(5.4, 50) == pytest.approx(0.102 * 0.95)
    state = c.state_dict()
    d = KLController(0.1, "adaptive", target=6.0, horizon=100)
    d.load_state_dict(json.loads(json.dumps(state)))  # what a checkpoint stores
    assert d.beta == c.beta


def test_doubling_controller_follows_the_ppo_paper_by_hand():
    c = KLController(1.0, "doubling", target=0.01)
    assert c.update(0.016, 1) == 2.0  # 0.016 > 1.5 * 0.01 -> double
    assert c.update(0.012, 1) == 2.0  # within [0.01/1.5, 0.015] -> unchanged
    assert c.update(0.006, 1) == 1.0  # 0.006 < 0.0067 -> halve
    assert KLController(0.3, "fixed").update(100.0, 1) == 0.3


def test_loss_variants_by_hand():
    mask = torch.tensor([[1.0, 1.0]])
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    logp = torch.log(torch.tensor([[0.75, 0.25]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, 1.0]])
    zeros = torch.zeros(1, 2)
    common = dict(values=zeros, old_values=zeros, returns=zeros, mask=mask, vf_coef=0.0)
    # clipped (eps 0.2): per token -min(rA, clip(r)A) = -min(1.5, 1.2) = -1.2 and -min(0.5, 0.8) = -0.5
    clipped, stats = ppo_loss(logp, old, adv, cliprange=0.2, **common)
    assert clipped.item() == pytest.approx(-(1.2 + 0.5) / 2)
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    # neither clipping nor penalty: -mean(r A) = -(1.5 + 0.5) / 2
    plain, stats = ppo_loss(logp, old, adv, cliprange=None, **common)
    assert plain.item() == pytest.approx(-1.0) and stats["clip_frac"].item() == 0.0
    # PPO-paper penalty KL[pi_old, pi] with k3 on old samples: (r - 1) - log r per token
    k3 = ((1.5 - 1 - math.log(1.5)) + (0.5 - 1 - math.log(0.5))) / 2
    pen, stats = ppo_loss(logp, old, adv, cliprange=None, kl_coef=2.0, kl_to="old", kl_estimator="k3", **common)
    assert stats["kl_penalty"].item() == pytest.approx(k3)
    assert pen.item() == pytest.approx(-1.0 + 2.0 * k3)
    # penalty to the reference, k1: mean(log pi - log pi_ref) with pi_ref = old here
    ref, stats = ppo_loss(logp, old, adv, cliprange=None, kl_coef=1.0, kl_to="ref", ref_logp=old,
                          kl_estimator="k1", **common)
    assert stats["kl_penalty"].item() == pytest.approx((math.log(1.5) + math.log(0.5)) / 2)
    # entropy bonus lowers the loss by coef * mean entropy
    ent, _ = ppo_loss(logp, old, adv, cliprange=None, entropy=torch.tensor([[1.0, 3.0]]), entropy_coef=0.1,
                      **common)
    assert ent.item() == pytest.approx(-1.0 - 0.1 * 2.0)


# ---------------------------------------------------------------------------------------------------------------
# masking invariance of rollout -> rewards -> GAE -> loss -> gradient


def _loss_and_grads(net, r: Rollout, beta=0.1):
    mask = r.completion_mask
    kl = token_kl(r.logprobs, r.ref_logprobs, mask, "k3")
    rewards = per_token_rewards(r.rewards, kl, mask, beta)
    adv, ret = ppo_advantages(rewards, r.values, mask, gamma=1.0, lam=0.9, whiten=True)
    inp = sequence_inputs(r.prompt_ids, r.prompt_mask, r.completion_ids, mask)
    net.zero_grad()
    logits, values = net(inp["input_ids"], inp["select"], inp["attention_mask"], inp["position_ids"])
    logp, ent = logprobs_from_selected(logits, r.completion_ids, mask, 0.8, with_entropy=True)
    loss, _ = ppo_loss(logp, r.logprobs, adv, scatter_tokens(values, mask), r.values, ret, mask,
                       entropy=ent, entropy_coef=0.01, kl_coef=0.05, kl_to="ref", ref_logp=r.ref_logprobs,
                       kl_estimator="k3")
    loss.backward()
    return loss.detach(), adv, ret, [p.grad.clone() for p in net.parameters() if p.grad is not None]


def test_garbage_after_eos_changes_nothing(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    policy = load_causal_lm(tiny_model_dir)
    ref = load_causal_lm(tiny_model_dir)
    head = torch.nn.Linear(policy.get_output_embeddings().in_features, 1)
    net = PolicyAndValue(policy, value_head=head)
    ids, att = left_pad([encode_prompt(tok, p) for p in ["What is 1+2?", "Hi", "What is 33+44?"]],
                        tok.pad_token_id)
    free = generate(policy, ids, att, 6, greedy=True, eos_id=None, pad_id=0)
    eos = int(free.completion_ids[0, 2])  # row 0 ends after 3 tokens
    s = generate(policy, ids, att, 6, temperature=0.8, eos_id=eos, pad_id=0, greedy=True)
    with torch.no_grad():
        from align.models import SelectiveLM
        from align.rollout import completion_logprobs

        r = Rollout(**vars(s), rewards=torch.tensor([1.0, -0.5, 0.25]))
        r.ref_logprobs = completion_logprobs(SelectiveLM(ref), r, 0.8)[0]
        inp = sequence_inputs(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
        r.values = scatter_tokens(net.values(inp["input_ids"], inp["select"], inp["attention_mask"],
                                             inp["position_ids"]), r.completion_mask)
    # two extra padding columns give every row a masked tail; fill all masked entries with garbage
    pad2 = lambda x, v: torch.cat([x, torch.full((x.shape[0], 2), v, dtype=x.dtype)], 1)  # noqa: E731
    clean = Rollout(**{**vars(r), "completion_ids": pad2(r.completion_ids, 0),
                       "completion_mask": pad2(r.completion_mask, 0), "logprobs": pad2(r.logprobs, 0.0),
                       "ref_logprobs": pad2(r.ref_logprobs, 0.0), "values": pad2(r.values, 0.0)})
    m = clean.completion_mask.bool()
    assert (~m).any(-1).all() and m[0].sum() == 3
    g = torch.Generator().manual_seed(0)
    dirty = Rollout(**{**vars(clean),
                       "completion_ids": torch.where(m, clean.completion_ids,
                                                     torch.randint(3, 200, m.shape, generator=g)),
                       "logprobs": torch.where(m, clean.logprobs, torch.full(m.shape, 1e4)),
                       "ref_logprobs": torch.where(m, clean.ref_logprobs, torch.full(m.shape, -1e4)),
                       "values": torch.where(m, clean.values, torch.full(m.shape, float("nan")))})
    loss_a, adv_a, ret_a, grads_a = _loss_and_grads(net, clean)
    loss_b, adv_b, ret_b, grads_b = _loss_and_grads(net, dirty)
    assert torch.isfinite(loss_a) and loss_a.item() == loss_b.item()
    assert torch.equal(adv_a, adv_b) and torch.equal(ret_a, ret_b)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# end to end


def test_ppo_runs_logs_and_saves(tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = ppo(tiny_model_dir, prompts_file, tmp_path / "o", "--max_steps", "3", "--reward_model", tiny_rm_dir,
              "--reward_funcs", "format_digits", "--reward_weights", "1.0,0.5", "--gold_reward_funcs",
              "exact_match", "--missing_eos_penalty", "1.0", "--num_mini_batches", "2", "--num_ppo_epochs", "2",
              "--eval_data", prompts_file, "--eval_max_samples", "4")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward", "reward_reward_model", "reward_format_digits", "gold_exact_match", "kl", "entropy",
                "clip_frac", "approx_kl", "value_loss", "explained_variance", "response_length",
                "time_generation", "time_scoring", "time_reference", "time_training", "beta"):
        assert key in rows[0] and math.isfinite(rows[0][key]), key
    assert rows[0]["ppo_updates"] == 4.0  # 2 epochs x 2 minibatches
    assert "eval_exact_match" in rows[-1]
    # no EOS within 4 tokens from a random model -> the penalty shows in the combined reward
    r0 = rows[0]
    expect = r0["reward_reward_model"] + 0.5 * r0["reward_format_digits"] - (1 - r0["eos_frac"])
    assert r0["reward"] == pytest.approx(expect, abs=1e-5)
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size > 0
    critic = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "value_model"))
    assert critic.config.num_labels == 1
    before, after = load_file(os.path.join(tiny_model_dir, "model.safetensors")), load_file(
        os.path.join(out, "model.safetensors"))
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 0  # the policy moved


def test_resume_gives_the_same_run(tiny_model_dir, prompts_file, tmp_path):
    common = ("--max_steps", "4", "--save_steps", "2", "--reward_funcs", "format_digits,length_penalty",
              "--kl_controller", "adaptive", "--target_kl", "0.01", "--kl_horizon", "10", "--beta", "0.1",
              "--value_model", "policy", "--lr_scheduler_type", "cosine", "--warmup_steps", "1",
              "--num_mini_batches", "2")
    out = ppo(tiny_model_dir, prompts_file, tmp_path / "run", *common)
    full_w, full_m = load_file(os.path.join(out, "model.safetensors")), read_metrics(out)
    full_head = load_file(os.path.join(out, "value_head.safetensors"))
    assert len({r["beta"] for r in full_m}) == 4  # the controller moved beta every step
    ppo(tiny_model_dir, prompts_file, out, *common, "--resume_from_checkpoint", "latest")
    res_w, res_m = load_file(os.path.join(out, "model.safetensors")), read_metrics(out)
    assert [r["step"] for r in res_m] == [1, 2, 3, 4]
    for k in ("reward", "kl", "beta", "value_loss", "learning_rate"):
        assert [r[k] for r in res_m] == [r[k] for r in full_m], k
    assert all(torch.equal(full_w[k], res_w[k]) for k in full_w)
    res_head = load_file(os.path.join(out, "value_head.safetensors"))
    assert all(torch.equal(full_head[k], res_head[k]) for k in full_head)


def test_lora_reference_is_the_base_with_adapter_disabled(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    import align.trainers.rl as rl

    created = []
    real = rl.Reference.load.__func__

    def spy(cls, *a, **kw):
        ref = real(cls, *a, **kw)
        created.append(ref)
        return ref

    monkeypatch.setattr(rl.Reference, "load", classmethod(spy))
    out = ppo(tiny_model_dir, prompts_file, tmp_path / "lora", "--max_steps", "2", "--use_lora", "true",
              "--lora_r", "4", "--reward_funcs", "format_digits", "--value_model", "policy",
              "--num_ppo_epochs", "1")
    assert created and created[0].lm is None  # no second model: the adapter is switched off instead
    rows = read_metrics(out)
    # LoRA starts as the identity: the first rollout's KL is float rounding between the sampling (KV-cache)
    # forward and the reference's full forward; after an update the policy has moved
    assert abs(rows[0]["kl"]) < 1e-5
    assert abs(rows[1]["kl"]) > 1e-3
    assert os.path.isfile(os.path.join(out, "adapter_config.json"))

    # and exactly: with the new adapter the reference (adapter off) and the policy give the same log-probabilities
    from align.models import apply_lora, load_causal_lm
    from align.rollout import completion_logprobs, generate, make_generator

    policy = apply_lora(load_causal_lm(tiny_model_dir), 4, 8, 0.0, ["all-linear"])
    ids = torch.tensor([[5, 6, 7, 8], [0, 9, 10, 11]])
    s = generate(policy, ids, (ids > 0).long(), 4, pad_id=0, generator=make_generator("cpu", 0))
    ref = rl.Reference(None, adapter_host=policy)
    with ref.active() as lm:
        ref_lp = completion_logprobs(lm, s)[0]
    assert torch.equal(ref_lp, completion_logprobs(rl.SelectiveLM(policy), s)[0])


@pytest.mark.parametrize("variant", ["clip", "fixed_penalty", "adaptive_penalty", "neither"])
def test_ppo_paper_variants_are_settings(tiny_model_dir, prompts_file, tmp_path, variant):
    settings = {
        "clip": ["--beta", "0"],
        "fixed_penalty": ["--use_clipping", "false", "--kl_in", "loss", "--kl_to", "old", "--beta", "0.5"],
        "adaptive_penalty": ["--use_clipping", "false", "--kl_in", "loss", "--kl_to", "old", "--beta", "0.5",
                             "--kl_controller", "doubling", "--target_kl", "0.001"],
        "neither": ["--use_clipping", "false", "--beta", "0"],
    }[variant]
    out = ppo(tiny_model_dir, prompts_file, tmp_path / variant, "--max_steps", "3", "--reward_funcs",
              "format_digits,length_penalty", "--value_model", "policy", "--num_ppo_epochs", "2", *settings)
    rows = read_metrics(out)
    if variant != "clip":
        assert all(r["clip_frac"] == 0.0 for r in rows)
    if variant in ("fixed_penalty", "adaptive_penalty"):
        assert all("kl_penalty" in r for r in rows)
    betas = [r["beta"] for r in rows]
    if variant == "adaptive_penalty":
        # the PPO paper's rule on the per-token KL(pi_old || pi) measured in each step's last epoch
        for r, nxt in zip(rows, betas[1:]):
            kl, b = r["approx_kl_last_epoch"], r["beta"]
            assert nxt == pytest.approx(b * 2 if kl > 0.0015 else b / 2 if kl < 0.001 / 1.5 else b)
    else:
        assert len(set(betas)) == 1


@pytest.mark.parametrize("extra,message", [
    (["--reward_funcs", "format_digits", "--max_length", "10"], "exceeds max_length=10"),
    (["--reward_funcs", "format_digits", "--kl_to", "old"], "kl_to=old"),
    (["--reward_funcs", "nope"], "reward 'nope'"),
    ([], "no reward source"),
    (["--reward_funcs", "format_digits", "--reward_weights", "1,2"], "reward_weights has 2 values for 1"),
])
def test_bad_input_fails_before_writing(tiny_model_dir, prompts_file, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    argv = ["ppo", "--model", tiny_model_dir, "--train_data", prompts_file, "--output_dir", str(out), *BASE,
            *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_column_is_reported_with_file_and_line(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "What is 1+1?", "answer": "2"}, {"prompt": "x"}])
    argv = ["ppo", "--model", tiny_model_dir, "--train_data", data, "--output_dir", str(tmp_path / "o"), *BASE,
            "--reward_funcs", "exact_match"]
    assert main(argv) == 2
    assert f"{data}: line 2, field 'answer': missing column" in capsys.readouterr().err


def test_policy_then_critic_backward_equals_one_backward(tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path,
                                                         monkeypatch):
    """On one process each micro-batch runs the policy's forward and backward, then the critic's (its peak holds
    one model's activations): the same updates and metrics as one forward and backward of both, with every loss
    term on (entropy bonus, KL in the loss, clipped values) and gradient accumulation."""
    from align.trainers.ppo import PPOStep

    calls = {"forward": 0}
    real_forward = PolicyAndValue.forward

    def counting(self, *a, **kw):  # the forward of both at once (the rollout's values call `values` alone)
        calls["forward"] += 1
        return real_forward(self, *a, **kw)

    monkeypatch.setattr(PolicyAndValue, "forward", counting)
    common = ("--max_steps", "2", "--reward_model", tiny_rm_dir, "--value_model", tiny_rm_dir,
              "--entropy_coef", "0.01", "--kl_in", "loss", "--beta", "0.05", "--cliprange_value", "0.2",
              "--num_mini_batches", "2", "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "8")
    split = ppo(tiny_model_dir, prompts_file, tmp_path / "split", *common)
    assert calls["forward"] == 0  # the split ran
    monkeypatch.setattr(PPOStep, "splits", staticmethod(lambda run: False))
    one = ppo(tiny_model_dir, prompts_file, tmp_path / "one", *common)
    assert calls["forward"] == 2 * 4 * 2 * 2  # steps x epochs x minibatches x micro-batches
    for sub in ("", "value_model"):
        a = load_file(os.path.join(split, sub, "model.safetensors"))
        b = load_file(os.path.join(one, sub, "model.safetensors"))
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, sub
    for ra, rb in zip(read_metrics(split), read_metrics(one)):
        for k in ("policy_loss", "value_loss", "vf_clip_frac", "entropy", "kl_penalty", "approx_kl", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), k


def test_frozen_models_in_bfloat16(tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path, monkeypatch):
    """frozen_dtype=bfloat16 loads the reference and the reward model in bf16 (on a CPU too; auto keeps them in
    the trained dtype there): their log-probs and scores are the fp32 ones up to bf16 rounding, and PPO runs on
    them."""
    import align.trainers.rl as rl
    from align.config import load_config
    from align.rewards import REWARD_MODEL_NAME, reward_sources
    from align.rollout import completion_logprobs, generate, make_generator
    from align.stages import config_class
    from align.trainers.loop import Run

    tok = load_tokenizer(tiny_model_dir)
    policy = load_causal_lm(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7, 8], [0, 9, 10, 11]])
    s = generate(policy, ids, (ids > 0).long(), 6, pad_id=0, generator=make_generator("cpu", 0))
    got = {}
    for frozen in ("auto", "bfloat16"):
        cfg = load_config(config_class("ppo"), ["--model", tiny_model_dir, "--train_data", prompts_file,
                                                "--reward_model", tiny_rm_dir, "--output_dir", str(tmp_path / "x"),
                                                "--frozen_dtype", frozen], prog="t")
        run = Run(cfg, "ppo")
        ref = rl.Reference.load(cfg, policy, tok, run)
        scorer = reward_sources(cfg, run.device)[REWARD_MODEL_NAME]
        dtypes = {p.dtype for p in ref.lm.model.parameters()} | {p.dtype for p in scorer.model.parameters()}
        assert dtypes == {torch.float32 if frozen == "auto" else torch.bfloat16}, (frozen, dtypes)
        with ref.active() as lm:
            lp = completion_logprobs(lm, s)[0]
        got[frozen] = (lp, scorer(["1+2="] * 2, ["3", "45"]))
        assert lp.dtype == torch.float32
    (lp32, sc32), (lp16, sc16) = got["auto"], got["bfloat16"]
    assert not torch.equal(lp32, lp16)  # the bf16 forward really ran
    assert torch.allclose(lp32, lp16, atol=0.02), (lp32 - lp16).abs().max()
    assert torch.allclose(torch.as_tensor(sc32), torch.as_tensor(sc16), atol=0.05)

    out = ppo(tiny_model_dir, prompts_file, tmp_path / "bf16", "--max_steps", "2", "--reward_model", tiny_rm_dir,
              "--frozen_dtype", "bfloat16", "--num_ppo_epochs", "1")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r[k]) for r in rows for k in ("reward", "kl", "value_loss"))
    assert abs(rows[0]["kl"]) < 0.02  # the policy is its own reference at step 1, up to bf16 rounding


def test_micro_batches_hold_rows_of_similar_length(monkeypatch):
    """`Run.shares` with lengths: the rows are ordered by length (stable) before they are cut, so a micro-batch
    is padded to its own longest row; with one chunk nothing is reordered. `Rollout.sequence_lengths` by hand."""
    from align.trainers.loop import Run

    class One:  # a process of a run of `world` processes; shares() reads nothing else
        def __init__(self, world, rank):
            self.world, self.rank = world, rank

    lengths = torch.tensor([5, 1, 4, 1, 3, 9, 2, 2])  # row i has length lengths[i]
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    # by length: rows 1, 3 (1), 6, 7 (2), 4 (3), 2 (4), 0 (5), 5 (9); ties keep their order
    got = [(i.tolist(), w) for i, w in Run.shares(One(1, 0), rows, 2, lengths)]
    assert got == [([1, 3, 6, 7], 1.0), ([4, 2, 0, 5], 1.0)]
    # 2 processes x 2: chunks [1,3] [6,7] [4,2] [0,5]; chunk c to process c % 2
    assert [i.tolist() for i, _ in Run.shares(One(2, 0), rows, 2, lengths)] == [[1, 3], [4, 2]]
    assert [i.tolist() for i, _ in Run.shares(One(2, 1), rows, 2, lengths)] == [[6, 7], [0, 5]]
    # a minibatch (a subset of the rows, in permuted order) is ordered within itself
    assert [i.tolist() for i, _ in Run.shares(One(1, 0), torch.tensor([5, 0, 6]), 2, lengths)] == [[6, 0], [5]]
    # one chunk: the rows as given
    assert [i.tolist() for i, _ in Run.shares(One(1, 0), rows, 1, lengths)] == [rows.tolist()]

    # prompt tokens (mask) + completion tokens; groups of 2 take their longest
    pm = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1], [0, 1, 1]])
    cm = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]])
    r = Rollout(prompt_ids=pm, prompt_mask=pm, completion_ids=cm, completion_mask=cm,
                logprobs=torch.zeros(4, 3), eos=torch.zeros(4, dtype=torch.bool))
    assert r.sequence_lengths().tolist() == [4, 4, 4, 3]
    r.group_size = 2
    assert r.sequence_lengths().tolist() == [4, 4, 4, 4]


def test_token_budget_cuts_micro_batches_by_hand():
    """`data.chunks_within_budget` and `Run.shares(max_tokens=...)`: rows in order of length, each micro-batch at
    most the budget in rows x longest row, a longer row alone, the count a multiple of the processes."""
    from align.data import chunks_within_budget
    from align.trainers.loop import Run

    # lengths 1 1 2 2 | 3 4 | 5 | 9, budget 8: 4 x 2 = 8 fits, + 3 would be 5 x 3; 2 x 4 = 8 fits, + 5 would be
    # 3 x 5; 5 alone (2 x 9 > 8); 9 alone, over the budget
    assert chunks_within_budget([1, 1, 2, 2, 3, 4, 5, 9], 8) == [[0, 1, 2, 3], [4, 5], [6], [7]]
    # 3 processes: 4 chunks -> 6: the largest of 2+ rows halved (cost 8 and 8: the first), then [4, 5] (cost 8)
    assert chunks_within_budget([1, 1, 2, 2, 3, 4, 5, 9], 8, 3) == [[0, 1], [2, 3], [4], [5], [6], [7]]
    # no chunk of two rows left to halve: an empty chunk (a weight-0 micro-batch)
    assert chunks_within_budget([5, 9], 8, 4) == [[0], [1], [], []]
    assert chunks_within_budget([], 8, 2) == []
    assert chunks_within_budget([3, 3, 3], 100) == [[0, 1, 2]]

    class One:
        def __init__(self, world, rank):
            self.world, self.rank = world, rank

    lengths = torch.tensor([5, 1, 4, 1, 3, 9, 2, 2])  # sorted rows 1 3 6 7 | 4 2 | 0 | 5
    rows = torch.arange(8)
    got = [(i.tolist(), w) for i, w in Run.shares(One(1, 0), rows, 1, lengths, max_tokens=8)]
    assert got == [([1, 3, 6, 7], 1.0), ([4, 2], 1.0), ([0], 1.0), ([5], 1.0)]  # accumulation 1 is ignored
    assert [i.tolist() for i, _ in Run.shares(One(2, 1), rows, 1, lengths, max_tokens=8)] == [[4, 2], [5]]
    # one chunk [0, 5] (2 x 9 <= 20), halved for 2 processes: process 1 gets row 5
    assert [(i.tolist(), w) for i, w in Run.shares(One(2, 1), torch.tensor([0, 5]), 1, lengths, max_tokens=20)] \
        == [([5], 1.0)]
    # 3 processes, two rows: an empty chunk, a weight-0 micro-batch of row 0 for process 2
    assert [(i.tolist(), w) for i, w in Run.shares(One(3, 2), torch.tensor([0, 5]), 1, lengths, max_tokens=20)] \
        == [([0], 0.0)]


def same_ppo_runs(a: str, b: str) -> None:
    """Two PPO runs made the same updates: policy and critic within 1e-5, the logged losses and statistics."""
    for sub in ("", "value_model"):
        wa = load_file(os.path.join(a, sub, "model.safetensors"))
        wb = load_file(os.path.join(b, sub, "model.safetensors"))
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5, sub
    for ra, rb in zip(read_metrics(a), read_metrics(b)):
        for k in ("policy_loss", "value_loss", "approx_kl", "grad_norm", "reward", "kl"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), k


@pytest.fixture
def input_shapes(monkeypatch) -> list[tuple[int, int]]:
    """The (rows, length) of every training forward of PPO's micro-batches (policy's and critic's alike)."""
    import align.trainers.ppo as P

    shapes: list[tuple[int, int]] = []

    def recording(prompt_ids, *a):
        out = sequence_inputs(prompt_ids, *a)
        shapes.append(tuple(out["input_ids"].shape))
        return out

    monkeypatch.setattr(P, "sequence_inputs", recording)
    return shapes


def test_token_budget_trains_as_one_micro_batch_with_a_bounded_peak(tiny_model_dir, tiny_rm_dir, tmp_path,
                                                                    input_shapes):
    """max_tokens_per_micro_batch: PPO's minibatch of 8 rollouts of ~20-110 tokens in micro-batches of at most
    200 padded tokens gives the updates of one micro-batch of all 8 (within float rounding)."""
    data = mixed_prompts(tmp_path / "mixed.jsonl")
    common = ("--max_steps", "2", "--reward_model", tiny_rm_dir, "--value_model", tiny_rm_dir, "--num_mini_batches",
              "1", "--per_device_train_batch_size", "8", "--max_length", "128", "--num_ppo_epochs", "2")
    budget = ppo(tiny_model_dir, data, tmp_path / "budget", *common, "--max_tokens_per_micro_batch", "200")
    cut, input_shapes[:] = list(input_shapes), []
    whole = ppo(tiny_model_dir, data, tmp_path / "whole", *common)
    assert all(rows == 8 for rows, _ in input_shapes)  # one micro-batch per update without the budget
    assert len(cut) > 2 * len(input_shapes)
    assert all(rows * n <= 200 or rows == 1 for rows, n in cut), cut
    same_ppo_runs(budget, whole)


def test_length_ordered_micro_batches_train_as_before_on_less_padding(tiny_model_dir, tiny_rm_dir, tmp_path,
                                                                       monkeypatch, input_shapes):
    """Prompts of very different lengths, 2 micro-batches per minibatch: ordering the rows by length gives the
    same updates as cutting them in sampled order (the same rows' gradients are summed), on fewer padded
    positions."""
    from align.trainers import loop

    data = mixed_prompts(tmp_path / "mixed.jsonl")
    common = ("--max_steps", "2", "--reward_model", tiny_rm_dir, "--value_model", tiny_rm_dir,
              "--num_mini_batches", "1", "--gradient_accumulation_steps", "2",
              "--per_device_train_batch_size", "8", "--max_length", "128", "--num_ppo_epochs", "2")
    ordered = ppo(tiny_model_dir, data, tmp_path / "ordered", *common)
    padded_ordered, input_shapes[:] = sum(r * n for r, n in input_shapes), []
    real_shares = loop.Run.shares
    monkeypatch.setattr(loop.Run, "shares", lambda self, rows, acc, *_: real_shares(self, rows, acc))
    plain = ppo(tiny_model_dir, data, tmp_path / "plain", *common)
    padded_plain = sum(r * n for r, n in input_shapes)
    assert padded_ordered < 0.9 * padded_plain, (padded_ordered, padded_plain)
    same_ppo_runs(ordered, plain)


def test_logged_token_means_are_means_over_the_updates_tokens(tiny_model_dir, tiny_rm_dir, prompts_file, tmp_path,
                                                            monkeypatch):
    """Two epochs of one minibatch in 2 micro-batches each: the logged approx_kl and clip_frac are the means over
    every trained token of the step, and approx_kl_last_epoch (which target_approx_kl stops on) the last
    epoch's, computed here from each micro-batch's own statistics and token count."""
    from align.trainers.ppo import PPOStep

    seen: list[tuple[float, float, float]] = []  # (approx_kl, clip_frac, valid tokens) of each micro-batch
    real = PPOStep._micro_step

    def recording(self, r, idx, *a, **kw):
        stats = real(self, r, idx, *a, **kw)
        seen.append((float(stats["approx_kl"]), float(stats["clip_frac"]), float(r.completion_mask[idx].sum())))
        return stats

    monkeypatch.setattr(PPOStep, "_micro_step", recording)
    out = ppo(tiny_model_dir, prompts_file, tmp_path / "one", "--max_steps", "2", "--reward_model", tiny_rm_dir,
              "--value_model", tiny_rm_dir, "--num_ppo_epochs", "2", "--num_mini_batches", "1",
              "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "8", "--learning_rate", "3e-2")
    assert len(seen) == 2 * 2 * 2  # steps x epochs x micro-batches
    for k, row in enumerate(read_metrics(out)):
        step = seen[4 * k:4 * k + 4]
        tokens = sum(n for _, _, n in step)
        assert row["approx_kl"] == pytest.approx(sum(kl * n for kl, _, n in step) / tokens, rel=1e-6)
        assert row["clip_frac"] == pytest.approx(sum(c * n for _, c, n in step) / tokens, rel=1e-6, abs=1e-12)
        last = step[2:]
        assert row["approx_kl_last_epoch"] == pytest.approx(sum(kl * n for kl, _, n in last)
                                                            / sum(n for _, _, n in last), rel=1e-6)
        assert row["approx_kl_last_epoch"] > 1e-6  # the second epoch runs after an update: a real KL
