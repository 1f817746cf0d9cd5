"""`init_adapter`: an RL run that starts from existing mlx-lm adapters (an sft's or a run's).

`read_init_adapter` checks the folder at startup (ConfigError naming the key);
`init_from_adapter` loads the adapters into the run's LoRA layers (their settings must be the
adapter's) or, under full fine-tuning, fuses them into the weights. The KL reference stays the
base (LoRA: adapters off; full fine-tuning: the frozen copy is taken before the fuse).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from .checkpoint import weight_mismatch
from .config import ConfigError
from .loading import ModelLoadError, check_adapter_folder


@dataclass
class InitAdapter:
    """A checked mlx-lm adapter folder an RL run starts from (config key `init_adapter`)."""

    path: Path
    fine_tune_type: str  # lora or full
    num_layers: int
    lora_parameters: dict
    weights: dict[str, mx.array]


def read_init_adapter(path: str | Path) -> InitAdapter:
    """Check `init_adapter`'s folder (files, config, tensors); ConfigError naming the key."""
    path = Path(path).expanduser()
    try:
        check_adapter_folder(path)
    except ModelLoadError as e:
        peft = " (it looks like a PEFT export: pass the mlx-lm folder it came from, the run's or " \
               "sft's adapters/)" if (path / "adapter_model.safetensors").is_file() else ""
        raise ConfigError(f"init_adapter: {e}{peft}") from None
    config = json.loads((path / "adapter_config.json").read_text())
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "full"):
        raise ConfigError(f"init_adapter: {path} is a {kind} adapter; expected fine_tune_type "
                          "lora (or full)")
    weights = mx.load(str(path / "adapters.safetensors"))
    return InitAdapter(path, kind, config.get("num_layers", -1),
                       config.get("lora_parameters") or {}, weights)


def lora_mismatches(init: InitAdapter, lora, num_blocks: int) -> list[tuple[str, object, object]]:
    """The run's `lora` settings (LoraConfig) that differ from the adapter's, as (dotted key,
    run's value, adapter's value); dropout may differ (it only acts in training)."""
    p = init.lora_parameters
    run_layers = num_blocks if lora.num_layers == -1 else lora.num_layers
    pairs = [("lora.rank", lora.rank, p.get("rank")), ("lora.scale", lora.scale, p.get("scale")),
             ("lora.num_layers", run_layers, init.num_layers)]
    return [(k, ours, theirs) for k, ours, theirs in pairs
            if theirs is None or float(ours) != float(theirs)]


def _load_matching(model: nn.Module, init: InitAdapter) -> None:
    """Load `init.weights` into `model`'s trainable parameters, which they must match name for
    name and shape for shape."""
    detail = weight_mismatch(model, init.weights, ("not in the adapter", "not in the run's model",
                                                   "shape (adapter vs run)"))
    if detail:
        keys = init.lora_parameters.get("keys")
        hint = f"; set lora.keys: {keys} (the adapter's)" if keys else \
            "; are lora.keys and lora.num_layers the adapter's?"
        raise ConfigError(f"init_adapter: {init.path / 'adapters.safetensors'} does not match "
                          f"the run's trainable parameters ({detail}){hint}")
    model.load_weights(list(init.weights.items()), strict=False)


def init_from_adapter(model: nn.Module, init: InitAdapter, lora, num_blocks: int) -> str:
    """Start the run's `model` from `init`; returns a console note.

    lora (LoraConfig) set: `model` already has its LoRA layers, whose settings must be the
    adapter's; the adapter's A and B are loaded into them. lora None (full fine-tuning): a LoRA
    adapter is fused into the weights (mlx-lm's `fuse`), a full one loaded as is; every
    parameter stays trainable. Raises ConfigError naming `init_adapter` on any mismatch."""
    if lora is not None:
        if init.fine_tune_type == "full":
            raise ConfigError(f"init_adapter: {init.path} holds full fine-tuned weights; start "
                              "from it with lora: null, or export it fused (oisd-mlx export "
                              "--format fused) and set model: to that folder")
        if wrong := lora_mismatches(init, lora, num_blocks):
            listed = "; ".join(f"{k} is {a}, the adapter's is {b}" for k, a, b in wrong)
            fix = ", ".join(f"{k}: {b}" for k, _, b in wrong)
            raise ConfigError(f"init_adapter: the run's LoRA differs from {init.path}'s "
                              f"({listed}); set {fix} to continue these adapters")
        _load_matching(model, init)
        mx.eval(model.parameters())
        return f"init_adapter: LoRA starts from {init.path}"
    if init.fine_tune_type == "lora":
        linear_to_lora_layers(model, init.num_layers, init.lora_parameters)
        model.freeze()
        model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
        _load_matching(model, init)
        fused = [(n, m.fuse()) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
        model.update_modules(tree_unflatten(fused))
        model.unfreeze()
        mx.eval(model.parameters())
        return f"init_adapter: {init.path} fused into the weights (full fine-tuning)"
    _load_matching(model, init)
    mx.eval(model.parameters())
    return f"init_adapter: weights loaded from {init.path} (full fine-tuning)"
