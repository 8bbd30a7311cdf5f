"""The shared rollout loop: sampling with a KV cache, logprobs that match a fresh forward, EOS masking,
left-padding invariance, prompt-once num_return_sequences, reproducible sampling, and reward scoring."""

import pytest
import torch

from align.config import AlignError
from align.data import encode_prompt, left_pad
from align.models import SelectiveLM, load_causal_lm, load_tokenizer
from align.rewards import exact_match, format_digits
from align.rollout import (Rollout, completion_logprobs, filter_logits, generate, make_generator, make_rollout,
                           score, sequence_inputs)

PROMPTS = ["What is 12+34?", "Hi", "What is 99+10? Tell me."]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir)
    model.eval()
    return model, tok


def batch(tok, prompts):
    return left_pad([encode_prompt(tok, p) for p in prompts], tok.pad_token_id)


def gen(model, tok, ids, att, **kw):
    kw.setdefault("max_new_tokens", 8)
    return generate(model, ids, att, eos_id=kw.pop("eos_id", tok.eos_token_id), pad_id=tok.pad_token_id, **kw)


@pytest.mark.parametrize("temperature,g", [(0.7, 1), (1.3, 3)])
def test_rollout_logprobs_equal_fresh_forward(lm, temperature, g):
    model, tok = lm
    ids, att = batch(tok, PROMPTS)
    s = gen(model, tok, ids, att, temperature=temperature, num_return_sequences=g,
            generator=make_generator("cpu", 0, temperature))
    assert s.completion_ids.shape == (3 * g, 8) and s.prompt_ids.shape == (3 * g, ids.shape[1])
    with torch.no_grad():
        fresh, _ = completion_logprobs(SelectiveLM(model), s, temperature)
        at_t1, _ = completion_logprobs(SelectiveLM(model), s, 1.0)
    torch.testing.assert_close(s.logprobs, fresh, atol=2e-5, rtol=0)
    # the temperature is really applied: at T = 1 the same tokens have other logprobs
    assert (s.logprobs - at_t1).abs().max() > 1e-2


def test_eos_stops_and_masks_the_tail(lm):
    model, tok = lm
    ids, att = batch(tok, PROMPTS)
    free = gen(model, tok, ids, att, greedy=True, eos_id=None)
    eos = int(free.completion_ids[0, 2])  # make row 0's third greedy token the "EOS"
    s = gen(model, tok, ids, att, greedy=True, eos_id=eos)
    row = s.completion_ids[0]
    assert row[:3].tolist() == free.completion_ids[0, :3].tolist()
    assert s.completion_mask[0].tolist() == [1, 1, 1] + [0] * (s.completion_ids.shape[1] - 3)
    assert (row[3:] == tok.pad_token_id).all() and (s.logprobs[0, 3:] == 0).all()
    assert bool(s.eos[0])
    for r in range(1, 3):  # other rows are untouched until their own EOS
        n = int(s.completion_mask[r].sum())
        assert s.completion_ids[r, :n].tolist() == free.completion_ids[r, :n].tolist()
        assert bool(s.eos[r]) == (eos in free.completion_ids[r, :n].tolist())


def test_left_padding_does_not_change_generation(lm):
    model, tok = lm
    alone = [gen(model, tok, *batch(tok, [p]), greedy=True) for p in PROMPTS]
    together = gen(model, tok, *batch(tok, PROMPTS), greedy=True)
    for i, a in enumerate(alone):
        n = a.completion_ids.shape[1]
        assert together.completion_ids[i, :n].tolist() == a.completion_ids[0].tolist()
        torch.testing.assert_close(together.logprobs[i, :n], a.logprobs[0], atol=2e-5, rtol=0)
    # extra left padding on top changes nothing either
    ids, att = batch(tok, PROMPTS)
    pad = torch.full((3, 5), tok.pad_token_id)
    wider = gen(model, tok, torch.cat([pad, ids], 1), torch.cat([torch.zeros_like(pad), att], 1), greedy=True)
    assert wider.completion_ids.tolist() == together.completion_ids.tolist()


def test_num_return_sequences_prefills_once_and_equals_repeated_prompts(lm):
    model, tok = lm
    g = 3
    ids, att = batch(tok, PROMPTS)
    once = gen(model, tok, ids, att, greedy=True, num_return_sequences=g)
    repeated = gen(model, tok, *batch(tok, [p for p in PROMPTS for _ in range(g)]), greedy=True)
    assert once.completion_ids.tolist() == repeated.completion_ids.tolist()
    torch.testing.assert_close(once.logprobs, repeated.logprobs, atol=2e-5, rtol=0)
    assert once.prompt_ids.tolist() == repeated.prompt_ids.tolist()

    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        gen(model, tok, ids, att, greedy=True, num_return_sequences=g, max_new_tokens=3)
    finally:
        handle.remove()
    assert calls[0] == ids.shape  # the prompts went through the model once, not g times
    assert all(c == (3 * g, 1) for c in calls[1:])


