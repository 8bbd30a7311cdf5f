"""Run under a 2-process FSDP2 launch by tests/test_scale.py: counts FSDP's all-gathers during one RL rollout (the
policy's generation, the frozen reference and reward model) at two completion lengths, and reports how the frozen
models are placed. Prints one JSON line on rank 0: {"gathers": {tokens: count}, "sharded": {...}}.

    accelerate launch --config_file recipes/accelerate/fsdp_cpu.yaml tests/fsdp_gathers.py MODEL RM PROMPTS OUT
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from align.cli import leave_process_group
from align.config import load_config
from align.models import GroupLM, load_causal_lm, load_tokenizer
from align.rewards import REWARD_MODEL_NAME, reward_sources
from align.data import load_prompt_data, read_rows
from align.trainers.loop import Run
from align.trainers.rl import Reference, RolloutSampler
from align.stages import config_class


def sharded(module: torch.nn.Module) -> bool:
    """Every parameter is a DTensor, and this process holds at most ~half of the module's weights."""
    params = list(module.parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    return all(isinstance(p, DTensor) for p in params) and local <= 0.6 * sum(p.numel() for p in params)


def main(model: str, rm: str, prompts: str, out: str) -> None:
    cfg = load_config(config_class("grpo"), ["--model", model, "--train_data", prompts, "--reward_model", rm,
                                             "--beta", "0.04", "--num_generations", "2",
                                             "--per_device_train_batch_size", "4", "--output_dir", out,
                                             "--disable_tqdm", "true", "--max_new_tokens", "8"], prog="probe")
    run = Run(cfg, "grpo")
    tok = load_tokenizer(model)
    data = load_prompt_data(read_rows(prompts), tok, 32, 8)
    policy = load_causal_lm(model)
    sources = reward_sources(cfg, run.device)
    scorer = sources[REWARD_MODEL_NAME]
    run.shard_frozen(scorer.model)
    scorer.gather = run.whole
    ref = Reference.load(cfg, policy, tok, run)
    run.prepare(GroupLM(policy), 2)
    calls = {"n": 0}
    real = dist.all_gather_single

    def counting(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    dist.all_gather_single = counting
    counts = {}
    for tokens in (2, 8):
        cfg.max_new_tokens = tokens
        sampler = RolloutSampler(cfg, run, tok, data, sources, ref, 2, 4, prompt_once=True)
        calls["n"] = 0
        r = sampler(0, run.unwrap().model)
        # an RM that gives equal scores everywhere would not show that it ran
        counts[tokens] = {"gathers": calls["n"], "length": int(r.completion_mask.sum(-1).max()),
                          "rows": len(r)}
    dist.all_gather_single = real
    if run.is_main:
        print(json.dumps({"counts": counts, "strategy": run.strategy,
                          "sharded": {"policy": sharded(run.unwrap()), "reference": sharded(ref.lm.model),
                                      "reward_model": sharded(scorer.model)}}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
    # as the CLI does: no process may exit while the other still talks to it (a gloo abort otherwise, now and then)
    leave_process_group()
