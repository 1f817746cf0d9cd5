"""plot.py and `oisd-mlx plot`: curves of one or several runs in one PNG."""

import json

import pytest
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


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _grpo_and_oisd(tmp_path):
    """A GRPO run without js_logit and with kl all zero, an OISD run with js_logit."""
    grpo = [{"step": s, "reward": 0.1 * s, "kl": 0.0, "js_attn": None} for s in range(1, 6)]
    oisd = [{"step": s, "reward": 0.12 * s, "kl": 0.0, "js_logit": 1.0 / s} for s in range(1, 6)]
    return (_write(tmp_path / "grpo" / "metrics.jsonl", grpo),
            _write(tmp_path / "oisd" / "metrics.jsonl", oisd))


def _lines(ax):
    return [line for line in ax.get_lines() if len(line.get_xdata())]


def test_one_colour_per_run_figure_legend_and_hidden_panels(tmp_path):
    from mlx_oisd.metrics import read_metrics
    from mlx_oisd.plot import COLORS, build_figure

    runs = [read_metrics(p) for p in _grpo_and_oisd(tmp_path)]
    fig = build_figure(runs, ["grpo", "oisd"])
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(panels) == {"reward", "js_logit"}  # kl all zero, js_attn all None: hidden
    assert [line.get_color() for line in _lines(panels["reward"])] == [COLORS[0], COLORS[1]]
    # js_logit: only the OISD run, still in the second run's colour
    assert [line.get_color() for line in _lines(panels["js_logit"])] == [COLORS[1]]
    assert all(ax.get_legend() is None for ax in fig.axes)
    assert len(fig.legends) == 1
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["grpo", "oisd"]
    assert [h.get_color() for h in legend.legend_handles] == [COLORS[0], COLORS[1]]
    fig.draw_without_rendering()  # lays out: the legend lies outside (below) every panel
    box = legend.get_window_extent()
    assert all(box.y1 <= ax.get_window_extent().y0 for ax in panels.values())


def test_all_zero_keys_are_still_shown_when_nothing_else_is(tmp_path):
    from mlx_oisd.plot import build_figure

    fig = build_figure([[{"step": 1, "reward": 0.0, "kl": 0.0}]], ["a"])
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["reward", "kl"]
    five = {"step": 1, "reward": 1.0, "kl": 1.0, "entropy": 1.0, "grad_norm": 1.0, "js_logit": 1.0}
    fig = build_figure([[five]], ["a"])  # 3 + 2 panels, the sixth slot hidden
    assert [ax.get_visible() for ax in fig.axes] == [True] * 5 + [False]


def test_ema_smoothing_against_hand_computed_values(tmp_path):
    from mlx_oisd.plot import build_figure, ema

    assert ema([1.0, 0.0, 1.0], 0.5) == pytest.approx([1.0, 0.5, 0.75])
    records = [{"step": 1, "reward": 1.0, "eval_accuracy": 0.2},
               {"step": 2, "reward": None}, {"step": 3, "reward": 0.0},
               {"step": 4, "reward": 2.0, "eval_accuracy": 0.6}]
    fig = build_figure([records], ["r"], smooth=0.9)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    raw, smoothed = _lines(panels["reward"])
    assert list(raw.get_xdata()) == [1, 3, 4] and raw.get_alpha() < 0.5
    # s1 = 1, s2 = 0.9 * 1 + 0.1 * 0 = 0.9, s3 = 0.9 * 0.9 + 0.1 * 2 = 1.01
    assert list(smoothed.get_ydata()) == pytest.approx([1.0, 0.9, 1.01])
    (acc,) = _lines(panels["eval_accuracy"])  # never smoothed: one line, the raw values
    assert list(acc.get_ydata()) == [0.2, 0.6]
    with pytest.raises(ValueError, match=r"expected a factor in \[0, 1\)"):
        build_figure([records], ["r"], smooth=1.0)


def test_cli_accepts_run_folders_and_smooth(tmp_path):
    grpo, oisd = _grpo_and_oisd(tmp_path)
    out = tmp_path / "cmp.png"
    result = CliRunner().invoke(app, ["plot", str(grpo.parent), str(oisd), "--smooth", "0.9",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "folder without metrics.jsonl" in result.output
    result = CliRunner().invoke(app, ["plot", str(grpo), "--smooth", "1.5"])
    assert result.exit_code == 2 and "--smooth 1.5" in result.output


def test_labels_default_to_run_folder_and_disambiguate(tmp_path):
    from mlx_oisd.plot import run_labels

    assert run_labels([tmp_path / "grpo" / "metrics.jsonl", tmp_path / "oisd" / "m.jsonl"]) == [
        "grpo", "oisd"]
    assert run_labels([tmp_path / "a" / "x" / "metrics.jsonl",
                       tmp_path / "b" / "x" / "metrics.jsonl"]) == ["a/x", "b/x"]
