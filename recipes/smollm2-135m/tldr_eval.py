"""The held-out evaluation of recipes/smollm2-135m/pipeline.yaml: TL;DR prompts with their reference summaries,
and ROUGE-L against those summaries as the pipeline's "gold" score.

The pipeline scores every model (base, SFT, PPO/GRPO) by greedy generation on a local prompt file, so write that
file once before the run (needs internet, or the data set in the local cache):

    python recipes/smollm2-135m/tldr_eval.py            # -> runs/tldr_eval.jsonl: the first 512 validation rows

and name the score in the pipeline as `eval_reward_funcs: [recipes/smollm2-135m/tldr_eval.py:rouge_l]`. Reward
functions receive the prompts, the completions and every other column of the prompt file as keyword lists: here
`completion`, the reference summary.

ROUGE-L is an overlap with one human reference, not a human preference: the reward model is what PPO optimises,
and a policy it makes better may score lower here (the pipeline report's "gold accuracy" column is this F1, and
the reward model's own held-out pairwise accuracy is beside it)."""

import argparse
import json
import re

_WORD = re.compile(r"[a-z0-9]+")


def _words(text) -> list:
    if not isinstance(text, str):  # a chat completion: its last message
        text = text[-1]["content"]
    return _WORD.findall(text.lower())


def _lcs(a: list, b: list) -> int:
    """Length of the longest common subsequence of two word lists."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prompts, completions, completion, **_):
    """ROUGE-L F1 (lower-cased words, no stemming) of each generated summary against the `completion` column,
    the reference summary; in [0, 1]."""
    out = []
    for generated, reference in zip(completions, completion):
        gen, ref = _words(generated), _words(reference)
        lcs = _lcs(gen, ref) if gen and ref else 0
        out.append(0.0 if lcs == 0 else 2 * lcs / (len(gen) + len(ref)))  # F1 of P = lcs/|gen|, R = lcs/|ref|
    return out


def write_eval_file(source: str, split: str, n: int, out: str) -> str:
    """The first `n` rows of `source` (a hub data set id or a local file with prompt and completion columns),
    prompt and completion only, written to the jsonl file `out`."""
    from align.data import read_rows, write_atomic

    rows = read_rows(source, split).rows[:n]
    write_atomic(out, "".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n"
                              for r in rows))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="trl-lib/tldr", help="hub data set id or local file (default: %(default)s)")
    ap.add_argument("--split", default="validation", help="split of a hub data set (default: %(default)s)")
    ap.add_argument("--n", type=int, default=512, help="rows to keep (default: %(default)s)")
    ap.add_argument("--out", default="runs/tldr_eval.jsonl", help="output file (default: %(default)s)")
    args = ap.parse_args()
    from align.config import AlignError

    try:
        print(write_eval_file(args.source, args.split, args.n, args.out))
    except AlignError as e:
        raise SystemExit(f"error: {e}") from None
