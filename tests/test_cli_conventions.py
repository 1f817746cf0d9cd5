"""Names TRL / PEFT / mlx-lm users bring: config hints, the generated config reference
(`train --print-config`, README's table), `-h`, and mlx-lm's flag spellings on every command."""

import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import mlx_oisd.evaluate
import mlx_oisd.export
import mlx_oisd.lens
import mlx_oisd.loading
import mlx_oisd.rewards
import mlx_oisd.sft
from cli.main import app
from mlx_oisd.config import (
    FOREIGN_KEYS,
    ConfigError,
    TrainConfig,
    _schema_paths,
    apply_overrides,
    validate,
)
from mlx_oisd.config_reference import format_reference, readme_block

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"
BASE = {"model": "builtin:tiny", "dataset": {"source": "builtin:arith"}}


def error_of(override: str) -> str:
    with pytest.raises(ConfigError) as info:
        validate(apply_overrides(BASE, [override]), "cfg.yaml")
    return str(info.value)


# ---- config: hints for foreign names ----

@pytest.mark.parametrize("override, hint", [
    ("per_device_train_batch_size=64", "did you mean 'batch_size'? prompts per step; TRL's "
     "per_device_train_batch_size counts completions = batch_size x num_generations"),
    ("loss_type=dr_grpo", "did you mean 'loss_agg'? TRL's \"grpo\" is seq_mean_token_mean, "
     "\"bnpo\" and \"dapo\" are token_mean, \"dr_grpo\" is seq_mean_token_sum_norm"),
    ("lora.r=8", "unknown key 'lora.r' in cfg.yaml (did you mean 'lora.rank'?"),
    ("lora_r=8", "unknown key 'lora_r' in cfg.yaml (did you mean 'lora.rank'?"),
    ("lora.alpha=16", "did you mean 'lora.scale'? scale = alpha / r"),
    ("lora.lora_alpha=16", "unknown key 'lora.lora_alpha' in cfg.yaml (did you mean 'lora.scale'?"),
    ("lora_alpha=16", "did you mean 'lora.scale'? scale = lora_alpha / r"),
    ("lora.lora_dropout=0.1", "did you mean 'lora.dropout'?"),
    ("target_modules=[q_proj]", "did you mean 'lora.keys'?"),
    ("save_steps=10", "unknown key 'save_steps' in cfg.yaml (did you mean 'save_every'?)"),
    ("eval_steps=10", "did you mean 'eval_every'?"),
    ("num_train_epochs=1", "did you mean 'max_steps'?"),
    ("gradient_accumulation_steps=4", "did you mean 'minibatch_size'?"),
    ("max_new_tokens=256", "did you mean 'max_completion_length'?"),
    ("kl_coef=0.04", "did you mean 'beta'?"),
    ("init_kl_coef=0.04", "did you mean 'beta'?"),
    ("cliprange=0.2", "did you mean 'epsilon'?"),
    ("iters=100", "did you mean 'max_steps'? mlx-lm's iters"),
])
def test_trl_peft_and_mlx_lm_names_get_our_key(override, hint):
    assert hint in error_of(override)


def test_foreign_names_map_to_real_keys_and_never_shadow_one():
    """Every hint names a key of the schema, and no foreign name is a key anywhere in it (such
    an entry would be dead: `foreign_hint` skips names the schema has; remove it)."""
    paths = set(_schema_paths(TrainConfig))
    names = {p.rsplit(".", 1)[-1] for p in paths}
    assert all(target in paths for target, _ in FOREIGN_KEYS.values())
    assert not [k for k in FOREIGN_KEYS if k in paths or ("." not in k and k in names)]
    assert "did you mean" not in error_of("dataset.xyzzy=1")


# ---- new keys ----

def test_sampling_warmup_and_checkpoint_limit_keys():
    cfg = validate(apply_overrides(BASE, ["top_k=20", "min_p=0.05", "warmup_ratio=0.1",
                                          "save_total_limit=null"]))
    assert (cfg.top_k, cfg.min_p, cfg.warmup_ratio, cfg.save_total_limit) == (20, 0.05, 0.1, None)
    assert validate(dict(BASE)).save_total_limit == 3
    with pytest.raises(ConfigError, match=r"'warmup_steps' \(5\) and 'warmup_ratio' \(0.1\)"):
        validate(apply_overrides(BASE, ["warmup_steps=5", "warmup_ratio=0.1"]))
    assert "'min_p' must be in [0, 1], got 1.5" in error_of("min_p=1.5")
    assert "'top_k' must be >= 0, got -1" in error_of("top_k=-1")
    assert "'save_total_limit' must be >= 1, got 0" in error_of("save_total_limit=0")


