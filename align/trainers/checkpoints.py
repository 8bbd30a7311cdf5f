"""Run directories and checkpoints: refusing to mix runs in one output_dir, atomic resumable checkpoints (written to a
temporary directory, renamed into place, pruned to save_total_limit), resuming from one, and saving the final
model with save_pretrained (gathering sharded weights first).
"""

from __future__ import annotations

import json
import os
import shutil

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import AlignError

if TYPE_CHECKING:
    from .loop import Run

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"


def check_output_dir(cfg) -> None:
    """Refuse to mix a new run into a used output_dir (without writing anything)."""
    if not cfg.output_dir:
        raise AlignError("output_dir is not set")
    if os.path.isfile(cfg.output_dir):
        raise AlignError(f"{cfg.output_dir}: output_dir is a file")
    if cfg.resume_from_checkpoint:
        return
    if os.path.isdir(cfg.output_dir) and os.listdir(cfg.output_dir) and not cfg.overwrite_output_dir:
        raise AlignError(f"{cfg.output_dir}: output_dir is not empty (set overwrite_output_dir or "
                         f"resume_from_checkpoint)")


def latest_checkpoint(output_dir: str) -> str | None:
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = [int(d[len(CHECKPOINT_PREFIX):]) for d in os.listdir(root)
             if d.startswith(CHECKPOINT_PREFIX) and d[len(CHECKPOINT_PREFIX):].isdigit()]
    return os.path.join(root, f"{CHECKPOINT_PREFIX}{max(steps)}") if steps else None


def resolve_checkpoint(cfg) -> str | None:
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "latest":
        path = latest_checkpoint(cfg.output_dir)
        if path is None:
            raise AlignError(f"{cfg.output_dir}: resume_from_checkpoint=latest but no checkpoint found")
        return path
    path = cfg.resume_from_checkpoint
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise AlignError(f"{path}: not a checkpoint (no {STATE_FILE})")
    return path


def save_checkpoint(run: Run, step: int) -> str:
    """Everything needed to continue bit-exactly (weights, optimizer, schedule, RNG of every process,
    step, stage state), written to a temporary directory and renamed into place."""
    root = os.path.join(run.cfg.output_dir, "checkpoints")
    final = os.path.join(root, f"{CHECKPOINT_PREFIX}{step}")
    tmp = os.path.join(root, f".tmp-{CHECKPOINT_PREFIX}{step}")
    if run.is_main:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    run.accelerator.wait_for_everyone()
    run.accelerator.save_state(tmp)
    if run.is_main:
        state = {"step": step, "stage": run.stage}
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as fh:
            json.dump(state, fh)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune_checkpoints(root, run.cfg.save_total_limit)
    run.accelerator.wait_for_everyone()
    return final


def _prune_checkpoints(root: str, limit: int) -> None:
    if not limit or limit <= 0:
        return
    steps = sorted(int(d[len(CHECKPOINT_PREFIX):]) for d in os.listdir(root)
                   if d.startswith(CHECKPOINT_PREFIX) and d[len(CHECKPOINT_PREFIX):].isdigit())
    for s in steps[:-limit]:
        shutil.rmtree(os.path.join(root, f"{CHECKPOINT_PREFIX}{s}"), ignore_errors=True)


def load_checkpoint(run: Run, path: str) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint` into the prepared run; returns its step."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as fh:
        state = json.load(fh)
    if state.get("stage") != run.stage:
        raise AlignError(f"{path}: checkpoint of stage '{state.get('stage')}', not '{run.stage}'")
    run.accelerator.load_state(path)
    return int(state["step"])


def gathered_state(run: Run) -> dict[str, torch.Tensor] | None:
    """The full state dict of the trained module when its weights are sharded (FSDP, DeepSpeed): a collective
    call, so every process must make it. None when each process holds the whole module."""
    from accelerate.utils import DistributedType

    if run.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return run.accelerator.get_state_dict(run.model)
    return None


def save_pretrained(module: nn.Module, output_dir: str, tokenizer, full: dict[str, torch.Tensor] | None,
                    prefix: str) -> None:
    """`module.save_pretrained` (safetensors) plus the tokenizer into output_dir; with a gathered state dict
    `full` (see :func:`gathered_state`), the module's weights are its entries under `prefix`."""
    kw = {"state_dict": {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}} if full else {}
    module.save_pretrained(output_dir, safe_serialization=True, **kw)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)


def save_final(run: Run, model: nn.Module, tokenizer, output_dir: str | None = None, prefix: str = "model.") -> None:
    """Save the trained model (or LoRA adapter) and tokenizer with save_pretrained, from the main process.
    `prefix`: where `model` sits in the prepared module (a SelectiveLM's ``model.``)."""
    run.accelerator.wait_for_everyone()
    full = gathered_state(run)
    if run.is_main:
        save_pretrained(model, output_dir or run.cfg.output_dir, tokenizer, full, prefix)
    run.accelerator.wait_for_everyone()
