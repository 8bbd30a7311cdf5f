"""Two CPU processes (torchrun, gloo) give the same weights as one process with twice the accumulation."""

import os
import subprocess
import sys

from safetensors.torch import load_file

from conftest import addition_rows, needs_torchrun, run_torchrun, write_jsonl


@needs_torchrun
def test_ddp_two_processes_equal_single_process_double_accumulation(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(48, seed=7))
    common = ["sft", "--model", tiny_model_dir, "--train_data", data, "--max_steps", "3", "--learning_rate", "1e-3",
              "--per_device_train_batch_size", "4", "--max_length", "32", "--disable_tqdm", "true",
              "--lr_scheduler_type", "cosine"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run_torchrun(29631, *common, "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "ddp"))
    one = subprocess.run([sys.executable, "-m", "align.cli", *common, "--gradient_accumulation_steps", "4",
                          "--output_dir", str(tmp_path / "one")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    a = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "model.safetensors"))
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4
