"""Built-in task `builtin:arith`: seeded multi-digit arithmetic with exact integer answers.

A question is `terms` operands of exactly `digits` digits joined by operators drawn from `ops`
("What is 47 + 38 * 12?"); the answer is its value under the usual precedence (`*` before
`+`/`-`), written as an integer ("503"). It is verifiable, needs no download, and a tiny model
can learn it, so it drives the offline demo and the tests.

Both splits come from one generator seeded with `seed`: the first `n_test` distinct questions are
the held-out `test` split, the next `n` distinct questions not already in it are `train`. So the
splits never share a question, and `test` does not change when `n` does.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

import numpy as np

from .sources import DataError, Example

SPLITS = ("train", "test")
OPS = "+-*"


@dataclass(frozen=True)
class ArithParams:
    digits: int = 2  # digits of every operand
    ops: str = "+"  # operators to draw from: "+", "+-", "+-*", ...
    terms: int = 2  # operands per question
    n: int = 2000  # train questions
    n_test: int = 200  # held-out questions
    seed: int = 0


_RULES = {
    "digits": (lambda v: 1 <= v <= 18, "between 1 and 18"),
    "ops": (
        lambda v: len(v) > 0 and set(v) <= set(OPS) and len(set(v)) == len(v),
        f"distinct characters of {OPS!r}",
    ),
    "terms": (lambda v: v >= 2, ">= 2"),
    "n": (lambda v: v >= 1, ">= 1"),
    "n_test": (lambda v: v >= 0, ">= 0"),
    "seed": (lambda v: v >= 0, ">= 0"),
}


def _valid_params() -> str:
    kinds = typing.get_type_hints(ArithParams)
    return ", ".join(
        f"{f.name} ({kinds[f.name].__name__}, default {f.default!r})"
        for f in dataclasses.fields(ArithParams)
    )


def parse_params(raw: dict[str, str]) -> ArithParams:
    """ArithParams from `builtin:arith?key=value&...` strings; DataError names the bad one."""
    kinds = typing.get_type_hints(ArithParams)
    values = {}
    for key, text in raw.items():
        if key not in kinds:
            raise DataError(f"builtin:arith: unknown parameter {key!r}; valid: {_valid_params()}")
        ok, expected = _RULES[key]
        try:
            value = kinds[key](text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise DataError(
                f"builtin:arith: {key}={text!r} is not valid, expected {kinds[key].__name__} "
                f"{expected}; valid: {_valid_params()}"
            )
        values[key] = value
    params = ArithParams(**values)
    distinct = (9 * 10 ** (params.digits - 1)) ** params.terms * len(params.ops) ** (
        params.terms - 1
    )
    if params.n + params.n_test > distinct:
        raise DataError(
            f"builtin:arith: n + n_test = {params.n + params.n_test} but only {distinct} distinct "
            "questions exist with these digits, ops and terms; lower n or n_test, or raise digits"
        )
    return params


def evaluate(operands: list[int], ops: list[str]) -> int:
    """Value of `operands[0] ops[0] operands[1] ...` with `*` binding tighter than `+`/`-`."""
    total, sign, product = 0, 1, operands[0]
    for op, x in zip(ops, operands[1:], strict=True):
        if op == "*":
            product *= x
        else:
            total += sign * product
            sign, product = (1 if op == "+" else -1), x
    return total + sign * product


def generate(params: ArithParams) -> dict[str, list[Example]]:
    """Both splits, {"train": [...], "test": [...]}, from one generator seeded with `params.seed`."""
    rng = np.random.default_rng(params.seed)
    low, high = 10 ** (params.digits - 1), 10**params.digits  # exactly `digits` digits
    seen: set[str] = set()
    drawn: list[Example] = []
    while len(drawn) < params.n_test + params.n:
        operands = [int(x) for x in rng.integers(low, high, size=params.terms)]
        ops = [params.ops[i] for i in rng.integers(len(params.ops), size=params.terms - 1)]
        expression = str(operands[0]) + "".join(
            f" {op} {x}" for op, x in zip(ops, operands[1:], strict=True)
        )
        question = f"What is {expression}?"
        if question not in seen:
            seen.add(question)
            drawn.append(Example(question, str(evaluate(operands, ops))))
    return {"test": drawn[: params.n_test], "train": drawn[params.n_test :]}


def load_arith(split: str, raw_params: dict[str, str]) -> list[Example]:
    """The `split` ("train" or "test") of `builtin:arith` with the given query parameters."""
    if split not in SPLITS:
        raise DataError(f"builtin:arith has splits {', '.join(SPLITS)}, not {split!r}")
    return generate(parse_params(raw_params))[split]