def test_warmup_ratio_schedule_by_hand():
    """max_steps 30, warmup_ratio 0.1 -> ceil(3.0) = 3 warmup steps (not the 4 of the float
    product 3.0000000000000004): lr 0, 1/3, 2/3 of the peak, then the peak and a linear decay
    to 0 over the remaining 27 steps."""
    from mlx_oisd.trainer import lr_schedule, num_warmup_steps

    cfg = validate(apply_overrides(BASE, ["max_steps=30", "warmup_ratio=0.1",
                                          "learning_rate=0.3", "lr_scheduler_type=linear"]))
    assert num_warmup_steps(cfg) == 3
    schedule = lr_schedule(cfg)
    lrs = [schedule(step).item() for step in range(31)]
    expected = [0.0, 0.1, 0.2] + [0.3 * (1 - i / 27) for i in range(28)]
    assert lrs == pytest.approx(expected, abs=1e-6)
    ratio_7 = validate(apply_overrides(BASE, ["max_steps=20", "warmup_ratio=0.33"]))
    assert num_warmup_steps(ratio_7) == 7  # ceil(6.6)


# ---- the generated reference ----

def _rows(text: str) -> dict[str, list[str]]:
    """`| `key` | type | default | meaning |` lines -> {key: [type, default, meaning]}."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_print_config_lists_every_key_with_a_meaning():
    """Every key of the schema (list elements as `rewards[].name`), each with a type, a default
    and a non-empty meaning: a field added without its `# comment` fails here."""
    result = runner.invoke(app, ["train", "--print-config"])
    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    keys = [p for p in _schema_paths(TrainConfig) if not p.endswith("[]")]
    assert sorted(rows) == sorted(keys)
    assert [k for k in keys if not rows[k][2]] == []
    assert rows["top_k"][:2] == ["int", "`0`"] and rows["save_total_limit"][1] == "`3`"
    assert rows["lora.rank"][:2] == ["int", "`16`"] and rows["model"][1] == "`required`"
    assert rows["minibatch_size"][0] == "int / auto / null"
    assert "untruncated" in rows["min_p"][2]  # comment lines below a field continue it


def test_train_without_config_is_a_usage_error():
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2 and "missing CONFIG" in result.output


def test_readme_holds_the_generated_reference():
    text = README.read_text()
    block = readme_block(format_reference())
    assert block in text, ("README.md's config table is stale: run "
                           "`python -m mlx_oisd.config_reference README.md`")
    for key in ("max_steps", "eval_split", "eval_samples", "eval_k", "eval_every"):
        assert f"`{key}`" in text.split(block)[0]  # among the most-used keys above the table


# ---- the command line: -h and mlx-lm's spellings ----

def test_dash_h_on_every_command():
    commands = typer.main.get_command(app).commands
    assert {"train", "eval", "lens", "sft", "export", "plan", "plot"} <= set(commands)
    for name in [None, *commands]:
        result = runner.invoke(app, ([name] if name else []) + ["-h"])
        assert result.exit_code == 0 and "Usage" in result.output, (name, result.output)
        assert "<bool>" not in result.output, (name, result.output)  # flags take no value


class Recorder:
    """Stands in for a library function: records its arguments, then returns `value` or raises
    ValueError('recorded') (which every command reports as `error: recorded`, exit 2)."""

    def __init__(self, value=None):
        self.calls, self.value = [], value

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.value is None:
            raise ValueError("recorded")
        return self.value


class NoChecker:
    """MathChecker's stand-in (no worker process); all of them compare equal."""

    def __init__(self, **kwargs):
        pass

    def __eq__(self, other):
        return isinstance(other, NoChecker)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "sums.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    return path


def test_eval_accepts_mlx_lm_flags(monkeypatch, data_file, tmp_path):
    """`--model M --adapter-path A --temp T` reaches the loader and the sampler exactly as
    `M --adapter A --temperature T`."""
    load = Recorder(("net", "tok"))
    bench = Recorder()
    monkeypatch.setattr(mlx_oisd.loading, "load", load)
    monkeypatch.setattr(mlx_oisd.evaluate, "evaluate_benchmarks", bench)
    monkeypatch.setattr(mlx_oisd.rewards, "MathChecker", NoChecker)
    common = ["--data", str(data_file), "-k", "1", "--top-k", "5", "--min-p", "0.1"]
    for argv in (["eval", "m1", "--adapter", str(tmp_path), "--temperature", "0.3"],
                 ["eval", "--model", "m1", "--adapter-path", str(tmp_path), "--temp", "0.3"]):
        result = runner.invoke(app, argv + common)
        assert result.exit_code == 2 and "error: recorded" in result.output, result.output
    assert load.calls[0] == load.calls[1] == ((("m1",), {"adapter_path": tmp_path}))
    (a1, k1), (a2, k2) = bench.calls
    assert a1 == a2 and a1[6] == 0.3 and k1.keys() == k2.keys()  # a1[6]: the temperature
    assert (k1["top_k"], k1["min_p"]) == (k2["top_k"], k2["min_p"]) == (5, 0.1)


