"""The config reference (`oisd-mlx train --print-config`, README's key table), generated from the
schema in `config.py`: every dotted key with its type, default and meaning.

The meaning of a field is its trailing `# comment` in config.py, continued by the comment lines
right below it (up to a blank line or the next field), so the help text is written once, next to
the field. A section comment (`# optimizer`) has a blank line above it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from . import config
from .io import write_text


@dataclass(frozen=True)
class KeyDoc:
    path: str  # dotted key, list elements as `key[].field`
    type: str  # e.g. "int", "float / null", "grpo / oisd / bupo", "section"
    default: str  # YAML spelling; "required" when the key has no default
    meaning: str  # the field's comment


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment text} for the fields of dataclass `cls` that have one."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments, code_lines = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        lines = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        if not lines:
            continue
        n = node.end_lineno + 1
        while n in comments and n not in code_lines:  # comment-only lines continue it
            lines.append(comments[n])
            n += 1
        out[node.target.id] = " ".join(lines)
    return out


def type_name(tp: Any) -> str:
    """A type hint of the schema as a reader writes YAML for it: "int", "str / null",
    "grpo / oisd / bupo", "list[int]", "section"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " / ".join(names + ["null"] * (type(None) in args))
    if origin is Literal:
        return " / ".join(map(str, args))
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def show_default(f: dataclasses.Field) -> str:
    """The field's default in YAML flow style ("required" when there is none)."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "{...}"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        value = [dataclasses.asdict(v) for v in value]
    return yaml.safe_dump(value, default_flow_style=True, width=1_000).strip().removesuffix(
        "\n...").strip()


def reference(cls: type = config.TrainConfig, prefix: str = "") -> list[KeyDoc]:
    """Every key of the schema in declaration order, each section followed by its keys."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        rows.append(KeyDoc(path, type_name(tp), show_default(f), comments.get(f.name, "")))
        inner = config._strip_optional(tp)  # a section may be null
        if typing.get_origin(inner) is list and dataclasses.is_dataclass(typing.get_args(inner)[0]):
            rows += reference(typing.get_args(inner)[0], f"{path}[].")
        elif dataclasses.is_dataclass(inner):
            rows += reference(inner, f"{path}.")
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def format_reference(rows: list[KeyDoc] | None = None) -> str:
    """A Markdown table (key, type, default, meaning), columns padded to read in a terminal."""
    rows = reference() if rows is None else rows
    table = [("key", "type", "default", "meaning")]
    table += [(f"`{r.path}`", r.type, f"`{r.default}`", r.meaning) for r in rows]
    table = [[_cell(c) for c in row] for row in table]
    widths = [max(len(row[i]) for row in table) for i in range(2)]
    widths.append(min(24, max(len(row[2]) for row in table)))
    widths.append(3)
    table.insert(1, ["-" * w for w in widths])
    return "\n".join("| " + " | ".join([c.ljust(w) for c, w in zip(row[:3], widths)] + [row[3]])
                     + " |" for row in table)


BEGIN = "<!-- config reference: generated by `oisd-mlx train --print-config` -->"
END = "<!-- end of config reference -->"


def readme_block(table: str) -> str:
    """The table as README.md holds it, between the BEGIN and END markers."""
    return f"{BEGIN}\n\n{table}\n\n{END}"


def update_readme(path: str) -> bool:
    """Replace the marked block of the Markdown file at `path` with the current table; returns
    whether the file changed. A file without the markers is an error."""
    text = Path(path).read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"error: {path} has no '{BEGIN}' ... '{END}' block")
    new = text[:start] + readme_block(format_reference()) + text[end + len(END):]
    if new != text:
        write_text(path, new)
    return new != text


if __name__ == "__main__":  # python -m mlx_oisd.config_reference README.md
    for name in sys.argv[1:] or ["README.md"]:
        print(f"{name}: {'updated' if update_readme(name) else 'up to date'}")
