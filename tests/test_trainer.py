"""trainer.py through `oisd-mlx train`: a few steps on a tiny model, checkpoints, resume, errors."""

import json
import os

import mlx.core as mx
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from mlx_oisd.metrics import read_metrics

runner = CliRunner()
KILL_AFTER = "MLX_OISD_TEST_KILL_AFTER"  # reward calls before the simulated kill


def failing_reward(completion, answer):
    """A user reward that raises on every item (scored 0 and counted)."""
    raise ZeroDivisionError("boom")


def killing_reward(completion, answer):
    """Interrupts the run (as Ctrl-C or a kill would) after $MLX_OISD_TEST_KILL_AFTER calls."""
    left = int(os.environ.get(KILL_AFTER, "-1"))
    if left == 0:
        raise KeyboardInterrupt
    os.environ[KILL_AFTER] = str(left - 1)
    return 0.0


def _config(tmp_path, **over):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"q": f"What is {a} + {b}?", "a": a + b}) + "\n"
                            for a in range(10, 16) for b in range(20, 23)))
    cfg = {
        "model": "builtin:tiny", "output_dir": str(tmp_path / "run"),
        "dataset": {"source": str(data), "prompt_field": "q", "answer_field": "a"},
        "algorithm": "oisd", "max_steps": 3, "batch_size": 2, "num_generations": 3,
        "max_completion_length": 8, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
        "lora": {"rank": 4, "scale": 10.0, "dropout": 0.0, "num_layers": -1},
        "oisd": {"student_layers": [1], "lambda_logit": 1.0, "lambda_attn": 0.1},
        "rewards": [{"name": "format", "weight": 1.0},
                    {"name": "test_trainer:killing_reward", "weight": 0.0}],
        "save_every": 2, "seed": 0, "minibatch_size": 4,
    }
    cfg.update(over)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(*args, exit_code=0):
    result = runner.invoke(app, ["train", *map(str, args), "--quiet"])
    assert result.exit_code == exit_code, result.output + repr(result.exception)
    return result


def test_three_steps_write_metrics_checkpoints_and_an_mlx_lm_adapter(tmp_path):
    import mlx_lm

    _train(_config(tmp_path))
    out = tmp_path / "run"
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("reward", "reward_std", "reward/format", "frac_zero_std_groups",
                "completion_len_mean", "completion_len_max", "truncated_frac", "clip_low_frac",
                "clip_high_frac", "kl", "entropy", "js_logit", "js_attn", "grad_norm",
                "rollout_tokens_per_sec", "train_tokens_per_sec", "peak_memory_gb", "step_time"):
        assert key in records[0], key
    assert records[0]["ratio_mean"] == 1.0  # first inner iteration: old == current policy
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 3
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000003"
    model, tok = mlx_lm.load(str(tmp_path / "cache" / "models" / "tiny"), adapter_path=str(out / "adapters"))
    assert model(mx.array([[1, 2, 3]])).shape[-1] == model.args.vocab_size


def test_resume_after_a_kill_continues_exactly(tmp_path, monkeypatch):
    """Killed in step 3 (after the step-2 checkpoint), `--resume` continues at step 3 with the same
    data position and ends with the adapters an uninterrupted run has."""
    whole = tmp_path / "whole"
    whole.mkdir()
    _train(_config(whole, max_steps=4))

    cut = tmp_path / "cut"
    cut.mkdir()
    cfg = _config(cut, max_steps=4)
    monkeypatch.setenv(KILL_AFTER, str(2 * 6 + 3))  # 6 completions a step: dies inside step 3
    _train(cfg, exit_code=130)  # click's exit status for an interrupt
    assert (cut / "run" / "checkpoints" / "latest").read_text().strip() == "step_000002"
    monkeypatch.setenv(KILL_AFTER, "-1")
    _train(cfg, "--resume")

    a = read_metrics(whole / "run" / "metrics.jsonl")
    b = read_metrics(cut / "run" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["reward"] == rb["reward"] and ra["completion_len_mean"] == rb["completion_len_mean"]
    state = json.loads((cut / "run" / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["step"] == 4 and state["sampler"] == json.loads(
        (whole / "run" / "checkpoints" / "step_000004" / "state.json").read_text())["sampler"]
    wa = mx.load(str(whole / "run" / "adapters" / "adapters.safetensors"))
    wb = mx.load(str(cut / "run" / "adapters" / "adapters.safetensors"))
    for k in wa:
        np.testing.assert_allclose(np.asarray(wa[k]), np.asarray(wb[k]), atol=1e-6)


def test_a_raising_reward_scores_zero_and_is_counted(tmp_path):
    cfg = _config(tmp_path, max_steps=1, rewards=[{"name": "format", "weight": 1.0},
                                                  {"name": "test_trainer:failing_reward"}])
    _train(cfg)
    (record,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert record["rewards/errors/test_trainer:failing_reward"] == 6
    assert record["reward/test_trainer:failing_reward"] == 0.0


def test_grpo_and_bupo_run(tmp_path):
    for algorithm in ("grpo", "bupo"):
        _train(_config(tmp_path, max_steps=1, algorithm=algorithm, output_dir=str(tmp_path / algorithm),
                       bupo={"internal_steps": 1}, beta=0.05))
        (record,) = read_metrics(tmp_path / algorithm / "metrics.jsonl")
        assert ("js_logit" in record) is False and record["kl"] >= 0.0


@pytest.mark.parametrize("override, message", [
    (["--set", "oisd.lamda_logit=1"], "did you mean 'oisd.lambda_logit'"),
    (["--set", "oisd.student_layers=[4]"], "student blocks must be in 1..3"),
    (["--set", "dataset.answer_field=answer"], "has no field 'answer' (fields: q, a)"),
    (["--set", "rewards=[{name: nosuch}]"], "reward 'nosuch': expected one of"),
])
def test_bad_input_is_one_clear_message(tmp_path, override, message):
    result = runner.invoke(app, ["train", str(_config(tmp_path)), *override, "--quiet"])
    assert result.exit_code == 2 and message in result.output, result.output


def test_existing_run_needs_resume(tmp_path):
    cfg = _config(tmp_path, max_steps=1)
    _train(cfg)
    result = runner.invoke(app, ["train", str(cfg), "--quiet"])
    assert result.exit_code == 2 and "--resume" in result.output
