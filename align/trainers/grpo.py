"""GRPO for language models (`align grpo --config FILE`): group-relative advantages, no value model, on the shared
rollout loop; iterative GRPO with reference resets and reward-model replay.

One step (Shao et al. 2024, DeepSeekMath §4 and Algorithm 1; our course notes, lecture 18):

1. (iterative GRPO) every ``ref_update_every`` steps the reference becomes the current policy;
2. sample G = num_generations completions for each prompt of the step with π_old (each prompt prefilled once,
   its KV cache expanded to the group), keeping log π_old of every token; score them with the reward sources;
   log π_ref when beta > 0;
3. group-relative advantages Â_i (one per completion, broadcast over its tokens) by name from
   :data:`align.advantages.GROUP_ADVANTAGES`: zscore, mean, softmax or leave_one_out;
4. num_iterations (μ) optimizer updates of
   ``L = agg(−min(ρ_t Â, clip(ρ_t, 1 − ε, 1 + ε_high) Â) + β·KL_t(π_θ ‖ π_ref))``, ``ρ_t = π_θ/π_old`` with
   π_old the log-probabilities kept from sampling (no second forward), agg by loss_type; the training forward
   encodes each prompt once for all its completions in a micro-batch as well (:class:`GroupLM`);
5. (iterative GRPO) one AdamW step of the reward model on comparisons made from this step's groups — the
   completions that rm_label_funcs (a verifier or gold function) rank apart — mixed with replayed original
   comparisons (rm_replay_ratio of them).

The top of this file is the algorithm as pure functions of tensors; `train_grpo` below wires it to models, data
and the shared loop (`Run`, `RolloutSampler`, `Reference`).

Completions whose advantage is exactly 0 (every completion of a group whose rewards are all equal) carry no
gradient when beta = 0: ``−min(ρ·0, clip(ρ)·0) = 0`` for any ρ. Single-process runs therefore leave them out of
the training forwards (they still count in the loss's denominator, so the gradient is unchanged); the fraction of
such groups is logged as ``zero_std_frac``.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

from ..advantages import group_advantages, zero_std_group_fraction
from ..config import AlignError, GRPOConfig
from ..data import read_rows
from ..losses import (AGGREGATIONS, aggregate, aggregate_count, clipped_surrogate_loss, entropy_from_logits,
                      kl_estimate, masked_mean)
from ..models import SelectiveLM, _final_logits, frozen_dtype, lm_parts, load_tokenizer, unwrap_peft
from ..rewards import load_function
from ..rollout import Rollout, logprobs_from_selected, make_generator, position_ids_from_mask, sequence_inputs
from .loop import Run, resolve_max_steps, save_final, seed_everything
from .ppo import chunks
from .rl import (REWARD_MODEL_NAME, Reference, RolloutSampler, apply_gradients, check_rl_config, disable_dropout,
                 gold_sources, greedy_eval, load_rl_inputs, reward_sources, source_name)
from .sft import prepare_model

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------------------------
# the algorithm: pure functions

# loss_type -> aggregation mode of align.losses.aggregate. TRL's names: "dapo" normalises by the valid tokens of
# the whole step's batch (all micro-batches and processes: our token-mean with num_items); "grpo" averages each
# sequence's token mean; "dr_grpo" sums each sequence's tokens and divides by the constant max_new_tokens.
LOSS_TYPES: dict[str, str] = {"dapo": "token-mean", "grpo": "seq-mean-token-mean",
                              "dr_grpo": "seq-mean-token-sum-norm", **{m: m for m in AGGREGATIONS}}


def grpo_advantages(rewards: Tensor, group_size: int, kind: str = "zscore", scale_rewards: str = "group",
                    softmax_beta: float = 1.0, eps: float = 1e-4) -> Tensor:
    """Group-relative advantage of each completion: :func:`align.advantages.group_advantages` with TRL's
    ``scale_rewards``: ``"group"`` divides zscore advantages by each group's std, ``"batch"`` by the std of all
    rewards given (pass the whole step's, every process's), ``"none"`` by nothing (zscore becomes ``R − mean R``,
    Dr. GRPO). ``"batch"`` applies to zscore only; the other kinds never divide by a std.

    Shapes: rewards (N,) in contiguous groups of ``group_size`` → (N,). All-equal groups get exactly 0."""
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")
    if scale_rewards == "none" and kind == "zscore":
        kind = "mean"
    scale = "batch" if scale_rewards == "batch" else "group"
    return group_advantages(rewards, group_size, kind, beta=softmax_beta, eps=eps, scale=scale)


def group_reward_std(rewards: Tensor, group_size: int) -> Tensor:
    """Mean over groups of each group's (unbiased) reward std: (N,) → 0-dim. 0 when every group is constant."""
    return rewards.view(-1, group_size).float().std(dim=1).mean()


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, epsilon: float = 0.2,
              epsilon_high: float | None = None, agg: str = "token-mean", max_len: int | None = None,
              num_items: float | Tensor | None = None, beta: float = 0.0, ref_logp: Tensor | None = None,
              kl_estimator: str = "k3") -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO objective (DeepSeekMath eq. 3 with our aggregation modes), negated for minimisation.

    ``L = agg_t(−min(ρ_t Â, clip(ρ_t, 1 − ε, 1 + ε_high) Â) + β · KL_t)``, ``ρ_t = exp(log π_θ − log π_old)``,
    ``KL_t`` the per-token estimator ``kl_estimator`` of KL(π_θ ‖ π_ref) (k3: ``π_ref/π_θ − log(π_ref/π_θ) − 1``,
    eq. 4). The KL term is aggregated like the surrogate (as TRL does). ``agg``, ``max_len`` and ``num_items``
    as in :func:`align.losses.aggregate`.

    Shapes: logp, old_logp, mask, ref_logp (B, T); advantages (B,) per completion. Returns (loss, detached
    stats: policy_loss, clip_frac, approx_kl, ratio_mean, and kl_penalty when beta > 0)."""
    pg, stats = clipped_surrogate_loss(logp, old_logp, advantages, mask, epsilon=epsilon,
                                       epsilon_high=epsilon_high, agg=agg, max_len=max_len, num_items=num_items)
    stats = {"policy_loss": pg.detach(), **stats}
    loss = pg
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = aggregate(kl_estimate(logp, ref_logp, kl_estimator), mask, agg, max_len=max_len, num_items=num_items)
        loss = loss + beta * kl
        stats["kl_penalty"] = kl.detach()
    return loss, stats


def rows_with_gradient(advantages: Tensor, beta: float) -> Tensor:
    """Indices (M,) of the completions whose loss terms can have a nonzero gradient: all of them when beta > 0,
    else those with a nonzero advantage (a zero advantage makes the clipped surrogate 0 for every ratio)."""
    if beta:
        return torch.arange(advantages.shape[0], device=advantages.device)
    return torch.nonzero(advantages != 0).flatten()


def group_comparisons(labels: Sequence[float], texts: Sequence[str], group_size: int
                      ) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Ranked comparisons made from groups: for each group whose labels are not all equal, (rows of its distinct
    completions — the first row of each distinct text —, (better, worse) pairs as positions in that list), a
    pair for every two completions with different labels (higher is better). Identical texts get one row, so
    no pair compares a completion with itself.

    labels and texts: N values in contiguous groups of group_size."""
    from .reward import ranked_pairs

    out = []
    for g in range(len(texts) // group_size):
        rows, seen = [], set()
        for i in range(g * group_size, (g + 1) * group_size):
            if texts[i] not in seen:
                seen.add(texts[i])
                rows.append(i)
        pairs = ranked_pairs([-float(labels[i]) for i in rows])  # rank 1 = best: the highest label
        if pairs:
            out.append((rows, pairs))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the trained module: each prompt encoded once for all its completions, in training forwards too


class GroupLM(SelectiveLM):
    """A :class:`align.models.SelectiveLM` whose training forward encodes each distinct prompt once.

    Called as a SelectiveLM (``input_ids, select, attention_mask, position_ids``) it is one. Called with
    ``completion_ids`` it takes the U distinct prompts ``input_ids``/``attention_mask`` (U, P) (left-padded), the
    B completions ``completion_ids``/``completion_mask`` (B, C) (right-padded) and ``prompt_index`` (B,) long (the
    prompt of each completion), runs the prompts through the model once with a KV cache, gathers that cache to
    the B rows (a differentiable index, so gradients reach the prompt's computation from every completion) and
    runs the completions on top of it. It returns the logits (N, V) at the N valid completion tokens in
    row-major order — the same positions and values (up to float rounding) as ``SelectiveLM`` on the
    concatenated ``sequence_inputs``, with the prompt tokens computed U times instead of B times.

    Completion token 0 is predicted from the prompt's last hidden state, token t > 0 from completion token t − 1,
    at position ids that continue the prompt's real tokens; tokens after a completion's EOS are masked keys that
    no valid token can see (causal attention)."""

    def forward(self, input_ids: Tensor, select: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, return_hidden: bool = False,
                completion_ids: Tensor | None = None, completion_mask: Tensor | None = None,
                prompt_index: Tensor | None = None):
        if completion_ids is None:
            return super().forward(input_ids, select, attention_mask, position_ids, return_hidden)
        import inspect

        from ..rollout import new_cache

        backbone, head = lm_parts(self.model)
        pmask = attention_mask.long()
        ppos = position_ids_from_mask(pmask)
        cache, _ = new_cache(self.model)
        arg = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
        out = backbone(input_ids=input_ids, attention_mask=pmask, position_ids=ppos, use_cache=True,
                       **{arg: cache})
        h_prompt = (out[0] if isinstance(out, tuple) else out.last_hidden_state)[:, -1]  # (U, H)
        parts = [h_prompt[prompt_index].unsqueeze(1)]
        c = completion_ids.shape[1]
        if c > 1:
            cache.batch_select_indices(prompt_index)
            att = torch.cat([pmask[prompt_index], completion_mask[:, :-1].long()], dim=1)
            pos = ppos[prompt_index, -1:] + 1 + torch.arange(c - 1, device=ppos.device)
            out = backbone(input_ids=completion_ids[:, :-1], attention_mask=att, position_ids=pos, use_cache=True,
                           **{arg: cache})
            parts.append(out[0] if isinstance(out, tuple) else out.last_hidden_state)
        hidden = torch.cat(parts, dim=1)[completion_mask.bool()]  # (N, H)
        return _final_logits(unwrap_peft(self.model), head(hidden))


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


class GroupSampler(RolloutSampler):
    """The shared :class:`align.trainers.rl.RolloutSampler` with a reference forward that, like the policy's
    training forward, encodes each prompt once for its whole group (:class:`GroupLM`)."""

    def _ref_logprobs(self, r: Rollout) -> Tensor:
        g = r.group_size
        first = torch.arange(0, len(r), g, device=r.prompt_ids.device)
        prompt_index = torch.arange(len(r), device=r.prompt_ids.device) // g
        with self.reference.active() as ref:
            logits = GroupLM(ref.model)(r.prompt_ids[first], attention_mask=r.prompt_mask[first],
                                        completion_ids=r.completion_ids, completion_mask=r.completion_mask,
                                        prompt_index=prompt_index)
        return logprobs_from_selected(logits, r.completion_ids, r.completion_mask, self.cfg.temperature)[0]


# ---------------------------------------------------------------------------------------------------------------
# iterative GRPO: the reference reset and the reward model that keeps learning


def merged_copy(policy: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen copy of a causal LM with its LoRA adapter (if any) merged into the weights."""
    snap = copy.deepcopy(policy)
    if hasattr(snap, "merge_and_unload"):
        snap = snap.merge_and_unload()
    return snap.to(dtype).eval().requires_grad_(False)


class ReferenceKeeper:
    """Makes the reference the current policy every `every` steps (DeepSeekMath Algorithm 1, line 3) and
    checkpoints its weights once it is no longer the initial model."""

    def __init__(self, reference: Reference, policy: nn.Module, every: int, dtype: torch.dtype):
        self.reference, self.policy, self.every, self.dtype = reference, policy, every, dtype
        self.replaced = False

    def maybe_reset(self, step: int) -> bool:
        if not self.every or step == 0 or step % self.every:
            return False
        self.reset()
        return True

    def reset(self, state: dict[str, Tensor] | None = None) -> None:
        ref = self.reference
        plain = not hasattr(self.policy, "merge_and_unload")
        if state is None and plain and ref.lm is not None and self.replaced:
            ref.lm.model.load_state_dict(self.policy.state_dict())  # in place: no new allocation
        else:
            model = merged_copy(self.policy, self.dtype)
            if state is not None:
                model.load_state_dict(state)
            ref.lm, ref.adapter_host = SelectiveLM(model), None
        self.replaced = True

    def state_dict(self) -> dict[str, Any]:
        if not self.replaced:
            return {}
        return {"weights": {k: v.detach().cpu() for k, v in self.reference.lm.model.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("weights") is not None:
            self.reset(state["weights"])


class RewardModelTrainer:
    """The reward model of the ``reward_model`` source, trained during RL (DeepSeekMath Algorithm 1, line 12).

    Each step: comparisons from the step's groups (:func:`group_comparisons` on the rm_label_funcs scores, RM
    token ids of prompt + completion + EOS), plus replayed original comparisons — ``round(n·ratio/(1 − ratio))``
    drawn with a generator seeded by (seed, step, rank) — make one Bradley–Terry AdamW step, each comparison
    weighing the same (:func:`align.trainers.reward.comparison_loss`). Gradients are averaged over processes.
    The scorer keeps scoring with the updated weights."""

    def __init__(self, scorer, label_sources: dict, replay: list, replay_ratio: float, lr: float, run: Run,
                 max_grad_norm: float, seed: int, weights_dtype: torch.dtype):
        from ..heads import ScalarModel

        self.scorer, self.label_sources, self.replay, self.ratio = scorer, label_sources, replay, replay_ratio
        self.run, self.max_grad_norm, self.seed = run, max_grad_norm, seed
        scorer.model.to(weights_dtype)
        disable_dropout(scorer.model)
        self.net = ScalarModel(scorer.model)
        params = [p for p in scorer.model.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def comparisons(self, r: Rollout) -> list:
        from ..rollout import score
        from .reward import Comparison

        total, _ = score(r.prompts, r.texts, r.columns, r.eos, self.label_sources)
        out = []
        for rows, pairs in group_comparisons(total.tolist(), r.texts, r.group_size):
            seqs = [self.scorer.encode(r.prompts[i], r.texts[i]) for i in rows]
            out.append(Comparison(seqs, pairs, [0.0] * len(pairs)))
        return out

    def __call__(self, step: int, r: Rollout) -> dict[str, float]:
        from .reward import batch_loss, collate

        run = self.run
        new = self.comparisons(r)
        n_replay = 0
        if new and self.replay and self.ratio > 0:
            n_replay = int(round(len(new) * self.ratio / (1.0 - self.ratio)))
        g = make_generator("cpu", self.seed, step, run.rank, "rm_replay")
        picks = torch.randint(len(self.replay), (n_replay,), generator=g).tolist() if n_replay else []
        comps = new + [self.replay[i] for i in picks]
        n_new, n_all = run.reduce_sum([float(len(new)), float(len(comps))])
        if n_new == 0:
            return {"rm_new_comparisons": 0.0, "rm_replay_comparisons": 0.0}
        model = self.net
        model.train()
        model.requires_grad_(True)
        stats = [0.0] * 7
        if comps:
            with run.accelerator.autocast():
                loss, sums = batch_loss(model, collate(comps, self.scorer.tokenizer.pad_token_id),
                                        run.device, 0.0)
            (loss / n_all).backward()
            stats = [float(loss.detach())] + sums
        params = [p for p in model.parameters()]
        if run.world > 1:
            import torch.distributed as dist

            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
        if self.max_grad_norm and self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        model.eval()
        model.requires_grad_(False)
        loss_sum, n_pairs, correct, *_ = run.reduce_sum(stats)
        return {"rm_loss": loss_sum / n_all, "rm_accuracy": correct / max(n_pairs, 1.0),
                "rm_new_comparisons": n_new, "rm_replay_comparisons": n_all - n_new}

    def state_dict(self) -> dict[str, Any]:
        return {"model": {k: v.detach().cpu() for k, v in self.scorer.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scorer.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def save(self, path: str) -> None:
        self.scorer.model.save_pretrained(path, safe_serialization=True)
        self.scorer.tokenizer.save_pretrained(path)


class GRPOState:
    """What a GRPO checkpoint holds besides the policy, its optimizer and schedule (registered with accelerate):
    the reference once it has been reset, and the reward model being trained with its optimizer."""

    def __init__(self, keeper: ReferenceKeeper | None, rm: RewardModelTrainer | None):
        self.keeper, self.rm = keeper, rm

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.keeper.state_dict() if self.keeper else {},
                "reward_model": self.rm.state_dict() if self.rm else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.keeper is not None:
            self.keeper.load_state_dict(state.get("reference") or {})
        if self.rm is not None and state.get("reward_model") is not None:
            self.rm.load_state_dict(state["reward_model"])


# ---------------------------------------------------------------------------------------------------------------
# checks


def label_specs(cfg: GRPOConfig) -> list[str]:
    return list(cfg.rm_label_funcs or cfg.gold_reward_funcs)


def check_grpo_config(cfg: GRPOConfig) -> None:
    """One-line errors for GRPO settings that cannot work, before anything is loaded or written."""
    check_rl_config(cfg)
    g = cfg.num_generations
    if g < 2:
        raise AlignError(f"num_generations must be >= 2 (a group needs two completions to compare), got {g}")
    if cfg.per_device_train_batch_size < g or cfg.per_device_train_batch_size % g:
        raise AlignError(f"per_device_train_batch_size={cfg.per_device_train_batch_size} must be a multiple of "
                         f"num_generations={g} (it counts completions, as in TRL)")
    if cfg.gradient_accumulation_steps < 1 or cfg.num_iterations < 1:
        raise AlignError("gradient_accumulation_steps and num_iterations must be >= 1")
    if cfg.epsilon <= 0 or cfg.epsilon_high < 0:
        raise AlignError("epsilon must be > 0 and epsilon_high >= 0 (0: equal to epsilon)")
    if cfg.scale_rewards == "batch" and cfg.advantage != "zscore":
        raise AlignError(f"scale_rewards=batch divides zscore advantages only; advantage={cfg.advantage} has no "
                         f"std to scale (use group or none)")
    if cfg.advantage == "softmax" and cfg.softmax_beta <= 0:
        raise AlignError(f"softmax_beta must be > 0, got {cfg.softmax_beta}")
    if cfg.ref_update_every < 0:
        raise AlignError(f"ref_update_every must be >= 0, got {cfg.ref_update_every}")
    if cfg.ref_update_every and cfg.beta == 0:
        raise AlignError("ref_update_every needs beta > 0 (with beta = 0 there is no reference to update)")
    if cfg.rm_update:
        if not cfg.reward_model:
            raise AlignError("rm_update needs reward_model (the reward model to keep training)")
        if not label_specs(cfg):
            raise AlignError("rm_update needs rm_label_funcs (or gold_reward_funcs) to rank completions, e.g. "
                             "exact_match")
        if not 0 <= cfg.rm_replay_ratio < 1:
            raise AlignError(f"rm_replay_ratio must be in [0, 1), got {cfg.rm_replay_ratio}")
        if cfg.rm_replay_ratio > 0 and not cfg.rm_replay_data:
            raise AlignError("rm_replay_ratio > 0 needs rm_replay_data (the original comparisons to replay); "
                             "set rm_replay_ratio 0 to train on new comparisons only")
        if cfg.rm_learning_rate <= 0:
            raise AlignError(f"rm_learning_rate must be > 0, got {cfg.rm_learning_rate}")
        for spec in label_specs(cfg):
            load_function(spec)
    elif cfg.rm_replay_data or cfg.rm_label_funcs:
        raise AlignError("rm_replay_data / rm_label_funcs are set but rm_update is false")


def load_replay(cfg: GRPOConfig) -> list:
    """The replayed comparisons, tokenized with the reward model's tokenizer (bad rows are errors)."""
    if not (cfg.rm_update and cfg.rm_replay_data and cfg.rm_replay_ratio > 0):
        return []
    from .reward import tokenize_comparisons

    tok = load_tokenizer(cfg.reward_model, cfg.trust_remote_code)
    out = []
    for src in [s.strip() for s in cfg.rm_replay_data.split(",") if s.strip()]:
        comps, _ = tokenize_comparisons(read_rows(src, cfg.train_split), tok, cfg.max_length)
        out += comps
    return out


# ---------------------------------------------------------------------------------------------------------------
# the stage


def train_grpo(cfg: GRPOConfig) -> dict[str, float]:
    """Run GRPO as configured; returns the last logged metrics. Writes nothing before all input is valid."""
    import os

    tokenizer, data, eval_rows, eval_funcs = load_rl_inputs(cfg, check_grpo_config)
    replay = load_replay(cfg)

    seed_everything(cfg.seed)
    run = Run(cfg, "grpo")
    policy = prepare_model(cfg, tokenizer, run.weights_dtype)
    disable_dropout(policy)
    reference = Reference.load(cfg, policy, tokenizer, run.device) if cfg.beta > 0 else None
    keeper = None
    if reference is not None and cfg.ref_update_every:
        keeper = ReferenceKeeper(reference, policy, cfg.ref_update_every, frozen_dtype(cfg.dtype, run.device))
    sources = reward_sources(cfg, run.device)
    rm = None
    if cfg.rm_update:
        labels = {source_name(s): load_function(s) for s in label_specs(cfg)}
        rm = RewardModelTrainer(sources[REWARD_MODEL_NAME], labels, replay, cfg.rm_replay_ratio,
                                cfg.rm_learning_rate, run, cfg.max_grad_norm, cfg.seed, run.weights_dtype)
    if keeper is not None or rm is not None:
        run.accelerator.register_for_checkpointing(GRPOState(keeper, rm))  # before prepare, which may resume

    g = cfg.num_generations
    prompts_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps // g
    max_steps = resolve_max_steps(cfg, len(data), prompts_per_step * run.world)
    model = run.prepare(GroupLM(policy), max_steps)
    weights = [float(w) for w in cfg.reward_weights] or None
    sampler = GroupSampler(cfg, run, tokenizer, data, sources, weights, gold_sources(cfg), reference, g)
    sampler.global_prompts = prompts_per_step * run.world  # our batch sizes count completions
    step_fn = GRPOStep(cfg, run, model, sampler, keeper, rm)

    def eval_fn(step: int) -> dict[str, float]:
        if not run.is_main:
            return {}
        return greedy_eval(run.unwrap().model, tokenizer, eval_rows, eval_funcs, cfg.max_new_tokens,
                           cfg.per_device_eval_batch_size, cfg.eval_max_samples)

    metrics = run.train(step_fn, eval_fn if eval_rows is not None else None)
    save_final(run, run.unwrap().model, tokenizer)
    if rm is not None and run.is_main:
        rm.save(os.path.join(cfg.output_dir, "reward_model"))
    return metrics


class GRPOStep:
    """One GRPO step (reference reset, rollout, advantages, μ updates, reward-model update) for Run.train."""

    def __init__(self, cfg: GRPOConfig, run: Run, model: nn.Module, sampler: RolloutSampler,
                 keeper: ReferenceKeeper | None = None, rm: RewardModelTrainer | None = None):
        self.cfg, self.run, self.model, self.sampler, self.keeper, self.rm = cfg, run, model, sampler, keeper, rm
        self.agg = LOSS_TYPES[cfg.loss_type]
        # recomputing activations (gradient checkpointing) and a KV cache do not mix in transformers
        self.prompt_once = not cfg.gradient_checkpointing

    def __call__(self, step: int) -> dict[str, float]:
        cfg, run = self.cfg, self.run
        ref_updated = self.keeper.maybe_reset(step) if self.keeper is not None else False
        r = self.sampler(step, run.unwrap().model)
        g = r.group_size
        rewards = run.accelerator.gather(r.rewards) if run.world > 1 else r.rewards  # every process's, in order
        adv_all = grpo_advantages(rewards, g, cfg.advantage, cfg.scale_rewards, cfg.softmax_beta)
        adv = adv_all[run.rank * len(r):(run.rank + 1) * len(r)]
        with run.timer("training"):
            train_stats = self.update(step, r, adv)
        run.scheduler.step()
        rm_stats: dict[str, float] = {}
        if self.rm is not None:
            with run.timer("reward_model"):
                rm_stats = self.rm(step, r)

        mask = r.completion_mask
        local = {
            "reward": rewards.mean(), "reward_std": rewards.std(),
            "reward_group_std": group_reward_std(rewards, g), "zero_std_frac": zero_std_group_fraction(rewards, g),
            **{f"reward_{k}": v.mean() for k, v in r.reward_components.items()},
            **{f"gold_{k}": v.mean() for k, v in r.gold_rewards.items()},
            "advantage_abs_mean": adv.abs().mean(),
            "response_length": r.lengths.float().mean(), "eos_frac": r.eos.float().mean(),
        }
        if r.ref_logprobs is not None:
            kl = torch.where(mask.bool(), kl_estimate(r.logprobs, r.ref_logprobs, cfg.kl_estimator),
                             torch.zeros_like(r.logprobs))
            local.update(kl=kl.sum(-1).mean(), kl_per_token=masked_mean(kl, mask))
        names = list(local)
        summed = run.reduce_sum([float(local[k]) for k in names])
        out = {k: v / run.world for k, v in zip(names, summed)}
        out.update(train_stats)
        out.update(rm_stats)
        out["beta"] = cfg.beta
        if self.keeper is not None:
            out["ref_updated"] = float(ref_updated)
        return out

    def update(self, step: int, r: Rollout, adv: Tensor) -> dict[str, float]:
        """num_iterations optimizer updates, each over every completion of the step in
        gradient_accumulation_steps micro-batches (exact accumulation: the loss's denominator is the count over
        the whole step's batch, all processes)."""
        cfg, run = self.cfg, self.run
        (n_items,) = run.reduce_sum([float(aggregate_count(r.completion_mask, self.agg))])
        num_items = max(n_items, 1.0) / run.world
        # single process: skip completions that carry no gradient (under DDP every process must run backward)
        rows = rows_with_gradient(adv, cfg.beta) if run.world == 1 else torch.arange(len(r), device=adv.device)
        micro = [c for c in chunks(rows, cfg.gradient_accumulation_steps) if len(c)]
        token_stats = ("clip_frac", "approx_kl", "ratio_mean")
        sums: dict[str, float] = {}
        n_tok = 0.0
        norms = []
        lr = run.scheduler.get_last_lr()[0]
        self.model.train()
        for it in range(cfg.num_iterations):
            for k, idx in enumerate(micro):
                with run.no_sync(last=k == len(micro) - 1), run.accelerator.autocast():
                    stats, n_valid = self._micro_step(r, idx, adv, num_items, with_entropy=it == 0)
                for key, v in stats.items():
                    w = n_valid if key in token_stats or key == "entropy" else 1.0
                    sums[key] = sums.get(key, 0.0) + float(v) * w
                if it == 0:
                    n_tok += n_valid
            if not micro:  # nothing carries gradient: the optimizer still steps on a zero gradient, as without
                for p in self.model.parameters():  # skipping (AdamW moves by its momentum)
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
            norms.append(apply_gradients(run, cfg.max_grad_norm))
        self.model.eval()
        mu = cfg.num_iterations
        out = {}
        for key, v in sums.items():
            if key == "entropy":
                out[key] = v / max(n_tok, 1.0)
            elif key in token_stats:
                out[key] = v / max(n_tok * mu, 1.0)
            else:
                out[key] = v / mu  # micro-batch losses sum to the batch's loss
        out["loss"] = out.get("policy_loss", 0.0) + cfg.beta * out.get("kl_penalty", 0.0)
        out["learning_rate"] = lr
        if norms and norms[0] is not None:
            out["grad_norm"] = sum(norms) / len(norms)
        out["trained_frac"] = float(len(rows)) / max(len(r), 1)
        return out

    def _micro_step(self, r: Rollout, idx: Tensor, adv: Tensor, num_items: float,
                    with_entropy: bool) -> tuple[dict[str, Tensor], float]:
        cfg = self.cfg
        sub, first, prompt_index = group_inputs(r, idx, r.group_size)
        if self.prompt_once and len(first) < len(idx):
            logits = self.model(sub.prompt_ids[first], attention_mask=sub.prompt_mask[first],
                                completion_ids=sub.completion_ids, completion_mask=sub.completion_mask,
                                prompt_index=prompt_index)
        else:
            inp = sequence_inputs(sub.prompt_ids, sub.prompt_mask, sub.completion_ids, sub.completion_mask)
            logits = self.model(inp["input_ids"], select=inp["select"], attention_mask=inp["attention_mask"],
                                position_ids=inp["position_ids"])
        logp, _ = logprobs_from_selected(logits, sub.completion_ids, sub.completion_mask, cfg.temperature)
        loss, stats = grpo_loss(logp, sub.logprobs, adv[idx.to(adv.device)], sub.completion_mask,
                                epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high or None, agg=self.agg,
                                max_len=cfg.max_new_tokens, num_items=num_items, beta=cfg.beta,
                                ref_logp=sub.ref_logprobs, kl_estimator=cfg.kl_estimator)
        self.run.backward(loss)
        if with_entropy:
            with torch.no_grad():
                z = logits.detach().float()
                stats["entropy"] = entropy_from_logits(z if cfg.temperature == 1.0 else z / cfg.temperature).mean()
        return stats, float(sub.completion_mask.sum())
