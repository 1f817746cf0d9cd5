"""objective.py: the DESIGN.md invariants of the combined GRPO + OISD objective on a tiny model."""

from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_oisd import load
from mlx_oisd.lora import adapters_disabled
from mlx_oisd.objective import LossSpec, objective, objective_terms, policy_logprobs
from mlx_oisd.rollout import Rollout, pack

L = 4  # blocks of the tiny model
STUDENT = 2


@pytest.fixture
def model(make_tiny):
    model, _ = load(make_tiny(tie_word_embeddings=False, init_std=0.1, seed=3))
    return model


def _batch(vocab, G=2, seed=0):
    """Two prompts of different lengths, G completions of different lengths, one ending in EOS."""
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(5, vocab, 4)), list(rng.integers(5, vocab, 6))]
    lengths = [5, 3, 4, 2][: 2 * G]
    completions = [list(rng.integers(5, vocab, n)) for n in lengths]
    completions[0][-1] = 2  # a sampled EOS is a response token like any other
    rollout = Rollout(prompts, completions, [False, True, False, True][: 2 * G], G)
    return pack(rollout, pad_id=0)


def _inputs(model, spec, batch, adv=(1.0, -0.5, 0.7, -1.2)):
    old, _ = policy_logprobs(model, batch, spec)
    adv = mx.array(adv[: batch.tokens.shape[0]])
    return adv, old, batch.response_mask.sum(), batch.tokens.shape[0]


def _term_grads(model, batch, spec, term):
    adv, old, ntok, nseq = _inputs(model, spec, batch)

    def f(m):
        terms, _ = objective_terms(m, batch, adv, old, None, spec, ntok, nseq)
        return terms[term]

    _, grads = nn.value_and_grad(model, f)(model)
    return dict(tree_flatten(grads))


def _block(name):
    return int(name.split(".")[2]) + 1 if name.startswith("model.layers.") else None


def test_logit_alignment_gives_no_gradient_above_the_student(model):
    """Teacher detached: the logit-lens term alone moves nothing in blocks > l, and does move
    blocks <= l (full fine-tuning, every parameter trainable)."""
    spec = LossSpec(student_layers=(STUDENT,), lambda_attn=0.0)
    grads = _term_grads(model, _batch(model.args.vocab_size), spec, "logit")
    above = {n: g for n, g in grads.items() if (_block(n) or 0) > STUDENT}
    below = {n: g for n, g in grads.items() if _block(n) is not None and _block(n) <= STUDENT}
    assert above and all(float(mx.abs(g).max()) == 0.0 for g in above.values())
    assert all(float(mx.abs(g).max()) > 0 for n, g in below.items() if "mlp" in n or "q_proj" in n)


def test_attention_alignment_gives_no_gradient_above_the_student_nor_to_its_mlp(model):
    spec = LossSpec(student_layers=(STUDENT,), lambda_logit=0.0)
    grads = _term_grads(model, _batch(model.args.vocab_size), spec, "attn")
    for name, g in grads.items():
        b = _block(name)
        no_path = (b is not None and b > STUDENT) or (b == STUDENT and (
            ".mlp." in name or "post_attention_layernorm" in name or "v_proj" in name
            or "o_proj" in name)) or name in ("lm_head.weight", "model.norm.weight")
        if no_path:
            assert float(mx.abs(g).max()) == 0.0, name
    assert float(mx.abs(grads[f"model.layers.{STUDENT - 1}.self_attn.q_proj.weight"]).max()) > 0
    assert float(mx.abs(grads["model.layers.0.mlp.down_proj.weight"]).max()) > 0


def test_first_inner_iteration_has_ratio_exactly_one(model):
    batch = _batch(model.args.vocab_size)
    for spec in (LossSpec(student_layers=(STUDENT,)), LossSpec(algorithm="grpo"),
                 LossSpec(algorithm="bupo", student_layers=(STUDENT,), bupo_active=True)):
        adv, old, ntok, nseq = _inputs(model, spec, batch)
        _, stats = objective(model, batch, adv, old, None, spec, ntok, nseq)
        assert float(stats["ratio_sum"]) == float(stats["tokens"]), spec.algorithm
        assert float(stats["clip_low"]) == float(stats["clip_high"]) == 0


