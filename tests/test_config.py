"""Config: YAML + `--set` overrides + one validate; every problem named by dotted key and file."""

import json
import math

import pytest
import yaml

from mlx_oisd.config import (
    _RULES,
    HARMLESS_KEYS,
    ConfigError,
    DatasetConfig,
    LoraConfig,
    QuantizeConfig,
    RewardSpec,
    TrainConfig,
    _schema_paths,
    apply_overrides,
    config_diff,
    load_config,
    run_changes,
    save_config,
    to_dict,
    validate,
)

# DESIGN.md, "Config keys", verbatim.
DESIGN_EXAMPLE = """
model: Qwen/Qwen3-0.6B      # Hub id, local folder, builtin:tiny (random, no warm-up), builtin:tiny-arith (demo)
output_dir: runs/qwen3-0.6b-oisd   # resolved config, metrics.jsonl, adapters/, checkpoints/
dataset: {source: openai/gsm8k, config: main, split: train, prompt_field: question, answer_field: answer}
                            # source may be a Hub id, a local .jsonl/.parquet, or builtin:arith
algorithm: oisd             # grpo | oisd | bupo
max_steps: 200
batch_size: 8               # prompts per step
num_generations: 8          # G, completions per prompt
max_completion_length: 1024
temperature: 1.0
top_p: 1.0
enable_thinking: false
learning_rate: 1.0e-5
lora: {rank: 16, scale: 20.0, dropout: 0.0, num_layers: -1}   # lora: null -> full fine-tuning
advantage: grpo             # grpo | dr_grpo | rloo | reinforce_pp
filter_zero_std_groups: false
loss_agg: token_mean        # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
epsilon: 0.2
epsilon_high: 0.28
beta: 0.0
num_iterations: 1
mask_truncated: false
oisd: {student_layers: [6], lambda_logit: 1.0, lambda_attn: 0.1, tau: 1.0, weighting: advantage, lens_norm: true}
bupo: {internal_steps: 30}
rewards: [{name: math, weight: 1.0}, {name: format, weight: 0.1}]   # or {name: my.module:fn, weight: w}
save_every: 50
seed: 0
"""

MINIMAL = {"model": "Qwen/Qwen3-0.6B", "dataset": {"source": "openai/gsm8k"}}


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(*overrides, raw=None):
    """The ConfigError text for MINIMAL (or `raw`) with `overrides` applied, source cfg.yaml."""
    with pytest.raises(ConfigError) as info:
        validate(apply_overrides(MINIMAL if raw is None else raw, overrides), "cfg.yaml")
    return str(info.value)


def test_minimal_yaml_gets_every_default(tmp_path):
    cfg = load_config(write(tmp_path, yaml.safe_dump(MINIMAL)))
    expected = TrainConfig(
        model="Qwen/Qwen3-0.6B",
        dataset=DatasetConfig(source="openai/gsm8k"),
        output_dir="runs/qwen3-0.6b-oisd",
    )
    assert cfg == expected
    assert cfg.algorithm == "oisd" and cfg.lora == LoraConfig() and cfg.quantize is None
    assert cfg.oisd.student_layers == [6] and cfg.oisd.lambda_attn == 0.1 and cfg.oisd.lens_norm
    assert cfg.rewards == [RewardSpec("math", 1.0), RewardSpec("format", 0.1)]
    assert cfg.dataset.split == "train" and cfg.dataset.prompt_field == "question"
    assert cfg.loss_chunk_size is None and cfg.minibatch_size is None


def test_design_example_validates_to_the_defaults(tmp_path):
    cfg = load_config(write(tmp_path, DESIGN_EXAMPLE))
    assert cfg.dataset.config == "main"
    assert cfg.learning_rate == 1.0e-5
    assert cfg == TrainConfig(
        model="Qwen/Qwen3-0.6B",
        dataset=DatasetConfig(source="openai/gsm8k", config="main"),
        output_dir="runs/qwen3-0.6b-oisd",
    )


@pytest.mark.parametrize(
    "model, algorithm, output_dir",
    [
        ("builtin:tiny", "grpo", "runs/tiny-grpo"),
        ("/models/My-Qwen3/", "bupo", "runs/my-qwen3-bupo"),
        ("mlx-community/Qwen3-4B-4bit", "oisd", "runs/qwen3-4b-4bit-oisd"),
    ],
)
def test_output_dir_defaults_to_model_basename_and_algorithm(model, algorithm, output_dir):
    raw = {"model": model, "dataset": {"source": "builtin:arith"}, "algorithm": algorithm}
    assert validate(raw).output_dir == output_dir


