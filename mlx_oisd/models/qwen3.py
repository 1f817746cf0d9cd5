"""Qwen3 in MLX, following mlx-lm's `models/qwen3.py`, with captured internals for OISD.

Parameter names equal mlx-lm's (and so the Hugging Face checkpoint's), so mlx-lm's loader,
quantization, LoRA layers and `BatchGenerator` work on this model unchanged; `model(ids, cache=...)`
is mlx-lm's forward. `forward_internals` runs the same layer loop and additionally returns:

- `hidden[l]`: the residual stream after block l (blocks numbered 1..L), before the final norm;
- `attention[l]`: the softmax attention probabilities of block l, shape (B, H_query, Tq, T).
  Only the chosen blocks compute attention explicitly; every other block keeps the fused kernel.
  `query_start` restricts the returned rows to queries `query_start..T-1` (the response), so memory
  does not grow with T x T over the prompt.

Padding: `mask` (B, T) is 1 on real tokens. Keys that are padding never receive attention. A padded
query may attend only to itself: its row is garbage that callers mask out, but never a softmax over
an empty set (NaN). So right padding (our batches) and left padding both work.

`forward_shared_prefix` is the same computation for rows that share prefixes (the G completions
of one prompt): each prefix is run once and its keys/values are gathered for its rows, so the
prompt costs B instead of B*G rows of compute, and gradients through it add up over its rows.
"""

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import (
    BaseModelArgs,
    create_attention_mask,
    scaled_dot_product_attention,
)
from mlx_lm.models.qwen3 import MLP
from mlx_lm.models.rope_utils import initialize_rope


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    rms_norm_eps: float
    vocab_size: int
    num_key_value_heads: int
    max_position_embeddings: int
    head_dim: int
    tie_word_embeddings: bool
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None

    def __post_init__(self):
        # transformers >= 5 writes `rope_parameters` (with rope_theta inside) instead of rope_theta.
        if self.rope_parameters:
            if self.rope_theta is None:
                self.rope_theta = self.rope_parameters.get("rope_theta")
            if self.rope_scaling is None:
                self.rope_scaling = self.rope_parameters
        if self.rope_theta is None:
            raise ValueError("Qwen3 config has neither 'rope_theta' nor 'rope_parameters.rope_theta'")


@dataclass
class Internals:
    """What `forward_internals` returns. Block indices are 1-based."""

    logits: mx.array | None  # (B, T, V), None when return_logits=False
    hidden: dict[int, mx.array] = field(default_factory=dict)  # l -> (B, T, D), before final norm
    attention: dict[int, mx.array] = field(default_factory=dict)  # l -> (B, H, T - query_start, T)


def padding_attention_mask(mask: mx.array) -> mx.array:
    """(B, T) 1/0 token mask -> (B, 1, T, T) boolean attention mask: causal, no padding keys.

    The diagonal stays open so a padded query attends to itself instead of to nothing.
    """
    T = mask.shape[1]
    pos = mx.arange(T)
    causal = pos[:, None] >= pos[None, :]  # (T, T) query x key
    keys = mask.astype(mx.bool_)[:, None, None, :]  # (B, 1, 1, T)
    return (causal & keys) | mx.eye(T, dtype=mx.bool_)


def explicit_attention(queries, keys, values, scale, mask, query_start=0):
    """Attention with its probabilities, for the blocks whose maps OISD reads.

    queries (B, H, Tq, Dh), keys/values (B, H_kv, Tk, Dh), the queries being the last Tq of the
    Tk positions; mask "causal", a boolean (B|1, 1, Tq, Tk) array or None. Returns output
    (B, H, Tq, Dh) and probs (B, H, Tq - query_start, Tk) in float32 (the softmax is taken in
    float32 so the JS on these rows is exact in half precision too).
    """
    B, H, Tq, Dh = queries.shape
    H_kv, Tk = keys.shape[1], keys.shape[2]
    rep = H // H_kv
    q = queries.reshape(B, H_kv, rep, Tq, Dh)  # query head h reads kv head h // rep, as repeat_kv
    k = keys[:, :, None]  # (B, H_kv, 1, Tk, Dh)
    v = values[:, :, None]
    scores = (q.astype(mx.float32) * scale) @ k.astype(mx.float32).swapaxes(-1, -2)
    if isinstance(mask, str):
        mask = (mx.arange(Tq)[:, None] + Tk - Tq) >= mx.arange(Tk)[None, :]
    if mask is not None:
        if mask.ndim == 4:
            mask = mask[:, :, None]  # (B, 1, 1, Tq, Tk) broadcasts over (H_kv, rep)
        scores = mx.where(mask, scores, mx.finfo(mx.float32).min)
    probs = mx.softmax(scores, axis=-1)  # (B, H_kv, rep, Tq, Tk)
    out = (probs.astype(values.dtype) @ v).reshape(B, H, Tq, Dh)
    return out, probs.reshape(B, H, Tq, Tk)[:, :, query_start:]


