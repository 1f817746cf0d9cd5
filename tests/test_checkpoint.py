"""checkpoint.py and runlock.py: verified checkpoints, fallback on damage, one writer, full disk.

Unit tests use a toy module; the end-to-end ones run `oisd-mlx train` on builtin:tiny, starting
from a copy of one 3-step run checkpointed every step, and check that the resumed run ends with
exactly the adapters of the uninterrupted one.
"""

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from test_trainer import _config as trainer_config
from typer.testing import CliRunner

from cli.main import app
from mlx_oisd.checkpoint import (
    CheckpointError,
    load_checkpoint,
    open_checkpoints,
    read_checkpoint,
    save_checkpoint,
    step_folders,
)
from mlx_oisd.io import DiskFullError
from mlx_oisd.runlock import RunLock, RunLockedError

runner = CliRunner()


def parity_reward(completion, answer):
    """Rewards that differ within a group, so even a random model gets a gradient."""
    return float(len(completion) % 2)


# ---- unit level: a toy model ----

class Toy(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.layers = [nn.Linear(width, width), nn.Linear(width, 2)]

    def __call__(self, x):
        return self.layers[1](nn.relu(self.layers[0](x)))


def _toy(seed=0, width=4):
    mx.random.seed(seed)
    model, opt = Toy(width), optim.AdamW(learning_rate=1e-2)
    _toy_update(model, opt)
    return model, opt


def _toy_update(model, opt):
    x = mx.ones((3, model.layers[0].weight.shape[1]))
    grads = nn.value_and_grad(model, lambda m: (m(x) ** 2).sum())(model)[1]
    opt.update(model, grads)
    mx.eval(model.parameters(), opt.state)


def _save(out, step, model, opt):
    return save_checkpoint(out, step, model, opt, {"sampler": {"pos": step}}, "seed: 0\n", -1, None)


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _temps(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*") if p.name != ".lock")


def test_a_saved_checkpoint_verifies_and_restores(tmp_path):
    model, opt = _toy()
    path = _save(tmp_path, 1, model, opt)
    listed = json.loads((path / "manifest.json").read_text())["files"]
    assert sorted(listed) == ["adapter_config.json", "adapters.safetensors", "config.yaml",
                              "optimizer.safetensors", "state.json"]
    assert all(listed[f]["size"] == (path / f).stat().st_size for f in listed)
    fresh, fresh_opt = _toy(seed=1)
    state = load_checkpoint(read_checkpoint(path), fresh, fresh_opt)
    assert state == {"step": 1, "sampler": {"pos": 1}}
    for (k, a), (_, b) in zip(_flat(model.parameters()), _flat(fresh.parameters())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=k)
    assert {k: np.asarray(v).tolist() for k, v in _flat(opt.state)} == \
        {k: np.asarray(v).tolist() for k, v in _flat(fresh_opt.state)}
    with pytest.raises(CheckpointError, match=r"adapters.safetensors does not match the model "
                       r"\(shape \(checkpoint vs model\): layers.0.weight \(4, 4\) vs \(6, 6\), "):
        load_checkpoint(read_checkpoint(path), *_toy(width=6))


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


@pytest.mark.parametrize("where", ["weights", "optimizer"])
def test_non_finite_tensors_are_refused_at_save(tmp_path, where):
    model, opt = _toy()
    _save(tmp_path, 1, model, opt)
    before = _files(tmp_path)
    if where == "weights":
        model.layers[0].weight = model.layers[0].weight.at[0, 1].add(float("nan"))
        match = r"non-finite values \(NaN or inf\) in the trainable parameters: layers.0.weight"
    else:
        opt.state["layers"][1]["bias"]["v"] = mx.array([1.0, float("inf")])
        match = r"non-finite values \(NaN or inf\) in the optimizer state: layers.1.bias.v"
    with pytest.raises(CheckpointError, match=match + r" \(1 tensors\); nothing was written, "
                       r"step_000001 is kept"):
        _save(tmp_path, 2, model, opt)
    assert _files(tmp_path) == before and _temps(tmp_path) == []
    read_checkpoint(tmp_path / "checkpoints" / "step_000001")


def test_pruning_keeps_the_newest_good_one(tmp_path):
    model, opt = _toy()
    for step in (1, 2, 3):
        _save(tmp_path, step, model, opt)
        _toy_update(model, opt)
    assert [p.name for p in step_folders(tmp_path)] == ["step_000003", "step_000002", "step_000001"]
    root = tmp_path / "checkpoints"
    (root / "step_000003" / "manifest.json").unlink()  # half-written: neither complete nor legacy
    (root / "step_000003" / "state.json").unlink()
    with open(root / "step_000002" / "optimizer.safetensors", "r+b") as f:
        f.truncate(100)
    _save(tmp_path, 4, model, opt)
    # the two broken ones do not count as kept checkpoints: step 1 stays, the newest good one
    assert [p.name for p in step_folders(tmp_path)] == ["step_000004", "step_000001"]
    for step in (5, 6, 7):
        _toy_update(model, opt)
        _save(tmp_path, step, model, opt)
    assert [p.name for p in step_folders(tmp_path)] == ["step_000007", "step_000006", "step_000005"]
    _save(tmp_path, 6, model, opt)  # a step redone after a resume replaces its folder in place
    assert [p.name for p in step_folders(tmp_path)] == ["step_000007", "step_000006", "step_000005"]
    for folder in step_folders(tmp_path):
        read_checkpoint(folder)
    assert _temps(tmp_path) == []


@pytest.mark.parametrize("limit", [1, 2, 5, None])
def test_save_total_limit_keeps_exactly_that_many(tmp_path, limit):
    """After 6 saves exactly `limit` folders remain (None: all 6), the newest ones, each
    verifiable; a broken one never counts as kept."""
    model, opt = _toy()
    for step in range(1, 7):
        save_checkpoint(tmp_path, step, model, opt, {"sampler": {"pos": step}}, "seed: 0\n", -1,
                        None, keep=limit)
    kept = [p.name for p in step_folders(tmp_path)]
    assert kept == [f"step_{s:06d}" for s in range(6, 6 - (limit or 6), -1)]
    for folder in step_folders(tmp_path):
        read_checkpoint(folder)
    if limit == 2:
        (tmp_path / "checkpoints" / "step_000006" / "state.json").unlink()
        save_checkpoint(tmp_path, 7, model, opt, {"sampler": {"pos": 7}}, "seed: 0\n", -1, None,
                        keep=limit)
        assert [p.name for p in step_folders(tmp_path)] == ["step_000007", "step_000005"]


def test_legacy_checkpoints_without_manifest(tmp_path):
    """Written before manifests existed: accepted with a warning while their files parse and are
    finite; a truncated or non-finite one is skipped like any damaged checkpoint."""
    model, opt = _toy()
    for step in (1, 2):
        _save(tmp_path, step, model, opt)
        _toy_update(model, opt)
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        (root / f"step_00000{step}" / "manifest.json").unlink()
    with _stderr() as err:
        ckpt = open_checkpoints(tmp_path, resume=True)
    assert ckpt.path.name == "step_000002" and ckpt.legacy
    assert "step_000002 has no manifest.json (written before checkpoints were verified); " \
        "accepted because its state.json and tensors parse and are finite" in err.text
    with open(root / "step_000002" / "adapters.safetensors", "r+b") as f:
        f.truncate(60)
    with _stderr() as err:
        assert open_checkpoints(tmp_path, resume=True).path.name == "step_000001"
    assert "step_000002: adapters.safetensors: not a readable safetensors file" in err.text
    opt_state = mx.load(str(root / "step_000001" / "optimizer.safetensors"))
    opt_state["layers.0.weight.m"] = opt_state["layers.0.weight.m"] * float("nan")
    mx.save_safetensors(str(root / "step_000001" / "optimizer.safetensors"), opt_state)
    with _stderr(), pytest.raises(CheckpointError, match=r"(?s)no valid checkpoint.*step_000001: "
                                  r"optimizer.safetensors: non-finite values in layers.0.weight.m"):
        open_checkpoints(tmp_path, resume=True)


def _fsync_fails_on(monkeypatch, nth: int):
    """The nth fsync of atomic_write raises ENOSPC, as a full disk does."""
    import mlx_oisd.io as io

    calls, real = [0], io.os.fsync

    def fsync(fd):
        calls[0] += 1
        if calls[0] == nth:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(io.os, "fsync", fsync)


def _mlx_write_fails(monkeypatch, when: str):
    """mx.save_safetensors writes part of the file, then fails as MLX does on a full disk."""
    real = mx.save_safetensors

    def save(path, arrays, metadata=None):
        if when not in str(path):
            return real(path, arrays) if metadata is None else real(path, arrays, metadata=metadata)
        Path(path).write_bytes(b"\0" * 1000)
        raise RuntimeError("[write] Unable to write 3647 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", save)


@pytest.mark.parametrize("fault, failed", [
    (("fsync", 1), "checkpoints/step_000002/adapters.safetensors"),
    (("fsync", 4), "checkpoints/step_000002/state.json"),
    (("fsync", 6), "checkpoints/step_000002/manifest.json"),
    (("mlx", ".optimizer.safetensors"), "checkpoints/step_000002/optimizer.safetensors"),
])
def test_enospc_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fault, failed):
    model, opt = _toy()
    _save(tmp_path, 1, model, opt)
    before = _files(tmp_path)
    _toy_update(model, opt)
    kind, arg = fault
    if kind == "fsync":
        _fsync_fails_on(monkeypatch, arg)
    else:
        _mlx_write_fails(monkeypatch, arg)
    with pytest.raises(DiskFullError) as e:
        _save(tmp_path, 2, model, opt)
    assert e.value.errno == errno.ENOSPC
    message = str(e.value)
    assert message.startswith(f"disk full: could not write {tmp_path / failed} (")
    assert "MiB free on its disk; checkpoint step_000002 not written, step_000001 is intact" in message
    assert _files(tmp_path) == before and _temps(tmp_path) == []
    monkeypatch.undo()
    read_checkpoint(tmp_path / "checkpoints" / "step_000001")


def test_enospc_writing_adapters_after_the_checkpoint(tmp_path, monkeypatch):
    """The checkpoint is complete when adapters/ is written: it stays, and verifies."""
    model, opt = _toy()
    _save(tmp_path, 1, model, opt)
    _fsync_fails_on(monkeypatch, 8)  # 6 checkpoint files, latest, then adapters/adapters.safetensors
    with pytest.raises(DiskFullError, match=r"could not write .*/adapters/adapters.safetensors"):
        _save(tmp_path, 2, model, opt)
    monkeypatch.undo()
    assert _temps(tmp_path) == []
    assert read_checkpoint(tmp_path / "checkpoints" / "step_000002").state["step"] == 2


@pytest.fixture
def tmpfs(tmp_path):
    """A real 256 KiB file system (needs root and mount); skipped where that is not possible."""
    where = tmp_path / "small"
    where.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
                              capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        done = None
    if done is None or done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False, timeout=10)


