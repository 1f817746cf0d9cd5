"""Supervised warm-up (`oisd-mlx sft`) on mlx-lm's data formats, before RL.

Data is what `mlx_lm.lora --data` reads: a folder with `train.jsonl` (and an optional
`valid.jsonl`), or one `.jsonl` file. Each file holds one of mlx-lm's formats, detected from its
first row (mlx-lm's order: prompt/completion, then messages, then text):

    chat         {"messages": [{"role": ..., "content": ...}, ...]}  loss on the last (assistant)
                 message only, the tokens before it masked out (mlx-lm's `--mask-prompt`)
    completions  {"prompt": ..., "completion": ...}  the prompt rendered with the chat template as
                 a user turn (optionally with a system turn and the RL instruction), the
                 completion as the assistant's; loss on the completion only
    text         {"text": ...}  loss on every token (EOS appended, as mlx-lm does)

With LoRA the result is `out/adapters/` (an mlx-lm adapter folder) next to `out/config.yaml`,
which says what was trained so `oisd-mlx export out/adapters` finds the base model; with full
fine-tuning (`lora=None`) `out` is a complete model folder that `mlx_oisd.load` reads.

`init_adapter` (config key, mlx_oisd/init_adapter.py) starts an RL run from such an adapter
folder.

The loop is eager on purpose: on a CPU without a tuned BLAS, `mx.compile` of the step (as
mlx-lm's tuner does) measured slower for the tiny demo model, and shapes vary per batch.
"""

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx.utils import tree_flatten
from tqdm import tqdm

from .data.prompts import MATH_INSTRUCTION, prompt_messages
from .io import atomic_write, read_jsonl, write_json, write_text
from .loading import load_model, tokenizer_for
from .lora import apply_lora, save_adapters
from .precision import make_adamw

MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "tiny_spec.json")
# Format name -> the fields that identify it, in mlx-lm's detection order.
FORMATS = {"completions": ("prompt", "completion"), "chat": ("messages",), "text": ("text",)}
EXPECTED = ('one format per file: {"messages": [{"role": ..., "content": ...}, ...]} (chat), '
            '{"prompt": ..., "completion": ...} (completions) or {"text": ...} (text)')
INSTRUCTIONS = {"math": MATH_INSTRUCTION}  # names `--instruction` accepts besides literal text


class SftDataError(ValueError):
    """SFT data (or LoRA settings) that cannot be trained on; the message names the file and
    line (or the setting)."""


@dataclass
class SftFile:
    """The checked rows of one jsonl file (path None: rows given in memory), all of `format`."""

    path: Path | None
    format: str  # a key of FORMATS
    rows: list[dict]


@dataclass
class SftData:
    train: SftFile
    valid: SftFile | None = None
    source: str | None = None  # the folder or file it was read from


def row_format(row) -> str | None:
    """The FORMATS name a row has the fields of (mlx-lm's order), None for none."""
    if isinstance(row, dict):
        for name, keys in FORMATS.items():
            if all(k in row for k in keys):
                return name
    return None


def _row_problem(row: dict, fmt: str) -> str | None:
    """What is wrong with the values of a row of format `fmt`, None when nothing."""
    if fmt == "chat":
        messages = row["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            return ('expected {"messages": [{"role": ..., "content": ...}, ...]} with string '
                    "roles and contents")
        if messages[-1]["role"] != "assistant":
            return "the last message must be the assistant's (the target)"
        return None
    bad = [k for k in FORMATS[fmt] if not isinstance(row[k], str) or not row[k]]
    return f"{', '.join(bad)}: expected a non-empty string" if bad else None


