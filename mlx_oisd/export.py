"""Export a trained adapter folder: a Hugging Face PEFT LoRA adapter, the base with the adapters
merged (Hugging Face safetensors), or the mlx-lm folder itself; then, optionally, push to the Hub.

mlx-lm's LoRA layer computes `y = x W^T + scale * (x A) B` with `lora_a` A (in, r) and `lora_b`
B (r, out). PEFT computes `y = x W^T + (lora_alpha / r) * x A'^T B'^T` with `lora_A.weight`
A' (r, in) and `lora_B.weight` B' (out, r). So A' = A^T, B' = B^T and `lora_alpha = scale * r`
give the same weight delta `scale * B^T A^T`. Merging reuses mlx-lm's `fuse()` of each LoRA layer.

Everything an export reads is checked first (`export_inputs.py`: the adapter folder, its run and
checkpoint step, the base, the adapters' shapes against the base's config.json, eval files), so
a failed check writes nothing. A QLoRA run (`quantize` in its config.yaml) is fused into its
base quantized as in training, then dequantized: the merged weights compute what was trained.
Every folder gets a README.md model card (`model_card.py`) named after the run.
"""

import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx

from . import hub
from .export_inputs import (
    ADAPTER_FILES,
    HUB_ID,
    Adapter,
    ExportError,
    base_config,
    check_fits_base,
    qlora_settings,
    read_adapter,
    read_evals,
    read_source,
    resolve_base,
    resolve_base_model,
    warn,
)
from .io import DiskFullError, atomic_write, write_json, write_text
from .model_card import CardFacts, model_card, quantize_note

FORMATS = ("peft", "fused", "mlx")
# Copied next to the fused weights: what a Hugging Face or mlx-lm loader reads besides them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


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


def fuse_model(base: str, adapter_dir: Path, quantize: dict | None = None):
    """The base with the adapters merged by mlx-lm's `fuse()`, every layer dequantized. With
    `quantize` ({"bits", "group_size"}: a QLoRA run) the base is first quantized as training
    quantized it, so the merged weights are the trained model's (quantized base + adapters)."""
    import mlx.nn as nn
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model, load_adapters

    from .loading import load_model

    model, model_path = load_model(base)
    if quantize:
        nn.quantize(model, group_size=quantize["group_size"], bits=quantize["bits"])
    model = load_adapters(model, str(adapter_dir))
    fused = [(n, m.fuse(dequantize=True)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return dequantize_model(model), model_path


def export_fused(adapter: Adapter, base: str, out: Path, quantize: dict | None = None) -> Path:
    """A Hugging Face model folder: config.json without quantization, HF-named safetensors
    (sharded like `save_pretrained` above 5 GB), the base's tokenizer files."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import make_shards

    model, model_path = fuse_model(base, adapter.path, quantize)
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
           push_to_hub_repo: str | None = None, api=None, overwrite: bool = False,
           evals: tuple[str | Path, ...] | list = ()) -> Path:
    """Write `adapter_dir` as `fmt` (peft | fused | mlx) into `out` with a README.md model card,
    then upload `out` to `push_to_hub_repo` when given. Returns `out`.

    `evals`: `oisd-mlx eval --out` result files for the card's table (the run folder's
    `eval.json` is added when present). Every check (destination, base, adapter shapes against
    the base, eval files) runs before anything is written. `out` must be empty or new unless
    `overwrite`, and never a training run's `adapters/` or anything inside its `checkpoints/`."""
    if fmt not in FORMATS:
        raise ExportError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if push_to_hub_repo:
        _check_repo_id(push_to_hub_repo)  # before writing anything
    adapter = read_adapter(adapter_dir)
    out = Path(out).expanduser()
    check_destination(out, adapter.path, overwrite)
    source = read_source(adapter.path)
    ref = resolve_base_model(resolve_base(adapter.path, base, source))
    config = base_config(ref)
    if config is None:
        warn(f"cannot check the adapters against {ref.name}: its config.json is neither in the "
             "Hugging Face cache nor reachable on the Hub")
    else:
        check_fits_base(adapter, config, ref.name, "--base" if base else "the run's model")
    results = read_evals(evals, source)
    quantize = qlora_settings(source.config, config)
    if fmt == "peft":
        export_peft(adapter, ref.name_or_path, out)
    elif fmt == "fused":
        export_fused(adapter, ref.name, out, quantize)
    else:
        export_mlx(adapter, out)
    if quantize:
        print(f"note: {quantize_note(fmt, quantize)}", file=sys.stderr, flush=True)
    facts = CardFacts(fmt, source.run_dir.name, ref.name, ref.hub_id, adapter.fine_tune_type,
                      source.config, source.step, source.max_steps, results, push_to_hub_repo,
                      quantize)
    write_text(out / "README.md", model_card(facts))
    if push_to_hub_repo:
        push_to_hub(out, push_to_hub_repo, api=api)
    return out


# ---- the Hub ----

class PushError(ExportError):
    """The export is written but the upload failed; `folder` is where it is."""

    def __init__(self, message: str, folder: Path):
        super().__init__(message)
        self.folder = folder


def hub_api():
    """The Hub client (tests replace this function with one returning a fake)."""
    from huggingface_hub import HfApi

    return HfApi()


def push_to_hub(folder: str | Path, repo: str, api=None) -> str:
    """Create `repo` on the Hub if needed and upload `folder`; `api` defaults to `hub_api()`.
    Returns the repo's URL. A Hub or network failure is one PushError (`push_error_message`)."""
    _check_repo_id(repo)
    api = hub_api() if api is None else api
    try:
        url = api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                          commit_message="Upload with oisd-mlx export")
    except hub.network_errors() as e:
        raise PushError(push_error_message(e, Path(folder), repo), Path(folder)) from None
    return str(url)


