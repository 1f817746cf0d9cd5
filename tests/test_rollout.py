"""rollout.py: group sampling through mlx-lm's BatchGenerator, and the packed loss layout."""

import mlx.core as mx
import numpy as np
from conftest import batch_generate

from mlx_oisd import load
from mlx_oisd.rollout import Rollout, pack, sample


def test_greedy_groups_equal_direct_generation(make_tiny):
    """With a near-greedy sampler every member of a group equals mlx-lm's own generation from the
    full prompt: the shared prefill is the same computation."""
    model, tok = load(make_tiny(init_std=0.3, tie_word_embeddings=False, seed=5))
    prompts = [tok.encode("What is 1+2?"), tok.encode("hello there, friend")]
    ro = sample(model, prompts, group_size=3, max_tokens=10, stop_ids=tok.eos_token_ids,
                temperature=1e-4)
    ref = batch_generate(model, prompts, 10, tok.eos_token_ids)
    assert ro.completions == [ref[0]] * 3 + [ref[1]] * 3


def test_sampling_groups_truncation_and_eos(make_tiny):
    model, tok = load(make_tiny(init_std=0.3, tie_word_embeddings=False, seed=5))
    prompts = [tok.encode("a"), tok.encode("What is 12 + 35?")]
    mx.random.seed(0)
    ro = sample(model, prompts, group_size=4, max_tokens=6, stop_ids=tok.eos_token_ids)
    assert len(ro.completions) == 8 and ro.num_tokens == sum(map(len, ro.completions))
    assert len({tuple(c) for c in ro.completions}) > 1  # temperature 1 gives different samples
    stop = set(tok.eos_token_ids)
    for c, t in zip(ro.completions, ro.truncated):
        assert 1 <= len(c) <= 6
        assert t == (c[-1] not in stop)  # an EOS ends it (and is kept), else it hit max_tokens
        assert not any(x in stop for x in c[:-1])
    mx.random.seed(0)
    again = sample(model, prompts, group_size=4, max_tokens=6, stop_ids=tok.eos_token_ids)
    assert again.completions == ro.completions  # seeded: reproducible


def test_sampled_eos_is_kept(make_tiny):
    """A model that always emits EOS gives one-token completions [EOS], not empty ones."""
    model, tok = load(make_tiny())
    eos = tok.eos_token_id
    head = model.model.embed_tokens.weight
    model.model.embed_tokens.weight = head.at[eos].add(100.0 * model.model.norm.weight)  # huge logit
    ro = sample(model, [tok.encode("hi")], group_size=2, max_tokens=5, stop_ids=tok.eos_token_ids)
    assert ro.completions == [[eos], [eos]] and ro.truncated == [False, False]


