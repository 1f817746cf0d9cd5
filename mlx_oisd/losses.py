"""The GRPO + OISD objective as pure functions over ``mx.array`` (DESIGN.md section 1).

Shapes: B = sequences (B*G rows of a step), T = response positions, D = hidden size,
V = vocabulary, H = query heads, Tq/Tk = attention query/key positions. ``mask [B, T]`` is 1.0 on
response tokens and 0.0 on padding.

    L = agg(L_pg + beta*k3) + lambda_logit * agg(w_i * JS_logit) + lambda_attn * agg(w_i * JS_attn)

- ``policy_loss``:       L_pg = -min(ratio*A, clip(ratio, 1-eps, 1+eps_high)*A),
                         ratio = e^(l - l_old),  k3 = e^(l_ref - l) - (l_ref - l) - 1
- ``aggregate``:         ``loss_agg`` token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
- ``lens_js_loss``:      JS(softmax(W_U N_L(h^l)/tau) || stop_gradient(softmax(W_U N_L(h^L)/tau)))
- ``attention_js_loss``: mean over heads of JS(a^l_{h,t,:} || stop_gradient(a^L_{h,t,:}))
- ``weighted_alignment``: w_i * JS with w_i = A_i, sign(A_i) or 1
- ``token_logprobs``:    log softmax(readout(h)/T_s) at the sampled tokens

Loss functions return ``(per_token, stats)``; ``stats`` holds unnormalised sums over masked
tokens (token counts, clip counts, sums of ratio/k3/JS) that the trainer adds across
micro-batches and divides at the metrics boundary. Nothing here calls ``.item()``.

Teachers are detached with ``mx.stop_gradient`` where they are formed, never by relying on a
kernel's VJP (STYLE.md habit 2). Divergences are computed in float32.

The vocabulary readout is chunked: ``(B*T, V)`` float32 logits for the whole batch never exist.
Chunks are computed one after another and the backward pass recomputes each chunk's logits
instead of keeping them (``_map_row_chunks``). Only the arguments of the chunked function are
differentiated (arrays the readout closes over would get no gradient, silently), so the readout
takes its trainable arrays explicitly: ``readout(params, h) -> logits``. For a module:

    head = Readout(model.model.norm, model.lm_head)         # any nn.Module h -> logits
    def readout(params, h):
        head.update(params)                                 # as mlx.nn.utils.checkpoint does
        return head(h)
    params = head.trainable_parameters()                    # {} when the head is frozen (LoRA)
"""

import functools
from collections.abc import Callable
from functools import partial
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
WEIGHTINGS = ("advantage", "sign", "none")
Readout = Callable[[Any, mx.array], mx.array]


