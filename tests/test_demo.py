"""demo.py + configs/demo.yaml: the offline demo learns, end to end (about two minutes on 2 CPUs).

Seeds are fixed, so the run is deterministic on a given machine; the assertions are the issue's:
the warm-up model starts between 10% and 70% on held-out questions and RL ends strictly higher.
"""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from mlx_oisd.data import load_examples
from mlx_oisd.demo import DEMO_TASK, SLOPPY, chat_rows
from mlx_oisd.metrics import read_metrics

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """One build of builtin:tiny-arith (the warm-up) shared by the tests of this file."""
    return tmp_path_factory.mktemp("demo-cache")


def test_sloppy_teacher_rows():
    rows = chat_rows(load_examples(DEMO_TASK, "train"))
    answers = [r["messages"][-1]["content"] for r in rows]
    unboxed = sum("\\boxed{" not in a for a in answers) / len(answers)
    assert abs(unboxed - SLOPPY) < 0.15 and all(a.startswith("<think>\n\n</think>\n\n") for a in answers)
    assert rows == chat_rows(load_examples(DEMO_TASK, "train"))  # seeded


def test_demo_learns(demo_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_OISD_CACHE", str(demo_cache))
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["train", str(DEMO), "--quiet", "--set", f"output_dir={out}",
                                      "--set", "max_steps=40", "--set", "eval_every=0"])
    assert result.exit_code == 0, result.output
    evals = [r["eval_accuracy"] for r in read_metrics(out / "metrics.jsonl") if "eval_accuracy" in r]
    before, after = evals[0], evals[-1]
    assert 0.10 <= before <= 0.70, before
    assert after > before, (before, after)
    assert "eval_accuracy" in result.output and (out / "curves.png").stat().st_size > 0
    assert (demo_cache / "models" / "tiny-arith" / "config.json").is_file()  # cached for reuse


def test_grpo_runs_on_the_demo(demo_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_OISD_CACHE", str(demo_cache))
    result = CliRunner().invoke(app, ["train", str(DEMO), "--quiet", "--set", f"output_dir={tmp_path}",
                                      "--set", "algorithm=grpo", "--set", "max_steps=2",
                                      "--set", "eval_split=null"])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
