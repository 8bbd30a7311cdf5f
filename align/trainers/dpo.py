"""Direct preference optimisation (`align dpo --config FILE`): the policy trained on comparisons against a frozen
reference, no reward model and no sampling.

    align dpo --model SFT_DIR --train_data prefs.jsonl[,ranked.jsonl] [--eval_data prefs_eval.jsonl] --output_dir OUT

Data: the reward-model stage's comparisons (:mod:`align.comparisons`): ``prompt`` + ``chosen`` + ``rejected``, or
``prompt`` + ``responses`` ranked best first (or with a ``ranking`` column), optional ``margin``. A ranked list of
K responses gives its K(K−1)/2 pairs, which share their comparison's weight.

Loss (:func:`align.losses.dpo_loss`, ``loss_type`` by TRL's names from :data:`align.losses.DPO_LOSSES`): sigmoid
(DPO), robust, hinge, ipo on the log-ratios ``log π_θ(y|x) − log π_ref(y|x)`` of whole responses; simpo and orpo
need no reference. ``rpo_alpha`` adds the chosen response's token NLL. The step's loss is the mean over the
comparisons of the global batch (all processes and accumulation micro-batches), so accumulation is exact.

What is computed (never what is thrown away):

* each comparison is one row, its prompt once and all its responses after it, each response attending to the
  prompt and itself through a 4-D mask with positions continuing the prompt (``share_prompt``; separate
  left-padded sequences with flash-attention); the output head runs only at positions that predict a response
  token, the prompt's last one once for all responses (:func:`align.comparisons.collate_logps`);
* the reference's log-probabilities of every response are computed once before training
  (``precompute_ref_log_probs``), in fixed chunks spread over the processes, and cached in
  ``output_dir/ref_log_probs.safetensors`` keyed by a fingerprint of the reference weights and the tokenized data
  (a resumed run reads them back). The default reference is the starting model, so the precomputation runs on the
  policy itself before its first update and no second copy is loaded; a separate ``ref_model`` is freed after
  it. An epoch then costs one policy forward and backward per comparison. Without precomputation the reference
  runs beside the policy on every micro-batch (with LoRA: the policy with its adapter disabled).

Metrics (TRL's, with underscores): loss, rewards_chosen, rewards_rejected, rewards_accuracies, rewards_margins,
logps_chosen, logps_rejected, nll_loss, pairs; eval_* of the same on eval_data.

Bad input stops the run before anything is written, with one line naming file, line and field (as ``align rm``).
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import nn

from ..comparisons import Comparison, PreferenceStats, collate_logps, load_stage_comparisons, response_logps
from ..config import AlignError, DPOConfig
from ..heads import supports_segment_mask
from ..losses import REFERENCE_FREE_DPO_LOSSES, dpo_args_problem, dpo_loss
from ..models import SelectiveLM, disable_dropout, load_tokenizer, load_trained_lm
from .checkpoints import check_output_dir, resolve_checkpoint
from .loop import Run, resolve_max_steps, seed_everything
from .outputs import save_final
from .rl import Reference

CACHE_FILE = "ref_log_probs.safetensors"
Tensor = torch.Tensor


def check_dpo_config(cfg: DPOConfig) -> None:
    """One-line errors for settings that cannot train, before anything is read or written."""
    problem = dpo_args_problem(cfg.loss_type, cfg.beta, cfg.label_smoothing)
    if problem:
        raise AlignError(problem)
    if cfg.rpo_alpha < 0:
        raise AlignError(f"rpo_alpha must be >= 0, got {cfg.rpo_alpha}")
    if cfg.per_device_train_batch_size < 1 or cfg.per_device_eval_batch_size < 1:
        raise AlignError("per_device_train_batch_size and per_device_eval_batch_size must be >= 1")


def uses_reference(cfg) -> bool:
    return not getattr(cfg, "reference_free", False) and cfg.loss_type not in REFERENCE_FREE_DPO_LOSSES


def train_dpo(cfg: DPOConfig) -> dict[str, float]:
    """Train the policy as configured; returns the last logged metrics (plus ``skipped_rows``). Nothing is written
    before the config and every input row have been checked."""
    check_output_dir(cfg)
    check_dpo_config(cfg)
    resolve_checkpoint(cfg)  # a missing checkpoint fails here, before the reference cache is written
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    train, evals, skipped = load_stage_comparisons(cfg, tokenizer, "dpo")

    seed_everything(cfg.seed)
    run = Run(cfg, "dpo")
    policy = load_trained_lm(cfg, tokenizer, run.weights_dtype)
    disable_dropout(policy)
    pad_id = tokenizer.pad_token_id
    share = cfg.share_prompt and supports_segment_mask(policy)
    data = {"train": train, **({"eval": evals} if evals else {})}
    cached: dict[str, RefLogps] = {}
    live: Reference | None = None
    if uses_reference(cfg) and cfg.precompute_ref_log_probs:
        cached = reference_log_probs(cfg, run, policy, tokenizer, data, share)
    elif uses_reference(cfg):
        live = Reference.load(cfg, policy, tokenizer, run)

    max_steps = resolve_max_steps(cfg, len(train), run.global_batch)
    model = run.prepare(SelectiveLM(policy), max_steps)

    def loss_of(lm: nn.Module, comps: list[Comparison], name: str, idx: list[int]):
        batch = collate_logps(comps, pad_id, share)
        dev = run.device
        if name in cached:
            ref = cached[name].of(idx).to(dev)
        elif live is not None:
            with torch.no_grad(), live.active() as ref_lm:
                ref = response_logps(ref_lm, batch, dev)
        else:
            ref = torch.zeros(len(batch["lengths"]), device=dev)
        logps = response_logps(lm, batch, dev)
        loss, pairs = dpo_loss(cfg.loss_type, logps, ref, batch["lengths"].to(dev), batch["better"].to(dev),
                               batch["worse"].to(dev), batch["pair_group"].to(dev), batch["num_groups"],
                               beta=cfg.beta, label_smoothing=cfg.label_smoothing, gamma=cfg.simpo_gamma,
                               margins=batch["margins"].to(dev), rpo_alpha=cfg.rpo_alpha)
        return loss, PreferenceStats.of(loss, pairs)

    def step_fn(step: int) -> dict[str, float]:
        out, stats, n = run.step_over_examples(
            step, len(train), model, lambda idx: loss_of(model, [train[i] for i in idx], "train", idx),
            PreferenceStats())
        out.update(stats.summary(n))
        out["pairs"] = stats.pairs
        return out

    @torch.no_grad()
    def eval_fn(step: int) -> dict[str, float]:
        model.eval()
        stats = PreferenceStats()
        for chunk in chunks(len(evals), cfg.per_device_eval_batch_size, run.rank, run.world):
            with run.accelerator.autocast():
                stats = stats + loss_of(model, [evals[i] for i in chunk], "eval", chunk)[1]
        model.train()
        return stats.reduced(run.reduce_sum).summary(len(evals), prefix="eval_")

    metrics = run.train(step_fn, eval_fn if evals else None)
    save_final(run, run.unwrap().model, tokenizer)
    metrics["skipped_rows"] = skipped
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# reference log-probabilities, computed once


class RefLogps:
    """The reference's summed log-probabilities of every response of a list of comparisons, flat in comparison
    order (``values`` (total responses,) float32), with each comparison's offset into them."""

    def __init__(self, comps: list[Comparison], values: Tensor):
        sizes = torch.tensor([len(c.sequences) for c in comps])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        if len(values) != int(self.offsets[-1]):
            raise ValueError(f"{len(values)} reference values for {int(self.offsets[-1])} responses")
        self.values = values

    def of(self, idx: list[int]) -> Tensor:
        """The values of comparisons ``idx``, in the order :func:`align.comparisons.collate` lays responses out."""
        return torch.cat([self.values[self.offsets[i]:self.offsets[i + 1]] for i in idx])