def test_a_really_full_disk(tmpfs):
    model, opt = _toy(width=96)  # ~37 KiB per weight file: one checkpoint fits, two do not
    _save(tmpfs, 1, model, opt)
    before = _files(tmpfs)
    _toy_update(model, opt)
    with pytest.raises(DiskFullError, match=r"disk full: could not write .*step_000002/.* MiB free "
                       r"on its disk; checkpoint step_000002 not written, step_000001 is intact"):
        _save(tmpfs, 2, model, opt)
    assert _files(tmpfs) == before and _temps(tmpfs) == []
    read_checkpoint(tmpfs / "checkpoints" / "step_000001")


# ---- one writer ----

HOLD = """
import sys, time
from mlx_oisd.runlock import RunLock
lock = RunLock(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[1])
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        with pytest.raises(RunLockedError, match=rf"in use by another training run \(PID {proc.pid},"):
            RunLock(out)
        result = runner.invoke(app, ["train", str(_config(tmp_path, max_steps=1)), "--quiet"])
        assert result.exit_code == 2, result.output
        assert f"in use by another training run (PID {proc.pid}" in result.output
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        proc.kill()
        proc.wait()
    assert (out / ".lock").read_text().strip() == str(proc.pid)  # the dead holder's PID is left
    _train(_config(tmp_path, max_steps=1))  # the kernel dropped the dead process's lock
    with RunLock(out):  # and the finished run released its own
        with pytest.raises(RunLockedError):
            RunLock(out)
    RunLock(out).release()


# ---- end to end through `oisd-mlx train` ----

def _config(tmp_path, data_dir=None, **over):
    """tests/test_trainer.py's tiny run, checkpointed every step; `data_dir` holds train.jsonl."""
    cfg = {"rewards": [{"name": "test_checkpoint:parity_reward"}, {"name": "format", "weight": 0.1}],
           "save_every": 1, "minibatch_size": None, **over}
    return trainer_config(tmp_path, data_dir, f"cfg-{uuid.uuid4().hex[:6]}.yaml", **cfg)


