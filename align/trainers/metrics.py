"""What a run records: metrics.jsonl (one JSON object per logged step, with `step`), optional tensorboard, the
progress bar, the averaging of a logging window, and the stop on a non-finite loss or reward.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

from ..config import AlignError


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


def check_finite(step: int, metrics: dict[str, Any]) -> None:
    """Stop the run, naming the step and quantity, when a loss or reward is not finite. The last checkpoint
    written before this step stays the newest one."""
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            raise AlignError(f"step {step}: {k} is {v}; stopping (the last good checkpoint is kept)")


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each numeric metric over the rows that have it (a logging window's steps)."""
    keys: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            if isinstance(v, (int, float)):
                keys.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in keys.items()}
