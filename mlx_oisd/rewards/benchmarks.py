"""Loaders for the evaluation benchmarks' jsonl files: each row becomes {prompt, answer}.

| name    | prompt field | answer field | answer                                        |
|---------|--------------|--------------|-----------------------------------------------|
| math500 | problem      | answer       | LaTeX string, as given                        |
| aime24  | problem      | answer       | string such as "025", as given                |
| amc23   | problem      | answer       | float such as 27.0, written "27"              |
| gsm8k   | question     | answer       | the solution; `gsm8k_gold` takes the `####`   |
"""

from numbers import Real
from pathlib import Path

from ..io import read_jsonl
from .extract import gsm8k_gold

BENCHMARK_FIELDS = {
    "math500": ("problem", "answer"),
    "aime24": ("problem", "answer"),
    "amc23": ("problem", "answer"),
    "gsm8k": ("question", "answer"),
}


def _gold(name: str, value) -> str:
    """The reference answer string of one row's answer field."""
    if isinstance(value, Real) and not isinstance(value, bool) and name != "gsm8k":
        return str(int(value)) if float(value).is_integer() else str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"is {value!r}, expected a non-empty string or a number")
    return gsm8k_gold(value) if name == "gsm8k" else value.strip()


def load_benchmark_rows(path: str | Path, name: str) -> list[dict]:
    """Rows of the benchmark file `path` as [{"prompt": str, "answer": str}], in file order.

    `name` is one of math500, aime24, amc23, gsm8k (see the module table). Blank lines are skipped.
    Raises ValueError naming the file, the line number and the problem (bad JSON, missing field).
    """
    if name not in BENCHMARK_FIELDS:
        raise ValueError(f"benchmark {name!r}: expected one of {', '.join(BENCHMARK_FIELDS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark {name!r}: no file {path}")
    prompt_field, answer_field = BENCHMARK_FIELDS[name]
    rows = []
    for where, record in read_jsonl(path):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for field in (prompt_field, answer_field):
            if field not in record:
                raise ValueError(
                    f"{where}: missing field {field!r} for benchmark {name!r} "
                    f"(row has {', '.join(sorted(record)) or 'no fields'})"
                )
        if not isinstance(record[prompt_field], str) or not record[prompt_field].strip():
            raise ValueError(f"{where}: field {prompt_field!r} is not a non-empty string")
        try:
            answer = _gold(name, record[answer_field])
        except ValueError as e:
            raise ValueError(f"{where}: field {answer_field!r}: {e}") from None
        rows.append({"prompt": record[prompt_field], "answer": answer})
    return rows