def _train(*args, exit_code=0):
    result = runner.invoke(app, ["train", *map(str, args), "--quiet"])
    assert result.exit_code == exit_code, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted 3-step run, checkpointed at steps 1, 2 and 3."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_OISD_CACHE", str(root / "cache"))
        _train(_config(root))
    return root / "run"


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run in this test's folder, and the config that resumes it."""
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run", _config(tmp_path, data_dir=trained.parent)


def _adapters(out: Path) -> dict:
    return {k: np.asarray(v) for k, v in mx.load(str(out / "adapters" / "adapters.safetensors")).items()}


def _same_adapters(a: Path, b: Path):
    wa, wb = _adapters(a), _adapters(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def _flip_a_tensor_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    data[8 + header + 5] ^= 0x10  # inside the first tensor's data, past the JSON header
    path.write_bytes(bytes(data))


def test_corrupt_checkpoint_byte_falls_back_to_the_previous_one(run, trained):
    out, cfg = run
    _flip_a_tensor_byte(out / "checkpoints" / "step_000003" / "adapters.safetensors")
    result = _train(cfg, "--resume")
    assert "step_000003: adapters.safetensors: sha256" in result.output
    assert "(the file changed after it was written)" in result.output
    assert "resuming from step_000002" in result.output
    _same_adapters(out, trained)  # step 3 redone from step 2: the uninterrupted result
    read_checkpoint(out / "checkpoints" / "step_000003")  # rewritten, valid again


def test_missing_state_json_falls_back_to_the_previous_one(run, trained):
    out, cfg = run
    (out / "checkpoints" / "step_000003" / "state.json").unlink()
    result = _train(cfg, "--resume")
    assert "step_000003: state.json: missing (listed in manifest.json)" in result.output
    assert "resuming from step_000002" in result.output
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] \
        == [1, 2, 3]
    _same_adapters(out, trained)


