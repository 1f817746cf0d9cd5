"""The model side of the objective: one forward pass, then the pure losses of `losses.py`.

    L = agg(L_pg + beta k3) + lambda_logit * mean_l agg(w JS_logit^l) + lambda_attn * mean_l agg(w JS_attn^l)

Positions: a packed batch (rollout.pack) has every response at columns P..P+C-1, so the model's
outputs at positions P-1..P+C-2 of the (T-1)-token input score the C response tokens. The logit
lens, the policy log-probs and the attention rows all use those C query positions.

The prompt is shared: its columns 0..P-2 are computed once per distinct prompt and their keys /
values gathered for the prompt's G rows (`Model.forward_shared_prefix`), so only the C query
positions of each row are computed per row. The first inner iteration takes its own (detached)
log-probs as the old ones (`old_logp=None`): ratio == 1 exactly and no separate forward pass;
they are returned for the later iterations. Reference log-probs go through the same `forward`
(with nothing captured).
With `algorithm: grpo` (or both lambdas 0) no internals are captured and no alignment term is
built: plain GRPO, the same code path.
`algorithm: bupo` scores the layer-l lens policy while `bupo_active`, then plain GRPO.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .losses import (
    aggregate,
    attention_js_loss,
    policy_loss,
    token_logprobs_entropy,
    token_logprobs_lens_js,
    weighted_alignment,
)
from .rollout import Batch


@dataclass(frozen=True)
class LossSpec:
    """The scalars of the objective, taken from the config by the trainer."""

    algorithm: str = "oisd"  # grpo | oisd | bupo
    student_layers: tuple[int, ...] = (6,)
    lambda_logit: float = 1.0
    lambda_attn: float = 0.1
    tau: float = 1.0
    weighting: str = "advantage"
    lens_norm: bool = True  # OISD students' lens: final RMSNorm before W_U
    head_grad: bool = True  # the logit-lens term trains the shared final norm / head
    bupo_lens_norm: bool = False  # BuPO's internal policy: final RMSNorm before W_U
    epsilon: float = 0.2  # the clip range of the importance ratio at `importance_sampling_level`
    epsilon_high: float = 0.28
    importance_sampling_level: str = "token"  # token (GRPO) | sequence (GSPO)
    beta: float = 0.0
    loss_agg: str = "token_mean"
    max_len: int = 1024  # max_completion_length, for seq_mean_token_sum_norm
    temperature: float = 1.0
    chunk_size: int | None = None  # rows per loss chunk; None: chunk_rows(V)
    bupo_active: bool = False  # BuPO's internal phase: the policy is the layer-l lens

    @property
    def align_logit(self) -> bool:
        return self.algorithm == "oisd" and self.lambda_logit > 0

    @property
    def align_attn(self) -> bool:
        return self.algorithm == "oisd" and self.lambda_attn > 0

    def policy_layer(self, num_layers: int) -> int:
        return self.student_layers[0] if self.algorithm == "bupo" and self.bupo_active else num_layers

    def policy_norm(self, num_layers: int) -> bool:
        """Whether the acting policy's readout applies the final norm: always for the final
        layer, `bupo_lens_norm` for BuPO's internal policy."""
        return self.policy_layer(num_layers) == num_layers or self.bupo_lens_norm


def zero_gradient_rows(adv, loss_tokens, spec: LossSpec):
    """Rows [N] (numpy bool) whose every term of the objective has exactly zero value and
    gradient, given advantages adv [N] and loss-token counts loss_tokens [N] (response-mask sums):
    rows with no loss token, and, with beta 0, rows with A = 0 (the policy term is A x ratio;
    the alignment terms are weighted by A or sign(A), so not with weighting `none`). Leaving
    them out of the forward and backward passes, with the whole batch's normalisers, leaves the
    loss and gradient unchanged."""
    empty = np.asarray(loss_tokens) == 0
    aligned = spec.align_logit or spec.align_attn
    if spec.beta > 0 or (aligned and spec.weighting not in ("advantage", "sign")):
        return empty
    return empty | (np.asarray(adv) == 0)


CHUNK_LOGITS = 2**20  # (rows, V) logits per chunk of the loss when chunk_size is None
MIN_CHUNK_ROWS = 32


