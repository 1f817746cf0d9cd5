"""loading.py: folders, quantized folders, adapters, and the errors a user can cause."""

import json
import re
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import hub_error
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_oisd import load
from mlx_oisd.loading import ModelLoadError, load_model
from mlx_oisd.models.qwen3 import Model


def _ids(model, shape=(2, 7), seed=0):
    return mx.random.randint(0, model.args.vocab_size, shape, key=mx.random.key(seed))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_load_returns_our_model_and_a_chat_tokenizer(tiny_dir):
    model, tok = load(tiny_dir)
    assert isinstance(model, Model)
    assert tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    text = "Compute 12+35, then \\boxed{47}."
    assert tok.decode(tok.encode(text)) == text


def test_untied_head_and_gqa_variants_load(make_tiny):
    for fields in ({"tie_word_embeddings": False}, {"num_heads": 4, "num_kv_heads": 1}):
        model, _ = load(make_tiny(**fields))
        assert ("lm_head" in model) == (not fields.get("tie_word_embeddings", True))
        assert model(_ids(model)).shape == (2, 7, model.args.vocab_size)


def test_unknown_model_type(tiny_dir, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"model_type 'llama' is not supported.*qwen3"):
        load(folder)


def test_missing_folder_and_bad_folders(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load("./relative/nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(tmp_path / "empty")


def test_missing_weights(tiny_dir, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.*safetensors"):
        load(folder)


def test_unreachable_hub_id_is_a_clear_error():
    # HF_HUB_OFFLINE=1 (conftest): the Hub cannot be asked, and the error says what to do
    with pytest.raises(ModelLoadError, match=re.escape(
            "offline mode is on (HF_HUB_OFFLINE=1) and model 'nobody/no-such-model' is not in the "
            "local Hugging Face cache; unset HF_HUB_OFFLINE to download it, or pass a local "
            "model folder")):
        load("nobody/no-such-model")


@pytest.mark.parametrize("kind, message", [
    ("connect", "the Hugging Face Hub cannot be reached (ConnectError: [Errno -2] Name or service "
                "not known) and model 'o/m' is not in the local Hugging Face cache; check the "
                "network (or proxy), or pass a local model folder"),
    ("404", "model 'o/m' does not exist on the Hugging Face Hub; check the id"),
    ("gated", "model 'o/m' is gated or private and this machine may not read it; accept its "
              "terms on https://huggingface.co/o/m and log in with `hf auth login`"),
])
def test_hub_model_failure_is_named_after_one_request(hub_down, kind, message):
    """snapshot_download's first request (repo_info) fails: one request, then the message."""
    calls = hub_down(hub_error(kind))
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        load("o/m")
    assert calls == ["repo_info"]


def test_hub_model_comes_from_the_cache_when_the_hub_is_unreachable(hub_down, tiny_dir,
                                                                    tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hub" / "models--o--cached"
    shutil.copytree(tiny_dir, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    calls = hub_down(hub_error("connect"))
    model, _ = load("o/cached")
    assert isinstance(model, Model) and calls == ["repo_info"]


def test_unknown_builtin():
    with pytest.raises(ModelLoadError, match=r"'builtin:huge'; expected one of (builtin:[\w-]+, )*builtin:tiny, builtin:tiny-arith"):
        load("builtin:huge")


def test_builtin_tiny_is_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_OISD_CACHE", str(tmp_path))
    model, _ = load("builtin:tiny")
    weights = tmp_path / "models" / "tiny" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again, _ = load("builtin:tiny")
    assert weights.stat().st_mtime_ns == stamp
    ids = _ids(model)
    np.testing.assert_array_equal(model(ids), again(ids))


def _save_lora_adapter(model, folder, lora_parameters, num_layers):
    """An adapter folder as mlx-lm's `lora` command writes it, with non-zero B matrices."""
    linear_to_lora_layers(model, num_layers, lora_parameters)
    lora_b = [(n, p) for n, p in tree_flatten(model.trainable_parameters()) if n.endswith("lora_b")]
    keys = mx.random.split(mx.random.key(0), len(lora_b))
    model.load_weights(
        [(n, 0.05 * mx.random.normal(p.shape, key=k)) for k, (n, p) in zip(keys, lora_b)],
        strict=False,
    )
    folder.mkdir()
    adapters = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(folder / "adapters.safetensors"), adapters)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": lora_parameters}
    ))


def test_lora_adapter_folder(tiny_dir, tmp_path):
    model, _ = load(tiny_dir)
    model.freeze()
    ids = _ids(model)
    base = model(ids)
    params = {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj"]}
    _save_lora_adapter(model, tmp_path / "ad", params, num_layers=2)
    expected = model(ids)
    assert float(mx.abs(expected - base).max()) > 1e-3  # the adapter changes the model
    loaded, _ = load(tiny_dir, adapter_path=tmp_path / "ad")
    np.testing.assert_allclose(loaded(ids), expected, atol=1e-5)
    # forward_internals runs through the LoRA layers too
    np.testing.assert_allclose(loaded.forward_internals(ids, attention_layers=[4]).logits,
                               expected, atol=1e-5)


def test_bad_adapter_folders(tiny_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="adapter folder .* does not exist"):
        load(tiny_dir, adapter_path=tmp_path / "none")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="missing adapters.safetensors"):
        load(tiny_dir, adapter_path=tmp_path / "half")


def test_quantized_mlx_lm_folder(tiny_dir, tmp_path):
    """A folder written by mlx-lm's convert (8-bit) loads as our class, quantized, and stays
    close to the float model."""
    from mlx_lm import convert

    out = tmp_path / "q8"
    convert(str(tiny_dir), mlx_path=str(out), quantize=True, q_bits=8, q_group_size=32)
    qmodel, _ = load(out)
    assert isinstance(qmodel, Model)
    assert isinstance(qmodel.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    model, _ = load(tiny_dir)
    ids = _ids(model)
    out_q = qmodel.forward_internals(ids, hidden_layers=[2], attention_layers=[2])
    ref = model.forward_internals(ids, hidden_layers=[2], attention_layers=[2])
    assert float(mx.abs(out_q.attention[2] - ref.attention[2]).max()) < 0.02
    # 8-bit weights move the logits by a small fraction of their spread
    spread = float(ref.logits.std())
    assert float(mx.abs(out_q.logits - ref.logits).mean()) < 0.02 * spread


def test_load_model_skips_the_tokenizer(tiny_dir, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).unlink()
    model, path = load_model(folder)
    assert path == folder and isinstance(model, Model)


def test_missing_tokenizer_or_chat_template_is_found_at_load(tiny_dir, tmp_path):
    bare = _copy(tiny_dir, tmp_path / "bare")
    (bare / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(bare))}: no tokenizer files"):
        load(bare)
    plain = _copy(tiny_dir, tmp_path / "plain")
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in plain.glob("chat_template.*"):
        extra.unlink()
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(plain))}: the tokenizer has no chat template"):
        load(plain)


