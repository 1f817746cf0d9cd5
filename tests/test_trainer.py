"""trainer.py through `oisd-mlx train`: a few steps on a tiny model, checkpoints, resume, errors."""

import json

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from cli.main import app
from mlx_oisd.metrics import read_metrics

runner = CliRunner()


def failing_reward(completion, answer):
    """A user reward that raises on every item (scored 0 and counted)."""
    raise ZeroDivisionError("boom")


def parity_reward(completion, answer):
    """Rewards that differ within a group, so even a random model gets a gradient."""
    return float(len(completion) % 2)


def hanging_reward(completion, answer):
    """Never returns on the group of the prompt whose answer is 32 (run in a killable worker)."""
    if answer == "32":
        import time

        time.sleep(3600)
    return 1.0


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
        "rewards": [{"name": "test_trainer:parity_reward"}, {"name": "format", "weight": 0.1}],
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
    """Killed at step 4 (steps 1-3 logged, last checkpoint at step 2), `--resume` redoes step 3
    with the same data position and ends with the adapters an uninterrupted run has."""
    from mlx_oisd import trainer

    whole = tmp_path / "whole"
    whole.mkdir()
    _train(_config(whole, max_steps=4))

    cut = tmp_path / "cut"
    cut.mkdir()
    cfg = _config(cut, max_steps=4)
    real_step = trainer.train_step

    def killed_at_4(run, step):
        if step == 4:
            raise KeyboardInterrupt  # as Ctrl-C or a kill signal would, mid-run
        return real_step(run, step)

    monkeypatch.setattr(trainer, "train_step", killed_at_4)
    _train(cfg, exit_code=130)  # click's exit status for an interrupt
    assert [r["step"] for r in read_metrics(cut / "run" / "metrics.jsonl")] == [1, 2, 3]
    assert (cut / "run" / "checkpoints" / "latest").read_text().strip() == "step_000002"
    monkeypatch.setattr(trainer, "train_step", real_step)
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
    moved = mx.load(str(whole / "run" / "checkpoints" / "step_000002" / "adapters.safetensors"))
    assert any(float(mx.abs(wa[k] - moved[k]).max()) > 1e-6 for k in wa)  # steps 3-4 trained
    for k in wa:
        np.testing.assert_allclose(np.asarray(wa[k]), np.asarray(wb[k]), atol=1e-6)


