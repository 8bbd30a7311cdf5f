"""Faults reach the user as one line naming the culprit, and nothing half-written survives: damaged checkpoints
(named, with the newest intact one), SIGTERM / SIGINT (a resumable stop that resumes bit-exactly), undecodable
or mistyped data and columns a reward function needs, models that cannot be loaded, and reward functions or
reward models that break their contract. Every failing run leaves no model in output_dir."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main
from align.trainers import checkpoints as C
from align.trainers import signals as S
from conftest import TORCHRUN, addition_rows, read_metrics, write_jsonl

SFT = ["--max_length", "32", "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "5",
       "--learning_rate", "1e-3", "--per_device_train_batch_size", "4"]
RL = ["--disable_tqdm", "true", "--seed", "3", "--max_new_tokens", "4", "--max_length", "32", "--num_generations",
      "2", "--per_device_train_batch_size", "8", "--max_steps", "2"]
MODEL_FILES = ("model.safetensors", "adapter_model.safetensors", "config.json")


def one_line_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ") or "Traceback" in ln]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def no_model(out) -> bool:
    return not any(os.path.exists(os.path.join(out, f)) for f in MODEL_FILES)


def sft(model, data, out, *extra) -> int:
    return main(["sft", "--model", model, "--train_data", data, "--output_dir", str(out), *SFT, *extra])


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


@pytest.fixture
def crashed_run(tiny_model_dir, sft_file, tmp_path):
    """A run with checkpoints at steps 2, 3, 4 (step 1's pruned) whose final model is gone (as after a crash)."""
    out = tmp_path / "run"
    assert sft(tiny_model_dir, sft_file, out, "--max_steps", "5", "--save_steps", "1", "--save_total_limit", "3") == 0
    for f in os.listdir(out):
        if f not in ("checkpoints", "metrics.jsonl", "sft_config.json"):
            os.remove(out / f)
    return out


def test_checkpoint_has_manifest_and_nothing_temporary(crashed_run):
    root = crashed_run / "checkpoints"
    assert sorted(os.listdir(root)) == ["step-2", "step-3", "step-4"]  # no .tmp- or .old- left behind
    manifest = json.loads((root / "step-4" / C.MANIFEST_FILE).read_text())["files"]
    files = sorted(f for f in os.listdir(root / "step-4") if f != C.MANIFEST_FILE)
    assert sorted(manifest) == files and "model.safetensors" in files and C.STATE_FILE in files
    assert manifest["model.safetensors"]["size"] == os.path.getsize(root / "step-4" / "model.safetensors")
    C.verify_checkpoint(str(root / "step-4"))


@pytest.mark.parametrize("damage", ["truncated", "flipped", "missing_file", "no_manifest"])
def test_damaged_latest_checkpoint_is_named_with_the_intact_one(damage, tiny_model_dir, sft_file, crashed_run,
                                                                capsys):
    newest = crashed_run / "checkpoints" / "step-4"
    weights = newest / "model.safetensors"
    size = os.path.getsize(weights)
    if damage == "truncated":  # a full disk: the file cut short
        with open(weights, "r+b") as fh:
            fh.truncate(size // 2)
    elif damage == "flipped":
        data = bytearray(weights.read_bytes())
        data[size // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "missing_file":
        os.remove(newest / "optimizer.bin")
    else:
        os.remove(newest / C.MANIFEST_FILE)
    capsys.readouterr()
    rc = sft(tiny_model_dir, sft_file, crashed_run, "--max_steps", "5", "--resume_from_checkpoint", "latest")
    line = one_line_error(capsys)
    assert rc == 2
    expect = {"truncated": f"{newest}/model.safetensors: size {size // 2}, manifest says {size}",
              "flipped": f"{newest}/model.safetensors: checksum mismatch",
              "missing_file": f"{newest}/optimizer.bin: missing",
              "no_manifest": f"{newest}: no manifest.json"}[damage]
    assert expect in line
    older = crashed_run / "checkpoints" / "step-3"
    assert f"newest intact checkpoint is {older}" in line and f"--resume_from_checkpoint {older}" in line
    assert "PytorchStreamReader" not in line and no_model(crashed_run)
    # the named checkpoint resumes (the damaged one is left alone for the user to look at)
    assert sft(tiny_model_dir, sft_file, crashed_run, "--max_steps", "5", "--resume_from_checkpoint", str(older)) == 0
    assert os.path.isfile(crashed_run / "model.safetensors") and os.path.isdir(newest)


def test_damaged_only_checkpoint_and_explicit_path(tiny_model_dir, sft_file, crashed_run, capsys):
    for s in (2, 3, 4):
        with open(crashed_run / "checkpoints" / f"step-{s}" / "optimizer.bin", "r+b") as fh:
            fh.truncate(100)
    capsys.readouterr()
    assert sft(tiny_model_dir, sft_file, crashed_run, "--max_steps", "5", "--resume_from_checkpoint", "latest") == 2
    assert "no older checkpoint is intact" in one_line_error(capsys)
    path = crashed_run / "checkpoints" / "step-3"
    assert sft(tiny_model_dir, sft_file, crashed_run, "--max_steps", "5", "--resume_from_checkpoint", str(path)) == 2
    assert f"{path}/optimizer.bin: size 100, manifest says" in one_line_error(capsys)
    assert no_model(crashed_run)


def test_full_disk_while_checkpointing_is_one_line_and_leaves_nothing_half_written(tiny_model_dir, sft_file,
                                                                                       tmp_path, monkeypatch, capsys):
    from accelerate import Accelerator

    def save_state(self, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "model.safetensors"), "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    out = tmp_path / "o"
    assert sft(tiny_model_dir, sft_file, out, "--max_steps", "3", "--save_steps", "2") == 2
    line = one_line_error(capsys)
    assert f"{out}/checkpoints/step-2: cannot write the checkpoint (No space left on device)" in line
    assert os.listdir(out / "checkpoints") == [] and no_model(out)


# ---------------------------------------------------------------------------------------------------------------
# SIGTERM / SIGINT: a resumable stop


def start_until_first_step(argv: list[str], out) -> subprocess.Popen:
    """Start a run in a subprocess and return once its metrics.jsonl has a line (its first step is done)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return proc


def test_sigterm_stops_resumably_and_resume_is_bit_exact(tiny_model_dir, sft_file, tmp_path):
    args = ["--max_steps", "300", "--lr_scheduler_type", "cosine", "--warmup_steps", "3"]
    out = tmp_path / "stopped"
    argv = [sys.executable, "-m", "align.cli", "sft", "--model", tiny_model_dir, "--train_data", sft_file,
            "--output_dir", str(out), *SFT, *args]
    proc = start_until_first_step(argv, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and lines[-1].startswith("stopped by SIGTERM after step ")
    step = int(lines[-1].split("after step ")[1].split()[0])
    assert 1 <= step < 300
    ckpt = out / "checkpoints" / f"step-{step}"
    assert f"checkpoint {ckpt} written" in lines[-1] and "--resume_from_checkpoint latest" in lines[-1]
    assert sorted(os.listdir(out / "checkpoints")) == [f"step-{step}"]
    C.verify_checkpoint(str(ckpt))
    assert no_model(out)  # the final model is not written as if training had completed
    assert read_metrics(out)[-1]["step"] == step

    assert sft(tiny_model_dir, sft_file, out, *args, "--resume_from_checkpoint", "latest") == 0
    full = tmp_path / "full"
    assert sft(tiny_model_dir, sft_file, full, *args) == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(full / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(full)]




def _worker_pids(parent: int) -> dict[int, int]:
    """rank -> pid of the workers a torchrun process started (Linux /proc)."""
    out = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{d}/environ", "rb") as fh:
                env = dict(e.split(b"=", 1) for e in fh.read().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if b"RANK" in env:
            out[int(env[b"RANK"])] = int(d)
    return out


@pytest.mark.skipif(not os.path.exists(TORCHRUN) or not os.path.isdir("/proc"), reason="needs torchrun and /proc")
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tiny_model_dir, sft_file, tmp_path):
    out = tmp_path / "ddp"
    argv = [TORCHRUN, "--nproc_per_node", "2", "--master_port", "29657", "-m", "align.cli", "sft", "--model",
            tiny_model_dir, "--train_data", sft_file, "--output_dir", str(out), *SFT, "--max_steps", "300"]
    proc = start_until_first_step(argv, out)
    workers = _worker_pids(proc.pid)
    assert sorted(workers) == [0, 1]
    os.kill(workers[1], signal.SIGTERM)  # only rank 1 hears it; rank 0 learns it from the per-step all-reduce
    _, err = proc.communicate(timeout=120)
    stops = [ln for ln in err.splitlines() if ln.startswith("stopped by SIGTERM after step ")]
    assert len(stops) == 1, err[-3000:]  # printed once, by the main process (rank 0)
    step = int(stops[0].split("after step ")[1].split()[0])
    ckpt = out / "checkpoints" / f"step-{step}"
    assert os.listdir(out / "checkpoints") == [f"step-{step}"] and (ckpt / "random_states_1.pkl").exists()
    C.verify_checkpoint(str(ckpt))
    assert no_model(out) and proc.returncode != 0


def test_stop_agreed_by_another_process_stops_this_one(tiny_model_dir, sft_file, tmp_path, monkeypatch):
    """The signal may reach only some processes: the loop stops on the reduced flag, not on its own."""

    class Other:  # a run of 2 processes whose reduce_sum adds another process's "got SIGTERM" from step 2 on
        world, calls = 2, []

        def reduce_sum(self, values):
            self.calls.append(values)
            return [values[0] + (1.0 if len(self.calls) >= 2 else 0.0), values[1]]

    other, agreed = Other(), S.StopSignals.agreed
    monkeypatch.setattr(S.StopSignals, "agreed", lambda self, run: agreed(self, other))
    out = tmp_path / "o"
    with pytest.raises(S.TrainingStopped) as e:
        sft(tiny_model_dir, sft_file, out, "--max_steps", "5")
    assert e.value.code == 143 and e.value.step == 2 and other.calls[0] == [0.0, 0.0]
    assert os.listdir(out / "checkpoints") == ["step-2"] and no_model(out)


def test_second_sigint_aborts_but_a_repeat_delivery_does_not(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(S.time, "monotonic", lambda: clock[0])
    s = S.StopSignals(announce=False)
    s._handle(signal.SIGTERM, None)
    s._handle(signal.SIGTERM, None)  # a scheduler and a launcher both forward SIGTERM: still a graceful stop
    assert s.signum == signal.SIGTERM
    s = S.StopSignals(announce=False)
    s._handle(signal.SIGINT, None)
    clock[0] += 0.1
    s._handle(signal.SIGINT, None)  # the terminal's Ctrl-C forwarded again by a launcher
    assert s.signum == signal.SIGINT
    clock[0] += 2
    with pytest.raises(KeyboardInterrupt):
        s._handle(signal.SIGINT, None)
    with S.StopSignals(announce=False):  # installed and restored on the main thread
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ---------------------------------------------------------------------------------------------------------------
# data


@pytest.mark.parametrize("case", ["not_utf8_jsonl", "not_utf8_csv", "number_completion", "chat_content",
                                  "output_below_file"])
def test_bad_sft_input_is_one_line(case, tiny_model_dir, sft_file, tmp_path, capsys):
    data, out = sft_file, tmp_path / "out"
    if case == "not_utf8_jsonl":
        data = str(tmp_path / "d.jsonl")
        with open(data, "wb") as fh:
            fh.write(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9 \xff", "completion": "b"}\n')
    elif case == "not_utf8_csv":
        data = str(tmp_path / "d.csv")
        with open(data, "wb") as fh:
            fh.write(b"prompt,completion\na,b\nc,d\xfe\n")
    elif case == "number_completion":
        data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 5}])
    elif case == "chat_content":
        data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": 7}]}])
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    assert sft(tiny_model_dir, data, out, "--max_steps", "2") == 2
    line = one_line_error(capsys)
    expect = {"not_utf8_jsonl": "d.jsonl: line 2, column 16: byte 0xe9 is not UTF-8",
              "not_utf8_csv": "d.csv: line 3, column 4: byte 0xfe is not UTF-8",
              "number_completion": "d.jsonl: line 2, field 'completion': expected a string or chat message list, "
                                   "got number 5",
              "chat_content": "d.jsonl: line 1, field 'messages': message 2: content is a number",
              "output_below_file": f"{tmp_path / 'file'} is a file, not a folder"}[case]
    assert expect in line
    assert not os.path.exists(out)


REWARDS = '''
import math

def needs_target(prompts, completions, target, **kw):
    return [float(c == t) for c, t in zip(completions, target)]

def short(prompts, completions, **kw):
    return [0.0] * (len(completions) - 1)

def words(prompts, completions, **kw):
    return ["high" if "4" in p else 1.0 for p in prompts]

def nan_on_4(prompts, completions, **kw):
    return [math.nan if "4" in p else 0.0 for p in prompts]

def raise_on_4(prompts, completions, **kw):
    for p in prompts:
        if "4" in p:
            raise ValueError("cannot score this one")
    return [0.0] * len(prompts)

def scalar(prompts, completions, **kw):
    return 1.0

def positional(p, c):
    return [0.0] * len(c)
'''


@pytest.fixture(scope="module")
def rl_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults_rl")
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in addition_rows(12, seed=7)]
    (d / "rewards.py").write_text(REWARDS)
    return {"dir": d, "prompts": write_jsonl(d / "rl.jsonl", rows), "rewards": str(d / "rewards.py"), "rows": rows}


def grpo(model, prompts, out, *extra) -> int:
    return main(["grpo", "--model", model, "--train_data", prompts, "--output_dir", str(out), *RL, *extra])


@pytest.mark.parametrize("case", ["missing_answer", "answer_float", "answer_null", "answer_list", "user_column",
                                  "positional", "mapped"])
def test_reward_columns_checked_before_the_first_step(case, tiny_model_dir, rl_files, tmp_path, capsys):
    rows = [dict(r) for r in rl_files["rows"]]
    funcs = ["exact_match"]
    extra = []
    if case == "missing_answer":
        del rows[3]["answer"]
        rows = [{"prompt": r["prompt"]} for r in rows]
    elif case == "answer_float":
        rows[4]["answer"] = 5.0
    elif case == "answer_null":
        rows[5]["answer"] = None
    elif case == "answer_list":
        rows[2]["answer"] = ["12"]
    elif case == "user_column":
        funcs = [f"{rl_files['rewards']}:needs_target"]
    elif case == "positional":
        funcs = [f"{rl_files['rewards']}:positional"]
    else:  # the error names the data's own column
        rows = [{"question": r["prompt"], "solution": r["answer"]} for r in rows]
        rows[6]["solution"] = None
        extra = ["--column_map", "{prompt: question, answer: solution}"]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out"
    assert grpo(tiny_model_dir, data, out, "--reward_funcs", *funcs, *extra) == 2
    line = one_line_error(capsys)
    expect = {"missing_answer": "p.jsonl: line 1: no column 'answer', which reward 'exact_match' needs",
              "answer_float": "p.jsonl: line 5, field 'answer': reward 'exact_match' needs text or an integer, got "
                              "number 5.0",
              "answer_null": "p.jsonl: line 6, field 'answer': reward 'exact_match' needs text or an integer, got null",
              "answer_list": "p.jsonl: line 3, field 'answer': reward 'exact_match' needs text or an integer, got list",
              "user_column": "p.jsonl: line 1: no column 'target', which reward 'needs_target' needs",
              "positional": "positional': the function must take the keyword arguments prompts and completions",
              "mapped": "p.jsonl: line 7, field 'solution': reward 'exact_match' needs text or an integer, got null"
              }[case]
    assert expect in line
    assert not os.path.exists(out)


# ---------------------------------------------------------------------------------------------------------------
# models


@pytest.fixture(scope="module")
def broken_models(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model whose tokenizer has no EOS (nor pad) token, and a reward model whose score head
    gives NaN."""
    import shutil

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    d = tmp_path_factory.mktemp("broken")
    noeos = d / "noeos"
    shutil.copytree(tiny_model_dir, noeos)
    cfg = json.loads((noeos / "tokenizer_config.json").read_text())
    cfg.update(eos_token=None, pad_token=None)
    (noeos / "tokenizer_config.json").write_text(json.dumps(cfg))
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    with torch.no_grad():
        rm.score.weight.fill_(float("nan"))
    rm.config.pad_token_id = 0
    rm.save_pretrained(d / "nan_rm")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(d / "nan_rm")
    return {"noeos": str(noeos), "nan_rm": str(d / "nan_rm")}


@pytest.mark.parametrize("case", ["hub_offline", "not_a_model", "checkpoint_dir", "no_eos"])
def test_model_that_cannot_be_used_is_one_line(case, tiny_model_dir, sft_file, broken_models, tmp_path, capsys):
    model = {"hub_offline": "nobody-has/this-model-135M", "not_a_model": str(tmp_path / "empty"),
             "checkpoint_dir": str(tmp_path / "empty"), "no_eos": broken_models["noeos"]}[case]
    os.makedirs(tmp_path / "empty", exist_ok=True)
    if case == "checkpoint_dir":
        (tmp_path / "empty" / "trainer_state.json").write_text("{}")
    out = tmp_path / "out"
    assert sft(model, sft_file, out, "--max_steps", "2") == 2
    line = one_line_error(capsys)
    expect = {"hub_offline": "nobody-has/this-model-135M: no such local directory, and not in the Hugging Face cache "
                             "while offline",
              "not_a_model": f"{model}: not a model directory (no config.json or adapter_config.json); give a folder",
              "checkpoint_dir": "it is a training checkpoint",
              "no_eos": f"{model}: the tokenizer has no EOS token"}[case]
    assert expect in line
    assert not os.path.exists(out)


def test_causal_lm_as_reward_model_is_refused(tiny_model_dir, rl_files, tmp_path, capsys):
    out = tmp_path / "out"
    assert grpo(tiny_model_dir, rl_files["prompts"], out, "--reward_model", tiny_model_dir) == 2
    line = one_line_error(capsys)
    assert f"{tiny_model_dir}: not a reward model: it has no trained score head" in line and "align rm" in line
    assert no_model(out)
    scored = tmp_path / "s.jsonl"
    assert main(["score", "--reward_model", tiny_model_dir, "--data", rl_files["prompts"], "--output",
                 str(scored)]) == 2
    assert "not a reward model" in one_line_error(capsys) and not scored.exists()


# ---------------------------------------------------------------------------------------------------------------
# the reward-function contract


@pytest.mark.parametrize("case", ["short", "words", "nan_on_4", "raise_on_4", "scalar", "nan_rm"])
def test_broken_reward_stops_the_run_naming_function_and_prompt(case, tiny_model_dir, rl_files, broken_models,
                                                                 tmp_path, capsys):
    src = ["--reward_model", broken_models["nan_rm"]] if case == "nan_rm" else \
        ["--reward_funcs", f"{rl_files['rewards']}:{case}"]
    out = tmp_path / "out"
    assert grpo(tiny_model_dir, rl_files["prompts"], out, *src) == 2
    line = one_line_error(capsys)
    head = {"short": "reward 'short' returned 7 values for 8 completions (none for prompt 'What is",
            "words": "reward 'words' returned 'high', not a number, for prompt 'What is",
            "nan_on_4": "reward 'nan_on_4' returned nan for prompt 'What is",
            "raise_on_4": "reward 'raise_on_4' failed at prompt 'What is",
            "scalar": "reward 'scalar' returned a float, not a list of one number per completion (first: prompt "
                      "'What is",
            "nan_rm": f"reward model {broken_models['nan_rm']}: score nan for prompt 'What is"}[case]
    assert head in line
    prompt = line.split("prompt '")[1].split("'")[0]
    assert prompt in [r["prompt"] for r in rl_files["rows"]]
    if case in ("words", "nan_on_4", "raise_on_4"):
        assert prompt == "What is 37+14?"  # the offending one: step 1's prompts are 63+18, 17+82, 37+14, 80+64
    if case == "raise_on_4":
        assert line.endswith("ValueError: cannot score this one")
    assert no_model(out)


def test_overwriting_a_run_removes_its_checkpoints_so_latest_is_this_runs(tiny_model_dir, sft_file, tmp_path, capsys):
    """A run with save_steps leaves checkpoints; a new run in the same output_dir with overwrite_output_dir (not
    resuming) removes them, so `resume_from_checkpoint latest` cannot pick the earlier run's."""
    out = tmp_path / "o"
    assert sft(tiny_model_dir, sft_file, out, "--max_steps", "4", "--save_steps", "2") == 0
    assert os.listdir(out / "checkpoints") == ["step-2"]
    assert sft(tiny_model_dir, sft_file, out, "--max_steps", "1", "--overwrite_output_dir", "true") == 0
    assert not (out / "checkpoints").exists()
    assert not [d for d in os.listdir(out) if d.startswith(".old-")]
    capsys.readouterr()
    assert sft(tiny_model_dir, sft_file, out, "--max_steps", "4", "--resume_from_checkpoint", "latest") == 2
    assert "no checkpoint found" in capsys.readouterr().err
