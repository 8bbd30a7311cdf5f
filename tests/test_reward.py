"""Reward-model stage: BT loss by hand, ranked -> pairs, padding invariance, swap symmetry, bad input, end-to-end
training (full and LoRA), `align score`, and scoring text from a policy with another tokenizer."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from align.cli import main
from align.config import AlignError
from align.data import Rows
from align.heads import load_scalar_model, scalar_parts, sequence_scores, token_values
from align.scoring import RewardModelScorer
from align.comparisons import collate, ranked_pairs, tokenize_comparisons
from align.losses import comparison_loss

from conftest import write_jsonl


def softplus(x: float) -> float:  # -log sigmoid(-x)... i.e. -log σ(d) == softplus(-d)
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    from align.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "gpt2", arch="gpt2", hidden_size=32, num_layers=2,
                           num_heads=4, intermediate_size=64)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from align.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": f"What is {a}+{b}?", "chosen": str(a + b), "rejected": str(a + b - 10)})
    return rows


@pytest.fixture(scope="module")
def prefs_file(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("rmdata") / "prefs.jsonl", pair_rows(24, seed=3))


@pytest.fixture(scope="module")
def trained_rm(tiny_model_dir, prefs_file, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("rm") / "out")
    ranked = write_jsonl(os.path.join(os.path.dirname(prefs_file), "ranked.jsonl"),
                         [{"prompt": "What is 10+11?", "responses": ["21", "22", "11"]},
                          {"prompt": "What is 12+19?", "responses": ["21", "31", "41", "30"], "ranking": [3, 1, 4, 2]}])
    rc = main(["rm", "--model", tiny_model_dir, "--train_data", f"{prefs_file},{ranked}", "--eval_data", prefs_file,
               "--output_dir", out, "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
               "--max_length", "32", "--logging_steps", "1", "--disable_tqdm", "true",
               "--center_rewards_coefficient", "0.01"])
    assert rc == 0
    return out


# ---------------------------------------------------------------------------------------------------------------
# the math


def test_bt_loss_hand_computed_with_margin_and_centring():
    # one comparison, r_c = 1, r_w = 0: -log σ(1) = log(1 + e^-1) = 0.313262
    r = torch.tensor([1.0, 0.0])
    args = (torch.tensor([0]), torch.tensor([1]))
    g = dict(pair_group=torch.tensor([0]), response_group=torch.tensor([0, 0]), num_groups=1)
    loss, per_pair = comparison_loss(r, *args, torch.tensor([0.0]), **g)
    assert loss.item() == pytest.approx(0.3132617, abs=1e-6)
    # margin 0.5: -log σ(1 - 0.5) = log(1 + e^-0.5) = 0.474077
    loss, _ = comparison_loss(r, *args, torch.tensor([0.5]), **g)
    assert loss.item() == pytest.approx(0.4740770, abs=1e-6)
    # + centring 0.1 * mean(r²) = 0.1 * (1 + 0) / 2 = 0.05
    loss, _ = comparison_loss(r, *args, torch.tensor([0.5]), **g, center_coef=0.1)
    assert loss.item() == pytest.approx(0.5240770, abs=1e-6)
    # a margin larger than the gap: -log σ(1 - 3) = log(1 + e^2) = 2.126928
    loss, _ = comparison_loss(r, *args, torch.tensor([3.0]), **g)
    assert loss.item() == pytest.approx(2.1269280, abs=1e-6)


def test_ranked_comparison_is_averaged_per_prompt():
    # group 0: a pair with gap 1            -> 0.313262
    # group 1: K=3 with rewards 2, 1, 0     -> pairs gaps 1, 2, 1 -> (0.313262 + 0.126928 + 0.313262) / 3 = 0.251151
    # sum over groups = 0.564413 (the caller divides by the global number of comparisons: 2)
    r = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0])
    better, worse = torch.tensor([0, 2, 2, 3]), torch.tensor([1, 3, 4, 4])
    loss, per_pair = comparison_loss(r, better, worse, torch.zeros(4), torch.tensor([0, 1, 1, 1]),
                                     torch.tensor([0, 0, 1, 1, 1]), 2)
    assert per_pair.tolist() == pytest.approx([0.313262, 0.313262, 0.126928, 0.313262], abs=1e-6)
    assert loss.item() == pytest.approx(0.313262 + 0.251151, abs=1e-5)
    # centring: group 0 mean r² = 0.5, group 1 mean r² = (4 + 1 + 0) / 3 = 5/3; λ = 0.3 -> + 0.15 + 0.5
    loss_c, _ = comparison_loss(r, better, worse, torch.zeros(4), torch.tensor([0, 1, 1, 1]),
                                torch.tensor([0, 0, 1, 1, 1]), 2, center_coef=0.3)
    assert loss_c.item() == pytest.approx(loss.item() + 0.15 + 0.5, abs=1e-5)


def test_ranked_pairs_expansion():
    assert ranked_pairs([1, 2, 3]) == [(0, 1), (0, 2), (1, 2)]
    assert ranked_pairs([1, 2, 3, 4]) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # K(K-1)/2 = 6
    assert ranked_pairs([2, 1, 3]) == [(1, 0), (0, 2), (1, 2)]  # response 1 is best
    assert ranked_pairs([1, 1, 2]) == [(0, 2), (1, 2)]  # a tie makes no pair


def test_ranked_rows_encode_each_response_once_and_weigh_one_prompt(tok):
    rows = [{"prompt": "What is 1+2?", "chosen": "3", "rejected": "4"},
            {"prompt": "What is 2+2?", "responses": ["4", "5", "3"]},
            {"prompt": "What is 3+2?", "responses": ["6", "5", "4", "7"], "ranking": [2, 1, 3, 4]}]
    comps, skipped = tokenize_comparisons(Rows(rows, "x.jsonl", [1, 2, 3]), tok, max_length=32)
    assert skipped == 0 and [len(c.pairs) for c in comps] == [1, 3, 6]
    assert comps[2].pairs[0] == (1, 0)  # "5" (rank 1) beats "6"
    batch = collate(comps, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 + 3 + 4  # responses, not 2 x pairs
    # oracle: a slow loop over prompts, each the mean of its pairs' losses
    r = torch.randn(9)
    loss, _ = comparison_loss(r, batch["better"], batch["worse"], batch["margins"], batch["pair_group"],
                              batch["response_group"], batch["num_groups"])
    expect, off = 0.0, 0
    for c in comps:
        expect += sum(softplus(-(r[off + a] - r[off + b]).item()) for a, b in c.pairs) / len(c.pairs)
        off += len(c.sequences)
    assert loss.item() == pytest.approx(expect, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the model


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_rewards_do_not_depend_on_padding(which, tiny_model_dir, gpt2_dir):
    path = tiny_model_dir if which == "llama" else gpt2_dir
    model = load_scalar_model(path, seed=0, pad_token_id=0).eval()
    g = torch.Generator().manual_seed(0)
    lens = [5, 9, 7]
    seqs = [torch.randint(7, 60, (n,), generator=g).tolist() for n in lens]
    # pad id = eos id (2) on purpose: the reward must come from the attention mask, not from pad ids
    pad = 2

    def scores(left: int, right_extra: int):
        width = max(lens) + right_extra
        ids = torch.full((3, width + left), pad)
        att = torch.zeros((3, width + left), dtype=torch.long)
        for r, s in enumerate(seqs):
            start = left if r % 2 == 0 else left + width - len(s)  # rows alternate right / left padding
            ids[r, start:start + len(s)] = torch.tensor(s)
            att[r, start:start + len(s)] = 1
        with torch.no_grad():
            return sequence_scores(model, ids, att)

    with torch.no_grad():
        alone = torch.stack([sequence_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                             for s in seqs])
    for left, right in [(0, 0), (3, 0), (0, 4), (2, 5)]:
        torch.testing.assert_close(scores(left, right), alone, atol=1e-5, rtol=1e-5)
    # the per-token values at each last token are the sequence scores
    with torch.no_grad():
        v = token_values(model, torch.tensor([seqs[1]]), torch.ones(1, 9, dtype=torch.long))
    torch.testing.assert_close(v[0, -1], alone[1], atol=1e-6, rtol=1e-6)
    # the same model loaded twice has the same new head (deterministic initialisation)
    w2 = scalar_parts(load_scalar_model(path, seed=0))[1].weight
    assert torch.equal(scalar_parts(model)[1].weight, w2)


def test_swapping_chosen_and_rejected_flips_the_sign(trained_rm, prefs_file, tmp_path):
    rows = [json.loads(ln) for ln in open(prefs_file)]
    swapped = write_jsonl(tmp_path / "swapped.jsonl",
                          [dict(r, chosen=r["rejected"], rejected=r["chosen"]) for r in rows])
    scorer = RewardModelScorer(trained_rm, device="cpu")
    margin = scorer.score_texts([r["prompt"] for r in rows], [r["chosen"] for r in rows]) - \
        scorer.score_texts([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert (margin != 0).all()
    out = {}
    for name, f in (("orig", prefs_file), ("swap", swapped)):
        assert main(["score", "--reward_model", trained_rm, "--data", f, "--output", str(tmp_path / f"{name}.jsonl")]) == 0
        out[name] = [json.loads(ln) for ln in open(tmp_path / f"{name}.jsonl")]
    m_orig = torch.tensor([r["reward_chosen"] - r["reward_rejected"] for r in out["orig"]])
    m_swap = torch.tensor([r["reward_chosen"] - r["reward_rejected"] for r in out["swap"]])
    torch.testing.assert_close(m_swap, -m_orig, atol=1e-6, rtol=0)
    torch.testing.assert_close(m_orig, margin, atol=1e-5, rtol=0)
    # and so does the loss argument: BT(−d) = BT(d) + d
    d = m_orig
    from align.losses import bradley_terry_loss
    torch.testing.assert_close(bradley_terry_loss(-d, torch.zeros_like(d)),
                               bradley_terry_loss(d, torch.zeros_like(d)) + d, atol=1e-6, rtol=0)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_shared_prompt_layout_gives_the_same_rewards(which, tiny_model_dir, gpt2_dir, tok):
    from align.heads import ScalarModel
    from align.comparisons import batch_rewards

    rows = [{"prompt": "What is 12+34?", "chosen": "46", "rejected": "56"},
            {"prompt": "What is 2+2?", "responses": ["4", "5", "22", "3"]},
            {"prompt": "What is 99+99?", "chosen": "198", "rejected": "188"}]
    comps, _ = tokenize_comparisons(Rows(rows, "x.jsonl", [1, 2, 3]), tok, max_length=32)
    model = ScalarModel(load_scalar_model(tiny_model_dir if which == "llama" else gpt2_dir, pad_token_id=0)).eval()
    separate, shared = collate(comps, tok.pad_token_id), collate(comps, tok.pad_token_id, share_prompt=True)
    # the prompt runs once per comparison: 3 rows, and fewer tokens than 8 separate sequences
    assert shared["input_ids"].shape[0] == 3 and shared["input_ids"].numel() < separate["input_ids"].numel()
    with torch.no_grad():
        torch.testing.assert_close(batch_rewards(model, shared, "cpu"), batch_rewards(model, separate, "cpu"),
                                   atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("row, expect", [
    ({"prompt": "What is 1+2?", "chosen": "", "rejected": "4"}, "line 2, field 'chosen': empty value"),
    ({"prompt": "What is 1+2?", "chosen": "3"}, "line 2, field 'rejected': missing column"),
    ({"prompt": "What is 1+2?", "chosen": "3", "rejected": "3"}, "chosen and rejected are identical"),
    ({"prompt": "What is 1+2?", "responses": ["3"]}, "field 'responses': a ranked list needs at least 2"),
    ({"prompt": "What is 1+2?", "responses": ["3", "4"], "ranking": [1]}, "field 'ranking': expected a list"),
    ({"prompt": "What is 1+2?", "chosen": "3", "rejected": "4", "margin": "big"}, "field 'margin': expected a"),
    ({"prompt": "What is 1+2?", "chosen": "3" * 40, "rejected": "4"}, "max_length is 32"),
    ({"question": "x"}, "line 2: no comparison columns"),
])
def test_bad_rows_are_one_line_errors_before_anything_is_written(row, expect, tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}, row])
    out = tmp_path / "out"
    rc = main(["rm", "--model", tiny_model_dir, "--train_data", data, "--output_dir", str(out), "--max_length", "32",
               "--max_steps", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists()
    assert len(err.splitlines()) == 1 and f"{data}: " in err and expect in err, err


def test_bad_pairs_can_be_skipped_with_a_count(tok):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "a"}, {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "responses": ["a", "b"], "ranking": [1, 1]}]
    comps, skipped = tokenize_comparisons(Rows(rows, "x.jsonl", [1, 2, 3]), tok, 32, skip_bad=True)
    assert len(comps) == 1 and skipped == 2
    with pytest.raises(AlignError, match="x.jsonl: line 3, field 'ranking': all responses have the same rank"):
        tokenize_comparisons(Rows(rows[1:], "x.jsonl", [2, 3]), tok, 32)


# ---------------------------------------------------------------------------------------------------------------
# end to end


def test_trained_rm_reloads_with_transformers(trained_rm, prefs_file):
    from transformers import AutoModelForSequenceClassification

    rows = [json.loads(ln) for ln in open(trained_rm + "/metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    last = rows[-1]
    for k in ("loss", "accuracy", "reward_chosen_mean", "reward_chosen_std", "reward_rejected_mean",
              "reward_rejected_std", "margin", "eval_loss", "eval_accuracy"):
        assert math.isfinite(last[k]), k
    model = AutoModelForSequenceClassification.from_pretrained(trained_rm).eval()
    assert model.config.num_labels == 1
    scorer = RewardModelScorer(trained_rm, device="cpu")
    ids = scorer.encode("What is 12+34?", "46")
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([ids])).logits[0, 0]
    assert hf.item() == pytest.approx(scorer(["What is 12+34?"], ["46"])[0], abs=1e-5)


def test_gradient_accumulation_and_prompt_sharing_are_exact(tiny_model_dir, prefs_file, tmp_path):
    # 4 rows x 1 micro-batch == 2 rows x 2 micro-batches: same weights after two steps
    from safetensors.torch import load_file

    outs = []
    # and the shared-prompt layout (default) == every response a separate sequence
    for bs, acc, share in ((4, 1, "true"), (2, 2, "false")):
        out = str(tmp_path / f"bs{bs}")
        assert main(["rm", "--model", tiny_model_dir, "--train_data", prefs_file, "--output_dir", out,
                     "--max_steps", "2", "--per_device_train_batch_size", str(bs), "--gradient_accumulation_steps",
                     str(acc), "--learning_rate", "1e-3", "--max_length", "32", "--disable_tqdm", "true",
                     "--logging_steps", "1", "--share_prompt", share]) == 0
        outs.append((load_file(out + "/model.safetensors"), [json.loads(ln) for ln in open(out + "/metrics.jsonl")]))
    (w1, m1), (w2, m2) = outs
    # the loss and the gradient norm (before clipping) see any mis-normalisation, which Adam's updates would hide
    for a, b in zip(m1, m2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=1e-4)


def test_lora_rm_trains_and_saves_the_head(gpt2_dir, prefs_file, tmp_path):
    from safetensors.torch import load_file

    out = str(tmp_path / "lora")
    assert main(["rm", "--model", gpt2_dir, "--train_data", prefs_file, "--output_dir", out, "--max_steps", "2",
                 "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--max_length", "32",
                 "--use_lora", "true", "--lora_r", "4", "--disable_tqdm", "true"]) == 0
    saved = load_file(out + "/adapter_model.safetensors")
    head = [k for k in saved if "score" in k]
    assert head and any("lora" in k for k in saved)
    init = scalar_parts(load_scalar_model(gpt2_dir, seed=0))[1].weight
    trained = scalar_parts(load_scalar_model(out))[1].weight
    assert trained.shape == init.shape and not torch.allclose(trained, init)
    assert torch.equal(trained, saved[head[0]])


def test_align_score_writes_reward_column(trained_rm, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "What is 1+2?", "completion": "3", "id": 7},
                                              {"prompt": "What is 5+5?", "completion": "11", "id": 8}])
    assert main(["score", "--reward_model", trained_rm, "--data", data]) == 0
    rows = [json.loads(ln) for ln in open(tmp_path / "c.scored.jsonl")]
    assert [r["id"] for r in rows] == [7, 8] and all(isinstance(r["reward"], float) for r in rows)
    scorer = RewardModelScorer(trained_rm, device="cpu")
    assert [r["reward"] for r in rows] == pytest.approx(scorer(["What is 1+2?", "What is 5+5?"], ["3", "11"]),
                                                        abs=1e-5)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".score-")]  # no temporary file left


def _other_tokenizer():
    """A character-level tokenizer with different ids than the built-in one (digits last, no bos/roles)."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_letters + " ?+-=" + string.digits)
    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, **{c: i + 3 for i, c in enumerate(reversed(chars))}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def test_scoring_text_from_a_policy_with_another_tokenizer(trained_rm):
    scorer = RewardModelScorer(trained_rm, device="cpu")
    policy_tok = _other_tokenizer()
    prompts, completions = ["What is 12+30?", "What is 45+45?"], ["42", "80"]
    p_ids = [policy_tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    c_ids = [policy_tok(c, add_special_tokens=False)["input_ids"] + [policy_tok.eos_token_id] for c in completions]
    assert p_ids[0] != scorer.encode(prompts[0], completions[0])[:len(p_ids[0])]  # really another vocabulary
    assert not scorer.same_tokenizer(policy_tok) and scorer.same_tokenizer(scorer.tokenizer)
    expect = scorer(prompts, completions)
    got = scorer.score_token_ids(p_ids, c_ids, tokenizer=policy_tok).tolist()
    assert got == pytest.approx(expect, abs=1e-5)
    # same tokenizer: ids used directly, same rewards
    rp = [scorer.tokenizer(p)["input_ids"] for p in prompts]
    rc = [scorer.tokenizer(c)["input_ids"] + [scorer.tokenizer.eos_token_id] for c in completions]
    assert scorer.score_token_ids(rp, rc).tolist() == pytest.approx(expect, abs=1e-5)
