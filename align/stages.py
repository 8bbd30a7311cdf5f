"""The stage registry: every `align <stage>`, read by the CLI, the pipeline and the config tools alike.

A stage is its config dataclass and the function that runs it (both named "module:attribute", imported only
when the stage is used, so `align --help` loads no torch), a one-line description, and its kind: ``train``
(SFT, the reward model), ``rl`` (the policy-optimisation stages the pipeline runs after SFT) or ``tool``.
Adding a stage is one row here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Stage:
    config: str  # "module:Class", the stage's config dataclass
    runner: str  # "module:function", called with the config, returns the last metrics
    description: str
    kind: str = "tool"  # train | rl | tool


STAGES: dict[str, Stage] = {
    "sft": Stage("align.config:SFTConfig", "align.trainers.sft:train_sft", "supervised fine-tuning", "train"),
    "rm": Stage("align.config:RMConfig", "align.trainers.reward:train_rm",
                "reward model from pairwise or ranked comparisons (Bradley-Terry)", "train"),
    "ppo": Stage("align.config:PPOConfig", "align.trainers.ppo:train_ppo",
                 "PPO with a value model, GAE and a KL penalty to a frozen reference", "rl"),
    "grpo": Stage("align.config:GRPOConfig", "align.trainers.grpo:train_grpo",
                  "GRPO: group-relative advantages, no value model; iterative GRPO with reward-model replay", "rl"),
    "trpo": Stage("align.config:TRPOConfig", "align.trainers.trpo:train_trpo",
                  "TRPO: natural-gradient steps inside a KL trust region, with a backtracking line search", "rl"),
    "reinforce": Stage("align.config:ReinforceConfig", "align.trainers.reinforce:train_reinforce",
                       "vanilla policy gradient (REINFORCE) with Psi chosen by name", "rl"),
    "dpo": Stage("align.config:DPOConfig", "align.trainers.dpo:train_dpo",
                 "direct preference optimisation on comparisons (DPO, IPO, SLiC, robust, SimPO, ORPO)", "rl"),
    "online_dpo": Stage("align.config:OnlineDPOConfig", "align.trainers.online_dpo:train_online_dpo",
                        "online DPO: pairs of the policy's own samples ranked by the reward sources", "rl"),
    "eval": Stage("align.evaluate:EvalConfig", "align.evaluate:run_eval",
                  "generate for a prompt file and score with reward functions"),
    "score": Stage("align.scoring:ScoreConfig", "align.scoring:run_score",
                   "add a reward column to a data file with a reward model"),
    "export": Stage("align.export:ExportConfig", "align.export:run_export",
                    "merge a LoRA adapter into its base and save a full model (optionally push it to the hub)"),
    "pipeline": Stage("align.pipeline:PipelineConfig", "align.pipeline:run_pipeline",
                      "SFT -> RM -> PPO/GRPO on recipes, evaluated, with report.md and curves.png"),
    "tiny-model": Stage("align.tiny:TinyModelConfig", "align.tiny:run_tiny_model",
                        "build the built-in tiny model and tokenizer offline and save them"),
}

RL_STAGES: tuple[str, ...] = tuple(name for name, s in STAGES.items() if s.kind == "rl")


def _load(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def config_class(stage: str) -> type:
    """The config dataclass of `stage`."""
    return _load(STAGES[stage].config)


def runner(stage: str) -> Callable[[Any], Any]:
    """The function that runs `stage` from its config."""
    return _load(STAGES[stage].runner)
