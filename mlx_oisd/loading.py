"""`load(path_or_repo, adapter_path=None) -> (model, tokenizer)` through mlx-lm's loader.

mlx-lm reads the weights, applies quantization and LoRA adapters and wraps the tokenizer; we only
swap in our Qwen3 class (same parameter names, plus `forward_internals`) and turn the failures a
user can cause (a missing folder, an unknown Hub id, another architecture, truncated weight files,
a tokenizer without files or chat template, a broken adapter folder) into errors that say what was
wrong, before anything trains.
"""

import json
from pathlib import Path

from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS, load_adapters, load_config, load_tokenizer
from mlx_lm.utils import load_model as mlx_lm_load_model

from . import hub
from .models import qwen3

SUPPORTED_MODEL_TYPES = {"qwen3": qwen3}
BUILTIN_PREFIX = "builtin:"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class ModelLoadError(ValueError):
    """A model, Hub id or adapter folder that cannot be loaded; the message says why."""


def get_model_classes(config: dict):
    """mlx-lm's `get_model_classes` hook: our Qwen3, or a clear error for anything else."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model_type {model_type!r} is not supported: mlx-oisd supports "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))} (dense Qwen3 checkpoints such as "
            "Qwen/Qwen3-0.6B, in Hugging Face or mlx-lm format)"
        )
    module = SUPPORTED_MODEL_TYPES[model_type]
    return module.Model, module.ModelArgs


def resolve_model_path(path_or_repo: str | Path) -> Path:
    """A local model folder, a `builtin:` model (built and cached on first use) or a Hub id
    (downloaded into the Hugging Face cache). Raises ModelLoadError naming what is missing."""
    spec = str(path_or_repo)
    if spec.startswith(BUILTIN_PREFIX):
        from .tiny import BUILTIN_MODELS, builtin_model_path

        name = spec[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            raise ModelLoadError(f"unknown built-in model {spec!r}; expected one of "
                                 + ", ".join(f"{BUILTIN_PREFIX}{n}" for n in sorted(BUILTIN_MODELS)))
        return builtin_model_path(name)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path}: no config.json; expected a Hugging Face or mlx-lm model folder "
                "(config.json, model*.safetensors, tokenizer files)"
            )
        return path
    if not hub.REPO_ID.match(spec) or spec.startswith((".", "/", "~")):
        raise ModelLoadError(
            f"model folder {spec!r} does not exist (and it is not a Hugging Face Hub id "
            "of the form 'owner/name')"
        )
    return _download(spec)


def _download(repo_id: str) -> Path:
    """The model's folder in the Hub cache, downloaded when missing. snapshot_download asks the
    Hub once (`repo_info` does not retry) and falls back to the cache when it cannot."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except hub.network_errors() as e:
        raise ModelLoadError(f"{hub.describe(e, repo_id, 'model')}, or pass a local model folder"
                             ) from e


def check_safetensors(path: Path) -> None:
    """Raise ModelLoadError naming `path` when it is not a whole safetensors file (a copy or a
    download cut short): its header must parse and its tensors must end within the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
        except (ValueError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: not a safetensors file, or truncated ({size} bytes); "
                             "copy or download it again")
    end = max((v["data_offsets"][1] for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise ModelLoadError(f"{path}: truncated, {size} bytes where its header describes "
                             f"{8 + n + end}; copy or download it again")


def check_adapter_folder(adapter_path: str | Path) -> Path:
    path = Path(adapter_path).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"adapter folder {str(path)!r} does not exist")
    missing = [f for f in ("adapter_config.json", "adapters.safetensors") if not (path / f).is_file()]
    if missing:
        raise ModelLoadError(
            f"{path}: missing {', '.join(missing)}; expected an mlx-lm adapter folder "
            "(adapter_config.json + adapters.safetensors) as written by `oisd-mlx train`"
        )
    config_path = path / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{config_path}: not valid JSON ({e})") from None
    kind = config.get("fine_tune_type", "lora") if isinstance(config, dict) else None
    if kind not in ("lora", "dora", "full"):
        raise ModelLoadError(f"{config_path}: expected a JSON object with fine_tune_type lora, "
                             f"dora or full, got {str(config)[:80]}")
    params = config.get("lora_parameters")
    if kind != "full" and (not isinstance(config.get("num_layers"), int) or not isinstance(
            params, dict) or not {"rank", "scale", "dropout"} <= set(params)):
        raise ModelLoadError(f"{config_path}: missing keys; a {kind} adapter needs num_layers "
                             "(an integer) and lora_parameters with rank, scale and dropout")
    check_safetensors(path / "adapters.safetensors")
    return path


def load_model(path_or_repo: str | Path, adapter_path: str | Path | None = None, lazy=False):
    """The model alone (see `load`), and the folder it came from."""
    model_path = resolve_model_path(path_or_repo)
    try:
        config = json.loads((model_path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{model_path / 'config.json'}: not valid JSON ({e})") from e
    get_model_classes(config)  # fail on the architecture before reading any weight
    if not list(model_path.glob("model*.safetensors")):
        raise ModelLoadError(f"{model_path}: no model*.safetensors weight files")
    for weights in sorted(model_path.glob("model*.safetensors")):
        check_safetensors(weights)
    model, config = mlx_lm_load_model(model_path, lazy=lazy, get_model_classes=get_model_classes)
    if adapter_path is not None:
        model = load_adapters(model, str(check_adapter_folder(adapter_path)))
        model.eval()
    return model, model_path


def load(path_or_repo: str | Path, adapter_path: str | Path | None = None, lazy: bool = False):
    """Load a Qwen3 model and its tokenizer.

    path_or_repo: a local Hugging Face / mlx-lm (converted or quantized) folder, a Hub id such as
    "Qwen/Qwen3-0.6B", or a built-in spec "builtin:tiny". adapter_path: an mlx-lm LoRA adapter
    folder applied on top. Returns (model, tokenizer), the tokenizer being mlx-lm's wrapper.
    """
    model, model_path = load_model(path_or_repo, adapter_path, lazy)
    return model, tokenizer_for(model_path)


def tokenizer_for(model_path: Path):
    """mlx-lm's tokenizer wrapper for a model folder, with generation_config.json's EOS ids.

    Raises ModelLoadError naming the folder when it has no tokenizer files or no chat template
    (every prompt is rendered with it)."""
    if not any((model_path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{model_path}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}, "
            "with tokenizer_config.json); copy them from the model's original repository"
        )
    eos = load_config(model_path).get("eos_token_id")
    tokenizer = load_tokenizer(model_path, eos_token_ids=eos)
    if not tokenizer.has_chat_template:
        raise ModelLoadError(
            f"{model_path}: the tokenizer has no chat template (no 'chat_template' in "
            "tokenizer_config.json, no chat_template.jinja); prompts are rendered with it, so "
            "use a chat model's tokenizer files (Qwen3's carry one)"
        )
    return tokenizer
