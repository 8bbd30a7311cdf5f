"""Comparisons: the one data path of the offline preference stages (reward models; the DPO family).

    rows (prompt + chosen + rejected, or prompt + ranked responses) → :class:`Comparison` (token ids of each
    response, its (better, worse) pairs) → :func:`collate` (every response once, the prompt once per comparison)
    → :func:`batch_loss` (rewards, Bradley–Terry loss, :class:`ComparisonStats`)

A ranked list of K responses gives its K(K−1)/2 pairs (:func:`ranked_pairs`); groups of RL completions ranked by
a verifier give comparisons the same way (:func:`group_comparisons`, iterative GRPO).
"""

from __future__ import annotations

import math
import sys
from dataclasses import astuple, dataclass, field
from typing import Any, Callable, Sequence

import torch

from .config import AlignError
from .data import Rows, encode_completion, encode_prompt, is_chat, left_pad, read_rows, require_text
from .heads import segment_attention_mask
from .losses import comparison_loss

# ---------------------------------------------------------------------------------------------------------------
# pairs


def ranked_pairs(ranks: Sequence[float]) -> list[tuple[int, int]]:
    """All (better, worse) index pairs of a ranked list, rank 1 = best: (i, j) whenever ranks[i] < ranks[j].

    A list ordered best first has ranks 1..K and gives the K(K−1)/2 pairs (0,1), (0,2), …, (K−2, K−1)."""
    k = len(ranks)
    return [(i, j) if ranks[i] < ranks[j] else (j, i)
            for i in range(k) for j in range(i + 1, k) if ranks[i] != ranks[j]]


def group_comparisons(labels: Sequence[float], texts: Sequence[str], group_size: int
                      ) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Ranked comparisons made from groups: for each group whose labels are not all equal, (rows of its distinct
    completions — the first row of each distinct text —, (better, worse) pairs as positions in that list), a
    pair for every two completions with different labels (higher is better). Identical texts get one row, so
    no pair compares a completion with itself.

    labels and texts: N values in contiguous groups of group_size."""
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


def load_comparisons(sources: str, split: str, tokenizer, max_length: int, column_map: dict | None = None,
                     margin_column: str = "margin", ranking_column: str = "ranking", skip_bad: bool = False
                     ) -> tuple[list[Comparison], int]:
    """Comparisons of one or more comma-separated data sources, in order, and the number of rows skipped."""
    comps, skipped = [], 0
    for src in [s.strip() for s in sources.split(",") if s.strip()] or [""]:
        c, s = tokenize_comparisons(read_rows(src, split, column_map), tokenizer, max_length, margin_column,
                                    ranking_column, skip_bad=skip_bad)
        comps += c
        skipped += s
    return comps, skipped


def load_stage_comparisons(cfg, tokenizer, stage: str) -> tuple[list[Comparison], list[Comparison] | None, int]:
    """A comparison stage's (RM, DPO) train and eval comparisons (eval: None without eval_data) and the number of
    rows skipped by ``on_bad_pair: skip`` (reported on stderr), every row validated."""
    kw = dict(column_map=cfg.column_map, margin_column=cfg.margin_column, ranking_column=cfg.ranking_column,
              skip_bad=cfg.on_bad_pair == "skip")
    train, skipped = load_comparisons(cfg.train_data, cfg.train_split, tokenizer, cfg.max_length, **kw)
    evals, eval_skipped = load_comparisons(cfg.eval_data, cfg.eval_split, tokenizer, cfg.max_length, **kw) \
        if cfg.eval_data else (None, 0)
    if skipped or eval_skipped:
        print(f"{stage}: skipped {skipped} train and {eval_skipped} eval rows with no usable pair "
              f"(on_bad_pair=skip)", file=sys.stderr)
    return train, evals, skipped + eval_skipped


# ---------------------------------------------------------------------------------------------------------------
# batches


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


class Sums:
    """A dataclass of sums that add up over batches and over processes."""

    def __add__(self, other):
        return type(self)(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def reduced(self, reduce_sum: Callable[[list[float]], list[float]]):
        """The sums over every process (``reduce_sum``, e.g. ``Run.reduce_sum``)."""
        return type(self)(*reduce_sum(list(astuple(self))))


@dataclass
class PairSums(Sums):
    """The summed loss of a batch's pairs, their number and how many of them rank the better response higher."""

    loss: float = 0.0
    pairs: float = 0.0
    correct: float = 0.0


