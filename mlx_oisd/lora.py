"""LoRA through mlx-lm: attach adapters, switch them off for the reference, save them.

The adapter folder we write is mlx-lm's own (`adapter_config.json` + `adapters.safetensors`), so
`mlx_lm.generate --adapter-path`, `mlx_lm.fuse` and `mlx_oisd.load(..., adapter_path=)` read it.
"""

from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from .io import atomic_write, write_json


def lora_parameters(rank: int, scale: float, dropout: float, keys: list[str] | None) -> dict:
    params = {"rank": rank, "scale": scale, "dropout": dropout}
    if keys is not None:
        params["keys"] = list(keys)
    return params


def apply_lora(model: nn.Module, num_layers: int, params: dict) -> None:
    """Freeze the base and add trainable LoRA to the last `num_layers` blocks (-1: all).

    `params` is mlx-lm's `lora_parameters` dict (rank, scale, dropout, optional keys such as
    "self_attn.q_proj"); an unknown key is an error here, not a silent no-op."""
    model.freeze()
    n = len(model.layers) if num_layers == -1 else num_layers
    if not 1 <= n <= len(model.layers):
        raise ValueError(f"lora.num_layers: expected -1 or 1..{len(model.layers)}, got {num_layers}")
    if keys := params.get("keys"):
        known = {k for k, _ in model.layers[0].named_modules() if k}
        unknown = sorted(set(keys) - known)
        if unknown:
            linears = sorted(k for k, m in model.layers[0].named_modules()
                             if isinstance(m, (nn.Linear, nn.QuantizedLinear)))
            raise ValueError(f"lora.keys: no module {unknown} in a block; expected some of {linears}")
    linear_to_lora_layers(model, n, params)


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextmanager
def adapters_disabled(model: nn.Module):
    """The reference policy: the same weights with every LoRA scale set to 0 (no second copy)."""
    layers = lora_layers(model)
    scales = [m.scale for m in layers]
    try:
        for m in layers:
            m.scale = 0.0
        yield model
    finally:
        for m, s in zip(layers, scales):
            m.scale = s


def save_adapters(model: nn.Module, folder: str | Path, num_layers: int, params: dict | None) -> Path:
    """Write the trainable parameters as an mlx-lm adapter folder (params None: full fine-tune)."""
    folder = Path(folder)
    weights = dict(tree_flatten(model.trainable_parameters()))
    atomic_write(folder / "adapters.safetensors", lambda p: mx.save_safetensors(str(p), weights))
    config = {"fine_tune_type": "full" if params is None else "lora",
              "num_layers": len(model.layers) if num_layers == -1 else num_layers,
              "lora_parameters": params or {}}
    write_json(folder / "adapter_config.json", config)
    return folder
