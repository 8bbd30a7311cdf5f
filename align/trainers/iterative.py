"""Iterative GRPO (DeepSeekMath §4.2, Algorithm 1): the reference reset to the current policy every few steps, and
the reward model that keeps learning during RL on comparisons made from each step's groups, with replay of the
original comparisons. `trainers/grpo.py` plugs these in through the RL runner's `state` and `finish` hooks; both
are checkpointed with the run, so resuming is exact.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from ..comparisons import Comparison, batch_loss, collate, group_comparisons, tokenize_comparisons
from ..config import AlignError
from ..data import read_rows, split_evenly
from ..heads import ScalarModel
from ..models import SelectiveLM, adapter_parameters, add_adapter, disable_dropout, frozen_dtype, load_tokenizer
from ..rewards import REWARD_MODEL_NAME, functions, score_completions
from ..rollout import Rollout, make_generator
from .loop import Run
from .outputs import save_pretrained
from .rl import Reference, RLSetup

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------------------------
# the reference reset


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The module's state dict with every sharded entry (FSDP2's DTensors) gathered whole: a collective call when
    the module is sharded, so every process makes it."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in module.state_dict().items()}


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def merged_copy(policy: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen, whole (unsharded) copy of a causal LM with its LoRA adapter (if any) merged into the weights.
    Under FSDP2 a collective call."""
    if is_sharded(policy):
        if hasattr(policy, "merge_and_unload"):
            raise AlignError("ref_update_every with use_lora is not supported under FSDP (the merged reference "
                             "cannot be copied from sharded adapters); use DDP, or full weights")
        from transformers import AutoModelForCausalLM

        snap = AutoModelForCausalLM.from_config(policy.config)
        snap.load_state_dict(full_state_dict(policy))
        return snap.to(dtype).eval().requires_grad_(False)
    snap = copy.deepcopy(policy)
    if hasattr(snap, "merge_and_unload"):
        snap = snap.merge_and_unload()
    return snap.to(dtype).eval().requires_grad_(False)


REFERENCE_ADAPTER = "reference"


