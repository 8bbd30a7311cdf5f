"""Every stage gives the same weights on 2 CPU processes (DDP, and FSDP2 through `accelerate launch`) as on one
process with the same global batch (gradient accumulation making up the processes), within 1e-5.

The RL stages can only pass because a completion's random stream is keyed by (seed, step, its global index) and
every process trains on its share of the whole gathered rollout (`Run.shares`): nothing depends on the number of
processes. The 2-process runs of all stages share one launch (tests/scale_driver.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from align.cli import main
from conftest import TORCHRUN, addition_rows, needs_torchrun, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "scale_driver.py")
FSDP_CONFIG = os.path.join(ROOT, "recipes", "accelerate", "fsdp_cpu.yaml")
COMMON = ["--disable_tqdm", "true", "--logging_steps", "1", "--seed", "3", "--learning_rate", "1e-3",
          "--max_length", "32", "--max_steps", "2"]
RL = ["--max_new_tokens", "4", "--temperature", "1.0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, diversity_data, tiny_model_dir):
    d = tmp_path_factory.mktemp("scale")
    sft = write_jsonl(d / "sft.jsonl", addition_rows(32, seed=11))
    prompts = write_jsonl(d / "rl.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]}
                                           for r in addition_rows(24, seed=12)])
    prefs = write_jsonl(d / "prefs.jsonl", [{"prompt": r["prompt"], "chosen": r["answer"],
                                              "rejected": str(int(r["answer"]) + 10)}
                                             for r in addition_rows(32, seed=13)])
    # a LoRA reward model of the tiny model (`align rm --use_lora`): the one-base runs put it on the policy's base
    rm_lora = str(d / "rm_lora")
    assert main(["rm", "--model", tiny_model_dir, "--train_data", prefs, "--output_dir", rm_lora, "--max_steps", "2",
                 "--per_device_train_batch_size", "4", "--max_length", "32", "--use_lora", "true", "--lora_r", "4",
                 "--learning_rate", "1e-2", "--disable_tqdm", "true"]) == 0
    # a reward every policy can move (distinct characters), so that group advantages are not all zero
    return {"sft": sft, "prompts": prompts, "prefs": prefs, "reward": diversity_data[1], "rm_lora": rm_lora}


def stages(model: str, rm: str, data: dict, processes: int) -> dict[str, list[str]]:
    """Each stage's arguments for `processes` processes; the global batch is the same for 1 and 2."""
    x = 2 // processes  # the factor that makes up the missing processes
    acc = lambda n: ["--gradient_accumulation_steps", str(n * x)]  # noqa: E731
    return {
        "sft": ["sft", "--model", model, "--train_data", data["sft"], "--per_device_train_batch_size", "4",
                *acc(1), *COMMON],
        "rm": ["rm", "--model", model, "--train_data", data["prefs"], "--per_device_train_batch_size", "4",
               *acc(1), *COMMON],
        "dpo": ["dpo", "--model", model, "--train_data", data["prefs"], "--per_device_train_batch_size", "4",
                *acc(1), *COMMON],
        # per_device_train_batch_size counts a process's rollouts per step: the single process holds both shares
        "ppo": ["ppo", "--model", model, "--train_data", data["prompts"], "--reward_model", rm, "--value_model", rm,
                "--per_device_train_batch_size", str(4 * x), *acc(1), "--num_mini_batches", "2",
                "--num_ppo_epochs", "2", *RL, *COMMON],
        # per_device_train_batch_size counts completions of a micro-batch (TRL's meaning)
        "grpo": ["grpo", "--model", model, "--train_data", data["prompts"], "--reward_funcs", data["reward"],
                 "--num_generations", "2", "--per_device_train_batch_size", "4", *acc(1), "--beta", "0.04",
                 "--num_iterations", "2", *RL, *COMMON],
        "grpo_iterative": ["grpo", "--model", model, "--train_data", data["prompts"], "--reward_model", rm,
                           "--num_generations", "2", "--per_device_train_batch_size", "4", *acc(1), "--beta", "0.04",
                           "--ref_update_every", "1", "--rm_update", "true", "--rm_label_funcs", "exact_match",
                           "--rm_replay_data", data["prefs"], "--rm_replay_ratio", "0.5", *RL, *COMMON],
        # LoRA: the reference is the policy's base, reset to a frozen copy of its adapter (sharded under FSDP2)
        "grpo_iterative_lora": ["grpo", "--model", model, "--train_data", data["prompts"], "--reward_funcs",
                                data["reward"], "--num_generations", "2", "--per_device_train_batch_size", "4",
                                *acc(1), "--beta", "0.1", "--ref_update_every", "1", "--use_lora", "true",
                                "--lora_r", "4", *RL, *COMMON, "--max_steps", "3", "--learning_rate", "3e-2"],
        # micro-batches cut by a token budget (rows ordered by length; their count a multiple of the processes)
        "ppo_budget": ["ppo", "--model", model, "--train_data", data["prompts"], "--reward_model", rm, "--value_model",
                       rm, "--per_device_train_batch_size", str(4 * x), "--num_mini_batches", "2", "--num_ppo_epochs",
                       "2", "--max_tokens_per_micro_batch", "40", *RL, *COMMON],
        "grpo_budget": ["grpo", "--model", model, "--train_data", data["prompts"], "--reward_funcs", data["reward"],
                        "--num_generations", "2", "--per_device_train_batch_size", "4", *acc(1), "--beta", "0.04",
                        "--max_tokens_per_micro_batch", "40", *RL, *COMMON],
        # LoRA with one copy of the base: reward model and critic are adapters on the policy's base weights
        "ppo_one_base": ["ppo", "--model", model, "--train_data", data["prompts"], "--reward_model", data["rm_lora"],
                         "--value_model", data["rm_lora"], "--use_lora", "true", "--lora_r", "4",
                         "--per_device_train_batch_size", str(4 * x), *acc(1), "--num_mini_batches", "2",
                         "--num_ppo_epochs", "2", *RL, *COMMON],
        "grpo_one_base": ["grpo", "--model", model, "--train_data", data["prompts"], "--reward_model",
                          data["rm_lora"], "--use_lora", "true", "--lora_r", "4", "--num_generations", "2",
                          "--per_device_train_batch_size", "4", *acc(1), "--beta", "0.04", *RL, *COMMON],
        "reinforce": ["reinforce", "--model", model, "--train_data", data["prompts"], "--reward_funcs",
                      data["reward"], "--num_generations", "2", "--per_device_train_batch_size", str(2 * x),
                      *acc(1), "--beta", "0.1", *RL, *COMMON],
        "trpo": ["trpo", "--model", model, "--train_data", data["prompts"], "--reward_funcs", data["reward"],
                 "--num_generations", "2", "--per_device_train_batch_size", str(2 * x), *acc(1), *RL, *COMMON],
        "online_dpo": ["online_dpo", "--model", model, "--train_data", data["prompts"], "--reward_funcs",
                       data["reward"], "--num_generations", "2", "--per_device_train_batch_size", "2", *acc(1),
                       *RL, *COMMON],
    }