@pytest.mark.parametrize(
    "overrides, get, expected",
    [
        (["oisd.tau=0.5"], lambda c: c.oisd.tau, 0.5),
        (["lora=null"], lambda c: c.lora, None),
        (["oisd.student_layers=[2,4]"], lambda c: c.oisd.student_layers, [2, 4]),
        (["rewards=[{name: math, weight: 1}]"], lambda c: c.rewards, [RewardSpec("math", 1.0)]),
        (["learning_rate=3e-6"], lambda c: c.learning_rate, 3e-6),  # YAML 1.1 reads a string
        (["dataset.split=test", "seed=7"], lambda c: (c.dataset.split, c.seed), ("test", 7)),
        (["lora=null", "lora.rank=8"], lambda c: c.lora, LoraConfig(rank=8)),
        (["quantize.bits=8"], lambda c: c.quantize, QuantizeConfig(bits=8)),
        (["dataset.system_prompt="], lambda c: c.dataset.system_prompt, None),
    ],
)
def test_overrides(tmp_path, overrides, get, expected):
    cfg = load_config(write(tmp_path, DESIGN_EXAMPLE), overrides)
    assert get(cfg) == expected


def test_overrides_leave_the_raw_dict_alone():
    raw = {"oisd": {"tau": 1.0}}
    assert apply_overrides(raw, ["oisd.tau=2"]) == {"oisd": {"tau": 2}}
    assert raw == {"oisd": {"tau": 1.0}}


def test_problem_from_an_override_names_the_override(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'oisd\.tua' in .*cfg\.yaml with --set"):
        load_config(write(tmp_path, DESIGN_EXAMPLE), ["oisd.tua=2"])


@pytest.mark.parametrize(
    "override, reason",
    [
        ("oisd.tau", "expected key=value"),
        ("=1", "expected key=value"),
        ("oisd..tau=1", "expected key=value"),
        ("oisd.student_layers=[2,", "value is not YAML"),
        ("model.name=x", "'model' is not a mapping"),
    ],
)
def test_malformed_override_is_named(override, reason):
    with pytest.raises(ConfigError) as info:
        apply_overrides(MINIMAL, [override])
    assert f"malformed override {override!r}" in str(info.value)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "config file not found"),
        ("model: [unclosed\n", "invalid YAML in"),
        ("- a\n- b\n", "expected a mapping of config keys in"),
        ("", "expected a mapping of config keys in"),
    ],
)
def test_unreadable_file_is_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and "bad.yaml" in str(info.value)


def test_a_folder_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "oisd.lamda_logit=1.0",
            "unknown key 'oisd.lamda_logit' in cfg.yaml (did you mean 'oisd.lambda_logit'?)",
        ),
        (
            "learning_rte=1e-5",
            "unknown key 'learning_rte' in cfg.yaml (did you mean 'learning_rate'?)",
        ),
        ("tau=0.5", "unknown key 'tau' in cfg.yaml (did you mean 'oisd.tau'?)"),
        (
            "rewards=[{name: math, wieght: 1}]",
            "unknown key 'rewards[0].wieght' in cfg.yaml (did you mean 'rewards[0].weight'?)",
        ),
        ("dataset.xyzzy=1", "unknown key 'dataset.xyzzy' in cfg.yaml\n"),
    ],
)
def test_unknown_key_names_dotted_key_file_and_closest_key(override, message):
    assert message in error_of(override) + "\n"


