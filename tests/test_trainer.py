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
    """A user reward that raises on the group whose answer is 32 (scored 0 and counted)."""
    if answer == "32":
        raise ZeroDivisionError("boom")
    return 1.0


def parity_reward(completion, answer):
    """Rewards that differ within a group, so even a random model gets a gradient."""
    return float(len(completion) % 2)


def hanging_reward(completion, answer):
    """Never returns on the group of the prompt whose answer is 32 (run in a killable worker)."""
    if answer == "32":
        import time

        time.sleep(3600)
    return 1.0


def huge_reward(completion, answer):
    """A finite double that is inf in float32: scored 0 and counted, never trained on."""
    return 1e300 if answer == "32" else 1.0


def nan_reward(completion, answer):
    return float("nan") if answer == "3" else 0.0


def _two_prompts(tmp_path):
    """A dataset of two problems (answers 32 and 3): a step of batch_size 2 holds both."""
    data = tmp_path / "two.jsonl"
    data.write_text('{"q": "What is 10 + 22?", "a": 32}\n{"q": "What is 1 + 2?", "a": 3}\n')
    return {"source": str(data), "prompt_field": "q", "answer_field": "a"}


def _config(tmp_path, data_dir=None, name="cfg.yaml", **over):
    """A 3-step tiny run's config file in `tmp_path`; `data_dir` holds train.jsonl (default:
    tmp_path), written when absent."""
    data = (data_dir or tmp_path) / "train.jsonl"
    if not data.is_file():
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
    path = tmp_path / name
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
    cfg = _config(tmp_path, max_steps=1, dataset=_two_prompts(tmp_path),
                  rewards=[{"name": "format", "weight": 1.0},
                           {"name": "test_trainer:failing_reward"}])
    result = _train(cfg)
    (record,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert record["reward_errors/test_trainer:failing_reward"] == 3
    assert record["reward/test_trainer:failing_reward"] == 0.5
    assert ("step 1: rewards scored 0 (test_trainer:failing_reward: 3 errors, first "
            "ZeroDivisionError: boom)") in result.output


def test_a_hanging_reward_times_out_scores_zero_and_the_run_goes_on(tmp_path):
    cfg = _config(tmp_path, max_steps=1, reward_timeout=0.3, num_generations=2,
                  dataset=_two_prompts(tmp_path), rewards=[{"name": "test_trainer:hanging_reward"}])
    result = _train(cfg)
    (record,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert record["reward_timeouts/test_trainer:hanging_reward"] == 2
    assert "step 1: rewards scored 0 (test_trainer:hanging_reward: 2 timed out)" in result.output
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


def _all_finite(path):
    return all(bool(mx.isfinite(v).all()) for v in mx.load(str(path)).values())


def test_rewards_not_finite_in_float32_are_errors_and_are_shown(tmp_path):
    huge, nan = "test_trainer:huge_reward", "test_trainer:nan_reward"
    result = _train(_config(tmp_path, max_steps=1, dataset=_two_prompts(tmp_path),
                            rewards=[{"name": huge}, {"name": nan}, {"name": "format"}]))
    (record,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert record[f"reward_errors/{huge}"] == record[f"reward_errors/{nan}"] == 3
    assert record["reward"] == 0.5 and record["nonfinite"] is False and record["nonfinite_steps"] == 0
    assert (f"step 1: rewards scored 0 ({huge}: 3 errors, first ValueError: reward returned "
            f"1e+300, not a finite float32; {nan}: 3 errors, first ValueError: reward returned "
            "nan, not a finite float32)") in result.output
    assert _all_finite(tmp_path / "run" / "adapters" / "adapters.safetensors")


def test_exploding_learning_rate_skips_updates_then_stops_keeping_the_good_checkpoint(
        tmp_path, monkeypatch):
    """From the third update on the step size is 1e30: every such update is undone (weights and
    AdamW state), counted, and after 3 in a row the run stops with exit 1; the step-2 checkpoint
    stays the newest and nothing saved holds a NaN or an inf."""
    from mlx_oisd import trainer

    monkeypatch.setattr(trainer, "lr_schedule",
                        lambda cfg: (lambda step: mx.where(step < 2, 1e-3, 1e30)))
    result = _train(_config(tmp_path, max_steps=8), exit_code=1)
    out = tmp_path / "run"
    records = read_metrics(out / "metrics.jsonl")
    flags = [r["nonfinite"] for r in records]
    last = records[-1]["step"]
    assert flags[:2] == [False, False] and flags[-3:] == [True, True, True] and last < 8
    assert [r["nonfinite_steps"] for r in records][-3:] == [sum(flags) - 2, sum(flags) - 1, sum(flags)]
    assert (f"3 steps in a row had non-finite loss or gradients (last at step {last}); stopped, "
            "the last good checkpoint is step 2; lower learning_rate") in result.output
    assert f"step {last}: non-finite loss or gradients, update skipped (3 in a row" in result.output
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    for path in [out / "adapters" / "adapters.safetensors", *out.glob("checkpoints/step_*/*.safetensors")]:
        assert _all_finite(path), path
    good = mx.load(str(out / "checkpoints" / "step_000002" / "adapters.safetensors"))
    now = mx.load(str(out / "adapters" / "adapters.safetensors"))
    assert all(bool(mx.array_equal(good[k], now[k])) for k in good)


@pytest.mark.parametrize("skip", [False, True])
def test_learning_rate_1e30_stops_the_run_and_saves_nothing_non_finite(tmp_path, skip):
    """The first update blows the adapters up; the next steps' rollouts are garbage with equal
    rewards. Computing their rows, the loss is NaN; skipping them (A = 0), the stand-in row's
    gradient is still NaN: either way the updates are undone and the run stops."""
    result = _train(_config(tmp_path, max_steps=6, learning_rate=1e30,
                            skip_zero_advantage=skip), exit_code=1)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["nonfinite"] for r in records][-3:] == [True, True, True]
    assert records[-1]["nonfinite_steps"] >= 3 and records[-1]["grad_norm"] is None
    assert (records[-1]["loss"] is None) != skip
    assert (f"3 steps in a row had non-finite loss or gradients (last at step {records[-1]['step']}); "
            "stopped,") in result.output
    for path in (tmp_path / "run").rglob("*.safetensors"):
        assert _all_finite(path), path


def test_a_nonfinite_update_leaves_parameters_and_optimizer_state_untouched(make_tiny):
    """update() with a step size that turns the weights into inf (finite loss and gradients):
    the parameters and every AdamW array, its step count included, are those from before."""
    import mlx.optimizers as optim

    from mlx_oisd import load
    from mlx_oisd.config import validate
    from mlx_oisd.objective import ObjectiveGrad
    from mlx_oisd.rollout import Rollout, pack
    from mlx_oisd.trainer import loss_spec, update

    model, _ = load(make_tiny(init_std=0.1))
    cfg = validate({"model": "x", "dataset": {"source": "x.jsonl"}, "lora": None,
                    "max_completion_length": 4, "oisd": {"student_layers": [2]}})
    batch = pack(Rollout([[5, 6, 7]], [[10, 11, 2], [12]], [False, True], 2), pad_id=0)
    adv = mx.array([1.0, -1.0])
    opt = optim.AdamW(learning_rate=lambda step: mx.where(step < 1, 1e-3, float("inf")))
    grad_fn = ObjectiveGrad(model, False)
    args = (model, opt, grad_fn, batch, adv, loss_spec(cfg), cfg)
    assert update(*args)["nonfinite"] is False
    params, state = dict(tree_flatten(model.parameters())), dict(tree_flatten(opt.state))
    for _ in range(2):
        stats = update(*args)
        assert stats["nonfinite"] is True and np.isfinite(stats["grad_norm"])
        assert dict(tree_flatten(opt.state)).keys() == state.keys()
        for k, v in tree_flatten(opt.state):
            assert bool(mx.array_equal(v, state[k])), k
        for k, v in tree_flatten(model.parameters()):
            assert bool(mx.array_equal(v, params[k])), k
    assert int(opt.state["step"]) == 1
    nan_adv = update(model, opt, grad_fn, batch, mx.array([float("nan"), 1.0]), loss_spec(cfg), cfg)
    assert nan_adv["nonfinite"] is True and int(opt.state["step"]) == 1


def test_sigint_saves_the_finished_step_and_resume_continues(tmp_path):
    """A real `oisd-mlx train` process: SIGINT once step 1 is logged finishes the step in
    progress, saves it, says so and exits 130; `--resume` continues from there to the end."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    cfg = _config(tmp_path, max_steps=200, save_every=0, rewards=[{"name": "format"}])
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "train", str(cfg), "--quiet"],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and read_metrics(metrics)) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    step = read_metrics(metrics)[-1]["step"]
    assert proc.returncode == 130, out + err
    assert f"interrupted at step {step}; saved checkpoint step {step}; continue with --resume" in err
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == f"step_{step:06d}"
    result = _train(cfg, "--resume", "--set", f"max_steps={step + 2}")
    assert f"--resume: max_steps changed 200 -> {step + 2}" in result.output
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, step + 3))


def test_resume_refuses_a_config_that_changes_the_run(tmp_path):
    cfg = _config(tmp_path, max_steps=2)
    _train(cfg)
    result = runner.invoke(app, ["train", str(cfg), "--resume", "--quiet", "--set", "lora.rank=8",
                                 "--set", "lora.num_layers=2", "--set", "max_steps=3"])
    assert result.exit_code == 2
    assert ("--resume: the config differs from the checkpoint's in keys that change the run: "
            "lora.num_layers -1 -> 2, lora.rank 4 -> 8; start a new output_dir or restore them"
            in result.output), result.output
    result = _train(cfg, "--resume", "--set", "max_steps=3", "--set", "learning_rate=5e-4")
    assert "--resume: learning_rate changed 0.001 -> 0.0005" in result.output
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


def test_a_restart_before_the_first_checkpoint_starts_fresh_metrics(tmp_path, monkeypatch):
    """Killed at step 2 before any checkpoint (step 0 eval and step 1 logged): the restart
    runs the step-0 eval again, and metrics.jsonl holds each step once."""
    from mlx_oisd import trainer

    data = {"source": str(tmp_path / "train.jsonl"), "prompt_field": "q", "answer_field": "a",
            "eval_source": str(tmp_path / "train.jsonl")}  # a local file is one split
    cfg = _config(tmp_path, max_steps=2, save_every=0, eval_samples=2, dataset=data)
    real_step = trainer.train_step

    def killed_at_2(run, step):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(run, step)

    monkeypatch.setattr(trainer, "train_step", killed_at_2)
    _train(cfg, exit_code=130)
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert [r["step"] for r in read_metrics(metrics)] == [0, 1]
    monkeypatch.setattr(trainer, "train_step", real_step)
    _train(cfg, "--resume")
    assert [r["step"] for r in read_metrics(metrics)] == [0, 1, 2]


def _with_huge_prompt(tmp_path):
    data = tmp_path / "huge.jsonl"
    rows = [{"q": "What is 1 + 2?", "a": 3}, {"q": "What is 2 + 2?", "a": 4},
            {"q": "What is 3 + 3? " * 70_000, "a": 6}]  # about 1 MB, 1M tokens
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"source": str(data), "prompt_field": "q", "answer_field": "a"}


def test_a_1mb_prompt_is_dropped_and_reported(tmp_path):
    result = _train(_config(tmp_path, max_steps=1, dataset=_with_huge_prompt(tmp_path)))
    assert "dropped 1 of 3 prompts longer than max_prompt_length=512 tokens (rows 3)" in result.output
    (record,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert record["step"] == 1


def test_a_1mb_prompt_is_truncated_with_truncate_prompts(tmp_path):
    result = _train(_config(tmp_path, max_steps=1, batch_size=3, truncate_prompts=True,
                            max_prompt_length=256, dataset=_with_huge_prompt(tmp_path)))
    assert "truncated 1 of 3 prompts longer than max_prompt_length=256 tokens (rows 3;" in result.output
    (record,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert record["step"] == 1


def test_prompt_and_completion_lengths_must_fit_the_model(tmp_path):
    result = runner.invoke(app, ["train", str(_config(tmp_path)), "--set", "max_prompt_length=4000",
                                 "--set", "max_completion_length=200", "--quiet"])
    assert result.exit_code == 2
    assert ("max_prompt_length (4000) + max_completion_length (200) exceeds builtin:tiny's "
            "max_position_embeddings (4096)") in result.output
    short = _config(tmp_path, max_prompt_length=5)
    result = runner.invoke(app, ["train", str(short), "--quiet"])
    assert result.exit_code == 2 and "all 18 prompts are longer than max_prompt_length=5" in result.output


def test_a_script_calling_train_without_main_guard_is_told_the_fix(tmp_path):
    """The reward worker (spawn) re-imports the main script; unguarded, that script would start
    training again inside the worker. It exits at once there, and the script gets the fix."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cfg = _config(tmp_path, max_steps=1)
    script = tmp_path / "my_run.py"
    script.write_text("from mlx_oisd.config import load_config\nfrom mlx_oisd.trainer import train\n"
                      f"train(load_config({str(cfg)!r}), show_progress=False)\n")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": f"{root}:{root / 'tests'}"})
    assert result.returncode != 0
    assert "exited while starting (exit code 1)" in result.stderr, result.stderr[-3000:]
    assert f"{script} starts training when it is imported" in result.stderr
    assert 'put the call under if __name__ == "__main__":' in result.stderr
    assert "RunLocked" not in result.stderr  # the worker stopped before touching output_dir


def test_loss_spec_carries_the_method_options():
    """GSPO's own clip range replaces epsilon / epsilon_high at sequence level; bupo.lens_norm
    and oisd.head_grad reach the objective."""
    from mlx_oisd.config import validate
    from mlx_oisd.trainer import loss_spec

    base = {"model": "x", "dataset": {"source": "x.jsonl"}}
    token = loss_spec(validate(base))
    assert (token.importance_sampling_level, token.epsilon, token.epsilon_high) == ("token", 0.2, 0.28)
    assert token.head_grad and not token.bupo_lens_norm  # BuPO's code reads h^l without the norm
    seq = loss_spec(validate({**base, "importance_sampling_level": "sequence",
                              "sequence_epsilon": 1e-3, "bupo": {"lens_norm": True},
                              "oisd": {"head_grad": False}}))
    assert (seq.importance_sampling_level, seq.epsilon, seq.epsilon_high) == ("sequence", 1e-3, 4e-4)
    assert seq.bupo_lens_norm and not seq.head_grad


def test_a_gspo_run_trains(tmp_path):
    _train(_config(tmp_path, importance_sampling_level="sequence", max_steps=2,
                   loss_agg="seq_mean_token_mean"))
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert all(r["ratio_mean"] == 1.0 and np.isfinite(r["loss"]) for r in records)
    assert "lens_agree/l1" in records[-1] and 0 <= records[-1]["lens_agree/l1"] <= 1
