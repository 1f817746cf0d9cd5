"""losses.py against numpy references and hand-computed cases (tiny arrays: CPU MLX is slow)."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_oisd.losses import (
    AGG_MODES,
    aggregate,
    attention_js_loss,
    js_divergence,
    lens_js_loss,
    policy_loss,
    token_logprobs,
    token_logprobs_entropy,
    token_logprobs_lens_js,
    weighted_alignment,
)

EPS, EPS_HIGH = 0.2, 0.28
RAGGED = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=np.float32)  # [B=3, T=4]


def _np(x):
    return np.array(x, dtype=np.float64)


def _log_softmax_np(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _js_np(p, q):
    """JS between probability rows over the last axis, 0 log 0 = 0."""
    m = 0.5 * (p + q)

    def kl(a, b):
        safe = np.where(a > 0, a, 1.0)
        return np.where(a > 0, a * np.log(safe / np.where(a > 0, b, 1.0)), 0.0).sum(axis=-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def _softmax_np(x):
    return np.exp(_log_softmax_np(x))


# ---------------------------------------------------------------- policy loss


def test_on_policy_reduces_to_reinforce():
    rng = np.random.default_rng(0)
    logp = mx.array(rng.normal(size=(3, 4)).astype(np.float32))
    adv = mx.array([1.5, -0.5, 2.0])
    mask = mx.array(RAGGED)

    def total(lp):
        per_token, _ = policy_loss(lp, lp, adv, mask, EPS, EPS_HIGH)
        return per_token.sum()

    per_token, stats = policy_loss(logp, logp, adv, mask, EPS, EPS_HIGH)
    expected = -_np(adv)[:, None] * RAGGED
    np.testing.assert_allclose(_np(per_token), expected, rtol=1e-6)
    assert float(stats["ratio_sum"]) == float(stats["tokens"]) == RAGGED.sum()  # ratio == 1 exactly
    # d/dlogp of -ratio*A at ratio 1 is -A (REINFORCE), zero on padding
    np.testing.assert_allclose(_np(mx.grad(total)(logp)), expected, rtol=1e-6)


def test_ratio_clips_to_epsilon_bounds():
    old = mx.zeros((1, 3))
    logp = mx.array([[2.0, -2.0, 2.0]])  # ratios e^2, e^-2, e^2
    mask = mx.ones((1, 3))
    loss_pos, stats_pos = policy_loss(logp, old, mx.array([1.0]), mask, EPS, EPS_HIGH)
    loss_neg, stats_neg = policy_loss(logp, old, mx.array([-1.0]), mask, EPS, EPS_HIGH)
    # A > 0: e^2 clips to 1 + eps_high; e^-2 is below the range but min keeps the smaller ratio*A
    np.testing.assert_allclose(
        _np(loss_pos), [[-(1 + EPS_HIGH), -math.exp(-2), -(1 + EPS_HIGH)]], rtol=1e-6
    )
    # A < 0: e^-2 clips to 1 - eps; e^2 is not clipped (the pessimistic bound keeps ratio*A)
    np.testing.assert_allclose(_np(loss_neg), [[math.exp(2), 1 - EPS, math.exp(2)]], rtol=1e-6)
    assert int(stats_pos["clip_high"]) == 2 and int(stats_pos["clip_low"]) == 0
    assert int(stats_neg["clip_high"]) == 0 and int(stats_neg["clip_low"]) == 1


def test_clipped_tokens_get_zero_gradient():
    old = mx.zeros((2, 3))
    logp = mx.array([[2.0, 0.1, -2.0], [-2.0, -0.1, 2.0]])
    adv = mx.array([1.0, -1.0])
    mask = mx.ones((2, 3))

    def total(lp):
        return policy_loss(lp, old, adv, mask, EPS, EPS_HIGH)[0].sum()

    grad = _np(mx.grad(total)(logp))
    # clipped: (0,0) ratio e^2 with A>0, (1,0) ratio e^-2 with A<0
    assert grad[0, 0] == 0.0 and grad[1, 0] == 0.0
    # in range: -A * ratio
    np.testing.assert_allclose(grad[0, 1], -math.exp(0.1), rtol=1e-6)
    np.testing.assert_allclose(grad[1, 1], math.exp(-0.1), rtol=1e-6)
    # outside the range on the unclipped side: still -A * ratio
    np.testing.assert_allclose(grad[0, 2], -math.exp(-2.0), rtol=1e-6)
    np.testing.assert_allclose(grad[1, 2], math.exp(2.0), rtol=1e-5)


@pytest.mark.parametrize("garbage", [-1e9, -12345.0, -math.inf])
def test_padding_garbage_gives_same_loss_and_no_nan(garbage):
    rng = np.random.default_rng(1)
    base = rng.normal(size=(3, 4)).astype(np.float32)
    old = base + 0.05
    ref = base - 0.1
    adv = mx.array([1.0, -2.0, 0.5])
    mask = mx.array(RAGGED)

    def run(pad_value):
        lp = mx.array(np.where(RAGGED > 0, base, pad_value).astype(np.float32))
        old_lp = mx.array(np.where(RAGGED > 0, old, 3 * pad_value).astype(np.float32))

        def total(x):
            per_token, _ = policy_loss(x, old_lp, adv, mask, EPS, EPS_HIGH, mx.array(ref), 0.1)
            return per_token.sum()

        return mx.value_and_grad(total)(lp)

    clean_loss, clean_grad = run(0.0)
    loss, grad = run(garbage)
    assert np.isfinite(_np(loss)) and np.all(np.isfinite(_np(grad)))
    np.testing.assert_allclose(_np(loss), _np(clean_loss), rtol=1e-6)
    np.testing.assert_allclose(_np(grad), _np(clean_grad), rtol=1e-6)
    assert np.all(_np(grad)[RAGGED == 0] == 0.0)


def test_k3_matches_numpy():
    rng = np.random.default_rng(2)
    logp = rng.normal(size=(3, 4)).astype(np.float32)
    ref = logp + rng.normal(scale=0.5, size=(3, 4)).astype(np.float32)
    adv = np.array([0.3, -1.0, 2.0], dtype=np.float32)
    beta = 0.04
    per_token, stats = policy_loss(
        mx.array(logp),
        mx.array(logp),
        mx.array(adv),
        mx.array(RAGGED),
        EPS,
        EPS_HIGH,
        ref_logp=mx.array(ref),
        beta=beta,
    )
    d = _np(ref) - _np(logp)
    k3 = np.exp(d) - d - 1.0
    np.testing.assert_allclose(
        _np(per_token), (-adv[:, None] + beta * k3) * RAGGED, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(float(stats["k3_sum"]), (k3 * RAGGED).sum(), rtol=1e-5)


def test_k3_is_zero_when_reference_equals_policy():
    logp = mx.array([[-1.0, -2.0, -0.5]])
    per_token, stats = policy_loss(
        logp, logp, mx.array([0.0]), mx.ones((1, 3)), EPS, EPS_HIGH, ref_logp=logp, beta=1.0
    )
    assert float(stats["k3_sum"]) == 0.0 and np.all(_np(per_token) == 0.0)


# ---------------------------------------------------------------- aggregation


def _aggregate_np(per_token, mask, mode, max_len):
    if mode == "token_mean":
        return (per_token * mask).sum() / mask.sum()
    sums = [
        sum(per_token[b, t] for t in range(mask.shape[1]) if mask[b, t]) for b in range(len(mask))
    ]
    if mode == "seq_mean_token_mean":
        return np.mean([s / mask[b].sum() for b, s in enumerate(sums)])
    return np.mean([s / max_len for s in sums])


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_matches_numpy_on_ragged_mask(mode):
    rng = np.random.default_rng(3)
    per_token = rng.normal(size=RAGGED.shape).astype(np.float32)
    per_token[RAGGED == 0] = 1e6  # padding values must be ignored
    got = aggregate(mx.array(per_token), mx.array(RAGGED), mode, max_len=6)
    np.testing.assert_allclose(
        float(got), _aggregate_np(_np(per_token), RAGGED, mode, 6), rtol=1e-5
    )


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batches_add_up_to_full_batch(mode):
    rng = np.random.default_rng(4)
    per_token = mx.array(rng.normal(size=RAGGED.shape).astype(np.float32))
    mask = mx.array(RAGGED)
    full = aggregate(per_token, mask, mode, max_len=6)
    parts = [
        aggregate(
            per_token[rows], mask[rows], mode, num_tokens=mask.sum(), num_sequences=3, max_len=6
        )
        for rows in (slice(0, 1), slice(1, 3))
    ]
    np.testing.assert_allclose(float(parts[0] + parts[1]), float(full), rtol=1e-5)


def test_aggregate_rejects_bad_modes():
    with pytest.raises(ValueError, match="expected one of"):
        aggregate(mx.zeros((1, 2)), mx.ones((1, 2)), "sum")
    with pytest.raises(ValueError, match="max_len"):
        aggregate(mx.zeros((1, 2)), mx.ones((1, 2)), "seq_mean_token_sum_norm")


# ---------------------------------------------------------------- JS on logits


def test_js_divergence_matches_numpy_and_is_symmetric():
    rng = np.random.default_rng(5)
    p = rng.normal(scale=3.0, size=(4, 7)).astype(np.float32)
    q = rng.normal(scale=3.0, size=(4, 7)).astype(np.float32)
    tau = 0.7
    got = js_divergence(mx.array(p), mx.array(q), tau)
    ref = _js_np(_softmax_np(_np(p) / tau), _softmax_np(_np(q) / tau))
    np.testing.assert_allclose(_np(got), ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        _np(js_divergence(mx.array(q), mx.array(p), tau)), _np(got), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(_np(js_divergence(mx.array(p), mx.array(p), tau)), 0.0, atol=1e-6)


def test_js_divergence_is_bounded_by_ln2():
    p = mx.array([[80.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    q = mx.array([[0.0, 80.0, 0.0], [0.0, 0.0, 0.0]])
    js = _np(js_divergence(p, q))
    assert np.all(js <= math.log(2) + 1e-6)
    np.testing.assert_allclose(js[0], math.log(2), rtol=1e-5)  # disjoint supports


def test_js_divergence_teacher_gets_no_gradient():
    rng = np.random.default_rng(6)
    p = mx.array(rng.normal(size=(2, 5)).astype(np.float32))
    q = mx.array(rng.normal(size=(2, 5)).astype(np.float32))
    gp, gq = mx.grad(lambda a, b: js_divergence(a, b).sum(), argnums=(0, 1))(p, q)
    assert np.all(_np(gq) == 0.0)
    assert np.abs(_np(gp)).max() > 1e-3


# ---------------------------------------------------------------- chunked readout

B, T, D, V = 2, 4, 5, 7  # B*T = 8 rows: chunks of 3 leave a remainder


def _readout(params, h):
    normed = h * mx.rsqrt((h * h).mean(axis=-1, keepdims=True) + 1e-6) * params["g"]
    return normed @ params["W"].T


def _readout_np(params, h):
    normed = h / np.sqrt((h * h).mean(axis=-1, keepdims=True) + 1e-6) * params["g"]
    return normed @ params["W"].T


def _fixture(seed):
    rng = np.random.default_rng(seed)
    params = {
        "W": rng.normal(size=(V, D)).astype(np.float32),
        "g": rng.normal(1.0, 0.2, D).astype(np.float32),
    }
    student = rng.normal(size=(B, T, D)).astype(np.float32)
    teacher = rng.normal(size=(B, T, D)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=np.float32)
    return params, student, teacher, mask


def _mx_params(params):
    return {k: mx.array(v) for k, v in params.items()}


def test_lens_js_chunked_matches_numpy():
    params, student, teacher, mask = _fixture(7)
    tau = 1.3
    js, stats = lens_js_loss(
        mx.array(student),
        mx.array(teacher),
        _readout,
        _mx_params(params),
        mx.array(mask),
        tau,
        chunk_size=3,
    )
    p = _softmax_np(_readout_np(params, _np(student)) / tau)
    q = _softmax_np(_readout_np(params, _np(teacher)) / tau)
    ref = _js_np(p, q) * mask
    np.testing.assert_allclose(_np(js), ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(stats["js_sum"]), ref.sum(), rtol=1e-5)
    assert float(stats["tokens"]) == mask.sum()


def test_lens_js_chunked_gradients_match_unchunked():
    params, student, teacher, mask = _fixture(8)
    tau = 0.9
    mparams, mmask, mteacher = _mx_params(params), mx.array(mask), mx.array(teacher)

    def chunked(prm, s, t):
        return lens_js_loss(s, t, _readout, prm, mmask, tau, chunk_size=3)[0].sum()

    def reference(prm, s, t):  # JS from probabilities, one pass, no checkpoint
        p = mx.softmax(_readout(prm, s) / tau, axis=-1)
        q = mx.softmax(mx.stop_gradient(_readout(prm, t)) / tau, axis=-1)
        m = 0.5 * (p + q)
        js = 0.5 * (p * mx.log(p / m)).sum(-1) + 0.5 * (q * mx.log(q / m)).sum(-1)
        return (js * mmask).sum()

    got = mx.grad(chunked, argnums=(0, 1, 2))(mparams, mx.array(student), mteacher)
    want = mx.grad(reference, argnums=(0, 1, 2))(mparams, mx.array(student), mteacher)
    for key in ("W", "g"):
        assert np.abs(_np(got[0][key])).max() > 1e-4  # the readout's parameters are trained
        np.testing.assert_allclose(_np(got[0][key]), _np(want[0][key]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_np(got[1]), _np(want[1]), rtol=1e-4, atol=1e-6)
    assert np.all(_np(got[1])[0, 3] == 0.0)  # masked position
    assert np.all(_np(got[2]) == 0.0)  # teacher hidden states are detached


def test_token_logprobs_chunked_matches_numpy_and_unchunked_gradients():
    params, h, _, _ = _fixture(9)
    targets = np.random.default_rng(9).integers(0, V, size=(B, T)).astype(np.int32)
    temp = 0.8
    mparams, mtargets = _mx_params(params), mx.array(targets)
    logp = token_logprobs(mx.array(h), mtargets, _readout, mparams, temp, chunk_size=3)
    full = _log_softmax_np(_readout_np(params, _np(h)) / temp)
    ref = np.take_along_axis(full, targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(_np(logp), ref, rtol=1e-5, atol=1e-6)

    weights = mx.array(np.random.default_rng(10).normal(size=(B, T)).astype(np.float32))

    def chunked(prm, x):
        return (token_logprobs(x, mtargets, _readout, prm, temp, chunk_size=3) * weights).sum()

    def reference(prm, x):  # one-hot pick, whole batch at once
        logits = _readout(prm, x) / temp
        one_hot = mx.arange(V)[None, None, :] == mtargets[..., None]
        picked = mx.where(one_hot, logits, 0.0).sum(-1)
        return ((picked - mx.logsumexp(logits, axis=-1)) * weights).sum()

    got = mx.grad(chunked, argnums=(0, 1))(mparams, mx.array(h))
    want = mx.grad(reference, argnums=(0, 1))(mparams, mx.array(h))
    for key in ("W", "g"):
        np.testing.assert_allclose(_np(got[0][key]), _np(want[0][key]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_np(got[1]), _np(want[1]), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- attention JS


def _causal_attention(rng, b, h, tq, tk, offset):
    """Random softmax rows over keys <= offset + query index (exact zeros above)."""
    scores = rng.normal(scale=2.0, size=(b, h, tq, tk))
    allowed = np.arange(tk)[None, :] <= (offset + np.arange(tq))[:, None]  # [tq, tk]
    e = np.where(allowed, np.exp(scores), 0.0)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def test_attention_js_matches_numpy_with_causal_zeros():
    rng = np.random.default_rng(11)
    student = _causal_attention(rng, 2, 3, 3, 5, offset=2)
    teacher = _causal_attention(rng, 2, 3, 3, 5, offset=2)
    qmask = np.array([[1, 1, 1], [1, 1, 0]], dtype=np.float32)
    js, stats = attention_js_loss(mx.array(student), mx.array(teacher), mask=mx.array(qmask))
    ref = _js_np(_np(student), _np(teacher)).mean(axis=1) * qmask  # [B, Tq]
    np.testing.assert_allclose(_np(js), ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(stats["js_sum"]), ref.sum(), rtol=1e-5)
    assert float(stats["tokens"]) == qmask.sum()

    gs, gt = mx.grad(lambda s, t: attention_js_loss(s, t)[0].sum(), argnums=(0, 1))(
        mx.array(student), mx.array(teacher)
    )
    assert np.all(np.isfinite(_np(gs))) and np.abs(_np(gs)).max() > 1e-4
    assert np.all(_np(gt) == 0.0)


def test_attention_js_key_mask_excludes_padding_keys():
    rng = np.random.default_rng(12)
    student = _causal_attention(rng, 1, 2, 2, 4, offset=2)
    teacher = _causal_attention(rng, 1, 2, 2, 4, offset=2)
    key_mask = np.array([[[0, 1, 1, 0], [0, 1, 1, 1]]], dtype=np.float32)  # key 0 is padding
    js, _ = attention_js_loss(mx.array(student), mx.array(teacher), key_mask=mx.array(key_mask))

    def renorm(a):
        a = a * key_mask[:, None]
        return a / a.sum(-1, keepdims=True)

    ref = _js_np(renorm(_np(student)), renorm(_np(teacher))).mean(axis=1)
    np.testing.assert_allclose(_np(js), ref, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- weighting


def test_weighted_alignment_modes():
    js = mx.array([[0.1, 0.2], [0.3, 0.0]])
    adv = mx.array([-2.0, 0.5])
    np.testing.assert_allclose(
        _np(weighted_alignment(js, adv, "advantage")), [[-0.2, -0.4], [0.15, 0.0]], rtol=1e-6
    )
    np.testing.assert_allclose(
        _np(weighted_alignment(js, adv, "sign")), [[-0.1, -0.2], [0.3, 0.0]], rtol=1e-6
    )
    np.testing.assert_allclose(_np(weighted_alignment(js, adv, "none")), _np(js))
    with pytest.raises(ValueError, match="expected one of"):
        weighted_alignment(js, adv, "abs")


def test_shared_readout_equals_separate_policy_and_lens_passes():
    """One chunked pass reading the final layer out once (policy logits and detached teacher)
    gives the values and gradients of `token_logprobs_entropy` + `lens_js_loss` separately."""
    params, student, final, mask = _fixture(9)
    targets = mx.array(np.random.default_rng(9).integers(0, V, (B, T)))
    mp, mmask = _mx_params(params), mx.array(mask)
    temp, tau = 0.8, 1.3

    def fused(prm, s, h):
        logp, ent, (js,), _ = token_logprobs_lens_js(h, targets, [s], _readout, prm, temp, tau, 3)
        return (logp * mmask).sum() + (js * mmask).sum(), (logp, ent, js)

    def separate(prm, s, h):
        logp, ent = token_logprobs_entropy(h, targets, _readout, prm, temp, chunk_size=3)
        js, _ = lens_js_loss(s, h, _readout, prm, mmask, tau, chunk_size=3)
        return (logp * mmask).sum() + js.sum(), (logp, ent, js)

    (_, got), g_got = mx.value_and_grad(fused, argnums=(0, 1, 2))(mp, mx.array(student), mx.array(final))
    (_, want), g_want = mx.value_and_grad(separate, argnums=(0, 1, 2))(mp, mx.array(student), mx.array(final))
    for a, b in zip(got, want):
        np.testing.assert_allclose(_np(a) * mask, _np(b) * mask, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(g_got[0]["W"]), _np(g_want[0]["W"]), rtol=1e-4, atol=1e-6)
    for i in (1, 2):
        np.testing.assert_allclose(_np(g_got[i]), _np(g_want[i]), rtol=1e-4, atol=1e-6)



@pytest.mark.parametrize("tau", [0.8, 1.3])
def test_frozen_readout_takes_gradients_ahead_exactly(tau):
    """With a frozen readout (params {}, as under LoRA) the chunked pass takes its gradients in
    the forward pass: same values and the same gradients for the final layer's and the
    students' streams as separate passes with recomputation, for weighted (non-uniform)
    cotangents on every output, over several chunks."""
    params, final, student, mask = _fixture(11)
    rng = np.random.default_rng(11)
    other = mx.array(rng.normal(size=final.shape).astype(np.float32))
    targets = mx.array(rng.integers(0, V, (B, T)))
    frozen = _mx_params(params)

    def readout(_, h):  # closes over the weights: nothing to train
        return _readout(frozen, h)

    w = [mx.array(rng.normal(size=(B, T)).astype(np.float32)) for _ in range(4)]
    temp = 0.8

    def fused(h, s1, s2):
        logp, ent, (j1, j2), _ = token_logprobs_lens_js(h, targets, [s1, s2], readout, {}, temp,
                                                     tau, chunk_size=3)
        return (w[0] * logp + w[1] * ent + w[2] * j1 + w[3] * j2).sum(), (logp, ent, j1, j2)

    def separate(h, s1, s2):
        logp, ent = token_logprobs_entropy(h, targets, readout, {}, temp, chunk_size=3)
        j1, _ = lens_js_loss(s1, h, readout, {}, mx.ones((B, T)), tau, chunk_size=3)
        j2, _ = lens_js_loss(s2, h, readout, {}, mx.ones((B, T)), tau, chunk_size=3)
        return (w[0] * logp + w[2] * j1 + w[3] * j2).sum() + (w[1] * ent).sum(), (logp, ent, j1, j2)

    args = (mx.array(final), mx.array(student), other)
    (_, got), g_got = mx.value_and_grad(fused, argnums=(0, 1, 2))(*args)
    (_, want), g_want = mx.value_and_grad(separate, argnums=(0, 1, 2))(*args)
    for a, b in zip(got, want):
        np.testing.assert_allclose(_np(a), _np(b), rtol=1e-5, atol=1e-6)
    for a, b in zip(g_got, g_want):
        assert np.abs(_np(b)).max() > 1e-3
        np.testing.assert_allclose(_np(a), _np(b), rtol=1e-4, atol=1e-6)


def test_attention_js_gradient_equals_autograd_of_the_formula():
    """The closed-form gradient of the attention JS equals autograd through the plain formula,
    for a student that is a softmax with causal zeros (as the model's attention rows are)."""
    from mlx_oisd.losses import _prob_js_value

    rng = np.random.default_rng(13)
    scores = mx.array(rng.normal(scale=2.0, size=(2, 3, 3, 5)).astype(np.float32))
    allowed = mx.array(np.arange(5)[None, :] <= (2 + np.arange(3))[:, None])
    teacher = mx.array(_causal_attention(rng, 2, 3, 3, 5, offset=2))
    weights = mx.array(rng.normal(size=(2, 3)).astype(np.float32))

    def student(z):
        return mx.softmax(mx.where(allowed, z, mx.finfo(mx.float32).min), axis=-1)

    def closed(z):
        return (attention_js_loss(student(z), teacher)[0] * weights).sum()

    def plain(z):
        return (_prob_js_value(student(z), teacher).mean(axis=1) * weights).sum()

    np.testing.assert_allclose(float(closed(scores)), float(plain(scores)), rtol=1e-6)
    got, want = mx.grad(closed)(scores), mx.grad(plain)(scores)
    assert np.abs(_np(want)).max() > 1e-3
    np.testing.assert_allclose(_np(got), _np(want), rtol=1e-4, atol=1e-7)


def test_gspo_sequence_ratio_clip_and_gradient_by_hand():
    """importance_sampling_level sequence: s_i = exp(mean_t(l - l_old)) over the sequence's own
    tokens, L_t = -min(s_i A_i, clip(s_i) A_i) on each of them; d sum(L) / d l_t = -A_i s_i / n_i
    * n_i = -A_i s_i where unclipped, 0 where clipped (and at padding)."""
    from mlx_oisd.losses import policy_loss

    logp = mx.array([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0], [-1.0, -1.0, -1.0]])
    old = mx.array([[-1.1, -1.9, -0.6], [-0.35, -0.6, 0.0], [-1.5, -1.5, -1.5]])
    mask = mx.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = mx.array([1.0, -2.0, 0.5])
    eps, eps_high = 0.03, 0.04
    d = np.asarray(logp - old) * np.asarray(mask)
    n = np.asarray(mask).sum(1)
    s = np.exp(d.sum(1) / n)  # [1.0339, 0.9753, 1.6487]: row 2 beyond 1 + eps_high with A > 0
    A = np.asarray(adv)
    loss = -np.minimum(s * A, np.clip(s, 1 - eps, 1 + eps_high) * A)
    per_token, stats = policy_loss(logp, old, adv, mask, eps, eps_high, level="sequence")
    np.testing.assert_allclose(np.asarray(per_token), loss[:, None] * np.asarray(mask), rtol=1e-6)
    assert float(stats["clip_high"]) == 3 and float(stats["clip_low"]) == 0
    np.testing.assert_allclose(float(stats["ratio_sum"]), (s * n).sum(), rtol=1e-6)
    grad = mx.grad(lambda lp: policy_loss(lp, old, adv, mask, eps, eps_high, level="sequence")[0].sum())(logp)
    unclipped = np.array([s[0] < 1 + eps_high, s[1] > 1 - eps, False])
    expected = np.where(unclipped, -A * s, 0.0)[:, None] * np.asarray(mask)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-7)


def test_gspo_equals_grpo_on_single_token_completions():
    from mlx_oisd.losses import policy_loss

    logp, old = mx.array([[-1.0], [-0.2]]), mx.array([[-1.05], [-0.1]])
    adv, mask = mx.array([1.0, -1.0]), mx.ones((2, 1))
    tok, _ = policy_loss(logp, old, adv, mask, 0.2, 0.28)
    seq, _ = policy_loss(logp, old, adv, mask, 0.2, 0.28, level="sequence")
    np.testing.assert_allclose(np.asarray(seq), np.asarray(tok), rtol=1e-6)