@pytest.mark.parametrize(
    "override, message",
    [
        ("learning_rate=abc", "expected a number for 'learning_rate', got 'abc'"),
        ("batch_size=true", "expected an integer for 'batch_size', got true"),
        ("max_steps=2.5", "expected an integer for 'max_steps', got 2.5"),
        ("model=5", "expected a string for 'model', got 5"),
        ("enable_thinking=maybe", "expected true or false for 'enable_thinking', got 'maybe'"),
        ("oisd.student_layers=6", "expected a list for 'oisd.student_layers', got 6"),
        ("oisd.student_layers=[2, x]", "expected an integer for 'oisd.student_layers[1]', got 'x'"),
        ("oisd=null", "expected a mapping for 'oisd', got null"),
        ("lora=true", "expected a mapping for 'lora', got true"),
        (
            "rewards=[{name: math, weight: .inf}]",
            "expected a finite number for 'rewards[0].weight', got inf",
        ),
        (
            "rewards=[{name: math, weight: .nan}]",
            "expected a finite number for 'rewards[0].weight', got nan",
        ),
    ],
)
def test_wrong_type_is_named(override, message):
    assert message in error_of(override)


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm=ppo", "expected one of grpo, oisd, bupo for 'algorithm', got 'ppo'"),
        ("advantage=gae", "expected one of grpo, dr_grpo, rloo, reinforce_pp for 'advantage'"),
        ("loss_agg=sum", "for 'loss_agg', got 'sum'"),
        ("oisd.weighting=abs", "expected one of advantage, sign, none for 'oisd.weighting'"),
        (
            "lr_scheduler_type=cos",
            "expected one of cosine, constant, linear for 'lr_scheduler_type'",
        ),
        ("quantize.bits=7", "expected one of 2, 3, 4, 5, 6, 8 for 'quantize.bits', got 7"),
        ("quantize.bits='4'", "for 'quantize.bits', got '4'"),
    ],
)
def test_enum_value_is_named_with_choices(override, message):
    assert message in error_of(override)


@pytest.mark.parametrize(
    "override, message",
    [
        ("num_generations=1", "'num_generations' must be >= 2"),
        ("batch_size=0", "'batch_size' must be >= 1, got 0"),
        ("temperature=0", "'temperature' must be > 0, got 0"),
        ("top_p=0", "'top_p' must be in (0, 1], got 0"),
        ("top_p=1.5", "'top_p' must be in (0, 1], got 1.5"),
        ("epsilon=0", "'epsilon' must be in (0, 1), got 0"),
        ("epsilon_high=0", "'epsilon_high' must be in (0, 10], got 0"),
        ("beta=-0.1", "'beta' must be >= 0, got -0.1"),
        ("oisd.lambda_logit=-1", "'oisd.lambda_logit' must be >= 0"),
        ("oisd.lambda_attn=-0.1", "'oisd.lambda_attn' must be >= 0"),
        ("oisd.tau=0", "'oisd.tau' must be > 0"),
        ("oisd.student_layers=[]", "'oisd.student_layers' must be a non-empty list"),
        (
            "oisd.student_layers=[2, 2]",
            "'oisd.student_layers' must be a non-empty list of distinct",
        ),
        ("oisd.student_layers=[0]", "'oisd.student_layers[0]' must be >= 1"),
        ("lora.rank=0", "'lora.rank' must be >= 1, got 0"),
        ("lora.dropout=1.0", "'lora.dropout' must be in [0, 0.9], got 1.0"),
        ("lora.dropout=-0.1", "'lora.dropout' must be in [0, 0.9], got -0.1"),
        ("epsilon=1", "'epsilon' must be in (0, 1), got 1"),
        ("epsilon=-0.2", "'epsilon' must be in (0, 1), got -0.2"),
        ("epsilon_high=10.5", "'epsilon_high' must be in (0, 10], got 10.5"),
        ("epsilon_high=-1", "'epsilon_high' must be in (0, 10], got -1"),
        ("max_prompt_length=0", "'max_prompt_length' must be >= 1, got 0"),
        ("max_nonfinite_steps=0", "'max_nonfinite_steps' must be >= 1, got 0"),
        ("lora.num_layers=0", "'lora.num_layers' must be -1 (all blocks) or >= 1"),
        ("max_completion_length=0", "'max_completion_length' must be >= 1"),
        ("learning_rate=0", "'learning_rate' must be > 0"),
        ("rewards=[]", "'rewards' must be a non-empty list, got []"),
        ("rewards=[{name: ''}]", "'rewards[0].name' must be non-empty, got ''"),
        ("minibatch_size=0", "'minibatch_size' must be >= 1"),
    ],
)
def test_impossible_value_is_named(override, message):
    assert message in error_of(override)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora=null", "quantize={bits: 4}"], "'quantize' needs 'lora'"),
        (["max_steps=10", "warmup_steps=11"], "'warmup_steps' must be <= max_steps (10), got 11"),
    ],
)
def test_impossible_combination_is_named(overrides, message):
    assert message in error_of(*overrides)


