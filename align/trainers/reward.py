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

Loss of one optimizer step (see :func:`comparison_loss`): each comparison (row) weighs the same, whatever its
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

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..config import AlignError, RMConfig
from ..data import Rows, batched, encode_completion, encode_prompt, global_batch_indices, is_chat, left_pad, \
    read_rows, require_text, split_micro_batches
from ..heads import ScalarModel, apply_scalar_lora, load_scalar_model, segment_attention_mask, supports_segment_mask
from ..losses import bradley_terry_loss
from ..models import load_tokenizer, make_trainable
from .loop import Run, check_output_dir, resolve_max_steps, save_final, seed_everything

# ---------------------------------------------------------------------------------------------------------------
# the math


def comparison_loss(rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor, margins: torch.Tensor,
                    pair_group: torch.Tensor, response_group: torch.Tensor, num_groups: int,
                    center_coef: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed Bradley–Terry loss of a batch of comparisons, each comparison (prompt) weighing the same.

    With r the rewards of the batch's distinct responses, P_g the (better c, worse w) pairs of comparison g
    and R_g its responses:

        L = Σ_g [ 1/|P_g| Σ_{(c,w)∈P_g} −log σ(r_c − r_w − m_cw)  +  λ · 1/|R_g| Σ_{i∈R_g} r_i² ]

    (Ouyang et al. 2022 eq. 1 averages the K(K−1)/2 pairs of a prompt the same way; the margin is Llama 2's;
    the second term, λ = ``center_coef``, is reward centring: a penalty on the mean squared reward that keeps
    rewards near zero. For a pair it is λ(r_c² + r_w²)/2; TRL's ``center_rewards_coefficient`` penalises
    (r_c + r_w)² instead, the offset only.) Returns the SUM over groups (the caller divides by the global
    number of comparisons) and the per-pair BT losses (P,).

    Shapes: ``rewards`` (N,), ``response_group`` (N,) long in [0, G); ``better``, ``worse`` (P,) long indices
    into ``rewards``; ``margins`` (P,); ``pair_group`` (P,) long in [0, G). Every group has at least one pair.
    """
    per_pair = bradley_terry_loss(rewards[better], rewards[worse], margins)
    pairs_per_group = torch.bincount(pair_group, minlength=num_groups).to(rewards.dtype)
    loss = (per_pair / pairs_per_group[pair_group]).sum()
    if center_coef:
        resp_per_group = torch.bincount(response_group, minlength=num_groups).to(rewards.dtype)
        loss = loss + center_coef * (rewards.pow(2) / resp_per_group[response_group]).sum()
    return loss, per_pair


def ranked_pairs(ranks: Sequence[float]) -> list[tuple[int, int]]:
    """All (better, worse) index pairs of a ranked list, rank 1 = best: (i, j) whenever ranks[i] < ranks[j].

    A list ordered best first has ranks 1..K and gives the K(K−1)/2 pairs (0,1), (0,2), …, (K−2, K−1)."""
    k = len(ranks)
    return [(i, j) if ranks[i] < ranks[j] else (j, i)
            for i in range(k) for j in range(i + 1, k) if ranks[i] != ranks[j]]


# ---------------------------------------------------------------------------------------------------------------
# data


@dataclass
class Comparison:
    """One row: the token ids (prompt + response + eos) of each response, and its (better, worse) pairs.
    ``prompt_len`` > 0: every sequence starts with the same ``prompt_len`` prompt ids (lets a batch run the
    prompt once, see :func:`collate`)."""

    sequences: list[list[int]]
    pairs: list[tuple[int, int]]
    margins: list[float] = field(default_factory=list)  # one per pair
    prompt_len: int = 0


def encode_response(tokenizer, prompt: Any, prompt_ids: list[int], response: Any) -> list[int]:
    """prompt ids + response ids (+ eos): the sequence a reward model scores, at its last token."""
    return prompt_ids + encode_completion(tokenizer, response, prompt, add_eos=True)


def _response(data: Rows, i: int, field: str, value: Any, k: int) -> Any:
    where = f"{data.where(i, field)}: response {k + 1}"
    if is_chat(value):
        if not value or any(not isinstance(m["content"], str) or not m["content"].strip() for m in value):
            raise AlignError(f"{where}: empty message list or message content")
        return value
    if not isinstance(value, str):
        raise AlignError(f"{where}: expected a string or chat message list, got {type(value).__name__}")
    if not value.strip():
        raise AlignError(f"{where}: empty value")
    return value


def _number(data: Rows, i: int, field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise AlignError(f"{data.where(i, field)}: expected a finite number, got {value!r}")
    return float(value)


def _check_chat_pair(data: Rows, i: int, prompt: Any, field: str, response: Any) -> None:
    if is_chat(response) and not is_chat(prompt):
        raise AlignError(f"{data.where(i, field)}: a chat-message response needs a chat-message prompt")


def tokenize_comparisons(data: Rows, tokenizer, max_length: int, margin_column: str = "margin",
                         ranking_column: str = "ranking", skip_bad: bool = False) -> tuple[list[Comparison], int]:
    """Validate and tokenize comparison rows (pairwise and ranked may be mixed). Returns the comparisons and the
    number of rows skipped for having no usable pair (only with ``skip_bad``; otherwise those are errors)."""
    out: list[Comparison] = []
    skipped = 0
    for i, row in enumerate(data.rows):
        if "responses" in row:
            fields = "responses"
        elif "chosen" in row or "rejected" in row:
            fields = "pair"
        else:
            raise AlignError(f"{data.where(i)}: no comparison columns (need prompt+chosen+rejected or "
                             f"prompt+responses; found {', '.join(row) or 'none'})")
        prompt = require_text(data, i, "prompt", allow_chat=True)
        prompt_ids = encode_prompt(tokenizer, prompt)
        if fields == "pair":
            responses = [require_text(data, i, f, allow_chat=True) for f in ("chosen", "rejected")]
            names = ["chosen", "rejected"]
            ranks: list[float] = [1.0, 2.0]
        else:
            lst = row["responses"]
            if not isinstance(lst, list) or (lst and is_chat(lst)):
                raise AlignError(f"{data.where(i, 'responses')}: expected a list of responses, got "
                                 f"{type(lst).__name__}")
            if len(lst) < 2:
                raise AlignError(f"{data.where(i, 'responses')}: a ranked list needs at least 2 responses, "
                                 f"got {len(lst)}")
            responses = [_response(data, i, "responses", v, k) for k, v in enumerate(lst)]
            names = [f"responses[{k}]" for k in range(len(lst))]
            if ranking_column and row.get(ranking_column) is not None:
                rk = row[ranking_column]
                if not isinstance(rk, list) or len(rk) != len(lst):
                    raise AlignError(f"{data.where(i, ranking_column)}: expected a list of {len(lst)} ranks "
                                     f"(one per response)")
                ranks = [_number(data, i, ranking_column, v) for v in rk]
            else:
                ranks = [float(k + 1) for k in range(len(lst))]
        seqs = []
        for name, resp in zip(names, responses):
            _check_chat_pair(data, i, prompt, name.split("[")[0], resp)
            ids = encode_response(tokenizer, prompt, prompt_ids, resp)
            if len(ids) > max_length:
                raise AlignError(f"{data.where(i, name.split('[')[0])}: {name} makes a sequence of {len(ids)} "
                                 f"tokens, max_length is {max_length}")
            seqs.append(ids)
        pairs = ranked_pairs(ranks)
        bad = None
        if not pairs:
            bad = f"{data.where(i, ranking_column)}: all responses have the same rank (no pair to learn from)"
        for a, b in pairs:
            if seqs[a] == seqs[b]:
                what = "chosen and rejected are identical" if fields == "pair" else \
                    f"responses {a + 1} and {b + 1} are identical"
                bad = f"{data.where(i, 'rejected' if fields == 'pair' else 'responses')}: {what} " \
                      f"(no preference to learn; set on_bad_pair: skip to drop such rows)"
                break
        if bad is not None:
            if not skip_bad:
                raise AlignError(bad)
            skipped += 1
            continue
        margin = 0.0
        if margin_column and row.get(margin_column) is not None:
            margin = _number(data, i, margin_column, row[margin_column])
        out.append(Comparison(seqs, pairs, [margin] * len(pairs), prompt_len=len(prompt_ids)))
    if not out:
        raise AlignError(f"{data.source}: no usable comparisons ({skipped} rows skipped)")
    return out, skipped


def load_comparisons(sources: str, split: str, tokenizer, cfg: RMConfig) -> tuple[list[Comparison], int]:
    """Comparisons of one or more comma-separated data sources, in order."""
    comps, skipped = [], 0
    for src in [s.strip() for s in sources.split(",") if s.strip()] or [""]:
        c, s = tokenize_comparisons(read_rows(src, split, cfg.column_map), tokenizer, cfg.max_length,
                                    cfg.margin_column, cfg.ranking_column, skip_bad=cfg.on_bad_pair == "skip")
        comps += c
        skipped += s
    return comps, skipped


def collate(comps: Sequence[Comparison], pad_id: int, share_prompt: bool = False) -> dict[str, torch.Tensor]:
    """One batch: every distinct response once, and the pairs as indices into the N responses (better, worse,
    margins, pair_group (P,); response_group (N,)).

    Layout: each response a separate left-padded sequence (input_ids, attention_mask (N, T)); or, with
    ``share_prompt`` (and every comparison's ``prompt_len`` known), one row per comparison holding its prompt
    once followed by all its responses (input_ids, position_ids, segments (G, T); the reward of response n is
    read at (rows[n], cols[n])), which runs the prompt's tokens once instead of K times."""
    seqs, better, worse, margins, pair_group, response_group = [], [], [], [], [], []
    for g, c in enumerate(comps):
        off = len(seqs)
        seqs += c.sequences
        response_group += [g] * len(c.sequences)
        for (a, b), m in zip(c.pairs, c.margins):
            better.append(off + a)
            worse.append(off + b)
            margins.append(m)
            pair_group.append(g)
    long = dict(dtype=torch.long)
    if share_prompt and all(c.prompt_len > 0 for c in comps):
        layout = _shared_prompt_rows(comps, pad_id)
    else:
        ids, att = left_pad(seqs, pad_id)
        layout = {"input_ids": ids, "attention_mask": att}
    return {**layout, "better": torch.tensor(better, **long),
            "worse": torch.tensor(worse, **long), "margins": torch.tensor(margins, dtype=torch.float32),
            "pair_group": torch.tensor(pair_group, **long), "response_group": torch.tensor(response_group, **long),
            "num_groups": len(comps)}


def _shared_prompt_rows(comps: Sequence[Comparison], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows [prompt, response 1, ..., response K] (right-padded), segments 0 / k / -1 (prompt / response k /
    pad), positions continuing the prompt's in every response, and where each response's last token is."""
    width = max(c.prompt_len + sum(len(q) - c.prompt_len for q in c.sequences) for c in comps)
    g = len(comps)
    ids = torch.full((g, width), pad_id, dtype=torch.long)
    seg = torch.full((g, width), -1, dtype=torch.long)
    pos = torch.zeros((g, width), dtype=torch.long)
    rows, cols = [], []
    for r, c in enumerate(comps):
        p = c.prompt_len
        ids[r, :p] = torch.tensor(c.sequences[0][:p])
        seg[r, :p] = 0
        pos[r, :p] = torch.arange(p)
        at = p
        for k, q in enumerate(c.sequences):
            n = len(q) - p
            ids[r, at:at + n] = torch.tensor(q[p:])
            seg[r, at:at + n] = k + 1
            pos[r, at:at + n] = torch.arange(p, p + n)
            at += n
            rows.append(r)
            cols.append(at - 1)
    return {"input_ids": ids, "segments": seg, "position_ids": pos, "rows": torch.tensor(rows),
            "cols": torch.tensor(cols)}


def batch_rewards(model, batch: dict[str, Any], device) -> torch.Tensor:
    """Rewards (N,) of a collated batch's responses, in either layout (see :func:`collate`)."""
    if "segments" in batch:
        mask = segment_attention_mask(batch["segments"].to(device), model)
        return model(batch["input_ids"].to(device), mask, position_ids=batch["position_ids"].to(device),
                     select=(batch["rows"].to(device), batch["cols"].to(device)))
    return model(batch["input_ids"].to(device), batch["attention_mask"].to(device))


def batch_loss(model, batch: dict[str, Any], device, center_coef: float) -> tuple[torch.Tensor, list[float]]:
    """Summed loss of a collated batch and its metric sums [pairs, correct, Σr_c, Σr_c², Σr_w, Σr_w²]."""
    rewards = batch_rewards(model, batch, device)
    better, worse = batch["better"].to(device), batch["worse"].to(device)
    loss, per_pair = comparison_loss(rewards, better, worse, batch["margins"].to(device),
                                     batch["pair_group"].to(device), batch["response_group"].to(device),
                                     batch["num_groups"], center_coef)
    with torch.no_grad():
        rc, rw = rewards[better].double(), rewards[worse].double()
        sums = [float(len(rc)), float((rc > rw).sum()), float(rc.sum()), float((rc * rc).sum()), float(rw.sum()),
                float((rw * rw).sum())]
    return loss, sums


def summarize(sums: Sequence[float], loss_sum: float, groups: float, prefix: str = "") -> dict[str, float]:
    """Metrics from summed statistics: loss (mean per comparison), pairwise accuracy, reward mean/std of the
    chosen (better) and rejected (worse) sides, and the mean reward margin r_c − r_w."""
    n, correct, sc, sc2, sw, sw2 = sums
    n = max(n, 1.0)

    def std(s, s2):
        return math.sqrt(max(s2 / n - (s / n) ** 2, 0.0))

    return {f"{prefix}loss": loss_sum / max(groups, 1.0), f"{prefix}accuracy": correct / n,
            f"{prefix}reward_chosen_mean": sc / n, f"{prefix}reward_chosen_std": std(sc, sc2),
            f"{prefix}reward_rejected_mean": sw / n, f"{prefix}reward_rejected_std": std(sw, sw2),
            f"{prefix}margin": (sc - sw) / n}


# ---------------------------------------------------------------------------------------------------------------
# the stage


def prepare_model(cfg: RMConfig, tokenizer, weights_dtype):
    """The scalar model from cfg.model (new head from cfg.seed), with gradient checkpointing / LoRA if asked."""
    model = load_scalar_model(cfg.model, dtype=weights_dtype, trust_remote_code=cfg.trust_remote_code,
                              seed=cfg.seed, pad_token_id=tokenizer.pad_token_id)
    lora = (lambda m: apply_scalar_lora(m, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
            ) if cfg.use_lora else None
    return make_trainable(model, cfg.gradient_checkpointing, lora)


def train_rm(cfg: RMConfig) -> dict[str, float]:
    """Train a reward model as configured; returns the last logged metrics (plus ``skipped_rows``). Nothing is
    written before the model and every input row have been checked."""
    check_output_dir(cfg)
    if cfg.center_rewards_coefficient < 0:
        raise AlignError(f"center_rewards_coefficient must be >= 0, got {cfg.center_rewards_coefficient}")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    train, skipped = load_comparisons(cfg.train_data, cfg.train_split, tokenizer, cfg)
    evals, eval_skipped = load_comparisons(cfg.eval_data, cfg.eval_split, tokenizer, cfg) if cfg.eval_data \
        else (None, 0)
    if skipped or eval_skipped:
        print(f"rm: skipped {skipped} train and {eval_skipped} eval rows with no usable pair (on_bad_pair=skip)",
              file=sys.stderr)

    seed_everything(cfg.seed)
    run = Run(cfg, "rm")
    model = prepare_model(cfg, tokenizer, run.weights_dtype)
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * run.world
    max_steps = resolve_max_steps(cfg, len(train), global_batch)
    rm = run.prepare(ScalarModel(model), max_steps)
    pad_id = tokenizer.pad_token_id
    coef = cfg.center_rewards_coefficient
    share = cfg.share_prompt and supports_segment_mask(model)

    def step_fn(step: int) -> dict[str, float]:
        indices = global_batch_indices(step, len(train), global_batch, cfg.seed)
        micro = split_micro_batches(indices, run.world, run.rank, cfg.gradient_accumulation_steps)
        rm.train()
        loss_sum, sums = 0.0, [0.0] * 6
        for k, idx in enumerate(micro):
            batch = collate([train[i] for i in idx], pad_id, share)
            with run.no_sync(last=k == len(micro) - 1), run.accelerator.autocast():
                loss, s = batch_loss(rm, batch, run.device, coef)
                # every row of the global batch weighs 1/global_batch; DDP averages over processes
                run.backward(loss * run.world / len(indices))
            loss_sum += float(loss.detach())
            sums = [a + b for a, b in zip(sums, s)]
        out = run.optimizer_step()
        loss_sum, *sums = run.reduce_sum([loss_sum] + sums)
        out.update(summarize(sums, loss_sum, len(indices)))
        out["pairs"] = sums[0]
        return out

    def eval_fn(step: int) -> dict[str, float]:
        return evaluate_comparisons(rm, evals, run, cfg.per_device_eval_batch_size, pad_id, coef, share)

    metrics = run.train(step_fn, eval_fn if evals else None)
    save_final(run, run.unwrap().model, tokenizer)
    metrics["skipped_rows"] = skipped + eval_skipped
    return metrics


@torch.no_grad()
def evaluate_comparisons(model, comps: list[Comparison], run: Run, batch_size: int, pad_id: int,
                         center_coef: float = 0.0, share_prompt: bool = False) -> dict[str, float]:
    """eval_loss, eval_accuracy and reward statistics over `comps`, sharded over processes."""
    model.eval()
    mine = comps[run.rank::run.world]
    loss_sum, sums = 0.0, [0.0] * 6
    for chunk in batched(mine, batch_size):
        with run.accelerator.autocast():
            loss, s = batch_loss(model, collate(list(chunk), pad_id, share_prompt), run.device, center_coef)
        loss_sum += float(loss)
        sums = [a + b for a, b in zip(sums, s)]
    loss_sum, *sums = run.reduce_sum([loss_sum] + sums)
    model.train()
    return summarize(sums, loss_sum, len(comps), prefix="eval_")
