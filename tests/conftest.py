"""Shared fixtures: tiny models saved with save_pretrained (random weights, offline tokenizer) and small data
files, so every test goes through the same from_pretrained / file-loading paths as a user's run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tiny models (hidden <= 64) run fastest on one thread, and one thread per process keeps the suite from
# oversubscribing a 2-core machine when a test starts subprocesses.
torch.set_num_threads(1)


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")


def run_torchrun(port: int, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m align.cli ARGS` on CPU (gloo), one thread per process; fails the test with
    the end of stderr when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    res = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port), "-m", "align.cli", *args],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def read_metrics(out) -> list[dict]:
    """The rows of a run's metrics.jsonl (the file must exist)."""
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def addition_rows(n: int, seed: int = 0, with_completion: bool = True) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        row = {"prompt": f"What is {a}+{b}?", "answer": str(a + b)}
        if with_completion:
            row["completion"] = str(a + b)
        rows.append(row)
    return rows


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random Llama (hidden 32, 2 layers) and the built-in tokenizer, saved with save_pretrained."""
    from align.tiny import save_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "llama"
    return save_tiny_model(path, arch="llama", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


@pytest.fixture(scope="session")
def tiny_rm_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model as a reward model: its backbone and a score head initialised from seed 0, saved with
    save_pretrained (a plain causal LM is refused as a reward_model: it has no trained head)."""
    from transformers import AutoTokenizer

    from align.heads import load_scalar_model

    path = tmp_path_factory.mktemp("tiny_rm") / "rm"
    load_scalar_model(tiny_model_dir, seed=0).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", addition_rows(64, seed=1))


@pytest.fixture(scope="session")
def eval_file(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("data") / "eval.jsonl", addition_rows(16, seed=2))


DIVERSITY = "def distinct_chars(prompts, completions, **kw):\n    return [float(len(set(c))) for c in completions]\n"


@pytest.fixture(scope="session")
def diversity_data(tmp_path_factory) -> tuple[str, str]:
    """12 addition prompts and a reward function file: (prompt file, 'rewards.py:distinct_chars'), a reward that
    any policy can raise, for end-to-end policy-gradient tests."""
    d = tmp_path_factory.mktemp("pg")
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in addition_rows(12, seed=7)]
    (d / "rewards.py").write_text(DIVERSITY)
    return write_jsonl(d / "rl.jsonl", rows), f"{d / 'rewards.py'}:distinct_chars"


def mixed_prompts(path) -> str:
    """RL prompts of mixed lengths: addition problems behind 0 to 3 copies of a 28-character sentence (about 15 to
    100 tokens), with the answer column; written to `path`."""
    rows = [{"prompt": ("Please add the two numbers. " * (i % 4)) + r["prompt"], "answer": r["answer"]}
            for i, r in enumerate(addition_rows(24, seed=5))]
    return write_jsonl(path, rows)
