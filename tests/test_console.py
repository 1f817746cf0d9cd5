"""console.py and MetricsWriter: what a run prints when piped, banner, progress lines, stamps."""

import io
import re
from pathlib import Path

from test_trainer import _config, _two_prompts
from typer.testing import CliRunner

from cli.main import app
from mlx_oisd.config import validate
from mlx_oisd.console import (
    REPEAT_ERROR_EVERY,
    Console,
    banner_lines,
    duration,
    model_summary,
    progress_line,
    progress_mode,
    step_report,
)
from mlx_oisd.metrics import MetricsWriter, read_metrics

runner = CliRunner()
PROGRESS = re.compile(r"^step (\d+)/(\d+) \| reward ")


def nan_on_32_batched(prompts, completions, answer, **kwargs):
    """TRL's signature: NaN (an error) on the problem whose answer is 32, else 1.0 for the
    question "What is 1 + 2?" (so the prompts must be the questions)."""
    return [float("nan") if a == "32" else float(p.startswith("What is 1 "))
            for p, a in zip(prompts, answer, strict=True)]


def _progress_steps(output: str) -> list[int]:
    return [int(m.group(1)) for line in output.splitlines() if (m := PROGRESS.match(line))]


def test_piped_run_prints_banner_one_line_per_n_steps_and_evals_without_carriage_returns(
        tmp_path):
    (tmp_path / "test.jsonl").write_text('{"q": "What is 1 + 1?", "a": 2}\n')
    cfg = _config(tmp_path, max_steps=5, logging_steps=2, save_every=0, eval_split="test",
                  eval_samples=1, dataset={"source": str(tmp_path / "train.jsonl"),
                                           "eval_source": str(tmp_path / "test.jsonl"),
                                           "prompt_field": "q", "answer_field": "a"})
    result = runner.invoke(app, ["train", str(cfg)])  # CliRunner's streams are not terminals
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = result.output
    assert "\r" not in out
    assert _progress_steps(out) == [2, 4, 5]  # every 2 steps, and the last one
    lines = out.splitlines()
    assert "model:      builtin:tiny -> " in out and "B x G = 2 x 3 = 6 completions" in out
    assert f"output_dir: {tmp_path / 'run'}" in lines
    assert "algorithm:  oisd: student layers [1], lambda_logit 1.0, lambda_attn 0.1" in out
    assert f"18 train rows; 1 eval rows (Avg@1) from {tmp_path / 'test.jsonl'}" in out
    evals = [i for i, line in enumerate(lines) if line.startswith("eval step ")]
    assert [lines[i].split(":")[0] for i in evals] == ["eval step 0/5", "eval step 5/5"]
    banner = lines.index(f"output_dir: {tmp_path / 'run'}")
    first_step = next(i for i, line in enumerate(lines) if PROGRESS.match(line))
    assert banner < evals[0] < first_step < evals[1]
    for key in ("js_logit", "js_attn", "kl", "entropy", "clip", "tok/s", "mem", "elapsed", "eta"):
        assert f" | {key} " in lines[first_step], key

    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    stamps = [r["timestamp"] for r in records]
    elapsed = [r["elapsed_s"] for r in records]
    assert all(a < b for a, b in zip(stamps, stamps[1:]))
    assert all(0 <= a < b for a, b in zip(elapsed, elapsed[1:]))
    assert abs((stamps[-1] - stamps[0]) - (elapsed[-1] - elapsed[0])) < 1e-3


