"""models/qwen3.py: parity with Hugging Face transformers and with mlx-lm's own Qwen3."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, batch_generate

from mlx_oisd import load
from mlx_oisd.loading import load_model

HF_CASES = ["tied_gqa1", "untied_gqa2", "tied_gqa4"]
TOL = 1e-4


def _max_err(ours, ref, valid):
    """Max abs error over the entries where `valid` (broadcastable) is true."""
    diff = np.abs(np.asarray(ours, dtype=np.float64) - ref)
    return float(np.where(valid, diff, 0.0).max())


@pytest.mark.parametrize("case", HF_CASES)
def test_matches_transformers_on_padded_batch(case):
    """Logits, every block's residual stream and every block's attention map equal transformers'
    (eager attention, float32) on the valid positions of a right-padded batch."""
    folder = FIXTURES / "hf_qwen3" / case
    ref = np.load(folder / "reference.npz")
    model, _ = load_model(folder)
    L = model.args.num_hidden_layers
    ids, mask = mx.array(ref["input_ids"]), mx.array(ref["attention_mask"])
    out = model.forward_internals(
        ids, hidden_layers=list(range(1, L + 1)), attention_layers=list(range(1, L + 1)), mask=mask
    )
    valid = ref["attention_mask"].astype(bool)  # (B, T)
    assert _max_err(out.logits, ref["logits"], valid[..., None]) < TOL
    for l in range(1, L + 1):
        assert _max_err(out.hidden[l], ref[f"hidden_{l}"], valid[..., None]) < TOL, l
        rows = valid[:, None, :, None]  # valid query rows; padded keys must be 0 in both
        assert _max_err(out.attention[l], ref[f"attn_{l}"], rows) < TOL, l
        padded_keys = ~valid[:, None, None, :] & rows
        assert float(np.where(padded_keys, np.asarray(out.attention[l]), 0).max()) == 0.0


@pytest.mark.parametrize("case", HF_CASES)
def test_transformers_4_config_loads_the_same(case, tmp_path):
    """A config.json written by transformers 4.x (rope_theta, no rope_parameters) loads to the
    same model as the 5.x one."""
    import json
    import shutil

    src = FIXTURES / "hf_qwen3" / case
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    config = json.loads((src / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = rope.get("rope_theta", config.get("rope_theta"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    ref = np.load(src / "reference.npz")
    model, _ = load_model(tmp_path)
    valid = ref["attention_mask"].astype(bool)[..., None]
    logits = model.forward_internals(
        mx.array(ref["input_ids"]), mask=mx.array(ref["attention_mask"])
    ).logits
    assert _max_err(logits, ref["logits"], valid) < TOL


def test_internals_logits_equal_call(tiny_dir):
    model, _ = load(tiny_dir)
    ids = mx.random.randint(0, model.args.vocab_size, (2, 10), key=mx.random.key(1))
    out = model.forward_internals(ids, hidden_layers=[2, 4], attention_layers=[1, 3])
    np.testing.assert_allclose(out.logits, model(ids), atol=1e-5)
    # the last block's residual stream through the final norm and head is the model's output
    np.testing.assert_allclose(model.lens(out.hidden[4]), out.logits, atol=1e-5)


def test_query_start_returns_the_tail_rows(tiny_dir):
    model, _ = load(tiny_dir)
    ids = mx.random.randint(0, model.args.vocab_size, (2, 9), key=mx.random.key(2))
    mask = mx.array([[1] * 9, [1] * 6 + [0] * 3])
    full = model.forward_internals(ids, attention_layers=[2], mask=mask)
    tail = model.forward_internals(ids, attention_layers=[2], mask=mask, query_start=5)
    assert tail.attention[2].shape == (2, 4, 4, 9)
    np.testing.assert_allclose(tail.attention[2], full.attention[2][:, :, 5:], atol=1e-6)
    np.testing.assert_allclose(tail.logits, full.logits, atol=1e-5)


def test_padding_never_changes_valid_positions(tiny_dir):
    """A right-padded row (any pad ids) gives the same valid outputs as the row alone; left
    padding does too (rows that are all padding must not produce NaN)."""
    model, _ = load(tiny_dir)
    row = mx.random.randint(0, model.args.vocab_size, (1, 6), key=mx.random.key(3))
    alone = model.forward_internals(row, hidden_layers=[3], attention_layers=[3])
    junk = mx.array([[7, 7, 7]])
    right = mx.concatenate([row, junk], axis=1)
    left = mx.concatenate([junk, row], axis=1)
    ones, zeros = mx.ones((1, 6), mx.int32), mx.zeros((1, 3), mx.int32)
    r = model.forward_internals(right, hidden_layers=[3], attention_layers=[3],
                                mask=mx.concatenate([ones, zeros], axis=1))
    lft = model.forward_internals(left, hidden_layers=[3], attention_layers=[3],
                                  mask=mx.concatenate([zeros, ones], axis=1))
    np.testing.assert_allclose(r.logits[:, :6], alone.logits, atol=1e-5)
    np.testing.assert_allclose(r.attention[3][..., :6, :6], alone.attention[3], atol=1e-6)
    # RoPE sees only relative positions, so a left shift leaves valid outputs unchanged
    np.testing.assert_allclose(lft.logits[:, 3:], alone.logits, atol=1e-4)
    np.testing.assert_allclose(lft.hidden[3][:, 3:], alone.hidden[3], atol=1e-4)
    assert not np.isnan(np.asarray(lft.logits)).any()


def test_explicit_attention_blocks_keep_the_output(tiny_dir):
    """Capturing attention (explicit softmax) in every block leaves the logits as the fused path."""
    model, _ = load(tiny_dir)
    ids = mx.random.randint(0, model.args.vocab_size, (2, 8), key=mx.random.key(4))
    mask = mx.array([[1] * 8, [1] * 5 + [0] * 3])
    fused = model.forward_internals(ids, mask=mask)
    explicit = model.forward_internals(ids, attention_layers=[1, 2, 3, 4], mask=mask)
    valid = np.asarray(mask).astype(bool)[..., None]
    assert _max_err(explicit.logits, np.asarray(fused.logits), valid) < 1e-5


def test_shared_prefix_equals_the_concatenated_rows_values_and_gradients(tiny_dir):
    """Each prefix computed once and gathered for its rows gives what the full rows give at the
    suffix positions, and the same parameter gradients (the shared prefix's add up over its
    rows). One prefix is left-padded, two suffixes are right-padded."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model, _ = load(tiny_dir)
    rng = np.random.default_rng(0)
    U, G, S, C = 2, 3, 5, 4
    prefix = rng.integers(5, model.args.vocab_size, (U, S))
    pmask = np.ones((U, S), np.int32)
    pmask[1, :2] = 0
    suffix = rng.integers(5, model.args.vocab_size, (U * G, C))
    smask = np.ones((U * G, C), np.int32)
    smask[1, 3:] = smask[4, 2:] = 0
    group = np.repeat(np.arange(U), G)
    full = mx.array(np.concatenate([prefix[group], suffix], 1))
    fmask = mx.array(np.concatenate([pmask[group], smask], 1))
    valid = mx.array(smask)[..., None].astype(mx.float32)
    w = mx.array(rng.normal(size=(model.args.hidden_size,)).astype(np.float32))

    def score(out, h):  # a scalar reading every captured output at valid suffix positions
        return ((h @ w)[..., None] * valid).sum() + (out.attention[3].sum(1) * valid).sum()

    def via_full(m):
        out = m.forward_internals(full, [2], [3], fmask, query_start=S, return_logits=False)
        return score(out, out.hidden[2][:, S:]), out

    def via_shared(m):
        out = m.forward_shared_prefix(mx.array(prefix), mx.array(pmask),
                                      mx.array(group.astype(np.int32)), mx.array(suffix),
                                      mx.array(smask), [2], [3])
        return score(out, out.hidden[2]), out

    _, a = via_full(model)
    _, b = via_shared(model)
    assert b.hidden[2].shape == (U * G, C, model.args.hidden_size)
    assert b.attention[3].shape == a.attention[3].shape == (U * G, 4, C, S + C)
    np.testing.assert_allclose(b.hidden[2] * valid, a.hidden[2][:, S:] * valid, atol=1e-5)
    np.testing.assert_allclose(b.attention[3] * valid[:, None], a.attention[3] * valid[:, None],
                               atol=1e-6)
    ga = dict(tree_flatten(nn.value_and_grad(model, lambda m: via_full(m)[0])(model)[1]))
    gb = dict(tree_flatten(nn.value_and_grad(model, lambda m: via_shared(m)[0])(model)[1]))
    assert float(mx.abs(ga["model.layers.0.self_attn.k_proj.weight"]).max()) > 0
    for k in ga:
        np.testing.assert_allclose(gb[k], ga[k], atol=1e-4, rtol=1e-4, err_msg=k)


