"""Resumable stops: SIGTERM and SIGINT (:class:`StopSignals`, :func:`stop_run`) let the current step finish, every
process agrees to stop after the same step, a checkpoint is written, no final model is saved, and the process
exits with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), the shell's code for "ended by that
signal": the work is not done, so a job script's ``&&`` chain stops and a scheduler that restarts failed jobs
restarts it, and the resumed run (``--resume_from_checkpoint latest``) continues bit-exactly.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

from .checkpoints import RESUME_HINT, save_checkpoint

if TYPE_CHECKING:
    from .loop import Run


class TrainingStopped(SystemExit):
    """A resumable stop: the run was asked to end by a signal and wrote a checkpoint at `step`. A SystemExit
    whose code is 128 + the signal's number, so a command ends with the shell's convention for a signal
    (143 SIGTERM, 130 SIGINT) and no traceback, from the CLI and from a user's own script alike."""

    def __init__(self, signum: int, step: int, max_steps: int, checkpoint: str):
        super().__init__(128 + signum)
        self.signum, self.step, self.max_steps, self.checkpoint = signum, step, max_steps, checkpoint
        self.message = (f"stopped by {signal.Signals(signum).name} after step {step} of {max_steps}: checkpoint "
                        f"{checkpoint} written, no final model saved; run the same command with "
                        f"{RESUME_HINT} to continue")

    def __str__(self) -> str:
        return self.message


class StopSignals:
    """While active (a context manager, on the main thread), SIGTERM and SIGINT do not end the process: they set
    `signum`, which the step loop reads after each step (:meth:`agreed`). A SIGINT that comes a second time,
    at least a second after the first one (a repeat delivery, e.g. by a launcher that forwards the terminal's
    Ctrl-C, comes sooner), aborts at once with KeyboardInterrupt. `announce`: acknowledge a SIGINT on stderr
    (someone at a terminal pressed Ctrl-C and waits for the step to finish)."""

    SIGNALS = ("SIGTERM", "SIGINT")
    REPEAT_S = 1.0

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.signum = 0
        self._first_int: float | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old = {}

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if signum == signal.SIGINT:
            if self._first_int is not None:
                if now - self._first_int >= self.REPEAT_S:
                    raise KeyboardInterrupt
                return
            self._first_int = now
            if self.announce:
                os.write(2, b"align: Ctrl-C: finishing this step, then writing a checkpoint "
                            b"(press Ctrl-C again to abort without one)\n")
        if not self.signum:
            self.signum = signum

    def agreed(self, run: Run) -> int:
        """The signal every process stops for after this step, 0 to go on: a collective call (one all-reduce
        of two numbers per step when there are several processes), as a signal may reach only some of them.
        SIGTERM wins over SIGINT."""
        if run.world == 1:
            return self.signum
        term, intr = run.reduce_sum([float(self.signum == signal.SIGTERM), float(self.signum == signal.SIGINT)])
        return int(signal.SIGTERM) if term else int(signal.SIGINT) if intr else 0


def stop_run(run: Run, signum: int, step: int, saved: str | None = None) -> None:
    """End a run stopped by `signum` after `step`: write its checkpoint (unless `saved`, the one this step just
    wrote), say so in one line on the main process, and raise :class:`TrainingStopped` on every process."""
    path = saved or save_checkpoint(run, step)
    if run.logger is not None:
        run.logger.close()
    stop = TrainingStopped(signum, step, run.max_steps, path)
    if run.is_main:
        print(stop.message, file=sys.stderr, flush=True)
    raise stop