class PrefixRecorder:
    """mlx-lm's cache protocol for the prefix pass of `forward_shared_prefix`: keeps each block's
    keys/values (U, H_kv, S, Dh) as they are computed (functionally, so gradients flow)."""

    offset = 0

    @classmethod
    def holding(cls, keys, values) -> "PrefixRecorder":
        recorder = cls()
        recorder.keys, recorder.values = keys, values
        return recorder

    def update_and_fetch(self, keys, values):
        self.keys, self.values = keys, values
        return keys, values


class SharedPrefix:
    """The suffix pass's cache: a recorded prefix's keys/values gathered for each row (`group`
    (N,) indexes the U prefixes) in front of the row's own; positions continue at S."""

    def __init__(self, recorded: PrefixRecorder, group: mx.array):
        self.recorded, self.group = recorded, group
        self.offset = recorded.keys.shape[2]

    def update_and_fetch(self, keys, values):
        r = self.recorded
        return (mx.concatenate([r.keys[self.group], keys], axis=2),
                mx.concatenate([r.values[self.group], values], axis=2))


def checkpointed_block(layer, x, mask=None, cache=None, attention_rows: int | None = None):
    """`layer(x, mask, cache, attention_rows)` under `mx.checkpoint` (gradient checkpointing):
    the backward pass keeps the block's input instead of its activations and recomputes the
    block. For the training passes' caches (None, PrefixRecorder, SharedPrefix) the prefix
    keys / values become explicit inputs and outputs of the checkpointed function, so gradients
    still flow through the shared prompt. LoRA dropout would draw new masks when recomputed."""

    def run(x, *kv):
        c = cache
        if isinstance(cache, SharedPrefix):
            c = SharedPrefix(PrefixRecorder.holding(*kv), cache.group)
        elif isinstance(cache, PrefixRecorder):
            c = PrefixRecorder()
        out = layer(x, mask, c, attention_rows)
        out = list(out) if attention_rows is not None else [out]
        return out + ([c.keys, c.values] if isinstance(cache, PrefixRecorder) else [])

    assert cache is None or isinstance(cache, (PrefixRecorder, SharedPrefix)), type(cache)
    kv = [cache.recorded.keys, cache.recorded.values] if isinstance(cache, SharedPrefix) else []
    out = nn.utils.checkpoint(layer, run)(x, *kv)
    if isinstance(cache, PrefixRecorder):
        *out, cache.keys, cache.values = out
    return tuple(out) if attention_rows is not None else out[0]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim = args.hidden_size
        self.n_heads = n_heads = args.num_attention_heads
        self.n_kv_heads = n_kv_heads = args.num_key_value_heads
        head_dim = args.head_dim
        self.scale = head_dim**-0.5

        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)

        self.q_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.rope = initialize_rope(
            head_dim,
            base=args.rope_theta,
            traditional=False,
            scaling_config=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def __call__(self, x, mask=None, cache=None, attention_rows: int | None = None):
        """x (B, T, D). With `attention_rows` = q0, also returns probs (B, H, T - q0, T)."""
        B, L, D = x.shape
        queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # (B, T, H*Dh) -> (B, H, T, Dh)
        queries = self.q_norm(queries.reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        keys = self.k_norm(keys.reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        if cache is not None:
            queries = self.rope(queries, offset=cache.offset)
            keys = self.rope(keys, offset=cache.offset)
            keys, values = cache.update_and_fetch(keys, values)
        else:
            queries = self.rope(queries)
            keys = self.rope(keys)

        if attention_rows is None:
            output = scaled_dot_product_attention(
                queries, keys, values, cache=cache, scale=self.scale, mask=mask
            )
            probs = None
        else:
            output, probs = explicit_attention(
                queries, keys, values, self.scale, mask, attention_rows
            )
        output = output.transpose(0, 2, 1, 3).reshape(B, L, -1)  # (B, H, T, Dh) -> (B, T, H*Dh)
        if attention_rows is None:
            return self.o_proj(output)
        return self.o_proj(output), probs


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_attention_heads = args.num_attention_heads
        self.hidden_size = args.hidden_size
        self.self_attn = Attention(args)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.args = args

    def __call__(self, x, mask=None, cache=None, attention_rows: int | None = None):
        """x (B, T, D) -> (B, T, D); with `attention_rows`, (out, probs) as in `Attention`."""
        r = self.self_attn(self.input_layernorm(x), mask, cache, attention_rows)
        probs = None
        if attention_rows is not None:
            r, probs = r
        h = x + r
        out = h + self.mlp(self.post_attention_layernorm(h))
        return out if attention_rows is None else (out, probs)


class Qwen3Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.vocab_size = args.vocab_size
        self.num_hidden_layers = args.num_hidden_layers
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args=args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    grad_checkpoint = False  # training passes recompute each block in the backward pass

    def __call__(self, inputs, cache=None, input_embeddings=None, capture: Internals | None = None,
                 mask=None, attention_rows: int = 0):
        """The one layer loop. With `capture`, fills capture.hidden / capture.attention for the
        blocks already keyed in them (1-based); `mask` is a prepared attention mask or None."""
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        if mask is None:
            mask = create_attention_mask(h, cache[0])

        checkpointed = self.grad_checkpoint and self.training
        for l, (layer, c) in enumerate(zip(self.layers, cache), start=1):
            rows = attention_rows if capture is not None and l in capture.attention else None
            block = partial(checkpointed_block, layer) if checkpointed else layer
            if rows is not None:
                h, capture.attention[l] = block(h, mask, c, rows)
            else:
                h = block(h, mask, c)
            if capture is not None and l in capture.hidden:
                capture.hidden[l] = h
        return self.norm(h)

    def run_blocks(self, h: mx.array, cache, start: int, stop: int) -> mx.array:
        """Blocks start+1..stop (1-based) on the residual stream h (B, T, D) with their mlx-lm
        caches cache[start:stop]; returns the stream after block `stop`, before the final norm.
        norm(run_blocks(embed_tokens(ids), cache, 0, L)) is `self(ids, cache)`."""
        mask = create_attention_mask(h, cache[start])
        for layer, c in zip(self.layers[start:stop], cache[start:stop]):
            h = layer(h, mask, c)
        return h


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Qwen3Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs, cache=None, input_embeddings=None):
        return self.unembed(self.model(inputs, cache, input_embeddings))

    def unembed(self, h: mx.array) -> mx.array:
        """W_U: (..., D) -> (..., V), tied or not."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def lens(self, h: mx.array, norm: bool = True) -> mx.array:
        """Logit lens W_U · N_L(h) of a residual stream (..., D) -> (..., V); norm=False skips N_L."""
        return self.unembed(self.model.norm(h) if norm else h)

    def forward_internals(
        self,
        inputs: mx.array,
        hidden_layers=(),
        attention_layers=(),
        mask: mx.array | None = None,
        query_start: int = 0,
        return_logits: bool = True,
    ) -> Internals:
        """Forward pass that also returns chosen hidden states and attention maps.

        inputs (B, T) token ids; mask (B, T) 1 on real tokens (None: no padding);
        hidden_layers / attention_layers: 1-based block indices in 1..L.
        Returns `Internals` with logits (B, T, V) equal to `model(inputs)`, hidden[l] (B, T, D)
        and attention[l] (B, H, T - query_start, T).
        """
        self._check_blocks(hidden_layers, attention_layers)
        T = inputs.shape[1]
        if not 0 <= query_start < T:
            raise ValueError(f"query_start must be in 0..{T - 1} for T={T}, got {query_start}")
        capture = Internals(
            logits=None,
            hidden={l: None for l in hidden_layers},
            attention={l: None for l in attention_layers},
        )
        attn_mask = padding_attention_mask(mask) if mask is not None else None
        h = self.model(inputs, capture=capture, mask=attn_mask, attention_rows=query_start)
        if return_logits:
            capture.logits = self.unembed(h)
        return capture

    def forward_shared_prefix(
        self,
        prefix: mx.array,
        prefix_mask: mx.array,
        group: mx.array,
        suffix: mx.array,
        suffix_mask: mx.array,
        hidden_layers=(),
        attention_layers=(),
    ) -> Internals:
        """`forward_internals` of rows [prefix[group[i]], suffix[i]], returning only the suffix
        positions, with each of the U prefixes computed once.

        prefix (U, S) ids and prefix_mask (U, S) (left padding allowed, S >= 1); group (N,) int32:
        the prefix of each row; suffix (N, C) ids and suffix_mask (N, C). Returns `Internals`
        without logits, hidden[l] (N, C, D) and attention[l] (N, H, C, S + C): what
        `forward_internals` on the concatenated (N, S + C) rows gives at positions S.., with
        `query_start` S.
        """
        self._check_blocks(hidden_layers, attention_layers)
        recorded = [PrefixRecorder() for _ in self.layers]
        self.model(prefix, cache=recorded, mask=padding_attention_mask(prefix_mask))
        S, C = prefix.shape[1], suffix.shape[1]
        keys = prefix_mask.astype(mx.bool_)[group][:, None, None, :]  # (N, 1, 1, S)
        own = padding_attention_mask(suffix_mask)  # (N, 1, C, C)
        mask = mx.concatenate([mx.broadcast_to(keys, (keys.shape[0], 1, C, S)), own], axis=-1)
        capture = Internals(
            logits=None,
            hidden={l: None for l in hidden_layers},
            attention={l: None for l in attention_layers},
        )
        self.model(suffix, cache=[SharedPrefix(r, group) for r in recorded], capture=capture,
                   mask=mask, attention_rows=0)
        return capture

    def _check_blocks(self, hidden_layers, attention_layers):
        L = self.args.num_hidden_layers
        for name, layers in (("hidden_layers", hidden_layers), ("attention_layers", attention_layers)):
            bad = [l for l in layers if not isinstance(l, int) or isinstance(l, bool) or not 1 <= l <= L]
            if bad:
                raise ValueError(
                    f"{name}: block index {bad[0]!r} out of range; blocks are numbered 1..{L} "
                    f"(1 = first block, {L} = last) for this {L}-block model"
                )

    def sanitize(self, weights):
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights

    @property
    def layers(self):
        return self.model.layers
