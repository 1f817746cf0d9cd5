"""generate.py and `oisd-mlx generate` / `oisd-mlx chat`: mlx-lm's greedy decode of the
training prompt, the run folder's format, multi-turn history, bad run folders."""

import re
from pathlib import Path

import mlx.core as mx
import pytest
import yaml
from mlx.utils import tree_flatten
from mlx_lm.generate import generate as mlx_lm_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import load as mlx_lm_load
from typer.testing import CliRunner

from cli.main import app
from mlx_oisd.data.prompts import MATH_INSTRUCTION, PromptFormat
from mlx_oisd.generate import RunFolderError, RunFormat, build_prompt, chat
from mlx_oisd.loading import load
from mlx_oisd.lora import apply_lora, save_adapters

runner = CliRunner()
LORA = {"rank": 4, "scale": 20.0, "dropout": 0.0}
Q1, Q2 = "What is 2 + 3?", "And 4 + 5?"
N = 10  # max tokens


@pytest.fixture(scope="module")
def adapter(tiny_dir, tmp_path_factory):
    """An mlx-lm adapter folder on the last 2 blocks with large random B matrices."""
    model, _ = load(tiny_dir)
    apply_lora(model, 2, LORA)
    lora_b = [(n, p) for n, p in tree_flatten(model.trainable_parameters()) if n.endswith("lora_b")]
    keys = mx.random.split(mx.random.key(1), len(lora_b))
    model.load_weights([(n, mx.random.normal(p.shape, key=k)) for k, (n, p) in zip(keys, lora_b)],
                       strict=False)
    return save_adapters(model, tmp_path_factory.mktemp("gen") / "adapters", 2, LORA)


@pytest.fixture(scope="module")
def reference(tiny_dir, adapter):
    """mlx-lm's own model class, loader and adapter loading: the independent path."""
    return mlx_lm_load(str(tiny_dir), adapter_path=str(adapter))


def _ref_ids(tok, turns, instruction=MATH_INSTRUCTION, system=None):
    """Chat-template ids written out here: user turns with the instruction, assistant answers."""
    messages = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        role = "user" if i % 2 == 0 else "assistant"
        extra = (instruction or "") if role == "user" else ""
        messages.append({"role": role, "content": text + extra})
    return tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)


def _greedy(reference, ids):
    model, tok = reference
    return mlx_lm_generate(model, tok, ids, max_tokens=N, sampler=make_sampler(0.0))


def _prompt_tokens(stderr: str) -> int:
    return int(re.search(r"prompt: (\d+) tokens", stderr).group(1))


def _run_folder(tmp_path, adapter, model, dataset_extra):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "adapters").symlink_to(adapter, target_is_directory=True)
    raw = {"model": str(model), "dataset": {"source": "builtin:arith", **dataset_extra},
           "max_completion_length": N, "algorithm": "oisd"}
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    return folder


def test_greedy_generate_equals_mlx_lm_with_the_adapter(tiny_dir, adapter, reference):
    ids = _ref_ids(reference[1], [Q1])
    expected = _greedy(reference, ids)
    base = mlx_lm_load(str(tiny_dir))
    assert expected != mlx_lm_generate(*base, ids, max_tokens=N, sampler=make_sampler(0.0))
    result = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--adapter-path",
                                 str(adapter), "--prompt", "-", "--temp", "0", "--max-tokens",
                                 str(N), "--seed", "3"], input=Q1)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    assert _prompt_tokens(result.stderr) == len(ids)
    assert re.search(r"generated: \d+ tokens, .* tokens/s \| peak memory: [\d.]+ GB", result.stderr)
    assert result.stderr.count(repr(MATH_INSTRUCTION)) == 1  # the instruction in use, once


def test_run_folder_instruction_round_trips(tmp_path, tiny_dir, adapter, reference):
    folder = _run_folder(tmp_path, adapter, tiny_dir, {"instruction": " X marks the spot."})
    fmt = PromptFormat(None, " X marks the spot.", False)
    run = RunFormat.read(folder)
    assert (run.model, run.adapter_path, run.fmt, run.max_tokens) == (
        str(tiny_dir), folder / "adapters", fmt, N)
    _, tok = load(tiny_dir)
    assert build_prompt(tok, run.fmt, [], Q1) == fmt.render(tok, Q1)
    ids = _ref_ids(reference[1], [Q1], instruction=" X marks the spot.")
    assert fmt.render(tok, Q1) == ids

    result = runner.invoke(app, ["generate", "--run", str(folder), "--prompt", Q1])
    assert result.exit_code == 0, result.output
    assert result.stdout == _greedy(reference, ids) + "\n"  # run's model, adapters, max tokens
    assert _prompt_tokens(result.stderr) == len(ids)
    # explicit flags override the run's format
    result = runner.invoke(app, ["generate", "--run", str(folder), "--prompt", Q1,
                                 "--instruction", "none", "--system", "Be brief."])
    assert result.exit_code == 0, result.output
    assert _prompt_tokens(result.stderr) == len(_ref_ids(tok, [Q1], None, "Be brief."))
    assert "instruction" not in result.stderr