def test_dangling_latest_resumes_from_the_newest_folder(run, trained):
    out, cfg = run
    shutil.rmtree(out / "checkpoints" / "step_000003")  # latest still names it
    result = _train(cfg, "--resume")
    assert "latest names step_000003, which does not exist" in result.output
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert [p.name for p in step_folders(out)] == ["step_000003", "step_000002", "step_000001"]
    _same_adapters(out, trained)


def test_latest_naming_another_runs_checkpoint_is_ignored(run, trained, tmp_path):
    out, cfg = run
    shutil.rmtree(out / "checkpoints" / "step_000003")
    other = trained / "checkpoints" / "step_000003"
    before = _files(trained)
    for pointer in (os.path.relpath(other, out / "checkpoints"), str(other)):
        (out / "checkpoints" / "latest").write_text(pointer + "\n")
        assert read_checkpoint(out / "checkpoints" / pointer)  # a valid checkpoint, of another run
        with _stderr() as err:
            ckpt = open_checkpoints(out, resume=True)
        assert ckpt.path == out / "checkpoints" / "step_000002"
        assert f"holds {pointer!r}, not a step_NNNNNN folder name of this run; ignored" in err.text
    result = _train(cfg, "--resume")  # continues from its own step 2 and redoes step 3
    assert "not a step_NNNNNN folder name" in result.output
    _same_adapters(out, trained)
    assert _files(trained) == before


