"""Reward sources and how they are combined.

A reward function takes the prompts, the completions and the prompt dataset's other columns (as keyword lists,
one value per completion) and returns one float per completion:

    def my_reward(prompts: list[str], completions: list[str], **columns) -> list[float]

Sources are named in configs (`reward_funcs`): a built-in name (see `BUILTIN`), `path/to/file.py:function`,
or `package.module:function`. A reward-model directory is a source too (handled by the RL stages, which load it
once). `combine` weights them (`reward_weights`) and keeps each component for logging.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
from typing import Any, Callable, Sequence

from .config import AlignError

RewardFn = Callable[..., Sequence[float]]

_NUMBER = re.compile(r"-?\d+")


def _first_number(text: str) -> str | None:
    m = _NUMBER.search(text)
    return m.group(0) if m else None


def exact_match(prompts: Sequence[Any], completions: Sequence[str], answer: Sequence[Any] | None = None,
                **_: Any) -> list[float]:
    """1.0 when the completion, stripped of whitespace, equals the `answer` column; else 0.0."""
    if answer is None:
        raise AlignError("reward 'exact_match' needs an 'answer' column in the prompt data")
    return [1.0 if str(c).strip() == str(a).strip() else 0.0 for c, a in zip(completions, answer)]


def number_match(prompts: Sequence[Any], completions: Sequence[str], answer: Sequence[Any] | None = None,
                 **_: Any) -> list[float]:
    """1.0 when the first integer in the completion equals the `answer` column (lenient exact_match)."""
    if answer is None:
        raise AlignError("reward 'number_match' needs an 'answer' column in the prompt data")
    return [1.0 if _first_number(str(c)) == str(a).strip() else 0.0 for c, a in zip(completions, answer)]


def format_digits(prompts: Sequence[Any], completions: Sequence[str], **_: Any) -> list[float]:
    """Format helper: 1.0 when the completion is a bare integer (digits, optional sign), else 0.0."""
    return [1.0 if re.fullmatch(r"\s*-?\d+\s*", str(c)) else 0.0 for c in completions]


def length_penalty(prompts: Sequence[Any], completions: Sequence[str], **_: Any) -> list[float]:
    """Length helper: minus the completion's length in characters divided by 100."""
    return [-len(str(c)) / 100.0 for c in completions]


BUILTIN: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "number_match": number_match,
    "format_digits": format_digits,
    "length_penalty": length_penalty,
}


def load_function(spec: str) -> RewardFn:
    """Resolve a built-in name, `file.py:function` or `module:function` to a callable."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise AlignError(f"reward '{spec}': not a built-in ({', '.join(BUILTIN)}) nor file.py:function "
                         f"or module:function")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise AlignError(f"reward '{spec}': file {target} not found")
        mod_name = "align_user_reward_" + re.sub(r"\W", "_", os.path.abspath(target))
        mspec = importlib.util.spec_from_file_location(mod_name, target)
        module = importlib.util.module_from_spec(mspec)
        try:
            mspec.loader.exec_module(module)
        except Exception as e:
            raise AlignError(f"reward '{spec}': importing {target} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise AlignError(f"reward '{spec}': cannot import module {target}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise AlignError(f"reward '{spec}': {target} has no function {name}")
    return fn


def call_reward(name: str, fn: RewardFn, prompts: Sequence[Any], completions: Sequence[str],
                columns: dict[str, Sequence[Any]]) -> list[float]:
    """Call one reward function and check its output; a failure is reported with the input that caused it."""
    try:
        values = fn(prompts=list(prompts), completions=list(completions), **columns)
    except AlignError:
        raise
    except Exception as e:
        sample = f"prompt={prompts[0]!r}, completion={completions[0]!r}" if len(prompts) else "empty batch"
        raise AlignError(f"reward '{name}' failed: {type(e).__name__}: {e} (first input: {sample})") from None
    values = list(values)
    if len(values) != len(completions):
        raise AlignError(f"reward '{name}' returned {len(values)} values for {len(completions)} completions")
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise AlignError(f"reward '{name}' returned {v!r} for completion {completions[i]!r}") from None
        if not math.isfinite(f):
            raise AlignError(f"reward '{name}' returned {f} for prompt {prompts[i]!r}, "
                             f"completion {completions[i]!r}")
        out.append(f)
    return out


def combine(components: dict[str, list[float]], weights: Sequence[float] | None) -> list[float]:
    """Weighted sum of reward components (equal weights of 1 by default)."""
    names = list(components)
    if weights is None or len(weights) == 0:
        weights = [1.0] * len(names)
    if len(weights) != len(names):
        raise AlignError(f"reward_weights has {len(weights)} values for {len(names)} reward sources")
    n = len(next(iter(components.values()))) if components else 0
    return [sum(w * components[k][i] for k, w in zip(names, weights)) for i in range(n)]


def score_completions(sources: dict[str, RewardFn], prompts: Sequence[Any], completions: Sequence[str],
                      columns: dict[str, Sequence[Any]], weights: Sequence[float] | None = None
                      ) -> tuple[list[float], dict[str, list[float]]]:
    """(combined rewards ``Σ_k w_k r_k``, each source's unweighted rewards) of the completions. Every source sees
    every completion; a failing source is reported with its input (:func:`call_reward`)."""
    if not sources:
        raise ValueError("no reward sources")
    comps = {name: call_reward(name, fn, prompts, completions, dict(columns)) for name, fn in sources.items()}
    return combine(comps, [float(w) for w in weights] if weights else None), comps


# ---------------------------------------------------------------------------------------------------------------
# the reward sources of a config

REWARD_MODEL_NAME = "reward_model"


def source_name(spec: str) -> str:
    """Short metric name of a reward spec: 'exact_match', 'rewards.py:fn' -> 'fn', 'pkg.mod:fn' -> 'fn'."""
    return spec.rsplit(":", 1)[-1] if ":" in spec else spec


def functions(specs: Sequence[str]) -> dict[str, RewardFn]:
    """name -> function for reward specs, in order (a bad spec fails here, named)."""
    return {source_name(spec): load_function(spec) for spec in specs}


def reward_sources(cfg, device) -> dict[str, RewardFn]:
    """name -> reward function of an RL config: the reward model (if set, first, loaded once) then reward_funcs,
    in config order."""
    sources: dict[str, RewardFn] = {}
    if cfg.reward_model:
        from .scoring import RewardModelScorer

        sources[REWARD_MODEL_NAME] = RewardModelScorer(cfg.reward_model, device=device, dtype=cfg.dtype,
                                                       batch_size=max(cfg.per_device_eval_batch_size, 1),
                                                       trust_remote_code=cfg.trust_remote_code)
    sources.update(functions(cfg.reward_funcs))
    return sources
