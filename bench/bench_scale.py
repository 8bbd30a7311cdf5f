"""Seconds per GRPO and PPO step on 1 CPU process, 2 processes with DDP and 2 processes with FSDP2, at the same
global batch, with the per-phase times the stages log (time_generation, time_scoring, time_reference,
time_training, ...). Prints a table and the exact commands; asserts nothing.

    python bench/bench_scale.py                                    # hidden 128, 2 layers, 3 repetitions
    python bench/bench_scale.py --hidden 256 --layers 4            # a bigger model
    python bench/bench_scale.py --stages ppo --modes 1proc,fsdp2 --reps 5
    python bench/bench_scale.py --ddp_launcher torchrun            # DDP through torchrun instead of accelerate

Every run is the real CLI (`python -m align.cli <stage> ...`) in its own process group, on a randomly initialised
tiny Llama built offline (`align.tiny.save_tiny_model`) and a prompt file of 2-digit additions:

* 1proc: `python -m align.cli ...`, one process, one thread (OMP_NUM_THREADS=1, --num_threads 1);
* ddp:   `accelerate launch --config_file recipes/accelerate/cpu2.yaml -m align.cli ...` (2 CPU processes), or
         `torchrun --nproc_per_node 2 -m align.cli ...` with --ddp_launcher torchrun;
* fsdp2: `accelerate launch --config_file recipes/accelerate/fsdp_cpu.yaml -m align.cli ...`: FSDP2 on CPU (no
         mixed precision, transformer-based wrap, reshard after forward, full state dict).
  The two-process runs use one thread per process too, so they use the machine's 2 cores.

Same global batch in every mode:

* GRPO: per_device_train_batch_size counts completions per micro-batch (--grpo_micro) and a step's prompts per
  process are per_device x gradient_accumulation_steps / num_generations; 2 processes use
  gradient_accumulation_steps = grpo_batch / (2 x grpo_micro), 1 process twice that. Reward: the built-in
  format_digits. A random model almost never writes a bare number, so every group's rewards tie and every
  advantage is 0; with beta = 0 every mode would then skip all training forwards (completions with no gradient
  are left out), so --beta defaults to 0.04: every completion is trained on (and the reference forward is
  timed).
* PPO: per_device_train_batch_size counts rollouts per process per step; 2 processes use ppo_batch / 2 and
  --ppo_accum, 1 process ppo_batch and 2 x ppo_accum (the same micro-batch size). Reward: a reward model made
  offline from the tiny model (its backbone and a new score head), also the critic (--value_model).

Each run makes --steps optimizer steps (logging every step); the first is warm-up and not counted, the others'
times (as logged by rank 0 in metrics.jsonl) are averaged. The runs alternate 1proc, ddp, fsdp2, 1proc, ... for
--reps repetitions and the table gives the median over repetitions.

Each launch is checked: a probe (a sitecustomize module on PYTHONPATH) counts the `align.cli` processes it started
and their OMP_NUM_THREADS, and align's own stderr line '<stage>: 2 processes, DDP|FSDP2' gives the strategy (shown
as 'ran as'; '?' when align does not print it). A run that fails or ran other than asked (1 process instead of 2,
DDP instead of FSDP2) prints its command and its traceback (or the end of its stderr), its (stage, mode) is
dropped from later repetitions, and the script exits with status 1 after printing the table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODES = ("1proc", "ddp", "fsdp2")
STAGES = ("grpo", "ppo")
# the phases in the order they happen; others a stage logs (time_*) are appended in the order seen
PHASES = ("time_generation", "time_scoring", "time_reference", "time_training")

FSDP2_CPU_YAML = os.path.join(ROOT, "recipes", "accelerate", "fsdp_cpu.yaml")


def max_length(args) -> int:
    """Positions of the model and the stages' max_length: room for a prompt (14 tokens) and the completion."""
    return max(64, 48 + args.new_tokens)


