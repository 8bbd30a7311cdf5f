"""Seconds per DPO step and peak memory (CPU RSS) of `align dpo` against the bare PyTorch work and (when installed)
TRL 1.16's DPOTrainer, on the same model, pairs and batch. Prints ratios; asserts nothing.

    python bench/bench_dpo.py                                          # built-in tiny model (llama 64x2)
    python bench/bench_dpo.py --size smollm2                           # SmolLM2-135M-shaped, random weights
    python bench/bench_dpo.py --size smollm2 --trl_python /tmp/trl116/bin/python     # + TRL 1.16 (its own venv)

Every run is a fresh subprocess (so its peak RSS is its own): fp32 weights, no gradient checkpointing, the sigmoid
(DPO) loss, beta 0.1, AdamW, gradient clipping at 1, a constant learning rate, one torch thread (``--threads``),
``--batch`` pairs of data/addition/prefs.jsonl per step (``--long`` pads each prompt with a 100-character preamble
and each answer with a sentence, for a less prompt-heavy shape):

* ours: `align dpo` (the real stage through `train_dpo`, its defaults: prompt shared by chosen and rejected,
  reference log-probabilities precomputed by the starting policy before the first step), per-step times from its
  metrics.jsonl;
* bare: the same work written directly against PyTorch/transformers in the usual way: chosen and rejected as two
  right-padded sequences each, the reference log-probabilities precomputed, one forward (the output head only at
  the response tokens), the DPO loss, backward, clipping and AdamW;
* trl: ``trl.DPOTrainer`` with the same settings (``precompute_ref_log_probs`` at TRL's default, False: a
  reference model runs beside the policy; ``--trl_precompute`` for True), timed between ``on_step_begin`` and
  ``on_step_end``.

The first ``--warmup`` steps of each run are not timed. The runs alternate ``--repeats`` times; the median of each
is kept (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

from trl_timing import STEP_TIMER  # bench/ is on sys.path when a bench runs

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SIZES = {
    "tiny": None,  # align.tiny.DEFAULT_TINY: llama, hidden 64, 2 layers, 8 heads
    "smollm2": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True),
}

PREAMBLE = ("You are a careful assistant. Read the question, work it out step by step in your head, and answer "
            "with the number only. ")


def make_inputs(root: str, args) -> tuple[str, str]:
    """The model (saved with our tokenizer) and the pairs file of (warmup + steps) batches."""
    sys.path.insert(0, ROOT)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from align.tiny import DEFAULT_TINY, build_tokenizer, save_tiny_model

    model_dir = os.path.join(root, "model")
    if SIZES[args.size] is None:
        save_tiny_model(model_dir, **{**DEFAULT_TINY, "max_position_embeddings": 512})
    else:
        tok = build_tokenizer()
        cfg = AutoConfig.for_model("llama", **SIZES[args.size], pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    rows = []
    with open(os.path.join(ROOT, "data", "addition", "prefs.jsonl")) as fh:
        for line in fh:
            r = json.loads(line)
            if args.long:
                r = {"prompt": PREAMBLE + r["prompt"], "chosen": f"The answer is {r['chosen']}, I checked it.",
                     "rejected": f"The answer is {r['rejected']}, I checked it."}
            rows.append(r)
            if len(rows) == args.batch * (args.warmup + args.steps):
                break
    data = os.path.join(root, "pairs.jsonl")
    with open(data, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return model_dir, data


OURS = textwrap.dedent("""
    import json, os, resource, sys
    a = json.loads(sys.argv[1])
    sys.path.insert(0, a["root"])
    import torch
    torch.set_num_threads(a["threads"])
    from align.config import DPOConfig, build_config
    from align.trainers.dpo import train_dpo
    cfg = build_config(DPOConfig, dict(model=a["model"], train_data=a["data"], output_dir=a["out"],
                       overwrite_output_dir=True, max_steps=a["steps"], per_device_train_batch_size=a["batch"],
                       per_device_eval_batch_size=a["batch"], learning_rate=1e-6, beta=0.1, loss_type="sigmoid",
                       lr_scheduler_type="constant", max_length=512, dtype="float32", logging_steps=1,
                       disable_tqdm=True, num_threads=a["threads"]), "bench")
    train_dpo(cfg)
    rows = [json.loads(x) for x in open(os.path.join(a["out"], "metrics.jsonl"))]
    print("RESULT " + json.dumps({"step_times": [r["step_time"] for r in rows],
                                  "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")

BARE = textwrap.dedent("""
    import json, resource, sys, time
    a = json.loads(sys.argv[1])
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(a["threads"])
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a["model"])
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
    rows = [json.loads(x) for x in open(a["data"])]
    def encode(r):
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        return [(p, tok(r[k], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
                for k in ("chosen", "rejected")]
    def batch(rs):  # 2B right-padded rows: chosen of every pair, then rejected
        seqs = [s for k in (0, 1) for s in (encode(r)[k] for r in rs)]
        t = max(len(p) + len(c) for p, c in seqs)
        ids = torch.full((len(seqs), t), tok.pad_token_id); att = torch.zeros((len(seqs), t), dtype=torch.long)
        sel = torch.zeros((len(seqs), t), dtype=torch.bool); lab = []
        for i, (p, c) in enumerate(seqs):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c); att[i, :len(p) + len(c)] = 1
            sel[i, len(p) - 1:len(p) + len(c) - 1] = True; lab += c
        return ids, att, sel, torch.tensor(lab), torch.tensor([len(c) for _, c in seqs])
    def logps(ids, att, sel, lab, n):
        h = model.model(input_ids=ids, attention_mask=att).last_hidden_state[sel]
        lp = model.lm_head(h).log_softmax(-1).gather(-1, lab[:, None]).squeeze(-1)
        return torch.zeros(len(n)).index_add(0, torch.repeat_interleave(torch.arange(len(n)), n), lp)
    b, steps = a["batch"], a["steps"]
    batches = [batch(rows[s * b:(s + 1) * b]) for s in range(steps)]
    with torch.no_grad():
        refs = [logps(*x) for x in batches]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    model.train()
    times = []
    for x, ref in zip(batches, refs):
        t0 = time.perf_counter()
        lp = logps(*x)
        d = (lp - ref)
        loss = -F.logsigmoid(0.1 * (d[:b] - d[b:])).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    print("RESULT " + json.dumps({"step_times": times,
                                  "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")

TRL = textwrap.dedent("""
    import json, resource, sys, time
    a = json.loads(sys.argv[1])
    import torch
    torch.set_num_threads(a["threads"])
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    tok = AutoTokenizer.from_pretrained(a["model"])
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
    ds = load_dataset("json", data_files=a["data"], split="train")
""") + STEP_TIMER + textwrap.dedent("""
    cfg = DPOConfig(output_dir=a["out"], max_steps=a["steps"], per_device_train_batch_size=a["batch"],
                    learning_rate=1e-6, beta=0.1, loss_type=["sigmoid"], lr_scheduler_type="constant",
                    warmup_steps=0, max_grad_norm=1.0, max_length=512, precompute_ref_log_probs=a["precompute"],
                    logging_steps=1000, save_strategy="no", report_to="none", bf16=False, fp16=False,
                    gradient_checkpointing=False, dataloader_num_workers=0, seed=0, use_cpu=True,
                    disable_tqdm=True)
    tr = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[StepTimer()])
    tr.train()
    print("RESULT " + json.dumps({"step_times": step_times(),
                                  "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def run(python: str, script: str, spec: dict) -> dict | None:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(script)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(spec["threads"]))
    r = subprocess.run([python, fh.name, json.dumps(spec)], capture_output=True, text=True, env=env)
    os.remove(fh.name)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"run failed ({python}):\n" + r.stderr[-3000:], file=sys.stderr)
    return None


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--batch", type=int, default=0, help="pairs per step (default: 64 tiny, 8 smollm2)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default: 20 tiny, 3 smollm2)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--long", action="store_true", help="longer prompts and answers (see the docstring)")
    ap.add_argument("--trl_python", default="", help="python of a venv with trl==1.16.0")
    ap.add_argument("--trl_precompute", action="store_true", help="TRL with precompute_ref_log_probs=True too")
    args = ap.parse_args()
    args.batch = args.batch or (64 if args.size == "tiny" else 8)
    args.steps = args.steps or (20 if args.size == "tiny" else 3)

    work = tempfile.mkdtemp(prefix="bench_dpo_")
    model, data = make_inputs(work, args)
    total = args.warmup + args.steps
    spec = dict(model=model, data=data, steps=total, batch=args.batch, threads=args.threads, root=ROOT)
    kinds = [("align", sys.executable, OURS, {}), ("bare", sys.executable, BARE, {})]
    if args.trl_python:
        kinds.append(("TRL", args.trl_python, TRL, {"precompute": False}))
        if args.trl_precompute:
            kinds.append(("TRL (precompute)", args.trl_python, TRL, {"precompute": True}))
    times: dict[str, list[float]] = {k[0]: [] for k in kinds}
    rss: dict[str, list[float]] = {k[0]: [] for k in kinds}
    for rep in range(args.repeats):
        for name, python, script, extra in kinds:
            res = run(python, script, {**spec, **extra, "out": os.path.join(work, f"{name}{rep}".replace(" ", ""))})
            if res:
                times[name].append(median(res["step_times"][args.warmup:]))
                rss[name].append(res["max_rss_kb"] / 1024)

    shape = "long prompts/answers" if args.long else "addition pairs"
    print(f"\nDPO step: {args.size} ({'llama h64x2' if args.size == 'tiny' else 'SmolLM2-135M shape'}), "
          f"{args.batch} pairs/step ({shape}), fp32, {args.threads} thread(s); median of {args.steps} timed steps, "
          f"median of {args.repeats} interleaved runs")
    print(f"{'':<20}{'s/step':>10}{'peak RSS MiB':>14}")
    got = {k: (median(v), median(rss[k])) for k, v in times.items() if v}
    for name, (t, m) in got.items():
        print(f"{name:<20}{t:>10.4f}{m:>14.0f}")
    if "align" in got:
        for mine in [k for k in got if k.startswith("align")]:
            t, m = got[mine]
            for other in [k for k in got if not k.startswith("align")]:
                print(f"{mine + ' / ' + other:<40} time {t / got[other][0]:.2f}x   peak RSS {m / got[other][1]:.2f}x")
        if "TRL" in got:
            print("(targets vs TRL: time <= 0.5x, peak RSS <= 1x)")
    if not args.trl_python:
        print("TRL: not measured (pass --trl_python PATH to a venv with trl==1.16.0)")
    shutil.rmtree(work, ignore_errors=True)  # the saved models of a 135M run take GBs


if __name__ == "__main__":
    main()
