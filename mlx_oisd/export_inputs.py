"""What an export reads, checked before anything is written: the mlx-lm adapter folder, the run
it belongs to (config.yaml, checkpoint step, max_steps), the base model (Hub id or local folder)
and whether the adapters fit it (the base's config.json: every adapted layer's widths and the
blocks mlx-lm's `num_layers` adapts), and the eval result files for the model card.
"""

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import yaml

from .hub import REPO_ID

FINE_TUNE_TYPES = ("lora", "dora", "full")
ADAPTER_FILES = ("adapter_config.json", "adapters.safetensors")
_LORA_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.lora_([ab])$")
_FULL_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
HUB_ID = REPO_ID  # a Hub repo id, owner/name
_HF_CACHE = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+$")  # hub cache snapshot
_STEP_DIR = re.compile(r"^step[_-]?(\d+)$")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class ExportError(ValueError):
    """An adapter folder, base model or destination that cannot be exported; says why."""


@dataclass
class Adapter:
    """A validated mlx-lm adapter folder. `modules[i]` = the module paths adapted in block i."""

    path: Path
    fine_tune_type: str
    num_layers: int
    lora_parameters: dict
    weights: dict[str, mx.array]
    modules: dict[int, list[str]]


def read_adapter(folder: str | Path) -> Adapter:
    """Read and check an mlx-lm adapter folder; every problem found is listed in one error."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ExportError(f"adapter folder {str(path)!r} does not exist")
    missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
    if missing:
        raise ExportError(f"{path}: missing {', '.join(missing)}; expected an mlx-lm adapter folder "
                          "(adapter_config.json + adapters.safetensors) as written by `oisd-mlx train`")
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path / 'adapter_config.json'}: not valid JSON ({e})") from e
    fine_tune_type = config.get("fine_tune_type", "lora")  # mlx-lm's default
    params = config.get("lora_parameters") or {}
    problems = []
    if fine_tune_type not in FINE_TUNE_TYPES:
        problems.append(f"fine_tune_type: expected one of {', '.join(FINE_TUNE_TYPES)}, "
                        f"got {fine_tune_type!r}")
    if not isinstance(config.get("num_layers"), int):
        problems.append(f"num_layers: expected an integer, got {config.get('num_layers')!r}")
    if fine_tune_type in ("lora", "dora"):
        for key in ("rank", "scale"):
            if not isinstance(params.get(key), (int, float)) or isinstance(params.get(key), bool):
                problems.append(f"lora_parameters.{key}: expected a number, got {params.get(key)!r}")
    if problems:
        raise ExportError(f"{path / 'adapter_config.json'}: " + "; ".join(problems))
    weights = mx.load(str(path / "adapters.safetensors"))
    if not weights:
        raise ExportError(f"{path / 'adapters.safetensors'}: no tensors")
    modules = {} if fine_tune_type == "full" else _lora_modules(path, weights, params["rank"])
    return Adapter(path, fine_tune_type, config["num_layers"], params, weights, modules)


def _lora_modules(path: Path, weights: dict, rank: int) -> dict[int, list[str]]:
    """Block index -> adapted module paths; checks names, pairs and (in, r) / (r, out) shapes."""
    pairs, errors = {}, []
    for name, w in sorted(weights.items()):
        m = _LORA_KEY.match(name)
        if m is None:
            if not name.endswith(".m"):  # DoRA's magnitude vector rides along
                errors.append(f"  {name}: not a LoRA tensor (model.layers.N.<module>.lora_a|lora_b)")
            continue
        pairs.setdefault((int(m[1]), m[2]), {})[m[3]] = w
    for (i, module), ab in sorted(pairs.items()):
        name = f"model.layers.{i}.{module}"
        if set(ab) != {"a", "b"}:
            errors.append(f"  {name}: lora_{'b' if 'a' in ab else 'a'} is missing")
        elif ab["a"].ndim != 2 or ab["b"].ndim != 2 or ab["a"].shape[1] != rank \
                or ab["b"].shape[0] != rank:
            errors.append(f"  {name}: lora_a {tuple(ab['a'].shape)} and lora_b "
                          f"{tuple(ab['b'].shape)}, expected (in, {rank}) and ({rank}, out)")
    if errors:
        raise ExportError(f"{path / 'adapters.safetensors'} has unexpected tensors:\n"
                          + "\n".join(errors))
    modules = {}
    for i, module in sorted(pairs):
        modules.setdefault(i, []).append(module)
    return modules


# ---- where the adapters come from: the run, its config, the checkpoint step ----

@dataclass
class Source:
    """The run an adapter folder belongs to. `config`: the config.yaml that trained these
    weights (the checkpoint's own, else the run's); `step`: the checkpoint step (None: unknown);
    `max_steps`: the run's."""

    run_dir: Path
    config: dict | None
    config_path: Path | None
    step: int | None
    max_steps: int | None


