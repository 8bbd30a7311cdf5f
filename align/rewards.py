"""Reward sources and how they are combined.

A reward function takes the prompts, the completions and the prompt dataset's other columns (as keyword lists,
one value per completion) and returns one float per completion:

    def my_reward(prompts: list[str], completions: list[str], **columns) -> list[float]

Sources are named in configs (`reward_funcs`): a built-in name (see `BUILTIN`), `path/to/file.py:function`,
or `package.module:function`. A reward-model directory is a source too (handled by the RL stages, which load it
once). `combine` weights them (`reward_weights`) and keeps each component for logging.

The columns a function needs (:func:`required_columns`) are checked against the prompt data before the first
step (:func:`check_reward_columns`): its parameters without a default other than `prompts` and `completions`
(``def f(prompts, completions, answer, **kw)`` needs `answer`), plus those it declares in a
``required_columns`` attribute, a list of names or a dict from name to the accepted value types (the built-ins
`exact_match` and `number_match` declare ``{"answer": (str, int)}``). Every row must have each such column,
with a value that is not null and, when types are declared, of one of those types.

What a function returns is checked at every call (:func:`call_reward`): one finite number per completion; a
failure names the function and the first offending prompt and completion.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
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


# the built-ins' columns: the answer as text or a JSON integer (a float such as 5.0, a list or null would be
# compared as its Python text and silently never match)
exact_match.required_columns = number_match.required_columns = {"answer": (str, int)}

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
    _check_signature(spec, fn)
    return fn


def _parameters(fn: Any) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable without a signature: nothing to check
        return None


def _check_signature(spec: str, fn: Any) -> None:
    """A reward function is called with the keywords prompts=, completions= and one per data column: one that
    cannot take them is an error now, not at the first step."""
    params = _parameters(fn)
    if params is None:
        return
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params)
    missing = [k for k in ("prompts", "completions") if k not in names]
    if missing and not takes_any:
        raise AlignError(f"reward '{spec}': the function must take the keyword arguments prompts and completions "
                         f"(def {getattr(fn, '__name__', 'f')}(prompts, completions, **columns)); it has no "
                         f"{' or '.join(missing)}")


def required_columns(fn: Any) -> dict[str, tuple[type, ...] | None]:
    """The prompt-data columns `fn` needs: name -> accepted value types (None: any value but null). Its parameters
    without a default besides prompts and completions, plus its ``required_columns`` attribute."""
    out: dict[str, tuple[type, ...] | None] = {}
    for p in _parameters(fn) or []:
        if (p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
                and p.name not in ("prompts", "completions")):
            out[p.name] = None
    declared = getattr(fn, "required_columns", None) or {}
    if isinstance(declared, str):
        declared = [declared]
    if not isinstance(declared, dict):
        declared = {name: None for name in declared}
    for name, types in declared.items():
        if types is not None and not isinstance(types, tuple):
            types = (types,)
        out[str(name)] = types
    return out


_TYPE_WORDS = {str: "text", int: "an integer", float: "a number", bool: "true/false", list: "a list",
               dict: "an object"}


def check_reward_columns(specs: Sequence[str], data: Any, n: int | None = None) -> None:
    """One line naming the reward function, the file, the row and the field when the first `n` rows of `data`
    (a :class:`align.data.Rows`, all rows by default) lack a column a reward function in `specs` needs, or hold
    null or a value of a type it does not accept there."""
    from .data import json_kind, short_repr

    n = len(data) if n is None else min(n, len(data))
    for spec in specs:
        name = source_name(spec)
        for col, types in required_columns(load_function(spec)).items():
            shown = data.renamed.get(col, col)
            for i in range(n):
                row = data.rows[i]
                if col not in row:
                    have = ", ".join(data.renamed.get(k, k) for k in row) or "none"
                    raise AlignError(f"{data.where(i)}: no column '{shown}', which reward '{name}' needs (columns: "
                                     f"{have}; map another column to it with column_map: {{{col}: NAME}})")
                value = row[col]
                bad = value is None or (types is not None and (not isinstance(value, types) or (
                    isinstance(value, bool) and bool not in types)))
                if bad:
                    want = " or ".join(_TYPE_WORDS.get(t, t.__name__) for t in types) if types else "a value"
                    raise AlignError(f"{data.where(i, col)}: reward '{name}' needs {want}, got {json_kind(value)} "
                                     f"{short_repr(value)}")


def _show(value: Any, width: int = 80) -> str:
    from .data import short_repr

    return short_repr(value, width)


def _at(prompts: Sequence[Any], completions: Sequence[Any], i: int) -> str:
    """'prompt ..., completion ...' of item i, shortened for a one-line message."""
    return f"prompt {_show(prompts[i])}, completion {_show(completions[i])}"


def _first_failing(fn: RewardFn, prompts: Sequence[Any], completions: Sequence[Any],
                   columns: dict[str, Sequence[Any]], limit: int = 64) -> int | None:
    """The first item that makes `fn` raise when called on it alone (None when none of the first `limit` does,
    e.g. a failure that needs the whole batch)."""
    for i in range(min(len(prompts), limit)):
        try:
            fn(prompts=[prompts[i]], completions=[completions[i]], **{k: [v[i]] for k, v in columns.items()})
        except Exception:
            return i
    return None


def call_reward(name: str, fn: RewardFn, prompts: Sequence[Any], completions: Sequence[str],
                columns: dict[str, Sequence[Any]]) -> list[float]:
    """Call one reward function and check its output: one finite number per completion. A failure (it raises,
    returns the wrong number of values, a non-number, NaN or infinity) is one line naming the function and the
    first offending prompt and completion."""
    prompts, completions = list(prompts), list(completions)
    try:
        values = fn(prompts=prompts, completions=completions, **columns)
    except AlignError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()
        what = f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__
        i = _first_failing(fn, prompts, completions, columns)
        where = f"at {_at(prompts, completions, i)}" if i is not None else \
            f"on a batch of {len(prompts)} (first: {_at(prompts, completions, 0)})" if prompts else "on an empty batch"
        raise AlignError(f"reward '{name}' failed {where}: {what}") from None
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not hasattr(values, "__iter__"):
        first = f" (first: {_at(prompts, completions, 0)})" if prompts else ""
        raise AlignError(f"reward '{name}' returned a {type(values).__name__}, not a list of one number per "
                         f"completion{first}")
    values = list(values)
    if len(values) != len(completions):
        if len(values) < len(completions):
            detail = f"none for {_at(prompts, completions, len(values))}"
        else:
            detail = f"first: {_at(prompts, completions, 0)}"
        raise AlignError(f"reward '{name}' returned {len(values)} values for {len(completions)} completions "
                         f"({detail})")
    out = []
    for i, v in enumerate(values):
        try:
            if isinstance(v, (str, bytes)):
                raise TypeError
            f = float(v)
        except Exception:  # TypeError, ValueError, a tensor or array of several elements, ...
            raise AlignError(f"reward '{name}' returned {_show(v, 40)}, not a number, for "
                             f"{_at(prompts, completions, i)}") from None
        if not math.isfinite(f):
            raise AlignError(f"reward '{name}' returned {f} for {_at(prompts, completions, i)}")
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


def reward_sources(cfg, device, host: Any = None) -> dict[str, RewardFn]:
    """name -> reward function of an RL config: the reward model (if set, first, loaded once) then reward_funcs,
    in config order. ``host``: the policy (a peft model) when the reward model is a LoRA adapter of its base
    model, to be loaded as the policy's frozen adapter 'reward' on its base weights (see
    :class:`align.scoring.RewardModelScorer`)."""
    sources: dict[str, RewardFn] = {}
    if cfg.reward_model:
        from .models import frozen_dtype
        from .scoring import RewardModelScorer

        sources[REWARD_MODEL_NAME] = RewardModelScorer(cfg.reward_model, device=device,
                                                       dtype=frozen_dtype(cfg.dtype, device, cfg.frozen_dtype),
                                                       batch_size=max(cfg.per_device_eval_batch_size, 1),
                                                       trust_remote_code=cfg.trust_remote_code, host=host)
    sources.update(functions(cfg.reward_funcs))
    return sources
