"""End-to-end SFT on a tiny model: learning, saving/loading, LoRA, exact resume, accumulation invariance,
bad input leaving output_dir untouched, and `align eval`."""

import json
import os

import pytest
from safetensors.torch import load_file

from align.cli import main
from conftest import read_metrics, write_jsonl

BASE = ["--max_length", "32", "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "5"]


def sft(model, data, out, *extra):
    argv = ["sft", "--model", model, "--train_data", data, "--output_dir", str(out), *BASE, *extra]
    assert main(argv) == 0
    return str(out)


def weights(out):
    return load_file(os.path.join(out, "model.safetensors"))


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_sft_learns_saves_and_reloads(tiny_model_dir, sft_file, eval_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = sft(tiny_model_dir, sft_file, tmp_path / "o", "--max_steps", "40", "--learning_rate", "1e-2",
              "--per_device_train_batch_size", "16", "--eval_data", eval_file)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 41))
    # uniform over the vocabulary is ln(263) = 5.57 nats; digits-and-eos only would be ln(11) = 2.40
    assert rows[0]["loss"] > 5.0 and rows[-1]["loss"] < 2.4
    assert "eval_loss" in rows[-1] and rows[-1]["eval_loss"] < rows[0]["loss"]
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers loads the result
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tok)


def test_grad_accumulation_equals_big_batch(tiny_model_dir, sft_file, tmp_path):
    common = ("--max_steps", "3", "--learning_rate", "1e-3")
    a = sft(tiny_model_dir, sft_file, tmp_path / "a", *common, "--per_device_train_batch_size", "8",
            "--gradient_accumulation_steps", "1")
    b = sft(tiny_model_dir, sft_file, tmp_path / "b", *common, "--per_device_train_batch_size", "1",
            "--gradient_accumulation_steps", "8")
    assert max_diff(weights(a), weights(b)) < 2e-6
    assert max_diff(weights(a), weights(tiny_model_dir)) > 1e-4  # it did train


def test_packing_does_not_change_training(tiny_model_dir, sft_file, tmp_path):
    common = ("--max_steps", "3", "--learning_rate", "1e-3", "--per_device_train_batch_size", "8")
    a = sft(tiny_model_dir, sft_file, tmp_path / "a", *common, "--packing", "true")
    b = sft(tiny_model_dir, sft_file, tmp_path / "b", *common, "--packing", "false")
    assert max_diff(weights(a), weights(b)) < 2e-6


def test_resume_gives_same_weights(tiny_model_dir, sft_file, tmp_path):
    common = ("--learning_rate", "1e-3", "--per_device_train_batch_size", "4", "--lr_scheduler_type", "cosine",
              "--warmup_steps", "2", "--save_steps", "3")
    full = sft(tiny_model_dir, sft_file, tmp_path / "full", *common, "--max_steps", "6")
    part = tmp_path / "part"
    sft(tiny_model_dir, sft_file, part, *common, "--max_steps", "6", "--save_steps", "3")
    # simulate a crash after step 3: keep only the step-3 checkpoint and its metrics, then resume
    assert os.path.isdir(part / "checkpoints" / "step-3")
    for f in ("model.safetensors",):
        os.remove(part / f)
    sft(tiny_model_dir, sft_file, part, *common, "--max_steps", "6", "--resume_from_checkpoint", "latest")
    assert max_diff(weights(full), weights(str(part))) == 0.0
    assert [r["step"] for r in read_metrics(str(part))] == list(range(1, 7))
    assert [r["loss"] for r in read_metrics(str(part))] == [r["loss"] for r in read_metrics(full)]


def test_lora_saves_adapter_that_peft_loads(tiny_model_dir, sft_file, tmp_path):
    from peft import AutoPeftModelForCausalLM

    out = sft(tiny_model_dir, sft_file, tmp_path / "lora", "--max_steps", "3", "--use_lora", "true", "--lora_r", "4",
              "--learning_rate", "1e-2", "--per_device_train_batch_size", "8")
    assert os.path.isfile(os.path.join(out, "adapter_config.json"))
    assert not os.path.isfile(os.path.join(out, "model.safetensors"))  # one copy of the base weights: the hub's
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora and any("mlp" in n for n in lora)  # all-linear default reaches the MLP too
    # the adapter directory is itself a valid `model` for the next stage (merged on load)
    assert main(["eval", "--model", out, "--data", sft_file, "--max_samples", "4", "--max_new_tokens", "4"]) == 0