def test_quiet_keeps_banner_and_warnings_and_shows_a_batched_rewards_first_error(tmp_path):
    name = "test_console:nan_on_32_batched"
    cfg = _config(tmp_path, max_steps=2, logging_steps=1, dataset=_two_prompts(tmp_path),
                  rewards=[{"name": name}])
    result = runner.invoke(app, ["train", str(cfg), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert _progress_steps(result.output) == []
    assert f"output_dir: {tmp_path / 'run'}" in result.output
    message = "ValueError: reward returned nan, not a finite float32"
    assert f"step 1: rewards scored 0 ({name}: 3 errors, first {message})" in result.output
    assert f"step 2: rewards scored 0 ({name}: 3 errors (3 ValueError))" in result.output
    for record in read_metrics(tmp_path / "run" / "metrics.jsonl"):
        assert record[f"reward_errors/{name}"] == 3 and record[f"reward_timeouts/{name}"] == 0
        assert record[f"reward/{name}"] == 0.5 and record["reward_first_error"] == {name: message}


def test_train_help_shows_flags_without_a_value():
    result = runner.invoke(app, ["train", "--help"], terminal_width=100)
    for flag in ("--quiet", "--resume"):
        line = next(line for line in result.output.splitlines() if flag in line)
        assert "<bool>" not in line, line


def test_progress_mode():
    assert progress_mode(True, None, 200, tty=True) == ("bar", 0)
    assert progress_mode(True, None, 200, tty=False) == ("lines", 4)
    assert progress_mode(True, None, 30, tty=False) == ("lines", 1)
    assert progress_mode(True, 7, 200, tty=True) == ("lines", 7)
    assert progress_mode(False, 7, 200, tty=False) == ("quiet", 0)


def test_progress_line_averages_the_window_and_takes_the_peak_memory():
    window = [
        {"step": 9, "reward": 0.2, "reward_std": 0.1, "kl": 0.01, "clip_low_frac": 0.01,
         "clip_high_frac": 0.02, "tokens_per_sec": 100.0, "peak_memory_gb": 3.0},
        {"step": 10, "reward": 0.6, "reward_std": 0.3, "kl": 0.03, "clip_low_frac": 0.0,
         "clip_high_frac": 0.04, "tokens_per_sec": 300.0, "peak_memory_gb": 2.5,
         "elapsed_s": 3725.0},
    ]
    line = progress_line(window, 200, eta_s=59.6)
    assert line == ("step 10/200 | reward 0.400 std 0.200 | kl 0.02 | clip 0.035 | tok/s 200 | "
                    "mem 3.00 GB | elapsed 1:02:05 | eta 0:01:00")
    assert duration(0.4) == "0:00:00" and duration(86399) == "23:59:59"


def test_console_lines_and_eta_follow_the_records():
    stream = io.StringIO()
    console = Console(total_steps=6, start_step=2, logging_steps=2, stream=stream)
    for step in (3, 4, 5, 6):  # resumed after step 2; each step takes 10 s
        console.record({"step": step, "reward": 1.0, "timestamp": 100.0 + 10 * (step - 2),
                        "step_time": 10.0})
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 4/6", "step 6/6"]
    assert lines[0].endswith("eta 0:00:20") and lines[1].endswith("eta 0:00:00")


def test_metrics_writer_stamps_every_record_and_nulls_non_finite(tmp_path):
    stream = io.StringIO()
    writer = MetricsWriter(tmp_path / "m.jsonl", 3, console=Console(3, show=False, stream=stream))
    writer.write({"step": 0, "eval_accuracy": 0.25}, advance=False)
    written = writer.write({"step": 1, "reward": float("nan")})
    writer.close()
    a, b = read_metrics(tmp_path / "m.jsonl")
    assert written == b  # what a tracker hooked on write() sees is what the file holds
    assert b["reward"] is None and 0 <= a["elapsed_s"] <= b["elapsed_s"] < 60
    assert abs((b["timestamp"] - a["timestamp"]) - (b["elapsed_s"] - a["elapsed_s"])) < 1e-6
    assert stream.getvalue() == "eval step 0/3: eval_accuracy 0.2500\n"  # quiet: evals still


def test_step_report_repeats_a_message_once_per_window_but_always_counts():
    shown = {}
    reports = []
    for step in range(1, 2 * REPEAT_ERROR_EVERY + 2):
        record = {"step": step, "nonfinite": False, "reward_timeouts/r": 0,
                  "reward_error_types": {"r": {"KeyError": 2}},
                  "reward_first_error": {"r": "KeyError: 'answer'"}}
        reports.append(step_report(record, 0, shown))
    full = [i + 1 for i, lines in enumerate(reports) if "first KeyError: 'answer'" in lines[0]]
    assert full == [1, 1 + REPEAT_ERROR_EVERY, 1 + 2 * REPEAT_ERROR_EVERY]
    assert reports[1] == ["step 2: rewards scored 0 (r: 2 errors (2 KeyError))"]
    other = step_report({**record, "step": 22, "reward_first_error": {"r": "KeyError: 'x'"}}, 0,
                        shown)
    assert "first KeyError: 'x'" in other[0]  # a new message shows at once


def test_banner_names_the_resume_point_and_full_fine_tuning():
    cfg = validate({"model": "x", "dataset": {"source": "d.jsonl"}, "lora": None,
                    "algorithm": "grpo", "max_steps": 10, "output_dir": "o"})
    lines = banner_lines(cfg, Path("/m/x"), ("bfloat16", 2_000_000_000, 2_000_000_000), 100, 0, 4)
    assert "model:      x -> /m/x (bfloat16)" in lines
    assert "parameters: 2.00B total, 2.00B trainable (100.00%), full fine-tuning" in lines
    assert "data:       d.jsonl (train): 100 train rows; no evaluation" in lines
    assert "algorithm:  grpo" in lines and "output_dir: o" in lines
    assert "start:      resuming after step 4 (6 steps to go)" in lines


def test_model_summary_counts_quantized_weights_as_the_weights_they_hold(tiny_dir):
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_oisd import load

    model, _ = load(tiny_dir)
    plain = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert model_summary(model) == ("float32", plain, plain)
    nn.quantize(model, group_size=32, bits=8)
    model.freeze()
    dtype, total, trainable = model_summary(model)
    assert dtype == "float32, quantized" and total == plain and trainable == 0