def test_sample_correct_passes_top_k_and_min_p_only_when_set(monkeypatch):
    """The filters reach the sampler (training's eval and `oisd-mlx eval`); unset, the call is
    the plain `rollout.sample` signature."""
    from mlx_oisd.data.prompts import PromptFormat
    from mlx_oisd.data.sources import Example
    from mlx_oisd.evaluate import sample_correct
    from mlx_oisd.rollout import Rollout

    class Tok:
        eos_token_ids = {0}

        def decode(self, ids):
            return "\\boxed{2}"

    seen = []

    def sampler(model, prompts, n, max_tokens, stop_ids, temperature, top_p, **filters):
        seen.append(filters)
        return Rollout(list(prompts), [[5, 0]] * (len(prompts) * n), [False] * n, n)

    monkeypatch.setattr(PromptFormat, "render", lambda self, tok, question: [1, 2])
    for kwargs in ({}, {"top_k": 3}, {"top_k": 3, "min_p": 0.2}):
        correct, _ = sample_correct(None, Tok(), [Example("1+1?", "2")], 2, 4, 1.0, 1.0,
                                    sampler=sampler, **kwargs)
        assert correct.tolist() == [[1.0, 1.0]]
    assert seen == [{}, {"top_k": 3}, {"top_k": 3, "min_p": 0.2}]


@pytest.mark.parametrize("argv, message", [
    (["eval", "m1", "--model", "m2"], "MODEL given twice, as 'm1' and --model 'm2'"),
    (["eval"], "missing MODEL: give it as the first argument or with --model"),
    (["lens", "--prompt", "hi"], "missing MODEL"),
    (["sft", "--out", "x"], "missing MODEL"),
    (["sft", "--model", "m1", "--out", "x"], "missing DATA"),
    (["export", "--format", "mlx", "--out", "x"], "missing ADAPTER_DIR"),
])
def test_model_given_twice_or_not_at_all(argv, message, data_file):
    result = runner.invoke(app, argv + (["--data", str(data_file)] if argv == ["eval"] else []))
    assert result.exit_code == 2 and message in result.output, result.output


def test_lens_accepts_model_and_adapter_path(monkeypatch, tmp_path):
    compare = Recorder()
    monkeypatch.setattr(mlx_oisd.lens, "compare_lens", compare)
    for argv in (["lens", "m1", "--adapter", str(tmp_path)],
                 ["lens", "--model", "m1", "--adapter-path", str(tmp_path)]):
        result = runner.invoke(app, argv + ["--prompt", "What is 2+2?"])
        assert result.exit_code == 2 and "error: recorded" in result.output, result.output
    assert compare.calls[0] == compare.calls[1]
    assert compare.calls[0][0][:2] == ("m1", [str(tmp_path)])


def test_sft_accepts_model_and_data_flags(monkeypatch, data_file, tmp_path):
    """`M DATA`, `--model M DATA` and `--model M --data DATA` train the same thing."""
    read = Recorder("rows")
    train = Recorder(tmp_path / "out")
    monkeypatch.setattr(mlx_oisd.sft, "read_sft_data", read)
    monkeypatch.setattr(mlx_oisd.sft, "sft", train)
    out = ["--out", str(tmp_path / "out"), "--iters", "1"]
    for argv in (["sft", "m1", str(data_file)], ["sft", "--model", "m1", str(data_file)],
                 ["sft", "--model", "m1", "--data", str(data_file)]):
        result = runner.invoke(app, argv + out)
        assert result.exit_code == 0, result.output
    assert read.calls == [((data_file,), {})] * 3
    assert train.calls[0] == train.calls[1] == train.calls[2]
    assert train.calls[0][0][:2] == ("m1", "rows")


def test_export_accepts_adapter_path(monkeypatch, tmp_path):
    export = Recorder(tmp_path / "out")
    monkeypatch.setattr(mlx_oisd.export, "export", export)
    for argv in (["export", str(tmp_path)], ["export", "--adapter-path", str(tmp_path)]):
        result = runner.invoke(app, argv + ["--format", "mlx", "--out", str(tmp_path / "out")])
        assert result.exit_code == 0, result.output
    assert export.calls[0] == export.calls[1] and export.calls[0][0][0] == tmp_path
