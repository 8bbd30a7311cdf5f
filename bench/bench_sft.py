"""SFT throughput: align's trainer vs a bare PyTorch loop (and TRL's SFTTrainer when available).

Counts real (non-pad) tokens per second for the same examples, model, batch size and optimizer. The bare loop
is what a careful user writes by hand: right-padded batches, `model(input_ids, attention_mask, labels)`,
backward, gradient clipping, AdamW. TRL runs in its own interpreter (`--trl_python /path/to/venv/bin/python`,
a venv with `trl==1.16.0`), with fp32 and no gradient checkpointing.

    python bench/bench_sft.py                          # ours vs bare
    python bench/bench_sft.py --trl_python /tmp/trl116/bin/python

Prints a table and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from align.config import SFTConfig  # noqa: E402
from align.data import global_batch_indices, pad_examples, read_rows, tokenize_sft  # noqa: E402
from align.tiny import save_tiny_model  # noqa: E402
from align.trainers.sft import train_sft  # noqa: E402

from trl_timing import STEP_TIMER  # noqa: E402  (bench/ is on sys.path when a bench runs)


def make_data(path: str, n: int, seed: int = 0, shape: str = "steps") -> str:
    """n prompt/completion rows of the addition task. shape: "steps" (~70 tokens: a worked answer, so the loss
    covers a realistic share of tokens), "short" (~10 tokens: the bare answer), "mixed" (20 to 400 tokens,
    uniformly: a worked answer followed by a random-length remark)."""
    import random
    import string

    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            if shape == "short":
                row = {"prompt": f"{a}+{b}=", "completion": str(a + b)}
            else:
                steps = f"{a} plus {b}: ones {a % 10}+{b % 10}, tens {a // 10}+{b // 10}. The answer is {a + b}."
                row = {"prompt": f"What is {a}+{b}? Explain.", "completion": steps}
                if shape == "mixed":  # the char-level tokenizer: one token per character
                    extra = max(0, rng.randint(20, 400) - len(row["prompt"]) - len(steps) - 2)
                    row["completion"] += " " + "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(extra))
            fh.write(json.dumps(row) + "\n")
    return path


def bare_loop(model_dir: str, examples, steps: int, batch: int, lr: float, seed: int, warmup: int) -> float:
    """Seconds per step of a hand-written loop over the same batches (right padding, HF loss)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=True)
    times = []
    for step in range(warmup + steps):
        idx = global_batch_indices(step, len(examples), batch, seed)
        b = pad_examples([examples[i] for i in idx], pad_id=0)
        labels = torch.where(b["attention_mask"].bool(), torch.tensor(0), torch.tensor(-100))
        # HF shifts labels itself: give unshifted labels (prompt masked)
        unshifted = torch.full_like(b["input_ids"], -100)
        unshifted[:, 1:] = b["labels"][:, :-1]
        del labels
        t0 = time.perf_counter()
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=unshifted)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def ours(model_dir: str, data: str, steps: int, batch: int, lr: float, seed: int, warmup: int,
         max_length: int, out: str) -> float:
    cfg = SFTConfig(model=model_dir, train_data=data, output_dir=out, overwrite_output_dir=True,
                    max_steps=warmup + steps, per_device_train_batch_size=batch, learning_rate=lr, seed=seed,
                    max_length=max_length, logging_steps=1, disable_tqdm=True, lr_scheduler_type="constant")
    train_sft(cfg)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(x) for x in fh]
    times = [r["step_time"] for r in rows if r["step"] > warmup]
    return sum(times) / len(times)