@dataclass
class ComparisonStats(PairSums):
    """A reward model's sums over the pairs of one or more batches (:class:`PairSums`) and the sum and sum of
    squares of the better (chosen) and worse (rejected) rewards."""

    chosen: float = 0.0
    chosen_sq: float = 0.0
    rejected: float = 0.0
    rejected_sq: float = 0.0

    def summary(self, groups: float, prefix: str = "") -> dict[str, float]:
        """loss (mean per comparison of ``groups``), pairwise accuracy, reward mean/std of the chosen (better) and
        rejected (worse) sides, and the mean reward margin r_c − r_w."""
        n = max(self.pairs, 1.0)

        def std(s, s2):
            return math.sqrt(max(s2 / n - (s / n) ** 2, 0.0))

        return {f"{prefix}loss": self.loss / max(groups, 1.0), f"{prefix}accuracy": self.correct / n,
                f"{prefix}reward_chosen_mean": self.chosen / n,
                f"{prefix}reward_chosen_std": std(self.chosen, self.chosen_sq),
                f"{prefix}reward_rejected_mean": self.rejected / n,
                f"{prefix}reward_rejected_std": std(self.rejected, self.rejected_sq),
                f"{prefix}margin": (self.chosen - self.rejected) / n}


def batch_loss(model, batch: dict[str, Any], device, center_coef: float = 0.0
               ) -> tuple[torch.Tensor, ComparisonStats]:
    """Summed loss (:func:`align.losses.comparison_loss`) of a collated batch, and its statistics."""
    rewards = batch_rewards(model, batch, device)
    better, worse = batch["better"].to(device), batch["worse"].to(device)
    loss, _ = comparison_loss(rewards, better, worse, batch["margins"].to(device), batch["pair_group"].to(device),
                              batch["response_group"].to(device), batch["num_groups"], center_coef)
    with torch.no_grad():
        rc, rw = rewards[better].double(), rewards[worse].double()
        stats = ComparisonStats(float(loss.detach()), float(len(rc)), float((rc > rw).sum()), float(rc.sum()),
                                float((rc * rc).sum()), float(rw.sum()), float((rw * rw).sum()))
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------
# log-probabilities of responses under a causal LM (the DPO family)


def collate_logps(comps: Sequence[Comparison], pad_id: int, share_prompt: bool = False) -> dict[str, Any]:
    """One batch for scoring every response's tokens under a causal LM, each next-token logit computed once:
    the pair fields of :func:`collate` (better, worse, margins, pair_group, response_group, num_groups) and

    * the layout: with ``share_prompt`` one row per comparison, its prompt once followed by all its responses
      (input_ids, segments, position_ids (G, T), right-padded: see :func:`align.heads.segment_attention_mask`);
      else one right-padded row per response (input_ids, attention_mask, position_ids (N, T)). A response's
      last token is left out of the inputs: no token attends to it and its logits predict nothing;
    * ``select`` (rows, T) bool: the S positions whose next-token logits are used. With a shared prompt its last
      token predicts the first token of every response and is selected once;
    * ``labels``, ``pred``, ``token_response`` (M,) long: each response token, the index in [0, S) of the selected
      position that predicts it, and its response in [0, N); ``lengths`` (N,) long: tokens per response (EOS
      included)."""
    rows: list[list[int]] = []
    segs: list[list[int]] = []
    labels: list[int] = []
    pr: list[int] = []
    pc: list[int] = []
    owner: list[int] = []
    lengths: list[int] = []
    better: list[int] = []
    worse: list[int] = []
    margins: list[float] = []
    pair_group: list[int] = []
    response_group: list[int] = []
    n = 0
    for g, c in enumerate(comps):
        p = c.prompt_len
        if p < 1:
            raise ValueError("a comparison without prompt tokens has no position to predict its first token from")
        for (a, b), m in zip(c.pairs, c.margins):
            better.append(n + a)
            worse.append(n + b)
            margins.append(m)
            pair_group.append(g)
        if share_prompt:
            ids, seg = list(c.sequences[0][:p]), [0] * p
        for k, q in enumerate(c.sequences):
            # a response's last token (its EOS) is never an input: nothing attends to it and it predicts nothing
            resp = q[p:]
            kk = len(resp)
            if share_prompt:  # row g: [prompt, response 1 but its last token, ..., response K but its last]
                start = len(ids)
                ids += resp[:-1]
                seg += [k + 1] * (kk - 1)
                row = g
            else:  # row n: prompt + response but its last token
                rows.append(list(q[:-1]))
                start, row = p, n
            labels += resp
            pr += [row] * kk
            pc += [p - 1] + list(range(start, start + kk - 1))
            owner += [n] * kk
            lengths.append(kk)
            response_group.append(g)
            n += 1
        if share_prompt:
            rows.append(ids)
            segs.append(seg)
    width = max(len(r) for r in rows)
    long = dict(dtype=torch.long)
    batch: dict[str, Any] = {"input_ids": torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], **long)}
    if share_prompt:
        batch["segments"] = torch.tensor([s + [-1] * (width - len(s)) for s in segs], **long)
        pos = []  # every response's positions continue the prompt's, as in the separate sequence prompt + response
        for c in comps:
            row = list(range(c.prompt_len))
            for q in c.sequences:
                row += range(c.prompt_len, len(q) - 1)
            pos.append(row + [0] * (width - len(row)))
        batch["position_ids"] = torch.tensor(pos, **long)
    else:
        batch["attention_mask"] = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], **long)
        batch["position_ids"] = torch.arange(width).expand(len(rows), width).clone()
    r, c = torch.tensor(pr, **long), torch.tensor(pc, **long)
    select = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    select[r, c] = True
    index = (select.flatten().long().cumsum(0) - 1).view(select.shape)
    batch.update(select=select, pred=index[r, c], labels=torch.tensor(labels, **long),
                 token_response=torch.tensor(owner, **long), lengths=torch.tensor(lengths, **long),
                 better=torch.tensor(better, **long), worse=torch.tensor(worse, **long),
                 margins=torch.tensor(margins, dtype=torch.float32), pair_group=torch.tensor(pair_group, **long),
                 response_group=torch.tensor(response_group, **long), num_groups=len(comps))
    return batch