def chunks(n: int, size: int, rank: int, world: int) -> list[list[int]]:
    """Consecutive chunks of ``size`` comparisons of ``range(n)``, dealt round-robin to processes: this process's
    share. The chunks do not depend on the number of processes, so neither do the values computed on them."""
    return [list(range(s, min(s + size, n))) for k, s in enumerate(range(0, n, size)) if k % world == rank]


@torch.no_grad()
def compute_ref_logps(lm: nn.Module, comps: list[Comparison], run: Run, batch_size: int, pad_id: int,
                      share: bool) -> Tensor:
    """Summed log-probabilities (total responses,) float32 of every response under ``lm`` (SelectiveLM-like),
    computed in chunks spread over the processes and summed over them."""
    probe = RefLogps(comps, torch.zeros(sum(len(c.sequences) for c in comps)))
    out = torch.zeros(len(probe.values), dtype=torch.float32, device=run.device)
    for chunk in chunks(len(comps), batch_size, run.rank, run.world):
        with run.accelerator.autocast():
            v = response_logps(lm, collate_logps([comps[i] for i in chunk], pad_id, share), run.device)
        out[int(probe.offsets[chunk[0]]):int(probe.offsets[chunk[-1] + 1])] = v.float()
    return run.all_sum(out).cpu()


