"""Rewards: a registry of reward functions and the batch scorer.

Built-ins are `math` (`math_reward`: 1.0 when the final answer equals the reference) and `format`
(`format_reward`: 1.0 for exactly one well-formed `\\boxed{}` answer after the reasoning). A user
reward is named `"package.module:function"` and takes either our per-item signature
`(completion, answer) -> float` or TRL's batched `(prompts, completions, **kwargs) -> list[float]`
(`calls.py` says how the two are told apart and called).

`score_batch` sums the weighted rewards of a batch. A reward that raises, or returns something
that is not a finite float32 number, scores 0.0 for that item and is counted (`calls.py` is where
user code is called), never crashing the run; the first failure of each reward is kept, with its
message and traceback. `check_first_batch` stops a run whose reward failed on every item of its
first step: that reward is broken, not unlucky. The import of a user module in `resolve_reward`
is the other broad catch: whatever it raises (a SyntaxError, a RuntimeError at import time)
becomes a ValueError naming the module.
"""

import importlib
import math as _math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from numbers import Real

import numpy as np

from .calls import RewardFailure, call_batched, call_reward, is_batched
from .extract import extract_answer, gsm8k_gold, strip_thinking
from .format import format_reward
from .math import MathChecker, math_reward

RewardFn = Callable[[str, str], float]
BUILTIN_REWARDS: dict[str, RewardFn] = {"math": math_reward, "format": format_reward}


class RewardFailedError(ValueError):
    """A reward failed on every completion of the run's first step; the message names it and
    carries its first exception and traceback."""


def resolve_reward(name: str) -> Callable:
    """The reward function for `name`: a built-in (`math`, `format`) or `"module:function"`.

    Raises ValueError naming the spec when it is neither, or the module or function is missing.
    """
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    expected = f"expected one of {', '.join(BUILTIN_REWARDS)} or 'module:function'"
    module_name, _, fn_name = name.partition(":")
    if not module_name or not fn_name:
        raise ValueError(f"reward {name!r}: {expected}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {name!r}: cannot import module {module_name!r} ({e})") from e
    except Exception as e:  # user code runs at import: a SyntaxError, a RuntimeError, ...
        raise ValueError(f"reward {name!r}: importing module {module_name!r} failed "
                         f"({type(e).__name__}: {e})") from e
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ValueError(f"reward {name!r}: module {module_name!r} has no attribute {fn_name!r}")
    if not callable(fn):
        raise ValueError(f"reward {name!r}: {module_name}.{fn_name} is not callable")
    return fn


def _score_here(fn: Callable, name: str, prompts, completions, answers) -> list:
    """(score, failure) per completion, in this process."""
    if not is_batched(fn):
        return [call_reward(fn, c, a) for c, a in zip(completions, answers, strict=True)]
    if prompts is None:
        raise ValueError(f"reward {name!r} is batched (TRL signature): score_batch needs prompts")
    return call_batched(fn, prompts, completions, answers)


def score_batch(
    completions: Sequence[str],
    answers: Sequence[str],
    specs: Sequence[tuple[str, float]],
    workers: Mapping[str, MathChecker] | None = None,
    prompts: Sequence[str] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """Weighted reward of each completion: `total[i] = sum_k weight_k * reward_k(completion_i, answer_i)`.

    completions, answers: N strings each. specs: (name, weight) pairs, names as in `resolve_reward`.
    prompts: N question strings (that of each completion's group), passed to batched rewards.
    A reward named in `workers` is scored in that worker process (time-limited: a hang scores 0 and
    is counted), any other in-process.
    Returns total [N] float32, per_reward {name: [N] float32} (unweighted), and stats with, for every
    name, `errors/<name>` and `timeouts/<name>` counts, plus, for the rewards that failed,
    `error_types` {name: {type: count}} and `first_errors` {name: RewardFailure}.
    """
    n = len(completions)
    if len(answers) != n or (prompts is not None and len(prompts) != n):
        got = f"{len(answers)} answers" + ("" if prompts is None else f", {len(prompts)} prompts")
        raise ValueError(f"score_batch: {n} completions but {got}")
    names = [name for name, _ in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"rewards listed more than once: {', '.join(repeated)}")
    for name, weight in specs:
        if isinstance(weight, bool) or not isinstance(weight, Real) or not _math.isfinite(weight):
            raise ValueError(f"reward {name!r}: weight {weight!r} is not a finite number")
    fns = {name: resolve_reward(name) for name in names}  # bad specs fail before any scoring

    total = np.zeros(n, dtype=np.float32)  # [N]
    per_reward: dict[str, np.ndarray] = {}
    stats: dict = {"error_types": {}, "first_errors": {}}
    for name, weight in specs:
        if workers and name in workers:
            scores, checked = workers[name].score(list(zip(completions, answers, strict=True)),
                                                  prompts)
            timeouts, first = checked["timeouts"], checked["first_error"]
            error_types = Counter(checked["error_types"])
        else:
            results = _score_here(fns[name], name, prompts, completions, answers)
            scores = [score for score, _ in results]
            failures = [f for _, f in results if f is not None]
            timeouts, first = 0, (failures[0] if failures else None)
            error_types = Counter(f.kind for f in failures)
        per_reward[name] = np.asarray(scores, dtype=np.float32)  # [N]
        total += np.float32(weight) * per_reward[name]
        stats[f"errors/{name}"] = sum(error_types.values())
        stats[f"timeouts/{name}"] = timeouts
        if error_types:
            stats["error_types"][name] = dict(error_types)
            stats["first_errors"][name] = first
    return total, per_reward, stats


def reward_record(stats: dict) -> dict:
    """The metrics.jsonl entries of `score_batch`'s stats: `reward_errors/<name>` and
    `reward_timeouts/<name>` counts, and, when some reward failed, `reward_error_types`
    {name: {type: count}} and `reward_first_error` {name: "Type: message"}."""
    out = {}
    for key, n in stats.items():
        if key.startswith(("errors/", "timeouts/")):
            out[f"reward_{key}"] = n
    if stats["error_types"]:
        out["reward_error_types"] = stats["error_types"]
        out["reward_first_error"] = {k: f.message for k, f in stats["first_errors"].items()}
    return out


def check_first_batch(stats: dict, n: int) -> None:
    """Raise RewardFailedError when a reward failed on all `n` items of `score_batch`'s stats."""
    for name, failure in stats["first_errors"].items():
        if stats[f"errors/{name}"] == n:
            trace = failure.traceback.rstrip() or "(no traceback: the worker process died)"
            raise RewardFailedError(
                f"reward {name!r} failed on all {n} completions of the first step, so it is "
                f"broken rather than unlucky: {failure.message}\n{trace}")


__all__ = [
    "BUILTIN_REWARDS",
    "MathChecker",
    "RewardFailedError",
    "RewardFailure",
    "call_batched",
    "call_reward",
    "check_first_batch",
    "extract_answer",
    "format_reward",
    "gsm8k_gold",
    "is_batched",
    "math_reward",
    "resolve_reward",
    "reward_record",
    "score_batch",
    "strip_thinking",
]