def test_first_iteration_takes_its_own_logprobs_as_old(model):
    """old_logp=None (the trainer's first inner iteration) equals passing the log-probs of a
    separate no-gradient pass: same loss, same gradients, and the returned log-probs and
    entropy are that pass's."""
    batch = _batch(model.args.vocab_size)
    spec = LossSpec(student_layers=(STUDENT,), chunk_size=3)
    adv, old, ntok, nseq = _inputs(model, spec, batch)
    _, entropy = policy_logprobs(model, batch, spec)
    grad = nn.value_and_grad(model, objective)
    (la, sa), ga = grad(model, batch, adv, old, None, spec, ntok, nseq)
    (lb, sb), gb = grad(model, batch, adv, None, None, spec, ntok, nseq)
    assert float(sb["ratio_sum"]) == float(sb["tokens"])
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-5)
    mask = batch.response_mask
    np.testing.assert_allclose(sb["logp"] * mask, old * mask, atol=1e-5)
    np.testing.assert_allclose(float(sb["entropy_sum"]), float((entropy * mask).sum()), rtol=1e-5)
    ga, gb = dict(tree_flatten(ga)), dict(tree_flatten(gb))
    for k in ga:
        np.testing.assert_allclose(gb[k], ga[k], atol=1e-5, err_msg=k)


def test_zero_lambdas_are_plain_grpo_bit_for_bit(model):
    batch = _batch(model.args.vocab_size)
    results = []
    for spec in (LossSpec(algorithm="grpo"), LossSpec(lambda_logit=0.0, lambda_attn=0.0)):
        adv, old, ntok, nseq = _inputs(model, spec, batch)
        loss, grads = nn.value_and_grad(model, objective)(model, batch, adv, old, None, spec, ntok, nseq)
        results.append((loss[0], dict(tree_flatten(grads))))
    (la, ga), (lb, gb) = results
    assert float(la) == float(lb)
    assert all(np.array_equal(np.asarray(ga[k]), np.asarray(gb[k])) for k in ga)


def test_policy_logprobs_equal_a_plain_forward_and_score_the_eos(model):
    """Recomputed log-probs equal log_softmax(model(tokens) / T) at the response tokens."""
    batch = _batch(model.args.vocab_size)
    spec = LossSpec(student_layers=(STUDENT,), temperature=0.7, chunk_size=3)
    logp, entropy = policy_logprobs(model, batch, spec)
    P = batch.prompt_len
    tokens, resp = np.asarray(batch.tokens), np.asarray(batch.response_mask)
    for i in range(tokens.shape[0]):
        n = int(resp[i].sum())
        start = int(np.argmax(np.asarray(batch.mask[i])))  # first real token of the row
        row = tokens[i, start:P + n]  # this row alone, no padding
        logits = np.asarray(model(mx.array(row[None, :-1])))[0].astype(np.float64) / 0.7
        logq = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        expected = logq[P - start - 1:, :][np.arange(n), row[P - start:]]
        np.testing.assert_allclose(np.asarray(logp[i, :n]), expected, atol=1e-4)
        ent = -(np.exp(logq) * logq).sum(-1)[P - start - 1:]
        np.testing.assert_allclose(np.asarray(entropy[i, :n]), ent, atol=1e-4)
    assert resp[0, 4] == 1 and tokens[0, P + 4] == 2  # the EOS is scored


def test_lora_disabled_reference_equals_the_base_model(make_tiny):
    folder = make_tiny(tie_word_embeddings=False, init_std=0.1, seed=3)
    base, _ = load(folder)
    model, _ = load(folder)
    model.freeze()
    linear_to_lora_layers(model, L, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    lora_b = [(n, p) for n, p in tree_flatten(model.trainable_parameters()) if n.endswith("lora_b")]
    model.load_weights([(n, 0.1 * mx.ones(p.shape)) for n, p in lora_b], strict=False)
    batch = _batch(model.args.vocab_size)
    spec = LossSpec(algorithm="grpo")
    with_lora, _ = policy_logprobs(model, batch, spec)
    with adapters_disabled(model):
        ref, _ = policy_logprobs(model, batch, spec)
    expected, _ = policy_logprobs(base, batch, spec)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(expected), atol=1e-6)
    assert float(mx.abs(with_lora - expected).max()) > 1e-3
    again, _ = policy_logprobs(model, batch, spec)  # scales restored afterwards
    np.testing.assert_array_equal(np.asarray(again), np.asarray(with_lora))


def test_bupo_scores_the_lens_policy_then_the_final_layer(model):
    batch = _batch(model.args.vocab_size)
    spec = LossSpec(algorithm="bupo", student_layers=(STUDENT,), bupo_active=True)
    internal, _ = policy_logprobs(model, batch, spec)
    final, _ = policy_logprobs(model, batch, replace(spec, bupo_active=False))
    grpo, _ = policy_logprobs(model, batch, LossSpec(algorithm="grpo"))
    np.testing.assert_array_equal(np.asarray(final), np.asarray(grpo))
    assert float(mx.abs(internal - final).max()) > 1e-3
    grads = _term_grads(model, batch, spec, "policy")  # the lens policy: blocks > l untouched
    assert all(float(mx.abs(g).max()) == 0 for n, g in grads.items() if (_block(n) or 0) > STUDENT)


