"""GRPO for language models (`align grpo --config FILE`): group-relative advantages, no value model, on the shared
RL runner; iterative GRPO with reference resets and reward-model replay (`trainers/iterative.py`).

One step (Shao et al. 2024, DeepSeekMath §4 and Algorithm 1; our course notes, lecture 18):

1. (iterative GRPO) every ``ref_update_every`` steps the reference becomes the current policy;
2. sample G = num_generations completions for each prompt of the step with π_old (each prompt prefilled once,
   its KV cache expanded to the group), keeping log π_old of every token; score them with the reward sources;
   log π_ref when beta > 0 (each prompt encoded once for its group);
3. group-relative advantages Â_i (one per completion, broadcast over its tokens) by name from
   :data:`align.advantages.GROUP_ADVANTAGES`: zscore, mean, softmax or leave_one_out;
4. num_iterations (μ) optimizer updates of
   ``L = agg(−min(ρ_t Â, clip(ρ_t, 1 − ε, 1 + ε_high) Â) + β·KL_t(π_θ ‖ π_ref))`` (``POLICY_LOSSES["grpo"]``,
   :func:`align.losses.grpo_loss`), ``ρ_t = π_θ/π_old`` with π_old the log-probabilities kept from sampling
   (no second forward), agg by loss_type; the training forward encodes each prompt once for all its
   completions in a micro-batch as well (:class:`align.models.GroupLM`);
5. (iterative GRPO) one AdamW step of the reward model on comparisons made from this step's groups — the
   completions that rm_label_funcs (a verifier or gold function) rank apart — mixed with replayed original
   comparisons (rm_replay_ratio of them).

Completions whose advantage is exactly 0 (every completion of a group whose rewards are all equal) carry no
gradient when beta = 0: ``−min(ρ·0, clip(ρ)·0) = 0`` for any ρ. Single-process runs therefore leave them out of
the training forwards (they still count in the loss's denominator, so the gradient is unchanged); the fraction of
such groups is logged as ``zero_std_frac``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..advantages import group_reward_std, grpo_advantages, token_kl, zero_std_group_fraction
from ..config import AlignError, GRPOConfig
from ..losses import LOSS_TYPES, POLICY_LOSSES, aggregate_count
from ..models import GroupLM
from ..rollout import Rollout, logprob_request, scatter_logprobs, sequence_inputs
from .iterative import check_iterative_config, iterative_state, load_replay, save_reward_model
from .rl import RLSetup, RLStage, check_rl_config, rollout_metrics, run_rl_stage

Tensor = torch.Tensor


def rows_with_gradient(advantages: Tensor, beta: float) -> Tensor:
    """Indices (M,) of the completions whose loss terms can have a nonzero gradient: all of them when beta > 0,
    else those with a nonzero advantage (a zero advantage makes the clipped surrogate 0 for every ratio)."""
    if beta:
        return torch.arange(advantages.shape[0], device=advantages.device)
    return torch.nonzero(advantages != 0).flatten()


def group_inputs(r: Rollout, idx: Tensor, group_size: int) -> tuple[Rollout, Tensor, Tensor]:
    """The rows `idx` of a rollout (trimmed), the positions in them of the first row of each distinct prompt
    (U,), and the prompt of each row as an index into those (B,). Row i of the rollout belongs to prompt
    i // group_size."""
    sub = r.subset(idx)
    uniq, inverse = torch.unique(idx.cpu() // group_size, sorted=True, return_inverse=True)
    first = torch.full((len(uniq),), len(idx), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(len(idx)), reduce="amin")
    dev = sub.prompt_ids.device
    return sub, first.to(dev), inverse.to(dev)


def check_grpo_config(cfg: GRPOConfig) -> None:
    """One-line errors for GRPO settings that cannot work, before anything is loaded or written."""
    check_rl_config(cfg)
    g = cfg.num_generations
    if cfg.per_device_train_batch_size < g or cfg.per_device_train_batch_size % g:
        raise AlignError(f"per_device_train_batch_size={cfg.per_device_train_batch_size} must be a multiple of "
                         f"num_generations={g} (it counts completions, as in TRL)")
    if cfg.scale_rewards == "batch" and cfg.advantage != "zscore":
        raise AlignError(f"scale_rewards=batch divides zscore advantages only; advantage={cfg.advantage} has no "
                         f"std to scale (use group or none)")
    check_iterative_config(cfg)


class GRPOStep:
    """One GRPO step (reference reset, rollout, advantages, μ updates, reward-model update) for Run.train."""

    def __init__(self, setup: RLSetup):
        self.cfg, self.run, self.model, self.sampler = setup.cfg, setup.run, setup.model, setup.sampler
        self.keeper = setup.state.keeper if setup.state is not None else None
        self.rm = setup.state.rm if setup.state is not None else None
        self.agg = LOSS_TYPES[self.cfg.loss_type]
        # recomputing activations (gradient checkpointing) and a KV cache do not mix in transformers
        self.prompt_once = not self.cfg.gradient_checkpointing

    def __call__(self, step: int) -> dict[str, float]:
        cfg, run = self.cfg, self.run
        ref_updated = self.keeper.maybe_reset(step) if self.keeper is not None else False
        r = self.sampler(step, run.unwrap().model)  # the whole step's rollout, on every process
        g = r.group_size
        rewards = r.rewards
        adv = grpo_advantages(rewards, g, cfg.advantage, cfg.scale_rewards, cfg.softmax_beta)
        with run.timer("training"):
            train_stats = self.update(step, r, adv)
        run.scheduler.step()
        rm_stats: dict[str, float] = {}
        if self.rm is not None:
            with run.timer("reward_model"):
                rm_stats = self.rm(step, r)

        kl = None if r.ref_logprobs is None else token_kl(r.logprobs, r.ref_logprobs, r.completion_mask,
                                                           cfg.kl_estimator)
        out = rollout_metrics(run, r, kl, reward_group_std=group_reward_std(rewards, g),
                              zero_std_frac=zero_std_group_fraction(rewards, g), advantage_abs_mean=adv.abs().mean())
        out.update(train_stats)
        out.update(rm_stats)
        out["beta"] = cfg.beta
        if self.keeper is not None:
            out["ref_updated"] = float(ref_updated)
        return out

    def update(self, step: int, r: Rollout, adv: Tensor) -> dict[str, float]:
        """num_iterations optimizer updates, each over the completions of the step that can carry a gradient,
        this process's share in gradient_accumulation_steps micro-batches (`Run.shares`; exact accumulation: the
        loss's denominator is the count over the whole step's batch)."""
        cfg, run = self.cfg, self.run
        n_items = float(aggregate_count(r.completion_mask, self.agg))
        num_items = max(n_items, 1.0) / run.world  # DDP / FSDP average the processes' gradients
        rows = rows_with_gradient(adv, cfg.beta)  # completions with no gradient are left out (see the module doc)
        micro = run.shares(rows, cfg.gradient_accumulation_steps, r.sequence_lengths(),  # groups of similar length
                           cfg.max_tokens_per_micro_batch)
        token_stats = ("clip_frac", "approx_kl", "ratio_mean")
        sums: dict[str, float] = {}
        n_tok = 0.0
        norms = []
        lr = run.scheduler.get_last_lr()[0]
        self.model.train()
        for it in range(cfg.num_iterations):
            # a step where nothing carries gradient still runs (weight-0 micro-batches) and steps the optimizer on
            # a zero gradient, as without skipping (AdamW moves by its momentum)
            for idx, weight in run.accumulate(micro):
                stats, n_valid = self._micro_step(r, idx, adv, num_items, it == 0, weight)
                for key, v in stats.items():
                    w = n_valid if key in token_stats or key == "entropy" else 1.0
                    sums[key] = sums.get(key, 0.0) + float(v) * w * weight
                if it == 0:
                    n_tok += n_valid * weight
            norms.append(run.optimizer_step(schedule=False).get("grad_norm"))
        self.model.eval()
        mu = cfg.num_iterations
        # the same names on every process: each runs the same number of micro-batches
        sums = run.sum_over_processes({**sums, "_tokens": n_tok})
        n_tok = sums.pop("_tokens")
        out = {}
        for key, v in sums.items():
            if key == "entropy":
                out[key] = v / max(n_tok, 1.0)
            elif key in token_stats:
                out[key] = v / max(n_tok * mu, 1.0)
            else:
                out[key] = v / mu / run.world  # micro-batch losses (over N / processes) sum to the batch's loss
        out["loss"] = out.get("policy_loss", 0.0) + cfg.beta * out.get("kl_penalty", 0.0)
        out["learning_rate"] = lr
        if norms and norms[0] is not None:
            out["grad_norm"] = sum(norms) / len(norms)
        out["trained_frac"] = float(len(rows)) / max(len(r), 1)
        return out

    def _micro_step(self, r: Rollout, idx: Tensor, adv: Tensor, num_items: float, with_entropy: bool,
                    weight: float = 1.0) -> tuple[dict[str, Tensor], float]:
        cfg = self.cfg
        sub, first, prompt_index = group_inputs(r, idx, r.group_size)
        request = logprob_request(sub.completion_ids, sub.completion_mask, cfg.temperature, with_entropy)
        if self.prompt_once and len(first) < len(idx):
            out = self.model(sub.prompt_ids[first], attention_mask=sub.prompt_mask[first],
                             completion_ids=sub.completion_ids, completion_mask=sub.completion_mask,
                             prompt_index=prompt_index, logprobs=request)
        else:
            inp = sequence_inputs(sub.prompt_ids, sub.prompt_mask, sub.completion_ids, sub.completion_mask)
            out = self.model(inp["input_ids"], select=inp["select"], attention_mask=inp["attention_mask"],
                             position_ids=inp["position_ids"], logprobs=request)
        logp, _ = scatter_logprobs(out, sub.completion_mask)
        loss, stats = POLICY_LOSSES["grpo"](
            logp, sub.logprobs, adv[idx.to(adv.device)], sub.completion_mask, epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high or None, agg=self.agg, max_len=cfg.max_new_tokens, num_items=num_items,
            beta=cfg.beta, ref_logp=sub.ref_logprobs, kl_estimator=cfg.kl_estimator)
        self.run.backward(loss * weight)
        if with_entropy:
            stats["entropy"] = out.entropy.detach().mean()
        return stats, float(sub.completion_mask.sum())


def _group_module(cfg: GRPOConfig, tokenizer, dtype: torch.dtype, policy: nn.Module) -> nn.Module:
    return GroupLM(policy)


GRPO = RLStage("grpo", GRPOStep, check=check_grpo_config, load=load_replay, module=_group_module,
               # batch sizes count completions, as in TRL: a step's prompts are completions / G
               prompts_per_process=lambda cfg: (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
                                                // cfg.num_generations),
               state=iterative_state, prompt_once=True, finish=save_reward_model,
               # a frozen LoRA reward model on the policy's base (a reward model trained by rm_update keeps its copy)
               share_base=lambda cfg: cfg.share_base and not cfg.rm_update)


def train_grpo(cfg: GRPOConfig) -> dict[str, float]:
    """Run GRPO as configured; returns the last logged metrics. Writes nothing before all input is valid."""
    return run_rl_stage(cfg, GRPO)