def test_truncated_weight_file_is_named(tiny_dir, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "cut")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(weights))}: truncated, {len(data) // 2} bytes "
                       rf"where its header describes {len(data)}"):
        load(folder)
    weights.write_bytes(b"\x05")  # not even a header
    with pytest.raises(ModelLoadError, match="not a safetensors file, or truncated"):
        load_model(folder)


@pytest.mark.parametrize("text, message", [
    ("{not json", "adapter_config.json: not valid JSON"),
    ("[1, 2]", "adapter_config.json: expected a JSON object"),
    ('{"fine_tune_type": "lora", "num_layers": 2}', "adapter_config.json: missing keys"),
    ('{"num_layers": 2, "lora_parameters": {"rank": 4}}', "lora_parameters with rank, scale and dropout"),
])
def test_invalid_adapter_config_names_the_file(tiny_dir, tmp_path, text, message):
    model, _ = load(tiny_dir)
    model.freeze()
    folder = tmp_path / "ad"
    _save_lora_adapter(model, folder, {"rank": 4, "scale": 10.0, "dropout": 0.0}, num_layers=2)
    (folder / "adapter_config.json").write_text(text)
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        load(tiny_dir, adapter_path=folder)


def test_truncated_adapter_weights_are_named(tiny_dir, tmp_path):
    model, _ = load(tiny_dir)
    model.freeze()
    folder = tmp_path / "ad"
    _save_lora_adapter(model, folder, {"rank": 4, "scale": 10.0, "dropout": 0.0}, num_layers=2)
    weights = folder / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=re.escape(f"{weights}: truncated")):
        load(tiny_dir, adapter_path=folder)
