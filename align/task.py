"""The built-in task: 2-digit addition with a human-like error in the demonstrations.

Problems are ``"What is {a}+{b}?"`` with ``a, b`` uniform in 10..99; the answer is the plain decimal sum.
The SFT demonstrator forgets the ones carry (answers ``a + b - 10``) with probability ``p_forget`` whenever
``a % 10 + b % 10 >= 10``, and is always right otherwise. A model that imitates it answers no-carry problems
correctly and carry problems mostly wrong when decoding greedily, yet still samples the right answer some of
the time, which gives reward-model training and RL something to fix.

Files written by :func:`generate_task` (JSON lines, UTF-8, keys in the order shown):

=================  ==================================  ==================================================
file               columns                             problems
=================  ==================================  ==================================================
sft.jsonl          prompt, completion                  training pool, with the demonstrator's errors
prefs.jsonl        prompt, chosen, rejected            training pool; chosen is always correct
ranked.jsonl       prompt, responses (best first)      training pool; correct, then wrong by closeness
rl_prompts.jsonl   prompt, answer                      training pool; answer is correct
eval.jsonl         prompt, answer                      the held-out eval problems
prefs_eval.jsonl   prompt, chosen, rejected            the held-out eval problems
=================  ==================================  ==================================================

The eval problems are a fixed random set of (a, b) pairs, stratified to the population's 45% carry problems,
that appear in no training file. Regenerate the
committed files with ``python -m align.task data/addition``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re

from .data import write_atomic

__all__ = [
    "LOW",
    "HIGH",
    "P_FORGET",
    "make_prompt",
    "parse_prompt",
    "gold_answer",
    "has_carry",
    "forgot_carry_answer",
    "generate_task",
    "main",
]

LOW, HIGH = 10, 99
P_FORGET = 0.7
_PROMPT_RE = re.compile(r"What is (\d+)\+(\d+)\?")

FILES = ("sft.jsonl", "prefs.jsonl", "ranked.jsonl", "rl_prompts.jsonl", "eval.jsonl", "prefs_eval.jsonl")


def make_prompt(a: int, b: int) -> str:
    """``"What is {a}+{b}?"``."""
    return f"What is {a}+{b}?"


def parse_prompt(prompt: str) -> tuple[int, int]:
    """The operands of a task prompt; the prompt may be embedded in longer text (e.g. a chat rendering)."""
    m = _PROMPT_RE.search(prompt)
    if m is None:
        raise ValueError(f"not an addition prompt: {prompt!r}")
    return int(m.group(1)), int(m.group(2))


def gold_answer(prompt: str) -> str:
    """The correct answer string for a task prompt: ``gold_answer("What is 47+38?") == "85"``."""
    a, b = parse_prompt(prompt)
    return str(a + b)


def has_carry(a: int, b: int) -> bool:
    """Whether the ones digits carry (``a % 10 + b % 10 >= 10``), i.e. whether the demonstrator can err."""
    return a % 10 + b % 10 >= 10


def forgot_carry_answer(a: int, b: int) -> int:
    """The demonstrator's wrong answer on a carry problem: the ones carry dropped, ``a + b - 10``."""
    return a + b - 10


def _all_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]


def _wrong_answer(a: int, b: int, rng: random.Random, p_forgot: float) -> int:
    """A plausible wrong answer: the forgotten carry (carry problems, probability ``p_forgot``), else +-1 / +-10."""
    correct = a + b
    if has_carry(a, b) and rng.random() < p_forgot:
        return forgot_carry_answer(a, b)
    return correct + rng.choice((-10, -1, 1, 10))


def _ranked_responses(a: int, b: int, k: int, rng: random.Random) -> list[str]:
    """``k`` answers best first: the correct one, then ``k - 1`` wrong ones at increasing distance from it.

    Distances are drawn without replacement from (1, 2, 10, 11, 20) so the order is never ambiguous; a carry
    problem always includes the forgotten-carry answer (distance 10, below the correct answer).
    """
    correct = a + b
    distances = [1, 2, 10, 11, 20]
    if has_carry(a, b):
        distances.remove(10)
        chosen = {10: -1} | {d: rng.choice((-1, 1)) for d in rng.sample(distances, k - 2)}
    else:
        chosen = {d: rng.choice((-1, 1)) for d in rng.sample(distances, k - 1)}
    wrong = [correct + sign * d for d, sign in sorted(chosen.items())]
    return [str(correct)] + [str(w) for w in wrong]


