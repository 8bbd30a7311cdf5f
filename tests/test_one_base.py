"""One copy of the base weights in a LoRA PPO run: the policy (base + adapter 'default'), the reference (base,
adapters off), the critic (base + its adapter 'critic' + a value head) and a LoRA reward model (base + its frozen
adapter 'reward' + its head) all run on the policy's base weights.

The one-base run computes what separate copies compute (rollout rewards, reference log-probabilities, values,
losses, updated weights), holds one copy of the base, trains exactly the policy's and the critic's adapters and
the value head, saves policy and critic as separate copies would be saved, resumes exactly, and falls back to
separate copies (in one log line) where it cannot share. The other RL stages share the same way: GRPO and online
DPO their reward model, REINFORCE and TRPO their critic and reward model."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from safetensors.torch import load_file

import align.trainers.ppo as ppo_module
import align.trainers.rl as rl
from align.cli import main
from align.heads import SharedScalarModel, load_scalar_model, scalar_parts, token_values
from align.models import adapter_parameters, apply_lora, load_causal_lm, use_adapters
from conftest import addition_rows, read_metrics, write_jsonl

RL_ARGS = ["--disable_tqdm", "true", "--logging_steps", "1", "--seed", "3", "--max_new_tokens", "4",
           "--per_device_train_batch_size", "4", "--max_length", "32", "--learning_rate", "1e-3",
           "--num_ppo_epochs", "2", "--num_mini_batches", "2", "--use_lora", "true", "--lora_r", "4"]
TOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("onebase")
    prefs = [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": str(int(r["answer"]) - 10)}
             for r in addition_rows(16, seed=4)]
    prompts = [{"prompt": r["prompt"], "answer": r["answer"]} for r in addition_rows(12, seed=7)]
    return {"prefs": write_jsonl(d / "prefs.jsonl", prefs), "prompts": write_jsonl(d / "rl.jsonl", prompts)}


@pytest.fixture(scope="module")
def rm_adapter(tiny_model_dir, data, tmp_path_factory) -> str:
    """`align rm --use_lora` on the tiny model: a LoRA adapter of a scalar model and its trained head."""
    out = str(tmp_path_factory.mktemp("onebase_rm") / "rm")
    assert main(["rm", "--model", tiny_model_dir, "--train_data", data["prefs"], "--output_dir", out,
                 "--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "32", "--use_lora", "true",
                 "--lora_r", "4", "--learning_rate", "1e-2", "--disable_tqdm", "true"]) == 0
    return out


@pytest.fixture
def spy(monkeypatch) -> dict[str, list]:
    """Records each PPO run's set-up (policy, reference, reward sources, trained module) and its rollouts."""
    seen: dict[str, list] = {"setups": [], "rollouts": []}

    def make_step(setup):
        seen["setups"].append(setup)
        return ppo_module.PPOStep(setup)

    real_gather = rl.gather_rollout

    def gather(run, r, pad_id):
        out = real_gather(run, r, pad_id)
        seen["rollouts"].append(out)
        return out

    monkeypatch.setattr(ppo_module, "PPO", dataclasses.replace(ppo_module.PPO, make_step=make_step))
    monkeypatch.setattr(rl, "gather_rollout", gather)
    return seen


def ppo(model, prompts, out, *extra) -> str:
    assert main(["ppo", "--model", model, "--train_data", prompts, "--output_dir", str(out), *RL_ARGS, *extra]) == 0
    return str(out)


def base_storages(setup) -> dict[str, set[int]]:
    """Role -> the storages of its base (non-adapter, non-head) weights."""
    net = setup.run.unwrap()
    scorer = setup.sources.get("reward_model")

    def of(module) -> set[int]:
        if isinstance(module, SharedScalarModel):
            module = module.host
        return {p.untyped_storage().data_ptr() for n, p in module.named_parameters()
                if "lora_" not in n and "score" not in n}

    ref = setup.reference
    return {"policy": of(net.policy.model), "reference": of(ref.adapter_host if ref.lm is None else ref.lm),
            "critic": of(net.critic), "reward_model": of(scorer.model)}


def saved(out: str) -> dict[str, torch.Tensor]:
    w = {"policy." + k: v for k, v in load_file(os.path.join(out, "adapter_model.safetensors")).items()}
    w.update({"critic." + k: v for k, v in
              load_file(os.path.join(out, "value_model", "adapter_model.safetensors")).items()})
    return w