def chunk_rows(spec: LossSpec, vocab_size: int) -> int:
    """Rows per chunk of the vocabulary-sized loss: spec.chunk_size, else about CHUNK_LOGITS
    logits (a chunk's float32 arrays a few MB each, whatever V and the number of tokens)."""
    return spec.chunk_size or max(MIN_CHUNK_ROWS, CHUNK_LOGITS // vocab_size)


def readout(model: nn.Module):
    """W_U as `readout(params, h)` for the chunked losses, with its trainable arrays in `params`
    (the chunked losses differentiate only their arguments; a frozen or quantized head gives {})."""
    head = model.model.embed_tokens if model.args.tie_word_embeddings else model.lm_head
    if "weight" in head.trainable_parameters() and not isinstance(head, nn.QuantizedEmbedding):
        return (lambda p, h: h @ p["weight"].T), {"weight": head.weight}
    return (lambda p, h: model.unembed(h)), {}


def forward(model: nn.Module, batch: Batch, spec: LossSpec):
    """The one forward pass of a step: residual streams (and attention rows) at response queries.

    Returns (hidden {l: (N, C, D)}, attention {l: (N, H, C, T-1)}); block indices 1-based."""
    L = model.args.num_hidden_layers
    hidden = {L, spec.policy_layer(L)}
    if spec.align_logit:
        hidden.update(spec.student_layers)
    attention = sorted({*spec.student_layers, L}) if spec.align_attn else []
    P = batch.prompt_len
    if P == 1:  # no prompt column before the first query: nothing to share
        out = model.forward_internals(batch.inputs, sorted(hidden), attention,
                                      mask=batch.mask[:, :-1], return_logits=False)
    else:
        rows = batch.prompt_rows
        out = model.forward_shared_prefix(
            batch.tokens[rows, :P - 1], batch.mask[rows, :P - 1], batch.group,
            batch.tokens[:, P - 1:-1], batch.mask[:, P - 1:-1], sorted(hidden), attention,
        )
    return out.hidden, out.attention


def _lens_input(model, h, norm: bool, detach_norm: bool = False):
    """The lens input of residual stream h: N_L(h) (with its weight detached if `detach_norm`)
    or h itself."""
    if not norm:
        return h
    n = model.model.norm
    return mx.fast.rms_norm(h, mx.stop_gradient(n.weight), n.eps) if detach_norm else n(h)


def policy_logprobs(model: nn.Module, batch: Batch, spec: LossSpec):
    """No-gradient pass: log-probs [N, C] of the response tokens under the acting policy (the final
    layer, or the BuPO lens) at the sampling temperature, and their entropies [N, C]."""
    hidden, _ = forward(model, batch, spec)
    layer = spec.policy_layer(model.args.num_hidden_layers)
    fn, params = readout(model)
    h = _lens_input(model, hidden[layer], spec.policy_norm(model.args.num_hidden_layers))
    return token_logprobs_entropy(h, batch.targets, fn, params, spec.temperature,
                                  chunk_rows(spec, model.args.vocab_size))


def objective_terms(model, batch: Batch, adv, old_logp, ref_logp, spec: LossSpec, num_tokens,
                    num_seqs):
    """The unweighted terms of one micro-batch: {"policy": agg(L_pg + beta k3), "logit": mean_l
    agg(w JS_logit), "attn": mean_l agg(w JS_attn)} (alignment terms only when they are on).

    adv [N]; old_logp / ref_logp [N, C] (ref None when beta = 0; old None on the first inner
    iteration: the detached log-probs of this pass, returned as stats["logp"] with the summed
    entropy stats["entropy_sum"]); num_tokens / num_seqs: response tokens and sequences of the
    whole batch, so micro-batch terms add up to the batch's.
    Returns (terms, stats of unnormalised sums)."""
    L = model.args.num_hidden_layers
    mask = batch.response_mask  # (N, C)
    hidden, attention = forward(model, batch, spec)
    fn, params = readout(model)
    layer = spec.policy_layer(L)
    h_pol = _lens_input(model, hidden[layer], spec.policy_norm(L))
    # The lens students share the policy's chunked readout: its logits are the (detached)
    # teacher's. align_logit means algorithm oisd, whose policy is the final layer. With
    # head_grad off the students read through a detached norm and head.
    students = ([_lens_input(model, hidden[l], spec.lens_norm, not spec.head_grad)
                 for l in spec.student_layers] if spec.align_logit else [])
    logp, entropy, lens_js, agree = token_logprobs_lens_js(h_pol, batch.targets, students, fn, params,
                                                    spec.temperature, spec.tau,
                                                    chunk_rows(spec, model.args.vocab_size),
                                                    head_grad=spec.head_grad)
    first = {}
    if old_logp is None:
        old_logp = mx.stop_gradient(logp)
        first = {"logp": old_logp, "entropy_sum": mx.stop_gradient(entropy * mask).sum()}
    per_token, stats = policy_loss(logp, old_logp, adv, mask, spec.epsilon, spec.epsilon_high,
                                   ref_logp, spec.beta, spec.importance_sampling_level)
    stats.update(first)

    def agg(x):
        return aggregate(x, mask, spec.loss_agg, num_tokens, num_seqs, spec.max_len)

    terms = {"policy": agg(per_token)}
    k = len(spec.student_layers)
    if spec.align_logit:
        terms["logit"] = stats["js_logit_sum"] = 0.0
        for l, js, same in zip(spec.student_layers, lens_js, agree):
            js = js * (mask > 0)
            terms["logit"] += agg(weighted_alignment(js, adv, spec.weighting)) / k
            stats["js_logit_sum"] += mx.stop_gradient(js).sum() / k
            stats.update(lens_sums(f"l{l}", mx.stop_gradient(js), same, adv, mask))
    if spec.align_attn:
        terms["attn"] = stats["js_attn_sum"] = 0.0
        for l in spec.student_layers:
            js, s = attention_js_loss(attention[l], attention[L], mask=mask)
            terms["attn"] += agg(weighted_alignment(js, adv, spec.weighting)) / k
            stats["js_attn_sum"] += s["js_sum"] / k
    return terms, stats


def lens_sums(layer: str, js, agree, adv, mask) -> dict:
    """Unnormalised sums of the lens metrics of one student block: its JS and top-1 agreement
    with the final layer over response tokens, overall and on rows with A > 0 / A < 0, and those
    token counts. js, agree, mask [N, C]; adv [N]."""
    valid = (mask > 0).astype(mx.float32)
    pos = valid * (adv > 0)[:, None]
    neg = valid * (adv < 0)[:, None]
    out = {"tokens_pos": pos.sum(), "tokens_neg": neg.sum()}
    for name, x in (("lens_js", js), ("lens_agree", agree)):
        out[f"{name}_sum/{layer}"] = (x * valid).sum()
        out[f"{name}_pos_sum/{layer}"] = (x * pos).sum()
        out[f"{name}_neg_sum/{layer}"] = (x * neg).sum()
    return out


def objective(model, batch: Batch, adv, old_logp, ref_logp, spec: LossSpec, num_tokens, num_seqs):
    """L = policy + lambda_logit * logit + lambda_attn * attn; returns (loss, stats)."""
    terms, stats = objective_terms(model, batch, adv, old_logp, ref_logp, spec, num_tokens, num_seqs)
    loss = terms["policy"]
    if "logit" in terms:
        loss = loss + spec.lambda_logit * terms["logit"]
    if "attn" in terms:
        loss = loss + spec.lambda_attn * terms["attn"]
    stats["pg_loss"] = mx.stop_gradient(terms["policy"])
    return loss, stats


class ObjectiveGrad:
    """`nn.value_and_grad` of `objective`, optionally under `mx.compile`.

    A compiled function is traced once per (spec, prompt_len, has_old, has_ref) and re-traced by
    MLX per input shape; `rollout.pack` rounds P and C up to a bucket so few shapes occur. Model
    parameters and the RNG (LoRA dropout) are declared as compile inputs/outputs.
    Call: (batch, adv, old_logp, ref_logp, spec, num_tokens, num_seqs) -> ((loss, stats), grads).
    """

    def __init__(self, model: nn.Module, compile: bool = True):
        self.model, self.compile, self.cache = model, compile, {}

    def _build(self, spec: LossSpec, prompt_len: int, has_old: bool, has_ref: bool):
        loss_and_grad = nn.value_and_grad(self.model, objective)

        def step(tokens, mask, response_mask, group, prompt_rows, adv, old_logp, ref_logp,
                 num_tokens, num_seqs):
            batch = Batch(tokens, mask, response_mask, prompt_len, group, prompt_rows)
            old = old_logp if has_old else None
            ref = ref_logp if has_ref else None
            return loss_and_grad(self.model, batch, adv, old, ref, spec, num_tokens, num_seqs)

        if not self.compile:
            return step
        state = [self.model.state, mx.random.state]
        return mx.compile(step, inputs=state, outputs=state)

    def __call__(self, batch: Batch, adv, old_logp, ref_logp, spec: LossSpec, num_tokens, num_seqs):
        key = (spec, batch.prompt_len, old_logp is not None, ref_logp is not None)
        if key not in self.cache:
            self.cache[key] = self._build(*key)
        unused = adv  # placeholder for an absent old / ref array
        return self.cache[key](
            batch.tokens, batch.mask, batch.response_mask, batch.group, batch.prompt_rows, adv,
            unused if old_logp is None else old_logp, unused if ref_logp is None else ref_logp,
            mx.array(num_tokens, mx.float32), mx.array(num_seqs, mx.float32))
