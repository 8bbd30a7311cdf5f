"""A user reward function for GRPO on maths: 1.0 when the last \\boxed{...} of the completion (or, failing
that, its last number) equals the `solution` column after light normalisation, else 0.0.

Used as `reward_funcs: [recipes/qwen2.5-0.5b/math_reward.py:boxed_answer_match]`. Reward functions receive the
prompts, the completions and every other column of the prompt dataset as keyword lists."""

import re


def _last_boxed(text: str):
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            if depth == 0:
                return text[i:j]
            depth -= 1
    return None


def _normalise(s: str) -> str:
    s = s.strip().strip("$").replace(" ", "").replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")
    return s


def boxed_answer_match(prompts, completions, solution=None, **_):
    if solution is None:
        raise ValueError("boxed_answer_match needs a 'solution' column")
    out = []
    for completion, sol in zip(completions, solution):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        got = _last_boxed(text)
        if got is None:
            nums = re.findall(r"-?\d+(?:\.\d+)?", text)
            got = nums[-1] if nums else None
        out.append(1.0 if got is not None and _normalise(got) == _normalise(str(sol)) else 0.0)
    return out