def test_missing_required_keys_are_named():
    message = error_of(raw={"dataset": {"split": "train"}})
    assert "missing required key 'model' in cfg.yaml" in message
    assert "missing required key 'dataset.source' in cfg.yaml" in message


def test_values_that_are_allowed():
    cfg = validate(
        apply_overrides(
            MINIMAL,
            [
                "learning_rate=1",
                "epsilon=0.3",
                "epsilon_high=0.1",
                "beta=0",
                "oisd.lambda_logit=0",
                "lora.keys=[self_attn.q_proj, mlp.down_proj]",
                "quantize={}",
                "max_grad_norm=0",
            ],
        )
    )
    assert cfg.learning_rate == 1.0 and type(cfg.learning_rate) is float
    assert cfg.epsilon_high < cfg.epsilon
    assert cfg.lora.keys == ["self_attn.q_proj", "mlp.down_proj"]
    assert cfg.quantize == QuantizeConfig(bits=4, group_size=64)


def test_all_problems_are_reported_at_once():
    message = error_of(
        "oisd.lamda_logit=1",
        "learning_rate=abc",
        "algorithm=ppo",
        "num_generations=1",
        "oisd.student_layers=[0]",
        "rewards=[{name: math, weight: .inf}]",
    )
    header, *lines = message.splitlines()
    assert header == "invalid config cfg.yaml:"
    assert len(lines) == 6
    for key in [
        "oisd.lamda_logit",
        "learning_rate",
        "algorithm",
        "num_generations",
        "oisd.student_layers[0]",
        "rewards[0].weight",
    ]:
        assert sum(f"'{key}'" in line for line in lines) == 1


def test_to_dict_round_trips_through_validate(tmp_path):
    cfg = load_config(
        write(tmp_path, DESIGN_EXAMPLE),
        [
            "lora.keys=[self_attn.q_proj]",
            "quantize={bits: 8}",
            "oisd.student_layers=[2, 4]",
            "rewards=[{name: my.module:fn, weight: 2}]",
            "minibatch_size=16",
        ],
    )
    plain = to_dict(cfg)
    json.dumps(plain)  # plain data only
    assert validate(plain) == cfg
    assert load_config(save_config(cfg, tmp_path / "out" / "config.yaml")) == cfg
    minimal = validate(MINIMAL)
    assert validate(json.loads(json.dumps(to_dict(minimal)))) == minimal


def test_every_rule_names_a_real_key():
    assert set(_RULES) <= set(_schema_paths(TrainConfig))


def test_float_fields_are_floats_after_validate():
    cfg = validate(apply_overrides(MINIMAL, ["temperature=1", "oisd.tau=2", "lora.scale=10"]))
    for value in (cfg.temperature, cfg.oisd.tau, cfg.lora.scale):
        assert type(value) is float and math.isfinite(value)


def test_edge_values_that_are_allowed():
    cfg = validate(apply_overrides(MINIMAL, ["epsilon=0.99", "epsilon_high=10", "lora.dropout=0.9"]))
    assert (cfg.epsilon, cfg.epsilon_high, cfg.lora.dropout) == (0.99, 10.0, 0.9)
    assert (cfg.max_prompt_length, cfg.truncate_prompts, cfg.max_nonfinite_steps) == (512, False, 3)


def test_config_diff_lists_dotted_keys_with_both_values():
    old = to_dict(validate(MINIMAL))
    new = to_dict(validate(apply_overrides(MINIMAL, [
        "lora.rank=8", "max_steps=7", "dataset.split=test", "rewards=[{name: math}]",
        "oisd.student_layers=[2, 3]"])))
    assert config_diff(old, old) == []
    assert config_diff(old, new) == [
        ("dataset.split", "train", "test"),
        ("lora.rank", 16, 8),
        ("max_steps", 200, 7),
        ("oisd.student_layers", [6], [2, 3]),
        ("rewards", [{"name": "math", "weight": 1.0}, {"name": "format", "weight": 0.1}],
         [{"name": "math", "weight": 1.0}]),
    ]
    assert [k for k, _, _ in run_changes(config_diff(old, new))] == [
        "dataset.split", "lora.rank", "oisd.student_layers", "rewards"]


