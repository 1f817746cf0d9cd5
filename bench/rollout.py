"""Rollout throughput: our `rollout.sample` vs mlx-lm's `BatchGenerator` used directly.

Same model, prompts, G and temperature; no stop tokens, so every one of the B*G rows generates
exactly `max_tokens` and both sides produce the same number of tokens. The reference inserts each
prompt G times in full with all rows decoding together (completion and prefill batch = B*G), the
natural direct use; ours prefills each prompt once and shares its KV cache with the group.
"""

from functools import partial

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from mlx_oisd.rollout import sample

from .common import Table, compare


def batch_generator(model, prompts, group_size, max_tokens):
    """mlx-lm's BatchGenerator on the B*G rows; returns the generated token lists."""
    rows = [p for p in prompts for _ in range(group_size)]
    gen = BatchGenerator(model, max_tokens=max_tokens, sampler=make_sampler(temp=1.0),
                         completion_batch_size=len(rows), prefill_batch_size=len(rows))
    try:
        uids = gen.insert(rows)
        out = {u: [] for u in uids}
        while responses := gen.next_generated():
            for r in responses:
                out[r.uid].append(r.token)
    finally:
        gen.close()
    return [out[u] for u in uids]


def run(model, prompts: list[list[int]], shapes: list[tuple[int, int, int]], repeats: int) -> Table:
    """shapes: (B, G, max_tokens) settings; the first B of `prompts` are used for each."""
    table = Table(
        "Rollout throughput",
        "Generated tokens per second at temperature 1, no stop tokens (every row runs to "
        "max_tokens). mlx-lm: `BatchGenerator` used directly with all B*G rows as one batch.",
        ["B", "G", "max_tokens", "mlx-lm tok/s", "ours tok/s", "ours / mlx-lm",
         "mlx-lm peak GB", "ours peak GB"])
    for B, G, M in shapes:
        ps = prompts[:B]
        mx.random.seed(0)
        runs = compare({"ref": partial(batch_generator, model, ps, G, M),
                        "ours": partial(sample, model, ps, G, M, [])}, repeats)
        (t_ref, m_ref, out_ref), (t_ours, m_ours, out) = runs["ref"], runs["ours"]
        n = B * G * M
        assert sum(map(len, out_ref)) == n and out.num_tokens == n, "rows stopped early"
        table.rows.append([B, G, M, n / t_ref, n / t_ours, t_ref / t_ours, m_ref, m_ours])
    return table