def make_inputs(root: str, args) -> tuple[str, str, str]:
    """(tiny causal LM dir, reward model dir made from it, prompt file of 2-digit additions)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from align.heads import load_scalar_model
    from align.tiny import save_tiny_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    heads = args.heads or max(1, args.hidden // 16)
    model = save_tiny_model(os.path.join(root, "model"), arch="llama", hidden_size=args.hidden,
                            num_layers=args.layers, num_heads=heads, intermediate_size=4 * args.hidden,
                            max_position_embeddings=max_length(args))
    rm = os.path.join(root, "rm")
    load_scalar_model(model, seed=0).save_pretrained(rm, safe_serialization=True)
    AutoTokenizer.from_pretrained(model).save_pretrained(rm)
    rng = random.Random(0)
    data = os.path.join(root, "prompts.jsonl")
    with open(data, "w", encoding="utf-8") as fh:
        for _ in range(max(512, 2 * args.steps * max(args.grpo_batch, args.ppo_batch))):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            fh.write(json.dumps({"prompt": f"What is {a}+{b}?", "answer": str(a + b)}) + "\n")
    return model, rm, data


def check_batches(args) -> None:
    g, micro, batch = args.num_generations, args.grpo_micro, args.grpo_batch
    if micro % g:
        sys.exit(f"--grpo_micro {micro} must be a multiple of --num_generations {g}")
    if batch % (2 * micro):
        sys.exit(f"--grpo_batch {batch} must be a multiple of 2 x --grpo_micro {micro} (2 processes)")
    if args.ppo_batch % 2:
        sys.exit(f"--ppo_batch {args.ppo_batch} must be even (2 processes)")
    if args.ppo_batch // 2 < args.ppo_mini_batches * args.ppo_accum:
        sys.exit(f"--ppo_batch / 2 = {args.ppo_batch // 2} rollouts per process cannot fill --ppo_mini_batches x "
                 f"--ppo_accum = {args.ppo_mini_batches * args.ppo_accum} micro-batches")


def stage_args(stage: str, procs: int, model: str, rm: str, data: str, out: str, args) -> list[str]:
    """The align.cli arguments of `stage` on `procs` processes, at the same global batch for any `procs`."""
    common = ["--model", model, "--train_data", data, "--output_dir", out, "--overwrite_output_dir", "true",
              "--max_steps", str(args.steps), "--max_new_tokens", str(args.new_tokens),
              "--max_length", str(max_length(args)), "--logging_steps", "1", "--disable_tqdm", "true",
              "--num_threads", "1", "--dtype", "float32", "--seed", str(args.seed), "--learning_rate", "1e-5"]
    if stage == "grpo":
        accum = args.grpo_batch // (args.grpo_micro * procs)
        return ["grpo", *common, "--reward_funcs", "format_digits", "--num_generations", str(args.num_generations),
                "--per_device_train_batch_size", str(args.grpo_micro), "--gradient_accumulation_steps", str(accum),
                "--beta", str(args.beta)]
    return ["ppo", *common, "--reward_model", rm, "--value_model", rm,
            "--per_device_train_batch_size", str(args.ppo_batch // procs),
            "--gradient_accumulation_steps", str(args.ppo_accum * (2 // procs)),
            "--num_ppo_epochs", str(args.ppo_epochs), "--num_mini_batches", str(args.ppo_mini_batches)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(mode: str, fsdp_yaml: str, args) -> list[str]:
    bindir = os.path.dirname(sys.executable)
    if mode == "1proc":
        return [sys.executable, "-m", "align.cli"]
    if mode == "ddp" and args.ddp_launcher == "torchrun":
        return [os.path.join(bindir, "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                "-m", "align.cli"]
    config = args.ddp_config if mode == "ddp" else fsdp_yaml
    return [os.path.join(bindir, "accelerate"), "launch", "--config_file", os.path.normpath(config),
            "--main_process_port", str(free_port()), "-m", "align.cli"]


def error_tail(text: str, n: int = 40) -> str:
    """'summary line\nlast lines': the first traceback in `text` (a launcher prefixes each of a rank's lines with
    `[rankN]:`; its summary of the failure follows), else the end of `text`. The summary is the exception line."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line]
    if not starts:
        tail = lines[-n:]
        return "\n".join([next((x.strip() for x in reversed(tail) if x.strip()), "no output"), *tail])
    i = starts[0]
    prefix = lines[i].split("Traceback")[0]
    j = i + 1
    if prefix:
        while j < len(lines) and lines[j].startswith(prefix):
            j += 1
    else:
        j = len(lines)
    # without the ^^^ marker lines, which carry nothing in a log
    block = [x for x in lines[i:j] if x[len(prefix):].strip().strip("^~")][-n:]
    exc = next((x[len(prefix):].strip() for x in reversed(block) if x[len(prefix):].strip()), "")
    rest = lines[j:][-8:] if j < len(lines) else []
    return "\n".join([exc, *block, *(["..."] if rest else []), *rest])


