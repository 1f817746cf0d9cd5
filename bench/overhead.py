"""OISD overhead: the update of `oisd` vs `grpo` on the same rollouts.

One sampled rollout (B prompts x G completions of the bench model, no stop tokens) is packed once;
then `trainer.update` (old log-probs, gradient, AdamW) runs on it with `algorithm: grpo` and with
`algorithm: oisd` (student block L/2, lambda_logit 1, lambda_attn 0.1), eager and compiled.
"""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from mlx_oisd.config import validate
from mlx_oisd.lora import apply_lora, lora_parameters
from mlx_oisd.objective import ObjectiveGrad
from mlx_oisd.rollout import pack, sample
from mlx_oisd.trainer import loss_spec, update

from .common import Table, compare


def run(model, prompts, B: int, G: int, max_tokens: int, repeats: int) -> Table:
    L = model.args.num_hidden_layers
    apply_lora(model, -1, lora_parameters(8, 20.0, 0.0, None))
    mx.random.seed(0)
    batch = pack(sample(model, prompts[:B], G, max_tokens, stop_ids=[]), pad_id=0,
                 bucket=32)
    adv = mx.array(np.random.default_rng(0).normal(size=B * G).astype(np.float32))
    table = Table(
        "OISD overhead: oisd vs grpo update on the same rollouts",
        f"B={B}, G={G}, {max_tokens} completion tokens per row ({B * G * max_tokens} response "
        f"tokens, prompt {batch.prompt_len}); LoRA rank 8 on every block; student block "
        f"{L // 2} of {L}. Median seconds per update (gradient + AdamW) and its peak memory.",
        ["compile", "grpo s", "oisd s", "time ratio", "grpo peak GB", "oisd peak GB",
         "memory ratio"])
    for compile in (False, True):
        row = compare({algorithm: updater(model, batch, adv, algorithm, max_tokens, compile)
                       for algorithm in ("grpo", "oisd")}, repeats)
        (tg, mg, _), (to, mo, _) = row["grpo"], row["oisd"]
        table.rows.append(["on" if compile else "off", tg, to, to / tg, mg, mo, mo / mg])
    return table


def updater(model, batch, adv, algorithm: str, max_tokens: int, compile: bool):
    """A zero-argument `trainer.update` of `algorithm` on `batch` (its own optimizer)."""
    L = model.args.num_hidden_layers
    cfg = validate({"model": "bench", "dataset": {"source": "x.jsonl"}, "algorithm": algorithm,
                    "max_completion_length": max_tokens, "oisd": {"student_layers": [L // 2]}})
    spec, grad_fn = loss_spec(cfg), ObjectiveGrad(model, compile)
    opt = optim.AdamW(learning_rate=1e-6)
    return lambda: update(model, opt, grad_fn, batch, adv, spec, cfg)