TRL_SCRIPT = textwrap.dedent("""
    import json, sys, time, torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    model_dir, data, steps, batch, lr, warmup, out, max_length = sys.argv[1:9]
    steps, batch, warmup, max_length, lr = int(steps), int(batch), int(warmup), int(max_length), float(lr)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = load_dataset("json", data_files=data, split="train")
""") + STEP_TIMER + textwrap.dedent("""
    cfg = SFTConfig(output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=batch, learning_rate=lr,
                    lr_scheduler_type="constant", logging_steps=1000, save_strategy="no", report_to="none",
                    bf16=False, fp16=False, gradient_checkpointing=False, max_length=max_length,
                    completion_only_loss=True, packing=False, dataloader_num_workers=0, seed=0,
                    use_cpu=not torch.cuda.is_available())
    tr = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[StepTimer()])
    tr.train()
    per = step_times()[warmup:]
    print("TRL_RESULT " + json.dumps({"step_time": sum(per) / len(per)}))
""")


def trl_time(python: str, model_dir: str, data: str, steps: int, batch: int, lr: float, warmup: int,
             max_length: int, out: str) -> float | None:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(TRL_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([python, fh.name, model_dir, data, str(steps), str(batch), str(lr), str(warmup), out,
                        str(max_length)], capture_output=True, text=True, env=env)
    for line in r.stdout.splitlines():
        if line.startswith("TRL_RESULT "):
            return json.loads(line[len("TRL_RESULT "):])["step_time"]
    print("TRL run failed:\n" + r.stderr[-3000:], file=sys.stderr)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--examples", type=int, default=2048)
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="alternate ours/bare this many times; the median is "
                                                          "reported")
    ap.add_argument("--shape", default="steps", choices=("steps", "short", "mixed"),
                    help="example lengths: ~70 tokens, ~10 tokens, or 20-400 tokens (see make_data)")
    ap.add_argument("--trl_python", default="", help="python of a venv with trl==1.16.0")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = tempfile.mkdtemp(prefix="bench_sft_")
    model_dir = save_tiny_model(os.path.join(work, "model"), arch="llama", hidden_size=args.hidden,
                                num_layers=args.layers, num_heads=max(4, args.hidden // 64),
                                intermediate_size=4 * args.hidden, max_position_embeddings=args.max_length)
    data = make_data(os.path.join(work, "sft.jsonl"), args.examples, shape=args.shape)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = tokenize_sft(read_rows(data), tok, max_length=args.max_length)
    tokens_per_step = sum(len(examples[i].input_ids) for s in range(args.warmup, args.warmup + args.steps)
                          for i in global_batch_indices(s, len(examples), args.batch, 0)) / args.steps
    lr = 1e-4
    t_ours, t_bare = [], []
    for r in range(args.repeats):
        t_ours.append(ours(model_dir, data, args.steps, args.batch, lr, 0, args.warmup, args.max_length,
                           os.path.join(work, f"ours{r}")))
        t_bare.append(bare_loop(model_dir, examples, args.steps, args.batch, lr, 0, args.warmup))
    ours_s, bare_s = statistics.median(t_ours), statistics.median(t_bare)
    trl_s = None
    if args.trl_python:
        trl_s = trl_time(args.trl_python, model_dir, data, args.steps, args.batch, lr, args.warmup,
                         args.max_length, os.path.join(work, "trl"))
    print(f"\nSFT throughput ({args.shape} examples): llama hidden={args.hidden} layers={args.layers}, "
          f"batch={args.batch}, {tokens_per_step:.0f} real tokens/step, {args.steps} timed steps, torch "
          f"threads={torch.get_num_threads()}; median of {args.repeats} interleaved runs")
    print(f"{'':<10}{'s/step':>10}{'tokens/s':>12}")
    rows = [("align", ours_s), ("bare", bare_s)] + ([("TRL", trl_s)] if trl_s else [])
    for name, s in rows:
        print(f"{name:<10}{s:>10.4f}{tokens_per_step / s:>12.0f}")
    print(f"align throughput / bare throughput = {bare_s / ours_s:.2f}x")
    if trl_s:
        print(f"align throughput / TRL throughput  = {trl_s / ours_s:.2f}x")
    elif args.trl_python:
        print("TRL: run failed (see stderr)")
    else:
        print("TRL: not measured (pass --trl_python PATH to a venv with trl==1.16.0)")


if __name__ == "__main__":
    main()
