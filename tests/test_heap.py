"""`loop.keep_heap_compact`: with glibc, tensors of >= 4 MiB freed after glibc's dynamic mmap threshold has risen
go back to the system (RSS falls), where without it they stay in the heap; on for wide models (hidden >= 512),
off for narrow ones unless asked; the environment decides over both."""

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

SCRIPT = r"""
import json, os, sys
import torch
from align.trainers.loop import keep_heap_compact

def rss_mib():
    with open(f"/proc/{os.getpid()}/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS")) / 1024

set_to = keep_heap_compact(int(sys.argv[2])) if sys.argv[1] == "on" else 0
x = torch.ones(16 << 18)  # 16 MiB, mmapped, then freed: glibc's dynamic threshold rises to 16 MiB
del x
big, small = [], []
for _ in range(48):
    big.append(torch.ones(6 << 18))  # 6 MiB each, written (resident)
    small.append(torch.ones(64 << 10))  # a small live block (256 KiB) after each
before = rss_mib()
del big
print(json.dumps({"set": set_to, "freed_mib": before - rss_mib()}))
"""


def run(mode: str, width: int = 576, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(width)], capture_output=True, text=True, check=True,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_large_tensors_go_back_to_the_system():
    on, off = run("on"), run("off")
    assert on["set"] == 4 << 20
    assert on["freed_mib"] > 0.9 * 48 * 6, on  # all 288 MiB returned
    assert off["freed_mib"] < 0.25 * 48 * 6, off  # glibc's default keeps them in the heap
    # the environment decides: off when asked, and a MALLOC_MMAP_THRESHOLD_ glibc read at start is left alone
    assert run("on", ALIGN_MMAP_THRESHOLD="0")["set"] == 0
    assert run("on", MALLOC_MMAP_THRESHOLD_="65536")["set"] == 0
    narrow = run("on", width=128)
    assert narrow["set"] == 0 and narrow["freed_mib"] < 0.25 * 48 * 6  # a narrow model keeps glibc's default
    assert run("on", width=128, ALIGN_MMAP_THRESHOLD=str(8 << 20))["set"] == 8 << 20


def test_model_width_reads_the_hidden_size(tiny_model_dir):
    from align.models import load_causal_lm
    from align.trainers.critic import PolicyAndValue
    from align.trainers.loop import model_width

    lm = load_causal_lm(tiny_model_dir)
    assert model_width(lm) == lm.config.hidden_size > 0
    value_head = torch.nn.Linear(lm.config.hidden_size, 1)
    assert model_width(PolicyAndValue(lm, value_head=value_head)) == lm.config.hidden_size
    assert model_width(torch.nn.Linear(3, 3)) == 0
