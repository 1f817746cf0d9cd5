"""Checkpoints: everything a killed run needs to continue as if it had not stopped, verified.

    output_dir/checkpoints/step_000050/  adapters.safetensors, adapter_config.json,
                                         optimizer.safetensors, state.json, config.yaml,
                                         manifest.json (size + sha256 of every other file)
    output_dir/checkpoints/latest         name of the newest complete checkpoint (for people)
    output_dir/adapters/                  the newest adapters, an mlx-lm adapter folder
    output_dir/.lock                      held by the running trainer (`runlock.py`)

Writing: the tensors are checked finite first (a non-finite one is refused with an error, and
nothing is written); the files go into a hidden `.tmp-step_N` folder, `manifest.json` LAST,
then the folder is renamed into place and `latest` replaced, so a kill or a full disk at any
moment leaves the previous checkpoints intact (a failed save removes its temp folder). Pruning
keeps `keep` checkpoints (config `save_total_limit`, default `KEEP`; None: all): the one just
written plus the newest others that look complete (manifest present, file sizes match); it never
counts, so never keeps, a half-written one in their place.

Resuming (`open_checkpoints`): temp folders and temp files of an interrupted save are removed,
then the `step_*` folders are tried newest first. One is used when its manifest lists every
required file with the right size and sha256, `state.json` parses, and every tensor loads and
is finite; each one skipped gets a warning naming the file and what is wrong. `latest` is only
trusted as a plain `step_NNNNNN` name inside this `checkpoints/` folder, and resume scans the
folders anyway (a run killed between the rename and `latest` has a newer complete folder).
Folders that exist but are all unusable stop the run with a `CheckpointError`: `--resume` never
silently starts over from step 0. A folder without `manifest.json` was written before
verification existed: it is accepted, with a warning, when its state.json and tensors parse and
are finite (a flipped byte inside such a tensor cannot be detected).

The rollout RNG is re-seeded from (seed, step) every step, so step + sampler position is the
whole state.
"""

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import yaml
from mlx.utils import tree_flatten, tree_unflatten

from .config import ConfigError, TrainConfig, config_diff, run_changes, to_dict, validate
from .io import DiskFullError, atomic_write, temp_files, write_json, write_text
from .lora import save_adapters

KEEP = 3  # checkpoints kept, the one just written included (save_total_limit's default)
MANIFEST = "manifest.json"
REQUIRED = ("adapters.safetensors", "adapter_config.json", "optimizer.safetensors", "state.json")
TENSOR_FILES = ("adapters.safetensors", "optimizer.safetensors")
STEP_NAME = re.compile(r"^step_(\d{6,})$")
# What atomic_write may leave half-written (".name.XXXX") in each folder of a run when killed.
RUN_FILES = {".": ("config.yaml", "metrics.jsonl", "curves.png"), "checkpoints": ("latest",),
             "adapters": ("adapters.safetensors", "adapter_config.json")}


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or resumed from; the message names the file and why."""


@dataclass
class Checkpoint:
    """A verified checkpoint folder, its tensors already loaded."""

    path: Path
    weights: dict[str, mx.array]  # trainable parameters, flat names
    optimizer: dict[str, mx.array]  # optimizer state, flat names
    state: dict  # state.json: step, sampler position
    legacy: bool = False  # no manifest.json (written before verification existed)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def step_folders(out_dir: Path) -> list[Path]:
    """The run's `checkpoints/step_N` folders, newest first."""
    root = Path(out_dir) / "checkpoints"
    found = [p for p in root.glob("step_*") if p.is_dir() and STEP_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_NAME.match(p.name)[1]), reverse=True)


# ---- writing ----

