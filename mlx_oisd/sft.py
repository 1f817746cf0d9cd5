"""Supervised warm-up (`oisd-mlx sft`) on chat jsonl, loss on the last (assistant) turn only.

Data is mlx-lm's chat format, one `{"messages": [{"role": ..., "content": ...}, ...]}` per line,
the last message being the assistant's answer; the tokens before it are masked out of the loss.
With LoRA the result is an mlx-lm adapter folder; with full fine-tuning (`lora=None`) it is a
complete model folder (weights, config, tokenizer) that `mlx_oisd.load` reads like any other.

The loop is eager on purpose: on a CPU without a tuned BLAS, `mx.compile` of the step (as
mlx-lm's tuner does) measured slower for the tiny demo model, and shapes vary per batch.
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from .io import atomic_write, read_jsonl, write_json
from .loading import load_model, tokenizer_for
from .lora import apply_lora, save_adapters
from .precision import make_adamw

MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "tiny_spec.json")


class SftDataError(ValueError):
    """A chat jsonl row that cannot be trained on; the message names the file and line."""


def read_chat_jsonl(path: str | Path) -> list[dict]:
    """Rows of an mlx-lm chat jsonl file, checked: messages with roles, the last one assistant."""
    path = Path(path)
    if not path.is_file():
        raise SftDataError(f"chat data {str(path)!r} does not exist (expected a .jsonl file)")
    rows = []
    for where, row in read_jsonl(path, SftDataError):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise SftDataError(f"{where}: expected {{\"messages\": [{{\"role\": ..., \"content\": "
                               "...}, ...]}} with string roles and contents")
        if messages[-1]["role"] != "assistant":
            raise SftDataError(f"{where}: the last message must be the assistant's (the target)")
        rows.append(row)
    if not rows:
        raise SftDataError(f"{path}: no rows")
    return rows


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


def encode_rows(tokenizer, rows: list[dict]) -> list[tuple[list[int], int]]:
    """(token ids of the whole chat, index of the first target token) per row."""
    out = []
    for row in rows:
        messages = row["messages"]
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
        out.append((list(ids), len(prompt)))
    return out


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


def sft_loss(model, tokens, mask):
    """Mean cross-entropy of the target tokens. tokens (B, T); mask (B, T-1)."""
    logits = model(tokens[:, :-1])  # (B, T-1, V)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), tokens[:, 1:])  # (B, T-1)
    return (ce * mask).sum() / mx.maximum(mask.sum(), 1.0)


def sft(model: str | Path, rows: list[dict], out_dir: str | Path, iters: int = 200,
        batch_size: int = 16, learning_rate: float = 1e-4, lora: dict | None = None,
        lora_layers: int = -1, max_seq_length: int = 2048, seed: int = 0,
        show_progress: bool = True) -> Path:
    """Fine-tune `model` on chat `rows`; returns the adapter folder (LoRA) or model folder (full).

    AdamW with 10% linear warmup then cosine decay; batches drawn without replacement, reshuffled
    every epoch from `seed`."""
    out_dir = Path(out_dir)
    net, source = load_model(model)
    tokenizer = tokenizer_for(source)
    if lora is not None:
        apply_lora(net, lora_layers, lora)
    if len(rows) < batch_size:
        raise SftDataError(f"{len(rows)} rows is fewer than batch_size={batch_size}")
    encoded = encode_rows(tokenizer, rows)
    warmup = max(1, iters // 10)
    optimizer = make_adamw(net, optim.join_schedules(
        [optim.linear_schedule(0.0, learning_rate, warmup),
         optim.cosine_decay(learning_rate, max(iters - warmup, 1))], [warmup]),
        weight_decay=0.01)  # mlx's AdamW default
    mx.random.seed(seed)  # LoRA initialisation
    rng = np.random.default_rng(seed)
    order = []
    loss_and_grad = nn.value_and_grad(net, sft_loss)
    net.train()
    bar = tqdm(range(iters), disable=not show_progress, unit="it", desc="sft")
    for it in bar:
        if len(order) < batch_size:
            order.extend(rng.permutation(len(encoded)).tolist())
        batch, order = order[:batch_size], order[batch_size:]
        loss, grads = loss_and_grad(net, *pad_batch([encoded[i] for i in batch], max_seq_length))
        optimizer.update(net, grads)
        mx.eval(loss, net.trainable_parameters(), optimizer.state)
        if it % 10 == 0 or it == iters - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()
    if lora is not None:
        return save_adapters(net, out_dir / "adapters", lora_layers, lora)
    return save_model_folder(net, source, out_dir)