def test_config_diff_mapping_against_null_and_missing_keys():
    full = to_dict(validate(apply_overrides(MINIMAL, ["lora=null"])))
    lora = to_dict(validate(MINIMAL))
    assert config_diff(lora, full) == [("lora", lora["lora"], None)]
    assert config_diff({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}, "d": 3}) == [("a.c", None, 2), ("d", None, 3)]
    assert run_changes([("eval_k", 1, 4), ("output_dir", "a", "b"), ("quantize", None, {"bits": 4})]) \
        == [("quantize", None, {"bits": 4})]


def test_harmless_keys_are_real_keys_and_shape_keys_are_not_harmless():
    assert HARMLESS_KEYS <= set(_schema_paths(TrainConfig))
    for key in ("model", "lora", "quantize", "algorithm", "oisd", "bupo", "dataset",
                "num_generations", "batch_size", "seed", "advantage", "loss_agg",
                "max_prompt_length", "truncate_prompts"):
        assert key not in HARMLESS_KEYS


@pytest.mark.parametrize("key", ["rollout_batch_size", "minibatch_size"])
def test_an_integer_or_auto_key(key):
    """`int | Literal["auto"]` (minibatch_size also `| None`): either member is taken as is,
    anything else is named with both choices, and the rule applies to the integer."""
    assert getattr(validate(apply_overrides(MINIMAL, [f"{key}=auto"])), key) == "auto"
    assert getattr(validate(apply_overrides(MINIMAL, [f"{key}=3"])), key) == 3
    for bad in ("big", "2.5", "true", "[4]"):
        assert f"expected an integer or auto for '{key}'" in error_of(f"{key}={bad}")
    assert f"'{key}' must be >= 1" in error_of(f"{key}=0")
    null = apply_overrides(MINIMAL, [f"{key}=null"])
    if key == "minibatch_size":
        assert validate(null).minibatch_size is None
    else:
        assert "expected an integer or auto for 'rollout_batch_size', got null" in error_of(
            f"{key}=null")


def test_eval_split_of_a_single_file_source_is_refused():
    """A local file is one split: eval_split would score the first training rows."""
    local = {"model": "m", "dataset": {"source": "data/train.jsonl"}}
    message = error_of("eval_split=test", raw=local)
    assert ("'eval_split' ('test') would score training rows: dataset.source 'data/train.jsonl' "
            "is one file, and a local file is one split; set dataset.eval_source: test.jsonl"
            in message)
    cfg = validate(apply_overrides(local, ["eval_split=test", "dataset.eval_source=test.jsonl"]))
    assert cfg.dataset.eval_source == "test.jsonl" and cfg.eval_split == "test"
    assert validate(apply_overrides(local, ["dataset.eval_source=t.parquet"])).eval_split is None
    assert validate(apply_overrides(MINIMAL, ["eval_split=test"])).dataset.eval_source is None
    builtin = {"model": "m", "dataset": {"source": "builtin:arith"}, "eval_split": "test"}
    assert validate(builtin).eval_split == "test"  # built-in tasks have train and test splits
    assert ("'eval_split' must choose a split of dataset.eval_source 'openai/gsm8k' "
            "(e.g. eval_split: test), got null" in error_of("dataset.eval_source=openai/gsm8k",
                                                            raw=local))
    assert run_changes([("dataset.eval_source", None, "test.jsonl")]) == []


def test_held_out_examples_come_from_eval_source(tmp_path):
    from mlx_oisd.trainer import load_eval_examples

    for name, n in (("train", 5), ("test", 3)):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"question": f"{name} {i}?", "answer": i}) + "\n" for i in range(n)))
    raw = {"model": "m", "dataset": {"source": str(tmp_path / "train.jsonl"),
                                     "eval_source": str(tmp_path / "test.jsonl")}}
    held_out = load_eval_examples(validate(raw))
    assert [ex.prompt for ex in held_out] == ["test 0?", "test 1?", "test 2?"]
    assert load_eval_examples(validate({**raw, "eval_samples": 2}))[-1].prompt == "test 1?"
    del raw["dataset"]["eval_source"]
    assert load_eval_examples(validate(raw)) == []
