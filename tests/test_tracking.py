"""tracking.py: scalars, config and completions reach wandb (offline) and TensorBoard, read back
with their own formats; resume continues them; a missing library is one message; report_to []
imports neither."""

import json
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from mlx_oisd.metrics import read_metrics
from mlx_oisd.tracking import Tracker, markdown_table, scalars

runner = CliRunner()
RECORDS = [{"step": s, "reward": 0.25 * s, "reward/math": float(s % 2), "nonfinite": False,
            "completion_len_max": 5 + s, "kl": float("nan"), "timestamp": 1.8e9,
            "reward_error_types": {"math": {"ValueError": 1}}} for s in (1, 2, 3)]
ROWS = [{"step": 3, "group": 0, "prompt": "What is 1|2?", "completion": "line 1\nline 2",
         "answer": "3", "reward/math": 1.0, "reward": 1.0, "advantage": 0.5, "truncated": False,
         "length": 4}]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb offline, every folder it writes under tmp_path: no network, no user files."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_DIR", "wandb-dir"), ("WANDB_CONFIG_DIR", "wandb-config"),
                     ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_DATA_DIR", "wandb-data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


def wandb_records(run_dir):
    """(kind, record) of each protobuf Record in a run's .wandb file: a LevelDB-style log (a
    7-byte file header, 32 KiB blocks of chunks `crc:4 length:2 type:1 data`, type 1 a whole
    record, 2/3/4 its first/middle/last part), read independently of wandb's own code."""
    (path,) = run_dir.glob("run-*.wandb")
    for _ in range(100):  # wandb-core may still be writing after finish() returns
        records = _records(path.read_bytes())
        if records and records[-1][0] == "exit":
            return records
        time.sleep(0.1)
    raise AssertionError(f"{path}: no exit record, got {[k for k, _ in records]}")


def _records(data: bytes) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + n > len(data):  # a chunk still being written
            break
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append((record.WhichOneof("record_type"), record))
            buf = b""
    return out


