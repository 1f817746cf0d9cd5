"""Export a trained adapter folder: a Hugging Face PEFT LoRA adapter, the base with the adapters
merged (Hugging Face safetensors), or the mlx-lm folder itself; then, optionally, push to the Hub.

mlx-lm's LoRA layer computes `y = x W^T + scale * (x A) B` with `lora_a` A (in, r) and `lora_b`
B (r, out). PEFT computes `y = x W^T + (lora_alpha / r) * x A'^T B'^T` with `lora_A.weight`
A' (r, in) and `lora_B.weight` B' (out, r). So A' = A^T, B' = B^T and `lora_alpha = scale * r`
give the same weight delta `scale * B^T A^T`. Merging reuses mlx-lm's `fuse()` of each LoRA layer.

Every folder gets a README.md model card with the base model, the format, the run's OISD settings
(from the `config.yaml` next to the adapters) and its `eval.json` results when there are any.
"""

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import yaml

from .io import atomic_write, write_json, write_text

FORMATS = ("peft", "fused", "mlx")
FINE_TUNE_TYPES = ("lora", "dora", "full")
ADAPTER_FILES = ("adapter_config.json", "adapters.safetensors")
# Copied next to the fused weights: what a Hugging Face or mlx-lm loader reads besides them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
_LORA_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.lora_([ab])$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


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


def run_folder(adapter_dir: Path) -> Path | None:
    """The folder holding the run's config.yaml: the adapter folder itself (a checkpoint) or the
    run folder above `adapters/`; None when there is none."""
    for folder in (adapter_dir, adapter_dir.parent):
        if (folder / "config.yaml").is_file():
            return folder
    return None


def read_run_config(adapter_dir: Path) -> dict | None:
    run = run_folder(adapter_dir)
    if run is None:
        return None
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
    except yaml.YAMLError as e:
        raise ExportError(f"{run / 'config.yaml'}: invalid YAML ({e})") from e
    if not isinstance(cfg, dict):
        raise ExportError(f"{run / 'config.yaml'}: expected a mapping of config keys")
    return cfg


def resolve_base(adapter_dir: Path, base: str | None, run_config: dict | None) -> str:
    """`--base`, else the `model` key of the run's config.yaml."""
    if base:
        return str(base)
    if run_config is None:
        raise ExportError(f"no base model for {adapter_dir}: pass --base MODEL (a Hub id or a local "
                          "folder), or keep the run's config.yaml next to the adapters folder")
    if not isinstance(run_config.get("model"), str):
        raise ExportError(f"{run_folder(adapter_dir) / 'config.yaml'}: no 'model' key; pass --base MODEL")
    return run_config["model"]


def peft_tensors(adapter: Adapter) -> tuple[dict[str, mx.array], dict]:
    """PEFT's `adapter_model.safetensors` tensors and the LoRA fields of its adapter_config.json."""
    if adapter.fine_tune_type != "lora":
        raise ExportError(f"{adapter.path}: fine_tune_type {adapter.fine_tune_type!r} cannot be "
                          "exported as a PEFT LoRA adapter (only 'lora'); use --format fused or mlx")
    per_block = {tuple(ms) for ms in adapter.modules.values()}
    if len(per_block) != 1:
        raise ExportError(f"{adapter.path}: blocks adapt different modules ({sorted(per_block)}); "
                          "PEFT's target_modules + layers_to_transform cannot express that")
    (modules,) = per_block
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})  # PEFT matches on the last name
    if len(short) != len(modules):
        raise ExportError(f"{adapter.path}: two adapted modules share a name in {list(modules)}")
    tensors = {}
    for name, w in adapter.weights.items():
        stem, leaf = name.rsplit(".", 1)
        peft_leaf = {"lora_a": "lora_A", "lora_b": "lora_B"}[leaf]
        tensors[f"base_model.model.{stem}.{peft_leaf}.weight"] = w.T  # (r, in) / (out, r)
    blocks = sorted(adapter.modules)
    rank, scale = adapter.lora_parameters["rank"], adapter.lora_parameters["scale"]
    alpha = scale * rank  # PEFT's scaling is lora_alpha / r
    # mlx-lm adapts the last num_layers blocks, so the last block always has adapters: L = max + 1.
    all_blocks = blocks == list(range(blocks[-1] + 1))
    fields = {
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": adapter.lora_parameters.get("dropout", 0.0),
        "target_modules": short,
        "layers_to_transform": None if all_blocks else blocks,
        "layers_pattern": None if all_blocks else "layers",
    }
    return tensors, fields


