"""What a run records: metrics.jsonl (one JSON object per logged step, with `step`, always written), the
experiment trackers of ``report_to`` (through accelerate), the progress bar, the averaging of a logging window, and
the stop on a non-finite loss or reward.

Trackers are accelerate's (``Accelerator(log_with=...)``): tensorboard (events in output_dir/tensorboard), wandb,
mlflow, trackio and comet_ml (alias comet); ``all`` is every one of them that is installed. They are
checked by :func:`resolve_trackers` when the run is set up, before anything is loaded or written; only the main
process logs, under the project ``align`` with the run's ``run_name``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

from ..config import AlignError

PROJECT = "align"  # the trackers' project (wandb / trackio / comet project, mlflow experiment)
# accelerate's tracker names and the pip package that provides each
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
                    "comet_ml": "comet_ml"}
TRACKER_ALIASES = {"comet": "comet_ml"}


def installed_trackers() -> set[str]:
    """The tracker names whose package is importable (accelerate's own check)."""
    from accelerate.tracking import get_available_trackers

    return {getattr(t, "value", str(t)) for t in get_available_trackers()}


def resolve_trackers(report_to: list | tuple | str) -> list[str]:
    """The trackers to start for ``report_to``, in order, without repeats: [] for empty or ``none``; ``all`` adds
    every installed one. A name that is unknown or not installed is a one-line AlignError naming it."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [TRACKER_ALIASES.get(str(n).strip().lower(), str(n).strip().lower()) for n in names]
    names = [n for n in names if n]
    if "none" in names:
        if len(names) > 1:
            raise AlignError(f"report_to: 'none' cannot be combined with other trackers ({', '.join(names)})")
        return []
    installed = installed_trackers()
    out: list[str] = []
    for n in names:
        if n == "all":
            out += sorted(t for t in installed if t in TRACKER_PACKAGES and t not in out)
            continue
        if n not in TRACKER_PACKAGES:
            raise AlignError(f"report_to: unknown tracker '{n}' (choose from {', '.join(TRACKER_PACKAGES)}, "
                             f"all or none)")
        if n not in installed:
            raise AlignError(f"report_to: {n} is not installed (pip install {TRACKER_PACKAGES[n]})")
        if n not in out:
            out.append(n)
    return out


def tracker_objects(names: list[str], output_dir: str) -> list[Any]:
    """What to hand to ``Accelerator(log_with=...)``: the names, tensorboard as a tracker object that writes its
    events in output_dir/tensorboard."""
    from accelerate.tracking import TensorBoardTracker

    return [TensorBoardTracker("tensorboard", output_dir) if n == "tensorboard" else n for n in names]


def _run_name_kwargs(run_name: str) -> dict[str, dict[str, Any]]:
    """init_kwargs that name the run in each tracker (comet_ml is named after it starts)."""
    return {"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}, "trackio": {"name": run_name}}


def _hparam(v: Any) -> Any:
    """A config value as the trackers' hyperparameter tables take it: numbers, strings and bools as they are,
    anything else (lists, dicts, None) as text."""
    return v if isinstance(v, (bool, int, float, str)) else json.dumps(v)


class MetricsLogger:
    """metrics.jsonl (one object per logged step, with `step`), the accelerator's trackers, and the progress bar.
    Only the main process (``enabled``) writes; it starts the trackers of ``accelerator.log_with`` with
    ``config`` as hyperparameters, and finishes them in :meth:`close`."""

    def __init__(self, output_dir: str, enabled: bool, total: int, start: int, accelerator: Any = None,
                 run_name: str = "", config: dict[str, Any] | None = None, disable_tqdm: bool = False,
                 desc: str = ""):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.accelerator = None
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
        if accelerator is not None and accelerator.log_with:
            self.accelerator = accelerator
            self._start_trackers(start, run_name or os.path.basename(os.path.normpath(output_dir)), config or {})
        if not disable_tqdm:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)

    def _start_trackers(self, start: int, run_name: str, config: dict[str, Any]) -> None:
        from accelerate.tracking import TensorBoardTracker

        acc = self.accelerator
        for t in acc.log_with:
            if isinstance(t, TensorBoardTracker) and start > 0:
                t.init_kwargs["purge_step"] = start + 1  # a resumed run drops the events logged after its checkpoint
        acc.init_trackers(PROJECT, config={k: _hparam(v) for k, v in config.items()},
                          init_kwargs=_run_name_kwargs(run_name))
        for t in acc.trackers:
            if t.name == "comet_ml" and hasattr(t.tracker, "set_name"):
                t.tracker.set_name(run_name)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.accelerator is not None:
            self.accelerator.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))},
                                 step=step)
        if self.bar is not None:
            shown = {k: v for k, v in row.items() if k in ("loss", "eval_loss", "reward", "accuracy", "kl")}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if isinstance(v, float)}, refresh=False)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        """Close the bar and finish the trackers (not accelerator.end_training, which would also end the process
        group that the final save still needs)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.accelerator is not None:
            for t in self.accelerator.trackers:
                t.finish()
            self.accelerator.trackers = []
            self.accelerator = None


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
