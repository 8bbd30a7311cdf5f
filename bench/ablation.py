"""The shape of Table 1 of the PPO paper (Schulman et al. 2017) on the built-in addition task, plus TRPO,
REINFORCE and GRPO.

Every variant starts from the same SFT checkpoint, trains for the same number of steps on the same number of
rollouts per step (reward: exact_match), and is scored by its final greedy gold accuracy on the held-out prompts.
As in the paper, scores are normalised per task: 0 is the SFT checkpoint's accuracy, 1 the best single run of the
whole table; a variant's score is the mean over its seeds.

    python bench/ablation.py --sft runs/tiny/sft --data data/addition --out runs/ablation \
        --seeds 0,1,2 --steps 200 --jobs 2
    python bench/ablation.py ... --only "clipping_eps_0_2;trpo"     # a subset of the rows (names or slugs)

Runs are separate `align <stage>` processes (one thread each, `--jobs` at a time); a finished run (its
metrics.jsonl has the final evaluation) is reused when the script is run again, so an interrupted ablation
continues where it stopped. Writes OUT/ablation.md (the table, the command, the settings and the time) and
OUT/results.json. Asserts nothing: too long for CI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# PPO-paper penalty: KL[pi_old, pi] in the objective (k3 estimator on the old policy's samples), no clipping
_PENALTY = {"use_clipping": False, "kl_in": "loss", "kl_to": "old", "kl_estimator": "k3"}

# (row name, stage, settings); the rows of Table 1 first, then the other algorithms
VARIANTS: list[tuple[str, str, dict]] = [
    ("No clipping or penalty", "ppo", {"use_clipping": False, "beta": 0.0}),
    ("Clipping, eps = 0.1", "ppo", {"cliprange": 0.1, "beta": 0.0}),
    ("Clipping, eps = 0.2", "ppo", {"cliprange": 0.2, "beta": 0.0}),
    ("Clipping, eps = 0.3", "ppo", {"cliprange": 0.3, "beta": 0.0}),
    # beta initialised at 1 as in the paper, then doubled / halved toward d_targ
    ("Adaptive KL, d_targ = 0.003", "ppo", {**_PENALTY, "kl_controller": "doubling", "target_kl": 0.003, "beta": 1.0}),
    ("Adaptive KL, d_targ = 0.01", "ppo", {**_PENALTY, "kl_controller": "doubling", "target_kl": 0.01, "beta": 1.0}),
    ("Adaptive KL, d_targ = 0.03", "ppo", {**_PENALTY, "kl_controller": "doubling", "target_kl": 0.03, "beta": 1.0}),
    ("Fixed KL, beta = 0.3", "ppo", {**_PENALTY, "beta": 0.3}),
    ("Fixed KL, beta = 1", "ppo", {**_PENALTY, "beta": 1.0}),
    ("Fixed KL, beta = 3", "ppo", {**_PENALTY, "beta": 3.0}),
    ("Fixed KL, beta = 10", "ppo", {**_PENALTY, "beta": 10.0}),
    ("TRPO, delta = 0.01", "trpo", {"max_kl": 0.01}),
    ("REINFORCE, reward-to-go - group mean", "reinforce", {}),
    ("GRPO", "grpo", {}),
]


def stage_settings(stage: str, rollouts: int, group: int, lr: float, ppo_epochs: int, ppo_minibatches: int,
                   fisher_fraction: float) -> dict:
    """Per-stage settings that give every variant `rollouts` completions per step."""
    if stage == "ppo":  # one completion per prompt; GAE with a value head on the policy's trunk
        return {"per_device_train_batch_size": rollouts, "learning_rate": lr, "num_ppo_epochs": ppo_epochs,
                "num_mini_batches": ppo_minibatches, "value_model": "policy"}
    if stage == "trpo":  # Psi = reward-to-go minus the group mean, no critic; the step length comes from delta
        return {"per_device_train_batch_size": rollouts // group, "num_generations": group,
                "psi": "reward_to_go_baseline", "baseline": "group_mean", "beta": 0.0,
                "fisher_fraction": fisher_fraction}
    if stage == "reinforce":
        return {"per_device_train_batch_size": rollouts // group, "num_generations": group,
                "psi": "reward_to_go_baseline", "baseline": "group_mean", "beta": 0.0, "learning_rate": lr}
    if stage == "grpo":  # GRPO counts completions per batch, as TRL
        return {"per_device_train_batch_size": rollouts, "num_generations": group, "learning_rate": lr}
    raise ValueError(stage)


def slug(name: str) -> str:
    """'Clipping, eps = 0.2' -> 'clipping_eps_0_2'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# per-step diagnostics averaged over a run's logged rows (those the stage logs)
