"""The model side of the objective: one forward pass, then the pure losses of `losses.py`.

    L = agg(L_pg + beta k3) + lambda_logit * mean_l agg(w JS_logit^l) + lambda_attn * mean_l agg(w JS_attn^l)

Positions: a packed batch (rollout.pack) has every response at columns P..P+C-1, so the model's
outputs at positions P-1..P+C-2 of the (T-1)-token input score the C response tokens. The logit
lens, the policy log-probs and the attention rows all use those C query positions.

Old and reference log-probs go through `forward` with the same captured blocks as the update, so
the first inner iteration sees ratio == 1 exactly. With `algorithm: grpo` (or both lambdas 0) no
internals are captured and no alignment term is built: plain GRPO, the same code path.
`algorithm: bupo` scores the layer-l lens policy while `bupo_active`, then plain GRPO.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .losses import (
    aggregate,
    attention_js_loss,
    lens_js_loss,
    policy_loss,
    token_logprobs,
    token_logprobs_entropy,
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
    lens_norm: bool = True
    epsilon: float = 0.2
    epsilon_high: float = 0.28
    beta: float = 0.0
    loss_agg: str = "token_mean"
    max_len: int = 1024  # max_completion_length, for seq_mean_token_sum_norm
    temperature: float = 1.0
    chunk_size: int = 1024
    bupo_active: bool = False  # BuPO's internal phase: the policy is the layer-l lens

    @property
    def align_logit(self) -> bool:
        return self.algorithm == "oisd" and self.lambda_logit > 0

    @property
    def align_attn(self) -> bool:
        return self.algorithm == "oisd" and self.lambda_attn > 0

    def policy_layer(self, num_layers: int) -> int:
        return self.student_layers[0] if self.algorithm == "bupo" and self.bupo_active else num_layers


def readout(model: nn.Module):
    """W_U as `readout(params, h)` for the chunked losses, with its trainable arrays in `params`
    (mx.checkpoint differentiates only its arguments; a frozen or quantized head gives {})."""
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
    q0 = batch.prompt_len - 1
    out = model.forward_internals(
        batch.inputs, hidden_layers=sorted(hidden), attention_layers=attention,
        mask=batch.mask[:, :-1], query_start=q0, return_logits=False,
    )
    return {l: h[:, q0:] for l, h in out.hidden.items()}, out.attention


def _lens_input(model, h, norm: bool):
    return model.model.norm(h) if norm else h


def policy_logprobs(model: nn.Module, batch: Batch, spec: LossSpec):
    """No-gradient pass: log-probs [N, C] of the response tokens under the acting policy (the final
    layer, or the BuPO lens) at the sampling temperature, and their entropies [N, C]."""
    hidden, _ = forward(model, batch, spec)
    layer = spec.policy_layer(model.args.num_hidden_layers)
    fn, params = readout(model)
    h = _lens_input(model, hidden[layer], spec.lens_norm or layer == model.args.num_hidden_layers)
    return token_logprobs_entropy(h, batch.targets, fn, params, spec.temperature, spec.chunk_size)


def objective_terms(model, batch: Batch, adv, old_logp, ref_logp, spec: LossSpec, num_tokens,
                    num_seqs):
    """The unweighted terms of one micro-batch: {"policy": agg(L_pg + beta k3), "logit": mean_l
    agg(w JS_logit), "attn": mean_l agg(w JS_attn)} (alignment terms only when they are on).

    adv [N]; old_logp / ref_logp [N, C] (ref None when beta = 0); num_tokens / num_seqs: response
    tokens and sequences of the whole batch, so micro-batch terms add up to the batch's.
    Returns (terms, stats of unnormalised sums)."""
    L = model.args.num_hidden_layers
    mask = batch.response_mask  # (N, C)
    hidden, attention = forward(model, batch, spec)
    fn, params = readout(model)
    layer = spec.policy_layer(L)
    h_pol = _lens_input(model, hidden[layer], spec.lens_norm or layer == L)
    logp = token_logprobs(h_pol, batch.targets, fn, params, spec.temperature, spec.chunk_size)
    per_token, stats = policy_loss(logp, old_logp, adv, mask, spec.epsilon, spec.epsilon_high,
                                   ref_logp, spec.beta)

    def agg(x):
        return aggregate(x, mask, spec.loss_agg, num_tokens, num_seqs, spec.max_len)

    terms = {"policy": agg(per_token)}
    k = len(spec.student_layers)
    if spec.align_logit:
        teacher = model.model.norm(hidden[L])
        terms["logit"] = stats["js_logit_sum"] = 0.0
        for l in spec.student_layers:
            student = _lens_input(model, hidden[l], spec.lens_norm)
            js, s = lens_js_loss(student, teacher, fn, params, mask, spec.tau, spec.chunk_size)
            terms["logit"] += agg(weighted_alignment(js, adv, spec.weighting)) / k
            stats["js_logit_sum"] += s["js_sum"] / k
    if spec.align_attn:
        terms["attn"] = stats["js_attn_sum"] = 0.0
        for l in spec.student_layers:
            js, s = attention_js_loss(attention[l], attention[L], mask=mask)
            terms["attn"] += agg(weighted_alignment(js, adv, spec.weighting)) / k
            stats["js_attn_sum"] += s["js_sum"] / k
    return terms, stats


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

    A compiled function is traced once per (spec, prompt_len, has_ref) and re-traced by MLX per
    input shape; `rollout.pack` rounds P and C up to a bucket so few shapes occur. Model
    parameters and the RNG (LoRA dropout) are declared as compile inputs/outputs.
    Call: (batch, adv, old_logp, ref_logp, spec, num_tokens, num_seqs) -> ((loss, stats), grads).
    """

    def __init__(self, model: nn.Module, compile: bool = True):
        self.model, self.compile, self.cache = model, compile, {}

    def _build(self, spec: LossSpec, prompt_len: int, has_ref: bool):
        loss_and_grad = nn.value_and_grad(self.model, objective)

        def step(tokens, mask, response_mask, adv, old_logp, ref_logp, num_tokens, num_seqs):
            batch = Batch(tokens, mask, response_mask, prompt_len)
            ref = ref_logp if has_ref else None
            return loss_and_grad(self.model, batch, adv, old_logp, ref, spec, num_tokens, num_seqs)

        if not self.compile:
            return step
        state = [self.model.state, mx.random.state]
        return mx.compile(step, inputs=state, outputs=state)

    def __call__(self, batch: Batch, adv, old_logp, ref_logp, spec: LossSpec, num_tokens, num_seqs):
        key = (spec, batch.prompt_len, ref_logp is not None)
        if key not in self.cache:
            self.cache[key] = self._build(*key)
        ref = ref_logp if ref_logp is not None else old_logp  # placeholder array, unused
        return self.cache[key](batch.tokens, batch.mask, batch.response_mask, adv, old_logp, ref,
                               mx.array(num_tokens, mx.float32), mx.array(num_seqs, mx.float32))