class ReferenceKeeper:
    """Makes the reference the current policy every `every` steps (DeepSeekMath Algorithm 1, line 3) and
    checkpoints its weights once it is no longer the initial model.

    A LoRA policy whose reference is its own base with adapters off (one base copy) gets a frozen second adapter,
    ``reference``, added here before the run wraps the module: a reset copies the policy's adapter weights into it
    and the reference then computes with it alone. The base is never copied (a full merged copy per run
    otherwise), the copy is shard-to-shard under FSDP2, and the adapter is saved and restored with the model's
    weights in every checkpoint."""

    def __init__(self, reference: Reference, policy: nn.Module, every: int, dtype: torch.dtype):
        self.reference, self.policy, self.every, self.dtype = reference, policy, every, dtype
        self.replaced = False
        self.host = reference.adapter_host  # the LoRA policy whose base is the reference's, or None
        if self.host is not None:
            add_adapter(self.host, REFERENCE_ADAPTER, copy.deepcopy(self.host.peft_config["default"]),
                        trainable=False)

    def maybe_reset(self, step: int) -> bool:
        if not self.every or step == 0 or step % self.every:
            return False
        self.reset()
        return True

    def reset(self, state: dict[str, Tensor] | None = None) -> None:
        ref = self.reference
        if self.host is not None:  # the policy's adapter copied into the reference's (a checkpoint restores it)
            if state is None:
                # looked up now: FSDP2 replaces the module's parameters by sharded ones when it wraps them
                pairs = zip(adapter_parameters(self.host, "default"),
                            adapter_parameters(self.host, REFERENCE_ADAPTER), strict=True)
                with torch.no_grad():
                    for src, dst in pairs:
                        dst.copy_(src)  # FSDP2: each process copies its own shard
            ref.adapters = [REFERENCE_ADAPTER]
            self.replaced = True
            return
        plain = not hasattr(self.policy, "merge_and_unload")
        if state is None and plain and ref.lm is not None and self.replaced:
            ref.lm.model.load_state_dict(full_state_dict(self.policy))  # in place: no new allocation
        else:
            model = merged_copy(self.policy, self.dtype)
            if state is not None:
                model.load_state_dict(state)
            ref.lm, ref.adapter_host = SelectiveLM(model), None
        self.replaced = True

    def state_dict(self) -> dict[str, Any]:
        if not self.replaced:
            return {}
        if self.host is not None:  # the adapter's weights are the trained module's, in the checkpoint's model state
            return {"adapter": REFERENCE_ADAPTER}
        return {"weights": {k: v.detach().cpu() for k, v in self.reference.lm.model.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("adapter") is not None:
            self.reset({})
        elif state.get("weights") is not None:
            self.reset(state["weights"])


# ---------------------------------------------------------------------------------------------------------------
# the reward model that keeps learning


class RewardModelTrainer:
    """The reward model of the ``reward_model`` source, trained during RL (DeepSeekMath Algorithm 1, line 12).

    Each step: comparisons from the step's groups (:func:`align.comparisons.group_comparisons` on the
    rm_label_funcs scores, RM token ids of prompt + completion + EOS), plus replayed original comparisons —
    ``round(n·ratio/(1 − ratio))`` drawn with a generator seeded by (seed, step) — make one Bradley–Terry
    AdamW step, each comparison weighing the same (:func:`align.losses.comparison_loss`). Each process computes
    the loss of its share of the comparisons; gradients are summed over processes (the loss is divided by the
    number of comparisons), so the update does not depend on the number of processes. The scorer keeps scoring with the
    updated weights."""

    def __init__(self, scorer, label_sources: dict, replay: list, replay_ratio: float, lr: float, run: Run,
                 seed: int, weights_dtype: torch.dtype):
        self.scorer, self.label_sources, self.replay, self.ratio = scorer, label_sources, replay, replay_ratio
        self.run, self.seed = run, seed
        scorer.model.to(weights_dtype)
        disable_dropout(scorer.model)
        self.net = ScalarModel(scorer.model)
        self.optimizer = torch.optim.AdamW(list(scorer.model.parameters()), lr=lr, weight_decay=0.0)

    def comparisons(self, r: Rollout) -> list[Comparison]:
        labels, _ = score_completions(self.label_sources, r.prompts, r.texts, r.columns)
        out = []
        for rows, pairs in group_comparisons(labels, r.texts, r.group_size):
            seqs = [self.scorer.encode(r.prompts[i], r.texts[i]) for i in rows]
            out.append(Comparison(seqs, pairs, [0.0] * len(pairs)))
        return out

    def __call__(self, step: int, r: Rollout) -> dict[str, float]:
        """One update on the comparisons of the step's whole rollout `r` (the same on every process) and the
        replayed ones; each process computes the loss of its share (an even split), the gradients are summed."""
        run = self.run
        new = self.comparisons(r)
        n_replay = 0
        if new and self.replay and self.ratio > 0:
            n_replay = int(round(len(new) * self.ratio / (1.0 - self.ratio)))
        g = make_generator("cpu", self.seed, step, "rm_replay")
        picks = torch.randint(len(self.replay), (n_replay,), generator=g).tolist() if n_replay else []
        everything = new + [self.replay[i] for i in picks]
        n_new, n_all = float(len(new)), float(len(everything))
        if n_new == 0:
            return {"rm_new_comparisons": 0.0, "rm_replay_comparisons": 0.0}
        comps = split_evenly(everything, run.world)[run.rank]
        model = self.net
        model.train()
        model.requires_grad_(True)
        loss_sum = pairs = correct = 0.0
        if comps:
            with run.accelerator.autocast():
                loss, stats = batch_loss(model, collate(comps, self.scorer.tokenizer.pad_token_id), run.device)
            (loss / n_all).backward()
            loss_sum, pairs, correct = stats.loss, stats.pairs, stats.correct
        run.optimizer_step(optimizer=self.optimizer, params=list(model.parameters()), sum_grads=True)
        model.eval()
        model.requires_grad_(False)
        loss_sum, pairs, correct = run.reduce_sum([loss_sum, pairs, correct])
        return {"rm_loss": loss_sum / n_all, "rm_accuracy": correct / max(pairs, 1.0),
                "rm_new_comparisons": n_new, "rm_replay_comparisons": n_all - n_new}

    def state_dict(self) -> dict[str, Any]:
        return {"model": {k: v.detach().cpu() for k, v in self.scorer.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scorer.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def save(self, path: str) -> None:
        """The trained reward model and its tokenizer in `path`, each file renamed into place whole."""
        save_pretrained(self.scorer.model, path, self.scorer.tokenizer, None, "")


# ---------------------------------------------------------------------------------------------------------------
# checks, inputs and the runner's hooks


def label_specs(cfg) -> list[str]:
    return list(cfg.rm_label_funcs or cfg.gold_reward_funcs)


def check_iterative_config(cfg) -> None:
    """One-line errors for the iterative-GRPO settings, before anything is loaded or written."""
    if cfg.ref_update_every and cfg.beta == 0:
        raise AlignError("ref_update_every needs beta > 0 (with beta = 0 there is no reference to update)")
    if cfg.rm_update:
        if not cfg.reward_model:
            raise AlignError("rm_update needs reward_model (the reward model to keep training)")
        if not label_specs(cfg):
            raise AlignError("rm_update needs rm_label_funcs (or gold_reward_funcs) to rank completions, e.g. "
                             "exact_match")
        if cfg.rm_replay_ratio > 0 and not cfg.rm_replay_data:
            raise AlignError("rm_replay_ratio > 0 needs rm_replay_data (the original comparisons to replay); "
                             "set rm_replay_ratio 0 to train on new comparisons only")
        functions(label_specs(cfg))
    elif cfg.rm_replay_data or cfg.rm_label_funcs:
        raise AlignError("rm_replay_data / rm_label_funcs are set but rm_update is false")


def load_replay(cfg) -> list[Comparison]:
    """The replayed comparisons, tokenized with the reward model's tokenizer (bad rows are errors)."""
    if not (cfg.rm_update and cfg.rm_replay_data and cfg.rm_replay_ratio > 0):
        return []
    tok = load_tokenizer(cfg.reward_model, cfg.trust_remote_code)
    out = []
    for src in [s.strip() for s in cfg.rm_replay_data.split(",") if s.strip()]:
        comps, _ = tokenize_comparisons(read_rows(src, cfg.train_split), tok, cfg.max_length)
        out += comps
    return out


class IterativeState:
    """What an iterative-GRPO checkpoint holds besides the policy, its optimizer and schedule: the reference once
    it has been reset, and the reward model being trained with its optimizer."""

    def __init__(self, keeper: ReferenceKeeper | None, rm: RewardModelTrainer | None):
        self.keeper, self.rm = keeper, rm

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.keeper.state_dict() if self.keeper else {},
                "reward_model": self.rm.state_dict() if self.rm else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.keeper is not None:
            self.keeper.load_state_dict(state.get("reference") or {})
        if self.rm is not None and state.get("reward_model") is not None:
            self.rm.load_state_dict(state["reward_model"])


def iterative_state(setup: RLSetup) -> IterativeState | None:
    """The runner's `state` hook: the reference keeper and/or reward-model trainer the config asks for."""
    cfg, run = setup.cfg, setup.run
    keeper = rm = None
    if setup.reference is not None and cfg.ref_update_every:
        keeper = ReferenceKeeper(setup.reference, setup.policy, cfg.ref_update_every,
                                 frozen_dtype(cfg.dtype, run.device, cfg.frozen_dtype))
    if cfg.rm_update:
        rm = RewardModelTrainer(setup.sources[REWARD_MODEL_NAME], functions(label_specs(cfg)), setup.inputs,
                                cfg.rm_replay_ratio, cfg.rm_learning_rate, run, cfg.seed, run.weights_dtype)
    return IterativeState(keeper, rm) if keeper is not None or rm is not None else None


def save_reward_model(setup: RLSetup) -> None:
    """The runner's `finish` hook: the reward model trained during RL in output_dir/reward_model."""
    if setup.state is not None and setup.state.rm is not None:
        setup.state.rm.save(os.path.join(setup.cfg.output_dir, "reward_model"))
