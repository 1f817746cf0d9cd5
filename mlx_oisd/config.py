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
from .data.sources import is_file_source
from .hub import REPO_ID
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
    split: str = "train"  # the split trained on
    prompt_field: str = "question"  # column with the question
    answer_field: str = "answer"  # column with the reference (GSM8K ####, MATH \boxed{} reduced)
    system_prompt: str | None = None  # system message of the chat template; None: none
    instruction: str | None = MATH_INSTRUCTION  # appended to every question; null: none
    max_samples: int | None = None  # None: every row of `split`
    eval_source: str | None = None  # held-out data (test.jsonl, a Hub id); None: `source`


@dataclass
class LoraConfig:
    rank: int = 16  # r of the low-rank update
    scale: float = 20.0  # multiplies the update B A x (PEFT: lora_alpha / r)
    dropout: float = 0.0  # dropout on the adapters' input
    num_layers: int = -1  # last N blocks get adapters; -1: all
    keys: list[str] | None = None  # module paths, e.g. ["self_attn.q_proj"]; None: mlx-lm's


@dataclass
class QuantizeConfig:
    """QLoRA: quantize an unquantized base at load time, then train LoRA adapters on it."""

    bits: Literal[2, 3, 4, 5, 6, 8] = 4  # bits per weight
    group_size: Literal[32, 64, 128] = 64  # weights sharing one scale and bias


@dataclass
class OisdConfig:
    student_layers: list[int] = field(default_factory=lambda: [6])  # 1-based blocks
    lambda_logit: float = 1.0  # weight of the logit-lens JS term ("how to think")
    lambda_attn: float = 0.1  # weight of the attention JS term ("where to look")
    tau: float = 1.0  # temperature of student and teacher distributions in the JS terms
    weighting: Weighting = "advantage"  # per-completion weight of the JS terms: A_i, sign(A_i), 1
    lens_norm: bool = True  # the students' lens applies the final RMSNorm before W_U
    head_grad: bool = True  # the logit-lens term also trains the shared final norm and head
    # (full fine-tuning; tied embeddings); false: it trains only blocks 1..l


@dataclass
class BupoConfig:
    internal_steps: int = 30  # first N steps optimise the layer-l lens policy
    lens_norm: bool = False  # the internal policy applies the final RMSNorm (BuPO's code: no)


@dataclass
class RewardSpec:
    name: str  # math, format, or my.module:fn
    weight: float = 1.0  # the reward is the weighted sum of all rewards


