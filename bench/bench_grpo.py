"""Seconds per GRPO step against the bare PyTorch work for the same tokens and (when installed) TRL's GRPOTrainer
at equal settings; optionally the accuracy both reach from the same SFT checkpoint. Prints ratios; asserts
nothing.

    python bench/bench_grpo.py                                   # built-in tiny model, CPU or the GPU
    python bench/bench_grpo.py --hidden 256 --layers 4 --batch 64 --new_tokens 32
    python bench/bench_grpo.py --trl_python /tmp/trl116/bin/python          # + TRL 1.16 (its own venv)
    python bench/bench_grpo.py --trl_python /tmp/trl116/bin/python \\
        --sft_model runs/tiny/sft --data_dir data/addition --accuracy_steps 60  # + accuracy after N steps

Speed (a randomly initialised tiny causal LM, so completions almost never stop early and every variant generates
``new_tokens`` tokens per completion; the reward is a pseudo-random function of the text, so groups almost never
tie and every completion is trained on — no variant gets to skip work):

* ours: `align grpo` (the real stage, through `train_grpo`), per-step times from its metrics.jsonl;
* bare: the same work written directly against PyTorch/transformers: ``model.generate`` of G samples per
  prompt (``num_return_sequences``), then one forward (logits only at completion positions), a policy-gradient
  loss, backward, gradient clipping and AdamW on the same tokens (plus a reference forward when beta > 0).
  It is a lower bound to aim at, not a correct GRPO;
* trl: ``trl.GRPOTrainer`` with fp32 weights, no gradient checkpointing, the same G, batch (completions per
  step), completion length, beta, learning rate, clip range and loss type, timed between ``on_step_begin`` and
  ``on_step_end``.

The first ``--warmup`` steps of each are not counted. The three runs alternate ``--repeats`` times and the
median of each is reported (the machine may be shared).

Accuracy (``--sft_model`` and ``--data_dir``): ours and TRL each train ``--accuracy_steps`` steps from the SFT
checkpoint on rl_prompts.jsonl with the exact_match reward and the same hyperparameters, then both models are
evaluated greedily on eval.jsonl with align's evaluator.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import torch

from trl_timing import STEP_TIMER  # bench/ is on sys.path when a bench runs

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Reward functions shared verbatim by our run (written to a file) and TRL's (pasted into its script).
REWARDS_SRC = textwrap.dedent('''
    def pseudo_random(prompts, completions, **kw):
        """A deterministic reward in [0, 1] that differs between almost any two texts (for timing)."""
        return [(sum((i + 1) * ord(ch) for i, ch in enumerate(c)) % 97) / 96.0 for c in completions]


    def exact_match(prompts, completions, answer=None, **kw):
        """1.0 when the completion, stripped, equals the answer column (align's built-in exact_match)."""
        return [1.0 if str(c).strip() == str(a).strip() else 0.0 for c, a in zip(completions, answer)]
''')


def make_inputs(root: str, args) -> tuple[str, str, str]:
    """A random tiny model, a prompt file of the built-in task (bench_ppo's), and the reward file."""
    from bench_ppo import make_inputs as model_and_prompts

    model, path = model_and_prompts(root, args, n_prompts=512)
    rewards = os.path.join(root, "bench_rewards.py")
    with open(rewards, "w") as fh:
        fh.write(REWARDS_SRC)
    return model, path, rewards


def run_ours(model: str, data: str, reward: str, out: str, steps: int, args, lr: float | None = None,
             eval_data: str = "") -> list[dict]:
    """Our stage, in this process; returns its metrics rows."""
    from align.config import GRPOConfig, build_config
    from align.trainers.grpo import train_grpo

    values = dict(model=model, train_data=data, output_dir=out, overwrite_output_dir=True, max_steps=steps,
                  per_device_train_batch_size=args.batch, num_generations=args.num_generations,
                  max_new_tokens=args.new_tokens, max_length=128, learning_rate=lr or args.lr, beta=args.beta,
                  reward_funcs=[reward], logging_steps=1, disable_tqdm=True, seed=args.seed, dtype="float32",
                  epsilon=0.2, loss_type="dapo", scale_rewards="group", lr_scheduler_type=args.scheduler,
                  temperature=1.0)
    cfg = build_config(GRPOConfig, values, "bench")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        train_grpo(cfg)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def run_bare(model_dir: str, data: str, args) -> list[float]:
    """Seconds per step of generate(G samples) + forward/backward/AdamW on those tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.data import read_rows

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval() \
        if args.beta > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, foreach=True)
    prompts = [r["prompt"] for r in read_rows(data).rows]
    n_prompts = args.batch // args.num_generations
    times = []
    for step in range(args.warmup + args.steps):
        batch = [prompts[(step * n_prompts + i) % len(prompts)] for i in range(n_prompts)]
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            seq = model.generate(**enc, do_sample=True, num_return_sequences=args.num_generations,
                                 max_new_tokens=args.new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        p = enc["input_ids"].shape[1]
        comp = seq[:, p:]
        eos = (comp == tok.eos_token_id).long()
        cmask = ((eos.cumsum(1) - eos) == 0).long()  # up to and including the first EOS
        att = torch.cat([enc["attention_mask"].repeat_interleave(args.num_generations, 0), cmask], 1)
        pos = (att.cumsum(1) - 1).clamp(min=0)
        keep = comp.shape[1] + 1
        model.train()
        logits = model(input_ids=seq, attention_mask=att, position_ids=pos, logits_to_keep=keep).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, comp.unsqueeze(-1)).squeeze(-1)
        adv = torch.randn(seq.shape[0], 1, device=device)
        loss = -(adv * logp * cmask).sum() / cmask.sum()
        if ref is not None:
            with torch.no_grad():
                rl = torch.log_softmax(ref(input_ids=seq, attention_mask=att, position_ids=pos,
                                           logits_to_keep=keep).logits[:, :-1].float(), -1)
                ref_logp = rl.gather(-1, comp.unsqueeze(-1)).squeeze(-1)
            d = ref_logp - logp
            loss = loss + args.beta * ((torch.exp(d) - d - 1) * cmask).sum() / cmask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    return times


TRL_SCRIPT = textwrap.dedent("""
    import json, sys, time, torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    a = json.loads(sys.argv[1])
    ns = {}
    exec(a["rewards_src"], ns)
    reward = ns[a["reward"]]
    tok = AutoTokenizer.from_pretrained(a["model"])
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
    ds = load_dataset("json", data_files=a["data"], split="train")
""") + STEP_TIMER + textwrap.dedent("""
    cfg = GRPOConfig(output_dir=a["out"], max_steps=a["steps"], per_device_train_batch_size=a["batch"],
                     num_generations=a["G"], max_completion_length=a["new_tokens"], learning_rate=a["lr"],
                     beta=a["beta"], epsilon=0.2, loss_type="dapo", scale_rewards="group", temperature=1.0,
                     top_k=0, top_p=1.0, lr_scheduler_type=a["scheduler"], warmup_steps=0, max_grad_norm=1.0,
                     logging_steps=1000, save_strategy="no", report_to="none", bf16=False, fp16=False,
                     gradient_checkpointing=False, dataloader_num_workers=0, seed=a["seed"],
                     use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    tr = GRPOTrainer(model=model, reward_funcs=[reward], args=cfg, train_dataset=ds, processing_class=tok,
                     callbacks=[StepTimer()])
    tr.train()
    if a["save"]:
        tr.save_model(a["out"])
        tok.save_pretrained(a["out"])
    print("TRL_RESULT " + json.dumps({"step_times": step_times()}))
""")


def run_trl(python: str, model: str, data: str, reward: str, out: str, steps: int, args, lr: float | None = None,
            save: bool = False) -> list[float] | None:
    spec = dict(model=model, data=data, reward=reward, rewards_src=REWARDS_SRC, out=out, steps=steps,
                batch=args.batch, G=args.num_generations, new_tokens=args.new_tokens, lr=lr or args.lr,
                beta=args.beta, seed=args.seed, scheduler=args.scheduler, save=save)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(TRL_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([python, fh.name, json.dumps(spec)], capture_output=True, text=True, env=env)
    for line in r.stdout.splitlines():
        if line.startswith("TRL_RESULT "):
            return json.loads(line[len("TRL_RESULT "):])["step_times"]
    print("TRL run failed:\n" + r.stderr[-3000:], file=sys.stderr)
    return None


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def accuracy(model_dir: str, eval_file: str, max_new_tokens: int) -> float:
    from align.data import read_rows
    from align.evaluate import evaluate_model
    from align.models import load_causal_lm, load_tokenizer

    res = evaluate_model(load_causal_lm(model_dir), load_tokenizer(model_dir), read_rows(eval_file),
                         ["exact_match"], max_new_tokens=max_new_tokens, batch_size=256)
    return float(res["reward_exact_match"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="completions per step (per_device_train_batch_size)")
    ap.add_argument("--num_generations", type=int, default=8)
    ap.add_argument("--new_tokens", type=int, default=16)
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--scheduler", default="constant")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl_python", default="", help="python of a venv with trl==1.16.0")
    ap.add_argument("--sft_model", default="", help="SFT checkpoint for the accuracy comparison")
    ap.add_argument("--data_dir", default="data/addition", help="folder with rl_prompts.jsonl and eval.jsonl")
    ap.add_argument("--accuracy_steps", type=int, default=150, help="as recipes/tiny/grpo.yaml")
    ap.add_argument("--accuracy_lr", type=float, default=1e-4)
    ap.add_argument("--accuracy_beta", type=float, default=0.04)
    ap.add_argument("--accuracy_new_tokens", type=int, default=6)
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="bench_grpo_")
    model, data, rewards = make_inputs(work, args)
    spec = f"{rewards}:pseudo_random"
    total = args.warmup + args.steps
    t_ours, t_bare, t_trl = [], [], []
    trained = []
    for rep in range(args.repeats):
        rows = run_ours(model, data, spec, os.path.join(work, f"ours{rep}"), total, args)
        t_ours.append(median([r["step_time"] for r in rows[args.warmup:]]))
        trained += [r.get("trained_frac", 1.0) for r in rows[args.warmup:]]
        phases = {k: median([r.get(k, 0.0) for r in rows[args.warmup:]])
                  for k in ("time_generation", "time_scoring", "time_reference", "time_training")}
        t_bare.append(median(run_bare(model, data, args)))
        if args.trl_python:
            per = run_trl(args.trl_python, model, data, "pseudo_random", os.path.join(work, f"trl{rep}"), total,
                          args)
            if per:
                t_trl.append(median(per[args.warmup:]))
    ours_s, bare_s = median(t_ours), median(t_bare)
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\nGRPO step: llama hidden={args.hidden} layers={args.layers}, {args.batch} completions/step "
          f"(G={args.num_generations}, {args.batch // args.num_generations} prompts), {args.new_tokens} new "
          f"tokens, beta={args.beta}, fp32, {device}; median of {args.steps} steps, median of {args.repeats} "
          f"interleaved runs")
    print(f"{'':<8}{'s/step':>10}")
    print(f"{'align':<8}{ours_s:>10.4f}   (generation {phases['time_generation']:.4f}, scoring "
          f"{phases['time_scoring']:.4f}, reference {phases['time_reference']:.4f}, training "
          f"{phases['time_training']:.4f}; trained on {100 * sum(trained) / len(trained):.0f}% of completions)")
    print(f"{'bare':<8}{bare_s:>10.4f}")
    if t_trl:
        print(f"{'TRL':<8}{median(t_trl):>10.4f}")
    print(f"align / bare = {ours_s / bare_s:.2f}x   (target <= 1.2x)")
    if t_trl:
        print(f"align / TRL  = {ours_s / median(t_trl):.2f}x   (target <= 0.5x)")
    elif args.trl_python:
        print("TRL: run failed (see stderr)")
    else:
        print("TRL: not measured (pass --trl_python PATH to a venv with trl==1.16.0)")

    if args.sft_model:
        prompts = os.path.join(args.data_dir, "rl_prompts.jsonl")
        evals = os.path.join(args.data_dir, "eval.jsonl")
        a2 = argparse.Namespace(**{**vars(args), "new_tokens": args.accuracy_new_tokens, "beta": args.accuracy_beta,
                                   "scheduler": "constant"})
        base = accuracy(args.sft_model, evals, a2.new_tokens)
        print(f"\naccuracy after {args.accuracy_steps} steps from {args.sft_model} (exact_match, lr "
              f"{args.accuracy_lr}, constant, G={args.num_generations}, batch {args.batch}, {a2.new_tokens} new "
              f"tokens, beta={a2.beta}); greedy exact_match on {evals}:")
        print(f"{'SFT':<8}{base:>8.3f}")
        rows = run_ours(args.sft_model, prompts, f"{rewards}:exact_match", os.path.join(work, "acc_ours"),
                        args.accuracy_steps, a2, lr=args.accuracy_lr)
        steps = [r["step_time"] for r in rows]
        print(f"{'align':<8}{accuracy(os.path.join(work, 'acc_ours'), evals, a2.new_tokens):>8.3f}   "
              f"{sum(steps):.1f} s of steps, median {median(steps):.4f} s/step, trained on "
              f"{100 * sum(r.get('trained_frac', 1.0) for r in rows) / len(rows):.0f}% of completions")
        if args.trl_python:
            per = run_trl(args.trl_python, args.sft_model, prompts, "exact_match", os.path.join(work, "acc_trl"),
                          args.accuracy_steps, a2, lr=args.accuracy_lr, save=True)
            if per:
                print(f"{'TRL':<8}{accuracy(os.path.join(work, 'acc_trl'), evals, a2.new_tokens):>8.3f}   "
                      f"{sum(per):.1f} s of steps, median {median(per):.4f} s/step")

if __name__ == "__main__":
    main()