def nonfinite(tensors: dict[str, mx.array]) -> list[str]:
    """Names of the tensors holding a NaN or an inf (one evaluation for all of them)."""
    names = [k for k, v in tensors.items() if mx.issubdtype(v.dtype, mx.inexact)]
    if not names:
        return []
    flags = mx.stack([mx.isfinite(tensors[k]).all() for k in names]).tolist()
    return [k for k, ok in zip(names, flags) if not ok]


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer, state: dict,
                    config_yaml: str, num_layers: int, lora_params: dict | None,
                    keep: int | None = KEEP) -> Path:
    """Write `checkpoints/step_N` (verified layout above), `latest`, `adapters/`; prune to
    `keep` checkpoints (None: keep all)."""
    root = Path(out_dir) / "checkpoints"
    name = f"step_{step:06d}"
    weights = dict(tree_flatten(model.trainable_parameters()))
    opt = dict(tree_flatten(optimizer.state))
    for what, tensors in (("trainable parameters", weights), ("optimizer state", opt)):
        if bad := nonfinite(tensors):
            previous = [p.name for p in step_folders(out_dir) if p.name != name]
            kept = f"{previous[0]} is kept" if previous else "no earlier checkpoint exists"
            raise CheckpointError(
                f"refusing to write checkpoint {root / name}: non-finite values (NaN or inf) in "
                f"the {what}: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} "
                f"({len(bad)} tensors); nothing was written, {kept}")
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_adapters(model, tmp, num_layers, lora_params)
        atomic_write(tmp / "optimizer.safetensors", lambda p: mx.save_safetensors(str(p), opt))
        write_json(tmp / "state.json", {"step": step, **state})
        write_text(tmp / "config.yaml", config_yaml)
        write_json(tmp / MANIFEST, manifest(tmp))  # last: a folder with a manifest is complete
    except DiskFullError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for p in step_folders(out_dir) if p.name != name]
        kept = f"{previous[0]} is intact" if previous else "no earlier checkpoint exists"
        raise DiskFullError(root / name / e.path.name, e.cause,
                            note=f"checkpoint {name} not written, {kept}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = root / name
    if final.exists():  # a step redone after resuming from an older checkpoint
        aside = root / f".tmp-old-{name}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    write_text(root / "latest", name + "\n")
    save_adapters(model, Path(out_dir) / "adapters", num_layers, lora_params)
    prune(out_dir, name, keep)
    return final


def manifest(folder: Path) -> dict:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    return {"format": 1, "files": {p.name: {"size": p.stat().st_size, "sha256": sha256(p)}
                                   for p in files}}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def prune(out_dir: Path, newest: str, keep: int | None = KEEP) -> None:
    """Keep `keep` checkpoints: `newest` and the `keep - 1` newest other folders that look
    complete; remove the rest. keep None: every complete one stays."""
    limit = float("inf") if keep is None else keep
    kept = 1
    for folder in step_folders(out_dir):
        if folder.name == newest:
            continue
        if kept < limit and not quick_problems(folder):
            kept += 1
            continue
        shutil.rmtree(folder, ignore_errors=True)


def quick_problems(folder: Path) -> list[str]:
    """The cheap part of `verify`: files present with the manifest's sizes (no hashing)."""
    listed = _read_manifest(folder)
    if isinstance(listed, str):
        return [listed]
    if listed is None:  # legacy folder
        return [f"{f}: missing" for f in REQUIRED if not (folder / f).is_file()]
    problems = [f"{f}: missing from {MANIFEST}" for f in REQUIRED if f not in listed]
    for name, entry in listed.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing (listed in {MANIFEST})")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, {MANIFEST} says {entry['size']}")
    return problems


def _read_manifest(folder: Path) -> dict | str | None:
    """{file: {size, sha256}}, None when there is no manifest, or a problem (str)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text()).get("files")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        files = None
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()):
        return f"{MANIFEST}: unreadable (expected {{\"files\": {{name: {{size, sha256}}}}}})"
    return files


# ---- resuming ----

def read_checkpoint(folder: Path) -> Checkpoint:
    """Verify `folder` (manifest, state.json, tensors parse and are finite) and load it;
    a `CheckpointError` lists every problem, each naming the file."""
    try:
        return _read_checkpoint(Path(folder))
    except OSError as e:  # unreadable (permissions, I/O error): as unusable as a damaged file
        raise CheckpointError(f"{folder}: cannot read {e.filename or 'a file'} ({e.strerror or e})") from None


def _read_checkpoint(folder: Path) -> Checkpoint:
    listed = _read_manifest(folder)
    problems = quick_problems(folder)
    if not problems and isinstance(listed, dict):
        problems = [f"{name}: sha256 {digest[:12]}..., {MANIFEST} says {entry['sha256'][:12]}... "
                    "(the file changed after it was written)"
                    for name, entry in listed.items()
                    if (digest := sha256(folder / name)) != entry["sha256"]]
    if problems:
        raise CheckpointError(f"{folder}: " + "; ".join(problems))
    state = _read_state(folder)
    tensors = {}
    for name in TENSOR_FILES:
        try:
            tensors[name] = mx.load(str(folder / name))
            bad = nonfinite(tensors[name])
        except (RuntimeError, ValueError) as e:
            problems.append(f"{name}: not a readable safetensors file ({e})")
            continue
        if bad:
            problems.append(f"{name}: non-finite values in {', '.join(bad[:5])}")
    try:
        json.loads((folder / "adapter_config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"adapter_config.json: not valid JSON ({e})")
    if problems:
        raise CheckpointError(f"{folder}: " + "; ".join(problems))
    return Checkpoint(folder, tensors["adapters.safetensors"], tensors["optimizer.safetensors"],
                      state, legacy=listed is None)


def _read_state(folder: Path) -> dict:
    path = folder / "state.json"
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    step = int(STEP_NAME.match(folder.name)[1])
    if not isinstance(state, dict) or state.get("step") != step or not isinstance(
            state.get("sampler"), dict):
        raise CheckpointError(f"{path}: expected {{\"step\": {step}, \"sampler\": {{...}}}}, got "
                              f"{str(state)[:80]}")
    return state


def clean_temps(out_dir: Path) -> list[Path]:
    """Remove what an interrupted save left: `.tmp-*` folders, atomic_write's `.name.*` files."""
    out_dir = Path(out_dir)
    leftovers = [p for p in (out_dir / "checkpoints").glob(".tmp-*") if p.is_dir()]
    leftovers += [p for sub, names in RUN_FILES.items() for p in temp_files(out_dir / sub, names)]
    for p in leftovers:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return leftovers