def test_lora_gradients_taken_ahead_equal_recomputed(make_tiny, monkeypatch):
    """Under LoRA the head is frozen and the chunked readout takes its gradients in the forward
    pass; the OISD objective's LoRA gradients equal those of the recomputing path."""
    from mlx_oisd import losses
    from mlx_oisd import objective as objective_module
    from mlx_oisd.lora import apply_lora, lora_parameters

    model, _ = load(make_tiny(tie_word_embeddings=False, init_std=0.1, seed=3))
    apply_lora(model, -1, lora_parameters(4, 20.0, 0.0, None))
    for m in model.modules():  # nonzero B so every LoRA matrix gets a gradient
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(5)) * 0.1
    batch = _batch(model.args.vocab_size)
    spec = LossSpec(student_layers=(STUDENT,), chunk_size=3, tau=0.7)
    adv, _, ntok, nseq = _inputs(model, spec, batch)
    grad = nn.value_and_grad(model, objective)

    (la, _), ga = grad(model, batch, adv, None, None, spec, ntok, nseq)

    def recomputing(h, targets, students, readout, params, temperature, tau, chunk_size,
                    head_grad=True):
        out = losses._token_stats(h, targets, readout, params, temperature, chunk_size, True,
                                  students, tau, grad_ahead=False)
        return out[0], out[1], out[2:2 + len(students)], out[2 + len(students):]

    monkeypatch.setattr(objective_module, "token_logprobs_lens_js", recomputing)
    (lb, _), gb = grad(model, batch, adv, None, None, spec, ntok, nseq)
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-6)
    ga, gb = dict(tree_flatten(ga)), dict(tree_flatten(gb))
    assert ga.keys() == gb.keys() and all("lora" in k for k in ga)
    for k in ga:
        assert float(mx.abs(gb[k]).max()) > 0, k
        np.testing.assert_allclose(ga[k], gb[k], atol=1e-5, rtol=1e-4, err_msg=k)


def _half_and_float32(folder, setup: str):
    """The same weights twice: as saved (half precision) and cast to float32; `setup` lora,
    full or qlora (4-bit base, LoRA). LoRA matrices are float32 in both, equal, B nonzero."""
    from mlx_oisd.lora import apply_lora, lora_parameters

    models = []
    for cast in (False, True):
        model, _ = load(folder)
        if setup == "qlora":
            nn.quantize(model, group_size=32, bits=4)  # scales in the model's dtype
        if cast:  # quantized codes are integers: only scales, biases and other weights change
            model.set_dtype(mx.float32)
        if setup != "full":
            mx.random.seed(11)
            apply_lora(model, -1, lora_parameters(4, 20.0, 0.0, None))
            for i, m in enumerate(m for m in model.modules() if hasattr(m, "lora_b")):
                m.lora_b = 0.1 * mx.random.normal(m.lora_b.shape, key=mx.random.key(i))
        models.append(model)
    return models


