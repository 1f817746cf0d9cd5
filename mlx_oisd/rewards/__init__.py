"""Rewards: a registry of `(completion, answer) -> float` functions and the batch scorer.

Built-ins are `math` (`math_reward`: 1.0 when the final answer equals the reference) and `format`
(`format_reward`: 1.0 for exactly one well-formed `\\boxed{}` answer after the reasoning). A user
reward is named `"package.module:function"` and has the same signature.

`score_batch` sums the weighted rewards of a batch. `call_reward` is the one place in the project
that catches a broad exception from a call: a reward that raises, or returns something that is not
a finite float32 number, scores 0.0 for that item and is counted, never crashing the run. The
other is the import of a user module in `resolve_reward`: whatever it raises (a SyntaxError, a
RuntimeError at import time) becomes a ValueError naming the module.
"""

import importlib
import math as _math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from numbers import Real

import numpy as np

from .extract import extract_answer, gsm8k_gold, strip_thinking
from .format import format_reward
from .math import MathChecker, math_reward

RewardFn = Callable[[str, str], float]
_FLOAT32_MAX = float(np.finfo(np.float32).max)
BUILTIN_REWARDS: dict[str, RewardFn] = {"math": math_reward, "format": format_reward}


def resolve_reward(name: str) -> RewardFn:
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


def call_reward(fn: RewardFn, completion: str, answer: str) -> tuple[float, str | None]:
    """`(fn(completion, answer), None)`, or `(0.0, exception type name)` when the reward fails.

    Failing means raising anything, or returning a bool, a non-number, or a number that is not
    finite in float32 (NaN, inf, |x| > 3.4e38: rewards are float32 arrays downstream, and an inf
    there turns every gradient into NaN), reported as TypeError / ValueError. This is the
    project's only broad `except`: user code runs here.
    """
    try:
        score = fn(completion, answer)
        if isinstance(score, bool) or not isinstance(score, Real):
            raise TypeError(f"reward returned {type(score).__name__}, expected a number")
        score = float(score)
        if not (_math.isfinite(score) and abs(score) <= _FLOAT32_MAX):
            raise ValueError(f"reward returned {score}, not a finite float32")
        return score, None
    except Exception as e:  # the one broad except: a user reward must not crash the run
        return 0.0, type(e).__name__


def score_batch(
    completions: Sequence[str],
    answers: Sequence[str],
    specs: Sequence[tuple[str, float]],
    workers: Mapping[str, MathChecker] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """Weighted reward of each completion: `total[i] = sum_k weight_k * reward_k(completion_i, answer_i)`.

    completions, answers: N strings each. specs: (name, weight) pairs, names as in `resolve_reward`.
    A reward named in `workers` is scored in that worker process (time-limited: a hang scores 0 and
    is counted), any other in-process.
    Returns total [N] float32, per_reward {name: [N] float32} (unweighted), and stats with, for every
    name, `errors/<name>` and `timeouts/<name>` counts, plus `error_types` {name: {type: count}}
    for the rewards that failed.
    """
    if len(completions) != len(answers):
        raise ValueError(f"score_batch: {len(completions)} completions but {len(answers)} answers")
    names = [name for name, _ in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"rewards listed more than once: {', '.join(repeated)}")
    for name, weight in specs:
        if isinstance(weight, bool) or not isinstance(weight, Real) or not _math.isfinite(weight):
            raise ValueError(f"reward {name!r}: weight {weight!r} is not a finite number")
    fns = {name: resolve_reward(name) for name in names}  # bad specs fail before any scoring

    total = np.zeros(len(completions), dtype=np.float32)  # [N]
    per_reward: dict[str, np.ndarray] = {}
    stats: dict = {"error_types": {}}
    for name, weight in specs:
        if workers and name in workers:
            scores, checked = workers[name].score(list(zip(completions, answers, strict=True)))
            timeouts, error_types = checked["timeouts"], Counter(checked["error_types"])
        else:
            results = [
                call_reward(fns[name], c, a) for c, a in zip(completions, answers, strict=True)
            ]
            scores = [score for score, _ in results]
            timeouts, error_types = 0, Counter(err for _, err in results if err is not None)
        per_reward[name] = np.asarray(scores, dtype=np.float32)  # [N]
        total += np.float32(weight) * per_reward[name]
        stats[f"errors/{name}"] = sum(error_types.values())
        stats[f"timeouts/{name}"] = timeouts
        if error_types:
            stats["error_types"][name] = dict(error_types)
    return total, per_reward, stats


__all__ = [
    "BUILTIN_REWARDS",
    "MathChecker",
    "call_reward",
    "extract_answer",
    "format_reward",
    "gsm8k_gold",
    "math_reward",
    "resolve_reward",
    "score_batch",
    "strip_thinking",
]
