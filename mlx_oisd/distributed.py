"""Data-parallel training on `mx.distributed` (ring over TCP / Thunderbolt, JACCL, MPI; NCCL under
CUDA), launched by `mlx.launch` as mlx-lm's LoRA trainer is.

The step's `batch_size` prompts are drawn globally (the sampler's position is global, so a run
resumes under any world size); each rank takes a contiguous block of whole prompts (`share`),
rolls out and scores its G completions each, so group advantages need no communication.
Batch-level numbers (the loss normalisers' response-token and sequence counts, `reinforce_pp`'s
whitening, the metrics) are all-summed on the CPU stream; gradients are summed once per optimizer
update. Every rank makes the same collective calls, of the same sizes, in the same order, whatever
its data: the sizes depend only on the config and on numbers already summed.

The ring and JACCL backends have no timeouts: a rank waiting on a dead or stalled peer waits
forever. `Watchdog` bounds each step to `distributed_timeout_s` and then exits the process
(`os._exit`, from its own thread: the main thread is stuck inside the collective) with a message
naming the step, where this rank waited, and the rank it waited for.

A peer that dies inside a ring all-sum does not raise: the sum returns this rank's own values
(mlx 0.32; the next collective then hangs). Every sum here therefore carries a 1 at each end of
its buffer and checks that they add up to the world size; a short sum raises PeerLost naming the
step and the peer, before a partial gradient can reach the weights or a checkpoint.
"""

import os
import sys
import threading
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

BUCKET_BYTES = 32 * 1024**2  # gradients are summed in buffers of about this size (as mlx's)


class PeerLost(RuntimeError):
    """A collective failed: a peer's connection closed (its process died)."""


@dataclass
class World:
    """The ranks of this run. `group` is None for a single process (every helper is then the
    identity, so one code path serves both)."""

    group: object = None  # mx.distributed.Group
    rank: int = 0
    size: int = 1
    step: int = 0  # the step in progress, for messages
    phase: str = "setup"  # where this rank is in the step, for messages
    waiting: bool = False  # inside a collective (waiting on the other ranks)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes metrics, logs and checkpoints."""
        return self.rank == 0

    def share(self, rows: np.ndarray) -> np.ndarray:
        """This rank's contiguous block of the step's prompts [B] -> [B/size (+1)]; rank order
        is batch order, so the concatenated shares are the single-process batch."""
        return np.array_split(np.asarray(rows), self.size)[self.rank]

    def peers(self) -> str:
        """The rank(s) this one waits for, in words."""
        others = [r for r in range(self.size) if r != self.rank]
        return f"rank {others[0]}" if len(others) == 1 else f"one of ranks {others}"

    def _lost(self, phase: str, why: str) -> PeerLost:
        return PeerLost(f"rank {self.rank}: the {phase} of step {self.step} failed: "
                        f"{self.peers()} died or lost its connection ({why}); the newest "
                        f"checkpoint is intact: continue with --resume (any number of ranks)")

    def _reduce(self, x: mx.array, phase: str, stream=None) -> mx.array:
        """all_sum of a 1-D array [n] -> [n], evaluated; the sentinels (see the module
        docstring) turn a sum that missed a rank into PeerLost."""
        self.phase, self.waiting = phase, True
        one = mx.ones((1,), x.dtype)
        try:
            out = mx.distributed.all_sum(mx.concatenate([one, x, one]), group=self.group,
                                         stream=stream)
            mx.eval(out)
        except RuntimeError as e:
            raise self._lost(phase, str(e)) from None
        finally:
            self.phase, self.waiting = f"computing after the {phase}", False
        ends = (out[0].item(), out[-1].item())
        if ends != (self.size, self.size):
            raise self._lost(phase, f"the sum held {ends[0]:g} of {self.size} ranks")
        return out[1:-1]

    def all_sum(self, x, phase: str = "metrics all-sum") -> np.ndarray:
        """Sum a host array across ranks, float64 on the CPU stream. Every rank must pass the
        same shape. x [...] -> float64 numpy [...]."""
        x = np.asarray(x, dtype=np.float64)
        if self.size == 1:
            return x
        flat = mx.array(x.reshape(-1), dtype=mx.float64)
        return np.array(self._reduce(flat, phase, mx.cpu), dtype=np.float64).reshape(x.shape)

    def gather(self, x, phase: str = "metrics gather") -> np.ndarray:
        """Concatenate the ranks' rows in rank order (any lengths): [n_r, ...] -> [sum n_r, ...]
        float64. Two all-sums: the lengths, then each rank's rows at its offset of zeros."""
        x = np.asarray(x, dtype=np.float64)
        if self.size == 1:
            return x
        counts = np.zeros(self.size)
        counts[self.rank] = len(x)
        counts = self.all_sum(counts, phase).astype(int)
        full = np.zeros((int(counts.sum()),) + x.shape[1:])
        start = int(counts[:self.rank].sum())
        full[start:start + len(x)] = x
        return self.all_sum(full, phase)

    def sum_stats(self, totals: dict) -> dict:
        """All-sum a dict of scalar arrays (the loss stats' unnormalised sums); every rank holds
        the same keys (a rank without rows runs a zero-weight pass, see `trainer.update`)."""
        if self.size == 1:
            return totals
        keys = sorted(totals)
        values = self.all_sum([float(mx.array(totals[k]).item()) for k in keys], "stats all-sum")
        return {k: mx.array(v, mx.float32) for k, v in zip(keys, values)}

    def sum_gradients(self, grads):
        """The sum of every rank's gradient tree (each a sum of micro-batch gradients already
        divided by the GLOBAL counts, so the sum is the full batch's gradient), evaluated here.
        As `nn.average_gradients`: arrays of one dtype are concatenated into buffers of about
        BUCKET_BYTES, one all-sum each (without its division by the world size)."""
        if self.size == 1:
            return grads
        out = []
        for bucket in buckets(tree_flatten(grads), BUCKET_BYTES):
            summed = self._reduce(mx.concatenate([v.reshape(-1) for _, v in bucket]),
                                  "gradient all-reduce")
            at = 0
            for key, v in bucket:
                out.append((key, summed[at:at + v.size].reshape(v.shape)))
                at += v.size
        return tree_unflatten(out)

    def barrier(self, phase: str = "barrier") -> None:
        """Return when every rank has reached this call."""
        self.all_sum(np.zeros(1), phase)