def wandb_history(run_dir) -> dict[int, dict]:
    """step -> {key: value} of the scalars logged to a wandb run."""
    hist = {}
    for kind, rec in wandb_records(run_dir):
        if kind == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                   for i in rec.history.item}
            hist[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
    return hist


def wandb_run(run_dir):
    return next(rec.run for kind, rec in wandb_records(run_dir) if kind == "run")


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_texts(folder) -> dict[str, list[tuple[int, str]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


def test_scalars_keep_finite_numbers_only():
    assert scalars(RECORDS[0]) == {"reward": 0.25, "reward/math": 1.0, "nonfinite": 0.0,
                                   "completion_len_max": 6.0}


def test_markdown_table_escapes_pipes_and_newlines():
    assert markdown_table(ROWS, ["prompt", "completion", "reward"]).splitlines() == [
        "| prompt | completion | reward |", "|---|---|---|",
        "| What is 1\\|2? | line 1<br>line 2 | 1 |"]


def test_tensorboard_scalars_text_and_resume(tmp_path):
    pytest.importorskip("tensorboardX")
    pytest.importorskip("tensorboard")
    tracker = Tracker.open(["tensorboard"], tmp_path, {"seed": 3, "oisd": {"tau": 0.5}})
    for r in RECORDS:
        tracker.log(r, r["step"])
    tracker.log_samples(ROWS, 3)
    tracker.close()
    # resumed from the step-2 checkpoint: step 3 again (other values), then step 4
    tracker = Tracker.open(["tensorboard"], tmp_path, {"seed": 3}, start_step=2)
    tracker.log({"reward": 7.0}, 3)
    tracker.log({"reward": 8.0}, 4)
    tracker.close()
    got = tensorboard_scalars(tmp_path / "tensorboard")
    assert got["reward"] == [(1, 0.25), (2, 0.5), (3, 7.0), (4, 8.0)]  # stopped run's 3 purged
    assert got["reward/math"] == [(1, 1.0), (2, 0.0)] and got["completion_len_max"][0] == (1, 6.0)
    assert "kl" not in got and "timestamp" not in got and "step" not in got
    texts = tensorboard_texts(tmp_path / "tensorboard")
    assert yaml.safe_load(textwrap.dedent(texts["config/text_summary"][0][1])) == {
        "seed": 3, "oisd": {"tau": 0.5}}
    (step, table), = texts["completions/text_summary"]
    assert step == 3 and "| What is 1\\|2? | line 1<br>line 2 | 3 | 1 | 1 | 0.5 | 4 |" in table


def test_wandb_offline_run_holds_config_scalars_table_and_resumes_the_same_run(
        tmp_path, offline_wandb):
    tracker = Tracker.open(["wandb"], tmp_path / "out", {"seed": 3, "oisd": {"tau": 0.5}},
                           run_name="my-run")
    for r in RECORDS:
        tracker.log(r, r["step"])
    tracker.log_samples(ROWS, 3)
    tracker.close()
    (first,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    run = wandb_run(first)
    assert run.display_name == "my-run" and run.project == "mlx-oisd"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["seed"] == 3 and config["oisd"] == {"tau": 0.5}
    hist = wandb_history(first)
    assert sorted(hist) == [1, 2, 3]
    for r in RECORDS:
        assert {k: hist[r["step"]][k] for k in scalars(r)} == scalars(r)
        assert "kl" not in hist[r["step"]] and "reward_error_types" not in hist[r["step"]]
    assert hist[3]["completions/_type"] == "table-file"
    (table,) = (first / "files" / "media" / "table").glob("completions_3_*.table.json")
    table = json.loads(table.read_text())
    assert table["data"][0][table["columns"].index("completion")] == "line 1\nline 2"

    run_id = (tmp_path / "out" / "wandb" / "run_id").read_text().strip()
    assert run.run_id == run_id
    tracker = Tracker.open(["wandb"], tmp_path / "out", {"seed": 3}, start_step=2)
    tracker.log({"reward": 9.0}, 4)
    tracker.close()
    second = next(p for p in (tmp_path / "out" / "wandb").glob("offline-run-*") if p != first)
    assert wandb_run(second).run_id == run_id and wandb_history(second) == {4: {"reward": 9.0}}
    # a fresh start (step 0) is a new run
    Tracker.open(["wandb"], tmp_path / "out", {}, start_step=0).close()
    assert (tmp_path / "out" / "wandb" / "run_id").read_text().strip() != run_id


def _config(tmp_path, model, **over) -> str:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"q": f"What is {a} + 1?", "a": a + 1}) + "\n"
                            for a in range(4)))
    cfg = {"model": str(model), "output_dir": str(tmp_path / "run"),
           "dataset": {"source": str(data), "prompt_field": "q", "answer_field": "a"},
           "algorithm": "grpo", "max_steps": 2, "batch_size": 2, "num_generations": 2,
           "max_completion_length": 4, "lora": {"rank": 2}, "rewards": [{"name": "format"}],
           "save_every": 0, **over}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_a_training_run_reports_every_metric_to_both_trackers(tmp_path, make_tiny, offline_wandb):
    pytest.importorskip("tensorboardX")
    pytest.importorskip("tensorboard")
    model = make_tiny(num_layers=2, hidden_size=32, intermediate_size=64, head_dim=8)
    cfg = _config(tmp_path, model, log_completions=1, report_to=["wandb", "tensorboard"])
    result = runner.invoke(app, ["train", cfg, "--quiet"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "run"
    records = read_metrics(out / "metrics.jsonl")
    tb = tensorboard_scalars(out / "tensorboard")
    (wandb_dir,) = (out / "wandb").glob("offline-run-*")
    hist = wandb_history(wandb_dir)
    assert wandb_run(wandb_dir).display_name == "run"  # output_dir's name
    for r in records:
        values = scalars(r)
        values.pop("elapsed_s", None)  # metrics.jsonl's clock, added by MetricsWriter
        assert {"reward", "loss", "entropy", "lr"} <= set(values)
        for key, v in values.items():
            assert hist[r["step"]][key] == v, key
            assert (r["step"], pytest.approx(v, rel=1e-6, abs=1e-30)) in tb[key], key
        assert hist[r["step"]]["completions/nrows"] == 2  # one group of G = 2
    texts = tensorboard_texts(out / "tensorboard")
    assert [s for s, _ in texts["completions/text_summary"]] == [1, 2]


def test_a_missing_library_is_one_message_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec reports it as not installed
    cfg = _config(tmp_path, tmp_path / "no-such-model", report_to=["wandb"])
    result = runner.invoke(app, ["train", cfg, "--quiet"])
    assert result.exit_code == 2, result.output
    assert "report_to: wandb needs `pip install mlx-oisd[track]`" in result.output
    assert "no-such-model" not in result.output


def test_report_to_none_imports_no_tracking_library(tmp_path, make_tiny):
    """In a fresh process: tensorboardX and tensorboard are never loaded, and the run works with
    wandb unimportable (mlx-lm's tuner package tries `import wandb` itself and shrugs off an
    ImportError, so sys.modules cannot tell whether our code asked for it)."""
    model = make_tiny(num_layers=2, hidden_size=32, intermediate_size=64, head_dim=8)
    cfg = _config(tmp_path, model, max_steps=1, log_completions=1)
    script = (f"import sys\nsys.modules['wandb'] = None\nimport mlx_oisd\n"
              f"from mlx_oisd.config import load_config\nfrom mlx_oisd.trainer import train\n"
              f"train(load_config({cfg!r}), show_progress=False)\n"
              f"print(sorted(m for m in sys.modules if m.split('.')[0] in "
              f"('tensorboardX', 'tensorboard')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "run" / "completions.jsonl").is_file()
