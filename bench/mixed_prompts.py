"""Prompts of mixed lengths, as TL;DR posts have: ``python bench/mixed_prompts.py OUT.jsonl [N] [SEED]``.

Each row is a "post" of random words, 50 to 450 characters long (uniform), followed by an addition question;
the ``answer`` column serves ``exact_match``. With the built-in character tokenizer one character is one token.
"""

from __future__ import annotations

import json
import random
import sys

WORDS = ("the quick brown fox jumps over a lazy dog while my friend writes a long post about her day at "
         "work").split()


def mixed_prompts(n: int = 64, seed: int = 1, shortest: int = 50, longest: int = 450) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        size = rng.randint(shortest, longest)
        text = ""
        while len(text) < size:
            text += rng.choice(WORDS) + " "
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": text[:size] + f"\nWhat is {a}+{b}?", "answer": str(a + b)})
    return rows


if __name__ == "__main__":
    out = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    with open(out, "w", encoding="utf-8") as fh:
        for row in mixed_prompts(n, seed):
            fh.write(json.dumps(row) + "\n")
    print(f"{out}: {n} prompts")
