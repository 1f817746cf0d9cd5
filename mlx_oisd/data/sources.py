"""Prompt sources: every dataset becomes a list of `Example(prompt, answer)`.

`load_examples(source, ...)` reads one split of:
- a local file: `.jsonl` (one object a line), `.json` (a list of objects) or `.parquet`;
  a local file is one split, so `split` and `config` are ignored for it;
- a built-in task, `builtin:NAME[?key=value&...]` (`builtin:arith?digits=3&ops=+-`);
- a Hugging Face Hub dataset id (`openai/gsm8k`): the split's parquet (or jsonl) files are
  downloaded into the Hub cache, or read from it when the Hub cannot be reached (known after one
  request, see `mlx_oisd.hub`).

A field name of None is detected on the first row (PROMPT_FIELDS, ANSWER_FIELDS), and a
missing-field error says where the name comes from (`field_hints`: the config key by default,
`--data FILE:FIELD` for `oisd-mlx eval`).

Reference answers become plain strings (`gold_answer`): a GSM8K solution gives the number after
its last `####` without thousands commas, a MATH-style solution the content of its last
`\\boxed{}`, a number its decimal text. Rows are checked where they enter: a missing field, a bad
JSON line or an empty answer raises `DataError` naming the file, the row and what was expected.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

from .. import hub
from ..io import read_jsonl
from ..rewards.extract import extract_answer, gsm8k_gold

BUILTIN_PREFIX = "builtin:"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_SHOWN_FILES = 30  # a Hub listing in an error message is cut after this many files
# Field detection (a field given as None), in order of preference. "answer" before "solution":
# MATH-500's answer is the final answer and its solution the worked one.
PROMPT_FIELDS = ("question", "problem", "prompt", "query", "input")
ANSWER_FIELDS = ("answer", "final_answer", "expected_answer", "solution", "target")
# What a missing-field error of a training dataset suggests (`read_file`'s field_hints).
CONFIG_FIELD_HINTS = ("set dataset.prompt_field: {field}", "set dataset.answer_field: {field}")


class DataError(ValueError):
    """A dataset, file or row that cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class Example:
    prompt: str  # the question, without the chat template or the answer instruction
    answer: str  # the reference final answer, as `math_reward` expects it


def gold_answer(value) -> str:
    """The reference answer string of one row's answer field (rules in the module docstring).

    Raises ValueError when the value is empty, not a string or a number, or has an unclosed box.
    """
    if isinstance(value, Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"is {value!r}, expected a finite number")
        return str(int(value)) if float(value).is_integer() else str(value)
    if not isinstance(value, str):
        raise ValueError(f"is {type(value).__name__} {value!r}, expected a string or a number")
    if "####" in value:
        gold = gsm8k_gold(value)
    elif "\\boxed" in value or "\\fbox" in value:
        gold = extract_answer(value)
        if gold is None:
            raise ValueError(f"has a \\boxed{{}} that never closes: {value[-80:]!r}")
    else:
        gold = value.strip()
    if not gold:
        raise ValueError(f"is empty: {value[-80:]!r}")
    return gold


def _missing(where: str, field: str | None, available, candidates: tuple[str, ...], hint: str,
             prompt: str | None, noun: str = "field") -> DataError:
    """The error for a row without `field` (None: no field among `candidates` was found)."""
    present = [c for c in candidates if c in available]
    what = f"no {noun} {field!r}" if field is not None else (
        f"none of the {noun}s {', '.join(candidates)}")
    fix = hint.format(field=present[0] if present else "FIELD", prompt=prompt)
    return DataError(f"{where} has {what} ({noun}s: {', '.join(map(str, available)) or 'none'}); "
                     f"{fix}")