def shared_and_separate(stage: str, model: str, prompts: str, tmp_path, capsys, args: list[str],
                        line: str) -> dict[str, str]:
    """Runs `stage` with share_base (its log must say `line`) and with separate copies: {"one", "sep"} -> out."""
    outs = {}
    for name, extra in (("one", []), ("sep", ["--share_base", "false"])):
        outs[name] = str(tmp_path / name)
        assert main([stage, "--model", model, "--train_data", prompts, "--output_dir", outs[name], *args,
                     *extra]) == 0
        err = capsys.readouterr().err
        assert (line in err) if name == "one" else ("one copy of the base weights" not in err), (name, err)
    return outs


# ---------------------------------------------------------------------------------------------------------------
# (a) the same step as separate copies


@pytest.mark.parametrize("critic_from", ["reward_model", "model"])
def test_one_base_step_equals_separate_copies(tiny_model_dir, rm_adapter, data, spy, tmp_path, critic_from):
    """Both set-ups start from the same saved reward-model adapter (the critic from it too, or from the model with
    a new adapter and head) and the same seeded new adapters; the one-base run keeps them on one base, the other
    in separate model copies. The first step's rollout (rewards, reference log-probs, values), its metrics
    (losses, KL, ...) and the updated policy and critic weights agree."""
    value_model = rm_adapter if critic_from == "reward_model" else tiny_model_dir
    common = ("--max_steps", "1", "--reward_model", rm_adapter, "--value_model", value_model, "--beta", "0.1")
    one = ppo(tiny_model_dir, data["prompts"], tmp_path / "one", *common)
    sep = ppo(tiny_model_dir, data["prompts"], tmp_path / "sep", *common, "--share_base", "false")
    (s_one, s_sep), (r_one, r_sep) = spy["setups"], spy["rollouts"]
    assert s_one.run.unwrap().shares_base and not s_sep.run.unwrap().shares_base
    assert isinstance(s_one.sources["reward_model"].model, SharedScalarModel)
    assert not isinstance(s_sep.sources["reward_model"].model, SharedScalarModel)

    assert torch.equal(r_one.completion_ids, r_sep.completion_ids)
    for name in ("rewards", "logprobs", "ref_logprobs", "values"):
        torch.testing.assert_close(getattr(r_one, name), getattr(r_sep, name), atol=TOL, rtol=0, msg=name)
    assert r_one.values.abs().max() > 0.01  # a real critic, not zeros

    (m_one,), (m_sep,) = read_metrics(one), read_metrics(sep)
    keys = [k for k in m_sep if not k.startswith("time_") and k not in ("elapsed", "step_time")]
    for k in ("reward_reward_model", "kl", "value_mean", "policy_loss", "value_loss", "approx_kl", "grad_norm"):
        assert k in keys, k
    for k in keys:
        assert m_one[k] == pytest.approx(m_sep[k], rel=TOL, abs=TOL), k

    w_one, w_sep = saved(one), saved(sep)
    assert set(w_one) == set(w_sep)
    for k in w_sep:
        torch.testing.assert_close(w_one[k], w_sep[k], atol=TOL, rtol=0, msg=k)
    # both trained adapters moved (LoRA B starts at zero), and so did the value head
    for prefix in ("policy.", "critic."):
        assert max(w_one[k].abs().max().item() for k in w_one if k.startswith(prefix) and "lora_B" in k) > 1e-4
    assert any("score" in k for k in w_one)


# ---------------------------------------------------------------------------------------------------------------
# (b) structure: one copy of the base; what trains


