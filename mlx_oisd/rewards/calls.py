"""Where user reward code is called; with the user-module import in `resolve_reward`, the only
place the project catches broad exceptions.

Two signatures are accepted:
- per item (ours): `f(completion, answer) -> float`;
- batched (TRL's): `f(prompts, completions, **kwargs) -> list[float | None]`, recognised by its
  first parameter being named `prompts` or `completions`, or by a `**kwargs` parameter. It is
  called with keyword arguments, as TRL does: `prompts` (the question strings), `completions`
  (the completion strings) and the dataset column `answer` (one per completion); a function
  without `**kwargs` gets only the ones it names. `None` is TRL's "not applicable": 0.0, not an
  error.

A call that raises, or a score that is a bool, not a number, or not finite in float32, scores
0.0 and is reported as a `RewardFailure` (type, `Type: message`, traceback text), never crashing
the run. A batched call that raises or returns the wrong number of values fails every item.
"""

import inspect
import math
import traceback
from collections.abc import Callable, Sequence
from numbers import Real
from typing import NamedTuple

import numpy as np

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_BATCH_FIRST = ("prompts", "completions")
MAX_MESSAGE = 300


class RewardFailure(NamedTuple):
    """Why an item scored 0: `kind` "KeyError", `message` "KeyError: 'answer'", `traceback`
    the formatted traceback ("" when there is none, e.g. a worker that died)."""

    kind: str
    message: str
    traceback: str = ""


Scored = tuple[float, RewardFailure | None]


def failure_of(e: BaseException) -> RewardFailure:
    """The RewardFailure of the exception being handled (call inside its `except`); the message
    is cut to MAX_MESSAGE characters, as it goes into every metrics record and warning line."""
    kind = type(e).__name__
    message = f"{kind}: {e}" if str(e) else kind
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 3] + "..."
    return RewardFailure(kind, message, traceback.format_exc())


def check_score(score) -> float:
    """`score` as a float; TypeError for a bool or a non-number, ValueError when it is not
    finite in float32 (rewards are float32 arrays downstream: an inf there makes every
    gradient NaN)."""
    if isinstance(score, bool) or not isinstance(score, Real):
        raise TypeError(f"reward returned {type(score).__name__}, expected a number")
    score = float(score)
    if not (math.isfinite(score) and abs(score) <= _FLOAT32_MAX):
        raise ValueError(f"reward returned {score}, not a finite float32")
    return score


def is_batched(fn: Callable) -> bool:
    """True for TRL's batched signature (first parameter `prompts` / `completions`, or a
    `**kwargs`), False for the per-item `(completion, answer)` one."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: called per item
        return False
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return True
    return bool(params) and params[0].name in _BATCH_FIRST


def call_reward(fn: Callable, completion: str, answer: str) -> Scored:
    """`(fn(completion, answer), None)`, or `(0.0, RewardFailure)` when the reward fails."""
    try:
        return check_score(fn(completion, answer)), None
    except Exception as e:  # the one broad except: a user reward must not crash the run
        return 0.0, failure_of(e)


def _keyword_args(fn: Callable, kwargs: dict) -> dict:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params}
    return {k: v for k, v in kwargs.items() if k in names}


def call_batched(fn: Callable, prompts: Sequence[str], completions: Sequence[str],
                 answers: Sequence[str]) -> list[Scored]:
    """One `(score, failure)` per completion from a batched (TRL-signature) reward.

    prompts, completions, answers: N strings each (the question of each completion's group).
    """
    n = len(completions)
    kwargs = {"prompts": list(prompts), "completions": list(completions), "answer": list(answers)}
    try:
        scores = fn(**_keyword_args(fn, kwargs))
        if isinstance(scores, np.ndarray):
            scores = scores.tolist()
        if not isinstance(scores, list | tuple):
            raise TypeError(f"batched reward returned {type(scores).__name__}, expected a list "
                            f"of {n} numbers")
        if len(scores) != n:
            raise ValueError(f"batched reward returned {len(scores)} values for {n} completions")
    except Exception as e:  # as in call_reward: user code
        return [(0.0, failure_of(e))] * n
    out = []
    for score in scores:
        if score is None:
            out.append((0.0, None))
            continue
        try:
            out.append((check_score(score), None))
        except (TypeError, ValueError) as e:
            out.append((0.0, failure_of(e)))
    return out
