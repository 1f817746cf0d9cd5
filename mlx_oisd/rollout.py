"""Rollouts: G completions per prompt from the final layer, with mlx-lm's `BatchGenerator`.

At most `batch_size` rows (`rollout_batch_size`; default all B*G) decode together, and freed
slots are refilled as rows finish, so the KV cache grows with the cap times (prompt + completion),
not with B*G. Each prompt is prefilled once and its KV cache is shared by the G members of its
group (BatchGenerator copies caches when it merges them into its batch, so one prefill serves the
whole group). mlx-lm's BatchGenerator keeps a full-precision KV cache (no `kv_bits` in 0.32).
The sampled end-of-sequence token is kept: it is part of the action and of the loss. Rollouts
always sample from the full model, never from a lens.

`pack` lays a step's sequences out for the loss: prompts left-padded to P columns, completions
right-padded to C columns, so every response starts at column P and the response logits are the
outputs at positions P-1 .. P+C-2 of the (T-1)-token input.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler


@dataclass
class Rollout:
    """One step's samples. Row g*G + j is the j-th completion of prompt g."""

    prompts: list[list[int]]  # B prompt token lists
    completions: list[list[int]]  # B*G, ending with the sampled EOS unless truncated
    truncated: list[bool]  # B*G, True when max_tokens ended the completion without EOS
    group_size: int

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completions)


def prefill(model: nn.Module, prompt: list[int]):
    """KV cache holding prompt[:-1] (not yet evaluated); BatchGenerator feeds the last token."""
    cache = make_prompt_cache(model)
    if len(prompt) > 1:
        model(mx.array(prompt[:-1])[None], cache=cache)
    return cache


def filter_logprobs(logprobs: mx.array, top_p: float = 1.0, min_p: float = 0.0,
                    top_k: int = 0) -> mx.array:
    """(R, V) log-probs with the tokens outside the sampling set at -inf, by mlx-lm's filters in
    `make_sampler`'s order (top_p, then min_p, then top_k), each on the untempered log-probs.
    top_p 1, min_p 0 and top_k 0 are off."""
    if 0 < top_p < 1.0:
        logprobs = apply_top_p(logprobs, top_p)
    if min_p != 0.0:
        logprobs = apply_min_p(logprobs, min_p)
    if top_k > 0:
        logprobs = apply_top_k(logprobs, top_k)
    return logprobs


def row_sampler(key: mx.array, temperature: float, top_p: float, min_p: float = 0.0,
                top_k: int = 0):
    """A sampler for one row that draws from its own key stream (split at every call), so the
    row's tokens do not depend on which other rows share its decode batch. The chain is
    mlx-lm's `make_sampler` for (temp, top_p, min_p, top_k) with an explicit key: mlx-lm's own
    sampler draws from the global RNG over the whole batch."""
    state = [key]

    def sampler(logprobs: mx.array) -> mx.array:  # (1, V) -> (1,)
        state[0], sub = mx.random.split(state[0])
        logprobs = filter_logprobs(logprobs, top_p, min_p, top_k)
        return mx.random.categorical(logprobs * (1.0 / temperature), key=sub)

    return sampler


def sample(
    model: nn.Module,
    prompts: list[list[int]],
    group_size: int,
    max_tokens: int,
    stop_ids,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int | None = None,
    seed: int | None = None,
    top_k: int = 0,
    min_p: float = 0.0,
) -> Rollout:
    """Sample `group_size` completions for each prompt, at most `batch_size` rows decoding at once
    (None: all B*G).

    Rows enter in order as earlier ones finish; a prompt is prefilled when its first row enters,
    and its cache is dropped once its last row has entered, so at most one prompt cache lives
    outside the decode batch. With `seed`, row i samples from its own key stream
    (`mx.random.split(mx.random.key(seed), B*G)[i]`): the completions are the same for every
    `batch_size` (up to float rounding of the logits in batches of other shapes). With
    seed None, one mlx-lm sampler draws from the global RNG for the whole batch: reproducible
    under `mx.random.seed`, but a different cap gives different samples. temperature 0: greedy.
    top_p / min_p / top_k restrict each draw as mlx-lm's `make_sampler` does (0 and 1: off; a
    top_k of at least the vocabulary is off too).
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("rollout: empty prompt")
    n = len(prompts) * group_size
    cap = n if batch_size is None else max(1, min(batch_size, n))
    greedy = temperature == 0
    keys = None if seed is None or greedy else mx.random.split(mx.random.key(seed), n)
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    if vocab is not None and top_k >= vocab:
        top_k = 0  # mlx-lm's apply_top_k refuses k >= V; keeping every token is no filter
    gen = BatchGenerator(
        model,
        max_tokens=max_tokens,
        stop_tokens=[[t] for t in sorted(stop_ids)],
        sampler=make_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k),
        completion_batch_size=cap,
        prefill_batch_size=cap,
    )
    tokens = [[] for _ in range(n)]
    row_of = {}  # BatchGenerator uid -> row
    try:
        nxt, active, cache = 0, 0, None
        while nxt < n or active:
            rows = list(range(nxt, min(n, nxt + cap - active)))
            caches, fresh = [], []
            for i in rows:
                if i % group_size == 0:
                    cache = prefill(model, prompts[i // group_size])
                    fresh += [c.state for c in cache if c.keys is not None]
                caches.append(cache)
            mx.eval(fresh)  # one sync for the prompts entering now
            if rows:
                samplers = None if keys is None else [
                    row_sampler(keys[i], temperature, top_p, min_p, top_k) for i in rows]
                uids = gen.insert([[prompts[i // group_size][-1]] for i in rows], caches=caches,
                                  samplers=samplers)
                row_of.update(zip(uids, rows))
                nxt, active = rows[-1] + 1, active + len(rows)
                if nxt % group_size == 0:
                    cache = None  # the group is in: its prompt cache lives only in the batch
            active = _collect(gen.next_generated(), tokens, row_of, active)
    finally:
        gen.close()
    stop = set(stop_ids)
    truncated = [not (c and c[-1] in stop) for c in tokens]
    return Rollout(prompts=list(prompts), completions=tokens, truncated=truncated,
                   group_size=group_size)


def _collect(responses, tokens: list[list[int]], row_of: dict[int, int], active: int) -> int:
    """Append one decode step's tokens to their rows; returns the rows still decoding. (A
    function, so no response outlives the step: a finished row's response holds a view of the
    whole batch's KV cache.)"""
    assert responses or not active, "BatchGenerator went idle with rows still decoding"
    for r in responses:
        tokens[row_of[r.uid]].append(r.token)
    return active - sum(r.finish_reason is not None for r in responses)


