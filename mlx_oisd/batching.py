"""The micro-batches of an update: which rows are computed, in what order, padded how far.

A step's packed batch (`rollout.pack`) is padded to its longest prompt and completion. The
update differentiates it `minibatch_size` rows at a time (gradient accumulation), and:

- `skip_zero_advantage`: rows whose contribution is exactly zero (`objective.zero_gradient_rows`:
  A = 0 under beta 0 with advantage / sign weighting, or no loss token) are not computed at all.
  The normalisers (the batch's response tokens and sequences) are counted before they are left
  out, so the loss and the gradient are those of the whole batch.
- `sort_by_length`: the computed rows are ordered by completion length (longest first) before
  they are cut into micro-batches, so rows of similar length share one.
- every micro-batch is cut to its own longest prompt and completion (`Batch.trim`).

Each micro-batch keeps prompt sharing exact: `Batch.select` re-indexes its distinct prompts,
whose columns are computed once per micro-batch.
"""

from dataclasses import replace

import mlx.core as mx
import numpy as np

from .rollout import Batch


def micro_batches(batch: Batch, adv: np.ndarray, size: int | None, skip: np.ndarray | None = None,
                  sort: bool = False, bucket: int = 1) -> list[tuple[Batch, mx.array]]:
    """(micro-batch, its advantages [n]) pairs covering the rows of `batch` not in `skip`.

    batch: N rows; adv [N]; size: rows per micro-batch (None: one); skip [N] bool (None: none);
    sort: longest completions first; bucket: trimmed lengths round up to a multiple of it (the
    compiled step's shapes). With every row skipped, one row with no loss token stands in: its
    gradient is zero and its stats have the keys a computed batch has (so an update, and its
    collectives across ranks, run the same way whatever is skipped)."""
    n = batch.tokens.shape[0]
    rows = np.arange(n) if skip is None else np.flatnonzero(~np.asarray(skip))
    if len(rows) == 0:
        one = batch.select(np.array([0]))
        one = replace(one, response_mask=mx.zeros_like(one.response_mask)).trim(bucket)
        return [(one, mx.zeros((1,), mx.float32))]
    if sort:
        lengths = np.array(batch.mask[:, batch.prompt_len:].sum(axis=1))
        rows = rows[np.argsort(-lengths[rows], kind="stable")]
    size = size or len(rows)
    adv = np.asarray(adv, np.float32)
    out = []
    for i in range(0, len(rows), size):
        idx = rows[i:i + size]
        mb = batch if len(idx) == n and (idx == np.arange(n)).all() else batch.select(idx)
        out.append((mb.trim(bucket), mx.array(adv[idx])))
    return out
