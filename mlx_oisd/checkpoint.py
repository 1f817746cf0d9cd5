"""Checkpoints: everything a killed run needs to continue as if it had not stopped.

    output_dir/checkpoints/step_000050/  adapters.safetensors, adapter_config.json,
                                         optimizer.safetensors, state.json, config.yaml
    output_dir/checkpoints/latest         name of the newest complete checkpoint
    output_dir/adapters/                  the newest adapters, an mlx-lm adapter folder

A checkpoint is written into a hidden temporary folder and renamed into place, then `latest` is
replaced atomically, so a kill at any moment leaves the previous checkpoint intact. The rollout
RNG is re-seeded from (seed, step) every step, so step + sampler position is the whole state.
"""

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .io import write_json, write_text
from .lora import save_adapters

KEEP = 2  # checkpoints kept besides the newest


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer, state: dict,
                    config_yaml: str, num_layers: int, lora_params: dict | None) -> Path:
    root = Path(out_dir) / "checkpoints"
    name = f"step_{step:06d}"
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapters(model, tmp, num_layers, lora_params)
    opt = dict(tree_flatten(optimizer.state))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt)
    write_json(tmp / "state.json", {"step": step, **state})
    write_text(tmp / "config.yaml", config_yaml)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_text(root / "latest", name + "\n")
    save_adapters(model, Path(out_dir) / "adapters", num_layers, lora_params)
    for old in sorted(p for p in root.glob("step_*") if p.name != name)[:-KEEP or None]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = Path(out_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: Path, model: nn.Module, optimizer) -> dict:
    """Restore trainable weights and optimizer state from `path`; return its state.json."""
    weights = mx.load(str(path / "adapters.safetensors"))
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    mx.eval(model.parameters(), optimizer.state)
    return json.loads((path / "state.json").read_text())