@dataclass
class TrainConfig:
    model: str  # Hub id, local folder, builtin:tiny, builtin:tiny-arith
    dataset: DatasetConfig  # the training prompts
    output_dir: str | None = None  # None: runs/<model basename>-<algorithm>, set by validate
    algorithm: Algorithm = "oisd"  # grpo: no alignment; oisd: GRPO + OISD; bupo: BuPO baseline

    # rollouts
    max_steps: int = 200  # training steps (one batch of rollouts each)
    batch_size: int = 8  # prompts per step
    num_generations: int = 8  # G, completions per prompt
    max_completion_length: int = 1024  # tokens per completion (the sampled EOS included)
    max_prompt_length: int = 512  # tokens of the rendered prompt (chat template included)
    truncate_prompts: bool = False  # false: longer prompts are dropped; true: cut from the left
    temperature: float = 1.0  # sampling temperature; the loss scores the tempered policy
    top_p: float = 1.0  # nucleus sampling; 1: off
    top_k: int = 0  # sample from the k likeliest tokens; 0: off
    min_p: float = 0.0  # drop tokens below min_p x the top probability; 0: off. The loss's
    # log-probs are of the full (untruncated) tempered policy, as in TRL
    enable_thinking: bool = False  # Qwen3 thinking mode in the chat template

    # optimizer
    learning_rate: float = 1.0e-5  # AdamW peak step size
    lr_scheduler_type: Scheduler = "cosine"  # decay to 0 after the warmup (or constant)
    warmup_steps: int = 0  # steps of linear warmup from 0
    warmup_ratio: float = 0.0  # warmup as a fraction of max_steps (ceil); not with warmup_steps
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # 0: no clipping
    minibatch_size: int | Literal["auto"] | None = None  # completions per micro-batch (gradient
    # accumulation); None: all; auto: the largest that fits the memory plan (mlx_oisd.memory)
    sort_by_length: bool = True  # micro-batches of rows sorted by completion length, each padded
    # only to its own longest row (same gradient; prompts still shared within a micro-batch)
    rollout_batch_size: int | Literal["auto"] = "auto"  # rows decoding at once; auto: memory plan
    memory_limit_gb: float | None = None  # memory budget; None: Metal's recommended working set,
    # else the machine's RAM
    lora: LoraConfig | None = field(default_factory=LoraConfig)  # None: full fine-tuning
    init_adapter: str | None = None  # mlx-lm adapter folder (e.g. an sft's adapters/) to start
    # from instead of fresh LoRA (with lora: null, fused into the weights); ignored on resume
    quantize: QuantizeConfig | None = None  # QLoRA: quantize the base at load; None: as stored

    # objective
    advantage: Advantage = "grpo"  # group estimator (mlx_oisd.advantages); dr_grpo: no std
    filter_zero_std_groups: bool = False  # drop groups whose rewards are all equal
    skip_zero_advantage: bool = True  # rows whose gradient is exactly 0 (A = 0, beta 0, oisd
    # weighting advantage or sign) are not computed; normalisers stay the whole batch's
    loss_agg: LossAgg = "token_mean"  # token aggregation (TRL loss_type: dapo / bnpo, grpo,
    # dr_grpo)
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float = 0.28  # upper clip: ratio <= 1 + epsilon_high
    beta: float = 0.0  # k3 KL to the starting policy (LoRA: adapters off); 0: none
    num_iterations: int = 1  # optimizer updates per batch of rollouts
    mask_truncated: bool = False  # completions cut by max_completion_length get no loss
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence: GSPO, one
    # ratio exp(mean_t(logp - logp_old)) per completion, clipped to sequence_epsilon(_high)
    sequence_epsilon: float = 3.0e-4  # GSPO's lower clip (its paper's value)
    sequence_epsilon_high: float = 4.0e-4  # GSPO's upper clip
    overlong_buffer_len: int = 0  # DAPO's soft overlong punishment: the last N tokens before
    # max_completion_length cost up to overlong_penalty, linearly; 0: off
    overlong_penalty: float = 1.0  # reward subtracted at max_completion_length
    dynamic_sampling: bool = False  # DAPO: draw more prompts until batch_size groups have
    # rewards that differ (raw reward), at most max_sampling_rounds rollouts per step
    max_sampling_rounds: int = 3  # rollout rounds per step with dynamic_sampling
    oisd: OisdConfig = field(default_factory=OisdConfig)  # OISD alignment terms
    bupo: BupoConfig = field(default_factory=BupoConfig)  # algorithm: bupo
    rewards: list[RewardSpec] = field(  # reward functions and weights
        default_factory=lambda: [RewardSpec("math", 1.0), RewardSpec("format", 0.1)]
    )
    reward_timeout: float = 10.0  # seconds per item for math and user rewards (a hang scores 0)
    loss_chunk_size: int | None = None  # response rows per chunk of the vocabulary-sized loss;
    # None: about 2**20 logits per chunk (objective.chunk_rows), so memory is flat in V x tokens
    compile: bool = False  # mx.compile the gradient step (P and C padded to multiples of 32)
    gradient_checkpointing: bool = False  # recompute each block in the backward pass: the update
    # keeps one block's activations instead of every block's, for one more forward pass

    # held-out evaluation: accuracy (math reward) of sampled completions on `eval_split`
    eval_split: str | None = None  # e.g. "test" (of dataset.eval_source, else of source); None
    # and no eval_source: no evaluation
    eval_samples: int = 200  # first N problems of eval_split
    eval_k: int = 1  # completions per problem (Avg@k)
    eval_every: int = 0  # also every N steps; 0: before and after training only

    # bookkeeping
    save_every: int = 50  # 0: save only at the end
    save_total_limit: int | None = 3  # checkpoints kept (the newest ones); None: all
    max_nonfinite_steps: int = 3  # stop after this many steps in a row with non-finite updates
    distributed_timeout_s: float | None = 1800.0  # several ranks: a step longer than this
    # exits every surviving rank, naming the stalled one (the ring has no timeouts); None: off
    seed: int = 0  # LoRA init, data order, sampling
    push_to_hub: str | bool | None = None  # Hub repo id (owner/name): after training, export
    # the adapters as PEFT to output_dir/export-peft and upload them; true: to hub_model_id
    hub_model_id: str | None = None  # TRL's name for the repo of push_to_hub: true

    # watching a run
    logging_steps: int | None = None  # a progress line every N steps; None: a bar in a terminal,
    # else a line every max(1, max_steps // 50) steps (mlx_oisd.console)
    log_completions: int = 0  # groups per step written to output_dir/completions.jsonl; 0: none
    report_to: list[Literal["wandb", "tensorboard"]] = field(default_factory=list)  # trackers
    # of the metrics, config and logged completions (pip install mlx-oisd[track]); []: none
    run_name: str | None = None  # the trackers' run name; None: output_dir's folder name
    wandb_project: str | None = None  # wandb's project; None: $WANDB_PROJECT, else mlx-oisd


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
    "dataset.eval_source": _NON_EMPTY,
    "max_steps": _at_least(1),
    "batch_size": _at_least(1),
    "num_generations": ((lambda v: v >= 2), ">= 2 (a group of one has no advantage)"),
    "max_completion_length": _at_least(1),
    "max_prompt_length": _at_least(1),
    "temperature": _POSITIVE,
    "top_p": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "top_k": _at_least(0),
    "min_p": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
    "learning_rate": _POSITIVE,
    "warmup_steps": _at_least(0),
    "warmup_ratio": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
    "weight_decay": _at_least(0),
    "max_grad_norm": _at_least(0),
    "minibatch_size": ((lambda v: v == "auto" or v >= 1), ">= 1, auto or null"),
    "rollout_batch_size": ((lambda v: v == "auto" or v >= 1), ">= 1 or auto"),
    "memory_limit_gb": _POSITIVE,
    "distributed_timeout_s": _POSITIVE,
    "lora.rank": _at_least(1),
    "lora.scale": _POSITIVE,
    "lora.dropout": ((lambda v: 0 <= v <= 0.9), "in [0, 0.9]"),
    "lora.num_layers": ((lambda v: v == -1 or v >= 1), "-1 (all blocks) or >= 1"),
    "lora.keys": _NON_EMPTY,
    "lora.keys[]": _NON_EMPTY,
    "init_adapter": _NON_EMPTY,
    "epsilon": ((lambda v: 0 < v < 1), "in (0, 1)"),
    "epsilon_high": ((lambda v: 0 < v <= 10), "in (0, 10]"),
    "sequence_epsilon": ((lambda v: 0 < v < 1), "in (0, 1)"),
    "sequence_epsilon_high": ((lambda v: 0 < v <= 10), "in (0, 10]"),
    "overlong_buffer_len": _at_least(0),
    "overlong_penalty": _at_least(0),
    "max_sampling_rounds": _at_least(1),
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
    "save_total_limit": _at_least(1),
    "max_nonfinite_steps": _at_least(1),
    "logging_steps": _at_least(1),
    "log_completions": _at_least(0),
    "report_to": ((lambda v: len(set(v)) == len(v)), "a list of distinct trackers"),
    "run_name": _NON_EMPTY,
    "wandb_project": _NON_EMPTY,
}