def start_mismatch(world: World, step: int, params) -> str | None:
    """Whether the ranks start from different states: their (step, sum of |trainable
    parameters|) as one rank's message, or None when they agree (and for one process)."""
    if world.size == 1:
        return None
    total = sum(float(mx.abs(v.astype(mx.float32)).sum().item()) for _, v in tree_flatten(params))
    seen = world.gather([[step, total]], "setup gather")  # [size, 2]
    bad = [r for r in range(world.size)
           if seen[r, 0] != seen[0, 0] or abs(seen[r, 1] - seen[0, 1]) > 1e-6 * abs(seen[0, 1])]
    if not bad:
        return None
    return ("the ranks start from different states: " + ", ".join(
        f"rank {r} at step {int(seen[r, 0])} (sum |params| {seen[r, 1]:.6g})"
        for r in [0, *bad]) + "; every machine needs the same model, init_adapter and, on "
        "--resume, a copy of output_dir's checkpoints (rsync it from rank 0's machine)")


def init_world() -> World:
    """The launcher's world (`mlx.launch` sets MLX_RANK / MLX_HOSTFILE, ...), or one process."""
    if not mx.distributed.is_available():
        return World()
    group = mx.distributed.init()
    if group.size() == 1:
        return World()
    return World(group, group.rank(), group.size())


def buckets(flat: list, limit: int) -> list[list]:
    """Consecutive (key, array) pairs grouped by dtype, each group closed once it holds
    `limit` bytes."""
    groups, size = [], 0
    for key, v in flat:
        if not groups or groups[-1][-1][1].dtype != v.dtype or size >= limit:
            groups.append([])
            size = 0
        groups[-1].append((key, v))
        size += v.nbytes
    return groups


def gradient_bytes(grads) -> int:
    """Bytes of the buffers one gradient sum reduces (a ring all-reduce sends, and receives,
    2 (N-1)/N times this per rank)."""
    return sum(v.nbytes for _, v in tree_flatten(grads))


class Watchdog:
    """Exits this process when a step runs past `timeout_s` (a peer died or stalled inside a
    collective, which the ring backend would wait on forever). `arm(step)` at a step's start,
    `disarm()` at its end; a daemon thread checks twice a second. `exit` is `os._exit` (the main
    thread cannot be interrupted inside a collective); tests pass a recorder."""

    def __init__(self, world: World, timeout_s: float | None, exit=os._exit, poll_s: float = 0.5):
        self.world, self.timeout_s, self.exit, self.poll_s = world, timeout_s, exit, poll_s
        self.deadline = None
        self.fired = None  # the message, once fired
        self._stop = threading.Event()
        self._thread = None
        if world.size > 1 and timeout_s is not None:
            self._thread = threading.Thread(target=self._watch, daemon=True, name="watchdog")
            self._thread.start()

    def arm(self, step: int) -> None:
        self.world.step, self.world.phase = step, "computing (rollout)"
        self.deadline = time.monotonic() + self.timeout_s if self.timeout_s else None

    def disarm(self) -> None:
        self.deadline = None

    def message(self) -> str:
        w = self.world
        who = (f"waited for {w.peers()}, which died or stalled" if w.waiting
               else "this rank itself is slow or stalled")
        return (f"rank {w.rank}: step {w.step} did not finish within distributed_timeout_s = "
                f"{self.timeout_s:g} s (at: {w.phase}); {who}. The ring backend has no timeouts, "
                f"so this rank exits; the newest checkpoint is intact: continue with --resume "
                f"(any number of ranks)")

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.deadline is not None and time.monotonic() > self.deadline:
                self.fired = self.message()
                print(self.fired, file=sys.stderr, flush=True)
                self.deadline = None
                self.exit(3)

    def close(self) -> None:
        self._stop.set()