def open_checkpoints(out_dir: Path, resume: bool) -> Checkpoint | None:
    """At the start of a run (its lock held): clean temps, refuse to train over a run's
    checkpoints without `resume`, return the newest valid checkpoint (None: start at step 0)."""
    out_dir = Path(out_dir)
    if removed := clean_temps(out_dir):
        warn(f"removed {len(removed)} leftover temp file(s) of an interrupted write: "
             + ", ".join(str(p.relative_to(out_dir)) for p in removed[:4]))
    folders = step_folders(out_dir)
    if folders and not resume:
        raise CheckpointError(f"output_dir {out_dir} already holds checkpoints ({folders[0].name}); "
                              "pass --resume to continue that run, or choose another output_dir")
    if not resume or not folders:
        return None
    _check_latest(out_dir / "checkpoints" / "latest")
    skipped = []
    for folder in folders:
        try:
            ckpt = read_checkpoint(folder)
        except CheckpointError as e:
            warn(f"checkpoint not usable, skipped: {e}")
            skipped.append(str(e))
            continue
        if ckpt.legacy:
            warn(f"{folder} has no {MANIFEST} (written before checkpoints were verified); accepted "
                 "because its state.json and tensors parse and are finite")
        if skipped:
            warn(f"resuming from {folder.name}, the newest valid checkpoint")
        return ckpt
    raise CheckpointError(f"--resume: no valid checkpoint in {out_dir / 'checkpoints'}:\n  "
                          + "\n  ".join(skipped) + "\nrefusing to start over from step 0: restore "
                          "a checkpoint, or remove the checkpoints folder to train from scratch")


def _check_latest(pointer: Path) -> None:
    """`latest` must be a plain step_NNNNNN name of an existing sibling folder; warn if not."""
    if not pointer.is_file():
        return
    name = pointer.read_text(errors="replace").strip()
    if not STEP_NAME.match(name):
        warn(f"{pointer} holds {name[:80]!r}, not a step_NNNNNN folder name of this run; "
             "ignored, the checkpoint folders are scanned instead")
    elif not (pointer.parent / name).is_dir():
        warn(f"{pointer} names {name}, which does not exist; the checkpoint folders are scanned "
             "instead")


def weight_mismatch(model: nn.Module, weights: dict, labels=("missing", "unexpected",
                    "shape (checkpoint vs model)")) -> str | None:
    """None when `weights` match `model`'s trainable parameters name for name and shape for
    shape, else what differs ("missing: a, b; shape (...): c (4, 8) vs (8, 8)"), with `labels`
    naming the three kinds of difference."""
    params = dict(tree_flatten(model.trainable_parameters()))
    missing = sorted(set(params) - set(weights))
    extra = sorted(set(weights) - set(params))
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}"
              for k, v in params.items() if k in weights and weights[k].shape != v.shape]
    found = [(what, names) for what, names in zip(labels, (missing, extra, shapes)) if names]
    return "; ".join(f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                     for what, names in found) or None


def load_checkpoint(ckpt: Checkpoint, model: nn.Module, optimizer) -> dict:
    """Restore trainable weights and optimizer state from a verified checkpoint; return its
    state.json. The tensors must match the model's trainable parameters name for name."""
    if detail := weight_mismatch(model, ckpt.weights):
        raise CheckpointError(f"{ckpt.path / 'adapters.safetensors'} does not match the model "
                              f"({detail}); was model or lora changed since this run started?")
    model.load_weights(list(ckpt.weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(ckpt.optimizer.items()))
    mx.eval(model.parameters(), optimizer.state)
    return ckpt.state


def resume_notes(path: Path, cfg: TrainConfig) -> list[str]:
    """Compare `cfg` with the checkpoint's config.yaml at `path`: raise ConfigError listing the
    keys that change the run (shapes, data, objective); return a note per harmless change."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--resume: cannot read the checkpoint's config {path} ({e})") from None
    try:
        old = to_dict(validate(raw, str(path)))  # defaults of keys newer than the checkpoint
    except ConfigError:
        old = raw if isinstance(raw, dict) else {}
    diff = config_diff(old, to_dict(cfg))
    changes = run_changes(diff)
    if changes:
        listed = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, a, b in changes)
        raise ConfigError(f"--resume: the config differs from the checkpoint's in keys that "
                          f"change the run: {listed}; start a new output_dir or restore them")
    return [f"--resume: {k} changed {_show(a)} -> {_show(b)}" for k, a, b in diff]


def _show(value) -> str:
    return "null" if value is None else str(value)