def response_logps(lm: torch.nn.Module, batch: dict[str, Any], device) -> torch.Tensor:
    """log π(y|x) summed over each response's tokens (N,) float32, for a batch of :func:`collate_logps`; ``lm`` is
    a :class:`align.models.SelectiveLM` (or a module with its forward), run once over the batch's rows."""
    if "segments" in batch:
        att = segment_attention_mask(batch["segments"].to(device), lm)
    else:
        att = batch["attention_mask"].to(device)
    logits = lm(batch["input_ids"].to(device), select=batch["select"].to(device), attention_mask=att,
                position_ids=batch["position_ids"].to(device))  # (S, V)
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    pred = batch["pred"].to(device)
    tok = z[pred, batch["labels"].to(device)] - torch.logsumexp(z, dim=-1)[pred]  # (M,)
    out = torch.zeros(len(batch["lengths"]), dtype=tok.dtype, device=device)
    return out.index_add(0, batch["token_response"].to(device), tok)


@dataclass
class PreferenceStats(PairSums):
    """A DPO-family loss's sums over the pairs of one or more batches (:class:`PairSums`; a pair is correct when
    the chosen response has the higher implicit reward, see :func:`align.losses.dpo_loss`) and the sums of the
    rewards, summed log-probabilities and average token NLL of the chosen and rejected sides."""

    rewards_chosen: float = 0.0
    rewards_rejected: float = 0.0
    logps_chosen: float = 0.0
    logps_rejected: float = 0.0
    nll: float = 0.0

    @classmethod
    def of(cls, loss: torch.Tensor, pairs: dict[str, torch.Tensor]) -> "PreferenceStats":
        """From a summed loss and the per-pair statistics of :func:`align.losses.dpo_loss`."""
        rc, rr = pairs["rewards_chosen"].double(), pairs["rewards_rejected"].double()
        return cls(float(loss.detach()), float(len(rc)), float((rc > rr).sum()), float(rc.sum()), float(rr.sum()),
                   float(pairs["logps_chosen"].double().sum()), float(pairs["logps_rejected"].double().sum()),
                   float(pairs["nll"].double().sum()))

    def summary(self, groups: float, prefix: str = "") -> dict[str, float]:
        """TRL's DPO metrics (its ``rewards/chosen`` is our ``rewards_chosen``): loss (mean per comparison of
        ``groups``), rewards_chosen / rewards_rejected (mean implicit reward), rewards_accuracies (fraction of
        pairs whose chosen reward is higher), rewards_margins (mean chosen − rejected reward), logps_chosen /
        logps_rejected (mean summed log-probability) and nll_loss (mean token NLL of the chosen responses)."""
        n = max(self.pairs, 1.0)
        return {f"{prefix}loss": self.loss / max(groups, 1.0), f"{prefix}rewards_chosen": self.rewards_chosen / n,
                f"{prefix}rewards_rejected": self.rewards_rejected / n, f"{prefix}rewards_accuracies": self.correct / n,
                f"{prefix}rewards_margins": (self.rewards_chosen - self.rewards_rejected) / n,
                f"{prefix}logps_chosen": self.logps_chosen / n, f"{prefix}logps_rejected": self.logps_rejected / n,
                f"{prefix}nll_loss": self.nll / n}


def best_worst_pairs(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Online DPO's pairs: for each group of ``group_size`` consecutive completions whose rewards are not all
    equal, (its best, its worst) completion as row indices (the first of equal maxima / minima). Groups whose
    rewards are all equal give no pair. rewards (B,) → better, worse (P,) long, in group order."""
    r = rewards.view(-1, group_size)
    base = torch.arange(r.shape[0], device=rewards.device) * group_size
    keep = r.max(-1).values > r.min(-1).values
    return (base + r.argmax(-1))[keep], (base + r.argmin(-1))[keep]
