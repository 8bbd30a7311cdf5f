"""Seconds per optimizer step and peak memory of every stage (SFT, RM, PPO, GRPO, DPO) at two model sizes and two
batch shapes: align against TRL at equal settings and against the bare PyTorch work. Prints one table per (size,
shape) and the exact commands; asserts nothing about speed.

    python bench/bench_real.py --sizes tiny --reps 1 --steps 2            # minutes on 2 CPU cores
    python bench/bench_real.py                                            # the full sweep (hours on a CPU; README)
    python bench/bench_real.py --sizes smollm2 --shapes short --stages grpo --reps 1 --steps 2
    python bench/bench_real.py --trl116 '' --trl110 ''                    # without TRL

Sizes (random weights, built offline, align's built-in character-level tokenizer):

* tiny:    `align.tiny.save_tiny_model`: llama, hidden 128, 2 layers, 8 heads, MLP 512 (vocab 263);
* smollm2: a SmolLM2-135M-shaped llama (bench_dpo.SIZES: hidden 576, 30 layers, 9 heads, 3 KV heads, MLP 1536,
  vocab 49152, tied embeddings, rope_theta 100000). Ids above the tokenizer's 263 decode to nothing.

Shapes (one token per character with the built-in tokenizer):

* short:     prompts "What is 47+38?" (14 tokens); 16 completion tokens; 16 completions per step: GRPO 4 prompts
             x G=4, PPO 16 rollouts, RM and DPO 8 pairs (16 responses of 16 tokens); SFT 32 examples of ~10 tokens
             per step (bench_sft.make_data "short");
* realistic: chat-templated prompts of ~128 tokens (an instruction paragraph, then the problem, rendered with the
             tokenizer's chat template into the prompt text, so every variant gets the same ids); 64 completion
             tokens; 8 completions per step: GRPO 2 prompts x G=4, PPO 8 rollouts, RM and DPO 4 pairs (8 responses
             of 64 tokens); SFT 32 examples of 20-400 tokens (bench_sft.make_data "mixed").

Variants, each run in its own process (`python bench/bench_real.py _run ...`, a wrapper that sets the torch
threads, runs the target and, on a GPU, records torch.cuda.max_memory_allocated):

* align: the real CLI (`-m align.cli <stage> ...`, the target after the wrapper's arguments), fp32, no gradient
  checkpointing; step times and the phase breakdown (time_generation, time_reference, ...) from metrics.jsonl;
* trl:   TRL with fp32 weights and no gradient checkpointing at the same batch, lengths, learning rate and loss:
         SFTTrainer (bench_sft.TRL_SCRIPT), RewardTrainer (RM_TRL below), GRPOTrainer (bench_grpo.TRL_SCRIPT) and
         DPOTrainer (bench_dpo.TRL) from --trl116, PPOTrainer (bench_ppo.bench_trl, trl.experimental.ppo) from
         --trl110; timed between on_step_begin and on_step_end (PPO: a run of steps+1 steps minus a 1-step run);
* bare:  the same work written directly against PyTorch/transformers: bench_sft.bare_loop, bare_rm below,
         bench_ppo.bench_bare, bench_grpo.run_bare, bench_dpo.BARE.

Step time: the mean over the timed steps of a run (the first --warmup steps are not counted); the table gives the
median over --reps repetitions, run interleaved (align, trl, bare, align, trl, bare, ...). Peak memory: on CPU the
peak RSS (ru_maxrss from os.wait4) of the variant's process, model loading and data preparation included; on a GPU
torch.cuda.max_memory_allocated in that process. A variant that fails prints its command and the end of its
stderr, shows FAILED in the table, is not rerun, and the script exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import textwrap
import time

from trl_timing import STEP_TIMER  # bench/ is on sys.path when a bench runs

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STAGES = ("sft", "rm", "ppo", "grpo", "dpo", "ppo_lora")
VARIANTS = ("align", "trl", "bare")
# the phases align logs, in the order they happen; others it logs (time_*) are appended in the order seen
PHASES = ("time_generation", "time_scoring", "time_reference", "time_training")

SHAPES = {
    "short": dict(sft_shape="short", sft_batch=32, prompt="plain", new_tokens=16, completions=16, G=4),
    "realistic": dict(sft_shape="mixed", sft_batch=32, prompt="chat", new_tokens=64, completions=8, G=4),
}
# Before each problem of the realistic shape; with the chat template's role tokens the prompt is ~128 tokens.
INSTRUCTION = ("You are a careful math tutor. Read the problem, add the columns, check every carry, then reply with "
               "the sum.")
LR = dict(sft=1e-4, rm=1e-5, ppo=1e-5, grpo=1e-5, dpo=1e-6,  # as bench_sft, -, bench_ppo, bench_grpo, bench_dpo
          ppo_lora=1e-5)
LORA_R = 16  # align's default lora_r (alpha 32, every linear layer); bench_ppo.bench_trl's LoraConfig
PPO_EPOCHS, PPO_MINI_BATCHES, GRPO_BETA = 4, 2, 0.04

# TRL's RewardTrainer (trl 1.16), in the protocol of bench_dpo.TRL: spec as JSON in argv[1], a RESULT line.
RM_TRL = textwrap.dedent("""
    import json, sys, time, torch
    a = json.loads(sys.argv[1])
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer
    tok = AutoTokenizer.from_pretrained(a["model"])
    model = AutoModelForSequenceClassification.from_pretrained(a["model"], num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    ds = load_dataset("json", data_files=a["data"], split="train")
""") + STEP_TIMER + textwrap.dedent("""
    cfg = RewardConfig(output_dir=a["out"], max_steps=a["steps"], per_device_train_batch_size=a["batch"],
                       learning_rate=a["lr"], lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                       max_length=512, center_rewards_coefficient=None, logging_steps=1000, save_strategy="no",
                       report_to="none", bf16=False, fp16=False, gradient_checkpointing=False,
                       dataloader_num_workers=0, seed=0, use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    tr = RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[StepTimer()])
    tr.train()
    print("RESULT " + json.dumps({"step_times": step_times()}))
""")


# --------------------------------------------------------------------------------------------------- inputs ----
def build_model(size: str, folder: str) -> str:
    """The model of `size` saved with align's tokenizer; for PPO also a reward model (backbone + new head)."""
    sys.path[:0] = [ROOT, HERE]
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from align.tiny import build_tokenizer, save_tiny_model
    from bench_dpo import SIZES

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = os.path.join(folder, "model")
    if size == "tiny":
        save_tiny_model(model, arch="llama", hidden_size=128, num_layers=2, num_heads=8, intermediate_size=512,
                        max_position_embeddings=512)
    else:
        tok = build_tokenizer()
        cfg = AutoConfig.for_model("llama", **SIZES[size], pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(model)
        tok.save_pretrained(model)
    return model


def make_rm(model: str, folder: str) -> str:
    from bench_ppo import make_reward_model

    return make_reward_model(model, os.path.join(folder, "rm"))


def make_rm_adapter(model: str, folder: str, env: dict, threads: int) -> str:
    """A reward model as `align rm --use_lora` leaves it (a LoRA adapter of `model` and a value head), after one
    step on short pairs: what ppo_lora's one base copy loads as the reward model and the critic's start."""
    data, _ = make_data("rm", SHAPES["short"], model, os.path.join(folder, "rm_lora_data"), 8)
    out = os.path.join(folder, "rm_lora")
    cmd = [sys.executable, "-m", "align.cli", "rm", "--model", model, "--train_data", data, "--output_dir", out,
           "--overwrite_output_dir", "true", "--max_steps", "1", "--per_device_train_batch_size", "4",
           "--max_length", "512", "--dtype", "float32", "--use_lora", "true", "--lora_r", str(LORA_R),
           "--num_threads", str(threads), "--disable_tqdm", "true"]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


def render_prompt(tok, a: int, b: int, chat: bool) -> str:
    from align.task import make_prompt

    if not chat:
        return make_prompt(a, b)
    msgs = [{"role": "user", "content": f"{INSTRUCTION}\n\n{make_prompt(a, b)}"}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def response(rng: random.Random, head: str, n: int) -> str:
    """`head` then lowercase filler: n characters (n tokens) in all."""
    return (head + " " + "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(n)))[:n]


def make_data(stage: str, shape: dict, model: str, folder: str, rows: int) -> tuple[str, dict]:
    """The data file of `stage` in `shape` and a description (mean tokens per prompt/example)."""
    from transformers import AutoTokenizer

    from bench_sft import make_data as sft_data

    tok = AutoTokenizer.from_pretrained(model)
    ntok = (lambda s: len(tok(s, add_special_tokens=False)["input_ids"]))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{stage}.jsonl")
    if stage == "sft":
        sft_data(path, rows, shape=shape["sft_shape"])
        with open(path) as fh:
            lens = [ntok(r["prompt"]) + ntok(r["completion"]) + 1 for r in map(json.loads, fh)]
        return path, {"tokens/example": statistics.mean(lens), "max": max(lens)}
    rng = random.Random(0)
    out = []
    for _ in range(rows):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        row = {"prompt": render_prompt(tok, a, b, shape["prompt"] == "chat")}
        if stage in ("rm", "dpo"):
            wrong = a + b + rng.choice((-10, -1, 1, 10))
            row["chosen"] = response(rng, f"The sum is {a + b}.", shape["new_tokens"])
            row["rejected"] = response(rng, f"The sum is {wrong}.", shape["new_tokens"])
        else:
            row["answer"] = str(a + b)
        out.append(row)
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in out)
    return path, {"prompt tokens": statistics.mean(ntok(r["prompt"]) for r in out)}


def per_step(stage: str, shape: dict) -> int:
    """Batch size of a step in the stage's own unit: examples, pairs, rollouts, completions."""
    return {"sft": shape["sft_batch"], "rm": shape["completions"] // 2, "dpo": shape["completions"] // 2,
            "ppo": shape["completions"], "grpo": shape["completions"], "ppo_lora": shape["completions"]}[stage]


# ------------------------------------------------------------------------------------------------ variants ----
def align_args(stage: str, shape: dict, model: str, rm: str, data: str, rewards: str, out: str, args) -> list[str]:
    b, total = per_step(stage, shape), args.warmup + args.steps
    common = ["--model", model, "--train_data", data, "--output_dir", out, "--overwrite_output_dir", "true",
              "--max_steps", str(total), "--per_device_train_batch_size", str(b), "--learning_rate", str(LR[stage]),
              "--lr_scheduler_type", "constant", "--max_length", "512", "--dtype", "float32",
              "--gradient_checkpointing", "false", "--logging_steps", "1", "--disable_tqdm", "true",
              "--num_threads", str(args.threads), "--seed", "0"]
    extra = {
        "sft": [],
        "rm": [],
        "dpo": ["--per_device_eval_batch_size", str(b), "--beta", "0.1", "--loss_type", "sigmoid"],
        "ppo": ["--reward_model", rm, "--value_model", rm, "--max_new_tokens", str(shape["new_tokens"]),
                "--num_ppo_epochs", str(PPO_EPOCHS), "--num_mini_batches", str(PPO_MINI_BATCHES),
                "--temperature", "1.0"],
        # one base copy: policy and critic adapters, the reference = adapters off, the reward model = the frozen
        # adapter + head that make_rm_adapter wrote (`rm` is that folder here)
        "ppo_lora": ["--reward_model", rm, "--value_model", rm, "--max_new_tokens", str(shape["new_tokens"]),
                     "--num_ppo_epochs", str(PPO_EPOCHS), "--num_mini_batches", str(PPO_MINI_BATCHES),
                     "--temperature", "1.0", "--use_lora", "true", "--lora_r", str(LORA_R), "--share_base", "true"],
        "grpo": ["--reward_funcs", f"{rewards}:pseudo_random", "--num_generations", str(shape["G"]),
                 "--max_new_tokens", str(shape["new_tokens"]), "--beta", str(GRPO_BETA), "--epsilon", "0.2",
                 "--loss_type", "dapo", "--scale_rewards", "group", "--temperature", "1.0"],
    }[stage]
    if args.frozen_dtype and stage in ("ppo", "grpo"):  # ppo_lora has no frozen model of its own
        extra = [*extra, "--frozen_dtype", args.frozen_dtype]
    return ["-m", "align.cli", stage.split("_")[0], *common, *extra]


def variant_target(variant: str, stage: str, shape: dict, model: str, rm: str, data: str, rewards: str, out: str,
                   scripts: dict, args) -> tuple[str, list[str], int]:
    """(python, target after the wrapper, leading step times of its RESULT list to drop) of a variant."""
    b, total, w = per_step(stage, shape), args.warmup + args.steps, args.warmup
    if variant == "align":
        return sys.executable, align_args(stage, shape, model, rm, data, rewards, out, args), 0
    spec = dict(stage=stage, model=model, data=data, out=out, steps=total, warmup=w, batch=b, lr=LR[stage],
                threads=args.threads, new_tokens=shape["new_tokens"], G=shape["G"], root=ROOT)
    if variant == "bare":
        if stage == "dpo":  # bench_dpo's protocol: every step's time, warm-up included
            return sys.executable, [scripts["dpo_bare"], json.dumps(spec)], w
        return sys.executable, ["_child", "bare", json.dumps(spec)], 0
    if stage in ("ppo", "ppo_lora"):
        return args.trl110, ["_child", "trl_ppo", json.dumps({**spec, "lora": stage == "ppo_lora"})], 0
    if stage == "sft":  # argv: model, data, steps, batch, lr, warmup, out, max_length; the mean of timed steps
        return args.trl116, [scripts["sft_trl"], model, data, str(args.steps), str(b), str(LR[stage]), str(w),
                             out, "512"], 0
    if stage == "grpo":
        from bench_grpo import REWARDS_SRC

        g = dict(model=model, data=data, reward="pseudo_random", rewards_src=REWARDS_SRC, out=out, steps=total,
                 batch=b, G=shape["G"], new_tokens=shape["new_tokens"], lr=LR[stage], beta=GRPO_BETA, seed=0,
                 scheduler="constant", save=False)
        return args.trl116, [scripts["grpo_trl"], json.dumps(g)], w
    if stage == "dpo":
        return args.trl116, [scripts["dpo_trl"], json.dumps({**spec, "precompute": False})], w
    return args.trl116, [scripts["rm_trl"], json.dumps(spec)], w


def write_scripts(folder: str) -> dict[str, str]:
    """The TRL / bare scripts of the other benches (module-level strings) as files the variants run."""
    import bench_dpo
    import bench_grpo
    import bench_sft

    dpo_trl = bench_dpo.TRL.replace("use_cpu=True", "use_cpu=not torch.cuda.is_available()")
    assert dpo_trl != bench_dpo.TRL, "bench_dpo.TRL no longer says use_cpu=True"
    texts = {"sft_trl": bench_sft.TRL_SCRIPT, "grpo_trl": bench_grpo.TRL_SCRIPT, "dpo_trl": dpo_trl,
             "dpo_bare": bench_dpo.BARE, "rm_trl": RM_TRL}
    paths = {}
    for name, text in texts.items():
        paths[name] = os.path.join(folder, f"{name}.py")
        with open(paths[name], "w") as fh:
            fh.write(text)
    return paths


def not_applicable(variant: str, stage: str, args, cuda: bool) -> str:
    """Why a variant is not run ('' when it is)."""
    if variant == "trl":
        python, flag = (args.trl110, "--trl110") if stage.startswith("ppo") else (args.trl116, "--trl116")
        if not python:
            return f"no TRL venv ({flag} '')"
        if not os.path.exists(python):
            return f"{flag} {python} does not exist"
    if variant == "bare" and stage == "ppo_lora":
        return "no bare LoRA PPO loop (the memory comparison is against TRL's LoRA PPO)"
    if cuda and variant == "bare" and stage in ("sft", "dpo"):
        return "bench_sft.bare_loop / bench_dpo.BARE run on the CPU only"
    return ""


# ------------------------------------------------------------------------------------ child processes ----
def child(kind: str, spec: dict) -> None:
    """A bare variant, or TRL's PPO (in the --trl110 interpreter); prints 'RESULT {"mean": seconds}'."""
    sys.path[:0] = [HERE, spec["root"]]
    import torch

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stage, w, total = spec["stage"], spec["warmup"], spec["steps"]
    ns = argparse.Namespace(batch=spec["batch"], new_tokens=spec["new_tokens"], epochs=PPO_EPOCHS,
                            mini_batches=PPO_MINI_BATCHES, temperature=1.0, steps=total - w, warmup=w,
                            num_generations=spec["G"], beta=GRPO_BETA, lr=spec["lr"], seed=0, trl_python="",
                            lora=spec.get("lora", False))
    if kind == "trl_ppo":
        from bench_ppo import bench_trl

        assert w == 1, "bench_ppo.bench_trl times steps after one warm-up step"
        mean = bench_trl(spec["model"], spec["data"], spec["out"], ns, device)["total"]
    elif stage == "sft":
        from transformers import AutoTokenizer

        from align.data import read_rows, tokenize_sft
        from bench_sft import bare_loop

        examples = tokenize_sft(read_rows(spec["data"]), AutoTokenizer.from_pretrained(spec["model"]), max_length=512)
        mean = bare_loop(spec["model"], examples, total - w, spec["batch"], spec["lr"], 0, w)
    elif stage == "ppo":
        from bench_ppo import bench_bare

        assert w == 1, "bench_ppo.bench_bare times steps after one warm-up step"
        mean = bench_bare(spec["model"], spec["data"], ns, device)["total"]
    elif stage == "grpo":
        from bench_grpo import run_bare

        mean = statistics.mean(run_bare(spec["model"], spec["data"], ns))
    else:
        mean = statistics.mean(bare_rm(spec, device)[w:])
    print("RESULT " + json.dumps({"mean": mean}), flush=True)


def bare_rm(spec: dict, device) -> list[float]:
    """Seconds of each step of a Bradley-Terry step written by hand: chosen and rejected (prompt + response + EOS)
    as 2B right-padded rows through AutoModelForSequenceClassification, -logsigmoid(r_c - r_r), backward,
    clipping, AdamW."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1,
                                                               dtype=torch.float32).to(device)
    model.config.pad_token_id = tok.pad_token_id
    with open(spec["data"]) as fh:
        rows = [json.loads(x) for x in fh]
    b = spec["batch"]
    batches = []
    for s in range(spec["steps"]):
        seqs = [tok(r["prompt"] + r[k], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                for k in ("chosen", "rejected") for r in rows[s * b:(s + 1) * b]]
        ids = torch.full((len(seqs), max(map(len, seqs))), tok.pad_token_id)
        att = torch.zeros_like(ids)
        for i, x in enumerate(seqs):
            ids[i, :len(x)], att[i, :len(x)] = torch.tensor(x), 1
        batches.append((ids.to(device), att.to(device)))
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], foreach=True)
    model.train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for ids, att in batches:
        sync()
        t0 = time.perf_counter()
        r = model(input_ids=ids, attention_mask=att).logits[:, 0]
        loss = -F.logsigmoid(r[:b] - r[b:]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def wrapped(argv: list[str]) -> None:
    """`bench_real.py _run RESULT THREADS TARGET...`: torch threads set, then TARGET (`-m module args`,
    `script.py args` or `_child KIND SPEC`) run in this process; at exit RESULT gets the torch threads in use and,
    when CUDA was used, torch.cuda.max_memory_allocated."""
    import atexit
    import runpy

    result, threads, target = argv[0], int(argv[1]), argv[2:]
    import torch

    torch.set_num_threads(threads)

    def record() -> None:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        with open(result, "w") as fh:
            json.dump({"threads": torch.get_num_threads(),
                       "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}, fh)

    atexit.register(record)
    if target[0] == "_child":
        child(target[1], json.loads(target[2]))
    elif target[0] == "-m":
        sys.argv = [target[1], *target[2:]]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(target)
        sys.path.insert(0, os.path.dirname(os.path.abspath(target[0])))
        runpy.run_path(target[0], run_name="__main__")


# ------------------------------------------------------------------------------------------------ running ----
def run_process(cmd: list[str], env: dict, log: str, timeout: float) -> tuple[int, float, float, str]:
    """Run `cmd` (stdout and stderr to files beside `log`); (exit status, peak RSS GB of the process, wall s,
    error or '')."""
    t0 = time.perf_counter()
    with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
    deadline = t0 + timeout
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            os.killpg(p.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(p.pid, 0)
            p.returncode = -9
            return -9, usage.ru_maxrss / 2 ** 20, time.perf_counter() - t0, f"timed out after {timeout:.0f} s"
        time.sleep(0.2)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, usage.ru_maxrss / 2 ** 20, time.perf_counter() - t0, ""  # ru_maxrss: KiB on Linux


def tail(path: str, n: int = 25) -> str:
    try:
        with open(path, errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def parse(variant: str, out: str, stdout: str, drop: int) -> dict:
    """{'step': mean seconds of the timed steps, phases...}; raises ValueError when the run left no result."""
    if variant == "align":
        path = os.path.join(out, "metrics.jsonl")
        if not os.path.exists(path):
            raise ValueError("no metrics.jsonl written")
        with open(path) as fh:
            rows = [json.loads(x) for x in fh if x.strip()]
        timed = rows[drop:]
        if not timed:
            raise ValueError(f"metrics.jsonl has {len(rows)} rows, none after the warm-up")
        res = {k: statistics.mean(float(r.get(k, 0.0)) for r in timed)
               for k in dict.fromkeys(k for r in timed for k in r if k.startswith("time_"))}
        res["step"] = statistics.mean(r["step_time"] for r in timed)
        if any("response_length" in r for r in timed):
            res["response_length"] = statistics.mean(float(r.get("response_length", 0.0)) for r in timed)
        return res
    for line in stdout.splitlines():
        for tag in ("RESULT ", "TRL_RESULT "):
            if line.startswith(tag):
                r = json.loads(line[len(tag):])
                if "step_times" in r:
                    timed = r["step_times"][drop:]
                    if not timed:
                        raise ValueError(f"{len(r['step_times'])} step times, none after the warm-up")
                    return {"step": statistics.mean(timed)}
                return {"step": r.get("mean", r.get("step_time"))}
    raise ValueError("no RESULT line on stdout")


def fmt(v: float | None, width: int, digits: int = 3) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


def print_table(size: str, shape_name: str, stages: list[str], results: dict, status: dict, info: dict,
                cuda: bool, args) -> None:
    shape = SHAPES[shape_name]
    mem = "GPU peak GB" if cuda else "peak RSS GB"
    print(f"\n== {size}, {shape_name}: {shape['new_tokens']} completion tokens, {shape['completions']} completions "
          f"per step (GRPO G={shape['G']}, PPO {shape['completions']} rollouts, RM/DPO {shape['completions'] // 2} "
          f"pairs), SFT {shape['sft_batch']} examples/step")
    prompt = [info[k]["prompt tokens"] for k in info if k[:2] == (size, shape_name) and "prompt tokens" in info[k]]
    sft = info.get((size, shape_name, "sft"))
    print("   mean tokens: " + "; ".join(([f"prompt {statistics.mean(prompt):.0f}"] if prompt else [])
                                        + ([f"SFT example {sft['tokens/example']:.0f} (max {sft['max']})"]
                                           if sft else [])))
    head = (f"{'stage':<9}{'align s':>9}{'trl s':>9}{'bare s':>9}{'al/trl':>8}{'al/bare':>8}"
            f"{'| ' + mem + ' align':>23}{'trl':>7}{'bare':>7}{'al/trl':>8}  align breakdown (s/step)")
    print(head)
    print("-" * len(head))
    for st in stages:
        key = (size, shape_name, st)
        cells, mems = {}, {}
        for v in VARIANTS:
            s = status.get((*key, v), "")
            reps = results.get((*key, v), [])
            if s:
                cells[v] = mems[v] = "FAILED" if s.startswith("FAILED") else "n/a"
            elif reps:
                cells[v] = statistics.median(r["step"] for r in reps)
                m = [r["gpu_gb"] if cuda else r["rss_gb"] for r in reps]
                mems[v] = statistics.median(m) if None not in m else None
            else:
                cells[v] = mems[v] = None

        def num(x, w, d=3):
            return f"{x:>{w}}" if isinstance(x, str) else fmt(x, w, d)

        def ratio(a, b, w):
            return fmt(a / b, w, 2) if isinstance(a, float) and isinstance(b, float) and b else f"{'-':>{w}}"

        line = (f"{st:<9}{num(cells['align'], 9)}{num(cells['trl'], 9)}{num(cells['bare'], 9)}"
                f"{ratio(cells['align'], cells['trl'], 8)}{ratio(cells['align'], cells['bare'], 8)}"
                f"{num(mems['align'], 23, 2)}{num(mems['trl'], 7, 2)}{num(mems['bare'], 7, 2)}"
                f"{ratio(mems['align'], mems['trl'], 8)}  ")
        reps = results.get((*key, "align"), [])
        if reps:
            seen = dict.fromkeys(k for r in reps for k in r if k.startswith("time_"))
            phases = [p for p in PHASES if p in seen] + [p for p in seen if p not in PHASES]
            parts = [f"{p[5:]} {statistics.median(r.get(p, 0.0) for r in reps):.3f}" for p in phases]
            if phases:
                other = statistics.median(r["step"] - sum(r.get(p, 0.0) for p in phases) for r in reps)
                parts.append(f"other {other:.3f}")
            if any("response_length" in r for r in reps):
                parts.append(f"tok/compl {statistics.median(r.get('response_length', 0.0) for r in reps):.1f}")
            line += ", ".join(parts) or "-"
        print(line)
    for st in stages:
        for v in VARIANTS:
            s = status.get((size, shape_name, st, v), "")
            if s:
                print(f"  {st} {v}: {s.splitlines()[0]}")


def main() -> None:
    if sys.argv[1:2] == ["_run"]:
        wrapped(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    ap.add_argument("--sizes", default="tiny,smollm2", help="comma-separated subset of tiny,smollm2")
    ap.add_argument("--shapes", default="short,realistic", help="comma-separated subset of short,realistic")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median reported)")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run, after --warmup")
    ap.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)  # bench_ppo's functions assume 1
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads of every process")
    ap.add_argument("--sft_batch", type=int, default=0, help="SFT examples per step instead of the shape's 32 (at "
                                                             "the smollm2 size 32 realistic examples do not fit "
                                                             "TRL or the bare loop in 24 GiB: use 8)")
    ap.add_argument("--frozen_dtype", default="", choices=("", "float32", "bfloat16"),
                    help="align's frozen reference / reward model dtype in ppo and grpo (default: align's own "
                         "default, fp32 on a CPU); TRL and the bare loop keep fp32")
    ap.add_argument("--trl116", default="/tmp/trl116/bin/python",
                    help="python of a venv with trl==1.16.0 (SFT, RM, GRPO, DPO); '' skips TRL")
    ap.add_argument("--trl110", default="/tmp/trl110/bin/python",
                    help="python of a venv with trl==1.10.0 (PPO: trl.experimental.ppo); '' skips TRL PPO")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds allowed to one run")
    ap.add_argument("--keep", default="", help="folder for models, data and run outputs (kept); default: a "
                                               "temporary folder, removed at the end")
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    sizes = [s for s in args.sizes.split(",") if s]
    shapes = [s for s in args.shapes.split(",") if s]
    bad = [x for x in stages if x not in STAGES] + [x for x in sizes if x not in ("tiny", "smollm2")] + \
        [x for x in shapes if x not in SHAPES]
    if bad:
        sys.exit(f"unknown {', '.join(bad)}; stages: {','.join(STAGES)}; sizes: tiny,smollm2; shapes: "
                 f"{','.join(SHAPES)}")
    if args.sft_batch:
        for name in SHAPES:
            SHAPES[name] = dict(SHAPES[name], sft_batch=args.sft_batch)
    if args.steps < 1 or args.reps < 1 or args.warmup != 1:
        sys.exit("--steps and --reps must be >= 1 (and the warm-up is 1 step)")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path[:0] = [ROOT, HERE]
    import torch

    cuda = torch.cuda.is_available()
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    work = args.keep or tempfile.mkdtemp(prefix="bench_real_")
    os.makedirs(work, exist_ok=True)
    scripts = write_scripts(work)
    rewards = os.path.join(work, "bench_rewards.py")
    from bench_grpo import REWARDS_SRC

    with open(rewards, "w") as fh:
        fh.write(REWARDS_SRC)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p))
    env_txt = f"OMP_NUM_THREADS={args.threads} MKL_NUM_THREADS={args.threads} HF_HUB_OFFLINE=1 " \
              f"TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1 PYTHONPATH={ROOT}"

    results: dict[tuple, list[dict]] = {}
    status: dict[tuple, str] = {}  # 'FAILED: ...' or 'n/a: ...'
    commands: dict[tuple, str] = {}
    info: dict[tuple, dict] = {}
    for size in sizes:
        sdir = os.path.join(work, size)
        t0 = time.perf_counter()
        model = build_model(size, sdir)
        rm = make_rm(model, sdir) if "ppo" in stages else ""
        rm_lora = make_rm_adapter(model, sdir, env, args.threads) if "ppo_lora" in stages else ""
        print(f"[{size}] model built in {time.perf_counter() - t0:.0f} s: {model}", flush=True)
        for shape_name in shapes:
            shape = SHAPES[shape_name]
            for stage in stages:
                b, total = per_step(stage, shape), args.warmup + args.steps
                rows = max(512 if stage in ("ppo", "grpo") else 64, b * (total + 1))
                data, info[(size, shape_name, stage)] = make_data(stage, shape, model,
                                                                  os.path.join(sdir, shape_name), rows)
                for v in VARIANTS:
                    why = not_applicable(v, stage, args, cuda)
                    if why:
                        status[(size, shape_name, stage, v)] = "n/a: " + why
                for rep in range(args.reps):
                    for v in VARIANTS:
                        key = (size, shape_name, stage, v)
                        if key in status:
                            continue
                        out = os.path.join(sdir, shape_name, "runs", f"{stage}-{v}-{rep}")
                        shutil.rmtree(out, ignore_errors=True)
                        os.makedirs(os.path.dirname(out), exist_ok=True)
                        python, target, drop = variant_target(v, stage, shape, model,
                                                              rm_lora if stage == "ppo_lora" else rm, data,
                                                              rewards, out, scripts, args)
                        if v == "align":
                            drop = args.warmup
                        res_file = out + ".result.json"
                        cmd = [python, os.path.abspath(__file__), "_run", res_file, str(args.threads), *target]
                        commands.setdefault(key, f"{env_txt} {shlex.join(cmd)}")
                        load = os.getloadavg()[0]
                        rc, rss, wall, err = run_process(cmd, env, out, args.timeout)
                        stdout = tail(out + ".out", 10 ** 6)
                        res = None
                        if not err and rc != 0:
                            err = f"exit status {rc}"
                        if not err:
                            try:
                                res = parse(v, out, stdout, drop)
                            except ValueError as e:
                                err = str(e)
                        if err:
                            status[key] = f"FAILED: {err}"
                            print(f"\n!! {size} {shape_name} {stage} {v} (repetition {rep + 1}) failed: {err}\n"
                                  f"   command: {commands[key]}\n   end of stderr:\n"
                                  + "\n".join("   | " + x for x in (tail(out + ".err") or "(empty)").splitlines()),
                                  file=sys.stderr, flush=True)
                            continue
                        try:
                            with open(res_file) as fh:
                                wrap = json.load(fh)
                        except (OSError, ValueError):
                            wrap = {}
                        peak = wrap.get("cuda_peak_bytes")
                        res.update(rss_gb=rss, gpu_gb=peak / 2 ** 30 if peak is not None else None, wall=wall,
                                   threads=wrap.get("threads"))
                        results.setdefault(key, []).append(res)
                        print(f"[{size} {shape_name} rep {rep + 1}/{args.reps}] {stage:<8} {v:<5} "
                              f"{res['step']:.3f} s/step, peak RSS {rss:.2f} GB"
                              + (f", GPU peak {res['gpu_gb']:.2f} GB" if res["gpu_gb"] is not None else "")
                              + f", threads {res['threads']} (run {wall:.0f} s, load average {load:.1f} "
                                f"before it)", flush=True)
            print_table(size, shape_name, stages, results, status, info, cuda, args)

    dev = torch.cuda.get_device_name(0) if cuda else f"CPU, {args.threads} torch threads per process"
    print(f"\n\n#### Results: seconds per optimizer step and peak memory ({dev}, torch {torch.__version__}, fp32, "
          f"no gradient checkpointing" + (f"; align's frozen models in {args.frozen_dtype}" if args.frozen_dtype
                                           else "") + ")")
    print(f"Step time: mean of steps {args.warmup + 1}..{args.warmup + args.steps} of a run (step 1 is warm-up); "
          f"median of {args.reps} interleaved repetitions (align, trl, bare, ...). Memory: "
          + ("torch.cuda.max_memory_allocated" if cuda else "peak RSS of the variant's process (os.wait4)")
          + ". al/trl, al/bare: align divided by the other (< 1: align faster / smaller). Breakdown: the phases "
            "align logs (metrics.jsonl time_*), 'other' = step minus the phases, tok/compl = mean completion "
            "length. TRL: 1.16 (SFT, RM, GRPO, DPO), 1.10 (PPO).")
    for size in sizes:
        for shape_name in shapes:
            print_table(size, shape_name, stages, results, status, info, cuda, args)
    where = f"kept in {work}" if args.keep else "a temporary folder, removed at the end; --keep DIR keeps it"
    print(f"\nCommands (from the repository root; repetition 1; paths under {work}: {where}). `bench_real.py _run "
          f"RESULT THREADS` only sets the threads and records the GPU peak; after it comes the run itself "
          f"(`-m align.cli ...` is the align CLI):")
    for key, cmd in commands.items():
        print(f"  {' '.join(key)}:\n    {cmd}")
    total = time.perf_counter() - t_start
    print(f"\ntotal time {total:.0f} s ({total / 60:.1f} min); 1-minute load average {load_start:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} CPUs (other work on the machine shows here)")
    failed = {k: s for k, s in status.items() if s.startswith("FAILED")}
    if failed:
        print("\nFAILED (each one's command and end of stderr went to stderr):")
        for k, s in failed.items():
            print(f"  {' '.join(k)}: {s[len('FAILED: '):]}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