def test_sampling_is_reproducible_from_the_generator(lm):
    model, tok = lm
    ids, att = batch(tok, PROMPTS)
    a = gen(model, tok, ids, att, generator=make_generator("cpu", 1, 5, 0))
    b = gen(model, tok, ids, att, generator=make_generator("cpu", 1, 5, 0))
    c = gen(model, tok, ids, att, generator=make_generator("cpu", 1, 6, 0))
    assert a.completion_ids.tolist() == b.completion_ids.tolist()
    assert a.completion_ids.tolist() != c.completion_ids.tolist()


def test_filter_logits_top_k_and_top_p():
    z = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]]))
    # top-2: everything below the 2nd largest logit goes; the tie at 0.2 keeps both 0.2 tokens
    assert filter_logits(z, top_k=2).isinf().tolist() == [[False, False, False, True]]
    assert filter_logits(z, top_k=1).isinf().tolist() == [[False, True, True, True]]
    # nucleus 0.6: 0.5 alone is below it, 0.5 + 0.2 reaches it -> keep the two most likely (the tie at 0.2 is
    # broken by sort order, one of the two 0.2 tokens stays)
    kept = ~filter_logits(z, top_p=0.6).isinf()
    assert kept[0, 0] and int(kept.sum()) == 2
    assert int((~filter_logits(z, top_p=0.5).isinf()).sum()) == 1  # 0.5 reaches 0.5 by itself
    assert not filter_logits(z, top_p=1.0).isinf().any()


def test_sequence_inputs_select_the_positions_before_each_completion_token():
    p_ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    p_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    c_ids = torch.tensor([[10, 2, 0], [11, 12, 2]])
    c_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    inp = sequence_inputs(p_ids, p_mask, c_ids, c_mask)
    assert inp["position_ids"].tolist() == [[0, 0, 1, 2, 3, 3], [0, 1, 2, 3, 4, 5]]
    assert inp["select"].long().tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]]


# ---------------------------------------------------------------------------------------------------------------
# scoring


def test_score_mixes_sources_with_weights_and_missing_eos_penalty(tmp_path):
    user = tmp_path / "my_reward.py"
    user.write_text("def long_answer(prompts, completions, answer, **kw):\n"
                    "    return [len(c) + (10.0 if a == '7' else 0.0) for c, a in zip(completions, answer)]\n")
    from align.rewards import load_function

    sources = {"exact_match": exact_match, "format_digits": format_digits,
               "long_answer": load_function(f"{user}:long_answer")}
    prompts = ["a", "b", "c"]
    texts = ["7", "x8", "9"]
    cols = {"answer": ["7", "8", "1"]}
    eos = torch.tensor([True, True, False])
    total, comps = score(prompts, texts, cols, eos, sources, weights=[2.0, 0.5, 1.0], missing_eos_penalty=3.0)
    assert comps["exact_match"].tolist() == [1.0, 0.0, 0.0]
    assert comps["format_digits"].tolist() == [1.0, 0.0, 1.0]
    assert comps["long_answer"].tolist() == [11.0, 2.0, 1.0]
    # row 0: 2*1 + 0.5*1 + 11 = 13.5; row 1: 0 + 0 + 2 = 2; row 2: 0 + 0.5 + 1 - 3 (no EOS) = -1.5
    assert total.tolist() == [13.5, 2.0, -1.5]


def test_a_failing_reward_function_is_reported_with_its_input():
    def broken(prompts, completions, **kw):
        raise KeyError("boom")

    with pytest.raises(AlignError, match=r"reward 'broken' failed at prompt 'p0', completion 'c0': KeyError"):
        score(["p0"], ["c0"], {}, torch.tensor([True]), {"broken": broken})


def test_make_rollout_repeats_prompt_columns_per_group_and_subset_trims(lm):
    model, tok = lm
    prompts = ["What is 3+4?", "Hi"]
    ids, att = batch(tok, prompts)
    s = gen(model, tok, ids, att, num_return_sequences=2, generator=make_generator("cpu", 3))
    seen = {}

    def spy(prompts, completions, answer, **kw):
        seen.update(prompts=prompts, answer=answer)
        return [float(len(c)) for c in completions]

    r = make_rollout(s, tok, prompts, {"answer": ["7", "x"]}, {"spy": spy}, gold_sources={"em": exact_match},
                     ref_fn=lambda r: torch.zeros_like(r.logprobs))
    assert isinstance(r, Rollout) and r.group_size == 2 and len(r) == 4
    assert seen["prompts"] == ["What is 3+4?"] * 2 + ["Hi"] * 2 and seen["answer"] == ["7", "7", "x", "x"]
    assert r.rewards.tolist() == [float(len(t)) for t in r.texts]
    assert set(r.gold_rewards) == {"em"} and r.ref_logprobs.shape == r.logprobs.shape and r.values is None
    sub = r.subset([2, 3])  # the "Hi" rows: the longer prompt's extra left padding is dropped
    assert sub.prompt_ids.shape[1] == len(encode_prompt(tok, "Hi"))
    assert sub.prompts == ["Hi", "Hi"] and sub.columns["answer"] == ["x", "x"]
    assert sub.completion_ids.shape[1] == int(sub.completion_mask.sum(-1).max())
    torch.testing.assert_close(sub.logprobs, r.logprobs[2:, :sub.completion_ids.shape[1]])
