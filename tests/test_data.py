"""Data loading, validation errors (file, row, field), tokenization formats and collation."""

import json

import pytest

from align.config import AlignError
from align.data import (IGNORE_INDEX, SFTExample, global_batch_indices, pack_examples, pad_examples, read_rows,
                        split_micro_batches, tokenize_sft)
from align.tiny import build_tokenizer
from conftest import write_jsonl


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_malformed_jsonl_names_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", \n')
    with pytest.raises(AlignError) as e:
        read_rows(str(p))
    assert str(e.value).startswith(f"{p}: line 3: malformed JSON")


def test_missing_and_empty_fields(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(AlignError, match=r"d.jsonl: line 2, field 'completion': missing column"):
        tokenize_sft(read_rows(p), tok, max_length=32)
    p = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "  "}])
    with pytest.raises(AlignError, match=r"e.jsonl: line 2, field 'completion': empty value"):
        tokenize_sft(read_rows(p), tok, max_length=32)
    p = write_jsonl(tmp_path / "f.jsonl", [{"foo": 1}])
    with pytest.raises(AlignError, match="no known columns"):
        tokenize_sft(read_rows(p), tok, max_length=32)


def test_too_long_prompt(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x" * 40, "completion": "y"}])
    with pytest.raises(AlignError, match=r"line 1, field 'prompt': prompt is 40 tokens, max_length is 16"):
        tokenize_sft(read_rows(p), tok, max_length=16)


def test_prompt_completion_labels_mask_prompt(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "What is 1+2?", "completion": "3"}])
    (ex,) = tokenize_sft(read_rows(p), tok, max_length=32)
    # 12 prompt characters, 1 completion character, then eos
    assert len(ex.input_ids) == 14
    assert ex.labels[:12] == [IGNORE_INDEX] * 12
    assert ex.labels[12:] == [tok.convert_tokens_to_ids("3"), tok.eos_token_id]
    (full,) = tokenize_sft(read_rows(p), tok, max_length=32, completion_only=False)
    assert full.labels == full.input_ids


def test_messages_train_on_assistant_turns_only(tmp_path, tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    (ex,) = tokenize_sft(read_rows(p), tok, max_length=64)
    trained = tok.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE_INDEX])
    assert trained == "yo" + tok.eos_token + "4" + tok.eos_token


def test_parquet_csv_and_json_read_the_same(tmp_path):
    import datasets

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for suffix in ("parquet", "csv", "json"):
        assert read_rows(str(tmp_path / f"d.{suffix}")).rows == rows
    with pytest.raises(AlignError, match="data file not found"):
        read_rows(str(tmp_path / "missing.jsonl"))


def test_packing_keeps_every_token_and_restarts_positions():
    exs = [SFTExample(list(range(1, n + 1)), [IGNORE_INDEX] + list(range(2, n + 1))) for n in (5, 3, 7, 2)]
    b = pack_examples(exs, max_length=8, pad_id=0)
    # first-fit decreasing: [7], [5, 3]... 7 goes alone (1 free), 5 opens row 2 (3 free), 3 fills it, 2 -> row 3
    assert b["input_ids"].shape == (3, 8)
    assert int((b["input_ids"] != 0).sum()) == 17
    assert b["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    # labels are shifted within each sequence and never cross into the next one
    assert b["labels"][1].tolist() == [2, 3, 4, 5, IGNORE_INDEX, 2, 3, IGNORE_INDEX]
    assert int((b["labels"] != IGNORE_INDEX).sum()) == sum(n - 1 for n in (5, 3, 7, 2))
    padded = pad_examples(exs, pad_id=0)
    assert int((padded["labels"] != IGNORE_INDEX).sum()) == int((b["labels"] != IGNORE_INDEX).sum())


def test_data_order_is_a_function_of_step():
    n, g = 10, 4
    seen = [i for s in range(5) for i in global_batch_indices(s, n, g, seed=3)]
    # two full epochs: each a permutation of 0..9
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert global_batch_indices(2, n, g, seed=3) == seen[8:12]
    # splitting over processes x accumulation covers the batch exactly once
    idx = global_batch_indices(0, 100, 12, seed=0)
    parts = [m for r in range(2) for m in split_micro_batches(idx, 2, r, 3)]
    assert sorted(i for m in parts for i in m) == sorted(idx)
    assert all(len(m) == 2 for m in parts)


def test_rename_columns_maps_names_and_reports_the_data_column():
    from align.data import Rows, rename_columns

    data = Rows([{"question": "q1", "solution": "s1", "prompt": "old"}, {"question": "q2", "solution": ""}],
                "gsm.jsonl", [1, 3])
    out = rename_columns(data, {"prompt": "question", "completion": "solution"})
    assert out.rows == [{"prompt": "q1", "completion": "s1"}, {"prompt": "q2", "completion": ""}]
    assert out.where(1, "completion") == "gsm.jsonl: line 3, field 'solution'"
    assert out.where(0, "answer") == "gsm.jsonl: line 1, field 'answer'"  # unmapped names stay as they are
    swapped = rename_columns(data, {"prompt": "solution", "solution": "prompt"})  # a swap is two renames
    assert swapped.rows[0] == {"question": "q1", "prompt": "s1", "solution": "old"}
    with pytest.raises(AlignError, match="two names map to the same column"):
        rename_columns(data, {"prompt": "question", "completion": "question"})
    with pytest.raises(AlignError, match=r"gsm.jsonl: column_map: no column 'answer' to use as 'completion'"):
        rename_columns(data, {"completion": "answer"})
