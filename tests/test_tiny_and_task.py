"""The built-in tiny model (align.tiny) and the built-in addition task (align.task)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.task import (
    FILES,
    P_FORGET,
    forgot_carry_answer,
    gold_answer,
    generate_task,
    has_carry,
    make_prompt,
    parse_prompt,
)
from align.tiny import ARCHS, DEFAULT_TINY, build_model, build_tokenizer, save_tiny_model

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# ---------------------------------------------------------------- tokenizer


def test_one_token_per_character_and_no_automatic_specials(tok):
    ids = tok("What is 47+38?")["input_ids"]
    assert len(ids) == len("What is 47+38?") == 14
    assert tok.convert_ids_to_tokens(ids)[8:13] == ["4", "7", "+", "3", "8"]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids


@pytest.mark.parametrize(
    "text",
    ["What is 47+38?", "85", "", "  two  spaces\nnew line\ttab", "a*b/c-d=e.,:!'\"()", "héllo 日本 <>{}[]|~"],
)
def test_decode_encode_round_trip(tok, text):
    assert tok.decode(tok(text)["input_ids"]) == text


def test_special_tokens(tok):
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    assert tok.padding_side == "right"
    # special tokens in text are one token each and are dropped by skip_special_tokens
    ids = tok("85<eos>")["input_ids"]
    assert ids[-1] == tok.eos_token_id and len(ids) == 3
    assert tok.decode(ids, skip_special_tokens=True) == "85"
    # the tokenizer is rebuilt identically
    assert build_tokenizer().get_vocab() == tok.get_vocab()


def test_chat_template(tok):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 47+38?"},
        {"role": "assistant", "content": "85"},
    ]
    full = tok.apply_chat_template(conv, tokenize=False)
    assert full == "<|system|>Be brief.\n<|user|>What is 47+38?\n<|assistant|>85<eos>"
    prompt = tok.apply_chat_template(conv[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|system|>Be brief.\n<|user|>What is 47+38?\n<|assistant|>"
    assert full == prompt + "85" + tok.eos_token  # prompt rendering is an exact prefix
    no_gen = tok.apply_chat_template(conv[1:2], tokenize=False)
    assert no_gen == "<|user|>What is 47+38?\n"
    out = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    mask = out["assistant_masks"]
    assert sum(mask) == 3 and mask[-3:] == [1, 1, 1]  # "8", "5", <eos>
    assert out["input_ids"][-1] == tok.eos_token_id


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("arch", ARCHS)
def test_build_save_reload_generate(arch, tok, tmp_path):
    model = build_model(tok, arch=arch, seed=3, **SMALL)
    cfg = model.config
    assert cfg.model_type == arch and cfg.vocab_size == len(tok)
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    gen = model.generation_config
    assert (gen.pad_token_id, gen.bos_token_id, gen.eos_token_id) == (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    assert cfg.get_text_config().hidden_size == 32 and cfg.get_text_config().num_hidden_layers == 2
    assert next(model.parameters()).dtype == torch.float32

    path = save_tiny_model(tmp_path / arch, arch=arch, seed=3, **SMALL)
    assert (Path(path) / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tok2 = AutoTokenizer.from_pretrained(path, local_files_only=True)
    texts = ["What is 47+38?85", "What is 1+2?"]
    assert [tok2(t)["input_ids"] for t in texts] == [tok(t)["input_ids"] for t in texts]
    assert tok2.chat_template == tok.chat_template and tok2.eos_token_id == tok.eos_token_id

    batch = tok(texts, return_tensors="pt", padding=True)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)

    prompt = tok(["What is 47+38?"], return_tensors="pt")
    out = loaded.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1 and 14 < out.shape[1] <= 17


def test_build_model_is_deterministic_and_leaves_global_rng(tok):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(tok, seed=5, **SMALL)
    after = torch.rand(3)
    b = build_model(tok, seed=5, **SMALL)
    c = build_model(tok, seed=6, **SMALL)
    assert torch.equal(after, expected)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_default_tiny_and_bad_args(tok):
    kwargs = {k: v for k, v in DEFAULT_TINY.items() if k != "arch"}
    model = build_model(tok, arch=DEFAULT_TINY["arch"], **kwargs)
    assert model.config.hidden_size == DEFAULT_TINY["hidden_size"]
    with pytest.raises(ValueError, match="unknown tiny arch"):
        build_model(tok, arch="bert")
    with pytest.raises(ValueError, match="divisible"):
        build_model(tok, hidden_size=30, num_heads=4)


def test_tiny_model_cli(tmp_path, capsys):
    from align.cli import main

    out = tmp_path / "cli"
    assert main(["tiny-model", "--output_dir", str(out), "--arch", "gpt2", "--hidden_size", "32",
                 "--num_heads", "4", "--intermediate_size", "0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.model_type == "gpt2" and model.config.n_inner == 128  # 0 -> 4 * hidden_size
    assert printed["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert main(["tiny-model"]) == 2  # output_dir is required
    assert main(["tiny-model", "--output_dir", str(tmp_path / "x"), "--hidden_size", "30"]) == 2


# ---------------------------------------------------------------- task


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("addition")
    generate_task(out)
    return out


def test_prompt_helpers():
    assert make_prompt(47, 38) == "What is 47+38?"
    assert parse_prompt("<|user|>What is 47+38?\n<|assistant|>") == (47, 38)
    assert gold_answer("What is 47+38?") == "85" and gold_answer("What is 99+99?") == "198"
    assert has_carry(47, 38) and not has_carry(41, 38) and has_carry(15, 15)
    assert forgot_carry_answer(47, 38) == 75
    with pytest.raises(ValueError):
        parse_prompt("What is 4 plus 3?")


def test_generator_is_deterministic(task_dir, tmp_path):
    generate_task(tmp_path / "again")
    generate_task(tmp_path / "other", seed=1)
    for name in FILES:
        assert (task_dir / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    assert (task_dir / "sft.jsonl").read_bytes() != (tmp_path / "other" / "sft.jsonl").read_bytes()


def test_committed_files_match_the_generator(task_dir):
    for name in FILES:
        committed = REPO / "data" / "addition" / name
        assert committed.read_bytes() == (task_dir / name).read_bytes(), (
            f"{committed} is stale: run `python -m align.task data/addition`")


def test_columns_and_sizes(task_dir):
    columns = {
        "sft.jsonl": ["prompt", "completion"],
        "prefs.jsonl": ["prompt", "chosen", "rejected"],
        "prefs_eval.jsonl": ["prompt", "chosen", "rejected"],
        "ranked.jsonl": ["prompt", "responses"],
        "rl_prompts.jsonl": ["prompt", "answer"],
        "eval.jsonl": ["prompt", "answer"],
    }
    for name, cols in columns.items():
        rows = read(task_dir / name)
        assert rows and all(list(r) == cols for r in rows), name
    assert len(read(task_dir / "eval.jsonl")) == len(read(task_dir / "prefs_eval.jsonl")) == 500


def test_eval_problems_are_held_out(task_dir):
    evals = {r["prompt"] for r in read(task_dir / "eval.jsonl")}
    assert len(evals) == 500
    assert {r["prompt"] for r in read(task_dir / "prefs_eval.jsonl")} == evals
    # stratified: 45% of all (a, b) pairs carry, and so do exactly 225 of the 500 eval problems
    assert sum(has_carry(*parse_prompt(p)) for p in evals) == 225
    for name in ("sft.jsonl", "prefs.jsonl", "ranked.jsonl", "rl_prompts.jsonl"):
        train = {r["prompt"] for r in read(task_dir / name)}
        assert not train & evals, name
        for p in train:
            a, b = parse_prompt(p)
            assert 10 <= a <= 99 and 10 <= b <= 99


def test_answers_are_correct(task_dir):
    for name in ("eval.jsonl", "rl_prompts.jsonl"):
        for r in read(task_dir / name):
            assert r["answer"] == gold_answer(r["prompt"]), (name, r)
    for name in ("prefs.jsonl", "prefs_eval.jsonl"):
        rows = read(task_dir / name)
        forgot = 0
        for r in rows:
            assert r["chosen"] == gold_answer(r["prompt"]) != r["rejected"], (name, r)
            forgot += int(r["rejected"]) == forgot_carry_answer(*parse_prompt(r["prompt"]))
        assert forgot > len(rows) * 0.25  # the demonstrator's error is the typical rejected answer
    for r in read(task_dir / "ranked.jsonl"):
        responses, gold = r["responses"], int(gold_answer(r["prompt"]))
        assert len(responses) == 4 == len(set(responses)) and responses[0] == str(gold)
        distances = [abs(int(x) - gold) for x in responses]
        assert distances == sorted(distances) and len(set(distances)) == 4  # best first, no ties
        if has_carry(*parse_prompt(r["prompt"])):
            assert str(forgot_carry_answer(*parse_prompt(r["prompt"]))) in responses


def test_sft_errors_follow_the_forgotten_carry(task_dir):
    carry_rows = wrong_on_carry = 0
    for r in read(task_dir / "sft.jsonl"):
        a, b = parse_prompt(r["prompt"])
        if has_carry(a, b):
            carry_rows += 1
            if r["completion"] != str(a + b):
                assert r["completion"] == str(a + b - 10), r  # the only error is the dropped carry
                wrong_on_carry += 1
        else:
            assert r["completion"] == str(a + b), r  # no-carry demonstrations are always right
    assert carry_rows > 1000
    assert abs(wrong_on_carry / carry_rows - P_FORGET) < 0.05  # ~1800 rows: 4 standard deviations
