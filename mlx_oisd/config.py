"""Run configuration: a YAML file, then `--set` overrides, then one `validate` (STYLE.md habit 4).

The dataclasses below are the schema; key names follow TRL where TRL has one. `validate` walks
their fields and type hints (nested dataclasses, `X | None`, `list[X]`, `Literal[...]`), so a new
key is a new field, plus a line in `_RULES` if some of its values are impossible. There is no
hand-written check or CLI flag per key. Every problem is collected and raised as one
`ConfigError` that names the file and the dotted key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import operator
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .data.prompts import MATH_INSTRUCTION
from .io import write_text

Algorithm = Literal["grpo", "oisd", "bupo"]
Advantage = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"]
LossAgg = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
Weighting = Literal["advantage", "sign", "none"]
Scheduler = Literal["cosine", "constant", "linear"]


class ConfigError(ValueError):
    """A config file or override that cannot run; the message lists every problem."""


@dataclass
class DatasetConfig:
    source: str  # Hub id, local .jsonl/.parquet, or builtin:arith
    config: str | None = None  # Hub dataset config name (gsm8k: "main")
    split: str = "train"
    prompt_field: str = "question"
    answer_field: str = "answer"
    system_prompt: str | None = None
    instruction: str | None = MATH_INSTRUCTION  # appended to every question; null: none
    max_samples: int | None = None  # None: every row of `split`


@dataclass
class LoraConfig:
    rank: int = 16
    scale: float = 20.0
    dropout: float = 0.0
    num_layers: int = -1  # last N blocks get adapters; -1: all
    keys: list[str] | None = None  # module paths, e.g. ["self_attn.q_proj"]; None: mlx-lm's


@dataclass
class QuantizeConfig:
    """QLoRA: quantize an unquantized base at load time, then train LoRA adapters on it."""

    bits: Literal[2, 3, 4, 5, 6, 8] = 4
    group_size: Literal[32, 64, 128] = 64


@dataclass
class OisdConfig:
    student_layers: list[int] = field(default_factory=lambda: [6])  # 1-based blocks
    lambda_logit: float = 1.0
    lambda_attn: float = 0.1
    tau: float = 1.0
    weighting: Weighting = "advantage"
    lens_norm: bool = True  # false: BuPO's lens without the final RMSNorm


@dataclass
class BupoConfig:
    internal_steps: int = 30


@dataclass
class RewardSpec:
    name: str  # math, format, or my.module:fn
    weight: float = 1.0


@dataclass
class TrainConfig:
    model: str  # Hub id, local folder, builtin:tiny, builtin:tiny-arith
    dataset: DatasetConfig
    output_dir: str | None = None  # None: runs/<model basename>-<algorithm>, set by validate
    algorithm: Algorithm = "oisd"
    # rollouts
    max_steps: int = 200
    batch_size: int = 8  # prompts per step
    num_generations: int = 8  # G, completions per prompt
    max_completion_length: int = 1024
    max_prompt_length: int = 512  # tokens of the rendered prompt (chat template included)
    truncate_prompts: bool = False  # false: longer prompts are dropped; true: cut from the left
    temperature: float = 1.0
    top_p: float = 1.0
    enable_thinking: bool = False
    # optimizer
    learning_rate: float = 1.0e-5
    lr_scheduler_type: Scheduler = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    minibatch_size: int | Literal["auto"] | None = None  # completions per micro-batch (gradient
    # accumulation); None: all; auto: the largest that fits the memory plan (mlx_oisd.memory)
    rollout_batch_size: int | Literal["auto"] = "auto"  # rows decoding at once; auto: memory plan
    memory_limit_gb: float | None = None  # memory budget; None: Metal's recommended working set,
    # else the machine's RAM
    lora: LoraConfig | None = field(default_factory=LoraConfig)  # None: full fine-tuning
    quantize: QuantizeConfig | None = None
    # objective
    advantage: Advantage = "grpo"
    filter_zero_std_groups: bool = False
    loss_agg: LossAgg = "token_mean"
    epsilon: float = 0.2
    epsilon_high: float = 0.28
    beta: float = 0.0
    num_iterations: int = 1
    mask_truncated: bool = False
    oisd: OisdConfig = field(default_factory=OisdConfig)
    bupo: BupoConfig = field(default_factory=BupoConfig)
    rewards: list[RewardSpec] = field(
        default_factory=lambda: [RewardSpec("math", 1.0), RewardSpec("format", 0.1)]
    )
    reward_timeout: float = 10.0  # seconds per item for math and user rewards (a hang scores 0)
    loss_chunk_size: int | None = None  # response rows per chunk of the vocabulary-sized loss;
    # None: about 2**20 logits per chunk (objective.chunk_rows), so memory is flat in V x tokens
    compile: bool = False  # mx.compile the gradient step (P and C padded to multiples of 32)
    gradient_checkpointing: bool = False  # recompute each block in the backward pass: the update
    # keeps one block's activations instead of every block's, for one more forward pass
    # held-out evaluation: accuracy (math reward) of sampled completions on `eval_split`
    eval_split: str | None = None  # e.g. "test"; None: no evaluation
    eval_samples: int = 200  # first N problems of eval_split
    eval_k: int = 1  # completions per problem (Avg@k)
    eval_every: int = 0  # also every N steps; 0: before and after training only
    # bookkeeping
    save_every: int = 50  # 0: save only at the end
    max_nonfinite_steps: int = 3  # stop after this many steps in a row with non-finite updates
    seed: int = 0


def _at_least(n: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= n), f">= {n}"


_POSITIVE = ((lambda v: v > 0), "> 0")
_NON_EMPTY = ((lambda v: len(v) > 0), "non-empty")

# Impossible values, keyed by dotted path; "[]" stands for every element of a list.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": _NON_EMPTY,
    "dataset.source": _NON_EMPTY,
    "dataset.prompt_field": _NON_EMPTY,
    "dataset.answer_field": _NON_EMPTY,
    "dataset.max_samples": _at_least(1),
    "max_steps": _at_least(1),
    "batch_size": _at_least(1),
    "num_generations": ((lambda v: v >= 2), ">= 2 (a group of one has no advantage)"),
    "max_completion_length": _at_least(1),
    "max_prompt_length": _at_least(1),
    "temperature": _POSITIVE,
    "top_p": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "learning_rate": _POSITIVE,
    "warmup_steps": _at_least(0),
    "weight_decay": _at_least(0),
    "max_grad_norm": _at_least(0),
    "minibatch_size": ((lambda v: v == "auto" or v >= 1), ">= 1, auto or null"),
    "rollout_batch_size": ((lambda v: v == "auto" or v >= 1), ">= 1 or auto"),
    "memory_limit_gb": _POSITIVE,
    "lora.rank": _at_least(1),
    "lora.scale": _POSITIVE,
    "lora.dropout": ((lambda v: 0 <= v <= 0.9), "in [0, 0.9]"),
    "lora.num_layers": ((lambda v: v == -1 or v >= 1), "-1 (all blocks) or >= 1"),
    "lora.keys": _NON_EMPTY,
    "lora.keys[]": _NON_EMPTY,
    "epsilon": ((lambda v: 0 < v < 1), "in (0, 1)"),
    "epsilon_high": ((lambda v: 0 < v <= 10), "in (0, 10]"),
    "beta": _at_least(0),
    "num_iterations": _at_least(1),
    "oisd.student_layers": (
        (lambda v: len(v) > 0 and len(set(v)) == len(v)),
        "a non-empty list of distinct blocks",
    ),
    "oisd.student_layers[]": ((lambda v: v >= 1), ">= 1 (blocks are numbered 1..L)"),
    "oisd.lambda_logit": _at_least(0),
    "oisd.lambda_attn": _at_least(0),
    "oisd.tau": _POSITIVE,
    "bupo.internal_steps": _at_least(0),
    "rewards": ((lambda v: len(v) > 0), "a non-empty list"),
    "rewards[].name": _NON_EMPTY,
    "loss_chunk_size": _at_least(1),
    "reward_timeout": _POSITIVE,
    "eval_samples": _at_least(1),
    "eval_k": _at_least(1),
    "eval_every": _at_least(0),
    "save_every": _at_least(0),
    "max_nonfinite_steps": _at_least(1),
}

# Keys a resumed run may change: they leave shapes, data and the objective alone (the step size
# too: lowering learning_rate is the way on after non-finite updates). Every other key (model,
# lora.*, dataset.*, algorithm, batch sizes, seed, ...) changes the run, so a resume with a
# different value is refused (`config_diff`, trainer.setup).
HARMLESS_KEYS = frozenset({
    "output_dir", "max_steps", "save_every", "eval_split", "eval_samples", "eval_k",
    "eval_every", "reward_timeout", "loss_chunk_size", "compile", "gradient_checkpointing",
    "minibatch_size",
    "rollout_batch_size", "memory_limit_gb",
    "max_nonfinite_steps", "learning_rate", "max_grad_norm",
})

# PyYAML follows YAML 1.1, which reads `1e-5` (no dot) as a string; accept that spelling.
_EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
_BAD = object()  # a value that failed a check; its problem is already recorded
_TYPE_NAMES = {bool: "true or false", int: "an integer", str: "a string"}


def _combination_problems(cfg: TrainConfig) -> list[str]:
    """Rules over several keys; checked once every key has the right type."""
    problems = []
    if cfg.quantize is not None and cfg.lora is None:
        problems.append("'quantize' needs 'lora' (QLoRA trains adapters on the quantized base)")
    if cfg.warmup_steps > cfg.max_steps:
        problems.append(
            f"'warmup_steps' must be <= max_steps ({cfg.max_steps}), got {cfg.warmup_steps}"
        )
    return problems


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _schema_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of `cls`, nested dataclasses included; list elements as `key[]`."""
    paths = []
    for name, tp in typing.get_type_hints(cls).items():
        path = _join(prefix, name)
        paths.append(path)
        tp = _strip_optional(tp)
        if typing.get_origin(tp) is list:
            path, tp = path + "[]", typing.get_args(tp)[0]
            paths.append(path)
        if dataclasses.is_dataclass(tp):
            paths += _schema_paths(tp, path)
    return paths


