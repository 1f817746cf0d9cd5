"""The reference policy of the KL term (`beta > 0`): the policy the run started from.

LoRA (and QLoRA): the model itself with its adapters switched off, no copy. Full fine-tuning: a
frozen copy of the starting weights, made before any update or checkpoint load. The copy shares
the starting arrays with the model; MLX arrays are immutable and every update replaces the
model's, so the copy keeps the starting values at the cost of one more set of weights (counted
by the memory plan).
"""

import copy
from contextlib import contextmanager

import mlx.nn as nn
from mlx.utils import tree_flatten

from .lora import adapters_disabled


def frozen_copy(model: nn.Module) -> nn.Module:
    """A structural copy of `model` holding the same parameter arrays, frozen, in eval mode."""
    shared = {id(v): v for _, v in tree_flatten(model.parameters())}
    ref = copy.deepcopy(model, shared)  # modules copied, parameter arrays shared
    ref.freeze()
    ref.eval()
    return ref


@contextmanager
def reference_policy(model: nn.Module, reference: nn.Module | None):
    """The model to score reference log-probs with: `reference` when there is one (full
    fine-tuning), else `model` with its LoRA adapters disabled."""
    if reference is not None:
        yield reference
        return
    with adapters_disabled(model):
        yield model
