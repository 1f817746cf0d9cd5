"""samples.py: a run's completions.jsonl (`log_completions`), its resume trim, the file of
`oisd-mlx eval --save-samples`, and `oisd-mlx lens --completions` reading both."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from mlx_oisd.data.sources import Example
from mlx_oisd.lens import read_completions
from mlx_oisd.metrics import read_metrics
from mlx_oisd.rewards import math_reward
from mlx_oisd.samples import CompletionsLog, read_rows, step_rows

runner = CliRunner()
G = 3  # num_generations of the run below
PARITY_WEIGHT = 0.5
SMALL = {"num_layers": 2, "hidden_size": 32, "intermediate_size": 64, "head_dim": 8}


def parity_reward(completion, answer):
    """Differs within a group, so the advantages are not all zero."""
    return float(len(completion) % 2)


def _grpo_reference(r: np.ndarray) -> np.ndarray:
    """(r - mean) / (std + 1e-6) within the group, std with ddof=1; 0 for equal rewards."""
    if r.max() == r.min():
        return np.zeros_like(r)
    return (r - r.mean()) / (r.std(ddof=1) + 1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_tiny):
    """A 4-step tiny run logging both groups of every step, killed at step 4 after its step-2
    checkpoint (steps 1-3 logged), then resumed: returns (run folder, rows before the resume)."""
    from mlx_oisd import trainer

    root = tmp_path_factory.mktemp("samples")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"q": f"What is {a} + {b}?", "a": a + b}) + "\n"
                            for a in range(10, 13) for b in range(20, 23)))
    cfg = {
        "model": str(make_tiny(**SMALL)), "output_dir": str(root / "run"),
        "dataset": {"source": str(data), "prompt_field": "q", "answer_field": "a"},
        "algorithm": "grpo", "max_steps": 4, "batch_size": 2, "num_generations": G,
        "max_completion_length": 6, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
        "lora": {"rank": 2, "scale": 10.0},
        "rewards": [{"name": "math"},
                    {"name": "test_samples:parity_reward", "weight": PARITY_WEIGHT}],
        "save_every": 2, "log_completions": 2,
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    real_step = trainer.train_step

    def killed_at_4(run, step):
        if step == 4:
            raise KeyboardInterrupt
        return real_step(run, step)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_OISD_CACHE", str(root / "cache"))
        mp.setattr(trainer, "train_step", killed_at_4)
        result = runner.invoke(app, ["train", str(path), "--quiet"])
        assert result.exit_code == 130, result.output
        before = read_rows(root / "run" / "completions.jsonl")
        mp.setattr(trainer, "train_step", real_step)
        result = runner.invoke(app, ["train", str(path), "--quiet", "--resume"])
        assert result.exit_code == 0, result.output
    return root / "run", before


def test_logged_rows_are_the_steps_rollouts_with_their_rewards_and_advantages(trained):
    out, _ = trained
    rows = read_rows(out / "completions.jsonl")
    records = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert [r["step"] for r in rows] == [s for s in (1, 2, 3, 4) for _ in range(2 * G)]
    for step in (1, 2, 3, 4):
        mine = [r for r in rows if r["step"] == step]
        assert [r["group"] for r in mine] == [0] * G + [1] * G
        for r in mine:
            assert r["reward/math"] == math_reward(r["completion"], r["answer"])
            assert r["reward/test_samples:parity_reward"] == parity_reward(r["completion"], "")
            assert r["reward"] == pytest.approx(
                r["reward/math"] + PARITY_WEIGHT * r["reward/test_samples:parity_reward"])
            assert 1 <= r["length"] <= 6 and (r["length"] == 6 or not r["truncated"])
            a, b = map(int, re.findall(r"\d+", r["prompt"]))
            assert r["prompt"] == f"What is {a} + {b}?" and r["answer"] == str(a + b)
        for g in (0, 1):
            group = mine[g * G:(g + 1) * G]
            assert len({r["prompt"] for r in group}) == 1
            np.testing.assert_allclose([r["advantage"] for r in group],
                                       _grpo_reference(np.array([r["reward"] for r in group])),
                                       rtol=1e-5, atol=1e-6)
        # the step's whole batch: the metrics record's aggregates of these very rows
        record = records[step]
        assert np.mean([r["reward"] for r in mine]) == pytest.approx(record["reward"], rel=1e-6)
        assert np.mean([r["length"] for r in mine]) == record["completion_len_mean"]
        assert max(r["length"] for r in mine) == record["completion_len_max"]
        assert np.mean([r["truncated"] for r in mine]) == record["truncated_frac"]
    assert any(r["advantage"] != 0 for r in rows)  # the parity reward gives a signal


def test_resume_drops_the_rows_after_the_checkpoint(trained):
    out, before = trained
    assert [r["step"] for r in before] == [s for s in (1, 2, 3) for _ in range(2 * G)]
    after = read_rows(out / "completions.jsonl")
    assert after[:4 * G] == before[:4 * G]  # steps 1-2 kept as they were
    # step 3 was sampled again from the same checkpoint and seed: the same completions, once
    assert [r for r in after if r["step"] == 3] == [r for r in before if r["step"] == 3]


def test_step_rows_keep_the_first_groups_in_rollout_order():
    examples = [Example(f"q{g}", str(g)) for g in range(3)]
    rollout = SimpleNamespace(group_size=2, completions=[[1] * (i + 1) for i in range(6)],
                              truncated=[i == 5 for i in range(6)])
    texts = [f"c{i}" for i in range(6)]
    rewards = np.arange(6, dtype=np.float32)
    rows = step_rows(7, examples, texts, rewards, {"math": rewards / 10}, -rewards, rollout, 2)
    assert [(r["group"], r["prompt"], r["answer"], r["completion"]) for r in rows] == [
        (0, "q0", "0", "c0"), (0, "q0", "0", "c1"), (1, "q1", "1", "c2"), (1, "q1", "1", "c3")]
    assert [r["length"] for r in rows] == [1, 2, 3, 4] and {r["step"] for r in rows} == {7}
    assert [r["advantage"] for r in rows] == [0, -1, -2, -3]
    assert rows[3]["reward/math"] == pytest.approx(0.3) and not any(r["truncated"] for r in rows)
    assert len(step_rows(7, examples, texts, rewards, {}, rewards, rollout, 5)) == 6
    assert step_rows(7, examples, texts, rewards, {}, rewards, rollout, 0) == []


def test_completions_log_trims_a_torn_file_and_a_fresh_start_removes_it(tmp_path):
    path = tmp_path / "completions.jsonl"
    path.write_text("".join(json.dumps({"step": s, "prompt": "q", "completion": "c"}) + "\n"
                            for s in (1, 1, 2, 3)) + '{"step": 4, "pro')  # killed mid-write
    log = CompletionsLog(path, start_step=2)
    assert [r["step"] for r in read_rows(path)] == [1, 1, 2]
    log.write([{"step": 3, "prompt": "q", "completion": "c2"}])
    log.write([])
    assert [r["step"] for r in read_rows(path)] == [1, 1, 2, 3]
    CompletionsLog(path, start_step=0)
    assert not path.exists()


def test_eval_save_samples_and_lens_reads_both_files(trained, make_tiny, tmp_path):
    out, _ = trained
    model_dir = make_tiny(**SMALL)
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"q": f"What is {i}+1?", "a": i + 1}) + "\n"
                            for i in range(3)))
    saved, results = tmp_path / "samples.jsonl", tmp_path / "res.json"
    result = runner.invoke(app, [
        "eval", str(model_dir), "--data", str(data), "--prompt-field", "q", "--answer-field", "a",
        "-k", "2", "--max-tokens", "4", "--batch-size", "4", "--out", str(results),
        "--save-samples", str(saved)])
    assert result.exit_code == 0, result.output
    rows = read_rows(saved)
    assert [(r["benchmark"], r["problem"], r["sample"]) for r in rows] == [
        ("sums", p, j) for p in range(3) for j in range(2)]
    assert [r["prompt"] for r in rows[::2]] == [f"What is {i}+1?" for i in range(3)]
    assert [r["answer"] for r in rows[::2]] == ["1", "2", "3"]
    for r in rows:
        assert r["correct"] == (math_reward(r["completion"], r["answer"]) == 1.0)
        assert 1 <= r["length"] <= 4 and isinstance(r["truncated"], bool)
    counts = json.loads(results.read_text())["benchmarks"]["sums"]["correct_counts"]
    assert counts == [sum(r["correct"] for r in rows if r["problem"] == p) for p in range(3)]

    for path, n in ((saved, 6), (out / "completions.jsonl", 8 * G)):
        assert len(read_completions(path)) == n
        report = tmp_path / f"lens-{path.stem}.json"
        result = runner.invoke(app, ["lens", str(model_dir), "--completions", str(path),
                                     "--json", str(report)])
        assert result.exit_code == 0, result.output
        stats = json.loads(report.read_text())["runs"]["base"]
        assert stats["layers"] == [1, 2] and stats["positions"] > 0
