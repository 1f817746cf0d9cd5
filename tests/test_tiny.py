"""tiny.py: random tiny Qwen3 folders that every loader reads."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_oisd import load
from mlx_oisd.tiny import TinySpec, build_tiny_model, build_tokenizer


def test_same_seed_same_weights_other_seed_other(tmp_path):
    a = mx.load(str(build_tiny_model(tmp_path / "a", TinySpec(seed=1)) / "model.safetensors"))
    b = mx.load(str(build_tiny_model(tmp_path / "b", TinySpec(seed=1)) / "model.safetensors"))
    c = mx.load(str(build_tiny_model(tmp_path / "c", TinySpec(seed=2)) / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a[name], c[name])


def test_spec_shapes_reach_the_model(make_tiny):
    folder = make_tiny(num_layers=2, num_heads=8, num_kv_heads=2, tie_word_embeddings=False,
                       vocab_size=300)
    model, tok = load(folder)
    assert len(model.layers) == 2 and model.args.vocab_size == 300
    assert model.layers[0].self_attn.n_kv_heads == 2 and "lm_head" in model
    assert len(tok.vocab) <= 300


def test_chat_template_renders_like_qwen3(tiny_dir):
    _, tok = load(tiny_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    off = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False,
                                  enable_thinking=False)
    assert off == text + "<think>\n\n</think>\n\n"
    # earlier assistant turns lose their reasoning, the last keeps it (re-laid out as Qwen3 does)
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>x</think>\n\nA"},
             {"role": "user", "content": "b"}, {"role": "assistant", "content": "<think>y</think>B"}]
    text = tok.apply_chat_template(turns, tokenize=False)
    assert "x" not in text and "assistant\nA<|im_end|>" in text
    assert text.endswith("assistant\n<think>\ny\n</think>\n\nB<|im_end|>\n")


def test_special_tokens_are_single_ids(tiny_dir):
    _, tok = load(tiny_dir)
    for t in ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"]:
        assert len(tok.encode(t)) == 1, t
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id


def test_transformers_reads_the_folder(tiny_dir):
    """The tokenizer and config load in transformers too (what export and the Hub rely on)."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    assert tok.eos_token == "<|im_end|>"
    config = transformers.AutoConfig.from_pretrained(str(tiny_dir))
    assert config.model_type == "qwen3"
    assert json.loads((tiny_dir / "config.json").read_text())["vocab_size"] == len(tok)


def test_larger_vocab_learns_merges():
    tok = build_tokenizer(400)
    assert tok.get_vocab_size() > 261
    assert len(tok.encode("put your final answer within").ids) < len("put your final answer within")
    with pytest.raises(ValueError, match="tokenizer_vocab must be >= 261"):
        build_tokenizer(100)