@pytest.mark.parametrize("case", ["missing_file", "bad_json", "missing_column", "empty_column", "too_long",
                                  "unknown_field", "not_a_model"])
def test_bad_input_one_line_error_and_untouched_output(case, tiny_model_dir, sft_file, tmp_path, capsys):
    data, model, extra = sft_file, tiny_model_dir, []
    if case == "missing_file":
        data = str(tmp_path / "nope.jsonl")
    elif case == "bad_json":
        data = str(tmp_path / "bad.jsonl")
        with open(data, "w") as fh:
            fh.write('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    elif case == "missing_column":
        data = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    elif case == "empty_column":
        data = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "completion": ""}])
    elif case == "too_long":
        data = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "x" * 50, "completion": "b"}])
    elif case == "unknown_field":
        extra = ["--learning_rat", "1"]
    elif case == "not_a_model":
        model = str(tmp_path)
    out = tmp_path / "out"
    rc = main(["sft", "--model", model, "--train_data", data, "--output_dir", str(out), "--max_steps", "1",
               "--max_length", "32", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    expect = {"missing_file": "nope.jsonl", "bad_json": "bad.jsonl: line 2", "missing_column": "line 2, field 'completion'",
              "empty_column": "line 1, field 'completion'", "too_long": "line 1, field 'prompt'",
              "unknown_field": "learning_rat", "not_a_model": "not a model directory"}[case]
    assert expect in err[0]
    assert not out.exists()


def test_non_empty_output_dir_is_refused(tiny_model_dir, sft_file, tmp_path, capsys):
    out = tmp_path / "used"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["sft", "--model", tiny_model_dir, "--train_data", sft_file, "--output_dir", str(out)]) == 2
    assert os.listdir(out) == ["keep.txt"]


def test_eval_reports_gold_accuracy(tiny_model_dir, tmp_path, capsys):
    # a model trained hard on 4 problems answers them; eval's reward_mean is the fraction exactly right
    rows = [{"prompt": f"What is {a}+{b}?", "completion": str(a + b), "answer": str(a + b)}
            for a, b in [(11, 22), (40, 41), (75, 13), (20, 30)]]
    data = write_jsonl(tmp_path / "four.jsonl", rows)
    out = sft(tiny_model_dir, data, tmp_path / "o", "--max_steps", "60", "--learning_rate", "1e-2",
              "--per_device_train_batch_size", "4", "--lr_scheduler_type", "constant")
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [dict(r, answer="0") for r in rows])
    res_file = tmp_path / "r.json"
    assert main(["eval", "--model", out, "--data", data, "--output", str(res_file)]) == 0
    res = json.loads(res_file.read_text())
    assert res["reward_mean"] == 1.0 and res["num_samples"] == 4
    assert main(["eval", "--model", out, "--data", wrong, "--output", str(res_file)]) == 0
    assert json.loads(res_file.read_text())["reward_mean"] == 0.0
    # a data set with other column names, mapped on the command line (YAML flow syntax)
    renamed = write_jsonl(tmp_path / "renamed.jsonl",
                          [{"question": r["prompt"], "solution": r["answer"]} for r in rows])
    assert main(["eval", "--model", out, "--data", renamed, "--output", str(res_file),
                 "--column_map", "{prompt: question, answer: solution}"]) == 0
    assert json.loads(res_file.read_text())["reward_mean"] == 1.0


def test_column_map_trains_exactly_as_the_usual_names(tiny_model_dir, sft_file, tmp_path, capsys):
    with open(sft_file) as fh:
        rows = [json.loads(line) for line in fh]
    # 'prompt' here is a decoy: the mapping makes 'question' the prompt, and the old column must not leak in
    renamed = [{"question": r["prompt"], "prompt": "ignore me", "solution": r["completion"]} for r in rows]
    data = write_jsonl(tmp_path / "renamed.jsonl", renamed)
    a = sft(tiny_model_dir, sft_file, tmp_path / "a", "--max_steps", "3")
    b = sft(tiny_model_dir, data, tmp_path / "b", "--max_steps", "3",
            "--column_map", '{"prompt": "question", "completion": "solution"}')
    assert max_diff(weights(a), weights(b)) == 0.0
    # errors name the data's own column, and a mapped column that is not there is one clear line
    renamed[1]["solution"] = " "
    data = write_jsonl(tmp_path / "bad.jsonl", renamed)
    argv = ["sft", "--model", tiny_model_dir, "--train_data", data, "--output_dir", str(tmp_path / "c"), *BASE,
            "--column_map", "{prompt: question, completion: solution}"]
    assert main(argv) == 2
    assert "bad.jsonl: line 2, field 'solution': empty value" in capsys.readouterr().err
    argv[-1] = "{prompt: question, completion: answer}"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("bad.jsonl: column_map: no column 'answer' to use as 'completion' (columns: prompt, question, "
                        "solution)") and "\n" not in err
    assert not os.path.exists(tmp_path / "c")


