"""Data: loading, validation, tokenization and collation.

Formats (column names as TRL uses them):
  * ``text``                         language modelling on the whole text;
  * ``prompt`` + ``completion``      strings, or chat message lists ("conversational" prompt/completion);
  * ``messages``                     a chat, rendered with the tokenizer's chat template, loss on assistant turns;
  * ``prompt`` + ``chosen`` + ``rejected`` and ``prompt`` + ``responses``  comparisons (reward-model stage);
  * ``prompt`` (+ any other columns) prompts for the RL stages; the other columns reach reward functions.

Every problem with the input is reported before training starts, as one line naming the file, the row (1-based
line for JSONL files, 1-based row otherwise) and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from .config import AlignError

IGNORE_INDEX = -100
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass
class Rows:
    """Rows of a data source plus what is needed to point at one of them in an error message."""

    rows: list[dict[str, Any]]
    source: str  # file path or hub id
    row_numbers: list[int]  # 1-based line (JSONL) or row number of each entry
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)  # our column name -> the data's

    def where(self, i: int, field: str | None = None) -> str:
        unit = "line" if self.source.endswith(".jsonl") else "row"
        f = f", field '{self.renamed.get(field, field)}'" if field else ""
        return f"{self.source}: {unit} {self.row_numbers[i]}{f}"

    def __len__(self) -> int:
        return len(self.rows)


def read_rows(source: str, split: str = "train", column_map: dict[str, str] | None = None) -> Rows:
    """Read a local jsonl/json/parquet/csv file, or a dataset from the hub, into a list of dicts.

    ``column_map`` renames columns on reading, ``{our name: the data's name}`` (e.g. ``{"prompt": "question"}``
    for a data set whose prompts are in a ``question`` column); errors about a renamed field name the data's
    column, as the user sees it in the file."""
    rows = _read_rows(source, split)
    return rename_columns(rows, column_map) if column_map else rows


def rename_columns(data: Rows, column_map: dict[str, str]) -> Rows:
    """``data`` with the data's column ``column_map[ours]`` renamed to ``ours`` in every row. A mapped column
    that no row has is an error naming the columns there are."""
    seen: set[str] = set()
    for row in data.rows:
        seen.update(row)
    for ours, theirs in column_map.items():
        if not isinstance(theirs, str) or not isinstance(ours, str):
            raise AlignError(f"column_map: expected names, got {ours!r}: {theirs!r}")
        if theirs not in seen:
            raise AlignError(f"{data.source}: column_map: no column '{theirs}' to use as '{ours}' "
                             f"(columns: {', '.join(sorted(seen))})")
    back = {theirs: ours for ours, theirs in column_map.items()}
    if len(back) < len(column_map):
        raise AlignError(f"column_map: two names map to the same column ({column_map})")
    rows = [{back.get(k, k): v for k, v in row.items() if not (k in column_map and k not in back)}
            for row in data.rows]
    return Rows(rows, data.source, data.row_numbers, {**data.renamed, **column_map})


def _read_rows(source: str, split: str) -> Rows:
    if not source:
        raise AlignError("no data given (set train_data / --data)")
    if source.endswith(LOCAL_SUFFIXES) or os.path.exists(source):
        if not os.path.isfile(source):
            raise AlignError(f"{source}: data file not found")
        if source.endswith(".jsonl"):
            return _read_jsonl(source)
        if source.endswith(".json"):
            return _read_json(source)
        fmt = "parquet" if source.endswith(".parquet") else "csv" if source.endswith(".csv") else None
        if fmt is None:
            raise AlignError(f"{source}: unknown data format (use .jsonl, .json, .parquet or .csv)")
        if fmt == "csv":
            read_text(source)  # undecodable bytes: an error with line and column, not deep in the CSV reader
        import datasets

        try:
            ds = datasets.load_dataset(fmt, data_files=source, split="train")
        except Exception as e:  # datasets raises many types for a broken file
            raise AlignError(f"{source}: cannot read {fmt} file: {str(e).splitlines()[0]}") from None
        rows = ds.to_list()
        return Rows(rows, source, list(range(1, len(rows) + 1)))
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:
        raise AlignError(f"{source}: not a local file and could not be loaded from the hub "
                         f"(split '{split}'): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    rows = ds.to_list()
    return Rows(rows, source, list(range(1, len(rows) + 1)))


def read_text(path: str) -> str:
    """The UTF-8 text of a file (a leading byte-order mark dropped). Bytes that are not UTF-8 are an error naming
    the line and column (1-based, in characters) of the first one; so is a file that cannot be read."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise AlignError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        start = raw.rfind(b"\n", 0, e.start) + 1
        line = raw.count(b"\n", 0, e.start) + 1
        column = len(raw[start:e.start].decode("utf-8")) + 1
        raise AlignError(f"{path}: line {line}, column {column}: byte 0x{raw[e.start]:02x} is not UTF-8 (save the "
                         f"file as UTF-8)") from None
    return text[1:] if text.startswith("\ufeff") else text