def run_folder(adapter_dir: Path) -> Path | None:
    """The folder holding the config.yaml of these weights: the adapter folder itself (a
    checkpoint) or the folder above it (a run's `adapters/`); None when there is none."""
    for folder in (adapter_dir, adapter_dir.parent):
        if (folder / "config.yaml").is_file():
            return folder
    return None


def run_root(adapter_dir: Path) -> Path:
    """runs/X for runs/X/adapters, runs/X/checkpoints/step_N and runs/X/checkpoints/step_N/adapters;
    the adapter folder itself (or the folder above an `adapters/`) otherwise."""
    where = adapter_dir.resolve()
    for folder in (where, where.parent):
        if folder.parent.name == "checkpoints":
            return folder.parent.parent
    return where.parent if where.name == "adapters" else where


def read_yaml_config(path: Path) -> dict:
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ExportError(f"{path}: invalid YAML ({e})") from e
    if not isinstance(cfg, dict):
        raise ExportError(f"{path}: expected a mapping of config keys")
    return cfg


def checkpoint_step(adapter_dir: Path) -> int | None:
    """The training step of these adapters: a checkpoint's state.json or `step_N` folder name,
    or, for a run's `adapters/`, the checkpoint whose manifest holds the same adapters file."""
    from .checkpoint import MANIFEST, sha256, step_folders

    for folder in (adapter_dir, adapter_dir.parent):
        if (step := _folder_step(folder)) is not None:
            return step
    run = adapter_dir.parent
    if adapter_dir.name != "adapters" or not (run / "checkpoints").is_dir():
        return None
    digest = sha256(adapter_dir / "adapters.safetensors")
    for folder in step_folders(run):
        try:
            files = json.loads((folder / MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if (files.get("adapters.safetensors") or {}).get("sha256") == digest:
            return _folder_step(folder)
    return None


def _folder_step(folder: Path) -> int | None:
    try:
        step = json.loads((folder / "state.json").read_text()).get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            return step
    except (OSError, ValueError, AttributeError):
        pass
    m = _STEP_DIR.match(folder.name)
    return int(m[1]) if m else None


def read_source(adapter_dir: Path) -> Source:
    root = run_root(adapter_dir)
    folder = run_folder(adapter_dir)
    if folder is None and (root / "config.yaml").is_file():  # a checkpoint without its config
        folder = root
    config = None if folder is None else read_yaml_config(folder / "config.yaml")
    run_config = config
    if folder is not None and folder.resolve() != root and (root / "config.yaml").is_file():
        run_config = read_yaml_config(root / "config.yaml")  # max_steps of the run, not of a step
    max_steps = (run_config or {}).get("max_steps")
    return Source(root, config, None if folder is None else folder / "config.yaml",
                  checkpoint_step(adapter_dir), max_steps if isinstance(max_steps, int) else None)


def resolve_base(adapter_dir: Path, base: str | None, source: Source) -> str:
    """`--base`, else the `model` key of the run's config.yaml."""
    if base:
        return str(base)
    if source.config is None:
        raise ExportError(f"no base model for {adapter_dir}: pass --base MODEL (a Hub id or a local "
                          "folder), or keep the run's config.yaml next to the adapters folder")
    if not isinstance(source.config.get("model"), str):
        raise ExportError(f"{source.config_path}: no 'model' key; pass --base MODEL")
    return source.config["model"]


# ---- the base model ----

@dataclass
class Base:
    """The base model: `name` as given (Hub id, folder, builtin:NAME), `hub_id` when it is on the
    Hub (a Hub cache snapshot folder counts), `folder` when it is local (resolved)."""

    name: str
    hub_id: str | None
    folder: Path | None

    @property
    def name_or_path(self) -> str:
        """What `from_pretrained` loads: the Hub id, else the resolved local folder."""
        return self.hub_id or str(self.folder)


def resolve_base_model(name: str) -> Base:
    from .loading import BUILTIN_PREFIX, ModelLoadError, resolve_model_path

    path = Path(name).expanduser()
    if name.startswith(BUILTIN_PREFIX) or path.exists():
        try:
            folder = resolve_model_path(name).resolve()
        except ModelLoadError as e:
            raise ExportError(f"base {name!r}: {e}") from None
        m = _HF_CACHE.search(folder.as_posix())
        return Base(name, f"{m[1]}/{m[2]}" if m else None, folder)
    if not HUB_ID.match(name):
        raise ExportError(f"base model {name!r} is neither a local folder, builtin:NAME nor a "
                          "Hugging Face Hub id of the form 'owner/name'")
    return Base(name, name, None)


def base_config(base: Base) -> dict | None:
    """The base's config.json, without any weights; None when a Hub base's config.json is
    neither cached nor reachable."""
    from .config import ConfigError
    from .memory import read_model_config

    try:
        return read_model_config(str(base.folder) if base.folder else base.name)
    except ConfigError as e:
        if base.folder is not None:
            raise ExportError(f"base {base.name!r}: {e}") from None
        return None


def check_fits_base(adapter: Adapter, config: dict, base: str, given: str) -> None:
    """Raise one ExportError when the adapters do not fit the base of `config` (its config.json):
    every adapted layer's (in, out) widths and the blocks adapted. `given` says where the base
    came from ("--base" or "the run's model")."""
    from .config import ConfigError
    from .memory import ModelShape

    try:
        shape = ModelShape.from_config(config, f"{base} config.json")
    except ConfigError as e:
        raise ExportError(str(e)) from None
    dims, L = shape.linear_dims(), shape.layers
    if adapter.fine_tune_type == "full":
        problems, hidden = _full_problems(adapter.weights, dims, L, base)
    else:
        problems, hidden = _lora_problems(adapter, dims, base)
        blocks = sorted(adapter.modules)
        n = adapter.num_layers
        expected = list(range(max(L - n, 0), L)) if n > 0 else list(range(L))
        if blocks != expected:
            problems.insert(0, f"  the adapters adapt blocks {blocks[0]}..{blocks[-1]} "
                            f"(num_layers {n} of a {blocks[-1] + 1}-block model); {base} has "
                            f"{L} blocks")
    if not problems:
        return
    head = (f"adapters were trained on a model with hidden size {hidden}; {given} {base} has "
            f"{shape.hidden}" if hidden not in (None, shape.hidden) else
            f"the adapters do not fit {given} {base}")
    shown = problems[:8] + ([f"  ... ({len(problems) - 8} more)"] if len(problems) > 8 else [])
    raise ExportError(f"{adapter.path}: {head}:\n" + "\n".join(shown) + "\nnothing was written; "
                      "export with the base the adapters were trained on (--base MODEL)")


_READS_HIDDEN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def _lora_problems(adapter: Adapter, dims: dict, base: str) -> tuple[list[str], int | None]:
    problems, hidden = [], None
    for i, modules in sorted(adapter.modules.items()):
        for module in modules:
            name = f"model.layers.{i}.{module}"
            a, b = adapter.weights[f"{name}.lora_a"].shape, adapter.weights[f"{name}.lora_b"].shape
            if module.endswith(_READS_HIDDEN):
                hidden = hidden or a[0]
            if module not in dims:
                problems.append(f"  {name}: {base} has no such linear layer")
            elif (a[0], b[1]) != dims[module]:
                problems.append(f"  {name}: lora_a {tuple(a)} and lora_b {tuple(b)} adapt a "
                                f"{a[0]} -> {b[1]} layer; {base}'s is {dims[module][0]} -> "
                                f"{dims[module][1]}")
    return problems, hidden


def _full_problems(weights: dict, dims: dict, L: int, base: str) -> tuple[list[str], int | None]:
    problems, hidden = [], None
    for name, w in sorted(weights.items()):
        m = _FULL_KEY.match(name)
        if m is None or m[2] not in dims:
            continue
        if m[2].endswith(_READS_HIDDEN):
            hidden = hidden or w.shape[-1]
        if int(m[1]) >= L:
            problems.append(f"  {name}: {base} has {L} blocks")
        elif tuple(w.shape) != dims[m[2]][::-1]:
            problems.append(f"  {name}: shape {tuple(w.shape)}; {base}'s is {dims[m[2]][::-1]}")
    return problems, hidden


def qlora_settings(run_config: dict | None, config: dict | None) -> dict | None:
    """{"bits", "group_size"} when the run quantized an unquantized base at load (QLoRA)."""
    q = (run_config or {}).get("quantize")
    if not isinstance(q, dict) or (config or {}).get("quantization"):
        return None
    return {"bits": q.get("bits", 4), "group_size": q.get("group_size", 64)}


def read_evals(files, source: Source) -> list[tuple[str, object]]:
    """[(file name, parsed JSON)] of each `--eval` file, then the run folder's eval.json."""
    paths = [Path(f).expanduser() for f in files]
    own = [source.run_dir / "eval.json"]
    if source.config_path is not None:
        own.insert(0, source.config_path.parent / "eval.json")
    given = {p.resolve() for p in paths if p.exists()}
    for path in own:
        if path.is_file() and path.resolve() not in given:
            paths.append(path)
            break
    out = []
    for path in paths:
        if not path.is_file():
            raise ExportError(f"--eval {path}: no such file; expected the JSON that "
                              "`oisd-mlx eval --out FILE` writes")
        try:
            out.append((path.name, json.loads(path.read_text())))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ExportError(f"--eval {path}: not valid JSON ({e})") from None
    return out
