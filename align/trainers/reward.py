"""Reward-model stage: a scalar head on a causal LM, trained on comparisons with the Bradley–Terry loss.

    align rm --model SFT_DIR --train_data prefs.jsonl [--eval_data prefs_eval.jsonl] --output_dir OUT

Data (one comparison per row; both kinds may be mixed, and ``train_data`` may list several files separated by
commas, e.g. ``prefs.jsonl,ranked.jsonl``):

* pairwise: ``prompt`` + ``chosen`` + ``rejected`` (strings, or chat message lists), optional ``margin``
  (column named by ``margin_column``);
* ranked (InstructGPT): ``prompt`` + ``responses`` ordered best first, or with a ``ranking`` column (one rank
  per response, 1 = best; equal ranks make no pair). A list of K responses gives every one of its
  K(K-1)/2 (better, worse) pairs; each response is run through the model once per batch, however many pairs
  it is in. A ``margin`` on a ranked row applies to each of its pairs.

Loss of one optimizer step (:func:`align.losses.comparison_loss`): each comparison (row) weighs the same, whatever its
number of pairs, so a large K does not outweigh other prompts; the step's loss is the mean over the rows of the
global batch (all processes, all accumulation micro-batches), which makes gradient accumulation exact.

Bad rows stop the run before anything is written, with a one-line error naming file, line and field: missing
or empty prompt / response, a non-numeric margin or ranking, a sequence longer than ``max_length``, a ranked
list with fewer than two responses. Rows whose responses are identical (no preference to learn) and ranked
lists whose ranks are all equal are errors too, or, with ``on_bad_pair: skip``, dropped and counted (the count is
printed and returned as ``skipped_rows``).

Output: ``AutoModelForSequenceClassification`` (``num_labels=1``) saved with ``save_pretrained`` plus the
tokenizer (a LoRA run saves the adapter and the trained ``score`` head; ``align.heads.load_scalar_model`` and
``align.scoring.RewardModelScorer`` load both kinds).
"""

from __future__ import annotations

import torch

from ..comparisons import Comparison, ComparisonStats, batch_loss, collate, load_stage_comparisons
from ..config import RMConfig
from ..data import batched
from ..heads import ScalarModel, load_trained_scalar_model, supports_segment_mask
from ..models import load_tokenizer
from .checkpoints import check_output_dir
from .loop import Run, resolve_max_steps, seed_everything
from .outputs import save_final


def train_rm(cfg: RMConfig) -> dict[str, float]:
    """Train a reward model as configured; returns the last logged metrics (plus ``skipped_rows``). Nothing is
    written before the model and every input row have been checked."""
    check_output_dir(cfg)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    train, evals, skipped = load_stage_comparisons(cfg, tokenizer, "rm")

    seed_everything(cfg.seed)
    run = Run(cfg, "rm")
    model = load_trained_scalar_model(cfg.model, cfg, run.weights_dtype, tokenizer.pad_token_id)
    max_steps = resolve_max_steps(cfg, len(train), run.global_batch)
    rm = run.prepare(ScalarModel(model), max_steps)
    pad_id = tokenizer.pad_token_id
    coef = cfg.center_rewards_coefficient
    share = cfg.share_prompt and supports_segment_mask(model)

    def step_fn(step: int) -> dict[str, float]:
        out, stats, n = run.step_over_examples(
            step, len(train), rm, lambda idx: batch_loss(rm, collate([train[i] for i in idx], pad_id, share),
                                                         run.device, coef), ComparisonStats())
        out.update(stats.summary(n))
        out["pairs"] = stats.pairs
        return out

    def eval_fn(step: int) -> dict[str, float]:
        return evaluate_comparisons(rm, evals, run, cfg.per_device_eval_batch_size, pad_id, coef, share)

    metrics = run.train(step_fn, eval_fn if evals else None)
    save_final(run, run.unwrap().model, tokenizer)
    metrics["skipped_rows"] = skipped
    return metrics


@torch.no_grad()
def evaluate_comparisons(model, comps: list[Comparison], run: Run, batch_size: int, pad_id: int,
                         center_coef: float = 0.0, share_prompt: bool = False) -> dict[str, float]:
    """eval_loss, eval_accuracy and reward statistics over `comps`, sharded over processes."""
    model.eval()
    stats = ComparisonStats()
    for chunk in batched(comps[run.rank::run.world], batch_size):
        with run.accelerator.autocast():
            _, s = batch_loss(model, collate(list(chunk), pad_id, share_prompt), run.device, center_coef)
        stats = stats + s
    model.train()
    return stats.reduced(run.reduce_sum).summary(len(comps), prefix="eval_")