def _read_jsonl(path: str) -> Rows:
    return _read_jsonl_text(path, read_text(path))


def _read_json(path: str) -> Rows:
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        # many ".json" files are really JSON lines
        return _read_jsonl_text(path, text)
    if isinstance(data, dict):
        for key in ("data", "rows", "train"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise AlignError(f"{path}: expected a JSON list of objects")
    if not data:
        raise AlignError(f"{path}: no rows")
    return Rows(data, path, list(range(1, len(data) + 1)))


def _read_jsonl_text(path: str, text: str) -> Rows:
    """Rows of JSON-lines text; blank lines are skipped, errors name the 1-based line."""
    rows, numbers = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise AlignError(f"{path}: line {lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise AlignError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
        numbers.append(lineno)
    if not rows:
        raise AlignError(f"{path}: no rows")
    return Rows(rows, path, numbers)


# ---------------------------------------------------------------------------------------------------------------
# validation helpers


def is_chat(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def require_text(data: Rows, i: int, field: str, allow_chat: bool = False) -> Any:
    """The row's non-empty string (or, if allowed, chat message list) in `field`, else a one-line error."""
    row = data.rows[i]
    if field not in row:
        raise AlignError(f"{data.where(i, field)}: missing column")
    value = row[field]
    if allow_chat and is_chat(value):
        if not value:
            raise AlignError(f"{data.where(i, field)}: empty message list")
        for k, m in enumerate(value, start=1):
            if not isinstance(m["content"], str):
                raise AlignError(f"{data.where(i, field)}: message {k}: content is a {json_kind(m['content'])}, "
                                 f"expected a string")
            if not m["content"].strip():
                raise AlignError(f"{data.where(i, field)}: message {k}: empty content")
            if not isinstance(m["role"], str):
                raise AlignError(f"{data.where(i, field)}: message {k}: role is a {json_kind(m['role'])}, "
                                 f"expected a string")
        return value
    if not isinstance(value, str):
        kind = "string or chat message list" if allow_chat else "string"
        raise AlignError(f"{data.where(i, field)}: expected a {kind}, got {json_kind(value)} "
                         f"{short_repr(value)}")
    if not value.strip():
        raise AlignError(f"{data.where(i, field)}: empty value")
    return value


def json_kind(value: Any) -> str:
    """The JSON name of a value's type, as the user wrote it in the file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def short_repr(value: Any, width: int = 40) -> str:
    """repr(value), cut to `width` characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def detect_format(data: Rows, candidates: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    """The first column set in `candidates` that the first row has; an error listing them otherwise."""
    first = data.rows[0]
    for cols in candidates:
        if all(c in first for c in cols):
            return cols
    wanted = " or ".join("+".join(c) for c in candidates)
    raise AlignError(f"{data.where(0)}: no known columns (need {wanted}; found {', '.join(first) or 'none'})")


def prompt_columns(data: Rows, n: int) -> tuple[list[Any], dict[str, list[Any]]]:
    """Validated prompts (non-empty strings or chats) of the first n rows, and the rows' other columns (the
    first row's names, which every row must have) as lists: what reward functions receive."""
    prompts = [require_text(data, i, "prompt", allow_chat=True) for i in range(n)]
    cols: dict[str, list[Any]] = {k: [] for k in data.rows[0] if k != "prompt"}
    for k, values in cols.items():
        for i in range(n):
            if k not in data.rows[i]:
                raise AlignError(f"{data.where(i, k)}: missing column (the first row has it)")
            values.append(data.rows[i][k])
    return prompts, cols


# ---------------------------------------------------------------------------------------------------------------
# tokenization


def encode_prompt(tokenizer, prompt: Any) -> list[int]:
    """Token ids of a prompt: a plain string (with the tokenizer's special tokens) or a chat message list
    rendered with the chat template and the generation prompt."""
    if is_chat(prompt):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_completion(tokenizer, completion: Any, prompt: Any = None, add_eos: bool = True) -> list[int]:
    """Token ids of a completion that follows an already-encoded prompt (no BOS; EOS appended)."""
    if is_chat(completion):
        assert is_chat(prompt), "a chat completion needs a chat prompt"
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        if not full.startswith(head):
            raise AlignError("the chat template does not render the prompt as a prefix of prompt+completion")
        return tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return ids


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a whole chat; labels keep assistant-turn tokens only.

    Each assistant turn's span is found by rendering the conversation up to it with the generation prompt and
    up to its end; tokens whose characters fall inside those spans are trained on."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=False) if k else ""
        upto = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not text.startswith(upto) or not upto.startswith(head):
            raise AlignError("the chat template does not render conversations prefix by prefix")
        spans.append((len(head), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for j, (s, e) in enumerate(enc["offset_mapping"]):
        if any(a <= s and e <= b and e > s for a, b in spans):
            labels[j] = ids[j]
    return ids, labels


@dataclass
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken


def tokenize_sft(data: Rows, tokenizer, max_length: int, completion_only: bool = True, text_field: str = "text",
                 add_eos: bool = True) -> list[SFTExample]:
    """Validate and tokenize SFT rows in any supported format."""
    fmt = detect_format(data, [("messages",), ("prompt", "completion"), (text_field,)])
    out = []
    for i in range(len(data)):
        if fmt == ("messages",):
            msgs = require_text(data, i, "messages", allow_chat=True)
            if not is_chat(msgs):
                raise AlignError(f"{data.where(i, 'messages')}: expected a list of {{role, content}} messages")
            if not any(m["role"] == "assistant" for m in msgs):
                raise AlignError(f"{data.where(i, 'messages')}: no assistant message to learn from")
            ids, labels = encode_chat(tokenizer, msgs)
            if not completion_only:
                labels = list(ids)
            field = "messages"
        elif fmt == ("prompt", "completion"):
            prompt = require_text(data, i, "prompt", allow_chat=True)
            completion = require_text(data, i, "completion", allow_chat=True)
            p = encode_prompt(tokenizer, prompt)
            if len(p) >= max_length:
                raise AlignError(f"{data.where(i, 'prompt')}: prompt is {len(p)} tokens, max_length is {max_length}")
            c = encode_completion(tokenizer, completion, prompt, add_eos=add_eos)
            ids = p + c
            labels = ([IGNORE_INDEX] * len(p) if completion_only else list(p)) + c
            field = "completion"
        else:
            text = require_text(data, i, text_field)
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            if add_eos and tokenizer.eos_token_id is not None:
                ids = ids + [tokenizer.eos_token_id]
            labels = list(ids)
            field = text_field
        if len(ids) > max_length:
            raise AlignError(f"{data.where(i, field)}: example is {len(ids)} tokens, max_length is {max_length}")
        if sum(1 for x in labels[1:] if x != IGNORE_INDEX) == 0:
            raise AlignError(f"{data.where(i, field)}: no tokens to train on")
        out.append(SFTExample(ids, labels))
    return out


# ---------------------------------------------------------------------------------------------------------------
# collation


def pack_rows(lengths: Sequence[int], max_length: int) -> tuple[list[list[int]], int]:
    """First-fit-decreasing packing of sequences of `lengths` into rows of at most `max_length` tokens: (the
    indices in each row, the width of the longest row)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if free >= lengths[i]:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_length - lengths[i])
    return rows, max(max_length - free for free in room)


def pack_examples(examples: Sequence[SFTExample], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack sequences into as few rows of at most `max_length` tokens as first-fit-decreasing finds.

    Returns input_ids, labels (already shifted: labels[t] is the target of position t, IGNORE elsewhere) and
    position_ids (restarting at 0 for every sequence), all (rows, L). No attention mask is returned: models in
    transformers then build a block-diagonal causal mask from the position ids, so sequences never attend to
    each other. Row padding sits at the end of rows, after every real token, with its own positions."""
    rows, width = pack_rows([len(ex.input_ids) for ex in examples], max_length)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            ex = examples[i]
            n = len(ex.input_ids)
            ids[r, at:at + n] = torch.tensor(ex.input_ids)
            tgt[r, at:at + n - 1] = torch.tensor(ex.labels[1:])
            pos[r, at:at + n] = torch.arange(n)
            at += n
        if at < width:
            pos[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": tgt, "position_ids": pos}


def pad_examples(examples: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: input_ids, shifted labels, attention_mask and position_ids."""
    width = max(len(ex.input_ids) for ex in examples)
    b = len(examples)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    tgt = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    att = torch.zeros((b, width), dtype=torch.long)
    for r, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[r, :n] = torch.tensor(ex.input_ids)
        tgt[r, : n - 1] = torch.tensor(ex.labels[1:])
        att[r, :n] = 1
    return {"input_ids": ids, "labels": tgt, "attention_mask": att, "position_ids": position_ids_from_mask(att)}


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only: ``cumsum(mask) − 1``, 0 on leading pads. (B, T) → (B, T)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists for generation: (ids, attention_mask), both (B, max_len)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if len(s):
            ids[r, width - len(s):] = torch.tensor(list(s))
            att[r, width - len(s):] = 1
    return ids, att


# ---------------------------------------------------------------------------------------------------------------
# data order


def global_batch_indices(step: int, num_examples: int, global_batch: int, seed: int) -> list[int]:
    """Indices of the examples used by optimizer step `step` (0-based).

    The data stream is the concatenation of one seeded permutation per epoch; step s takes its items
    [s*G, (s+1)*G). The position in the data is therefore a function of the step alone, which makes resuming
    exact and makes the split across processes and accumulation micro-batches irrelevant to the math."""
    out = []
    start = step * global_batch
    for k in range(start, start + global_batch):
        epoch, j = divmod(k, num_examples)
        out.append(_epoch_permutation(num_examples, seed, epoch)[j])
    return out


_PERM_CACHE: dict[tuple[int, int, int], list[int]] = {}


def _epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 8:
            _PERM_CACHE.clear()
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _PERM_CACHE[key] = torch.randperm(n, generator=g).tolist()
    return _PERM_CACHE[key]


def split_evenly(items: Sequence[Any], n: int) -> list[Any]:
    """``items`` (a list or a 1-D tensor) cut into n contiguous, nearly equal parts in order (sizes differ by at
    most one, the first ones larger): ``split_evenly([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]``."""
    size, rem = divmod(len(items), n)
    out, at = [], 0
    for c in range(n):
        k = size + (1 if c < rem else 0)
        out.append(items[at:at + k])
        at += k
    return out


def process_chunks(items: Sequence[Any], num_processes: int, process_index: int, accumulation: int) -> list[Any]:
    """This process's `accumulation` chunks of `items`: they are cut into num_processes*accumulation contiguous
    chunks (`split_evenly`; some empty when there are fewer items) and chunk c goes to process c % num_processes.
    One process with N times the accumulation therefore gets the chunks of N processes, in order."""
    parts = split_evenly(items, num_processes * accumulation)
    return [p for c, p in enumerate(parts) if c % num_processes == process_index]


def chunks_within_budget(lengths: Sequence[int], budget: int, multiple: int = 1) -> list[list[int]]:
    """Positions 0..n-1 of rows of ascending ``lengths`` cut into contiguous chunks whose padded size (rows x the
    chunk's longest row) is at most ``budget`` (a row longer than the budget is a chunk alone); then, until
    their number is a multiple of ``multiple`` (processes), the chunk of the largest padded size that has two
    rows or more is halved, or, when none has, an empty chunk is added."""
    chunks: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if cur and (len(cur) + 1) * max(longest, n) > budget:
            chunks.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        chunks.append(cur)
    while len(chunks) % multiple:
        cost = [len(c) * max(lengths[i] for i in c) if len(c) > 1 else -1 for c in chunks]
        k = max(range(len(chunks)), key=cost.__getitem__)
        if cost[k] < 0:
            chunks.append([])
            continue
        half = len(chunks[k]) // 2
        chunks[k:k + 1] = [chunks[k][:half], chunks[k][half:]]
    return chunks


def split_micro_batches(indices: list[int], num_processes: int, process_index: int,
                        accumulation: int) -> list[list[int]]:
    """This process's micro-batches of a global batch (`process_chunks`); a batch too small to give every
    micro-batch an example is an error."""
    chunks = num_processes * accumulation
    if len(indices) < chunks:
        raise AlignError(f"global batch of {len(indices)} is smaller than processes x accumulation ({chunks})")
    return process_chunks(indices, num_processes, process_index, accumulation)


def batched(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ---------------------------------------------------------------------------------------------------------------
# RL prompts


@dataclass
class PromptData:
    """Validated prompts of an RL stage: the raw prompts, their token ids and the other columns."""

    prompts: list[Any]
    ids: list[list[int]]
    columns: dict[str, list[Any]]

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, indices: Sequence[int], pad_id: int, device: torch.device | str = "cpu"
              ) -> tuple[list[Any], dict[str, list[Any]], torch.Tensor, torch.Tensor]:
        """(prompts, columns, left-padded ids (B, P), mask (B, P)) of the rows `indices`."""
        ids, mask = left_pad([self.ids[i] for i in indices], pad_id)
        cols = {k: [v[i] for i in indices] for k, v in self.columns.items()}
        return [self.prompts[i] for i in indices], cols, ids.to(device), mask.to(device)


def load_prompt_data(data: Rows, tokenizer, max_length: int, max_new_tokens: int) -> PromptData:
    """Validate every row (a non-empty 'prompt' string or chat, the same other columns as the first row) and
    encode the prompts; a prompt that leaves no room for max_new_tokens within max_length is an error."""
    prompts, columns = prompt_columns(data, len(data))
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    budget = max_length - max_new_tokens
    for i, p in enumerate(ids):
        if len(p) > budget:
            raise AlignError(f"{data.where(i, 'prompt')}: prompt is {len(p)} tokens; with max_new_tokens="
                             f"{max_new_tokens} that exceeds max_length={max_length}")
    return PromptData(prompts, ids, columns)


# ---------------------------------------------------------------------------------------------------------------
# writing


def write_atomic(path: str, text: str) -> None:
    """Write `text` to a temporary file in path's directory, then rename it into place: a reader sees the old
    file or the whole new one, never a part."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