def test_one_copy_of_the_base_and_only_policy_and_critic_train(tiny_model_dir, rm_adapter, data, spy, tmp_path):
    common = ("--max_steps", "1", "--reward_model", rm_adapter, "--value_model", rm_adapter)
    ppo(tiny_model_dir, data["prompts"], tmp_path / "one", *common)
    ppo(tiny_model_dir, data["prompts"], tmp_path / "sep", *common, "--share_base", "false")
    one, sep = spy["setups"]

    roles = base_storages(one)
    n_base = len(roles["policy"])
    assert n_base > 0 and all(s == roles["policy"] for s in roles.values())  # one copy, shared by all four
    sep_roles = base_storages(sep)
    assert sep_roles["reference"] == sep_roles["policy"]  # LoRA's reference was already the policy's base
    # separate copies: the policy's (and the reference's), the critic's and the reward model's
    assert not (sep_roles["critic"] & sep_roles["policy"] or sep_roles["reward_model"] & sep_roles["policy"]
                or sep_roles["critic"] & sep_roles["reward_model"])
    assert len(set().union(*roles.values())) == n_base < len(set().union(*sep_roles.values()))

    net = one.run.unwrap()
    host = net.policy.model
    assert net.critic.adapters == ["reward", "critic"]  # the reward model's adapter (frozen) is the critic's start
    assert one.sources["reward_model"].model.adapters == ["reward"]
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    expect = {id(p) for p in [*adapter_parameters(host, "default"), *adapter_parameters(host, "critic"),
                              *net.critic.score.parameters()]}
    assert trainable == expect
    in_optimizer = {id(p) for g in one.run.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == expect
    assert not any(p.requires_grad for p in adapter_parameters(host, "reward"))
    assert not any(p.requires_grad for p in one.sources["reward_model"].model.parameters())
    assert {id(p) for p in net.critic_parameters()} == {
        id(p) for p in [*adapter_parameters(host, "critic"), *net.critic.score.parameters()]}

    # the reward model's adapter and head did not move; its adapter is the saved one
    rm_file = load_file(os.path.join(rm_adapter, "adapter_model.safetensors"))
    from peft import get_peft_model_state_dict

    now = get_peft_model_state_dict(host, adapter_name="reward", save_embedding_layers=False)
    assert set(now) == {k for k in rm_file if ".score." not in k}
    assert all(torch.equal(now[k], rm_file[k]) for k in now)
    assert torch.equal(one.sources["reward_model"].model.score.weight, rm_file["base_model.model.score.weight"])


def test_each_pass_reaches_its_own_adapter(tiny_model_dir, rm_adapter):
    """One PolicyAndValue forward runs the base twice: the policy's pass must reach adapter 'default' only, the
    critic's pass 'critic' (and the head) only, after rollouts switched adapters on and off. peft's own
    set_adapter / disable_adapter would change requires_grad on each switch, and autograd skips a leaf that no
    longer requires grad, so gradients of an earlier pass would be lost."""
    from align.config import PPOConfig
    from align.models import load_tokenizer
    from align.scoring import RewardModelScorer
    from align.trainers.critic import with_critic

    cfg = PPOConfig(model=tiny_model_dir, reward_model=rm_adapter, use_lora=True, lora_r=4)
    tok = load_tokenizer(tiny_model_dir)
    host = apply_lora(load_causal_lm(tiny_model_dir), 4, 8, 0.0, ["all-linear"])
    scorer = RewardModelScorer(rm_adapter, device="cpu", host=host)
    net = with_critic(cfg, tok, torch.float32, host, share_base=True)
    with torch.no_grad():  # make every adapter matter (LoRA B starts at zero)
        for name in ("default", "critic"):
            for p in adapter_parameters(host, name):
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    pos = torch.arange(7).expand(2, 7)
    select = torch.ones_like(ids, dtype=torch.bool)
    flags = {n: p.requires_grad for n, p in host.named_parameters()}
    # what the rollout does between updates: generation, reward model, reference, values
    scorer.score_ids([[5, 6, 7], [8, 9]])
    ref = rl.Reference(None, adapter_host=host)
    with ref.active() as lm:
        lm(ids, select=select, attention_mask=mask, position_ids=pos)
    assert {n: p.requires_grad for n, p in host.named_parameters()} == flags
    assert host.active_adapters == ["default"]

    logits, values = net(ids, select, mask, pos)
    (logits.float().pow(2).mean() + values.pow(2).mean()).backward()
    grads = {name: [p.grad for p in adapter_parameters(host, name)] for name in ("default", "critic", "reward")}
    assert all(g is not None and g.abs().sum() > 0 for g in grads["default"] + grads["critic"])
    assert all(g is None for g in grads["reward"])
    assert net.critic.score.weight.grad.abs().sum() > 0

    # the same gradients as each adapter alone: the policy pass is base + default, the critic pass
    # base + reward + critic with the head
    g_policy = torch.autograd.grad(
        rl.SelectiveLM(host)(ids, select=select, attention_mask=mask, position_ids=pos).float().pow(2).mean(),
        adapter_parameters(host, "default"))
    for a, b in zip(g_policy, grads["default"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with use_adapters(host, ["reward", "critic"]):
        v = token_values(net.critic, ids, mask, pos)[select]
    g_critic = torch.autograd.grad(v.pow(2).mean(), adapter_parameters(host, "critic"))
    for a, b in zip(g_critic, grads["critic"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# (c) end to end: align rm --use_lora, then align ppo on one base; saves that load back; resume


def test_rm_then_ppo_on_one_base_saves_what_loads_back(tiny_model_dir, rm_adapter, data, spy, tmp_path, capsys):
    from peft import AutoPeftModelForCausalLM

    out = ppo(tiny_model_dir, data["prompts"], tmp_path / "ppo", "--max_steps", "2", "--reward_model", rm_adapter,
              "--value_model", rm_adapter, "--reward_funcs", "format_digits")
    err = capsys.readouterr().err
    assert ("ppo: one copy of the base weights for the policy, the reference, the reward model (adapter 'reward') "
            "and the critic (adapter 'critic')") in err
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and abs(rows[1]["kl"]) > 0
    # the policy's adapter alone in output_dir (no sub-folders for the other adapters), the critic in value_model
    assert sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))) == ["value_model"]
    assert all(".default." not in k and ".critic." not in k and ".reward." not in k
               for k in load_file(os.path.join(out, "adapter_model.safetensors")))

    (setup,) = spy["setups"]
    net = setup.run.unwrap().eval()
    ids = torch.randint(3, 200, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        want_logits = net.policy(ids, attention_mask=mask)
        want_values = token_values(net.critic, ids, mask)[mask.bool()]
        policy = AutoPeftModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(policy(input_ids=ids, attention_mask=mask).logits, want_logits, atol=TOL, rtol=0)
        torch.testing.assert_close(load_causal_lm(out)(input_ids=ids, attention_mask=mask).logits, want_logits,
                                   atol=TOL, rtol=0)
        critic = load_scalar_model(os.path.join(out, "value_model"), merge_adapter=False).eval()
        torch.testing.assert_close(token_values(critic, ids, mask)[mask.bool()], want_values, atol=TOL, rtol=0)
        merged = load_scalar_model(os.path.join(out, "value_model")).eval()
        torch.testing.assert_close(token_values(merged, ids, mask)[mask.bool()], want_values, atol=TOL, rtol=0)
        assert torch.equal(scalar_parts(critic)[1].weight, net.critic.score.weight)


def test_one_base_merge_lora_saves_full_models(tiny_model_dir, rm_adapter, data, spy, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = ppo(tiny_model_dir, data["prompts"], tmp_path / "merged", "--max_steps", "1", "--reward_model", rm_adapter,
              "--merge_lora", "true")
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    assert not os.path.exists(os.path.join(out, "value_model", "adapter_config.json"))
    (setup,) = spy["setups"]
    net = setup.run.unwrap().eval()
    assert net.shares_base
    ids = torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(input_ids=ids, attention_mask=mask).logits,
                                   net.policy(ids, attention_mask=mask), atol=TOL, rtol=0)
        critic = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "value_model"))
        torch.testing.assert_close(token_values(critic, ids, mask), token_values(net.critic, ids, mask), atol=TOL,
                                   rtol=0)


def test_one_base_resume_gives_the_same_run(tiny_model_dir, rm_adapter, data, tmp_path):
    """Steps 2 and 3 again from the step-1 checkpoint: the same metrics and weights (policy, critic adapter and
    head, β of the adaptive controller) as the uninterrupted run."""
    import shutil

    common = ("--reward_model", rm_adapter, "--value_model", rm_adapter, "--lr_scheduler_type", "constant",
              "--save_steps", "1", "--kl_controller", "adaptive", "--target_kl", "0.01", "--max_steps", "3")
    out = ppo(tiny_model_dir, data["prompts"], tmp_path / "run", *common)
    full_m, full_w = read_metrics(out), saved(out)
    shutil.rmtree(os.path.join(out, "checkpoints", "step-2"))
    ppo(tiny_model_dir, data["prompts"], out, *common, "--resume_from_checkpoint", "latest")
    res_m, res_w = read_metrics(out), saved(out)
    assert [r["step"] for r in res_m] == [1, 2, 3]
    for k in ("reward", "kl", "beta", "value_loss", "value_mean", "policy_loss"):
        assert [r[k] for r in res_m] == [r[k] for r in full_m], k
    assert set(full_w) == set(res_w) and all(torch.equal(full_w[k], res_w[k]) for k in full_w)


# ---------------------------------------------------------------------------------------------------------------
# fall-backs


def test_falls_back_to_separate_copies_and_says_why(tiny_model_dir, tiny_rm_dir, rm_adapter, data, spy, tmp_path,
                                                    capsys):
    # a full reward model cannot be an adapter; with gradient checkpointing the critic cannot switch adapters
    ppo(tiny_model_dir, data["prompts"], tmp_path / "full_rm", "--max_steps", "1", "--reward_model", tiny_rm_dir,
        "--value_model", rm_adapter, "--gradient_checkpointing", "true", "--num_ppo_epochs", "1")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ppo: ")]
    assert lines == [f"ppo: one copy of the base weights for the policy and the reference; separate copies for the "
                     f"reward model ({tiny_rm_dir} is not a LoRA adapter of {tiny_model_dir}) and the critic "
                     f"(gradient_checkpointing is on: its recomputation would run with the wrong adapter)"]
    (setup,) = spy["setups"]
    roles = base_storages(setup)
    assert roles["reference"] == roles["policy"]
    assert not roles["critic"] & roles["policy"] and not roles["reward_model"] & roles["policy"]
    assert not setup.run.unwrap().shares_base
    assert list(setup.run.unwrap().policy.model.peft_config) == ["default"]


def test_full_weight_runs_do_not_share(tiny_model_dir, rm_adapter, data, spy, tmp_path, capsys):
    argv = ["ppo", "--model", tiny_model_dir, "--train_data", data["prompts"], "--output_dir", str(tmp_path / "full"),
            "--disable_tqdm", "true", "--max_new_tokens", "4", "--per_device_train_batch_size", "4",
            "--max_length", "32", "--num_ppo_epochs", "1", "--max_steps", "1", "--reward_model", rm_adapter]
    assert main(argv) == 0
    assert not [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ppo: ")]
    (setup,) = spy["setups"]
    roles = base_storages(setup)
    assert len({frozenset(s) for s in roles.values()}) == 4  # policy, reference, critic, reward model: 4 copies
    # the critic starts from the LoRA reward model merged into its base, and is trained in full: every weight of
    # it (peft loads an adapter's base frozen; the merged model must come back trainable) and of the policy
    net = setup.run.unwrap()
    assert all(p.requires_grad for p in net.parameters())
    start = load_scalar_model(rm_adapter).state_dict()
    saved = load_file(os.path.join(tmp_path / "full", "value_model", "model.safetensors"))
    moved = [k for k in saved if not torch.equal(saved[k], start[k])]
    assert any("layers" in k for k in moved) and any("score" in k for k in moved)


def test_a_model_saved_as_a_lora_adapter_loads_trainable(tiny_model_dir, rm_adapter, tmp_path):
    """An adapter directory (`align sft --use_lora`, `align rm --use_lora`) loads merged into a plain model with
    every weight trainable, as a full model loads: the next stage can train it in full."""
    policy = apply_lora(load_causal_lm(tiny_model_dir), 4, 8, 0.0, ["all-linear"])
    policy.save_pretrained(tmp_path / "sft")
    for model in (load_causal_lm(str(tmp_path / "sft")), load_scalar_model(rm_adapter)):
        assert not hasattr(model, "peft_config")  # merged
        assert all(p.requires_grad for p in model.parameters()), type(model).__name__


@pytest.mark.parametrize("stage", ["grpo", "online_dpo"])
def test_group_stage_reward_model_adapter_on_the_policy_base_equals_a_separate_copy(
        stage, tiny_model_dir, rm_adapter, data, tmp_path, monkeypatch, capsys):
    """GRPO and online DPO with use_lora and a LoRA reward model of the same base: the reward model runs as a
    frozen adapter on the policy's base weights (one copy for policy, reference and reward model); the rewards of
    every rollout and the trained adapter equal those of a run with the reward model in its own copy."""
    rewards: list[torch.Tensor] = []
    real_gather = rl.gather_rollout

    def gather(run, r, pad_id):
        out = real_gather(run, r, pad_id)
        rewards.append(out.rewards.clone())
        return out

    monkeypatch.setattr(rl, "gather_rollout", gather)
    args = ["--disable_tqdm", "true", "--seed", "3", "--max_new_tokens", "4", "--max_length", "32",
            "--learning_rate", "1e-3", "--use_lora", "true", "--lora_r", "4", "--num_generations", "2",
            "--per_device_train_batch_size", "4", "--beta", "0.04", "--max_steps", "2", "--reward_model", rm_adapter]
    outs = shared_and_separate(stage, tiny_model_dir, data["prompts"], tmp_path, capsys, args,
                               f"{stage}: one copy of the base weights for the policy, the reference and the reward "
                               "model (adapter 'reward')")
    assert len(rewards) == 4 and rewards[0].abs().max() > 0  # the reward model really scored
    for a, b in zip(rewards[:2], rewards[2:]):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    w_one = load_file(os.path.join(outs["one"], "adapter_model.safetensors"))
    w_sep = load_file(os.path.join(outs["sep"], "adapter_model.safetensors"))
    assert set(w_one) == set(w_sep) and not any("reward" in k for k in w_one)  # only the policy's adapter saved
    for k in w_sep:
        torch.testing.assert_close(w_one[k], w_sep[k], atol=TOL, rtol=0, msg=k)
    assert max(w_one[k].abs().max().item() for k in w_one if "lora_B" in k) > 1e-4


@pytest.mark.parametrize("stage", ["reinforce", "trpo"])
def test_policy_gradient_critic_and_reward_model_on_the_policy_base_equal_separate_copies(
        stage, tiny_model_dir, rm_adapter, data, tmp_path, monkeypatch, capsys):
    """REINFORCE and TRPO with use_lora, psi=gae (a critic) and a LoRA reward model of the same base: the critic
    (its adapter and value head, started from the reward model's) and the reward model run on the policy's base
    weights; every rollout's rewards and values, and the saved policy and critic, equal those of a run with
    separate copies (share_base false)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_gather = rl.gather_rollout

    def gather(run, r, pad_id):
        out = real_gather(run, r, pad_id)
        seen.append((out.rewards.clone(), out.values.clone()))
        return out

    monkeypatch.setattr(rl, "gather_rollout", gather)
    args = ["--disable_tqdm", "true", "--seed", "3", "--max_new_tokens", "4", "--max_length", "32",
            "--learning_rate", "1e-3", "--use_lora", "true", "--lora_r", "4", "--per_device_train_batch_size", "4",
            "--beta", "0.04", "--max_steps", "2", "--reward_model", rm_adapter, "--psi", "gae"]
    if stage == "trpo":
        args += ["--vf_iters", "2", "--max_kl", "0.05"]
    outs = shared_and_separate(stage, tiny_model_dir, data["prompts"], tmp_path, capsys, args,
                               f"{stage}: one copy of the base weights for the policy, the reference, the reward "
                               "model (adapter 'reward') and the critic (adapter 'critic')")
    assert len(seen) == 4 and seen[0][0].abs().max() > 0 and seen[0][1].abs().max() > 0
    for (ra, va), (rb, vb) in zip(seen[:2], seen[2:]):
        torch.testing.assert_close(ra, rb, atol=TOL, rtol=0)
        torch.testing.assert_close(va, vb, atol=TOL, rtol=0)
    w_one, w_sep = saved(outs["one"]), saved(outs["sep"])
    assert set(w_one) == set(w_sep)
    for k in w_sep:
        torch.testing.assert_close(w_one[k], w_sep[k], atol=TOL, rtol=0, msg=k)
    moved = [k for k in w_one if k.startswith("policy.") and "lora_B" in k]
    assert moved and max(w_one[k].abs().max().item() for k in moved) > 1e-4  # the policy trained
    critic_b = [k for k in w_one if k.startswith("critic.") and "lora_B" in k]
    start = load_file(os.path.join(rm_adapter, "adapter_model.safetensors"))
    assert critic_b and any(not torch.equal(w_one[k], start[k[len("critic."):]]) for k in critic_b
                            if k[len("critic."):] in start)  # the critic trained away from the reward model


def test_trpo_steps_only_the_policy_adapter(tiny_model_dir):
    """TRPO's parameter vector (conjugate gradient, line search) is the policy's adapter, not a critic adapter
    that shares the policy's base."""
    from peft import LoraConfig

    from align.trainers.trpo import trainable

    policy = apply_lora(load_causal_lm(tiny_model_dir), 4, 8, 0.0, ["all-linear"])
    policy.add_adapter("critic", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    critic = adapter_parameters(policy, "critic")
    for p in critic:  # trainable, as `shared_critic` makes the critic's adapter
        p.requires_grad_(True)
    assert critic
    got = {id(p) for p in trainable(rl.SelectiveLM(policy))}
    assert got == {id(p) for p in adapter_parameters(policy, "default")}
