"""Supervised fine-tuning: next-token cross-entropy on completion (or assistant) tokens.

The loss of an optimizer step is the mean over every trained token of the global batch (all processes, all
accumulation micro-batches): each micro-batch contributes its summed token loss divided by the global token
count, so the split into processes and micro-batches does not change the gradient.
"""

from __future__ import annotations

import torch

from ..config import SFTConfig
from ..data import (IGNORE_INDEX, SFTExample, batched, pack_examples, pack_rows, pad_examples, read_rows,
                    tokenize_sft)
from ..models import LogprobRequest, SelectiveLM, load_tokenizer, load_trained_lm
from .checkpoints import check_output_dir
from .loop import Run, resolve_max_steps, seed_everything
from .outputs import save_final


def layout_cost(rows: int, width: int, hidden_size: int) -> int:
    """Relative compute of a batch of `rows` rows of `width` tokens through a transformer of width h: per token
    ~12h² multiply-adds in the linear layers, per pair of tokens in a row ~4h in attention (a packed row's
    block-diagonal mask does not skip the masked blocks on most kernels)."""
    return rows * width * (12 * hidden_size ** 2 + 4 * hidden_size * width)


def row_capacity(lengths: list[int], max_length: int, hidden_size: int) -> int:
    """The packed row length that makes a batch of sequences of `lengths` cheapest (:func:`layout_cost`), or 0
    when one right-padded row per sequence is cheaper. Candidates: the longest sequence times 1, 2, 4, ... and
    max_length: rows as long as max_length waste attention on short sequences, rows as short as the longest
    one can leave many rows part-empty."""
    longest = max(lengths)
    best, best_cost = 0, layout_cost(len(lengths), longest, hidden_size)
    capacity = longest
    while True:
        capacity = min(capacity, max_length)
        rows, width = pack_rows(lengths, capacity)
        cost = layout_cost(len(rows), width, hidden_size)
        if cost < best_cost:
            best, best_cost = capacity, cost
        if capacity >= max_length:
            return best
        capacity *= 2


def collate(examples: list[SFTExample], packing: bool, max_length: int, pad_id: int,
            hidden_size: int = 0) -> dict[str, torch.Tensor]:
    """The batch of `examples`: right-padded rows, or (packing) sequences packed into rows of the cheapest
    length for a model of width `hidden_size` (:func:`row_capacity`; 0: rows of max_length). Every layout gives
    the same loss."""
    if not packing:
        return pad_examples(examples, pad_id)
    capacity = row_capacity([len(ex.input_ids) for ex in examples], max_length, hidden_size) if hidden_size \
        else max_length
    return pack_examples(examples, capacity, pad_id) if capacity else pad_examples(examples, pad_id)


def num_targets(ex: SFTExample) -> int:
    return sum(1 for x in ex.labels[1:] if x != IGNORE_INDEX)


def token_loss_sum(model, batch: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's target tokens and their count: minus the log-probabilities of the
    targets, asked of the SelectiveLM, which runs the output head only at those tokens and, when the (tokens x
    vocabulary) logits would be large, in chunks of rows without ever holding them whole (`align.chunked`)."""
    labels = batch["labels"].to(device)
    select = labels != IGNORE_INDEX
    out = model(batch["input_ids"].to(device), select=select,
                attention_mask=batch["attention_mask"].to(device) if "attention_mask" in batch else None,
                position_ids=batch["position_ids"].to(device), logprobs=LogprobRequest(labels[select]))
    return -out.logp.float().sum(), int(select.sum())


def train_sft(cfg: SFTConfig) -> dict[str, float]:
    """Run SFT as configured; returns the last logged metrics. Writes nothing before all input is valid."""
    check_output_dir(cfg)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    kw = dict(max_length=cfg.max_length, completion_only=cfg.completion_only_loss, text_field=cfg.text_field,
              add_eos=cfg.add_eos)
    train = tokenize_sft(read_rows(cfg.train_data, cfg.train_split, cfg.column_map), tokenizer, **kw)
    evals = tokenize_sft(read_rows(cfg.eval_data, cfg.eval_split, cfg.column_map), tokenizer, **kw) \
        if cfg.eval_data else None

    seed_everything(cfg.seed)
    run = Run(cfg, "sft")
    model = load_trained_lm(cfg, tokenizer, run.weights_dtype)
    max_steps = resolve_max_steps(cfg, len(train), run.global_batch)
    lm = run.prepare(SelectiveLM(model), max_steps)
    pad_id = tokenizer.pad_token_id
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)
    counts = [num_targets(ex) for ex in train]

    def step_fn(step: int) -> dict[str, float]:
        indices, micro = run.micro_batches(step, len(train))
        total_tokens = sum(counts[i] for i in indices)  # known to every process without communication
        lm.train()
        loss_sum = 0.0
        for idx in run.accumulate(micro):
            batch = collate([train[i] for i in idx], cfg.packing, cfg.max_length, pad_id, hidden)
            loss, _ = token_loss_sum(lm, batch, run.device)
            run.backward(loss * run.world / total_tokens)
            loss_sum += float(loss.detach())
        out = run.optimizer_step()
        (loss_sum,) = run.reduce_sum([loss_sum])
        out.update(loss=loss_sum / total_tokens, tokens=float(total_tokens))
        return out

    def eval_fn(step: int) -> dict[str, float]:
        return {"eval_loss": eval_loss(lm, evals, run, cfg, pad_id, hidden)}

    metrics = run.train(step_fn, eval_fn if evals else None)
    save_final(run, run.unwrap().model, tokenizer)
    return metrics


@torch.no_grad()
def eval_loss(lm, examples: list[SFTExample], run: Run, cfg, pad_id: int, hidden_size: int = 0) -> float:
    """Mean token cross-entropy over `examples`, sharded over processes."""
    lm.eval()
    mine = examples[run.rank::run.world]
    loss_sum, count = 0.0, 0
    for chunk in batched(mine, cfg.per_device_eval_batch_size):
        batch = collate(list(chunk), cfg.packing, cfg.max_length, pad_id, hidden_size)
        with run.accelerator.autocast():
            loss, n = token_loss_sum(lm, batch, run.device)
        loss_sum += float(loss)
        count += n
    loss_sum, count = run.reduce_sum([loss_sum, float(count)])
    lm.train()
    return loss_sum / max(count, 1.0)