# Imported by every Python process a run starts (PYTHONPATH): each `-m align.cli` process (the 1proc run, or a
# worker a launcher starts, never the launcher itself) leaves a file saying it exists, its rank and thread setting,
# so the bench can check how many training processes a launch really started (a config that accelerate hands to its
# simple launcher starts ONE process whatever num_processes says, and the run would look twice as fast).
PROBE_SRC = """\
import json, os, sys
_d = os.environ.get("BENCH_SCALE_PROBE")
_a = getattr(sys, "orig_argv", [])
if _d and sys.argv[:1] == ["-m"] and "-m" in _a and _a[_a.index("-m") + 1:][:1] == ["align.cli"]:
    with open(os.path.join(_d, str(os.getpid())), "w") as _f:
        json.dump({k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "OMP_NUM_THREADS")}, _f)
"""
EXPECTED_STRATEGY = {"1proc": "single process", "ddp": "DDP", "fsdp2": "FSDP2"}


def write_probe(root: str) -> str:
    """The folder to put on PYTHONPATH for the process probe ('' when a sitecustomize exists: it would be hidden)."""
    import importlib.util

    if importlib.util.find_spec("sitecustomize") is not None:
        print("note: this Python has a sitecustomize module; the number of processes per launch is not checked",
              file=sys.stderr)
        return ""
    folder = os.path.join(root, "probe")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sitecustomize.py"), "w", encoding="utf-8") as fh:
        fh.write(PROBE_SRC)
    return folder


def check_launch(stage: str, mode: str, stderr: str, probe_dir: str) -> tuple[str, str]:
    """(what ran, e.g. '2 x DDP', error or ''): the training processes the probe saw (each must have 1 OMP
    thread) and the strategy align reports on stderr ('<stage>: N processes, DDP'; older align versions say
    nothing, shown as '?')."""
    import re

    want = 1 if mode == "1proc" else 2
    procs = None
    if probe_dir:
        seen = []
        for name in os.listdir(probe_dir):
            with open(os.path.join(probe_dir, name), encoding="utf-8") as fh:
                seen.append(json.load(fh))
        procs = len(seen)
        if procs != want:
            return f"{procs} x ?", (f"the launch started {procs} align process(es), not {want}"
                                    + (" (accelerate's simple launcher starts one, whatever num_processes says)"
                                       if procs == 1 else ""))
        threads = sorted({str(r.get("OMP_NUM_THREADS")) for r in seen})
        if threads != ["1"]:
            return f"{procs} x ?", f"OMP_NUM_THREADS of the processes: {', '.join(threads)}, not 1"
    m = re.search(rf"^{stage}: (\d+) processes, (.+)$", stderr, re.M)
    strategy = m.group(2).strip() if m else ("single process" if want == 1 else "?")
    if m and int(m.group(1)) != want:
        return f"{m.group(1)} x {strategy}", f"align reports {m.group(1)} processes, not {want}"
    if strategy != "?" and strategy != EXPECTED_STRATEGY[mode]:
        return f"{want} x {strategy}", f"align ran it as {strategy}, not {EXPECTED_STRATEGY[mode]}"
    return (f"{procs if procs is not None else want} x {strategy}" if want > 1 else "1"), ""


def run_one(cmd: list[str], stage: str, mode: str, out: str, probe: str, timeout: float
            ) -> tuple[list[dict] | None, float, str, str]:
    """Run a CLI command; returns (metrics rows, wall seconds, what ran ('2 x DDP'), error text or '')."""
    probe_dir = ""
    if probe:
        probe_dir = out + "-probe"
        shutil.rmtree(probe_dir, ignore_errors=True)
        os.makedirs(probe_dir)
    path_entries = (probe, os.path.normpath(ROOT), os.environ.get("PYTHONPATH", ""))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(p for p in path_entries if p),
               BENCH_SCALE_PROBE=probe_dir)
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                             start_new_session=True)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return None, time.perf_counter() - t0, "", f"timed out after {timeout:.0f} s\n" + "\n".join(
            err.splitlines()[-30:])
    wall = time.perf_counter() - t0
    path = os.path.join(out, "metrics.jsonl")
    if res.returncode != 0 or not os.path.exists(path):
        if res.returncode == 0:
            return None, wall, "", "no metrics.jsonl written\n" + "\n".join((res.stdout or "").splitlines()[-30:])
        return None, wall, "", f"exit status {res.returncode}: " + error_tail(res.stderr or res.stdout or "")
    ran, err = check_launch(stage, mode, res.stderr or "", probe_dir)
    if err:
        return None, wall, ran, err + "\n" + "\n".join((res.stderr or "").splitlines()[-15:])
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    if len(rows) < 2:
        return None, wall, ran, f"metrics.jsonl has {len(rows)} rows; need >= 2 (--steps >= 2)"
    return rows, wall, ran, ""