def _pick_fields(available, where: str, prompt_field: str | None, answer_field: str | None,
                 hints: tuple[str, str], noun: str = "field") -> tuple[str, str]:
    """The prompt and answer fields of rows whose first row (or columns) has `available`:
    the given names, or for None the first of PROMPT_FIELDS / ANSWER_FIELDS present."""
    picked = []
    for field, candidates, hint in ((prompt_field, PROMPT_FIELDS, hints[0]),
                                    (answer_field, ANSWER_FIELDS, hints[1])):
        name = field if field is not None else next((c for c in candidates if c in available),
                                                    None)
        if name is None or name not in available:
            raise _missing(where, field, available, candidates, hint, next(iter(picked), None),
                           noun)
        picked.append(name)
    return picked[0], picked[1]


def _example(row, where: str, prompt_field: str, answer_field: str,
             hints: tuple[str, str] = CONFIG_FIELD_HINTS) -> Example:
    """Check one row (a dict from any format) and turn it into an Example."""
    if not isinstance(row, dict):
        raise DataError(f"{where} is a JSON {type(row).__name__}, expected an object")
    for field, candidates, hint in ((prompt_field, PROMPT_FIELDS, hints[0]),
                                    (answer_field, ANSWER_FIELDS, hints[1])):
        if field not in row:
            raise _missing(where, field, list(row), candidates, hint, prompt_field)
    prompt = row[prompt_field]
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(
            f"{where}: field {prompt_field!r} is {prompt!r}, expected a non-empty string"
        )
    try:
        answer = gold_answer(row[answer_field])
    except ValueError as e:
        raise DataError(f"{where}: field {answer_field!r} {e}") from None
    return Example(prompt, answer)


def _examples(rows: list, prompt_field: str | None, answer_field: str | None,
              hints: tuple[str, str]) -> list[Example]:
    """rows: (where, row) pairs of a jsonl or json file; fields resolved on the first row."""
    if not rows:
        return []
    where, first = rows[0]
    if isinstance(first, dict):
        prompt_field, answer_field = _pick_fields(list(first), where, prompt_field, answer_field,
                                                  hints)
    return [_example(row, where, prompt_field, answer_field, hints) for where, row in rows]


def _read_jsonl(path: Path, prompt_field, answer_field, hints) -> list[Example]:
    return _examples(list(read_jsonl(path, DataError)), prompt_field, answer_field, hints)


def _read_json(path: Path, prompt_field, answer_field, hints) -> list[Example]:
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines saved under a .json name
            return _read_jsonl(path, prompt_field, answer_field, hints)
        raise DataError(
            f"{path}: invalid JSON ({e.msg}, line {e.lineno} column {e.colno})"
        ) from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects, got a {type(rows).__name__}")
    return _examples([(f"row {i} of {path}", row) for i, row in enumerate(rows, start=1)],
                     prompt_field, answer_field, hints)


def _read_parquet(path: Path, prompt_field, answer_field, hints) -> list[Example]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    import pyarrow as pa

    try:
        columns = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    prompt_field, answer_field = _pick_fields(columns, str(path), prompt_field, answer_field,
                                              hints, noun="column")
    # Only the two columns: a Hub shard may carry images or long solutions we never use.
    table = pq.read_table(path, columns=list(dict.fromkeys([prompt_field, answer_field])))
    return [
        _example(row, f"row {i} of {path}", prompt_field, answer_field, hints)
        for i, row in enumerate(table.to_pylist(), start=1)
    ]


