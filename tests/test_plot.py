"""plot.py and `oisd-mlx plot`: curves of one or several runs in one PNG."""

import json

from typer.testing import CliRunner

from cli.main import app
from mlx_oisd.plot import plot_metrics


def _metrics(path, rewards):
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({"step": i + 1, "reward": r, "js_logit": 0.1 / (i + 1)}) + "\n"
                            for i, r in enumerate(rewards)) + '{"step": 9, "rew')  # torn last line
    return path


def test_two_runs_one_png(tmp_path):
    a = _metrics(tmp_path / "grpo" / "metrics.jsonl", [0.1, 0.2, 0.4])
    b = _metrics(tmp_path / "oisd" / "metrics.jsonl", [0.1, 0.3, 0.5])
    out = plot_metrics([a, b], tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = CliRunner().invoke(app, ["plot", str(a), str(b), "--out", str(tmp_path / "d.png"),
                                      "--label", "grpo", "--label", "oisd"])
    assert result.exit_code == 0 and (tmp_path / "d.png").stat().st_size > 1000


def test_bad_plot_input_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 2 and "no such metrics file" in result.output
    empty = tmp_path / "e" / "metrics.jsonl"
    empty.parent.mkdir()
    empty.write_text('{"step": 1, "other": 3}\n')
    result = CliRunner().invoke(app, ["plot", str(empty)])
    assert result.exit_code == 2 and "none of reward" in result.output