def test_a_raising_reward_scores_zero_and_is_counted(tmp_path):
    cfg = _config(tmp_path, max_steps=1, rewards=[{"name": "format", "weight": 1.0},
                                                  {"name": "test_trainer:failing_reward"}])
    _train(cfg)
    (record,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert record["rewards/errors/test_trainer:failing_reward"] == 6
    assert record["reward/test_trainer:failing_reward"] == 0.0


def test_a_hanging_reward_times_out_scores_zero_and_the_run_goes_on(tmp_path):
    data = tmp_path / "two.jsonl"
    data.write_text('{"q": "What is 10 + 22?", "a": 32}\n{"q": "What is 1 + 2?", "a": 3}\n')
    cfg = _config(tmp_path, max_steps=1, reward_timeout=0.3, num_generations=2,
                  dataset={"source": str(data), "prompt_field": "q", "answer_field": "a"},
                  rewards=[{"name": "test_trainer:hanging_reward"}])
    _train(cfg)
    (record,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert record["rewards/timeouts/test_trainer:hanging_reward"] == 2
    assert record["reward"] == 0.5  # the other prompt's two completions scored 1


def test_full_fine_tuning_and_qlora_run(tmp_path):
    for name, over in (("full", {"lora": None}), ("qlora", {"quantize": {"bits": 8, "group_size": 32}})):
        _train(_config(tmp_path, max_steps=1, output_dir=str(tmp_path / name), **over))
        weights = mx.load(str(tmp_path / name / "adapters" / "adapters.safetensors"))
        config = json.loads((tmp_path / name / "adapters" / "adapter_config.json").read_text())
        if name == "full":  # every weight, the head included, is saved and trained
            assert config["fine_tune_type"] == "full" and "model.embed_tokens.weight" in weights
        else:
            assert config["fine_tune_type"] == "lora" and all("lora_" in k for k in weights)


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


def test_mlx_lm_fuse_accepts_the_adapters(tmp_path):
    """`mlx_lm fuse` reads our adapter folder; the fused model equals base + adapters."""
    import subprocess
    import sys

    from mlx_oisd import load

    _train(_config(tmp_path, max_steps=1))
    base = tmp_path / "cache" / "models" / "tiny"
    fused = tmp_path / "fused"
    subprocess.run([sys.executable, "-m", "mlx_lm", "fuse", "--model", str(base), "--adapter-path",
                    str(tmp_path / "run" / "adapters"), "--save-path", str(fused)],
                   check=True, capture_output=True)
    ids = mx.array([[1, 5, 9, 13, 2]])
    with_adapter, _ = load(base, adapter_path=tmp_path / "run" / "adapters")
    plain, _ = load(base)
    fused_model, _ = load(fused)
    np.testing.assert_allclose(np.asarray(fused_model(ids)), np.asarray(with_adapter(ids)), atol=1e-4)
    assert float(mx.abs(with_adapter(ids) - plain(ids)).max()) > 1e-4  # training moved it


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_add_up_to_the_full_batch(make_tiny, loss_agg):
    """One SGD update from micro-batches of 2 or 3 (which splits a group's shared prompt)
    equals one from the whole batch (full fine-tuning)."""
    import mlx.optimizers as optim

    from mlx_oisd import load
    from mlx_oisd.config import validate
    from mlx_oisd.objective import ObjectiveGrad
    from mlx_oisd.rollout import Rollout, pack
    from mlx_oisd.trainer import loss_spec, update

    folder = make_tiny(init_std=0.1, tie_word_embeddings=False)
    rollout = Rollout([[5, 6, 7], [8, 9]], [[10, 11, 2], [12], [13, 14, 15, 16], [17, 2]],
                      [False, True, True, False], 2)
    batch = pack(rollout, pad_id=0)
    adv = mx.array([1.0, -1.0, 0.5, -0.5])
    params = []
    for size in (None, 2, 3):
        cfg = validate({"model": "x", "dataset": {"source": "x.jsonl"}, "lora": None,
                        "max_grad_norm": 0.0, "loss_agg": loss_agg, "minibatch_size": size,
                        "max_completion_length": 4, "oisd": {"student_layers": [2]}})
        model, _ = load(folder)
        grad_fn = ObjectiveGrad(model, compile=size == 2)  # compiled and eager agree too
        stats = update(model, optim.SGD(learning_rate=1.0), grad_fn, batch, adv, loss_spec(cfg), cfg)
        params.append(dict(tree_flatten(model.parameters())))
        assert stats["ratio_mean"] == 1.0
    for other in params[1:]:
        for k, v in params[0].items():
            np.testing.assert_allclose(np.asarray(other[k]), np.asarray(v), atol=2e-6, err_msg=k)


def test_lr_schedule_warmup_then_cosine():
    from mlx_oisd.config import validate
    from mlx_oisd.trainer import lr_schedule

    cfg = validate({"model": "x", "dataset": {"source": "x.jsonl"}, "learning_rate": 1e-3,
                    "max_steps": 10, "warmup_steps": 2, "lr_scheduler_type": "cosine"})
    lr = lr_schedule(cfg)
    values = [float(lr(mx.array(s))) for s in range(11)]
    np.testing.assert_allclose(values[:3], [0.0, 5e-4, 1e-3], rtol=1e-5)
    np.testing.assert_allclose(values[6], 1e-3 * 0.5 * (1 + np.cos(np.pi * 4 / 8)), rtol=1e-4)
    assert values[10] < 1e-6


def test_filter_zero_std_groups(tmp_path):
    """Groups whose rewards are all equal are dropped; a step where every group is flat skips the
    update instead of failing."""
    _train(_config(tmp_path, max_steps=1, filter_zero_std_groups=True, output_dir=str(tmp_path / "a")))
    flat = _config(tmp_path, max_steps=1, filter_zero_std_groups=True, output_dir=str(tmp_path / "b"),
                   rewards=[{"name": "format"}])  # a random model never formats: all groups flat
    _train(flat)
    (record,) = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert record["frac_zero_std_groups"] == 1.0 and "loss" not in record