# Keys a resumed run may change: they leave shapes, data and the objective alone (the step size
# too: lowering learning_rate is the way on after non-finite updates). Every other key (model,
# lora.*, dataset.*, algorithm, batch sizes, seed, ...) changes the run, so a resume with a
# different value is refused (`config_diff`, trainer.setup).
HARMLESS_KEYS = frozenset({
    "output_dir", "max_steps", "save_every", "eval_split", "dataset.eval_source",
    "eval_samples", "eval_k",
    "eval_every", "reward_timeout", "loss_chunk_size", "compile", "gradient_checkpointing",
    "minibatch_size", "save_total_limit",
    "rollout_batch_size", "memory_limit_gb",
    "max_nonfinite_steps", "learning_rate", "max_grad_norm",
    "distributed_timeout_s",
    "log_completions", "report_to", "run_name", "wandb_project", "logging_steps",
    "init_adapter",  # a resumed run reads its weights from the checkpoint, not from here
    "push_to_hub", "hub_model_id",
})

# PyYAML follows YAML 1.1, which reads `1e-5` (no dot) as a string; accept that spelling.
_EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
_BAD = object()  # a value that failed a check; its problem is already recorded
_TYPE_NAMES = {bool: "true or false", int: "an integer", str: "a string"}


def _combination_problems(cfg: TrainConfig) -> list[str]:
    """Rules over several keys; checked once every key has the right type."""
    problems = []
    d = cfg.dataset
    if cfg.eval_split is not None and d.eval_source is None and is_file_source(d.source):
        problems.append(
            f"'eval_split' ({cfg.eval_split!r}) would score training rows: dataset.source "
            f"{d.source!r} is one file, and a local file is one split; set "
            "dataset.eval_source: test.jsonl (a held-out file), or eval_split: null")
    if d.eval_source is not None and cfg.eval_split is None and not is_file_source(d.eval_source):
        problems.append(f"'eval_split' must choose a split of dataset.eval_source "
                        f"{d.eval_source!r} (e.g. eval_split: test), got null")
    if cfg.quantize is not None and cfg.lora is None:
        problems.append("'quantize' needs 'lora' (QLoRA trains adapters on the quantized base)")
    if cfg.overlong_buffer_len >= cfg.max_completion_length:
        problems.append(f"'overlong_buffer_len' must be < max_completion_length "
                        f"({cfg.max_completion_length}), got {cfg.overlong_buffer_len}")
    if cfg.warmup_steps > cfg.max_steps:
        problems.append(
            f"'warmup_steps' must be <= max_steps ({cfg.max_steps}), got {cfg.warmup_steps}"
        )
    if cfg.warmup_steps and cfg.warmup_ratio:
        problems.append(
            f"'warmup_steps' ({cfg.warmup_steps}) and 'warmup_ratio' ({cfg.warmup_ratio}) are both "
            "set; give one of them"
        )
    problems += _hub_problems(cfg.push_to_hub, cfg.hub_model_id)
    return problems


