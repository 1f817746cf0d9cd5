"""bench/full_size.py: the Qwen3 architecture table, and random folders built by the same code at a
tiny size (sharded, tied and untied, 4-bit convert) that every loader reads. The real sizes are
never built here (0.6B alone is 1.2 GB)."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from bench.full_size import (
    QWEN3_ARCHS,
    QWEN3_SPECIAL_IDS,
    Qwen3Arch,
    build_folder,
    build_full_size,
    full_vocab_tokenizer,
    hf_config,
    main,
    quantized_dir,
    weight_shapes,
)
from mlx_oisd import load

# config.json of the Hub repository Qwen/Qwen3-0.6B, as published.
HUB_QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
# The model cards' "Number of Parameters (Non-Embedding)", in billions, and the digits they give.
CARD_NON_EMBEDDING = {"qwen3-0.6b": (0.44, 2), "qwen3-1.7b": (1.4, 1), "qwen3-4b": (3.6, 1),
                      "qwen3-8b": (6.95, 2)}
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=2048)


def test_config_is_the_hubs_for_0_6b():
    assert hf_config(QWEN3_ARCHS["qwen3-0.6b"]) == HUB_QWEN3_0_6B


@pytest.mark.parametrize("name", list(QWEN3_ARCHS))
def test_table_matches_the_model_cards(name):
    arch = QWEN3_ARCHS[name]
    shapes = dict(weight_shapes(hf_config(arch)))
    embedding = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    non_embedding = sum(math.prod(s) for s in shapes.values()) - embedding
    card, digits = CARD_NON_EMBEDDING[name]
    assert round(non_embedding / 1e9, digits) == card
    assert ("lm_head.weight" in shapes) == (not arch.tie_word_embeddings)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (
        arch.num_key_value_heads * arch.head_dim, arch.hidden_size)
    assert sum(k.endswith("q_proj.weight") for k in shapes) == arch.num_hidden_layers


def test_tokenizer_decodes_every_id_and_encodes_none_of_the_placeholders():
    tok = full_vocab_tokenizer(151936)
    assert tok.get_vocab_size() == 151936
    assert {t: tok.token_to_id(t) for t in QWEN3_SPECIAL_IDS} == QWEN3_SPECIAL_IDS
    rng = np.random.default_rng(0)
    for i in [0, 151642, 151646, 151935, *rng.integers(0, 151936, 50).tolist()]:
        assert tok.id_to_token(i) is not None
        assert tok.decode([i], skip_special_tokens=False) != ""  # nothing dropped silently
    text = "<|im_start|>user\nWhat is 12 + 35? <think>x</think> <|placeholder_7|><|im_end|>"
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    placeholders = {i for i in ids if tok.id_to_token(i).startswith("<|placeholder_")}
    assert not placeholders  # a placeholder's text encodes as ordinary tokens


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny_full(request, tmp_path_factory):
    arch = Qwen3Arch(tie_word_embeddings=request.param, **TINY)
    out = tmp_path_factory.mktemp("full") / "qwen3-tiny"
    return arch, build_folder(arch, out, quantize_bits=4, max_shard_bytes=200_000, seed=3)


def test_shards_and_index_as_transformers_writes_them(tiny_full):
    arch, folder = tiny_full
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    n = len(files)
    assert n > 1 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (folder / "model.safetensors").exists()
    weights = {}
    for f in files:
        shard = mx.load(str(folder / f))
        assert all(index["weight_map"][k] == f for k in shard)
        weights |= shard
    assert set(weights) == {name for name, _ in weight_shapes(hf_config(arch))}
    assert index["metadata"]["total_size"] == sum(w.nbytes for w in weights.values())
    assert {w.dtype for w in weights.values()} == {mx.bfloat16}
    assert ("lm_head.weight" in weights) == (not arch.tie_word_embeddings)
    q = np.array(weights["model.layers.1.mlp.up_proj.weight"].astype(mx.float32))
    assert abs(q.std() - 0.02) < 0.002 and abs(q.mean()) < 0.002
    norm = np.array(weights["model.layers.0.input_layernorm.weight"].astype(mx.float32))
    assert (norm == 1.0).all()
    config = json.loads((folder / "config.json").read_text())
    assert config == hf_config(arch) and config["torch_dtype"] == "bfloat16"
    assert not list(folder.parent.glob(".tmp-*"))  # built aside, renamed into place


def test_both_loaders_read_it_and_agree(tiny_full):
    import mlx_lm

    arch, folder = tiny_full
    model, tok = load(folder)
    reference, _ = mlx_lm.load(str(folder))
    ids = mx.array([tok.encode("<|im_start|>user\n2 + 3?<|im_end|>\n<|im_start|>assistant\n")])
    out = model.forward_internals(ids, hidden_layers=[1], attention_layers=[2])
    assert out.logits.shape == (1, ids.shape[1], arch.vocab_size)
    assert out.attention[2].shape == (1, arch.num_attention_heads, ids.shape[1], ids.shape[1])
    # bf16: the two implementations round differently, by about one bf16 step of the logits
    np.testing.assert_allclose(np.array(out.logits.astype(mx.float32)),
                               np.array(reference(ids).astype(mx.float32)), atol=1e-2)
    assert tok.eos_token_ids == {QWEN3_SPECIAL_IDS["<|im_end|>"] - (151936 - arch.vocab_size),
                                 QWEN3_SPECIAL_IDS["<|endoftext|>"] - (151936 - arch.vocab_size)}
    # any id the random model can sample decodes to text
    top = mx.argmax(out.logits[0], axis=-1).tolist()
    assert all(tok.decode([t]) for t in top + [arch.vocab_size - 1])


def test_4bit_convert_is_mlx_lms_quantization(tiny_full):
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model, quantize_model

    arch, folder = tiny_full
    qdir = quantized_dir(folder, 4)
    config = json.loads((qdir / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    model, tok = load(qdir)
    assert isinstance(model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert tok.chat_template == load(folder)[1].chat_template
    # the same as quantizing the bf16 model in memory with mlx-lm
    reference, ref_config = load_model(folder)
    reference, _ = quantize_model(reference, ref_config, 64, 4)
    ours = dict(tree_flatten(model.parameters()))
    for name, w in tree_flatten(reference.parameters()):
        np.testing.assert_array_equal(np.array(ours[name].astype(mx.float32)),
                                      np.array(w.astype(mx.float32)), err_msg=name)
    ids = mx.array([[1, 2, 3, 4]])
    assert model(ids).shape == (1, 4, arch.vocab_size)


def test_existing_folder_is_refused_and_errors_name_the_problem(tiny_full, capsys):
    _, folder = tiny_full
    with pytest.raises(FileExistsError, match="already exists"):
        build_folder(Qwen3Arch(tie_word_embeddings=True, **TINY), folder)
    empty = folder.parent / "empty"
    empty.mkdir()  # an empty folder is taken
    assert (build_folder(Qwen3Arch(tie_word_embeddings=True, **TINY), empty) / "config.json").is_file()
    with pytest.raises(ValueError, match="expected one of qwen3-0.6b, qwen3-1.7b"):
        build_full_size("qwen3-7b", folder.parent / "x")
    assert main(["qwen3-7b", str(folder.parent / "x")]) == 2
    assert "unknown architecture 'qwen3-7b'" in capsys.readouterr().err
    assert not (folder.parent / "x").exists()


def test_list_prints_the_four_sizes(capsys):
    assert main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(QWEN3_ARCHS)
    assert lines[-1].split()[1] == "8.19B"
