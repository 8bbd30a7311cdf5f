"""Plumbing shared by every stage: accelerate set-up, optimizer and schedule, the step loop with logging,
evaluation and atomic, exactly-resumable checkpoints.

A stage supplies a `step_fn(step) -> metrics` that does its forward/backward work for one optimizer step (it
calls `run.backward` and `run.optimizer_step`), an optional `eval_fn(step) -> metrics`, and an optional
`extra_state` object with `state_dict()`/`load_state_dict()` (e.g. a KL controller) that is checkpointed too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from typing import Any, Callable

import torch
from torch import nn

from ..config import AlignError, to_dict
from ..models import default_device, resolve_dtype

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


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


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step s (0-based): linear warmup over `warmup`
    steps, then constant, linear decay to 0 or cosine decay to 0 at `total`."""

    def f(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise AlignError(f"lr_scheduler_type '{kind}' is not one of constant, linear, cosine")

    return f


def make_optimizer(params: list[tuple[str, nn.Parameter]], cfg, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and normalisation weights (1-D tensors)."""
    decay = [p for n, p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in params if p.requires_grad and p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise AlignError("the model has no trainable parameters")
    fused = {"foreach": True} if default_device().type == "cpu" else {}
    return torch.optim.AdamW(groups, lr=lr if lr is not None else cfg.learning_rate,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, **fused)


class MetricsLogger:
    """metrics.jsonl (one object per logged step, with `step`), optional tensorboard, and the progress bar."""

    def __init__(self, output_dir: str, enabled: bool, total: int, start: int, report_to: str = "none",
                 disable_tqdm: bool = False, desc: str = ""):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb = None
        self.bar = None
        if not enabled:
            return
        if start > 0 and os.path.exists(self.path):
            # drop lines logged after the checkpoint we resume from: they will be logged again
            with open(self.path, encoding="utf-8") as fh:
                keep = [ln for ln in fh if ln.strip() and json.loads(ln).get("step", 0) <= start]
            with open(self.path, "w", encoding="utf-8") as fh:
                fh.writelines(keep)
        elif start == 0 and os.path.exists(self.path):
            os.remove(self.path)
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        if not disable_tqdm:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            shown = {k: v for k, v in row.items() if k in ("loss", "eval_loss", "reward", "accuracy", "kl")}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if isinstance(v, float)}, refresh=False)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class Run:
    """One training run: the accelerator, the trained module, its optimizer and schedule, logging and
    checkpoints. Stages build their models, then call `prepare`, then `train`."""

    def __init__(self, cfg, stage: str):
        from accelerate import Accelerator

        self.cfg = cfg
        self.stage = stage
        if getattr(cfg, "num_threads", 0) > 0:
            torch.set_num_threads(cfg.num_threads)
        self.weights_dtype, mixed = resolve_dtype(cfg.dtype)
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.model: nn.Module | None = None
        self.optimizer = None
        self.scheduler = None
        self.extra_state: Any = None
        self.start_step = 0
        self.logger: MetricsLogger | None = None
        self.timers: dict[str, float] = {}

    # -- set-up -----------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, max_steps: int, extra_state: Any = None, lr: float | None = None):
        """Wrap the trained module for the backend, build AdamW and the schedule, and resume if asked.
        Returns the prepared module (call it for forwards; `unwrap()` gives the original)."""
        cfg = self.cfg
        self.max_steps = max_steps
        optimizer = make_optimizer(list(model.named_parameters()), cfg, lr)
        warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else int(cfg.warmup_ratio * max_steps)
        # The scheduler is stepped by us once per optimizer step (accelerate's wrapper would step it once per
        # process), and checkpointed through register_for_checkpointing.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_scheduler_type, warmup,
                                                                                 max_steps))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.extra_state = extra_state
        ckpt = resolve_checkpoint(cfg)
        if ckpt is not None:
            self._load_checkpoint(ckpt)
        os.makedirs(cfg.output_dir, exist_ok=True)
        if self.is_main:
            with open(os.path.join(cfg.output_dir, f"{self.stage}_config.json"), "w", encoding="utf-8") as fh:
                json.dump(to_dict(cfg), fh, indent=2)
        self.logger = MetricsLogger(cfg.output_dir, self.is_main, max_steps, self.start_step, cfg.report_to,
                                    cfg.disable_tqdm, desc=self.stage)
        return self.model

    def unwrap(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # -- per step ---------------------------------------------------------------------------------------------
    def no_sync(self, last: bool):
        """Context for one micro-batch's backward: skip the gradient all-reduce unless it is the last."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # the DeepSpeed engine steps inside backward when accelerate says gradients sync: only at the last
            self.accelerator.gradient_state._set_sync_gradients(last)
            return contextlib.nullcontext()
        if last or self.world == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def optimizer_step(self) -> dict[str, float]:
        """Clip, step, schedule, zero. Returns grad_norm (before clipping) and the learning rate used."""
        out = {"learning_rate": self.scheduler.get_last_lr()[0]}
        if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
            out["grad_norm"] = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a list of floats over processes."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return t.tolist()

    @contextlib.contextmanager
    def timer(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timers[name] = self.timers.get(name, 0.0) + time.perf_counter() - t0

    # -- the loop ---------------------------------------------------------------------------------------------
    def train(self, step_fn: Callable[[int], dict[str, float]],
              eval_fn: Callable[[int], dict[str, float]] | None = None) -> dict[str, float]:
        """Run optimizer steps start_step..max_steps-1; log, evaluate and checkpoint on schedule.
        Returns the last logged metrics."""
        cfg = self.cfg
        last: dict[str, float] = {}
        window: list[dict[str, float]] = []
        t_start = time.perf_counter()
        for step in range(self.start_step, self.max_steps):
            self.timers = {}
            t0 = time.perf_counter()
            metrics = step_fn(step)
            metrics["step_time"] = time.perf_counter() - t0
            for k, v in self.timers.items():
                metrics[f"time_{k}"] = v
            check_finite(step + 1, metrics)
            window.append(metrics)
            done = step + 1
            self.logger.advance()
            if done % max(1, cfg.logging_steps) == 0 or done == self.max_steps:
                row = _mean_rows(window)
                row["epoch_progress"] = done / self.max_steps
                row["elapsed"] = time.perf_counter() - t_start
                window = []
                if eval_fn is not None and cfg.eval_steps and done % cfg.eval_steps == 0 and done != self.max_steps:
                    row.update(eval_fn(done))
                if done == self.max_steps and eval_fn is not None:
                    row.update(eval_fn(done))
                self.logger.log(done, row)
                last = row
            if cfg.save_steps and done % cfg.save_steps == 0 and done != self.max_steps:
                self.save_checkpoint(done)
        if self.start_step >= self.max_steps and eval_fn is not None:
            last = eval_fn(self.max_steps)
        self.logger.close()
        return last

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> str:
        """Everything needed to continue bit-exactly (weights, optimizer, schedule, RNG of every process,
        step, stage state), written to a temporary directory and renamed into place."""
        root = os.path.join(self.cfg.output_dir, "checkpoints")
        final = os.path.join(root, f"{CHECKPOINT_PREFIX}{step}")
        tmp = os.path.join(root, f".tmp-{CHECKPOINT_PREFIX}{step}")
        if self.is_main:
            os.makedirs(root, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(tmp)
        if self.is_main:
            state = {"step": step, "stage": self.stage,
                     "extra": self.extra_state.state_dict() if self.extra_state is not None else None}
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as fh:
                json.dump(state, fh)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune_checkpoints(root)
        self.accelerator.wait_for_everyone()
        return final

    def _prune_checkpoints(self, root: str) -> None:
        limit = self.cfg.save_total_limit
        if not limit or limit <= 0:
            return
        steps = sorted(int(d[len(CHECKPOINT_PREFIX):]) for d in os.listdir(root)
                       if d.startswith(CHECKPOINT_PREFIX) and d[len(CHECKPOINT_PREFIX):].isdigit())
        for s in steps[:-limit]:
            shutil.rmtree(os.path.join(root, f"{CHECKPOINT_PREFIX}{s}"), ignore_errors=True)

    def _load_checkpoint(self, path: str) -> None:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as fh:
            state = json.load(fh)
        if state.get("stage") != self.stage:
            raise AlignError(f"{path}: checkpoint of stage '{state.get('stage')}', not '{self.stage}'")
        self.accelerator.load_state(path)
        self.start_step = int(state["step"])
        if self.extra_state is not None and state.get("extra") is not None:
            self.extra_state.load_state_dict(state["extra"])


def check_finite(step: int, metrics: dict[str, Any]) -> None:
    """Stop the run, naming the step and quantity, when a loss or reward is not finite. The last checkpoint
    written before this step stays the newest one."""
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            raise AlignError(f"step {step}: {k} is {v}; stopping (the last good checkpoint is kept)")


def _mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    keys: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            if isinstance(v, (int, float)):
                keys.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in keys.items()}


def resolve_max_steps(cfg, num_examples: int, global_batch: int) -> int:
    if cfg.max_steps and cfg.max_steps > 0:
        return cfg.max_steps
    steps = math.ceil(cfg.num_train_epochs * num_examples / global_batch)
    if steps <= 0:
        raise AlignError("max_steps is -1 and num_train_epochs gives no steps")
    return steps


def save_final(run: Run, model: nn.Module, tokenizer, output_dir: str | None = None) -> None:
    """Save the trained model (or LoRA adapter) and tokenizer with save_pretrained, from the main process."""
    from accelerate.utils import DistributedType

    output_dir = output_dir or run.cfg.output_dir
    run.accelerator.wait_for_everyone()
    state = None
    if run.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # sharded weights: gathered by a collective call on every process
        full = run.accelerator.get_state_dict(run.model)
        prefix = "model."
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in full.items()}
    if run.is_main:
        model.save_pretrained(output_dir, safe_serialization=True, **({"state_dict": state} if state else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    run.accelerator.wait_for_everyone()