def check_rows(rows, name: str, where: Callable[[int], str] = lambda i: f"row {i + 1}") -> SftFile:
    """An SftFile of `rows` (parsed jsonl), every row checked to have the first row's format.

    `where(i)` names row i in errors ("line 3 of data/train.jsonl")."""
    rows = list(rows)
    if not rows:
        raise SftDataError(f"{name}: no rows")
    fmt = None
    for i, row in enumerate(rows):
        found = row_format(row)
        if found is None or (fmt is not None and found != fmt):
            fields = sorted(row) if isinstance(row, dict) else type(row).__name__
            first = "" if fmt is None else f"; this file is {fmt} (from its first row)"
            raise SftDataError(f"{where(i)}: fields {fields}{first}; expected {EXPECTED}")
        fmt = found
        if problem := _row_problem(row, fmt):
            raise SftDataError(f"{where(i)}: {problem}")
    return SftFile(None, fmt, rows)


def read_sft_jsonl(path: str | Path) -> SftFile:
    """The rows of one jsonl file in one of FORMATS, checked."""
    path = Path(path)
    if not path.is_file():
        raise SftDataError(f"SFT data {str(path)!r} does not exist (expected a .jsonl file or a "
                           "folder with train.jsonl)")
    parsed = list(read_jsonl(path, SftDataError))
    wheres = [w for w, _ in parsed]
    out = check_rows((r for _, r in parsed), str(path), lambda i: wheres[i])
    out.path = path
    return out


def read_chat_jsonl(path: str | Path) -> list[dict]:
    """Rows of an mlx-lm chat jsonl file, checked (messages, the last one the assistant's)."""
    data = read_sft_jsonl(path)
    if data.format != "chat":
        raise SftDataError(f"{path}: {data.format} rows; expected chat rows ({{\"messages\": ...}})")
    return data.rows


def read_sft_data(path: str | Path) -> SftData:
    """mlx-lm's `--data`: a folder with train.jsonl and optional valid.jsonl, or one .jsonl."""
    path = Path(path)
    if path.is_dir():
        if not (path / "train.jsonl").is_file():
            found = sorted(p.name for p in path.iterdir())[:10]
            raise SftDataError(f"{path}: no train.jsonl (found {found}); expected an mlx-lm data "
                               "folder (train.jsonl, optional valid.jsonl) or a .jsonl file")
        valid = path / "valid.jsonl"
        return SftData(read_sft_jsonl(path / "train.jsonl"),
                       read_sft_jsonl(valid) if valid.is_file() else None, str(path))
    return SftData(read_sft_jsonl(path), None, str(path))


def save_model_folder(model: nn.Module, source: Path, out_dir: Path) -> Path:
    """A full model folder: `model`'s weights plus `source`'s config and tokenizer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (source / name).is_file() and name != "config.json":
            atomic_write(out_dir / name, lambda p, src=source / name: shutil.copyfile(src, p))
    weights = dict(tree_flatten(model.parameters()))
    atomic_write(out_dir / "model.safetensors",
                 lambda p: mx.save_safetensors(str(p), weights, metadata={"format": "pt"}))
    write_json(out_dir / "config.json", json.loads((source / "config.json").read_text()))
    return out_dir


def encode_row(tokenizer, fmt: str, row: dict, system_prompt: str | None = None,
               instruction: str | None = None) -> tuple[list[int], int]:
    """(token ids of the whole example, index of its first target token), as mlx-lm's datasets
    with `mask_prompt` encode it. A completions prompt becomes `prompt_messages(prompt,
    system_prompt, instruction)`, the RL prompt's turns."""
    if fmt == "text":
        ids = list(tokenizer.encode(row["text"]))
        if ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)
        return ids, 0
    if fmt == "completions":
        messages = prompt_messages(row["prompt"], system_prompt, instruction) + [
            {"role": "assistant", "content": row["completion"]}]
    else:
        messages = row["messages"]
    tools = row.get("tools")
    ids = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)
    prompt = tokenizer.apply_chat_template(messages[:-1], tools=tools, add_generation_prompt=True,
                                           tokenize=True)
    return list(ids), len(prompt)