def _strip_optional(tp: Any) -> Any:
    """`X | None` -> X, `X | Y | None` -> `X | Y`; any other type unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args:
            rest = tuple(a for a in args if a is not type(None))
            return functools.reduce(operator.or_, rest)
    return tp


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " / ".join(map(str, typing.get_args(tp)))
    return "a number" if tp is float else _TYPE_NAMES.get(tp, str(tp))


class _Checker:
    """Walks raw YAML data against the dataclass schema, recording every problem."""

    def __init__(self, source: str):
        self.source = source
        self.problems: list[str] = []

    def expected(self, what: str, path: str, value: Any) -> object:
        self.problems.append(f"expected {what} for '{path}', got {_show(value)}")
        return _BAD

    def value(self, value: Any, tp: Any, path: str, rule: str) -> Any:
        out = self.typed(value, tp, path, rule)
        if out is not _BAD and out is not None and rule in _RULES:
            ok, expected = _RULES[rule]
            if not ok(out):
                self.problems.append(f"'{path}' must be {expected}, got {_show(value)}")
                return _BAD
        return out

    def typed(self, value: Any, tp: Any, path: str, rule: str) -> Any:
        if _strip_optional(tp) is not tp:
            return None if value is None else self.typed(value, _strip_optional(tp), path, rule)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):  # e.g. int | Literal["auto"]
            return self.union(value, args, path, rule)
        if dataclasses.is_dataclass(tp):
            return self.dataclass(value, tp, path, rule)
        if origin is list:
            if not isinstance(value, list):
                return self.expected("a list", path, value)
            items = [
                self.value(v, args[0], f"{path}[{i}]", rule + "[]") for i, v in enumerate(value)
            ]
            return _BAD if any(v is _BAD for v in items) else items
        if origin is Literal:
            if any(type(value) is type(a) and value == a for a in args):
                return value
            return self.expected("one of " + ", ".join(map(str, args)), path, value)
        if tp is float:
            return self.number(value, path)
        if tp in (int, str, bool) and type(value) is tp:
            return value
        if tp in _TYPE_NAMES:
            return self.expected(_TYPE_NAMES[tp], path, value)
        raise TypeError(f"config schema: unsupported type {tp!r} for '{path}'")

    def union(self, value: Any, members: tuple, path: str, rule: str) -> Any:
        """The value as the first member type that takes it without a problem."""
        for tp in members:
            scratch = _Checker(self.source)
            out = scratch.typed(value, tp, path, rule)
            if not scratch.problems:
                return out
        return self.expected(" or ".join(map(_describe, members)), path, value)

    def number(self, value: Any, path: str) -> Any:
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return self.expected("a number", path, value)
        if not math.isfinite(value):
            return self.expected("a finite number", path, value)
        return float(value)

    def dataclass(self, value: Any, cls: type, path: str, rule: str) -> Any:
        if not isinstance(value, dict):
            return self.expected("a mapping", path or "the top level", value)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in value:
            if key not in fields:
                self.problems.append(self.unknown_key(str(key), path, list(fields)))
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = self.value(
                    value[name], hints[name], _join(path, name), _join(rule, name)
                )
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.problems.append(f"missing required key '{_join(path, name)}' in {self.source}")
                kwargs[name] = _BAD
        return _BAD if any(v is _BAD for v in kwargs.values()) else cls(**kwargs)

    def unknown_key(self, key: str, path: str, known: list[str]) -> str:
        close = difflib.get_close_matches(key, known, n=1)
        if close:
            hint = _join(path, close[0])
        else:  # a nested key written at the wrong level, e.g. `tau:` for `oisd.tau`
            hint = next(
                (p for p in _schema_paths(TrainConfig) if "[]" not in p and p.endswith("." + key)),
                None,
            )
        message = f"unknown key '{_join(path, key)}' in {self.source}"
        return message + (f" (did you mean '{hint}'?)" if hint else "")


def validate(raw: dict, source: str = "<config>") -> TrainConfig:
    """Check `raw` (parsed YAML plus overrides) against the schema and return the config.

    Raises one ConfigError listing every problem (unknown key, wrong type, impossible value).
    """
    checker = _Checker(source)
    cfg = checker.dataclass(raw, TrainConfig, "", "")
    if cfg is not _BAD:
        checker.problems += _combination_problems(cfg)
    if checker.problems:
        raise ConfigError(
            f"invalid config {source}:\n" + "\n".join(f"  {p}" for p in checker.problems)
        )
    if cfg.output_dir is None:
        name = re.split(r"[/:\\]", cfg.model.rstrip("/\\"))[-1].lower()
        cfg.output_dir = f"runs/{name}-{cfg.algorithm}"
    return cfg


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Return a copy of `raw` with each `a.b.c=value` applied in order; values are YAML."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"malformed override {item!r}: expected key=value, e.g. oisd.tau=0.5")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            reason = str(e).splitlines()[0]
            raise ConfigError(
                f"malformed override {item!r}: value is not YAML ({reason})"
            ) from None
        node = raw
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                parent = ".".join(parts[: i + 1])
                raise ConfigError(f"malformed override {item!r}: '{parent}' is not a mapping")
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config, apply `--set` overrides, validate. Every failure is a ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read config {path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping of config keys in {path}, got {_show(raw)}")
    source = f"{path} with --set {' '.join(overrides)}" if overrides else str(path)
    return validate(apply_overrides(raw, overrides), source)


def to_dict(cfg: TrainConfig) -> dict:
    """Plain dicts, lists and scalars; `validate(to_dict(cfg)) == cfg`."""
    return dataclasses.asdict(cfg)


def config_diff(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The dotted keys whose values differ between two plain config dicts (`to_dict`), sorted:
    `[(key, old_value, new_value), ...]`. Mappings on both sides are compared key by key; a
    mapping against null (`lora: null`) or a list is one difference; a key on one side only is
    compared with None."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b, path = old.get(key), new.get(key), _join(prefix, key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, path)
        elif a != b:
            out.append((path, a, b))
    return out


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def run_changes(diff: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
    """The differences of `config_diff` that change the run (not in HARMLESS_KEYS)."""
    return [d for d in diff if not any(p in HARMLESS_KEYS for p in _prefixes(d[0]))]


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically (output_dir/config.yaml, checkpoints)."""
    return write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