def test_older_run_config_without_instruction_uses_the_math_instruction(tmp_path, tiny_dir, adapter):
    folder = _run_folder(tmp_path, adapter, tiny_dir, {"system_prompt": "S"})
    assert RunFormat.read(folder).fmt == PromptFormat("S", MATH_INSTRUCTION, False)


def test_chat_keeps_the_history_and_resets(tiny_dir, adapter, reference):
    a1 = _greedy(reference, _ref_ids(reference[1], [Q1]))
    ids2 = _ref_ids(reference[1], [Q1, a1, Q2])  # the second prompt holds the first exchange
    a2 = _greedy(reference, ids2)
    flags = ["chat", "--model", str(tiny_dir), "--adapter-path", str(adapter), "--max-tokens",
             str(N)]
    result = runner.invoke(app, flags, input=f"{Q1}\n{Q2}\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{a1}\n{a2}\n"

    model, tok = load(tiny_dir, adapter_path=adapter)
    out = []
    turns = list(chat(model, tok, PromptFormat(), [Q1, "\n", "/reset", Q1, Q2, "q", Q2],
                      out.append, max_tokens=N))
    assert [t.user for t in turns] == [Q1, Q1, Q2]  # blank skipped; 'q' ends before the last
    assert turns[0].prompt == turns[1].prompt == _ref_ids(tok, [Q1])  # reset: a fresh prompt
    assert turns[2].prompt == ids2 and [t.answer for t in turns] == [a1, a1, a2]
    assert "".join(out) == f"{a1}\n{a1}\n{a2}\n"


def test_qlora_run_quantizes_the_base_under_the_adapters(tmp_path, tiny_dir, adapter):
    import mlx.nn as nn

    trained, tok = load(tiny_dir)  # as the trainer builds it: quantize, then LoRA, then weights
    nn.quantize(trained, group_size=32, bits=4)
    apply_lora(trained, 2, LORA)
    trained.load_weights(str(adapter / "adapters.safetensors"), strict=False)
    plain, _ = load(tiny_dir, adapter_path=adapter)
    ids = _ref_ids(tok, [Q1])
    assert not mx.allclose(plain(mx.array([ids])), trained(mx.array([ids])))
    folder = _run_folder(tmp_path, adapter, tiny_dir, {})
    raw = yaml.safe_load((folder / "config.yaml").read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump({**raw, "quantize": {
        "bits": 4, "group_size": 32}}))
    result = runner.invoke(app, ["generate", "--run", str(folder), "--prompt", Q1])
    assert result.exit_code == 0, result.output
    assert result.stdout == mlx_lm_generate(trained, tok, ids, max_tokens=N,
                                            sampler=make_sampler(0.0)) + "\n"


def test_a_checkpoint_folder_is_a_run_with_its_adapters_inside(tmp_path, tiny_dir, adapter):
    folder = _run_folder(tmp_path, adapter, tiny_dir, {"instruction": None})
    step = folder / "checkpoints" / "step_000002"
    step.mkdir(parents=True)
    for name in ("config.yaml", "adapters/adapters.safetensors", "adapters/adapter_config.json"):
        (step / Path(name).name).write_bytes((folder / name).read_bytes())
    run = RunFormat.read(step)
    assert run.adapter_path == step and run.fmt == PromptFormat(None, None, False)


@pytest.mark.parametrize("setup, message", [
    (None, "run folder .* does not exist"),
    ("", "no config.yaml"),
    ("model: [1\n", "config.yaml: invalid YAML"),
    ("dataset: {source: x}\n", "config.yaml: model: expected a str"),
    ("model: m\ndataset: {source: x, instruction: 5}\n", "dataset.instruction: expected str or null"),
])
def test_bad_run_folder_is_one_error_line(tmp_path, setup, message):
    folder = tmp_path / "run"
    if setup is not None:
        folder.mkdir()
        if setup:
            (folder / "config.yaml").write_text(setup)
    with pytest.raises(RunFolderError, match=message):
        RunFormat.read(folder)
    for command in (["generate", "--prompt", "hi"], ["chat"]):
        result = runner.invoke(app, command + ["--run", str(folder)], input="hi\n")
        assert result.exit_code == 2 and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0])


def test_help_and_missing_model(tmp_path):
    for command in ("generate", "chat"):
        result = runner.invoke(app, [command, "-h"])
        assert result.exit_code == 0 and "--adapter-path" in result.stdout
    result = runner.invoke(app, ["generate", "--prompt", "hi"])
    assert result.exit_code == 2 and "give --model MODEL or --run" in result.stderr
    result = runner.invoke(app, ["chat", "--model", str(tmp_path / "nope")], input="hi\n")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: model folder") and result.stderr.count("\n") == 1
