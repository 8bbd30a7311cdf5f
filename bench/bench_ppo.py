"""Seconds per PPO step, split into generation / scoring / training, against the bare PyTorch work for the same
tokens and (when installed) TRL's experimental PPOTrainer at equal settings. Prints ratios; asserts nothing.

    python bench/bench_ppo.py                       # built-in tiny model, CPU or the GPU if there is one
    python bench/bench_ppo.py --hidden 256 --layers 4 --batch 64 --new_tokens 32
    python bench/bench_ppo.py --trl_python /path/to/venv-with-trl/bin/python
    # or, in this venv without touching its packages:
    #   pip install --no-deps --target /tmp/trl110 "trl==1.10.*" && PYTHONPATH=/tmp/trl110 python bench/bench_ppo.py

Every run uses the same four models TRL's PPO uses: a policy, a frozen reference, a reward model and a separate
critic initialised from the reward model (here all made from one randomly initialised tiny causal LM, so
completions almost never stop early and every variant generates exactly `new_tokens` tokens per prompt).

* ours: `align ppo` (the real stage, through `train_ppo`), timings from its metrics.jsonl; the first step is
  warm-up and not counted.
* bare: the same work written directly against PyTorch/transformers with nothing else: `model.generate` with
  a KV cache for the same number of tokens (old logprobs from its scores); reward, reference and critic
  forwards; then num_ppo_epochs x
  num_mini_batches forward/backward passes of policy and critic with a clipped-ratio + value loss and AdamW.
  It is a lower bound to aim at, not a correct PPO (no GAE, no KL, no masking).
* trl: `trl.experimental.ppo.PPOTrainer` with fp32 weights and no gradient checkpointing (TRL's defaults are
  bf16 and checkpointing on). In TRL 1.10 a step's rollouts are per_device_train_batch_size x
  gradient_accumulation_steps, a minibatch is that / num_mini_batches and a micro-batch is
  per_device_train_batch_size, so per_device_train_batch_size = batch and gradient_accumulation_steps = 1 give
  the same rollouts, minibatches and optimizer updates per step as ours. Time per step: (time of a run of
  steps+1 steps − time of a 1-step run) / steps, models built outside the timing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_inputs(root: str, args, n_prompts: int = 0) -> tuple[str, str]:
    """A random tiny model (args.hidden, args.layers) and a prompt file of ``n_prompts`` problems of the built-in
    task (default: enough for args.steps + 1 batches of args.batch). bench_grpo.py uses it too."""
    import random

    from align.task import make_prompt
    from align.tiny import save_tiny_model

    model = save_tiny_model(os.path.join(root, "model"), hidden_size=args.hidden, num_layers=args.layers,
                            num_heads=max(1, args.hidden // 16), intermediate_size=4 * args.hidden,
                            max_position_embeddings=max(64, 32 + args.new_tokens))
    rng = random.Random(0)
    path = os.path.join(root, "prompts.jsonl")
    with open(path, "w") as fh:
        for _ in range(n_prompts or args.batch * (args.steps + 1)):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            fh.write(json.dumps({"prompt": make_prompt(a, b), "answer": str(a + b)}) + "\n")
    return model, path


def make_reward_model(model: str, out: str) -> str:
    """A reward model saved from the random causal LM: its backbone and a new score head (seed 0), the same head
    the bare loop's and TRL's AutoModelForSequenceClassification get. Only the costs matter here."""
    from align.heads import load_scalar_model
    from align.models import load_tokenizer

    load_scalar_model(model, seed=0).save_pretrained(out, safe_serialization=True)
    load_tokenizer(model).save_pretrained(out)
    return out


def bench_ours(model: str, data: str, out: str, args) -> dict[str, float]:
    from align.config import PPOConfig
    from align.trainers.ppo import train_ppo

    cfg = PPOConfig(model=model, train_data=data, output_dir=out, reward_model=make_reward_model(model, out + "-rm"),
                    per_device_train_batch_size=args.batch, max_new_tokens=args.new_tokens,
                    num_ppo_epochs=args.epochs, num_mini_batches=args.mini_batches, max_steps=args.steps + 1,
                    temperature=args.temperature, learning_rate=1e-5, logging_steps=1, disable_tqdm=True,
                    max_length=128)
    train_ppo(cfg)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh][1:]  # first step: warm-up
    keys = {"generation": "time_generation", "scoring": "time_scoring", "reference+critic": "time_reference",
            "training": "time_training", "total": "step_time"}
    res = {name: statistics.mean(r[k] for r in rows) for name, k in keys.items()}
    res["scoring"] += res.pop("reference+critic")  # the bare loop does reward, reference and critic together
    res["tokens"] = statistics.mean(r["response_length"] for r in rows)
    return res


def bench_bare(model_dir: str, data: str, args, device: torch.device) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    ref = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).to(device).eval()
    critic = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).to(device)
    for m in (policy, ref, rm, critic):
        m.config.pad_token_id = tok.pad_token_id
    opt = torch.optim.AdamW(list(policy.parameters()) + list(critic.parameters()), lr=1e-5)
    with open(data) as fh:
        prompts = [json.loads(line)["prompt"] for line in fh]
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {"generation": [], "scoring": [], "training": [], "total": []}
    t_new = args.new_tokens
    for step in range(args.steps + 1):
        batch = prompts[step * args.batch:(step + 1) * args.batch]
        enc = tok(batch, return_tensors="pt", padding=True).to(device)
        p = enc["input_ids"].shape[1]
        sync()
        t0 = time.perf_counter()
        policy.eval()
        with torch.no_grad():
            gen = policy.generate(**enc, do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
                                  max_new_tokens=t_new, min_new_tokens=t_new, pad_token_id=tok.pad_token_id,
                                  return_dict_in_generate=True, output_scores=True)
            seq = gen.sequences
            # the sampling step's (temperature-scaled) scores give the old logprobs without another forward
            old_lp = torch.log_softmax(torch.stack(gen.scores, 1).float(), -1).gather(-1, seq[:, p:, None])
            old_lp = old_lp.squeeze(-1)
        sync()
        t1 = time.perf_counter()
        att = torch.cat([enc["attention_mask"], torch.ones_like(seq[:, p:])], 1)
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            ref_lp = torch.log_softmax(ref(seq, attention_mask=att, position_ids=pos).logits[:, p - 1:-1]
                                       / args.temperature, -1).gather(-1, seq[:, p:, None]).squeeze(-1)
            score = rm(seq, attention_mask=att, position_ids=pos).logits[:, 0]
            backbone = getattr(critic, critic.base_model_prefix)
            old_v = critic.score(backbone(seq, attention_mask=att, position_ids=pos)[0])[:, p - 1:-1, 0]
            adv = (score[:, None] - 0.05 * (old_lp - ref_lp) - old_v)
        sync()
        t2 = time.perf_counter()
        policy.train()
        critic.train()
        for _ in range(args.epochs):
            perm = torch.randperm(args.batch, device=device)
            for mb in perm.chunk(args.mini_batches):
                logits = policy(seq[mb], attention_mask=att[mb], position_ids=pos[mb]).logits[:, p - 1:-1]
                lp = torch.log_softmax(logits / args.temperature, -1).gather(-1, seq[mb, p:, None]).squeeze(-1)
                ratio = torch.exp(lp - old_lp[mb])
                pg = -torch.minimum(ratio * adv[mb], ratio.clamp(0.8, 1.2) * adv[mb]).mean()
                v = critic.score(backbone(seq[mb], attention_mask=att[mb], position_ids=pos[mb])[0])[:, p - 1:-1, 0]
                loss = pg + 0.1 * ((v - (adv[mb] + old_v[mb])) ** 2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if step == 0:
            continue  # warm-up
        for k, v in (("generation", t1 - t0), ("scoring", t2 - t1), ("training", t3 - t2), ("total", t3 - t0)):
            times[k].append(v)
    res = {k: statistics.mean(v) for k, v in times.items()}
    res["tokens"] = float(t_new)
    return res


def bench_trl(model_dir: str, data: str, out: str, args, device: torch.device) -> dict[str, float] | None:
    """TRL's time per step, in this interpreter if trl imports, else in `--trl_python` if given, else None."""
    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError:
        if not args.trl_python:
            return None
        result = os.path.join(out + "-result.json")
        cmd = [args.trl_python, os.path.abspath(__file__), "--trl_only", result, "--trl_model", model_dir,
               "--trl_data", data, *sys.argv[1:]]
        env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1")
        subprocess.run(cmd, check=True, env=env)
        with open(result) as fh:
            return json.load(fh)
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    with open(data) as fh:
        rows = [json.loads(line) for line in fh]
    ds = datasets.Dataset.from_dict({"input_ids": [tok(r["prompt"])["input_ids"] for r in rows]})

    def run(steps: int) -> float:
        cfg = PPOConfig(output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                        num_mini_batches=args.mini_batches, num_ppo_epochs=args.epochs,
                        total_episodes=args.batch * steps, response_length=args.new_tokens,
                        temperature=args.temperature, stop_token="eos", learning_rate=1e-5, bf16=False, fp16=False,
                        gradient_checkpointing=False, num_sample_generations=0, report_to="none",
                        local_rollout_forward_batch_size=args.batch, logging_steps=1, save_strategy="no",
                        use_cpu=device.type == "cpu")
        kw = dict(num_labels=1)
        models = dict(model=AutoModelForCausalLM.from_pretrained(model_dir),
                      reward_model=AutoModelForSequenceClassification.from_pretrained(model_dir, **kw),
                      value_model=AutoModelForSequenceClassification.from_pretrained(model_dir, **kw))
        if getattr(args, "lora", False):
            # TRL's LoRA PPO: the policy gets the adapter and the reference is that adapter switched off; the
            # critic and the reward model stay full models (trained in full, and frozen, respectively)
            from peft import LoraConfig

            models.update(ref_model=None, peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
        else:
            models["ref_model"] = AutoModelForCausalLM.from_pretrained(model_dir)
        trainer = PPOTrainer(args=cfg, processing_class=tok, train_dataset=ds, **models)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # TRL prints every step's metrics
            trainer.train()
        return time.perf_counter() - t0

    warm = run(1)
    gc.collect()  # the first trainer's models go before the second is built (peak memory: one trainer's worth)
    full = run(args.steps + 1)
    return {"total": (full - warm) / args.steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="rollouts (prompts) per PPO step")
    ap.add_argument("--new_tokens", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--mini_batches", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=4, help="measured steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    ap.add_argument("--trl_python", default="", help="interpreter of a venv with trl (used when this one has "
                                                     "no trl)")
    ap.add_argument("--trl_only", default="", help=argparse.SUPPRESS)
    ap.add_argument("--trl_model", default="", help=argparse.SUPPRESS)
    ap.add_argument("--trl_data", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.trl_only:  # child process of --trl_python
        with tempfile.TemporaryDirectory() as root:
            res = bench_trl(args.trl_model, args.trl_data, os.path.join(root, "trl"), args, device)
        with open(args.trl_only, "w") as fh:
            json.dump(res, fh)
        return
    with tempfile.TemporaryDirectory() as root:
        model, data = make_inputs(root, args)
        ours = bench_ours(model, data, os.path.join(root, "ours"), args)
        bare = bench_bare(model, data, args, device)
        trl = bench_trl(model, data, os.path.join(root, "trl"), args, device)
    print(f"PPO step on {device} ({torch.get_num_threads()} threads): hidden {args.hidden}, {args.layers} layers, "
          f"{args.batch} rollouts x {args.new_tokens} new tokens, {args.epochs} epochs x {args.mini_batches} "
          f"minibatches; mean of {args.steps} steps after one warm-up")
    print(f"tokens generated per completion: ours {ours['tokens']:.1f}, bare {bare['tokens']:.1f}")
    header = f"{'part':<12}{'ours s':>10}{'bare s':>10}{'ours/bare':>11}"
    if trl:
        header += f"{'trl s':>10}{'ours/trl':>10}"
    print(header)
    for part in ("generation", "scoring", "training", "total"):
        line = f"{part:<12}{ours[part]:>10.3f}{bare[part]:>10.3f}{ours[part] / bare[part]:>11.2f}"
        if trl and part in trl:
            line += f"{trl[part]:>10.3f}{ours[part] / trl[part]:>10.2f}"
        print(line)
    if not trl:
        print("trl: not importable here and no --trl_python given (TRL 1.10's trl.experimental.ppo.PPOTrainer)")


if __name__ == "__main__":
    main()
