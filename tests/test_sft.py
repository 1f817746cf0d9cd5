"""sft.py: mlx-lm's data formats and folders, the warm-up itself, its config.yaml, and RL runs
that start from its adapters (`init_adapter`)."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from cli.main import app
from mlx_oisd import load
from mlx_oisd.config import ConfigError, validate
from mlx_oisd.data.prompts import MATH_INSTRUCTION
from mlx_oisd.sft import (
    SftDataError,
    encode_row,
    pad_batch,
    read_chat_jsonl,
    read_sft_data,
    read_sft_jsonl,
    sft,
)

runner = CliRunner()
WORDS = ("apple", "pear", "plum", "fig")
ROWS = [{"messages": [{"role": "user", "content": f"say {w}"},
                      {"role": "assistant", "content": f"{w} {w} {w}"}]} for w in WORDS] * 4
PAIRS = [{"prompt": f"say {w}", "completion": f"{w} {w}"} for w in WORDS]
LORA = {"rank": 4, "scale": 10.0, "dropout": 0.0}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _answer_nll(model, tok, row):
    """Mean NLL of the assistant turn given the user turn."""
    prompt = tok.apply_chat_template(row["messages"][:1], add_generation_prompt=True)
    full = tok.apply_chat_template(row["messages"])
    ids = mx.array(full)[None]
    logits = model(ids[:, :-1])
    nll = nn.losses.cross_entropy(logits, ids[:, 1:])[0, len(prompt) - 1:]
    return float(nll.mean())


def _by_hand(tok, prompt, completion, system=None):
    """Qwen3's chat layout written out: (ids, number of prompt tokens), each part encoded alone."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    head += f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    target = f"<think>\n\n</think>\n\n{completion}<|im_end|>\n"
    head_ids = tok.encode(head, add_special_tokens=False)
    return head_ids + tok.encode(target, add_special_tokens=False), len(head_ids)


@pytest.mark.parametrize("lora", [None, LORA])
def test_warm_up_learns_the_answers(make_tiny, tmp_path, lora):
    tiny_dir = make_tiny(init_std=0.2)  # logits can peak even with a frozen head (LoRA)
    model, tok = load(tiny_dir)
    before = _answer_nll(model, tok, ROWS[0])
    out = sft(tiny_dir, ROWS, tmp_path / "out", iters=30, batch_size=8,
              learning_rate=1e-2 if lora is None else 3e-3, lora=lora, show_progress=False)
    if lora is None:
        assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
        trained, tok = load(out)
    else:
        assert out.name == "adapters"
        trained, tok = load(tiny_dir, adapter_path=out)
    after = _answer_nll(trained, tok, ROWS[0])
    assert after < 0.5 * before


def test_completion_mask_covers_only_the_completion(tiny_dir):
    _, tok = load(tiny_dir)
    rows = [{"prompt": "say fig", "completion": "fig fig"},
            {"prompt": "What is 2 + 3?", "completion": "It is 5, so \\boxed{5}."}]
    encoded = [encode_row(tok, "completions", r) for r in rows]
    tokens, mask = pad_batch(encoded, 2048)
    for i, r in enumerate(rows):
        ids, n_prompt = _by_hand(tok, r["prompt"], r["completion"])
        assert encoded[i] == (ids, n_prompt)
        want = np.zeros(tokens.shape[1] - 1, np.float32)
        want[n_prompt - 1:len(ids) - 1] = 1.0  # mask[j] is about target tokens[j + 1]
        np.testing.assert_array_equal(np.asarray(mask[i]), want)
        np.testing.assert_array_equal(np.asarray(tokens[i, :len(ids)]), ids)
    # shaped like the RL prompt: system turn, question + instruction; the target is unchanged
    ids, offset = encode_row(tok, "completions", rows[1], "Be brief.", MATH_INSTRUCTION)
    assert (ids, offset) == _by_hand(tok, rows[1]["prompt"] + MATH_INSTRUCTION,
                                     rows[1]["completion"], system="Be brief.")


