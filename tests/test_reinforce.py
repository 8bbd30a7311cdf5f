"""REINFORCE: every Ψ of the policy-gradient list by hand on a 4-row rollout (returns, rewards-to-go, batch/group
baselines, GAE, TD residual) with its value targets, the loss gradient by hand (garbage on masked positions
changes nothing), the Ψ of a real run recomputed from its rollout, tiny end-to-end runs that save (with and
without a critic), and input validation that writes nothing. Reward-to-go, returns, GAE and the TD residual are
also tested against loops in test_advantages.py."""

import os

import pytest
import torch
from safetensors.torch import load_file

from align.advantages import policy_gradient_psi, sequence_baseline
from align.cli import main
from align.losses import POLICY_LOSSES, aggregate_count, policy_gradient_loss
from align.advantages import needs_values, psi_and_value_targets
from conftest import read_metrics

# four rollouts of at most 3 tokens, two groups of G = 2; gamma = 0.5, lambda = 0.5
REWARDS = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 9.0], [0.0, 0.0, 4.0], [1.0, 7.0, 7.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
VALUES = torch.tensor([[0.5, 1.0, 1.0], [2.0, 1.0, 5.0], [0.0, 0.0, 0.0], [1.0, 5.0, 5.0]])
# rewards-to-go G_t = r_t + 0.5 G_{t+1} over valid tokens:
#   row 0: G2 = 2, G1 = 1 + 1 = 2, G0 = 0 + 1 = 1      row 1: G1 = 0, G0 = 3 + 0 = 3
#   row 2: G2 = 4, G1 = 0 + 2 = 2, G0 = 0 + 1 = 1      row 3: G0 = 1
RTG = torch.tensor([[1.0, 2.0, 2.0], [3.0, 0.0, 0.0], [1.0, 2.0, 4.0], [1.0, 0.0, 0.0]])
# total returns R = G_0: 1, 3, 1, 1 -> batch mean 1.5; group means (1 + 3)/2 = 2 and (1 + 1)/2 = 1
RETURN = torch.tensor([[1.0, 1.0, 1.0], [3.0, 3.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
# TD residual d_t = r_t + 0.5 V_{t+1} - V_t, V = 0 after the last valid token:
#   row 0: 0 + .5 - .5 = 0, 1 + .5 - 1 = .5, 2 - 1 = 1     row 1: 3 + .5 - 2 = 1.5, 0 - 1 = -1
#   row 2: 0, 0, 4                                          row 3: 1 - 1 = 0
TD = torch.tensor([[0.0, 0.5, 1.0], [1.5, -1.0, 0.0], [0.0, 0.0, 4.0], [0.0, 0.0, 0.0]])
# GAE with gamma*lambda = .25: A_t = d_t + .25 A_{t+1}
#   row 0: A2 = 1, A1 = .5 + .25 = .75, A0 = 0 + .1875     row 1: A1 = -1, A0 = 1.5 - .25 = 1.25
#   row 2: A2 = 4, A1 = 0 + 1 = 1, A0 = .25                row 3: A0 = 0
GAE = torch.tensor([[0.1875, 0.75, 1.0], [1.25, -1.0, 0.0], [0.25, 1.0, 4.0], [0.0, 0.0, 0.0]])


def psi(kind, **kw):
    return policy_gradient_psi(kind, REWARDS, MASK, gamma=0.5, lam=0.5, values=VALUES, **kw)


def test_every_psi_by_hand():
    torch.testing.assert_close(psi("return"), RETURN)
    torch.testing.assert_close(psi("reward_to_go"), RTG)
    torch.testing.assert_close(psi("td_residual"), TD)
    torch.testing.assert_close(psi("gae"), GAE)
    # Q(s_t, a_t) = r_t + 0.5 V_{t+1} (= d_t + V_t), V = 0 after the last valid token:
    #   row 0: 0 + .5 = .5, 1 + .5 = 1.5, 2 + 0 = 2     row 1: 3 + .5 = 3.5, 0 + 0 = 0
    #   row 2: 0, 0, 4                                  row 3: 1 + 0 = 1
    torch.testing.assert_close(psi("q_value"), torch.tensor([[0.5, 1.5, 2.0], [3.5, 0.0, 0.0], [0.0, 0.0, 4.0],
                                                             [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(psi("q_value"), (TD + VALUES) * MASK)
    # baseline = values per token: G_t - V_t on valid tokens
    torch.testing.assert_close(psi("reward_to_go_baseline", baseline=VALUES),
                               torch.tensor([[0.5, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 2.0, 4.0], [0.0, 0.0, 0.0]]))
    # the per-sequence means of the total returns
    r = torch.tensor([1.0, 3.0, 1.0, 1.0])
    torch.testing.assert_close(sequence_baseline(r, "batch_mean"), torch.full((4,), 1.5))
    torch.testing.assert_close(sequence_baseline(r, "group_mean", 2), torch.tensor([2.0, 2.0, 1.0, 1.0]))
    # G_t - b with the group means 2, 2, 1, 1
    torch.testing.assert_close(psi("reward_to_go_baseline", baseline=torch.tensor([2.0, 2.0, 1.0, 1.0])),
                               torch.tensor([[-1.0, 0.0, 0.0], [1.0, -2.0, 0.0], [0.0, 1.0, 3.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="needs critic values"):
        policy_gradient_psi("gae", REWARDS, MASK)
    with pytest.raises(ValueError, match="needs critic values"):
        policy_gradient_psi("q_value", REWARDS, MASK)
    with pytest.raises(ValueError, match="valid: return"):
        policy_gradient_psi("q", REWARDS, MASK)


@pytest.mark.parametrize("kind,baseline,expect,targets", [
    ("return", "batch_mean", RETURN, None),
    ("reward_to_go", "batch_mean", RTG, None),
    # batch mean 1.5: G_t - 1.5 on valid tokens
    ("reward_to_go_baseline", "batch_mean",
     torch.tensor([[-0.5, 0.5, 0.5], [1.5, -1.5, 0.0], [-0.5, 0.5, 2.5], [-0.5, 0.0, 0.0]]), None),
    ("reward_to_go_baseline", "group_mean",
     torch.tensor([[-1.0, 0.0, 0.0], [1.0, -2.0, 0.0], [0.0, 1.0, 3.0], [0.0, 0.0, 0.0]]), None),
    ("reward_to_go_baseline", "value", RTG - VALUES * MASK, RTG),
    ("td_residual", "batch_mean", TD, RTG),
    ("q_value", "batch_mean", (TD + VALUES) * MASK, RTG),
    # GAE's value targets are the lambda-returns A + V (PPO's); the others regress on rewards-to-go
    ("gae", "batch_mean", GAE, (GAE + VALUES) * MASK),
])
def test_psi_and_value_targets_of_each_setting(kind, baseline, expect, targets):
    values = VALUES if needs_values(kind, baseline) else None
    out, tgt = psi_and_value_targets(REWARDS, MASK, psi=kind, baseline=baseline, gamma=0.5, lam=0.5,
                                     values=values, group_size=2)
    torch.testing.assert_close(out, expect)
    if targets is None:
        assert tgt is None
    else:
        torch.testing.assert_close(tgt, targets)
    # whitening: mean 0, std 1 over the 9 valid tokens (unless Psi is constant)
    w, _ = psi_and_value_targets(REWARDS, MASK, psi=kind, baseline=baseline, gamma=0.5, lam=0.5, values=values,
                                 group_size=2, whiten=True)
    valid = MASK.bool()
    assert abs(w[valid].mean().item()) < 1e-6 and (w[~valid] == 0).all()


def test_policy_gradient_loss_gradient_by_hand():
    # d/d logp of -(1/|S|) sum_seq sum_t psi * logp is -psi / |S| on valid tokens, 0 elsewhere; |S| = 4
    logp = torch.full((4, 3), -0.7, requires_grad=True)
    dirty = torch.where(MASK.bool(), RTG, torch.full_like(RTG, 1e6))  # garbage on masked positions
    loss, stats = policy_gradient_loss(logp, dirty, MASK)
    loss.backward()
    torch.testing.assert_close(logp.grad, -RTG * MASK / 4)
    # value: -(1/4) * (-0.7) * sum of RTG on valid tokens = 0.7 * (5 + 3 + 7 + 1) / 4
    assert loss.item() == pytest.approx(0.7 * 16 / 4)
    assert stats["psi_mean"].item() == pytest.approx(16 / 9)
    # a per-sequence Psi (B,) broadcasts over tokens; token-mean divides by the 9 valid tokens instead
    loss_tm, _ = policy_gradient_loss(logp, torch.tensor([1.0, 3.0, 1.0, 1.0]), MASK, agg="token-mean")
    assert loss_tm.item() == pytest.approx(0.7 * (3 * 1 + 2 * 3 + 3 * 1 + 1 * 1) / 9)
    assert aggregate_count(MASK, "token-mean").item() == 9 and aggregate_count(MASK, "seq-mean-token-sum") == 4


# ---------------------------------------------------------------------------------------------------------------
# end to end

BASE = ["--disable_tqdm", "true", "--logging_steps", "1", "--seed", "3", "--max_new_tokens", "3",
        "--per_device_train_batch_size", "2", "--max_length", "32", "--learning_rate", "1e-3"]


def test_psi_of_a_real_run_reaches_the_loss(tiny_model_dir, diversity_data, tmp_path, monkeypatch):
    """The Psi handed to the loss equals G_t - group mean recomputed from the run's own rollout: scores at the
    last token, -beta * k1 KL to the reference on every token, gamma = 0.9."""
    import align.trainers.reinforce as rf
    from align.advantages import discounted_returns, reward_to_go

    seen = {}
    real_rollout, real_loss = rf.psi_rollout, POLICY_LOSSES["reinforce"]

    def spy_rollout(setup, step):
        out = real_rollout(setup, step)
        seen["rollout"] = out[0]
        return out

    def spy_loss(logp, psi, mask, *a, **kw):
        seen.setdefault("psi", []).append((psi.detach().clone(), mask.clone()))
        return real_loss(logp, psi, mask, *a, **kw)

    monkeypatch.setattr(rf, "psi_rollout", spy_rollout)
    monkeypatch.setitem(POLICY_LOSSES, "reinforce", spy_loss)
    from align.tiny import save_tiny_model

    prompts, reward = diversity_data
    out = str(tmp_path / "o")
    # a reference other than the starting policy, so that the KL term of the rewards is not zero
    ref = save_tiny_model(tmp_path / "ref", arch="llama", hidden_size=32, num_layers=2, num_heads=4,
                          intermediate_size=64, seed=1)
    assert main(["reinforce", "--model", tiny_model_dir, "--train_data", prompts, "--output_dir", out, *BASE,
                 "--max_steps", "1", "--reward_funcs", reward, "--num_generations", "3", "--baseline", "group_mean",
                 "--gamma", "0.9", "--beta", "0.5", "--kl_estimator", "k1", "--ref_model", ref]) == 0
    r = seen["rollout"]
    m = r.completion_mask.bool()
    kl = torch.where(m, r.logprobs - r.ref_logprobs, torch.zeros_like(r.logprobs))
    rewards = -0.5 * kl
    last = m.long().cumsum(-1).argmax(-1)  # index of the last valid token of each row
    rewards[torch.arange(len(r)), last] += r.rewards
    total = discounted_returns(rewards, m, 0.9)
    expect = reward_to_go(rewards, m, 0.9) - total.view(-1, 3).mean(1).repeat_interleave(3)[:, None]
    expect = torch.where(m, expect, torch.zeros_like(expect))
    ((got, mask),) = seen["psi"]
    assert torch.equal(mask, r.completion_mask)
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-5)
    assert got.abs().sum() > 0
    row = read_metrics(out)[0]
    assert abs(row["kl"]) > 1e-3 and "policy_loss" in row and "entropy" in row and "grad_norm" in row
    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    after = load_file(os.path.join(out, "model.safetensors"))
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 0


@pytest.mark.parametrize("psi", ["td_residual", "q_value"])
def test_reinforce_with_a_critic_runs_and_saves(tiny_model_dir, diversity_data, tmp_path, psi):
    from transformers import AutoModelForSequenceClassification

    prompts, reward = diversity_data
    out = str(tmp_path / "critic")
    assert main(["reinforce", "--model", tiny_model_dir, "--train_data", prompts, "--output_dir", out, *BASE,
                 "--max_steps", "2", "--reward_funcs", reward, "--psi", psi, "--beta", "0",
                 "--gradient_accumulation_steps", "2", "--gold_reward_funcs", "exact_match", "--eval_data", prompts,
                 "--eval_max_samples", "4"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("value_loss", "explained_variance", "value_mean", "gold_exact_match", "psi_abs_mean"):
        assert key in rows[0], key
    assert "kl" not in rows[0]  # beta = 0: no reference model is loaded
    assert "eval_exact_match" in rows[-1]
    critic = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "value_model"))
    assert critic.config.num_labels == 1


@pytest.mark.parametrize("extra,message", [
    (["--baseline", "group_mean"], "needs num_generations >= 2"),
    (["--psi", "q"], "is not one of"),
    (["--num_generations", "0"], "field 'num_generations': 0 is not >= 1"),
])
def test_bad_settings_fail_before_writing(tiny_model_dir, diversity_data, tmp_path, capsys, extra, message):
    prompts, reward = diversity_data
    out = tmp_path / "never"
    argv = ["reinforce", "--model", tiny_model_dir, "--train_data", prompts, "--output_dir", str(out), *BASE,
            "--reward_funcs", reward, *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
