"""Gold evaluation: generate a completion for every prompt of a data file and score it with reward sources.

    align eval --model DIR --data FILE --reward_funcs exact_match [--output FILE.json]

Greedy by default. On the built-in task `reward_mean` of `exact_match` is the gold accuracy.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .config import DTYPE_CHOICES, Checked, _f
from .data import Rows, batched, encode_prompt, left_pad, prompt_columns, read_rows, write_atomic
from .rewards import load_function, score_completions, source_name


@dataclass
class EvalConfig(Checked):
    """Generate completions for the prompts of `data` and score them."""

    model: str = _f("", "Model directory or hub id (a policy saved by any stage).")
    data: str = _f("", "Prompt data (jsonl/json/parquet/csv or hub id) with a 'prompt' column and the columns "
                       "the reward functions need (e.g. 'answer').")
    split: str = _f("test", "Split to read when data is a hub dataset id.")
    column_map: dict = _f({}, "Rename data columns on reading, {our name: the data's name}, e.g. "
                         "{prompt: question, answer: final_answer} for a hub data set with other names.")
    reward_funcs: list = _f(["exact_match"], "Reward sources: built-in names, file.py:function or "
                                             "module:function.")
    reward_weights: list = _f([], "Weights of reward_funcs (default: 1 each).")
    output: str = _f("", "Optional JSON file for the results (written atomically).")
    max_new_tokens: int = _f(16, "Maximum generated tokens per prompt.", ge=1)
    do_sample: bool = _f(False, "Sample instead of greedy decoding.")
    temperature: float = _f(1.0, "Sampling temperature (with do_sample).", gt=0)
    top_p: float = _f(1.0, "Nucleus sampling threshold (with do_sample).", gt=0, le=1)
    top_k: int = _f(0, "Top-k sampling (0: off; with do_sample).", ge=0)
    batch_size: int = _f(64, "Prompts per generation batch.", ge=1)
    max_samples: int = _f(0, "Evaluate only the first N prompts (0: all).", ge=0)
    seed: int = _f(0, "Seed for sampling.", ge=0)
    dtype: str = _f("auto", "auto, float32, bfloat16 or float16.", choices=DTYPE_CHOICES)
    trust_remote_code: bool = _f(False, "Allow model code from the hub to run.")
    save_completions: bool = _f(False, "Include every prompt, completion and reward in the output JSON.")


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: Sequence[Any], max_new_tokens: int, batch_size: int,
                         do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                         top_k: int = 0) -> list[str]:
    """Decoded completions (special tokens removed, cut at EOS) for each prompt, batched and left-padded."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    for chunk in batched(encoded, batch_size):
        ids, att = left_pad(chunk, tokenizer.pad_token_id)
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), **kwargs)
        for row in gen[:, ids.shape[1]:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    model.train(was_training)
    return out


def evaluate_model(model, tokenizer, data: Rows, reward_funcs: Sequence[str], max_new_tokens: int = 16,
                   batch_size: int = 64, max_samples: int = 0, reward_weights: Sequence[float] | None = None,
                   **gen_kwargs: Any) -> dict[str, Any]:
    """Generate and score; returns reward_mean, one `reward_<name>` mean per source, and the raw lists."""
    n = len(data) if not max_samples else min(max_samples, len(data))
    prompts, cols = prompt_columns(data, n)
    from .rewards import check_reward_columns  # before generating: a missing or mistyped column, named

    check_reward_columns(reward_funcs, data, n)
    t0 = time.perf_counter()
    completions = generate_completions(model, tokenizer, prompts, max_new_tokens, batch_size, **gen_kwargs)
    rewards, comps = score_completions({name: load_function(name) for name in reward_funcs}, prompts,
                                       completions, cols, reward_weights)
    result: dict[str, Any] = {"reward_mean": sum(rewards) / n, "num_samples": n,
                              "seconds": round(time.perf_counter() - t0, 3)}
    for k, v in comps.items():
        result[f"reward_{k}"] = sum(v) / n
    result["_prompts"], result["_completions"], result["_rewards"] = prompts, completions, rewards
    return result


def greedy_eval(model, tokenizer, data: Rows, funcs: Sequence[str], max_new_tokens: int, batch_size: int,
                max_samples: int = 0) -> dict[str, float]:
    """The RL stages' evaluation: greedy generation on the eval prompts scored with `funcs`; returns eval_reward
    and eval_<name> per function."""
    res = evaluate_model(model, tokenizer, data, list(funcs), max_new_tokens=max_new_tokens, batch_size=batch_size,
                         max_samples=max_samples)
    out = {"eval_reward": float(res["reward_mean"])}
    for spec in funcs:
        out[f"eval_{source_name(spec)}"] = float(res[f"reward_{spec}"])
    return out


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    from .models import default_device, frozen_dtype, load_causal_lm, load_tokenizer, sync_special_tokens

    for name in cfg.reward_funcs:
        load_function(name)  # fail on a bad reward spec before loading anything
    data = read_rows(cfg.data, cfg.split, cfg.column_map)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    device = default_device()
    model = load_causal_lm(cfg.model, dtype=frozen_dtype(cfg.dtype, device), trust_remote_code=cfg.trust_remote_code,
                           device=device)
    sync_special_tokens(model, tokenizer)
    torch.manual_seed(cfg.seed)
    res = evaluate_model(model, tokenizer, data, cfg.reward_funcs, cfg.max_new_tokens, cfg.batch_size,
                         cfg.max_samples, cfg.reward_weights, do_sample=cfg.do_sample, temperature=cfg.temperature,
                         top_p=cfg.top_p, top_k=cfg.top_k)
    out = {k: v for k, v in res.items() if not k.startswith("_")}
    out.update(model=cfg.model, data=cfg.data, reward_funcs=list(cfg.reward_funcs), do_sample=cfg.do_sample)
    if cfg.save_completions:
        out["samples"] = [{"prompt": p, "completion": c, "reward": r}
                          for p, c, r in zip(res["_prompts"], res["_completions"], res["_rewards"])]
    if cfg.output:
        write_atomic(cfg.output, json.dumps(out, indent=2))
    return out
