"""Token log-probs from hidden states: the full (N, V) logits path vs align.chunked, forward + backward.

The full path is what align does today (SelectiveLM runs the head on the N selected positions, then
`token_logprobs` / `entropy_from_logits` on the (N, V) logits); the chunked path is
`align.chunked.chunked_logprobs`, which never holds more than `chunk` rows of logits. Default shapes are
SmolLM2-135M's head: N=2048 tokens, V=49152, H=576, float32, weight and hidden both trained.

    python bench/bench_logprobs.py
    python bench/bench_logprobs.py --device cuda --dtype bfloat16 --chunks 512 1024 4096

Variants: log-probs only, for each `--chunks`; + entropy (with its gradient), at the largest chunk; a frozen
head (as under LoRA: only the hidden states get a gradient), at the largest chunk.

Time: median of `--repeats` runs, the variants interleaved (one run of each per round, after one warm-up
round). Peak: extra memory allocated above the inputs during one forward + backward — on CUDA
`torch.cuda.max_memory_allocated`, on CPU the CPU allocator's running total from the profiler's allocation
events (a separate, untimed run). Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from align.chunked import chunked_logprobs  # noqa: E402
from align.losses import entropy_from_logits, token_logprobs  # noqa: E402


def full_step(hidden, weight, labels, temperature, entropy):
    logits = hidden @ weight.t()
    lp = token_logprobs(logits.unsqueeze(0), labels.unsqueeze(0), temperature)[0].float()
    loss = lp.sum()
    if entropy:
        z = logits if temperature == 1.0 else logits / temperature
        loss = loss + 0.01 * entropy_from_logits(z.unsqueeze(0))[0].float().sum()
    loss.backward()


def chunked_step(chunk):
    def step(hidden, weight, labels, temperature, entropy):
        lp, ent = chunked_logprobs(hidden, weight, labels, temperature, chunk=chunk, with_entropy=entropy)
        loss = lp.sum() + (0.01 * ent.sum() if entropy else 0.0)
        loss.backward()

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_bytes(fn, device) -> int:
    """Peak allocated bytes above the level when `fn` starts."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(ev):
        f = ev.extra_fields
        if type(f).__name__ == "_ExtraFields_Allocation" and str(f.device) == "cpu":
            events.append((ev.start_time_ns, f.alloc_size, f.total_allocated))
        for c in ev.children:
            walk(c)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    if not events:
        return -1
    events.sort()
    return max(t for _, _, t in events) - (events[0][2] - events[0][1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--chunks", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--no_entropy", action="store_true", help="skip the with-entropy variants")
    ap.add_argument("--no_frozen", action="store_true", help="skip the frozen-head variants (LoRA: only the "
                    "hidden states get a gradient)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    n, v, h = args.tokens, args.vocab, args.hidden
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g).to(device)

    # (path, chunk, entropy, head trained, step)
    big = max(args.chunks)
    variants = [("full", "-", False, True, full_step)]
    variants += [("chunked", str(c), False, True, chunked_step(c)) for c in args.chunks]
    if not args.no_entropy:
        variants += [("full +entropy", "-", True, True, full_step),
                     ("chunked +entropy", str(big), True, True, chunked_step(big))]
    if not args.no_frozen:
        variants += [("full frozen head", "-", False, False, full_step),
                     ("chunked frozen", str(big), False, False, chunked_step(big))]

    def run(step, entropy, trained):
        hidden.grad = weight.grad = None
        weight.requires_grad_(trained)
        step(hidden, weight, labels, args.temperature, entropy)
        sync(device)
        hidden.grad = weight.grad = None

    # values agree (a sanity check, not timed)
    with torch.no_grad():
        ref = token_logprobs((hidden @ weight.t()).unsqueeze(0), labels.unsqueeze(0), args.temperature)[0].float()
        for c in args.chunks:
            got, _ = chunked_logprobs(hidden, weight, labels, args.temperature, chunk=c)
            assert (got - ref).abs().max().item() < (1e-4 if dtype == torch.float32 else 5e-2)
        del ref, got

    times: dict[int, list[float]] = {i: [] for i in range(len(variants))}
    for rnd in range(args.repeats + 1):  # round 0 warms up
        for i, (_, _, ent, trained, step) in enumerate(variants):
            t0 = time.perf_counter()
            run(step, ent, trained)
            if rnd:
                times[i].append(time.perf_counter() - t0)
    peaks = [peak_bytes(lambda s=step, e=ent, tr=trained: run(s, e, tr), device)
             for _, _, ent, trained, step in variants]

    mib = 2 ** 20
    print(f"\nlog-probs fwd+bwd  N={n} V={v} H={h}  {args.dtype} on {device.type}"
          f" ({torch.get_num_threads()} threads)  T={args.temperature}  median of {args.repeats}")
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other work skews CPU timings)")
    print(f"(N, V) float32 = {n * v * 4 / mib:.0f} MiB;  weight grad (V, H) = {v * h * dtype.itemsize / mib:.0f} MiB")
    print(f"{'path':<18}{'chunk':>7}{'time s':>10}{'vs full':>9}{'peak MiB':>11}{'vs full':>9}")
    base = {}
    for i, (name, chunk, ent, trained, _) in enumerate(variants):
        t = statistics.median(times[i])
        if name.startswith("full"):
            base[ent, trained] = (t, peaks[i])
        bt, bp = base[ent, trained]
        print(f"{name:<18}{chunk:>7}{t:>10.3f}{t / bt:>8.2f}x{peaks[i] / mib:>11.1f}{peaks[i] / bp:>8.2f}x")


if __name__ == "__main__":
    main()