def summarise(rows: list[dict]) -> dict[str, float]:
    """Means over the steps after the first (warm-up): step_time, every time_* phase, response length."""
    timed = rows[1:]
    keys = ["step_time", *dict.fromkeys(k for r in timed for k in r if k.startswith("time_")), "response_length"]
    return {k: statistics.mean(float(r.get(k, 0.0)) for r in timed) for k in keys}


def fmt(v: float | None, width: int, digits: int = 3) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


def print_table(results: dict, failed: dict, launched: dict, args) -> None:
    seen = dict.fromkeys(k for per in results.values() for rep in per for k in rep[0] if k.startswith("time_"))
    phases = [p for p in PHASES if p in seen] + [p for p in seen if p not in PHASES]
    names = [p[len("time_"):] for p in phases]
    w = max([10, *(len(n) + 2 for n in names)])
    header = f"{'stage':<6}{'mode':<7}{'ran as':<11}{'s/step':>8}" + "".join(f"{n:>{w}}" for n in names) + \
        f"{'other':>9}{'tok/compl':>11}{'run wall s':>12}{'vs 1proc':>10}"
    print(header)
    print("-" * len(header))
    for stage in args.stages:
        base = None
        for mode in args.modes:
            key = (stage, mode)
            if key in failed:
                print(f"{stage:<6}{mode:<7}{'':<11}{'FAILED':>8}   ({failed[key].splitlines()[0]})")
                continue
            reps = results.get(key, [])
            if not reps:
                continue

            def med(k: str) -> float | None:
                vals = [r[0][k] for r in reps if k in r[0]]
                return statistics.median(vals) if vals else None

            step = med("step_time")
            ph = [med(p) for p in phases]
            # what the stage does outside the timed phases (advantages, metrics reductions, logging, ...)
            other = statistics.median(r[0]["step_time"] - sum(r[0].get(p, 0.0) for p in phases) for r in reps)
            wall = statistics.median(r[1] for r in reps)
            if mode == "1proc":
                base = step
            ratio = f"{base / step:>9.2f}x" if base else f"{'-':>10}"
            print(f"{stage:<6}{mode:<7}{launched.get(key, ''):<11}{step:>8.3f}" + "".join(fmt(v, w) for v in ph)
                  + fmt(other, 9) + fmt(med("response_length"), 11, 1) + fmt(wall, 12, 1) + ratio)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=0, help="attention heads (0: hidden / 16)")
    ap.add_argument("--new_tokens", type=int, default=16, help="max_new_tokens")
    ap.add_argument("--steps", type=int, default=6, help="max_steps of each run; the first is warm-up")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median reported)")
    ap.add_argument("--stages", default="grpo,ppo", help="comma-separated subset of grpo,ppo")
    ap.add_argument("--modes", default="1proc,ddp,fsdp2", help="comma-separated subset of 1proc,ddp,fsdp2")
    ap.add_argument("--ddp_launcher", default="accelerate", choices=("accelerate", "torchrun"))
    ap.add_argument("--ddp_config", default=os.path.join(ROOT, "recipes", "accelerate", "cpu2.yaml"),
                    help="accelerate config of the ddp mode (2 CPU processes)")
    ap.add_argument("--grpo_batch", type=int, default=64, help="GRPO completions per step, all processes")
    ap.add_argument("--grpo_micro", type=int, default=16, help="GRPO per_device_train_batch_size (completions)")
    ap.add_argument("--num_generations", type=int, default=4)
    ap.add_argument("--beta", type=float, default=0.04, help="GRPO KL coefficient (> 0: no completion skipped)")
    ap.add_argument("--ppo_batch", type=int, default=32, help="PPO rollouts per step, all processes")
    ap.add_argument("--ppo_accum", type=int, default=1, help="PPO gradient_accumulation_steps on 2 processes")
    ap.add_argument("--ppo_epochs", type=int, default=4)
    ap.add_argument("--ppo_mini_batches", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed to one run")
    ap.add_argument("--keep", default="", help="folder for models, data, configs and run outputs (kept); "
                                               "default: a temporary folder, removed at the end")
    args = ap.parse_args()
    args.stages = [s for s in args.stages.split(",") if s]
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [s for s in args.stages if s not in STAGES] + [m for m in args.modes if m not in MODES]
    if bad:
        sys.exit(f"unknown stage/mode {', '.join(bad)}; stages: {', '.join(STAGES)}; modes: {', '.join(MODES)}")
    if args.steps < 2 or args.reps < 1:
        sys.exit("--steps must be >= 2 (the first is warm-up) and --reps >= 1")
    check_batches(args)

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    work = args.keep or tempfile.mkdtemp(prefix="bench_scale_")
    os.makedirs(work, exist_ok=True)
    model, rm, data = make_inputs(work, args)
    fsdp_yaml = FSDP2_CPU_YAML

    results: dict[tuple[str, str], list[tuple[dict, float]]] = {}
    failed: dict[tuple[str, str], str] = {}
    commands: dict[tuple[str, str], str] = {}
    launched: dict[tuple[str, str], str] = {}
    probe = write_probe(work)
    for rep in range(args.reps):
        for stage in args.stages:
            for mode in args.modes:
                key = (stage, mode)
                if key in failed:
                    continue
                out = os.path.join(work, "runs", f"{stage}-{mode}-{rep}")
                shutil.rmtree(out, ignore_errors=True)
                procs = 1 if mode == "1proc" else 2
                cmd = launcher(mode, fsdp_yaml, args) + stage_args(stage, procs, model, rm, data, out, args)
                commands.setdefault(key, "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 " + shlex.join(cmd))
                rows, wall, ran, err = run_one(cmd, stage, mode, out, probe, args.timeout)
                if err:
                    failed[key] = err
                    print(f"\n!! {stage} {mode} (repetition {rep + 1}) failed: {err.splitlines()[0]}\n"
                          f"   command: {commands[key]}\n   stderr (first traceback, or the end):\n"
                          + "\n".join("   | " + line for line in err.splitlines()[1:]), file=sys.stderr, flush=True)
                    continue
                s = summarise(rows)
                results.setdefault(key, []).append((s, wall))
                launched[key] = ran
                print(f"[rep {rep + 1}/{args.reps}] {stage:<4} {mode:<5} {s['step_time']:.3f} s/step "
                      f"(run {wall:.1f} s)", flush=True)

    import torch

    heads = args.heads or max(1, args.hidden // 16)
    print(f"\nSeconds per optimizer step, CPU (torch {torch.__version__}), fp32, tiny llama hidden {args.hidden}, "
          f"{args.layers} layers, {heads} heads; {args.new_tokens} new tokens per completion.")
    print("Every process runs 1 thread (OMP_NUM_THREADS=1, --num_threads 1): the 1proc run uses 1 thread on 1 core, "
          "the 2-process runs use 2 cores.")
    print(f"GRPO: {args.grpo_batch} completions/step ({args.grpo_batch // args.num_generations} prompts x G="
          f"{args.num_generations}), micro-batch {args.grpo_micro} completions (accumulation "
          f"{args.grpo_batch // args.grpo_micro} on 1 process, {args.grpo_batch // (2 * args.grpo_micro)} per "
          f"process on 2), reward format_digits, beta {args.beta}.")
    print(f"PPO:  {args.ppo_batch} rollouts/step, {args.ppo_epochs} epochs x {args.ppo_mini_batches} minibatches, "
          f"accumulation {2 * args.ppo_accum} on 1 process, {args.ppo_accum} per process on 2; reward model = "
          f"critic init.")
    print(f"Mean of steps 2..{args.steps} of each run (step 1 is warm-up), as logged by rank 0; median of "
          f"{args.reps} interleaved repetitions. 'other' = s/step minus the phases; 'run wall s' = the whole "
          f"command incl. start-up; 'vs 1proc' = 1proc s/step / this s/step; 'ran as' = the align processes a launch "
          f"started (counted by a probe) x the strategy align reported ('?': not reported).\n")
    print_table(results, failed, launched, args)
    where = f"kept in {work}" if args.keep else "a temporary folder removed at the end; --keep DIR keeps it"
    print(f"\nCommands (run from the repository root; repetition 1; paths under {work}: {where}):")
    for key, cmd in commands.items():
        print(f"  {key[0]} {key[1]}:\n    {cmd}")
    with open(fsdp_yaml, encoding="utf-8") as fh:
        print(f"\nFSDP2 config ({fsdp_yaml}):\n" + "".join("    " + line for line in fh))
    print(f"total time {time.perf_counter() - t_start:.0f} s; 1-minute load average {load_start:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} CPUs (other work on the machine shows here)")
    if failed:
        print("\nFAILED (each one's command and traceback or end of stderr went to stderr):")
        for (stage, mode), err in failed.items():
            print(f"  {stage} {mode}: {err.splitlines()[0]}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