DIAGNOSTICS = ("approx_kl_last_epoch", "clip_frac", "kl_per_token", "entropy")


def diagnostics(rows: list[dict]) -> dict[str, float]:
    out = {}
    for k in DIAGNOSTICS:
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


def run_one(args, name: str, stage: str, settings: dict, seed: int) -> dict:
    out = os.path.join(args.out, f"{slug(name)}-s{seed}")
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.isfile(metrics):
        rows = [json.loads(x) for x in open(metrics) if x.strip()]
        if rows and rows[-1].get("step") == args.steps and "eval_exact_match" in rows[-1]:
            return {"name": name, "seed": seed, "acc": rows[-1]["eval_exact_match"],
                    "seconds": rows[-1].get("elapsed", float("nan")), "cached": True, **diagnostics(rows)}
    common = {"model": args.sft, "train_data": os.path.join(args.data, "rl_prompts.jsonl"),
              "eval_data": os.path.join(args.data, "eval.jsonl"), "reward_funcs": "exact_match",
              "gold_reward_funcs": "exact_match", "max_new_tokens": args.max_new_tokens, "max_length": 32,
              "max_steps": args.steps, "seed": seed, "logging_steps": 10, "eval_steps": 0,
              "lr_scheduler_type": "constant", "disable_tqdm": True, "output_dir": out,
              "overwrite_output_dir": True, "eval_max_samples": args.eval_samples}
    cfg = {**common, **stage_settings(stage, args.rollouts, args.group, args.learning_rate, args.ppo_epochs,
                                      args.ppo_minibatches, args.fisher_fraction), **settings}
    cmd = [sys.executable, "-m", "align.cli", stage]
    for k, v in cfg.items():
        cmd += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{slug(name)}-s{seed}.log"), "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - t0  # wall time; the training loop's own when the run finished
    acc, diag = float("nan"), {}
    if rc == 0 and os.path.isfile(metrics):
        rows = [json.loads(x) for x in open(metrics) if x.strip()]
        acc, diag = float(rows[-1].get("eval_exact_match", float("nan"))), diagnostics(rows)
        seconds = float(rows[-1].get("elapsed", seconds))  # the training loop's time, as for a reused run
    print(f"  {name} seed {seed}: acc {acc:.3f} ({seconds:.0f} s){'' if rc == 0 else f' FAILED rc={rc}'}",
          flush=True)
    return {"name": name, "seed": seed, "acc": acc, "seconds": seconds, "rc": rc, **diag}