@pytest.mark.parametrize("dtype,setup,algorithm,compiled", [
    ("bfloat16", "lora", "oisd", False), ("bfloat16", "lora", "oisd", True),
    ("bfloat16", "full", "oisd", False), ("bfloat16", "full", "oisd", True),
    ("bfloat16", "qlora", "oisd", False), ("bfloat16", "lora", "bupo", False),
    ("bfloat16", "full", "bupo", True), ("bfloat16", "lora", "grpo", True),
    ("float16", "lora", "oisd", False), ("float16", "full", "oisd", True),
    ("float16", "qlora", "bupo", False),
])
@pytest.mark.parametrize("terms", ["all", "alignment"])
def test_half_precision_objective_and_gradients_match_float32(make_tiny, dtype, setup, algorithm,
                                                               compiled, terms):
    """bf16 / fp16 bases (what users train) give the float32 model's objective and gradients
    within half-precision tolerance, gradients in each parameter's own dtype and finite.
    `alignment`: zero advantages with `weighting: none` leave the OISD terms alone, so a lost
    or mis-cast alignment gradient cannot hide behind the policy term's.

    Tolerances: the relative error of the whole gradient measured here is about 0.1 in bf16
    and 0.007 in fp16 (8 vs 11 mantissa bits; the same ratio as their epsilons)."""
    from mlx_oisd.objective import ObjectiveGrad

    folder = make_tiny(tie_word_embeddings=setup != "full", init_std=0.1, seed=3, dtype=dtype)
    half, full = _half_and_float32(folder, setup)
    batch = _batch(half.args.vocab_size)
    align = terms == "alignment"
    spec = LossSpec(algorithm=algorithm, student_layers=(STUDENT,), bupo_active=True, chunk_size=3,
                    beta=0.0 if align else 0.05, weighting="none" if align else "advantage")
    adv = mx.zeros(4) if align else mx.array([1.0, -0.5, 0.7, -1.2])
    results = []
    for model in (half, full):
        ref, _ = policy_logprobs(model, batch, replace(spec, lambda_logit=0.0, lambda_attn=0.0))
        (loss, stats), grads = ObjectiveGrad(model, compiled)(
            batch, adv, None, ref, spec, batch.response_mask.sum(), 4)
        mx.eval(loss, grads)
        results.append((loss, stats, sorted(tree_flatten(grads))))
    (loss_h, stats_h, grads_h), (loss_f, _, grads_f) = results
    assert loss_h.dtype == mx.float32 and float(stats_h["ratio_sum"]) == float(stats_h["tokens"])
    tol = 0.03 if dtype == "bfloat16" else 0.004
    assert abs(float(loss_h) - float(loss_f)) <= tol * max(abs(float(loss_f)), 0.1)
    params_h = dict(tree_flatten(half.trainable_parameters()))
    assert [k for k, _ in grads_h] == [k for k, _ in grads_f] and grads_h
    assert all(g.dtype == params_h[k].dtype for k, g in grads_h)
    g_h = np.concatenate([np.asarray(g.astype(mx.float32)).ravel() for _, g in grads_h])
    g_f = np.concatenate([np.asarray(g).ravel() for _, g in grads_f])
    assert np.isfinite(g_h).all()
    if algorithm != "oisd" and align:  # no alignment term: nothing but zeros on both sides
        assert not g_h.any() and not g_f.any()
        return
    assert np.linalg.norm(g_f) > 0
    assert np.linalg.norm(g_h - g_f) <= (0.2 if dtype == "bfloat16" else 0.03) * np.linalg.norm(g_f)


@pytest.mark.parametrize("setup", ["lora", "full"])
@pytest.mark.parametrize("prompt_len", [1, 5])
def test_gradient_checkpointing_gives_the_same_objective_and_gradients(make_tiny, setup,
                                                                       prompt_len):
    """Each block recomputed in the backward pass (the shared-prompt pass with its gathered keys
    and values, the attention rows OISD reads, and the no-prompt path): loss and gradients equal
    those of the stored-activation pass."""
    from mlx_oisd.lora import apply_lora, lora_parameters
    from mlx_oisd.objective import ObjectiveGrad

    model, _ = load(make_tiny(tie_word_embeddings=False, init_std=0.1, seed=3))
    if setup == "lora":
        mx.random.seed(11)
        apply_lora(model, -1, lora_parameters(4, 20.0, 0.0, None))
        for i, m in enumerate(m for m in model.modules() if hasattr(m, "lora_b")):
            m.lora_b = 0.1 * mx.random.normal(m.lora_b.shape, key=mx.random.key(i))
    rng = np.random.default_rng(0)
    V = model.args.vocab_size
    prompts = [list(rng.integers(5, V, prompt_len)), list(rng.integers(5, V, prompt_len))]
    rollout = Rollout(prompts, [list(rng.integers(5, V, n)) for n in (5, 3, 4, 2)], [False] * 4, 2)
    batch = pack(rollout, pad_id=0)
    spec = LossSpec(student_layers=(STUDENT,), chunk_size=3)
    adv = mx.array([1.0, -0.5, 0.7, -1.2])
    model.train()
    results = []
    for flag in (False, True):
        model.model.grad_checkpoint = flag
        (loss, _), grads = ObjectiveGrad(model, False)(batch, adv, None, None, spec,
                                                      batch.response_mask.sum(), 4)
        results.append((float(loss), dict(tree_flatten(grads))))
    model.model.grad_checkpoint = False
    (la, ga), (lb, gb) = results
    assert la == pytest.approx(lb, rel=1e-6) and ga.keys() == gb.keys()
    for k in ga:
        np.testing.assert_allclose(np.asarray(gb[k]), np.asarray(ga[k]), atol=1e-6, rtol=1e-5,
                                   err_msg=k)
    assert any(float(mx.abs(g).max()) > 0 for g in gb.values())


