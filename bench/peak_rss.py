"""Peak resident memory of an align run, phase by phase: ``python bench/peak_rss.py <stage> <align args...>``.

Runs the align CLI in this process while a thread samples VmRSS (Linux /proc) every 20 ms, and prints the peak of
each phase the run times (``generation``, ``scoring``, ``reference``, ``training``, numbered by step: ``training#2``
is the second step's) and of the stretches between them. Measures; asserts nothing."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import align.trainers.loop as loop  # noqa: E402
from align.cli import main  # noqa: E402


def rss_gib() -> float:
    with open(f"/proc/{os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 2**20
    return 0.0


def run(argv: list[str]) -> int:
    state = {"phase": "setup", "stop": False}
    peaks: dict[str, float] = {}
    seen: dict[str, int] = {}

    def sample() -> None:
        while not state["stop"]:
            peaks[state["phase"]] = max(peaks.get(state["phase"], 0.0), rss_gib())
            time.sleep(0.02)

    timer = loop.Run.timer

    @contextlib.contextmanager
    def phase_timer(self, name):
        seen[name] = seen.get(name, 0) + 1
        state["phase"] = f"{name}#{seen[name]}"
        try:
            with timer(self, name):
                yield
        finally:
            state["phase"] = f"after {name}#{seen[name]}"

    loop.Run.timer = phase_timer
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        rc = main(argv)
    finally:
        state["stop"] = True
        thread.join()
        loop.Run.timer = timer
    for name, peak in peaks.items():
        print(f"peak RSS {name:<24} {peak:.2f} GiB")
    print(f"peak RSS {'whole run':<24} {max(peaks.values(), default=0.0):.2f} GiB")
    return rc


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
