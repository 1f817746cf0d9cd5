"""Rollouts: G completions per prompt from the final layer, with mlx-lm's `BatchGenerator`.

All B*G sequences decode together. Each prompt is prefilled once and its KV cache is shared by the
G members of its group (BatchGenerator copies caches when it merges them into its batch, so one
prefill serves the whole group). The sampled end-of-sequence token is kept: it is part of the
action and of the loss. Rollouts always sample from the full model, never from a lens.

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
from mlx_lm.sample_utils import make_sampler


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


def sample(
    model: nn.Module,
    prompts: list[list[int]],
    group_size: int,
    max_tokens: int,
    stop_ids,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> Rollout:
    """Sample `group_size` completions for each prompt, all B*G rows decoding at once."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("rollout: empty prompt")
    n = len(prompts) * group_size
    gen = BatchGenerator(
        model,
        max_tokens=max_tokens,
        stop_tokens=[[t] for t in sorted(stop_ids)],
        sampler=make_sampler(temp=temperature, top_p=top_p),
        completion_batch_size=n,
        prefill_batch_size=n,
    )
    try:
        caches = [prefill(model, p) for p in prompts]
        mx.eval([c.state for cache in caches for c in cache if c.keys is not None])  # one sync
        uids = gen.insert(
            [[p[-1]] for p in prompts for _ in range(group_size)],
            caches=[c for c in caches for _ in range(group_size)],
        )
        tokens = {u: [] for u in uids}
        while responses := gen.next_generated():
            for r in responses:
                tokens[r.uid].append(r.token)
    finally:
        gen.close()
    completions = [tokens[u] for u in uids]
    stop = set(stop_ids)
    truncated = [not (c and c[-1] in stop) for c in completions]
    return Rollout(prompts=list(prompts), completions=completions, truncated=truncated,
                   group_size=group_size)


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