def launch(kind: str, jobs: list[list[str]], tmp_path, port: int) -> None:
    """All `jobs` in one 2-process launch: torchrun (DDP) or accelerate launch with the FSDP2 CPU recipe."""
    path = tmp_path / f"{kind}_jobs.json"
    path.write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if kind == "ddp":
        cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port), DRIVER, str(path)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CONFIG,
               "--main_process_port", str(port), DRIVER, str(path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    strategy = {"ddp": "DDP", "fsdp": "FSDP2"}[kind]  # what the run reports it used, once per stage
    assert res.stderr.count(f": 2 processes, {strategy}") == len(jobs), res.stderr[-3000:]
    return res.stderr


def saved(out: str) -> dict:
    """The final weights of a run: the model, and a separate critic or a reward model trained beside it."""
    if os.path.isfile(os.path.join(out, "adapter_model.safetensors")):  # a LoRA run: its adapters
        w = {}
        for sub in ("", "value_model"):
            f = os.path.join(out, sub, "adapter_model.safetensors")
            if os.path.isfile(f):
                w.update({f"{sub or 'adapter'}.{k}": v for k, v in load_file(f).items()})
        return w
    w = {f"model.{k}": v for k, v in load_file(os.path.join(out, "model.safetensors")).items()}
    for sub in ("value_model", "reward_model"):
        f = os.path.join(out, sub, "model.safetensors")
        if os.path.isfile(f):
            w.update({f"{sub}.{k}": v for k, v in load_file(f).items()})
    return w


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def run_all(kind: str, names: list[str], tiny_model_dir, tiny_rm_dir, data, tmp_path, port: int):
    one = stages(tiny_model_dir, tiny_rm_dir, data, 1)
    two = stages(tiny_model_dir, tiny_rm_dir, data, 2)
    said = launch(kind, [two[n] + ["--output_dir", str(tmp_path / kind / n)] for n in names], tmp_path, port)
    for n in names:  # the one-base runs really share the base on 2 processes (else they fall back in one line)
        if n.endswith("one_base"):
            models = ("the reference, the reward model (adapter 'reward') and the critic (adapter 'critic')"
                      if n == "ppo_one_base" else "the reference and the reward model (adapter 'reward')")
            assert f"{two[n][0]}: one copy of the base weights for the policy, {models}\n" in said, n
    start = {f"model.{k}": v for k, v in load_file(os.path.join(tiny_model_dir, "model.safetensors")).items()}
    for n in names:
        assert main(one[n] + ["--output_dir", str(tmp_path / "one" / n)]) == 0, n
        a, b = saved(str(tmp_path / kind / n)), saved(str(tmp_path / "one" / n))
        assert max_diff(a, b) < 1e-5, (n, max_diff(a, b))
        moved = {k: v - start[k] for k, v in a.items() if k in start}
        if not moved:  # an adapter: its B matrices start at zero
            moved = {k: v for k, v in a.items() if "lora_B" in k}
        assert max(d.abs().max().item() for d in moved.values()) > 1e-4, n  # training moved it


ALL = ["sft", "rm", "dpo", "ppo", "ppo_budget", "ppo_one_base", "grpo", "grpo_budget", "grpo_one_base",
       "grpo_iterative", "grpo_iterative_lora", "reinforce", "trpo", "online_dpo"]


@needs_torchrun
def test_every_stage_under_ddp_equals_one_process(tiny_model_dir, tiny_rm_dir, data, tmp_path):
    run_all("ddp", ALL, tiny_model_dir, tiny_rm_dir, data, tmp_path, 29641)


@needs_torchrun
def test_every_stage_under_fsdp2_equals_one_process(tiny_model_dir, tiny_rm_dir, data, tmp_path):
    run_all("fsdp", [n for n in ALL if n != "trpo"], tiny_model_dir, tiny_rm_dir, data, tmp_path, 29643)


@needs_torchrun
def test_fsdp2_gathers_once_per_rollout_and_shards_the_frozen_models(tiny_model_dir, tiny_rm_dir, data, tmp_path):
    """Under FSDP2 the frozen reference and reward model are sharded like the policy, and one rollout gathers
    each model's weights once: the number of all-gathers does not grow with the completion length (generation
    runs one forward per token)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CONFIG,
                          "--main_process_port", "29645", os.path.join(ROOT, "tests", "fsdp_gathers.py"),
                          tiny_model_dir, tiny_rm_dir, data["prompts"], str(tmp_path / "probe")],
                         env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1])
    assert report["strategy"] == "FSDP2"
    assert report["sharded"] == {"policy": True, "reference": True, "reward_model": True}
    short, long = report["counts"]["2"], report["counts"]["8"]
    assert short["length"] == 2 and long["length"] == 8  # the rollouts really ran 2 and 8 tokens
    # 3 models x 3 units (2 blocks + the rest): one gather each per rollout, whatever the length
    assert short["gathers"] == long["gathers"] == 9


def launch_cmd(kind: str, port: int, argv: list[str]) -> list[str]:
    if kind == "ddp":
        return [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port), "-m", "align.cli", *argv]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CONFIG, "--main_process_port",
            str(port), "-m", "align.cli", *argv]


@needs_torchrun
@pytest.mark.parametrize("kind,stage", [("ddp", "ppo"), ("fsdp", "grpo"), ("fsdp", "ppo_one_base")])
def test_two_processes_killed_and_resumed_equal_an_uninterrupted_run(kind, stage, tiny_model_dir, tiny_rm_dir,
                                                                      data, tmp_path):
    """Both processes are killed (SIGKILL, no chance to save) once a checkpoint exists; resuming the latest
    checkpoint on 2 processes finishes with the same weights as a run that was never stopped."""
    from align.trainers.checkpoints import verify_checkpoint

    argv = stages(tiny_model_dir, tiny_rm_dir, data, 2)[stage]
    argv = [a if a != "2" or argv[i - 1] != "--max_steps" else "12" for i, a in enumerate(argv)]
    argv += ["--save_steps", "3", "--save_total_limit", "2"]
    port = {"ppo": 29651, "grpo": 29661, "ppo_one_base": 29665}[stage]  # and the next two
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    full, cut = tmp_path / "full", tmp_path / "cut"
    res = subprocess.run(launch_cmd(kind, port, [*argv, "--output_dir", str(full)]), env=env, capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]

    proc = subprocess.Popen(launch_cmd(kind, port + 1, [*argv, "--output_dir", str(cut)]), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = cut / "checkpoints" / "step-6"
    deadline = time.monotonic() + 240
    try:
        while not (first / "manifest.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its checkpoint"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # every process of the launch, mid-run
        proc.wait()
    assert not os.path.exists(cut / "model.safetensors") and not os.path.exists(cut / "adapter_model.safetensors")
    latest = max(int(d.split("-")[1]) for d in os.listdir(cut / "checkpoints") if d.startswith("step-"))
    verify_checkpoint(str(cut / "checkpoints" / f"step-{latest}"))
    assert latest < 12
    res = subprocess.run(launch_cmd(kind, port + 2, [*argv, "--output_dir", str(cut), "--resume_from_checkpoint",
                                                     "latest"]),
                         env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert max_diff(saved(str(cut)), saved(str(full))) < 1e-6


FAILS_ON_RANK_1 = """import os
def fails_on_rank_1(prompts, completions, **kw):
    if os.environ.get("RANK") == "1":
        raise ValueError("disk quota exceeded on node 2")
    return [float(len(set(c))) for c in completions]
"""


@needs_torchrun
def test_a_failure_on_one_process_stops_the_run_and_names_the_process(tiny_model_dir, data, tmp_path):
    (tmp_path / "r.py").write_text(FAILS_ON_RANK_1)
    out = tmp_path / "out"
    argv = ["grpo", "--model", tiny_model_dir, "--train_data", data["prompts"], "--reward_funcs",
            f"{tmp_path / 'r.py'}:fails_on_rank_1", "--num_generations", "2", "--per_device_train_batch_size", "4",
            *RL, *COMMON, "--output_dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    res = subprocess.run(launch_cmd("ddp", 29657, argv), env=env, capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert res.returncode != 0
    lines = res.stderr.splitlines()
    assert ("error (process 1 of 2): reward 'fails_on_rank_1' failed at prompt" in res.stderr
            and "ValueError: disk quota exceeded on node 2" in res.stderr), res.stderr[-3000:]
    assert any(ln.startswith("error (process 0 of 2): stopped because another process of the run failed")
               for ln in lines), res.stderr[-3000:]
    assert "Traceback" not in "\n".join(ln for ln in lines if ln.startswith("[rank"))  # no worker traceback
    assert not (out / "model.safetensors").exists()  # nothing that looks like a finished run