def encode_rows(tokenizer, data: SftFile, system_prompt: str | None = None,
                instruction: str | None = None) -> list[tuple[list[int], int]]:
    return [encode_row(tokenizer, data.format, r, system_prompt, instruction) for r in data.rows]


def pad_batch(encoded: list[tuple[list[int], int]], max_len: int):
    """(tokens (B, T) int32, target mask (B, T-1) float32: 1 where tokens[:, 1:] is a target)."""
    T = min(max(len(ids) for ids, _ in encoded), max_len)
    tokens = np.zeros((len(encoded), T), np.int32)
    mask = np.zeros((len(encoded), T - 1), np.float32)
    for i, (ids, offset) in enumerate(encoded):
        ids = ids[:T]
        tokens[i, :len(ids)] = ids
        mask[i, max(offset - 1, 0):len(ids) - 1] = 1.0
    return mx.array(tokens), mx.array(mask)


def nll_sum(model, tokens, mask):
    """(summed cross-entropy of the target tokens, their count). tokens (B, T); mask (B, T-1)."""
    logits = model(tokens[:, :-1])  # (B, T-1, V)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), tokens[:, 1:])  # (B, T-1)
    return (ce * mask).sum(), mask.sum()


def sft_loss(model, tokens, mask):
    """Mean cross-entropy of the target tokens. tokens (B, T); mask (B, T-1)."""
    total, count = nll_sum(model, tokens, mask)
    return total / mx.maximum(count, 1.0)


def validation_loss(model, encoded, batch_size: int, max_len: int, num_batches: int = -1) -> float:
    """Mean target-token cross-entropy over the first `num_batches` batches (-1: all) of
    `encoded`, in order, as mlx-lm's `evaluate` (token-weighted over batches)."""
    total, count = mx.array(0.0), mx.array(0.0)
    stop = len(encoded) if num_batches == -1 else min(len(encoded), num_batches * batch_size)
    for i in range(0, stop, batch_size):
        s, n = nll_sum(model, *pad_batch(encoded[i:i + batch_size], max_len))
        total, count = total + s, count + n
        mx.eval(total, count)
    return (total / mx.maximum(count, 1.0)).item()


def _as_data(data: "SftData | list[dict]") -> SftData:
    return data if isinstance(data, SftData) else SftData(check_rows(data, "SFT rows"))


def _check_prompt_shaping(data: SftData, system_prompt, instruction) -> None:
    if system_prompt is None and instruction is None:
        return
    for f in (data.train, data.valid):
        if f is not None and f.format != "completions":
            raise SftDataError(f"{f.path or 'the SFT rows'}: --system / --instruction shape the "
                               f"prompt of completions rows; these are {f.format} rows (write "
                               "the system turn and instruction into the data instead)")


def sft_config(model: str, data: SftData, iters: int, batch_size: int, learning_rate: float,
               lora: dict | None, num_layers: int, max_seq_length: int, seed: int,
               system_prompt: str | None, instruction: str | None) -> dict:
    """What `sft` trained, as config.yaml: `model` is what export's `resolve_base` reads."""
    local = Path(model).expanduser()
    return {
        "algorithm": "sft",
        "model": str(local.resolve()) if local.exists() else str(model),
        "data": {"source": data.source, "train_format": data.train.format,
                 "train_rows": len(data.train.rows),
                 "valid_format": data.valid.format if data.valid else None,
                 "valid_rows": len(data.valid.rows) if data.valid else 0,
                 "system_prompt": system_prompt, "instruction": instruction},
        "iters": iters, "batch_size": batch_size, "learning_rate": learning_rate,
        "max_seq_length": max_seq_length, "seed": seed,
        "lora": None if lora is None else {
            "rank": lora["rank"], "scale": lora["scale"], "dropout": lora.get("dropout", 0.0),
            "num_layers": num_layers, "keys": lora.get("keys")},
    }