def _write_jsonl(path: str, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def generate_task(
    out_dir: str | os.PathLike,
    seed: int = 0,
    p_forget: float = P_FORGET,
    n_eval: int = 500,
    n_sft: int = 4000,
    n_prefs: int = 7600,
    n_ranked: int = 1000,
    n_rl: int = 1000,
    k_ranked: int = 4,
    p_rejected_forgot: float = 0.8,
) -> dict[str, str]:
    """Write the task's JSONL files to ``out_dir``; same arguments -> byte-identical files.

    Args:
        out_dir: folder to write into (created if missing).
        seed: seeds the eval split, every sample and every error.
        p_forget: probability that an SFT demonstration of a carry problem drops the carry (answer - 10).
        n_eval: number of held-out eval problems (distinct (a, b) pairs); ``prefs_eval.jsonl`` has one pair each.
        n_sft, n_prefs, n_ranked, n_rl: rows in each training file. Each file walks its own shuffle of the
            training pool (all other pairs), so a file repeats a problem only once it has used every one.
        k_ranked: answers per row of ``ranked.jsonl`` (2..5).
        p_rejected_forgot: for carry problems, probability that the rejected answer of a preference pair is
            the forgotten-carry answer (otherwise +-1 or +-10 off, as for no-carry problems).

    Returns:
        ``{file name: path}`` for every file written.
    """
    if not 0.0 <= p_forget <= 1.0:
        raise ValueError(f"p_forget must be in [0, 1], got {p_forget}")
    if not 2 <= k_ranked <= 5:
        raise ValueError(f"k_ranked must be in 2..5, got {k_ranked}")
    pairs = _all_pairs()
    if not 0 < n_eval < len(pairs):
        raise ValueError(f"n_eval must be in 1..{len(pairs) - 1}, got {n_eval}")
    rng = random.Random(seed)
    order = list(pairs)
    rng.shuffle(order)
    # stratified: the eval set has the population's carry fraction (45 of the 100 ones-digit pairs carry)
    carry = [p for p in order if has_carry(*p)]
    n_carry = round(n_eval * len(carry) / len(pairs))
    no_carry = [p for p in order if not has_carry(*p)]
    eval_set = set(carry[:n_carry] + no_carry[: n_eval - n_carry])
    eval_pairs = sorted(eval_set)
    train_pool = [p for p in pairs if p not in eval_set]

    def draw(n: int, stream: random.Random) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        while len(out) < n:
            epoch = list(train_pool)
            stream.shuffle(epoch)
            out.extend(epoch[: n - len(out)])
        return out

    # one independent stream per file, so changing one file's size leaves the others unchanged
    streams = {name: random.Random(f"{seed}:{name}") for name in FILES}

    sft = []
    s = streams["sft.jsonl"]
    for a, b in draw(n_sft, s):
        answer = a + b
        if has_carry(a, b) and s.random() < p_forget:
            answer = forgot_carry_answer(a, b)
        sft.append({"prompt": make_prompt(a, b), "completion": str(answer)})

    def pref_rows(problems, stream):
        return [
            {"prompt": make_prompt(a, b), "chosen": str(a + b),
             "rejected": str(_wrong_answer(a, b, stream, p_rejected_forgot))}
            for a, b in problems
        ]

    s = streams["prefs.jsonl"]
    prefs = pref_rows(draw(n_prefs, s), s)
    s = streams["ranked.jsonl"]
    ranked = [{"prompt": make_prompt(a, b), "responses": _ranked_responses(a, b, k_ranked, s)}
              for a, b in draw(n_ranked, s)]
    s = streams["rl_prompts.jsonl"]
    rl = [{"prompt": make_prompt(a, b), "answer": str(a + b)} for a, b in draw(n_rl, s)]
    s = streams["eval.jsonl"]
    eval_order = list(eval_pairs)
    s.shuffle(eval_order)
    evals = [{"prompt": make_prompt(a, b), "answer": str(a + b)} for a, b in eval_order]
    prefs_eval = pref_rows(eval_order, streams["prefs_eval.jsonl"])

    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for name, rows in zip(FILES, (sft, prefs, ranked, rl, evals, prefs_eval)):
        path = os.path.join(os.fspath(out_dir), name)
        _write_jsonl(path, rows)
        written[name] = path
    return written


def main(argv: list[str] | None = None) -> None:
    """``python -m align.task OUT_DIR [--seed N] [--p-forget P]``: write the task files into OUT_DIR."""
    parser = argparse.ArgumentParser(prog="python -m align.task", description=main.__doc__)
    parser.add_argument("out_dir", nargs="?", default="data/addition")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--p-forget", type=float, default=P_FORGET)
    args = parser.parse_args(argv)
    for name, path in generate_task(args.out_dir, seed=args.seed, p_forget=args.p_forget).items():
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        print(f"{path}: {n} rows")


if __name__ == "__main__":
    main()