def policy_loss(
    logp: mx.array,
    old_logp: mx.array,
    adv: mx.array,
    mask: mx.array,
    epsilon: float,
    epsilon_high: float,
    ref_logp: mx.array | None = None,
    beta: float = 0.0,
    level: str = "token",
) -> tuple[mx.array, dict[str, mx.array]]:
    """Clipped GRPO surrogate plus the k3 KL to the reference, per response token.

        ratio = exp(logp - stop_gradient(old_logp))             level "token" (GRPO)
        ratio = exp(mean_t(logp - stop_gradient(old_logp)))     level "sequence" (GSPO), one
                                                                per sequence, on all its tokens
        L_pg  = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)
        k3    = exp(ref - logp) - (ref - logp) - 1,  ref = stop_gradient(ref_logp)
        loss  = (L_pg + beta * k3) * mask

    Args:
        logp: [B, T] log pi_theta of the sampled tokens (differentiated).
        old_logp: [B, T] log-probs of the policy that sampled (detached here).
        adv: [B] advantage per sequence.
        mask: [B, T] 1.0 on response tokens. Masked positions may hold any finite garbage
            (-1e9 log-probs): the difference is zeroed inside the exp.
        epsilon, epsilon_high: clip range [1 - epsilon, 1 + epsilon_high].
        ref_logp: [B, T] reference log-probs (detached here), needed when beta > 0.
        beta: weight of k3.
        level: "token" or "sequence" (``importance_sampling_level``; GSPO's clip range is
            ~1e-3 of GRPO's: the caller passes it as epsilon / epsilon_high).
    Returns:
        loss [B, T], zero where mask is 0; stats with sums over masked tokens:
        ``tokens``, ``ratio_sum``, ``clip_low`` (ratio < 1 - epsilon and A < 0),
        ``clip_high`` (ratio > 1 + epsilon_high and A > 0), ``k3_sum`` (0 without ref_logp).
    """
    assert ref_logp is not None or beta == 0.0, "beta > 0 needs ref_logp"
    valid = mask > 0
    logp = logp.astype(mx.float32)
    # Masking inside the exp: padding garbage (e.g. -1e9) would make exp overflow and inf * 0 = NaN.
    log_ratio = mx.where(valid, logp - mx.stop_gradient(old_logp).astype(mx.float32), 0.0)
    if level == "sequence":  # [B, 1] mean over the sequence's tokens, broadcast to them
        n = mx.maximum(valid.sum(axis=1, keepdims=True), 1)
        log_ratio = mx.broadcast_to(log_ratio.sum(axis=1, keepdims=True) / n, log_ratio.shape)
    elif level != "token":
        raise ValueError(f"importance_sampling_level {level!r}: expected token or sequence")
    ratio = mx.exp(log_ratio)  # [B, T]
    A = adv.astype(mx.float32)[:, None]  # [B, 1]
    clipped = mx.clip(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
    per_token = -mx.minimum(ratio * A, clipped * A)  # [B, T]
    if ref_logp is not None:
        ref_diff = mx.where(valid, mx.stop_gradient(ref_logp).astype(mx.float32) - logp, 0.0)
        k3 = mx.exp(ref_diff) - ref_diff - 1.0  # [B, T], 0 at padding
        per_token = per_token + beta * k3
    else:
        k3 = mx.zeros_like(ratio)
    fmask = valid.astype(mx.float32)
    per_token = per_token * fmask
    ratio = mx.stop_gradient(ratio)
    stats = {
        "tokens": fmask.sum(),
        "ratio_sum": (ratio * fmask).sum(),
        "clip_low": ((ratio < 1.0 - epsilon) & (A < 0) & valid).sum(),
        "clip_high": ((ratio > 1.0 + epsilon_high) & (A > 0) & valid).sum(),
        "k3_sum": mx.stop_gradient(k3 * fmask).sum(),
    }
    return per_token, stats


def aggregate(
    per_token: mx.array,
    mask: mx.array,
    mode: str = "token_mean",
    num_tokens: mx.array | float | None = None,
    num_sequences: mx.array | float | None = None,
    max_len: int | None = None,
) -> mx.array:
    """Reduce a per-token loss [B, T] to a scalar (``loss_agg``).

        token_mean:              sum_{b,t} L / N_tokens
        seq_mean_token_mean:     sum_b (sum_t L_b / n_b) / N_seq       (original GRPO)
        seq_mean_token_sum_norm: sum_b (sum_t L_b / max_len) / N_seq   (Dr. GRPO)

    Args:
        per_token: [B, T] loss; positions where mask is 0 are ignored.
        mask: [B, T] 1.0 on response tokens.
        mode: one of ``AGG_MODES``.
        num_tokens: N_tokens, the response-token count of the whole batch; defaults to
            mask.sum(). Pass the full batch's count so micro-batch results add up to it.
        num_sequences: N_seq, the full batch's sequence count; defaults to B.
        max_len: max_completion_length, required by seq_mean_token_sum_norm.
    Returns:
        scalar loss.
    """
    valid = mask > 0
    masked = mx.where(valid, per_token, 0.0)  # [B, T]
    if mode == "token_mean":
        count = valid.sum() if num_tokens is None else num_tokens
        return masked.sum() / mx.maximum(count, 1)
    n_seq = per_token.shape[0] if num_sequences is None else num_sequences
    if mode == "seq_mean_token_mean":
        per_seq = masked.sum(axis=1) / mx.maximum(valid.sum(axis=1), 1)  # [B]
    elif mode == "seq_mean_token_sum_norm":
        if max_len is None:
            raise ValueError(
                "loss_agg seq_mean_token_sum_norm needs max_len (max_completion_length)"
            )
        per_seq = masked.sum(axis=1) / max_len  # [B]
    else:
        raise ValueError(f"loss_agg {mode!r}: expected one of {AGG_MODES}")
    return per_seq.sum() / n_seq


def js_divergence(p_logits: mx.array, q_logits: mx.array, tau: float = 1.0) -> mx.array:
    """Jensen-Shannon divergence between softmax(p/tau) (student) and softmax(q/tau) (teacher).

        JS = 1/2 KL(p || m) + 1/2 KL(q || m),  m = (p + q) / 2,  0 <= JS <= ln 2

    Computed in float32 with one exponential per distribution and one logarithm (of m, floored
    at the smallest normal float so that 0 * log 0 terms stay 0); the gradient is in closed form
    (`_js_function`). q is the teacher: detached here.

    Args:
        p_logits: [..., V] student logits (differentiated), finite.
        q_logits: [..., V] teacher logits (no gradient flows to them), finite.
        tau: temperature applied to both.
    Returns:
        [...] JS per row.
    """
    q, log_q = _softmax_and_log(mx.stop_gradient(q_logits).astype(mx.float32) / tau)
    return _js_function(float(tau))(p_logits.astype(mx.float32), q, log_q)


def _softmax_and_log(z: mx.array) -> tuple[mx.array, mx.array]:
    """softmax(z) and log_softmax(z) over the last axis [..., V], with a single exp."""
    shifted = z - mx.stop_gradient(z.max(axis=-1, keepdims=True))
    e = mx.exp(shifted)
    total = e.sum(axis=-1, keepdims=True)
    return e / total, shifted - mx.log(total)


_TINY = float(np.finfo(np.float32).tiny)


def _js_log_m(p, q):
    """log m, m = (p + q) / 2, floored at the smallest normal float32."""
    return mx.log(mx.maximum(0.5 * (p + q), _TINY))


@functools.cache
def _js_function(tau: float):
    """JS(softmax(p_logits / tau) || q) for a detached teacher given as (q, log q), as an
    `mx.custom_function` with its gradient in closed form, so the backward pass holds a few
    [..., V] arrays instead of every intermediate of the forward:

        dJS/dp = 1/2 log(p/m)  =>  dJS/dz = p * (g - <p, g>) / tau,  g = 1/2 (log p - log m)

    for student logits z (p = softmax(z / tau)); the teacher gets no gradient."""

    @mx.custom_function
    def js(p_logits, q, log_q):
        p, log_p = _softmax_and_log(p_logits / tau)
        log_m = _js_log_m(p, q)
        return 0.5 * ((p * (log_p - log_m)).sum(axis=-1) + (q * (log_q - log_m)).sum(axis=-1))

    @js.vjp
    def js_vjp(primals, cotangent, output):
        p_logits, q, log_q = primals
        p, log_p = _softmax_and_log(p_logits / tau)
        g = 0.5 * (log_p - _js_log_m(p, q))
        grad = p * (g - (p * g).sum(axis=-1, keepdims=True)) * (cotangent[..., None] / tau)
        return grad, mx.zeros_like(q), mx.zeros_like(log_q)

    return js


def token_logprobs(
    h: mx.array,
    targets: mx.array,
    readout: Readout,
    params: Any,
    temperature: float = 1.0,
    chunk_size: int = 512,
) -> mx.array:
    """log softmax(readout(params, h) / temperature) at the target tokens, in float32.

    The policy log-probs (h = final residual stream, readout = W_U N_L; the training pass uses
    ``token_logprobs_lens_js``, which adds the lens terms to the same chunks). Rows are read out
    ``chunk_size`` at a time, each recomputed in the backward pass (see the module docstring).

    Args:
        h: [B, T, D] hidden states at the positions that predict the targets.
        targets: [B, T] int token ids (padding ids are fine; mask the result downstream).
        readout: ``readout(params, h [n, D]) -> logits [n, V]``.
        params: pytree of the arrays ``readout`` reads that need gradients ({} for none).
        temperature: sampling temperature T_s.
        chunk_size: rows of B*T per chunk.
    Returns:
        logp [B, T], not masked.
    """
    return _token_stats(h, targets, readout, params, temperature, chunk_size, entropy=False)[0]


def token_logprobs_entropy(
    h: mx.array,
    targets: mx.array,
    readout: Readout,
    params: Any,
    temperature: float = 1.0,
    chunk_size: int = 512,
) -> tuple[mx.array, mx.array]:
    """``token_logprobs`` plus the entropy of each position's distribution (a metric: no
    gradient flows through it), from the same chunked pass.

    Args: as ``token_logprobs``. Returns: logp [B, T] and entropy [B, T] in nats, not masked.
    """
    return _token_stats(h, targets, readout, params, temperature, chunk_size, entropy=True)


def token_logprobs_lens_js(
    h: mx.array,
    targets: mx.array,
    students: list[mx.array],
    readout: Readout,
    params: Any,
    temperature: float = 1.0,
    tau: float = 1.0,
    chunk_size: int = 512,
    head_grad: bool = True,
) -> tuple[mx.array, mx.array, list[mx.array], list[mx.array]]:
    """``token_logprobs_entropy`` of the final layer and, for each student stream, the lens JS
    of ``lens_js_loss`` against it and the top-1 agreement of the two lenses (a metric), from one
    chunked pass: the final layer's logits are read out once and serve as the policy logits and
    (detached) as the teacher's.

    Args: h [B, T, D] the final layer's lens input (W_U reads ``readout(params, h)``), targets
    [B, T], students: [B, T, D] lens inputs of the student blocks; the rest as
    ``token_logprobs`` / ``lens_js_loss``.
    Returns: logp [B, T], entropy [B, T], [JS [B, T] per student], [agreement [B, T] per
    student: 1.0 where the student's top token is the final layer's, detached], none masked.

    With a frozen readout (``params`` empty, as under LoRA) the gradients are taken in the same
    pass (``_map_rows_grad_ahead``): the backward pass recomputes nothing. ``head_grad=False``
    reads the students through detached ``params``: their JS trains the streams, not the head.
    """
    out = _token_stats(h, targets, readout, params, temperature, chunk_size, True, students, tau,
                       grad_ahead=not params, head_grad=head_grad)
    k = len(students)
    return out[0], out[1], out[2:2 + k], out[2 + k:]


def _token_stats(h, targets, readout, params, temperature, chunk_size, entropy, students=(),
                 tau=1.0, grad_ahead=False, head_grad=True):
    """[logp, entropy?, JS per student, agreement per student], each [B, T], from one chunked
    pass."""
    B, T, D = h.shape

    def chunk_stats(params, h_rows, target_rows, *student_rows):
        z = readout(params, h_rows).astype(mx.float32)  # [n, V]
        prob, logq = _softmax_and_log(z / temperature)  # [n, V] each
        # Indices are not differentiable; the chunk VJP covers every argument.
        idx = mx.stop_gradient(target_rows)[:, None]  # [n, 1]
        columns = [mx.take_along_axis(logq, idx, axis=-1)[:, 0]]  # [n]
        if entropy:
            columns.append(mx.stop_gradient(-(prob * logq).sum(axis=-1)))  # a metric
        if student_rows:  # the teacher: these logits at tau, detached
            teacher = (prob, logq) if tau == temperature else _softmax_and_log(z / tau)
            q, log_q = (mx.stop_gradient(t) for t in teacher)
            js = _js_function(float(tau))
            head = params if head_grad else tree_map(mx.stop_gradient, params)
            student_logits = [readout(head, s).astype(mx.float32) for s in student_rows]
            columns += [js(s, q, log_q) for s in student_logits]
            top = mx.stop_gradient(mx.argmax(z, axis=-1))  # [n]
            columns += [mx.stop_gradient(mx.argmax(s, axis=-1) == top).astype(mx.float32)
                        for s in student_logits]
        return mx.stack(columns, axis=-1)  # [n, columns]

    flat = [h.reshape(B * T, D), targets.reshape(B * T)] + [s.reshape(B * T, D) for s in students]
    if grad_ahead:  # h moves only logp (column 0), student s only its JS column
        first_js = 2 if entropy else 1
        columns = {0: 0, **{2 + s: first_js + s for s in range(len(students))}}
        rows = _map_rows_grad_ahead(partial(chunk_stats, params), tuple(flat),
                                    first_js + 2 * len(students), columns, chunk_size)
    else:
        rows = _map_row_chunks(chunk_stats, params, tuple(flat), chunk_size)  # [B*T, columns]
    return [rows[:, i].reshape(B, T) for i in range(rows.shape[1])]


def lens_js_loss(
    student_h: mx.array,
    teacher_h: mx.array,
    readout: Readout,
    params: Any,
    mask: mx.array,
    tau: float = 1.0,
    chunk_size: int = 512,
) -> tuple[mx.array, dict[str, mx.array]]:
    """OISD logit alignment: logit-lens JS between layer l and the final layer, per token.

        JS_t = JS(softmax(readout(h^l_t)/tau) || stop_gradient(softmax(readout(h^L_t)/tau)))

    ``readout`` is W_U N_L (or W_U alone for ``lens_norm: false``), shared by student and
    teacher, built by the caller. The teacher logits are detached where they are formed, so
    neither ``teacher_h`` nor the readout's parameters get gradient through the teacher. Rows
    are processed ``chunk_size`` at a time (see the module docstring).

    Args:
        student_h: [B, T, D] residual stream after block l at the response positions.
        teacher_h: [B, T, D] residual stream after block L (pre-norm) at the same positions.
        readout: ``readout(params, h [n, D]) -> logits [n, V]``.
        params: pytree of the arrays ``readout`` reads that need gradients ({} for none).
        mask: [B, T] 1.0 on response tokens.
        tau: distillation temperature.
        chunk_size: rows of B*T per chunk.
    Returns:
        JS [B, T], zero where mask is 0; stats ``tokens``, ``js_sum`` (sum over masked tokens).
    """
    B, T, D = student_h.shape

    def chunk_js(params, student_rows, teacher_rows):
        q_logits = mx.stop_gradient(readout(params, teacher_rows))  # [n, V]
        return js_divergence(readout(params, student_rows), q_logits, tau)  # [n]

    rows = _map_row_chunks(
        chunk_js, params, (student_h.reshape(B * T, D), teacher_h.reshape(B * T, D)), chunk_size
    )  # [B*T]
    fmask = (mask > 0).astype(mx.float32)
    js = rows.reshape(B, T) * fmask
    return js, {"tokens": fmask.sum(), "js_sum": mx.stop_gradient(js).sum()}


def attention_js_loss(
    student_attn: mx.array,
    teacher_attn: mx.array,
    key_mask: mx.array | None = None,
    mask: mx.array | None = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """OISD attention alignment: JS between attention rows of block l and block L, head mean.

        JS_{h,t} = 1/2 KL(a^l || m) + 1/2 KL(a^L || m),  m = (a^l + a^L)/2,  a^L detached
        loss_t   = mean_h JS_{h,t}

    Rows are probabilities, not logits, and causal rows hold exact zeros: 0 log 0 is taken as 0
    (logs of zero entries are replaced by 0 before the product, so neither value nor gradient
    sees log 0). Float32.

    Args:
        student_attn: [B, H, Tq, Tk] attention probabilities of block l (query heads).
        teacher_attn: [B, H, Tq, Tk] attention probabilities of block L (no gradient).
        key_mask: [B, Tq, Tk] (or broadcastable) 1/True on keys the query may attend to. When
            given, excluded keys are zeroed in both rows and each row is renormalised.
        mask: [B, Tq] 1.0 on response queries; None counts every query.
    Returns:
        JS [B, Tq] (zero where mask is 0); stats ``tokens``, ``js_sum``.
    """
    p = student_attn.astype(mx.float32)
    q = mx.stop_gradient(teacher_attn).astype(mx.float32)
    if key_mask is not None:
        keep = (key_mask > 0)[:, None]  # [B, 1, Tq, Tk]
        p = mx.where(keep, p, 0.0)
        q = mx.where(keep, q, 0.0)
        p = p / mx.maximum(p.sum(axis=-1, keepdims=True), 1e-30)
        q = q / mx.maximum(q.sum(axis=-1, keepdims=True), 1e-30)
    js = _prob_js(p, q).mean(axis=1)  # [B, H, Tq] -> [B, Tq]
    if mask is None:
        fmask = mx.ones(js.shape, dtype=mx.float32)
    else:
        fmask = (mask > 0).astype(mx.float32)
    js = js * fmask
    return js, {"tokens": fmask.sum(), "js_sum": mx.stop_gradient(js).sum()}


def _prob_js_value(p: mx.array, q: mx.array) -> mx.array:
    """JS(p || q) over the last axis of probability rows, 0 log 0 = 0."""
    log_m = _log_or_zero(0.5 * (p + q))
    return 0.5 * ((p * (_log_or_zero(p) - log_m)).sum(axis=-1)
                  + (q * (_log_or_zero(q) - log_m)).sum(axis=-1))


@mx.custom_function
def _prob_js(p, q):
    """JS of probability rows [..., K] with the gradient in closed form: the backward pass keeps
    only p and q (the attention rows OISD reads are (N, H, C, T) float32; autograd would also keep
    m, log m, log p, log q and their products).

        dJS/dp_k = 1/2 log(p_k / m_k)  (p_k > 0);  q is the detached teacher: no gradient.

    Where p_k = 0 (a causal or padding zero of a softmax) the value given is 0: the softmax that
    made p passes no gradient there anyway."""
    return _prob_js_value(p, q)


@_prob_js.vjp
def _prob_js_vjp(primals, cotangent, output):
    p, q = primals
    log_ratio = mx.where(p > 0, _log_or_zero(p) - _log_or_zero(0.5 * (p + q)), 0.0)
    return 0.5 * log_ratio * cotangent[..., None], mx.zeros_like(q)


def weighted_alignment(per_token_js: mx.array, adv: mx.array, mode: str = "advantage") -> mx.array:
    """Per-token alignment loss w_i * JS_t (``oisd.weighting``).

        w_i = A_i (advantage) | sign(A_i) (sign) | 1 (none)

    A positive advantage pulls the layer toward the teacher, a negative one pushes it away;
    JS <= ln 2 bounds the push.

    Args:
        per_token_js: [B, T] JS per token (already masked).
        adv: [B] advantage per sequence (treated as data: no gradient).
        mode: one of ``WEIGHTINGS``.
    Returns:
        [B, T] weighted JS.
    """
    A = mx.stop_gradient(adv).astype(mx.float32)
    if mode == "advantage":
        w = A
    elif mode == "sign":
        w = mx.sign(A)
    elif mode == "none":
        return per_token_js
    else:
        raise ValueError(f"oisd.weighting {mode!r}: expected one of {WEIGHTINGS}")
    return w[:, None] * per_token_js


def _map_rows_grad_ahead(
    fn: Callable[..., mx.array], rows: tuple[mx.array, ...], width: int, columns: dict[int, int],
    chunk_size: int
) -> mx.array:
    """``_map_row_chunks`` for a row-wise ``fn(*chunks) -> [n, width]`` with no trainable
    parameters where input ``i`` moves only output column ``columns[i]`` (the other columns are
    detached from it), taking the gradients in the forward pass instead of recomputing.

    Each chunk runs one VJP with unit cotangents, which gives, row by row, d out[:, columns[i]]
    / d input_i: the output of a row depends on that row alone, so the VJP of a sum is the
    per-row Jacobian. Those [n, D] rows are kept (about one hidden state per input) and the
    backward pass only scales them by the incoming cotangent. Chunks run in order, as in
    ``_map_row_chunks``.
    """
    assert chunk_size > 0
    n = rows[0].shape[0]
    spans = [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]
    inputs = sorted(columns)

    def chunk_grads(*chunk):
        ones = mx.ones((chunk[0].shape[0], width), mx.float32)
        (out,), grads = mx.vjp(lambda *r: [fn(*r)], list(chunk), [ones])
        return out, [grads[i].astype(chunk[i].dtype) for i in inputs]

    @mx.custom_function
    def mapped(*rows):
        outs, jacobians = [], []
        for start, stop in spans:
            after = [outs[-1], *jacobians[-1]] if outs else []
            out, jac = chunk_grads(*_row_chunk(rows, start, stop, after))
            outs.append(out)
            jacobians.append(jac)
        return [mx.concatenate(outs, axis=0)] + [mx.concatenate(j, axis=0)
                                                  for j in zip(*jacobians)]

    @mapped.vjp
    def mapped_vjp(primals, cotangents, outputs):
        jacobians = dict(zip(inputs, outputs[1:]))
        # The cotangent is float32 (the columns are); each input's comes back in its own dtype.
        return [(cotangents[0][:, columns[i], None] * jacobians[i]).astype(r.dtype)
                if i in jacobians else mx.zeros_like(r) for i, r in enumerate(primals)]

    return mapped(*rows)[0]


def _row_chunk(arrays, start: int, stop: int, after: list) -> list:
    """Rows start:stop of each array, made to depend on `after` (so they wait for it)."""
    parts = [a[start:stop] for a in arrays]
    return list(mx.depends(parts, after)) if after else parts


def _map_row_chunks(
    fn: Callable[..., mx.array], params: Any, rows: tuple[mx.array, ...], chunk_size: int
) -> mx.array:
    """Concatenate fn(params, *chunks) -> [n, k] over consecutive chunks of ``chunk_size`` rows,
    holding one chunk's (n, V) arrays at a time in the forward and in the backward pass.

    A custom VJP recomputes each chunk (as ``mx.checkpoint`` would) and adds up the readout
    parameters' gradients chunk after chunk. Each chunk's inputs are made to depend on the
    previous chunk's results and the running gradient sum (``mx.depends``), so the chunks run
    one after another and each chunk's parameter gradient is added before the next: left to
    itself, MLX's scheduler may run every chunk's vocabulary-sized step before consuming any
    (measured: the peak then grows with V x tokens despite the chunking).
    """
    assert chunk_size > 0
    n = rows[0].shape[0]
    spans = [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]

    @mx.custom_function
    def mapped(params, *rows):
        outs = []
        for start, stop in spans:
            outs.append(fn(params, *_row_chunk(rows, start, stop, outs[-1:])))
        return mx.concatenate(outs, axis=0)

    @mapped.vjp
    def mapped_vjp(primals, cotangent, output):
        params, *rows = primals
        keys, leaves = zip(*tree_flatten(params)) if params else ((), ())
        k = len(leaves)

        def flat_fn(*arrays):  # mx.vjp takes a flat list of arrays
            return [fn(tree_unflatten(list(zip(keys, arrays[:k]))), *arrays[k:])]

        d_params, d_rows = None, []
        for start, stop in spans:
            after = [*d_rows[-1], *d_params] if d_rows else []
            _, grads = mx.vjp(flat_fn, [*leaves, *_row_chunk(rows, start, stop, after)],
                              [cotangent[start:stop]])
            d_params = grads[:k] if d_params is None else [a + b for a, b in zip(d_params, grads[:k])]
            d_rows.append(grads[k:])
        return (tree_unflatten(list(zip(keys, d_params))) if k else params,
                *(mx.concatenate(parts, axis=0) for parts in zip(*d_rows)))

    return mapped(params, *rows)


def _log_or_zero(x: mx.array) -> mx.array:
    """log x where x > 0, else 0: with the factor x in front this gives 0 log 0 = 0 and keeps
    the gradient finite (log never sees a zero, so no inf * 0 in the backward pass)."""
    positive = x > 0
    return mx.where(positive, mx.log(mx.where(positive, x, 1.0)), 0.0)
