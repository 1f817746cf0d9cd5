"""study.py and scripts/study.py: the study model's data and a smoke run of the study."""

import json
import subprocess
import sys
from pathlib import Path

from mlx_oisd import load
from mlx_oisd.data import load_examples
from mlx_oisd.demo import EMPTY_THINK, chat_rows
from mlx_oisd.rewards import math_reward
from mlx_oisd.study import SPEC, STUDY_TASK, build_study_arith, worked_answer

ROOT = Path(__file__).resolve().parent.parent


def test_worked_answer_is_a_running_sum():
    assert worked_answer("What is 3 + 5 + 8?") == "3+5=8, 8+8=16, "
    assert worked_answer("What is 9 + 9?") == "9+9=18, "


def test_warm_up_rows_are_right_and_boxed_or_sloppy():
    examples = load_examples(STUDY_TASK, "train")
    rows = chat_rows(examples, 0.3, worked=lambda ex: worked_answer(ex.prompt))
    answers = [r["messages"][-1]["content"] for r in rows]
    assert all(a.startswith(EMPTY_THINK) for a in answers)
    boxed = [math_reward(a, ex.answer) for a, ex in zip(answers, examples) if "\\boxed{" in a]
    assert boxed and all(b == 1.0 for b in boxed)  # the teacher's sums are right
    assert 0.2 < 1 - len(boxed) / len(rows) < 0.4  # about SLOPPY of them unboxed
    assert all(a.rstrip("}").endswith(ex.answer) for a, ex in zip(answers, examples))


def test_the_study_model_builds_with_six_blocks(tmp_path):
    path = build_study_arith(tmp_path / "m", {"iters": 2, "batch_size": 4,
                                              "learning_rate": 1e-3, "seed": 0})
    model, _ = load(path)
    assert model.args.num_hidden_layers == SPEC.num_layers == 6


def test_the_study_script_runs_and_writes_its_tables(tmp_path):
    """Two variants, one seed, one step each on builtin:tiny: the tables, the JSON and the
    figure are written, and finished runs are not trained again."""
    out = tmp_path / "study.md"
    args = [sys.executable, str(ROOT / "scripts" / "study.py"), "--runs", str(tmp_path / "runs"),
            "--variants", "grpo", "oisd", "--seeds", "0", "--out", str(out)]
    for key in ("model=builtin:tiny", "max_steps=1", "eval_samples=3", "batch_size=2",
                "num_generations=2", "max_completion_length=4", "eval_k=1"):
        args += ["--set", key]
    for _ in range(2):
        done = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert "| grpo |" in text and "| oisd |" in text and "agree@2" in text
    results = json.loads(out.with_suffix(".json").read_text())
    assert set(results) == {"grpo", "oisd"} and 0 <= results["oisd"]["0"]["agree"] <= 1
    assert out.with_suffix(".png").stat().st_size > 0
    assert sum(1 for _ in (tmp_path / "runs").glob("*/study_time.json")) == 2
