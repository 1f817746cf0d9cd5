"""`PromptSampler`: batches of example indices, reshuffled every epoch, resumable exactly.

Epoch `e` visits the examples in the order `permutation(n)` drawn from a generator seeded with
`(seed, e)`, so any epoch's order can be rebuilt from two integers. Batches are read off the
concatenation of epoch orders: within an epoch no index repeats, and a batch that reaches the end
of an epoch continues with the start of the next. The state is `{"epoch", "position"}` (position
within that epoch's order); a sampler loaded with it yields exactly the batches the original
would have yielded next.
"""

from numbers import Integral

import numpy as np


class PromptSampler:
    def __init__(self, n_examples: int, batch_size: int, seed: int = 0):
        if n_examples < 1 or batch_size < 1:
            raise ValueError(
                f"PromptSampler needs n_examples >= 1 and batch_size >= 1, "
                f"got {n_examples} and {batch_size}"
            )
        self.n_examples, self.batch_size, self.seed = n_examples, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_examples)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return self.next_batch()

    def next_batch(self) -> np.ndarray:
        """The next `batch_size` example indices, int64 [batch_size]."""
        parts, need = [], self.batch_size
        while need > 0:
            take = self._order[self.position : self.position + need]
            parts.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == self.n_examples:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
        return np.concatenate(parts)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict` of a sampler with the same n, batch, seed)."""
        epoch, position = state.get("epoch"), state.get("position")
        for key, value in (("epoch", epoch), ("position", position)):
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
                raise ValueError(f"sampler state {key!r} must be an integer >= 0, got {value!r}")
        if position >= self.n_examples:
            raise ValueError(
                f"sampler state position {position} is out of range for {self.n_examples} examples"
            )
        self.epoch, self.position = int(epoch), int(position)
        self._order = self._epoch_order(epoch)