@dataclass
class Batch:
    """A packed step for the loss. N = B*G rows, T = P + C columns, U distinct prompts."""

    tokens: mx.array  # (N, T) int32: left-padded prompt, then right-padded completion
    mask: mx.array  # (N, T) 1 on real tokens (prompt and completion)
    response_mask: mx.array  # (N, C) float32, 1 on completion tokens that count in the loss
    prompt_len: int  # P: column where every response starts
    group: mx.array  # (N,) int32: which of the U prompts row i continues
    prompt_rows: mx.array  # (U,) int32: a row holding each prompt

    @property
    def inputs(self) -> mx.array:
        """(N, T-1) model input; its outputs at P-1.. score the response tokens."""
        return self.tokens[:, :-1]

    @property
    def targets(self) -> mx.array:
        """(N, C) the response tokens."""
        return self.tokens[:, self.prompt_len:]

    def select(self, rows) -> "Batch":
        """The batch of `rows` (an index array or a slice), prompts re-indexed."""
        group, prompt_rows = prompt_index(np.array(self.group)[rows])
        idx = mx.array(np.arange(len(self.group))[rows])
        return Batch(self.tokens[idx], self.mask[idx], self.response_mask[idx], self.prompt_len,
                     group, prompt_rows)

    def trim(self, bucket: int = 1) -> "Batch":
        """The same rows with the columns that are padding in every row cut: prompts to the
        longest prompt, completions to the longest completion (each rounded up to `bucket`).
        Right padding is never attended by a real token, and RoPE scores depend on position
        differences only, so the model computes the same values (up to rounding)."""
        P = self.prompt_len
        mask = np.array(self.mask)
        p = min(P, _round_up(int(mask[:, :P].sum(axis=1).max()), bucket))
        c = min(mask.shape[1] - P, _round_up(max(1, int(mask[:, P:].sum(axis=1).max())), bucket))
        if p == P and c == mask.shape[1] - P:
            return self
        cols = slice(P - p, P + c)
        return Batch(self.tokens[:, cols], self.mask[:, cols], self.response_mask[:, :c], p,
                     self.group, self.prompt_rows)


def prompt_index(prompt_ids: np.ndarray) -> tuple[mx.array, mx.array]:
    """Per-row prompt ids (N,) -> (group (N,), prompt_rows (U,)) as in `Batch`."""
    _, first, inverse = np.unique(prompt_ids, return_index=True, return_inverse=True)
    return mx.array(inverse.astype(np.int32)), mx.array(first.astype(np.int32))


def _round_up(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


def pack(rollout: Rollout, pad_id: int, mask_truncated: bool = False, bucket: int = 1) -> Batch:
    """Lay out prompts + completions for the loss (see module docstring). P and C are rounded up
    to a multiple of `bucket` so that a compiled step sees few distinct shapes."""
    G = rollout.group_size
    P = _round_up(max(len(p) for p in rollout.prompts), bucket)
    C = _round_up(max(1, max(len(c) for c in rollout.completions)), bucket)
    N = len(rollout.completions)
    tokens = np.full((N, P + C), pad_id, dtype=np.int32)
    mask = np.zeros((N, P + C), dtype=np.int32)
    response = np.zeros((N, C), dtype=np.float32)
    for i, comp in enumerate(rollout.completions):
        prompt = rollout.prompts[i // G]
        tokens[i, P - len(prompt):P] = prompt
        tokens[i, P:P + len(comp)] = comp
        mask[i, P - len(prompt):P + len(comp)] = 1
        if not (mask_truncated and rollout.truncated[i]):
            response[i, :len(comp)] = 1.0
    return Batch(mx.array(tokens), mx.array(mask), mx.array(response), P,
                 *prompt_index(np.arange(N) // G))
