"""Prompt sources: every dataset becomes a list of `Example(prompt, answer)`.

`load_examples(source, ...)` reads one split of:
- a local file: `.jsonl` (one object a line), `.json` (a list of objects) or `.parquet`;
  a local file is one split, so `split` and `config` are ignored for it;
- a built-in task, `builtin:NAME[?key=value&...]` (`builtin:arith?digits=3&ops=+-`);
- a Hugging Face Hub dataset id (`openai/gsm8k`): the split's parquet (or jsonl) files are
  downloaded into the Hub cache, or read from it when the Hub cannot be reached.

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

from ..io import read_jsonl
from ..rewards.extract import extract_answer, gsm8k_gold

BUILTIN_PREFIX = "builtin:"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_SHOWN_FILES = 30  # a Hub listing in an error message is cut after this many files


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


def _example(row, where: str, prompt_field: str, answer_field: str) -> Example:
    """Check one row (a dict from any format) and turn it into an Example."""
    if not isinstance(row, dict):
        raise DataError(f"{where} is a JSON {type(row).__name__}, expected an object")
    for field, key in ((prompt_field, "prompt_field"), (answer_field, "answer_field")):
        if field not in row:
            raise DataError(
                f"{where} has no field {field!r} (fields: {', '.join(map(str, row)) or 'none'}); "
                f"set dataset.{key}"
            )
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


def _read_jsonl(path: Path, prompt_field: str, answer_field: str) -> list[Example]:
    return [_example(row, where, prompt_field, answer_field)
            for where, row in read_jsonl(path, DataError)]


def _read_json(path: Path, prompt_field: str, answer_field: str) -> list[Example]:
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines saved under a .json name
            return _read_jsonl(path, prompt_field, answer_field)
        raise DataError(
            f"{path}: invalid JSON ({e.msg}, line {e.lineno} column {e.colno})"
        ) from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects, got a {type(rows).__name__}")
    return [
        _example(row, f"row {i} of {path}", prompt_field, answer_field)
        for i, row in enumerate(rows, start=1)
    ]


def _read_parquet(path: Path, prompt_field: str, answer_field: str) -> list[Example]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    import pyarrow as pa

    try:
        columns = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    for field, key in ((prompt_field, "prompt_field"), (answer_field, "answer_field")):
        if field not in columns:
            raise DataError(
                f"{path} has no column {field!r} (columns: {', '.join(columns)}); set dataset.{key}"
            )
    # Only the two columns: a Hub shard may carry images or long solutions we never use.
    table = pq.read_table(path, columns=list(dict.fromkeys([prompt_field, answer_field])))
    return [
        _example(row, f"row {i} of {path}", prompt_field, answer_field)
        for i, row in enumerate(table.to_pylist(), start=1)
    ]


_READERS: dict[str, Callable[[Path, str, str], list[Example]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
}


def read_file(path: str | Path, prompt_field: str = "question", answer_field: str = "answer"):
    """Every row of a local `.jsonl` / `.json` / `.parquet` file as Examples, in file order."""
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
        return _READERS[path.suffix](path, prompt_field, answer_field)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None


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


def _network_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when the Hub cannot be reached or refuses the request."""
    import importlib

    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [HfHubHTTPError, OSError]
    # huggingface_hub's HTTP library changed over versions (requests, httpx, httpx2).
    for module, name in (
        ("httpx2", "HTTPError"),
        ("httpx", "HTTPError"),
        ("requests", "RequestException"),
    ):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _hub_files(repo: str) -> tuple[list[str], Callable[[str], Path]]:
    """The repository's file listing and a function that returns a local copy of one file.

    Online: the Hub's listing, files fetched through the Hub cache. Offline: the cached snapshot.
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    network_errors = _network_errors()
    try:
        files = HfApi().list_repo_files(repo, repo_type="dataset")
        return files, lambda f: Path(hf_hub_download(repo, f, repo_type="dataset"))
    except network_errors as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    try:
        snapshot = Path(snapshot_download(repo, repo_type="dataset", local_files_only=True))
    except network_errors:
        raise DataError(
            f"could not get dataset {repo!r} from the Hugging Face Hub ({reason}) and it is not "
            "in the local Hub cache; check the id and the network, or pass a local .jsonl or "
            ".parquet file as dataset.source"
        ) from None
    files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    return files, lambda f: snapshot / f


def _read_hub(repo: str, split: str, config: str | None, prompt_field: str, answer_field: str):
    files, fetch = _hub_files(repo)
    try:
        matched = match_split_files(files, split, config)
    except DataError as e:
        raise DataError(f"Hub dataset {repo!r}: {e}") from None
    examples = []
    for name in matched:
        try:
            local = fetch(name)
        except _network_errors() as e:
            raise DataError(
                f"could not download {name} of dataset {repo!r} ({type(e).__name__}); check the "
                "network, or pass a local .jsonl or .parquet file as dataset.source"
            ) from e
        examples += read_file(local, prompt_field, answer_field)
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
    return tasks[name](split, params)


def _is_local(source: str) -> bool:
    path = Path(source).expanduser()
    return not source.startswith(BUILTIN_PREFIX) and (path.suffix in FILE_SUFFIXES or path.exists())


def load_examples(
    source: str,
    split: str = "train",
    config: str | None = None,
    prompt_field: str = "question",
    answer_field: str = "answer",
    max_samples: int | None = None,
) -> list[Example]:
    """One split of a dataset as Examples, in the source's order; the first `max_samples` rows.

    source: a local .jsonl/.json/.parquet file, `builtin:NAME[?key=value&...]`, or a Hub
    dataset id. Raises DataError naming the file, row or repository on any problem.
    """
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples must be >= 1, got {max_samples}")
    if source.startswith(BUILTIN_PREFIX):
        examples = _read_builtin(source, split)
    elif _is_local(source):
        examples = read_file(source, prompt_field, answer_field)
    elif _HUB_ID.match(source):
        examples = _read_hub(source, split, config, prompt_field, answer_field)
    else:
        raise DataError(
            f"dataset source {source!r} is not a local {'/'.join(FILE_SUFFIXES)} file, a "
            "builtin: task or a Hugging Face Hub dataset id ('owner/name')"
        )
    if not examples:
        raise DataError(f"dataset {source!r} (split {split!r}) has no rows")
    return examples[:max_samples]