_READERS: dict[str, Callable[..., list[Example]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
}


def read_file(path: str | Path, prompt_field: str | None = "question",
              answer_field: str | None = "answer",
              field_hints: tuple[str, str] = CONFIG_FIELD_HINTS) -> list[Example]:
    """Every row of a local `.jsonl` / `.json` / `.parquet` file as Examples, in file order.

    A field of None is detected on the first row (see PROMPT_FIELDS, ANSWER_FIELDS).
    field_hints: what a missing-field error tells the user to do, for the prompt and the answer
    field (`{field}`: a likely field of the row, `{prompt}`: the prompt field in use).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise DataError(f"{path} is a folder; expected a {'/'.join(FILE_SUFFIXES)} file")
    if path.suffix not in _READERS:
        raise DataError(
            f"{path}: unsupported file type; expected one of {', '.join(FILE_SUFFIXES)}"
        )
    if not path.is_file():
        raise DataError(f"dataset file {str(path)!r} does not exist")
    try:
        return _READERS[path.suffix](path, prompt_field, answer_field, field_hints)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None


def is_file_source(source: str) -> bool:
    """Whether `source` names a local data file by its suffix (one file is one split)."""
    return not source.startswith(BUILTIN_PREFIX) and Path(source).suffix in FILE_SUFFIXES


def parse_source_spec(spec: str) -> tuple[str, str | None, str | None]:
    """`SOURCE[:PROMPT_FIELD[:ANSWER_FIELD]]` -> (source, prompt_field, answer_field), a field
    None when not given (or empty). A `builtin:` spec or an existing path is taken whole; else
    the source ends at the first ':' (Hub ids hold none)."""
    if spec.startswith(BUILTIN_PREFIX) or Path(spec).expanduser().exists():
        return spec, None, None
    source, *fields = spec.split(":")
    if len(fields) > 2:
        raise DataError(f"{spec!r}: expected SOURCE[:PROMPT_FIELD[:ANSWER_FIELD]], got "
                        f"{len(fields)} fields")
    prompt, answer = (fields + [None, None])[:2]
    return source, prompt or None, answer or None


def match_split_files(files: list[str], split: str, config: str | None = None) -> list[str]:
    """The data files of `split` (and `config`) among a Hub dataset's file listing, sorted.

    As the Hub's own rule: a file belongs to the split when its name holds `split` between
    separators (`train-00000-of-00001.parquet`, `test.jsonl`, `gsm8k_train.json`) or it sits in
    a folder named `split`. With `config`, only files under a folder named `config` count
    (config "default" also takes `data/...` and top-level files). Parquet is preferred, then
    jsonl, then json. Raises DataError when nothing matches, or when the split is in several
    folders (usually several configs) and `config` does not pick one.
    """
    token = re.compile(rf"(?:^|[-._ 0-9]){re.escape(split)}[-._ 0-9]")

    def in_split(path: str) -> bool:
        *dirs, name = path.split("/")
        return bool(token.search(name)) or split in dirs

    data = [f for f in files if f.endswith((".parquet", ".jsonl", ".json")) and in_split(f)]
    if config is not None:
        by_config = [f for f in data if config in f.split("/")[:-1]]
        if not by_config and config == "default":
            by_config = [f for f in data if "/" not in f or f.startswith("data/")]
        data = by_config
    where = f"split {split!r}" + (f" of config {config!r}" if config else "")
    matched: list[str] = []
    for ext in (".parquet", ".jsonl", ".json"):
        matched = matched or sorted(f for f in data if f.endswith(ext))
    if not matched:
        shown = ", ".join(sorted(files)[:_SHOWN_FILES]) or "no files"
        more = f" and {len(files) - _SHOWN_FILES} more" if len(files) > _SHOWN_FILES else ""
        raise DataError(f"no data file for {where}; the repository has: {shown}{more}")
    folders = sorted({f.rsplit("/", 1)[0] if "/" in f else "." for f in matched})
    if config is None and len(folders) > 1:
        raise DataError(
            f"{where} is in several folders ({', '.join(folders)}); set dataset.config to the "
            "one to use"
        )
    return matched


_LOCAL_DATASET = "pass a local .jsonl or .parquet file as dataset.source"


def _hub_files(repo: str) -> tuple[list[str], Callable[[str], Path]]:
    """The repository's file listing and a function that returns a local copy of one file.

    Online: the Hub's listing, files fetched through the Hub cache. Hub unreachable (or offline
    mode): the cached snapshot, found after one request (`mlx_oisd.hub` says why only one).
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    network_errors = hub.network_errors()
    error = None
    if not hub.offline_mode():
        try:
            info = HfApi().dataset_info(repo)  # one request: dataset_info does not retry
        except network_errors as e:
            error = e
        else:
            files = [s.rfilename for s in info.siblings or []] or HfApi().list_repo_files(
                repo, repo_type="dataset")
            return files, lambda f: Path(hf_hub_download(repo, f, repo_type="dataset"))
        if hub.failure(error) in (hub.NOT_FOUND, hub.AUTH):
            raise DataError(f"{hub.describe(error, repo, 'dataset')}, or {_LOCAL_DATASET}")
    try:
        snapshot = Path(snapshot_download(repo, repo_type="dataset", local_files_only=True))
    except network_errors:
        raise DataError(f"{hub.describe(error, repo, 'dataset')}, or {_LOCAL_DATASET}") from None
    files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    return files, lambda f: snapshot / f