def test_head_grad_off_keeps_the_logit_term_out_of_the_norm_and_head(make_tiny):
    """oisd.head_grad: false (full fine-tuning, tied head): the logit-lens term gives the final
    norm no gradient and the tied embedding only its input-side gradient; every block's
    gradient is the same as with head_grad on (the forward pass is unchanged)."""
    model, _ = load(make_tiny(tie_word_embeddings=True, init_std=0.1, seed=3))
    batch = _batch(model.args.vocab_size)
    on = LossSpec(student_layers=(STUDENT,), chunk_size=3)
    g_on = _term_grads(model, batch, on, "logit")
    g_off = _term_grads(model, batch, replace(on, head_grad=False), "logit")
    assert float(mx.abs(g_on["model.norm.weight"]).max()) > 0
    assert float(mx.abs(g_off["model.norm.weight"]).max()) == 0
    emb = "model.embed_tokens.weight"
    assert float(mx.abs(g_on[emb] - g_off[emb]).max()) > 1e-6  # the head's share is gone
    for name in g_on:
        if name.startswith("model.layers."):
            np.testing.assert_allclose(np.asarray(g_off[name]), np.asarray(g_on[name]),
                                       atol=1e-6, err_msg=name)


@pytest.mark.parametrize("norm", [False, True])
def test_bupo_lens_norm_reads_the_internal_policy_with_or_without_the_final_norm(model, norm):
    """bupo.lens_norm: the internal policy is log_softmax(W_U h^l) (BuPO's default) or
    log_softmax(W_U N_L(h^l)), computed here from the model's own blocks, independently."""
    rng = np.random.default_rng(1)  # no padding: every prompt and completion the same length
    V = model.args.vocab_size
    batch = pack(Rollout([list(rng.integers(5, V, 4)) for _ in range(2)],
                         [list(rng.integers(5, V, 3)) for _ in range(4)], [False] * 4, 2), 0)
    spec = LossSpec(algorithm="bupo", student_layers=(STUDENT,), bupo_active=True,
                    bupo_lens_norm=norm, lens_norm=not norm)  # oisd's lens_norm plays no part
    logp, _ = policy_logprobs(model, batch, spec)
    h = model.model.embed_tokens(batch.inputs)
    T = batch.inputs.shape[1]
    causal = mx.triu(mx.full((T, T), -mx.inf), k=1)
    for layer in model.model.layers[:STUDENT]:
        h = layer(h, causal, None)
    h = model.model.norm(h) if norm else h
    logits = model.lm_head(h)
    expected = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    P = batch.prompt_len
    expected = mx.take_along_axis(expected[:, P - 1:], batch.targets[..., None], axis=-1)[..., 0]
    mask = np.asarray(batch.response_mask) > 0
    np.testing.assert_allclose(np.asarray(logp)[mask], np.asarray(expected)[mask], atol=2e-5)


def test_lens_metrics_count_top1_agreement_and_js_by_advantage_sign(model):
    """The per-student lens sums of the loss chunks equal a direct computation: top-1 agreement
    of W_U N_L(h^l) with the final layer's logits, and the lens JS, on response tokens, overall
    and on rows with A > 0 / A < 0."""
    from mlx_oisd.losses import js_divergence
    from mlx_oisd.objective import forward

    batch = _batch(model.args.vocab_size)
    spec = LossSpec(student_layers=(1, STUDENT), chunk_size=3, tau=0.8)
    adv, old, ntok, nseq = _inputs(model, spec, batch, adv=(1.0, -0.5, 0.0, 2.0))
    _, stats = objective_terms(model, batch, adv, old, None, spec, ntok, nseq)
    hidden, _ = forward(model, batch, spec)
    final = model.lens(hidden[L])
    mask = np.asarray(batch.response_mask) > 0
    a = np.asarray(adv)
    for l in spec.student_layers:
        student = model.lens(hidden[l])
        agree = np.asarray(mx.argmax(student, -1) == mx.argmax(final, -1))
        js = np.asarray(js_divergence(student, final, 0.8))
        for suffix, rows in (("", a == a), ("_pos", a > 0), ("_neg", a < 0)):
            keep = mask & rows[:, None]
            assert float(stats[f"lens_agree{suffix}_sum/l{l}"]) == agree[keep].sum()
            np.testing.assert_allclose(float(stats[f"lens_js{suffix}_sum/l{l}"]), js[keep].sum(),
                                       rtol=1e-4)
    assert float(stats["tokens_pos"]) == mask[a > 0].sum() and float(stats["tokens_neg"]) == mask[a < 0].sum()
