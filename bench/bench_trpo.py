"""Seconds per TRPO step against a one-epoch PPO step on the same model and rollout batch, for each way of
multiplying by the Fisher matrix and a few conjugate-gradient settings. Prints ratios; asserts nothing.

    python bench/bench_trpo.py                                  # 4 M-parameter Llama, 16 rollouts x 8 tokens
    python bench/bench_trpo.py --hidden 64 --layers 2 --batch 32 --new_tokens 16

Both stages run for real (`train_trpo`, `train_ppo`) on the same random tiny model and prompts, with the same
reward (a reward model made from the same random model: only the costs matter here), as the median over
--repeats interleaved runs of the mean step time after one warm-up step. PPO: one epoch, one minibatch, a
value head on the policy's trunk (its cheapest critic; the value loss rides on the policy's forward). TRPO: Ψ =
reward-to-go minus the batch mean (no critic); the line search starts from the full step. "update" is the part
of the step after the rollout (the trust-region step for TRPO; the epoch of minibatch updates for PPO), "step"
the whole step. The step's KL(π_old ‖ π) and max_kl are printed so that a cheaper setting that breaks the trust
region shows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_ppo import make_inputs, make_reward_model  # noqa: E402

VARIANTS = {  # name -> TRPO settings
    "kl_hessian, cg 10": {"fisher_product": "kl_hessian", "cg_iters": 10},
    "gauss_newton, cg 10": {"fisher_product": "gauss_newton", "cg_iters": 10},
    "gauss_newton, cg 10, fisher 1/4": {"fisher_product": "gauss_newton", "cg_iters": 10, "fisher_fraction": 0.25},
    "gauss_newton, cg 5, fisher 1/4": {"fisher_product": "gauss_newton", "cg_iters": 5, "fisher_fraction": 0.25},
}


def _common(model: str, data: str, out: str, args) -> dict:
    return dict(model=model, train_data=data, output_dir=out, reward_model=make_reward_model(model, out + "-rm"),
                per_device_train_batch_size=args.batch, max_new_tokens=args.new_tokens, max_steps=args.steps + 1,
                logging_steps=1, disable_tqdm=True, max_length=128, beta=0.0, seed=args.seed)


def _rows(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh][1:]  # the first step is warm-up


def run_ppo(model: str, data: str, out: str, args) -> dict[str, float]:
    from align.config import PPOConfig
    from align.trainers.ppo import train_ppo

    train_ppo(PPOConfig(**_common(model, data, out, args), num_ppo_epochs=1, num_mini_batches=1,
                        value_model="policy", learning_rate=1e-5))
    rows = _rows(out)
    return {"update": statistics.mean(r["time_training"] for r in rows),
            "step": statistics.mean(r["step_time"] for r in rows)}


def run_trpo(model: str, data: str, out: str, args, settings: dict) -> dict[str, float]:
    from align.config import TRPOConfig
    from align.trainers.trpo import train_trpo

    train_trpo(TRPOConfig(**_common(model, data, out, args), psi="reward_to_go_baseline", baseline="batch_mean",
                          max_kl=args.max_kl, **settings))
    rows = _rows(out)
    return {"update": statistics.mean(r["time_training"] for r in rows),
            "step": statistics.mean(r["step_time"] for r in rows),
            "step_kl": max(r["step_kl"] for r in rows),
            "accepted": statistics.mean(r["trpo_accepted"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="rollouts (prompts) per step")
    ap.add_argument("--new_tokens", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (the median is printed)")
    ap.add_argument("--max_kl", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    results: dict[str, list[dict[str, float]]] = {"ppo": [], **{v: [] for v in VARIANTS}}
    with tempfile.TemporaryDirectory() as root:
        model, data = make_inputs(root, args, n_prompts=args.batch * (args.steps + 1))
        for rep in range(args.repeats):
            results["ppo"].append(run_ppo(model, data, os.path.join(root, f"ppo{rep}"), args))
            for k, (name, settings) in enumerate(VARIANTS.items()):
                results[name].append(run_trpo(model, data, os.path.join(root, f"trpo{rep}-{k}"), args, settings))

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(f"TRPO vs one-epoch PPO on cpu ({args.threads} threads): llama hidden {args.hidden}, {args.layers} layers, "
          f"{args.batch} rollouts x {args.new_tokens} new tokens, max_kl {args.max_kl}; median of {args.repeats} "
          f"interleaved runs of the mean of {args.steps} steps after one warm-up")
    ppo_u, ppo_s = med("ppo", "update"), med("ppo", "step")
    print(f"{'':34}{'update s':>10}{'step s':>9}{'update/PPO':>12}{'step/PPO':>10}{'max step KL':>13}{'accepted':>10}")
    print(f"{'PPO (1 epoch, 1 minibatch)':34}{ppo_u:>10.3f}{ppo_s:>9.3f}{1.0:>12.2f}{1.0:>10.2f}")
    for name in VARIANTS:
        u, s = med(name, "update"), med(name, "step")
        print(f"{'TRPO ' + name:34}{u:>10.3f}{s:>9.3f}{u / ppo_u:>12.2f}{s / ppo_s:>10.2f}"
              f"{med(name, 'step_kl'):>13.5f}{med(name, 'accepted'):>10.2f}")


if __name__ == "__main__":
    main()
