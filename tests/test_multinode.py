"""recipes/accelerate/multinode.yaml run as two "machines" on this host: two `accelerate launch` commands, one per
machine rank, one CPU process each (gloo), give the same weights as one process with twice the accumulation.

accelerate starts the processes of a MULTI_GPU config through torchrun (node rank, static rendezvous at
--main_process_ip:--main_process_port); on a host without CUDA, align runs them on CPU with gloo. A MULTI_CPU
config (`--cpu`) would not do: accelerate starts it as one plain process that never joins the others unless
mpirun starts it, so each "machine" would train alone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import addition_rows, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "recipes", "accelerate", "multinode.yaml")
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
needs_accelerate_launch = pytest.mark.skipif(not os.path.exists(ACCELERATE), reason="accelerate CLI not installed")
TIMEOUT = 240  # seconds for all three runs together; they take about 20 s on 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen) -> None:
    """Kill a launcher and everything it started (it runs in its own session, so its group id is its pid)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run_together(commands: dict[str, list[str]], logdir) -> None:
    """Start every command at once (each in its own session, output to logdir/NAME.log) and wait for all; when
    one fails or the time is up, all are killed (a machine left alone would wait for its peer at the rendezvous)
    and the test fails with the end of each log."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    procs: dict[str, subprocess.Popen] = {}
    paths = {name: os.path.join(logdir, f"{name}.log") for name in commands}
    try:
        for name, cmd in commands.items():
            with open(paths[name], "w", encoding="utf-8") as log:
                procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True)
        deadline = time.monotonic() + TIMEOUT
        while any(p.poll() is None for p in procs.values()):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs.values()):
                break
            time.sleep(0.2)
    finally:
        for p in procs.values():
            kill_group(p)
    codes = {name: p.returncode for name, p in procs.items()}
    if any(codes.values()):
        tails = []
        for name, code in codes.items():
            with open(paths[name], encoding="utf-8") as log:
                tails.append(f"--- {name} (exit {code}) ---\n{log.read()[-1500:]}")
        pytest.fail("run failed or timed out (exit -9: killed):\n" + "\n".join(tails))


def machine(rank: int, port: int, args: list[str]) -> list[str]:
    """`accelerate launch` of multinode.yaml as machine `rank` of 2, one process per machine, no mixed precision."""
    return [ACCELERATE, "launch", "--config_file", CONFIG, "--num_processes", "2", "--mixed_precision", "no",
            "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "-m", "align.cli", *args]


@needs_accelerate_launch
def test_two_machines_equal_single_process_double_accumulation(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(48, seed=7))
    common = ["sft", "--model", tiny_model_dir, "--train_data", data, "--max_steps", "3", "--learning_rate", "1e-3",
              "--per_device_train_batch_size", "4", "--max_length", "32", "--disable_tqdm", "true",
              "--lr_scheduler_type", "cosine"]
    two = [*common, "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "two")]
    port = free_port()
    # the single-process reference runs beside the two machines: less wall time than one after the other
    run_together({"machine0": machine(0, port, two), "machine1": machine(1, port, two),
                  "single": [sys.executable, "-m", "align.cli", *common, "--gradient_accumulation_steps", "4",
                             "--output_dir", str(tmp_path / "one")]}, tmp_path)
    a = load_file(str(tmp_path / "two" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "model.safetensors"))
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert a.keys() == b.keys() == start.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4