def test_row_capacity_picks_the_cheapest_layout_by_hand():
    from align.trainers.sft import layout_cost, row_capacity

    h = 64  # per token 12 h^2 = 49152, per token pair 4 h = 256
    # 64 sequences of 10 tokens: padding costs 64 rows x 10 x (49152 + 2560); packing into rows of 10 is the same
    # layout (not cheaper) and every longer row adds attention for nothing: pad
    assert layout_cost(64, 10, h) == 64 * 10 * (49152 + 2560)
    assert row_capacity([10] * 64, 512, h) == 0
    # one of 100 and nine of 10: padding 10 x 100 x (49152 + 25600) = 74.8 M; rows of 100: [100], [10 x 9]
    # -> 2 x 100 x (49152 + 25600) = 15.0 M; rows of 200: one row of 190 -> 190 x (49152 + 48640) = 18.6 M
    assert row_capacity([100] + [10] * 9, 512, h) == 100
    # a wide model makes attention relatively cheap: one long row wins (h = 4096: rows of 200 cost 190 x
    # (201326592 + 3112960) against 2 x 100 x (201326592 + 1638400))
    assert row_capacity([100] + [10] * 9, 512, 4096) == 200


def test_every_batch_layout_gives_the_padded_loss(tiny_model_dir):
    import random

    import torch

    from align.data import SFTExample
    from align.models import SelectiveLM, load_causal_lm
    from align.trainers.sft import collate, token_loss_sum

    rng = random.Random(0)
    lm = SelectiveLM(load_causal_lm(tiny_model_dir).eval())
    examples = []
    for n in [30] + [rng.randint(3, 8) for _ in range(11)]:
        ids = [rng.randint(10, 60) for _ in range(n)]
        examples.append(SFTExample(ids, [-100] * (n // 2) + ids[n // 2:]))
    with torch.no_grad():
        padded, n_pad = token_loss_sum(lm, collate(examples, False, 64, 0), "cpu")
        for hidden in (0, 32, 4096):  # rows of max_length, the cheapest for a narrow and a wide model
            batch = collate(examples, True, 64, 0, hidden)
            loss, n = token_loss_sum(lm, batch, "cpu")
            assert n == n_pad
            torch.testing.assert_close(loss, padded, rtol=1e-5, atol=1e-4)
    assert collate(examples, True, 64, 0, 32)["input_ids"].shape != collate(examples, True, 64, 0, 0)["input_ids"].shape


@pytest.mark.parametrize("chunk_elements", [None, 64])
def test_sft_loss_is_the_cross_entropy_of_the_full_logits(tiny_model_dir, chunk_elements, monkeypatch):
    """token_loss_sum asks the SelectiveLM for the targets' log-probs (chunked when the logits would be large: a
    64-element budget runs the head one row at a time): its loss and every gradient equal the cross-entropy of
    the whole model's logits at the target positions, computed the plain way."""
    import torch
    import torch.nn.functional as F

    import align.models as M
    from align.data import SFTExample
    from align.trainers.sft import collate, token_loss_sum

    if chunk_elements:
        monkeypatch.setattr(M, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    model = M.load_causal_lm(tiny_model_dir)
    lm = M.SelectiveLM(model)
    examples = [SFTExample(ids, [-100] * 3 + ids[3:]) for ids in ([11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24],
                                                                  [30, 31, 32, 33, 34, 35, 36, 37])]
    batch = collate(examples, False, 64, 0)
    loss, n = token_loss_sum(lm, batch, "cpu")
    grads = torch.autograd.grad(loss, list(model.parameters()))

    labels = batch["labels"]
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    # the collated labels are the next tokens (position t holds token t + 1), IGNORE_INDEX where no loss is taken
    assert torch.equal(labels[0, 2:5], batch["input_ids"][0, 3:6])
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100,
                          reduction="sum")
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert n == int((labels != -100).sum()) == 3 + 2 + 5
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