def test_text_rows_train_on_every_token(tiny_dir):
    _, tok = load(tiny_dir)
    short, long = {"text": "hi"}, {"text": "hello there, a longer row"}
    enc = [encode_row(tok, "text", r) for r in (short, long)]
    assert enc[0] == (tok.encode("hi") + [tok.eos_token_id], 0)
    tokens, mask = pad_batch(enc, 2048)
    n_short, n_long = len(enc[0][0]), len(enc[1][0])
    assert tokens.shape == (2, n_long)
    np.testing.assert_array_equal(np.asarray(mask[1]), np.ones(n_long - 1))
    np.testing.assert_array_equal(np.asarray(mask[0]),
                                  (np.arange(n_long - 1) < n_short - 1).astype(np.float32))


@pytest.mark.parametrize("rows, message", [
    ([ROWS[0], {"text": "hi"}],
     r"line 2 of .*d\.jsonl: fields \['text'\]; this file is chat \(from its first row\); "
     r"expected one format per file: .*\(chat\), .*\(completions\) or .*\(text\)"),
    ([{"question": "q", "answer": "a"}], r"line 1 of .*: fields \['answer', 'question'\]; expected"),
    ([PAIRS[0], {"prompt": "p", "completion": 3}], r"line 2 of .*: completion: expected a non-empty"),
    ([["not", "a", "row"]], r"line 1 of .*: fields list; expected one format"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "last message must be the assistant"),
])
def test_a_row_of_another_format_names_file_row_and_fields(tmp_path, rows, message):
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(SftDataError, match=message):
        read_sft_jsonl(path)
    result = runner.invoke(app, ["sft", "x/y", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "error: line" in result.output  # before any model loads


def test_bad_files_and_folders_are_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(SftDataError, match=r"line 1 of .*bad\.jsonl: invalid JSON"):
        read_sft_data(tmp_path / "bad.jsonl")
    with pytest.raises(SftDataError, match="does not exist"):
        read_sft_data(tmp_path / "none.jsonl")
    (tmp_path / "folder").mkdir()
    _write_jsonl(tmp_path / "folder" / "valid.jsonl", PAIRS)
    with pytest.raises(SftDataError, match=r"folder: no train\.jsonl \(found \['valid\.jsonl'\]\)"):
        read_sft_data(tmp_path / "folder")
    _write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(SftDataError, match="completions rows; expected chat rows"):
        read_chat_jsonl(tmp_path / "pairs.jsonl")
    with pytest.raises(SftDataError, match="--system / --instruction shape the prompt of "
                                           "completions rows; these are chat rows"):
        sft("x/y", ROWS, tmp_path / "o", instruction=MATH_INSTRUCTION)  # before any model loads


def test_lora_flags_out_of_range_are_named_as_flags(tiny_dir, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", PAIRS)
    result = runner.invoke(app, ["sft", str(tiny_dir), str(data), "--out", str(tmp_path / "o"),
                                 "--batch-size", "2", "--lora-layers", "9"])
    assert result.exit_code == 2 and "error: --lora-layers: expected -1 or 1..4, got 9" in result.output


def _data_folder(root):
    root.mkdir()
    _write_jsonl(root / "train.jsonl", PAIRS * 4)
    _write_jsonl(root / "valid.jsonl", PAIRS[:3])
    return root


def test_folder_with_valid_reports_its_loss(tiny_dir, tmp_path):
    """The reported validation loss is the token-weighted completion NLL of valid.jsonl, before
    training, every steps_per_eval iterations and at the end; it falls."""
    data = read_sft_data(_data_folder(tmp_path / "data"))
    assert (data.train.format, len(data.train.rows), len(data.valid.rows)) == ("completions", 16, 3)
    log = []
    out = sft(tiny_dir, data, tmp_path / "out", iters=6, batch_size=2, learning_rate=1e-2,
              lora=LORA, steps_per_eval=4, val_batches=-1, report=log.append, show_progress=False)
    assert [r["iter"] for r in log] == [0, 4, 6]
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    model, tok = load(tiny_dir, adapter_path=out)
    total = count = 0.0
    for r in PAIRS[:3]:
        ids, n_prompt = _by_hand(tok, r["prompt"], r["completion"])
        x = mx.array(ids)[None]
        nll = nn.losses.cross_entropy(model(x[:, :-1]).astype(mx.float32), x[:, 1:])[0]
        total, count = total + float(nll[n_prompt - 1:].sum()), count + len(ids) - n_prompt
    assert log[-1]["val_loss"] == pytest.approx(total / count, rel=1e-5)


@pytest.fixture(scope="module")
def sft_out(tiny_dir, tmp_path_factory):
    """`oisd-mlx sft` on a data folder (LoRA rank 4, scale 10, every block): the output folder."""
    root = tmp_path_factory.mktemp("sft")
    out = root / "out"
    result = runner.invoke(app, [
        "sft", str(tiny_dir), str(_data_folder(root / "data")), "--out", str(out), "--iters", "4",
        "--batch-size", "4", "--learning-rate", "1e-2", "--lora-rank", "4", "--lora-scale", "10",
        "--steps-per-eval", "2", "--val-batches", "1", "--seed", "3"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert result.output.count("val loss") == 3  # iters 0, 2, 4
    return out


def test_sft_writes_its_config_and_export_needs_no_base(sft_out, tiny_dir, tmp_path):
    cfg = yaml.safe_load((sft_out / "config.yaml").read_text())
    assert cfg["model"] == str(tiny_dir.resolve()) and cfg["algorithm"] == "sft"
    assert (cfg["iters"], cfg["batch_size"], cfg["learning_rate"], cfg["seed"]) == (4, 4, 0.01, 3)
    assert cfg["lora"] == {"rank": 4, "scale": 10.0, "dropout": 0.0, "num_layers": 4, "keys": None}
    assert cfg["data"]["train_format"] == "completions" and cfg["data"]["valid_rows"] == 3
    result = runner.invoke(app, ["export", str(sft_out / "adapters"), "--format", "peft",
                                 "--out", str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    peft = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft["base_model_name_or_path"] == str(tiny_dir.resolve())
    assert "`sft`" in (tmp_path / "peft" / "README.md").read_text()


def _rl_config(tmp_path, model, **over):
    data = tmp_path / "rl.jsonl"
    _write_jsonl(data, [{"q": f"What is {a} + {b}?", "a": a + b} for a in range(10, 14)
                        for b in range(20, 22)])
    cfg = {"model": str(model), "output_dir": str(tmp_path / "run"),
           "dataset": {"source": str(data), "prompt_field": "q", "answer_field": "a"},
           "algorithm": "oisd", "max_steps": 2, "batch_size": 2, "num_generations": 2,
           "max_completion_length": 6, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
           "lora": {**LORA, "num_layers": -1}, "oisd": {"student_layers": [1], "weighting": "none"},  # trains at zero reward
           "rewards": [{"name": "format"}], "save_every": 0, "seed": 0}
    cfg.update(over)
    return cfg


def _setup(cfg):
    from mlx_oisd.trainer import setup

    run = setup(validate(cfg))
    run.lock.release()
    return run


def _logits(model):
    return model(mx.array([[5, 17, 99, 3, 42, 7]]))


@pytest.mark.parametrize("lora", ["same", None])
def test_rl_starts_from_the_sft_adapters(sft_out, tiny_dir, tmp_path, lora):
    """LoRA: the run's model before its first update is the sft-adapted model; lora: null
    fuses the adapters into weights that all train. The KL reference is the base model."""
    from mlx_oisd.reference import reference_policy

    over = {"init_adapter": str(sft_out / "adapters"), "beta": 0.04} | ({} if lora else {"lora": None})
    run = _setup(_rl_config(tmp_path, tiny_dir, **over))
    assert any(n.startswith("init_adapter: ") for n in run.notes)
    sft_model, _ = load(tiny_dir, adapter_path=sft_out / "adapters")
    base, _ = load(tiny_dir)
    want = _logits(sft_model)
    assert float(mx.abs(want - _logits(base)).max()) > 1e-3  # the adapters do something
    if lora:
        np.testing.assert_array_equal(np.asarray(_logits(run.model)), np.asarray(want))
    else:
        np.testing.assert_allclose(np.asarray(_logits(run.model)), np.asarray(want), atol=1e-5)
        assert len(tree_flatten(run.model.trainable_parameters())) == len(
            tree_flatten(base.parameters()))
    with reference_policy(run.model, run.reference) as ref:
        np.testing.assert_array_equal(np.asarray(_logits(ref)), np.asarray(_logits(base)))


@pytest.mark.parametrize("over, message", [
    ({"lora": {**LORA, "rank": 8}},
     r"lora\.rank is 8, the adapter's is 4\); set lora\.rank: 4 to continue"),
    ({"lora": {**LORA, "num_layers": 2}},
     r"lora\.num_layers is 2, the adapter's is 4"),
    ({"lora": {**LORA, "keys": ["self_attn.q_proj"]}},
     r"init_adapter: .*adapters\.safetensors does not match the run's trainable parameters "
     r"\(not in the run's model: model\.layers\.0\.mlp"),
])
def test_lora_settings_that_differ_from_the_adapter_are_named(sft_out, tiny_dir, tmp_path,
                                                              over, message):
    cfg = _rl_config(tmp_path, tiny_dir, init_adapter=str(sft_out / "adapters"), **over)
    with pytest.raises(ConfigError, match=message):
        _setup(cfg)


def test_a_missing_or_foreign_init_adapter_is_named(tmp_path, tiny_dir):
    with pytest.raises(ConfigError, match=r"init_adapter: adapter folder .*nowhere.* does not exist"):
        _setup(_rl_config(tmp_path, tiny_dir, init_adapter=str(tmp_path / "nowhere")))
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    (peft / "adapter_model.safetensors").write_bytes(b"")
    result = runner.invoke(app, ["train", str(_yaml(tmp_path, init_adapter=str(peft),
                                                    model=str(tiny_dir))), "--quiet"])
    assert result.exit_code == 2
    assert "init_adapter: " in result.output and "missing adapters.safetensors" in result.output
    assert "looks like a PEFT export" in result.output


def _yaml(tmp_path, **over):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_rl_config(tmp_path, over.pop("model"), **over)))
    return path


def test_resume_ignores_init_adapter_and_continues_exactly(sft_out, tiny_dir, tmp_path):
    """Two steps then a resume to three (the init folder gone meanwhile) end with the adapters
    of three steps in one go."""
    init = tmp_path / "init"
    shutil.copytree(sft_out / "adapters", init)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for d in (whole, cut):
        d.mkdir()
    train = ["train", "--quiet"]
    for args in ([str(_yaml(whole, model=tiny_dir, init_adapter=str(init), max_steps=3))],
                 [str(_yaml(cut, model=tiny_dir, init_adapter=str(init), max_steps=2))]):
        result = runner.invoke(app, [train[0], *args, train[1]])
        assert result.exit_code == 0, result.output + repr(result.exception)
    shutil.rmtree(init)
    result = runner.invoke(app, [*train, str(cut / "cfg.yaml"), "--resume", "--set", "max_steps=3"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    a = mx.load(str(whole / "run" / "adapters" / "adapters.safetensors"))
    b = mx.load(str(cut / "run" / "adapters" / "adapters.safetensors"))
    start = mx.load(str(sft_out / "adapters" / "adapters.safetensors"))
    assert any(float(mx.abs(a[k] - start[k]).max()) > 0 for k in a)  # RL moved the adapters
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