def push_error_message(e: BaseException, folder: Path, repo: str) -> str:
    """One line for a failed upload of `folder` to `repo`: offline, not allowed, or the Hub's
    HTTP status and first line."""
    later = f"the export is at {folder}; push it later with `hf upload {repo} {folder}`"
    status = _http_status(e)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if status in (401, 403) or (status is None and hub.failure(e) == hub.AUTH):
        return (f"the Hub refused the push to {repo!r} (HTTP {status}: not logged in, or the "
                f"token may not write there): log in with `hf auth login` or set HF_TOKEN; {later}")
    if status is not None:
        return f"the Hub answered HTTP {status} to the push to {repo!r}: {first}; {later}"
    if hub.failure(e) in (hub.OFFLINE, hub.UNREACHABLE):
        return f"cannot reach the Hugging Face Hub (offline); {later}"
    return f"the push to {repo!r} failed ({type(e).__name__}: {first}); {later}"


def _http_status(e: BaseException | None) -> int | None:
    """The HTTP status of `e` or of the error it was raised from (huggingface_hub wraps)."""
    return next((status for x in hub._chain(e) if (status := hub._status(x))), None)


def _check_repo_id(repo: str) -> None:
    if not HUB_ID.match(repo):
        raise ExportError(f"--push-to-hub {repo!r}: expected a Hub repo id of the form 'owner/name'")


def publish_run(out_dir: str | Path, repo: str, api=None) -> str:
    """After a finished run: export `out_dir/adapters` as PEFT (a full fine-tune: fused) into
    `out_dir/export-peft` (`export-fused`), push it to `repo`, and return one line saying what
    happened. Never raises for an export or push failure: the run is done, the export stays."""
    from .loading import ModelLoadError

    out_dir = Path(out_dir)
    adapters = out_dir / "adapters"
    try:
        fmt = "fused" if read_adapter(adapters).fine_tune_type == "full" else "peft"
        folder = export(adapters, fmt, out_dir / f"export-{fmt}", push_to_hub_repo=repo, api=api,
                        overwrite=True)
    except (ExportError, ModelLoadError, DiskFullError) as e:
        return f"push_to_hub: {e}"
    return f"push_to_hub: pushed {folder} to https://huggingface.co/{repo}"