def fingerprint(ref: nn.Module, data: dict[str, list[Comparison]], cfg) -> str:
    """What the cached values depend on: a sample of every reference weight (LoRA adapters excluded: the
    reference is the base), the dtype setting, and the tokenized comparisons."""
    h = hashlib.sha256()
    for name, p in ref.named_parameters():
        if "lora_" in name:
            continue
        flat = p.detach().flatten()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(flat[::max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    h.update(cfg.dtype.encode())
    for name in sorted(data):
        h.update(name.encode())
        h.update(json.dumps([c.sequences for c in data[name]]).encode())
    return h.hexdigest()


def reference_log_probs(cfg: DPOConfig, run: Run, policy: nn.Module, tokenizer, data: dict[str, list[Comparison]],
                        share: bool) -> dict[str, RefLogps]:
    """The reference's log-probabilities of the train (and eval) responses: read from output_dir's cache when its
    fingerprint matches, else computed (by the untrained policy itself for the default reference, before
    `Run.prepare` restores any checkpoint) and cached there."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    default = not cfg.ref_model or cfg.ref_model == cfg.model
    policy.to(run.device)
    ref = (Reference(None, adapter_host=policy) if cfg.use_lora else Reference(SelectiveLM(policy))) if default \
        else Reference.load(cfg, policy, tokenizer, run)
    key = fingerprint(policy if default or ref.lm is None else ref.lm.model, data, cfg)
    path = os.path.join(cfg.output_dir, CACHE_FILE)
    values: dict[str, Tensor] = {}
    if os.path.isfile(path):
        try:
            with safe_open(path, framework="pt") as fh:
                if (fh.metadata() or {}).get("fingerprint") == key and set(fh.keys()) == set(data):
                    values = {k: fh.get_tensor(k) for k in data}
        except Exception:  # an unreadable cache is recomputed
            values = {}
    if not values:
        was_training = policy.training
        policy.eval()
        with ref.active() as lm:
            values = {k: compute_ref_logps(lm, comps, run, cfg.per_device_eval_batch_size,
                                           tokenizer.pad_token_id, share) for k, comps in data.items()}
        policy.train(was_training)
        if run.is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            tmp = path + ".tmp"
            save_file({k: v.contiguous() for k, v in values.items()}, tmp, metadata={"fingerprint": key})
            os.replace(tmp, path)
        run.accelerator.wait_for_everyone()
    del ref  # a separately loaded reference is freed here
    return {k: RefLogps(data[k], values[k]) for k in data}