class _stderr:
    """Collect what checkpoint.warn prints."""

    def __enter__(self):
        import io

        self._old, sys.stderr = sys.stderr, io.StringIO()
        return self

    def __exit__(self, *exc):
        self.text = sys.stderr.getvalue()
        sys.stderr = self._old


def test_no_valid_checkpoint_stops_with_a_message(run):
    out, cfg = run
    for folder in step_folders(out):
        with open(folder / "adapters.safetensors", "r+b") as f:
            f.truncate(40)
    before = _files(out)
    result = _train(cfg, "--resume", exit_code=2)
    assert f"--resume: no valid checkpoint in {out / 'checkpoints'}" in result.output
    for step in (1, 2, 3):
        assert f"step_00000{step}: adapters.safetensors: 40 bytes, manifest.json says" in result.output
    assert "refusing to start over from step 0" in result.output
    assert _files(out) == before  # nothing retrained, nothing pruned


def test_overwrite_guard_with_latest_deleted(run):
    out, cfg = run
    (out / "checkpoints" / "latest").unlink()
    before = _files(out)
    result = _train(cfg, exit_code=2)
    assert "already holds checkpoints (step_000003); pass --resume" in result.output
    assert _files(out) == before


def test_temp_files_of_an_interrupted_save_are_removed_at_start(run):
    out, cfg = run
    leftovers = [out / "checkpoints" / ".tmp-step_000004" / "adapters.safetensors",
                 out / "checkpoints" / ".latest.k2j4h1x9", out / ".metrics.jsonl.abcd1234.jsonl",
                 out / "adapters" / ".adapters.safetensors.q9w8e7r6.safetensors",
                 out / ".config.yaml.zz11yy22.yaml"]
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\0" * 4096)
    (out / "notes.txt").write_text("not ours to remove")
    result = _train(cfg, "--resume")  # step 3 is the last step: nothing left to train
    assert "removed 5 leftover temp file(s) of an interrupted write" in result.output
    assert not any(p.exists() for p in leftovers) and _temps(out) == []
    assert (out / "notes.txt").is_file() and not (out / "checkpoints" / ".tmp-step_000004").exists()


def test_disk_full_during_training_then_resume(run, trained, monkeypatch):
    """A full disk while appending to metrics.jsonl, then while saving step 3's checkpoint: one
    message each, exit 2, step 2 intact, no temp left; once space is freed, --resume ends where
    the uninterrupted run ends."""
    import mlx_oisd.io as io

    out, cfg = run
    shutil.rmtree(out / "checkpoints" / "step_000003")  # resume from step 2, redo step 3
    real_open = open

    def full_open(path, mode="r", *a, **k):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(io, "open", full_open, raising=False)
    result = _train(cfg, "--resume", exit_code=2)
    assert f"error: disk full: could not write {out / 'metrics.jsonl'} (" in result.output
    assert "MiB free on its disk. Free some space and rerun" in result.output
    monkeypatch.undo()

    _mlx_write_fails(monkeypatch, "step_000003")
    result = _train(cfg, "--resume", exit_code=2)
    assert f"error: disk full: could not write {out / 'checkpoints' / 'step_000003'}" in result.output
    assert "[write] Unable to write 3647 bytes to file.)" in result.output
    assert "step_000002 is intact. Free some space and rerun (with --resume" in result.output
    assert [p.name for p in step_folders(out)] == ["step_000002", "step_000001"] and _temps(out) == []
    read_checkpoint(out / "checkpoints" / "step_000002")
    monkeypatch.undo()

    _train(cfg, "--resume")
    _same_adapters(out, trained)