def _read_hub(repo: str, split: str, config: str | None, prompt_field, answer_field, hints):
    files, fetch = _hub_files(repo)
    try:
        matched = match_split_files(files, split, config)
    except DataError as e:
        raise DataError(f"Hub dataset {repo!r}: {e}") from None
    examples = []
    for name in matched:
        try:
            local = fetch(name)
        except hub.network_errors() as e:
            raise DataError(
                f"could not download {name} of dataset {repo!r} ({type(e).__name__}); check the "
                f"network, or {_LOCAL_DATASET}"
            ) from e
        examples += read_file(local, prompt_field, answer_field, hints)
    return examples


def _read_builtin(spec: str, split: str) -> list[Example]:
    from . import arith

    tasks = {"arith": arith.load_arith}
    name, _, query = spec[len(BUILTIN_PREFIX) :].partition("?")
    if name not in tasks:
        raise DataError(
            f"unknown built-in task {spec!r}; expected one of "
            + ", ".join(BUILTIN_PREFIX + n for n in sorted(tasks))
        )
    params: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DataError(f"{spec!r}: malformed parameter {item!r}, expected key=value")
        params[key] = value
    if "split" in params:  # one spec names both splits; training must not read its test split
        raise DataError(f"{spec!r}: the split is not a parameter of the spec; choose it with "
                        "dataset.split / eval_split, or --split for oisd-mlx eval")
    return tasks[name](split, params)


def _is_local(source: str) -> bool:
    path = Path(source).expanduser()
    return not source.startswith(BUILTIN_PREFIX) and (path.suffix in FILE_SUFFIXES or path.exists())


def load_examples(
    source: str,
    split: str = "train",
    config: str | None = None,
    prompt_field: str | None = "question",
    answer_field: str | None = "answer",
    max_samples: int | None = None,
    field_hints: tuple[str, str] = CONFIG_FIELD_HINTS,
) -> list[Example]:
    """One split of a dataset as Examples, in the source's order; the first `max_samples` rows.

    source: a local .jsonl/.json/.parquet file, `builtin:NAME[?key=value&...]`, or a Hub
    dataset id. A field of None is detected on the first row; `field_hints` says where a field
    name comes from (see `read_file`). Raises DataError naming the file, row or repository.
    """
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples must be >= 1, got {max_samples}")
    if source.startswith(BUILTIN_PREFIX):
        examples = _read_builtin(source, split)
    elif _is_local(source):
        examples = read_file(source, prompt_field, answer_field, field_hints)
    elif _HUB_ID.match(source):
        examples = _read_hub(source, split, config, prompt_field, answer_field, field_hints)
    else:
        raise DataError(
            f"dataset source {source!r} is not a local {'/'.join(FILE_SUFFIXES)} file, a "
            "builtin: task or a Hugging Face Hub dataset id ('owner/name')"
        )
    if not examples:
        raise DataError(f"dataset {source!r} (split {split!r}) has no rows")
    return examples[:max_samples]
