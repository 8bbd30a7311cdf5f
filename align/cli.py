"""Command line: `align <stage> --config recipe.yaml [--field value ...]`.

Each stage is one row of `STAGES`: its config dataclass and the function that runs it. `align <stage> --help`
lists every field of the dataclass with its help text.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

from .config import AlignError, load_config

# stage name -> (config class "module:Class", runner "module:function", one-line description)
STAGES: dict[str, tuple[str, str, str]] = {
    "sft": ("align.config:SFTConfig", "align.trainers.sft:train_sft", "supervised fine-tuning"),
    "eval": ("align.evaluate:EvalConfig", "align.evaluate:run_eval",
             "generate for a prompt file and score with reward functions"),
    "rm": ("align.config:RMConfig", "align.trainers.reward:train_rm",
           "reward model from pairwise or ranked comparisons (Bradley-Terry)"),
    "score": ("align.scoring:ScoreConfig", "align.scoring:run_score",
              "add a reward column to a data file with a reward model"),
    "ppo": ("align.config:PPOConfig", "align.trainers.ppo:train_ppo",
            "PPO with a value model, GAE and a KL penalty to a frozen reference"),
    "grpo": ("align.config:GRPOConfig", "align.trainers.grpo:train_grpo",
             "GRPO: group-relative advantages, no value model; iterative GRPO with reward-model replay"),
    "pipeline": ("align.pipeline:PipelineConfig", "align.pipeline:run_pipeline",
                 "SFT -> RM -> PPO/GRPO on recipes, evaluated, with report.md and curves.png"),
    "trpo": ("align.config:TRPOConfig", "align.trainers.trpo:train_trpo",
             "TRPO: natural-gradient steps inside a KL trust region, with a backtracking line search"),
    "reinforce": ("align.config:ReinforceConfig", "align.trainers.reinforce:train_reinforce",
                  "vanilla policy gradient (REINFORCE) with Psi chosen by name"),
    "tiny-model": ("align.tiny:TinyModelConfig", "align.tiny:run_tiny_model",
                   "build the built-in tiny model and tokenizer offline and save them"),
}


def _load(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def usage() -> str:
    width = max(len(s) for s in STAGES)
    lines = ["usage: align <stage> --config FILE [--field value ...]", "", "stages:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, _, desc) in STAGES.items()]
    lines += ["", "`align <stage> --help` lists the stage's fields."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"error: unknown stage '{stage}'\n\n{usage()}", file=sys.stderr)
        return 2
    cfg_ref, fn_ref, _ = STAGES[stage]
    try:
        cfg = load_config(_load(cfg_ref), rest, prog=f"align {stage}")
        result = _load(fn_ref)(cfg)
    except AlignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if isinstance(result, dict):
        print(json.dumps({k: v for k, v in result.items() if not str(k).startswith("_")}, indent=2, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