def _hub_problems(push: str | bool | None, repo: str | None) -> list[str]:
    """`push_to_hub: owner/name`, or TRL's `push_to_hub: true` + `hub_model_id: owner/name`."""
    problems = []
    for key, value in (("push_to_hub", push), ("hub_model_id", repo)):
        if isinstance(value, str) and not REPO_ID.match(value):
            problems.append(f"'{key}' must be a Hub repo id of the form 'owner/name', got {value!r}")
    if push is True and repo is None:
        problems.append("'push_to_hub' is true but 'hub_model_id' is not set: give the Hub repo "
                        "id (owner/name) as hub_model_id, or as push_to_hub itself")
    if isinstance(push, str) and repo is not None and repo != push:
        problems.append(f"'push_to_hub' ({push!r}) and 'hub_model_id' ({repo!r}) name different "
                        "repos; give one")
    return problems


def hub_repo(cfg: TrainConfig) -> str | None:
    """The Hub repo a finished run is pushed to, or None."""
    if cfg.push_to_hub is True:
        return cfg.hub_model_id
    return cfg.push_to_hub or None


def quantize_problem(q: QuantizeConfig, model_config: dict, model: str) -> str | None:
    """Why `quantize.group_size` cannot quantize `model` (its config.json), or None. Every
    quantized layer's input width (hidden size, attention width, MLP width) must be a multiple
    of the group size."""
    hidden, heads = model_config.get("hidden_size"), model_config.get("num_attention_heads")
    if not isinstance(hidden, int) or not isinstance(heads, int):
        return None
    widths = {"hidden_size": hidden,
              "num_attention_heads * head_dim": heads * (model_config.get("head_dim") or hidden // heads),
              "intermediate_size": model_config.get("intermediate_size") or hidden}
    bad = {k: w for k, w in widths.items() if w % q.group_size}
    if not bad:
        return None
    sizes = typing.get_args(typing.get_type_hints(QuantizeConfig)["group_size"])
    allowed = [g for g in sizes if all(w % g == 0 for w in widths.values())]
    shown = ", ".join(f"{k} {w}" for k, w in bad.items())
    fix = (f"use quantize.group_size {' or '.join(map(str, allowed))}" if allowed else
           f"none of {', '.join(map(str, sizes))} divides them: train without quantize")
    return (f"'quantize.group_size' {q.group_size} does not divide {model}'s {shown} (each "
            f"quantized layer's input width must be a multiple of it); {fix}")


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


_TRL_LOSS_TYPES = ('TRL\'s "grpo" is seq_mean_token_mean, "bnpo" and "dapo" are token_mean, '
                   '"dr_grpo" is seq_mean_token_sum_norm')
# Names of TRL (GRPOConfig, TrainingArguments), PEFT (LoraConfig) and mlx-lm (lora.py's YAML and
# flags) -> (our dotted key or None, a note). A full dotted path (`lora.r`) matches first, then
# the bare name at any level (`lora_alpha`, `lora.lora_alpha`). Used before difflib, and only
# for names the schema does not have.
FOREIGN_KEYS: dict[str, tuple[str | None, str]] = {
    "per_device_train_batch_size": ("batch_size", "prompts per step; TRL's "
                                    "per_device_train_batch_size counts completions = "
                                    "batch_size x num_generations"),
    "train_batch_size": ("batch_size", "prompts per step"),
    "generation_batch_size": ("batch_size", "prompts per step; x num_generations completions"),
    "num_completions": ("num_generations", "completions per prompt"),
    "loss_type": ("loss_agg", _TRL_LOSS_TYPES),
    "lora.r": ("lora.rank", "PEFT's r"),
    "lora_r": ("lora.rank", "PEFT's r"),
    "lora_rank": ("lora.rank", ""),
    "lora.alpha": ("lora.scale", "scale = alpha / r"),
    "lora_alpha": ("lora.scale", "scale = lora_alpha / r"),
    "lora_scale": ("lora.scale", ""),
    "lora_dropout": ("lora.dropout", ""),
    "lora_layers": ("lora.num_layers", "mlx-lm's lora_layers"),
    "target_modules": ("lora.keys", 'module paths inside a block, e.g. ["self_attn.q_proj", '
                       '"self_attn.v_proj"]'),
    "lora_parameters": ("lora", "mlx-lm's lora_parameters: {rank, scale, dropout, keys}"),
    "use_peft": ("lora", "LoRA is on by default; lora: null is full fine-tuning"),
    "peft_config": ("lora", "LoRA is on by default; lora: null is full fine-tuning"),
    "fine_tune_type": ("lora", "lora: {...} trains adapters, lora: null is full fine-tuning"),
    "load_in_4bit": ("quantize", "quantize: {bits: 4} (QLoRA)"),
    "save_steps": ("save_every", ""),
    "steps_per_save": ("save_every", "mlx-lm's steps_per_save"),
    "steps_per_report": ("logging_steps", "mlx-lm's steps_per_report"),
    "eval_steps": ("eval_every", ""),
    "steps_per_eval": ("eval_every", "mlx-lm's steps_per_eval"),
    "val_batches": ("eval_samples", "problems of eval_split"),
    "num_train_epochs": ("max_steps", "training is counted in steps of batch_size prompts; "
                         "an epoch is (rows of the split) / batch_size steps"),
    "iters": ("max_steps", "mlx-lm's iters; num_iterations is TRL's updates per batch"),
    "max_iters": ("max_steps", ""),
    "gradient_accumulation_steps": ("minibatch_size", "completions per micro-batch: N "
                                    "accumulation steps are minibatch_size = batch_size x "
                                    "num_generations / N"),
    "max_new_tokens": ("max_completion_length", ""),
    "max_tokens": ("max_completion_length", ""),
    "max_seq_length": ("max_completion_length", "prompts and completions have separate "
                       "limits: max_prompt_length and max_completion_length"),
    "kl_coef": ("beta", "k3 KL to the starting policy"),
    "init_kl_coef": ("beta", "k3 KL to the starting policy"),
    "kl_beta": ("beta", ""),
    "cliprange": ("epsilon", "the upper clip is epsilon_high"),
    "clip_range": ("epsilon", "the upper clip is epsilon_high"),
    "epsilon_low": ("epsilon", ""),
    "lr": ("learning_rate", ""),
    "lr_schedule": ("lr_scheduler_type", "cosine, linear or constant, with warmup_steps"),
    "warmup": ("warmup_steps", "or warmup_ratio"),
    "temp": ("temperature", ""),
    "mask_truncated_completions": ("mask_truncated", ""),
    "scale_rewards": ("advantage", "scale_rewards: false is advantage: dr_grpo"),
    "reward_funcs": ("rewards", "a list of {name, weight}"),
    "reward_weights": ("rewards", "a list of {name, weight}"),
    "model_name_or_path": ("model", ""),
    "dataset_name": ("dataset.source", ""),
    "dataset_config": ("dataset.config", ""),
    "dataset_train_split": ("dataset.split", ""),
    "dataset_test_split": ("eval_split", ""),
    "data": ("dataset", "mlx-lm's data folder; here dataset: {source: ...}"),
    "dataset.name": ("dataset.source", ""),
    "dataset.path": ("dataset.source", ""),
    "grad_checkpoint": ("gradient_checkpointing", "mlx-lm's grad_checkpoint"),
    "adapter_path": ("output_dir", "adapters are written to output_dir/adapters"),
}


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
        message = f"unknown key '{_join(path, key)}' in {self.source}"
        foreign = foreign_hint(_join(path, key), key)
        if foreign:
            return f"{message} ({foreign})"
        close = difflib.get_close_matches(key, known, n=1)
        if close:
            hint = _join(path, close[0])
        else:  # a nested key written at the wrong level, e.g. `tau:` for `oisd.tau`
            hint = next(
                (p for p in _schema_paths(TrainConfig) if "[]" not in p and p.endswith("." + key)),
                None,
            )
        return message + (f" (did you mean '{hint}'?)" if hint else "")


def foreign_hint(path: str, key: str) -> str | None:
    """The hint for `path` (last part `key`) when it is a TRL / PEFT / mlx-lm name: "did you mean
    'batch_size'? prompts per step; ...". None for names the schema has, anywhere."""
    schema = set(_schema_paths(TrainConfig))
    names = {p.rsplit(".", 1)[-1] for p in schema}
    entry = None if path in schema else FOREIGN_KEYS.get(path)
    if entry is None and key not in names:
        entry = FOREIGN_KEYS.get(key)
    if entry is None:
        return None
    target, note = entry
    return f"did you mean '{target}'?" + (f" {note}" if note else "")


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