@pytest.mark.parametrize("bad", [0, 5, -1])
def test_block_index_out_of_range(tiny_dir, bad):
    model, _ = load(tiny_dir)
    ids = mx.zeros((1, 4), mx.int32)
    with pytest.raises(ValueError, match=r"out of range; blocks are numbered 1\.\.4"):
        model.forward_internals(ids, hidden_layers=[bad])
    with pytest.raises(ValueError, match="attention_layers"):
        model.forward_internals(ids, attention_layers=[bad])


def test_same_as_mlx_lm_qwen3_generation(make_tiny):
    """Greedy generation (mlx-lm's generate, KV cache) and batched generation (mlx-lm's
    BatchGenerator) from our model equal those from mlx-lm's own Qwen3 on the same weights."""
    import mlx_lm
    from mlx_lm.generate import generate

    folder = make_tiny(init_std=0.3, tie_word_embeddings=False, seed=5)  # peaked, varied output
    ours, tok = load(folder)
    theirs, _ = mlx_lm.load(str(folder))
    assert type(theirs).__module__ == "mlx_lm.models.qwen3"
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}],
                                     add_generation_prompt=True, tokenize=False)
    a = generate(ours, tok, prompt, max_tokens=24)
    b = generate(theirs, tok, prompt, max_tokens=24)
    assert a == b and len(a) > 0

    prompts = [tok.encode(p) for p in ["hello", "What is 12 + 35?", "abc"]]

    stop = tok.eos_token_ids
    assert batch_generate(ours, prompts, 12, stop) == batch_generate(theirs, prompts, 12, stop)