def _is_run(folder: Path) -> bool:
    """A training run's output_dir: its resolved config.yaml next to a checkpoints/ folder."""
    return (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir()


def check_destination(out: Path, adapter_dir: Path, overwrite: bool) -> None:
    """Refuse an `--out` that would overwrite something: the adapter folder itself, a file, a
    run's `adapters/` (training rewrites it) or anything inside a run's `checkpoints/` (even with
    `overwrite`), or a non-empty folder without `overwrite`."""
    where = out.resolve()
    if where == adapter_dir.resolve():
        raise ExportError(f"--out {out} is the adapter folder itself; choose another folder")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    for folder in (where, *where.parents):
        if folder.name == "checkpoints" and _is_run(folder.parent):
            raise ExportError(f"--out {out} is inside the checkpoints/ folder of the training run "
                              f"{folder.parent}; export to a folder outside the run's checkpoints")
    if where.name == "adapters" and _is_run(where.parent):
        raise ExportError(f"--out {out} is the adapters/ folder of the training run {where.parent} "
                          "(training rewrites it); choose another folder")
    if not overwrite and out.is_dir() and (entries := sorted(p.name for p in out.iterdir())):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ExportError(f"--out {out} is not empty ({len(entries)} entries: {shown}); pass "
                          "--overwrite to write over its files, or choose an empty or new folder")


def export_peft(adapter: Adapter, base: str, out: Path) -> Path:
    tensors, fields = peft_tensors(adapter)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "revision": None, "inference_mode": True, **fields, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    atomic_write(out / "adapter_model.safetensors",
                 lambda p: mx.save_safetensors(str(p), tensors, metadata={"format": "pt"}))
    write_json(out / "adapter_config.json", config)
    return out


def fuse_model(base: str, adapter_dir: Path):
    """The base with the adapters merged by mlx-lm's `fuse()`, every layer dequantized."""
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model

    from .loading import load_model

    model, model_path = load_model(base, adapter_path=adapter_dir)
    fused = [(n, m.fuse(dequantize=True)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return dequantize_model(model), model_path


def export_fused(adapter: Adapter, base: str, out: Path) -> Path:
    """A Hugging Face model folder: config.json without quantization, HF-named safetensors
    (sharded like `save_pretrained` above 5 GB), the base's tokenizer files."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import make_shards

    model, model_path = fuse_model(base, adapter.path)
    weights = dict(tree_flatten(model.parameters()))
    shards = make_shards(weights)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        atomic_write(out / name, lambda p, s=shard: mx.save_safetensors(str(p), s, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in sorted(s)}}
        write_json(out / "model.safetensors.index.json", index)
    for name in TOKENIZER_FILES:
        if (model_path / name).is_file():
            _copy(model_path / name, out / name)
    config = json.loads((model_path / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    dtype = str(next(iter(weights.values())).dtype).removeprefix("mlx.core.")
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype
    write_json(out / "config.json", config)  # last: a folder with config.json is complete
    return out


def export_mlx(adapter: Adapter, out: Path) -> Path:
    for name in ADAPTER_FILES:
        _copy(adapter.path / name, out / name)
    return out


def _copy(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda p: shutil.copyfile(src, p))


def export(adapter_dir: str | Path, fmt: str, out: str | Path, base: str | None = None,
           push_to_hub_repo: str | None = None, api=None, overwrite: bool = False) -> Path:
    """Write `adapter_dir` as `fmt` (peft | fused | mlx) into `out` with a README.md model card,
    then upload `out` to `push_to_hub_repo` when given. Returns `out`.

    `out` must be empty or new unless `overwrite`, and never a training run's `adapters/` or
    anything inside its `checkpoints/` (see `check_destination`)."""
    if fmt not in FORMATS:
        raise ExportError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if push_to_hub_repo:
        _check_repo_id(push_to_hub_repo)  # before writing anything
    adapter = read_adapter(adapter_dir)
    out = Path(out).expanduser()
    check_destination(out, adapter.path, overwrite)
    run_config = read_run_config(adapter.path)
    base = resolve_base(adapter.path, base, run_config)
    if fmt == "peft":
        export_peft(adapter, base, out)
    elif fmt == "fused":
        export_fused(adapter, base, out)
    else:
        export_mlx(adapter, out)
    run = run_folder(adapter.path)  # the run's eval.json, never an unrelated neighbour's
    evals = _read_eval(run / "eval.json") if run is not None else None
    write_text(out / "README.md", model_card(fmt, base, run_config, evals, push_to_hub_repo or str(out)))
    if push_to_hub_repo:
        push_to_hub(out, push_to_hub_repo, api=api)
    return out


def _read_eval(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from e


def push_to_hub(folder: str | Path, repo: str, api=None) -> str:
    """Create `repo` on the Hub if needed and upload `folder`; `api` defaults to `HfApi()`
    (tests pass a fake). Returns the repo's URL."""
    _check_repo_id(repo)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    from huggingface_hub.errors import HfHubHTTPError

    try:
        url = api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                          commit_message="Upload with oisd-mlx export")
    except (HfHubHTTPError, OSError) as e:
        raise ExportError(f"could not push {folder} to {repo!r} ({type(e).__name__}: {e}); "
                          "log in with `hf auth login` or set HF_TOKEN") from e
    return str(url)


def _check_repo_id(repo: str) -> None:
    if not _HUB_ID.match(repo):
        raise ExportError(f"--push-to-hub {repo!r}: expected a Hub repo id of the form 'owner/name'")


# ---- the model card ----

_FORMAT_TEXT = {
    "peft": ("peft", "A LoRA adapter in Hugging Face PEFT format"),
    "fused": ("transformers", "The base model with the LoRA adapters merged in (Hugging Face "
              "safetensors, unquantized)"),
    "mlx": ("mlx", "A LoRA adapter in mlx-lm format"),
}
_USAGE = {
    "peft": ("python", "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
             "base = AutoModelForCausalLM.from_pretrained(\"{base}\")\n"
             "model = PeftModel.from_pretrained(base, \"{where}\")"),
    "fused": ("python", "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
              "model = AutoModelForCausalLM.from_pretrained(\"{where}\")\n"
              "tokenizer = AutoTokenizer.from_pretrained(\"{where}\")"),
    "mlx": ("bash", "mlx_lm.generate --model {base} --adapter-path {where} --prompt \"2+2=?\""),
}
_CARD_KEYS = ("algorithm", "dataset", "learning_rate", "max_steps", "lora", "quantize", "oisd")


def model_card(fmt: str, base: str, run_config: dict | None, evals, where: str) -> str:
    """README.md: Hub metadata, what the folder is, how to load it, the run's settings, evals."""
    library, what = _FORMAT_TEXT[fmt]
    meta = {"library_name": library, "tags": ["mlx-oisd", "oisd", "grpo", "qwen3", "lora"]}
    if _HUB_ID.match(base) and not Path(base).exists():
        meta["base_model"] = base
    lang, usage = _USAGE[fmt]
    lines = ["---", yaml.safe_dump(meta, sort_keys=True).strip(), "---", "",
             f"# {Path(where).name}", "",
             f"{what}, trained from `{base}` with mlx-oisd "
             "(GRPO + On-Policy Internal Self-Distillation, arXiv 2605.29089, in MLX).", "",
             f"- base model: `{base}`", f"- format: `{fmt}`", "", "## Use", "",
             f"```{lang}", usage.format(base=base, where=where), "```", "", "## Training", ""]
    if run_config is None:
        lines.append("No run config.yaml was found next to the adapters.")
    else:
        lines += ["| setting | value |", "|---|---|"]
        keys = list(_CARD_KEYS) + (["bupo"] if run_config.get("algorithm") == "bupo" else [])
        for key in keys:
            if key in run_config:
                lines += [f"| `{k}` | `{_show(v)}` |" for k, v in _flatten(key, run_config[key])]
    if evals is not None:
        lines += ["", "## Evaluation", "", *_eval_table(evals)]
    return "\n".join(lines) + "\n"


def _flatten(prefix: str, value) -> list[tuple[str, object]]:
    """("oisd", {"tau": 1.0, "x": None}) -> [("oisd.tau", 1.0)]: unset sub-keys are left out."""
    if isinstance(value, dict):
        return [kv for k, v in value.items() if v is not None for kv in _flatten(f"{prefix}.{k}", v)]
    return [(prefix, value)]


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _eval_table(evals) -> list[str]:
    """eval.json as a table: `oisd-mlx eval --out`'s {"benchmarks", "mean", "settings"}, or
    {bench: {metric: v}}, [{...row...}], {metric: v}; anything else as JSON."""
    if isinstance(evals, dict) and isinstance(evals.get("benchmarks"), dict):
        benches = dict(evals["benchmarks"])
        if len(benches) > 1 and isinstance(evals.get("mean"), dict):
            benches["mean"] = evals["mean"]
        rows = [{"benchmark": name, **{k: v for k, v in m.items() if k == "problems" or "@" in k}}
                for name, m in benches.items()]
        settings = evals.get("settings") or {}
        shown = {k: settings[k] for k in ("k", "temperature", "top_p", "max_tokens") if k in settings}
        note = ", ".join(f"{k} = {v}" for k, v in shown.items())
        return _table(rows) + (["", f"Sampling: {note}."] if note else [])
    if isinstance(evals, dict) and evals and all(isinstance(v, dict) for v in evals.values()):
        rows = [{"benchmark": k, **{c: x for c, x in _flatten_row(v)}} for k, v in evals.items()]
    elif isinstance(evals, list) and all(isinstance(r, dict) for r in evals):
        rows = [dict(_flatten_row(r)) for r in evals]
    elif isinstance(evals, dict):
        rows = [{"metric": k, "value": v} for k, v in evals.items()]
    else:
        return [f"```json\n{json.dumps(evals, indent=2)}\n```"]
    return _table(rows)


def _table(rows: list[dict]) -> list[str]:
    columns = list(dict.fromkeys(c for r in rows for c in r))
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return table


def _flatten_row(row: dict) -> list[tuple[str, object]]:
    return [kv for k, v in row.items() for kv in _flatten(k, v)]


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else _show(v) if isinstance(v, list) else str(v)
