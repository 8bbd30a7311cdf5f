"""Every supported architecture: packed and padded batches give the same loss, a few SFT steps train and
save, and the result generates through `align eval`."""

import json

import pytest
import torch

from align.cli import main
from align.data import SFTExample, pack_examples, pad_examples
from align.models import SelectiveLM
from align.tiny import ARCHS, build_model, build_tokenizer, save_tiny_model
from align.trainers.sft import token_loss_sum
from conftest import addition_rows, write_jsonl

SIZE = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


def _examples(tok):
    out = []
    for p, c in [("What is 12+34?", "46"), ("What is 99+99?", "198"), ("Hi", "there you go"), ("1+1?", "2")]:
        pi = tok(p)["input_ids"]
        ci = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append(SFTExample(pi + ci, [-100] * len(pi) + ci))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_equals_padded_equals_one_by_one(arch):
    tok = build_tokenizer()
    lm = SelectiveLM(build_model(tok, arch=arch, **SIZE).eval())
    exs = _examples(tok)
    with torch.no_grad():
        packed, n1 = token_loss_sum(lm, pack_examples(exs, 64, tok.pad_token_id), "cpu")
        padded, n2 = token_loss_sum(lm, pad_examples(exs, tok.pad_token_id), "cpu")
        single = sum(token_loss_sum(lm, pad_examples([e], tok.pad_token_id), "cpu")[0] for e in exs)
    assert n1 == n2 == sum(len(e.input_ids) - sum(1 for x in e.labels if x == -100) for e in exs)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_sft_steps_and_generation(arch, tmp_path):
    model_dir = save_tiny_model(tmp_path / "m", arch=arch, **SIZE)
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(16))
    out = tmp_path / "o"
    assert main(["sft", "--model", model_dir, "--train_data", data, "--output_dir", str(out), "--max_steps", "3",
                 "--learning_rate", "1e-3", "--per_device_train_batch_size", "8", "--max_length", "32",
                 "--disable_tqdm", "true", "--logging_steps", "1"]) == 0
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert len(rows) == 3 and all(r["loss"] > 0 for r in rows)
    res = tmp_path / "r.json"
    assert main(["eval", "--model", str(out), "--data", data, "--max_new_tokens", "4", "--output", str(res),
                 "--save_completions", "true"]) == 0
    samples = json.loads(res.read_text())["samples"]
    assert len(samples) == 16 and all(isinstance(s["completion"], str) for s in samples)