def sft_accuracy(args) -> float:
    cmd = [sys.executable, "-m", "align.cli", "eval", "--model", args.sft, "--data",
           os.path.join(args.data, "eval.jsonl"), "--reward_funcs", "exact_match", "--max_new_tokens",
           str(args.max_new_tokens), "--max_samples", str(args.eval_samples)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return float(json.loads(res.stdout[res.stdout.index("{"):])["reward_mean"])


def mean_sd(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


# two-sided 95% quantiles of Student's t with n - 1 degrees of freedom, n = 2..10
_T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def interval(xs: list[float]) -> float:
    """Half-width of the 95% confidence interval of the mean of xs (t distribution); nan for one value."""
    xs = [x for x in xs if math.isfinite(x)]
    if len(xs) < 2:
        return float("nan")
    return _T95.get(len(xs), 1.96) * mean_sd(xs)[1] / math.sqrt(len(xs))


def table(results: list[dict], base: float, variants: list[tuple[str, str, dict]]) -> tuple[str, float]:
    best = max(r["acc"] for r in results if math.isfinite(r["acc"]))
    span = best - base if best > base else float("nan")
    lines = ["| algorithm | avg. normalised score (95% CI) | gold accuracy, mean ± sd | per seed | "
             "approx KL(old‖new) | clip frac | KL to ref / token | s / run |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for name, _, _ in variants:
        rows = sorted((r for r in results if r["name"] == name), key=lambda r: r["seed"])
        if not rows:
            continue
        accs = [r["acc"] for r in rows]
        scores = [(a - base) / span for a in accs]
        score, half = mean_sd(scores)[0], interval(scores)
        m, sd = mean_sd(accs)
        secs = mean_sd([r["seconds"] for r in rows])[0]
        per = ", ".join(f"{a:.3f}" for a in accs)

        def diag(k: str) -> str:
            v = mean_sd([r[k] for r in rows if k in r])[0]
            return f"{v:.4f}" if math.isfinite(v) else "–"

        lines.append(f"| {name} | {score:.2f} ± {half:.2f} | {m:.3f} ± {sd:.3f} | {per} | "
                     f"{diag('approx_kl_last_epoch')} | {diag('clip_frac')} | {diag('kl_per_token')} | {secs:.0f} |")
    return "\n".join(lines), best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", required=True, help="SFT checkpoint every run starts from")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "addition"), help="task data directory")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "ablation"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=200, help="RL steps per run")
    p.add_argument("--rollouts", type=int, default=64, help="completions per step, for every variant")
    p.add_argument("--group", type=int, default=4, help="completions per prompt (TRPO, REINFORCE, GRPO)")
    p.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW lr of PPO, REINFORCE and GRPO")
    p.add_argument("--ppo_epochs", type=int, default=4)
    p.add_argument("--ppo_minibatches", type=int, default=1)
    p.add_argument("--fisher_fraction", type=float, default=0.25, help="TRPO's Fisher subsample")
    p.add_argument("--max_new_tokens", type=int, default=4)
    p.add_argument("--eval_samples", type=int, default=0, help="held-out prompts scored (0: all)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one thread)")
    p.add_argument("--only", default="", help="';'-separated row names or their slugs (default: all rows)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    want = [s.strip() for s in args.only.split(";") if s.strip()]
    variants = [v for v in VARIANTS if not want or any(v[0] == w or slug(v[0]) == slug(w) for w in want)]
    t0 = time.time()
    base = sft_accuracy(args)
    print(f"SFT checkpoint gold accuracy: {base:.3f}", flush=True)
    jobs = [(name, stage, settings, seed) for seed in seeds for name, stage, settings in variants]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda j: run_one(args, *j), jobs))
    wall = time.time() - t0
    tab, best = table(results, base, variants)
    command = "python bench/ablation.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                               else sys.argv[1:]))
    cpu_runs = sum(r["seconds"] for r in results if not r.get("cached"))
    md = "\n".join([
        f"SFT checkpoint `{args.sft}`: gold accuracy {base:.3f} (score 0); best single run {best:.3f} (score 1).",
        f"{len(seeds)} seed(s) × {args.steps} steps × {args.rollouts} completions per step; reward exact_match; "
        f"greedy gold accuracy on {args.eval_samples or 'all'} held-out prompts at the end of each run.",
        "",
        tab,
        "",
        f"Command: `{command}`",
        f"Wall time: {wall / 60:.1f} min ({args.jobs} runs at a time, one thread each; "
        f"{cpu_runs / 60:.1f} run-minutes).",
    ])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ablation.md"), "w") as fh:
        fh.write(md + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({"sft_accuracy": base, "results": results, "args": vars(args), "wall_seconds": wall}, fh,
                  indent=2)
    print(md)


if __name__ == "__main__":
    main()