def test_pack_layout():
    ro = Rollout(prompts=[[1, 2, 3], [4]], completions=[[5, 6], [7], [8, 9, 10], [11]],
                 truncated=[False, True, False, False], group_size=2)
    b = pack(ro, pad_id=0)
    assert b.prompt_len == 3
    np.testing.assert_array_equal(np.asarray(b.tokens), [
        [1, 2, 3, 5, 6, 0], [1, 2, 3, 7, 0, 0], [0, 0, 4, 8, 9, 10], [0, 0, 4, 11, 0, 0]])
    np.testing.assert_array_equal(np.asarray(b.mask), [
        [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(b.targets), [[5, 6, 0], [7, 0, 0], [8, 9, 10], [11, 0, 0]])
    np.testing.assert_array_equal(np.asarray(b.response_mask), [
        [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]])
    masked = pack(ro, pad_id=0, mask_truncated=True)
    np.testing.assert_array_equal(np.asarray(masked.response_mask)[1], [0, 0, 0])
    np.testing.assert_array_equal(np.asarray(b.group), [0, 0, 1, 1])
    np.testing.assert_array_equal(np.asarray(b.prompt_rows), [0, 2])


def test_select_reindexes_the_prompts():
    ro = Rollout(prompts=[[1, 2], [3], [4, 5]], completions=[[6], [7], [8], [9], [10], [11]],
                 truncated=[False] * 6, group_size=2)
    b = pack(ro, pad_id=0)
    sub = b.select(np.array([1, 4, 5]))  # the 2nd row of prompt 0, both rows of prompt 2
    np.testing.assert_array_equal(np.asarray(sub.group), [0, 1, 1])
    np.testing.assert_array_equal(np.asarray(sub.tokens)[np.asarray(sub.prompt_rows), :2],
                                  [[1, 2], [4, 5]])
    tail = b.select(slice(3, 6))  # starts inside prompt 1's group
    np.testing.assert_array_equal(np.asarray(tail.group), [0, 1, 1])
    np.testing.assert_array_equal(np.asarray(tail.targets)[:, 0], [9, 10, 11])


def _capped_cases(make_tiny):
    model, tok = load(make_tiny(init_std=0.3, tie_word_embeddings=False, seed=5))
    prompts = [tok.encode("What is 1+2?"), tok.encode("hello there, friend"), tok.encode("a")]
    return model, tok, prompts


def test_capped_greedy_rollout_equals_uncapped(make_tiny):
    """Greedy decoding: a cap below B*G (rows entering as others finish, groups split across
    waves) gives exactly the uncapped completions."""
    model, tok, prompts = _capped_cases(make_tiny)
    full = sample(model, prompts, 3, 12, tok.eos_token_ids, temperature=0.0)
    assert len({len(c) for c in full.completions}) > 1  # rows finish at different steps
    for cap in (1, 2, 4):
        capped = sample(model, prompts, 3, 12, tok.eos_token_ids, temperature=0.0, batch_size=cap)
        assert capped.completions == full.completions
        assert capped.truncated == full.truncated


def test_capped_sampled_rollout_equals_uncapped_with_row_seeds(make_tiny):
    """With `seed`, every row samples from its own key stream: temperature-1 / top-p samples are
    the same whatever the cap. Without it, one sampler draws for the whole decode batch, so a
    different batch composition gives different samples (only reproducible at a fixed cap)."""
    model, tok, prompts = _capped_cases(make_tiny)
    for temperature, top_p, cap in ((1.0, 1.0, 2), (0.8, 0.9, 5)):
        full = sample(model, prompts, 3, 8, tok.eos_token_ids, temperature, top_p, seed=7)
        assert len({tuple(c) for c in full.completions}) > 3  # real samples, not one answer
        capped = sample(model, prompts, 3, 8, tok.eos_token_ids, temperature, top_p,
                        batch_size=cap, seed=7)
        assert capped.completions == full.completions
    other = sample(model, prompts, 3, 8, tok.eos_token_ids, 0.8, 0.9, seed=8)
    assert other.completions != full.completions


def _rollout_peak(model, prompts, G, max_tokens, cap):
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    sample(model, prompts, G, max_tokens, stop_ids=[], batch_size=cap)
    return mx.get_peak_memory() - base


def test_capped_rollout_peak_grows_with_the_cap_not_with_the_batch(make_tiny):
    """KV cache: 8 kv heads x 64 dims x 4 blocks x 4 B = 16 KB per position and row, about 4 MB
    per row (mlx-lm allocates 256 positions at a time); the logits are negligible (V=261)."""
    model, tok = load(make_tiny(num_heads=8, num_kv_heads=8, head_dim=64, seed=1))
    prompts = [tok.encode("What is 1+2?"), tok.encode("hello there, friend")]
    row = 4 * 2 * 8 * 64 * 4 * 256
    two_of_8 = _rollout_peak(model, prompts, 4, 16, cap=2)
    two_of_16 = _rollout_peak(model, prompts * 2, 4, 16, cap=2)
    all_8 = _rollout_peak(model, prompts, 4, 16, cap=8)
    assert abs(two_of_16 - two_of_8) < row  # twice the rows, the same peak
    assert all_8 - two_of_8 > 4 * row  # six more rows decoding: about six more rows of cache


def test_top_k_1_sampling_is_greedy(make_tiny):
    """top_k=1 leaves one token per draw: at temperature 1, with or without row seeds, every
    completion is the greedy one. A top_k of at least the vocabulary filters nothing."""
    model, tok, prompts = _capped_cases(make_tiny)
    greedy = sample(model, prompts, 3, 8, tok.eos_token_ids, temperature=0.0)
    for seed in (None, 3):
        mx.random.seed(0)
        top1 = sample(model, prompts, 3, 8, tok.eos_token_ids, 1.0, top_k=1, seed=seed)
        assert top1.completions == greedy.completions
    free = sample(model, prompts, 3, 8, tok.eos_token_ids, 1.0, seed=3)
    whole = sample(model, prompts, 3, 8, tok.eos_token_ids, 1.0, seed=3, top_k=10_000)
    assert whole.completions == free.completions and free.completions != greedy.completions


PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])  # a fixed next-token distribution


def test_min_p_keeps_tokens_above_min_p_times_the_top_probability():
    """min_p 0.3 keeps p >= 0.3 * 0.4 = 0.12: the first three tokens; the kept log-probs are
    unchanged, and the result equals mlx-lm's apply_min_p."""
    from mlx_lm.sample_utils import apply_min_p

    from mlx_oisd.rollout import filter_logprobs

    logp = mx.array(np.log(PROBS)[None].astype(np.float32))
    out = np.asarray(filter_logprobs(logp, min_p=0.3))[0]
    keep = PROBS >= 0.3 * PROBS.max()  # independent reference
    assert keep.tolist() == [True, True, True, False, False, False]
    np.testing.assert_allclose(out[keep], np.log(PROBS[keep]), rtol=1e-6)
    assert np.all(np.isneginf(out[~keep]))
    np.testing.assert_array_equal(out, np.asarray(apply_min_p(logp, 0.3))[0])
    np.testing.assert_array_equal(np.asarray(filter_logprobs(logp)), np.asarray(logp))  # all off


def test_row_sampler_draws_only_from_the_filtered_set():
    """2,000 seeded draws at temperature 1: min_p 0.3 samples tokens 0-2 in proportion
    0.4 : 0.25 : 0.15; top_k 2 only tokens 0 and 1."""
    from mlx_oisd.rollout import row_sampler

    logp = mx.array(np.log(PROBS)[None].astype(np.float32))
    for kwargs, allowed in (({"min_p": 0.3}, 3), ({"top_k": 2}, 2)):
        draw = row_sampler(mx.random.key(1), 1.0, 1.0, **kwargs)
        counts = np.bincount([draw(logp).item() for _ in range(2000)], minlength=len(PROBS))
        assert counts[allowed:].sum() == 0
        expected = PROBS[:allowed] / PROBS[:allowed].sum()
        np.testing.assert_allclose(counts[:allowed] / 2000, expected, atol=0.04)