def sft(model: str | Path, data: "SftData | list[dict]", out_dir: str | Path, iters: int = 200,
        batch_size: int = 16, learning_rate: float = 1e-4, lora: dict | None = None,
        lora_layers: int = -1, max_seq_length: int = 2048, seed: int = 0,
        show_progress: bool = True, steps_per_eval: int = 200, val_batches: int = 25,
        system_prompt: str | None = None, instruction: str | None = None,
        report: Callable[[dict], None] | None = None) -> Path:
    """Fine-tune `model` on `data` (read_sft_data's, or chat rows); returns the adapter folder
    (LoRA) or model folder (full), and writes `out_dir/config.yaml`.

    AdamW with 10% linear warmup then cosine decay; batches drawn without replacement, reshuffled
    every epoch from `seed`. With a validation file, its loss over `val_batches` batches (-1:
    all) goes to `report({"iter": n, "val_loss": x})` before training, every `steps_per_eval`
    iterations (0: never) and at the end; `report` defaults to a console line."""
    out_dir, data = Path(out_dir), _as_data(data)
    _check_prompt_shaping(data, system_prompt, instruction)
    net, source = load_model(model)
    tokenizer = tokenizer_for(source)
    mx.random.seed(seed)  # LoRA initialisation
    if lora is not None:
        try:
            apply_lora(net, lora_layers, lora)
        except ValueError as e:  # num_layers out of range, unknown keys
            raise SftDataError(str(e)) from None
    if len(data.train.rows) < batch_size:
        raise SftDataError(f"{len(data.train.rows)} rows is fewer than batch_size={batch_size}")
    encoded = encode_rows(tokenizer, data.train, system_prompt, instruction)
    valid = None if data.valid is None else encode_rows(tokenizer, data.valid, system_prompt,
                                                        instruction)
    report = report or (lambda r: tqdm.write(f"iter {r['iter']}: val loss {r['val_loss']:.3f}"))

    def evaluate(it: int):
        net.eval()
        report({"iter": it, "val_loss": validation_loss(net, valid, batch_size, max_seq_length,
                                                        val_batches)})
        net.train()

    warmup = max(1, iters // 10)
    optimizer = make_adamw(net, optim.join_schedules(
        [optim.linear_schedule(0.0, learning_rate, warmup),
         optim.cosine_decay(learning_rate, max(iters - warmup, 1))], [warmup]),
        weight_decay=0.01)  # mlx's AdamW default
    rng = np.random.default_rng(seed)
    order = []
    loss_and_grad = nn.value_and_grad(net, sft_loss)
    net.train()
    if valid:
        evaluate(0)
    tty = sys.stderr.isatty()  # piped: a plain line every 100 iterations instead of the bar
    bar = tqdm(range(iters), disable=not (show_progress and tty), unit="it", desc="sft")
    for it in bar:
        if len(order) < batch_size:
            order.extend(rng.permutation(len(encoded)).tolist())
        batch, order = order[:batch_size], order[batch_size:]
        loss, grads = loss_and_grad(net, *pad_batch([encoded[i] for i in batch], max_seq_length))
        optimizer.update(net, grads)
        mx.eval(loss, net.trainable_parameters(), optimizer.state)
        if it % 10 == 0 or it == iters - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if show_progress and not tty and ((it + 1) % 100 == 0 or it == iters - 1):
            print(f"sft {it + 1}/{iters} loss {loss.item():.3f}", file=sys.stderr, flush=True)
        if valid and (it == iters - 1 or (steps_per_eval and (it + 1) % steps_per_eval == 0)):
            evaluate(it + 1)
    net.eval()
    n_layers = len(net.layers) if lora_layers == -1 else lora_layers
    path = (save_model_folder(net, source, out_dir) if lora is None
            else save_adapters(net, out_dir / "adapters", lora_layers, lora))
    config = sft_config(model, data, iters, batch_size, learning_rate, lora, n_layers,
                        max_seq_length, seed, system_prompt, instruction)
    write_text(out_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    return path
