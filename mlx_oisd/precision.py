"""Float32 master weights for full fine-tuning of half-precision (bf16 / fp16) checkpoints.

A bf16 weight of size 0.02 moves in steps of 2^-8 * 0.02 = 8e-5, so an AdamW update of
lr = 1e-5 is less than half a step and rounds away: trained in place, most weights of a bf16
checkpoint would never move. As mixed-precision training does, AdamW therefore updates a float32
copy of the trainable weights (its moments float32 too) and the model receives that copy rounded
to its own dtype after each update. The copy lives in the optimizer state under `master`, so
checkpoints carry it and a resumed run continues bit for bit.

LoRA needs none of this: mlx-lm makes the adapter matrices float32 on any base.
Memory: 4 bytes per trainable parameter for the copy, and float32 moments (the memory plan
counts both).
"""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

HALF = (mx.bfloat16, mx.float16)


def needs_master_weights(model: nn.Module) -> bool:
    """True when some trainable parameter is half precision (full fine-tuning of a bf16 base)."""
    return any(p.dtype in HALF for _, p in tree_flatten(model.trainable_parameters()))


class MasterAdamW(optim.AdamW):
    """AdamW over float32 master copies of the trainable parameters (see the module docstring).
    `update(model, grads)` is the only entry point that differs from AdamW's."""

    def update(self, model: nn.Module, gradients: dict):
        params = dict(tree_flatten(model.trainable_parameters()))
        grads = tree_flatten(gradients)
        if "master" not in self.state:
            self.state["master"] = tree_unflatten([(k, params[k].astype(mx.float32)) for k, _ in grads])
        grads = tree_unflatten([(k, g.astype(mx.float32)) for k, g in grads])
        master = self.apply_gradients(grads, self.state["master"])
        self.state["master"] = master
        model.update(tree_unflatten([(k, m.astype(params[k].dtype)) for k, m in tree_flatten(master)]))


def make_adamw(model: nn.Module, learning_rate, weight_decay: float) -> optim.AdamW:
    """AdamW for `model`'s trainable parameters: with float32 master weights when they are half
    precision, plain AdamW otherwise (LoRA, float32 models)."""
    cls = MasterAdamW if needs_master_weights(model) else optim.AdamW
    return cls(learning_rate=learning_rate, weight_decay=weight_decay)
