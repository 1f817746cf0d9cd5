"""MFU: achieved FLOP/s of the training forward+backward vs the measured peak matmul FLOP/s.

Peak: the best of square matmuls in the model's dtype on the same backend and machine.
Achieved: model FLOPs of one gradient of the GRPO objective on a packed rollout divided by its
median time. Model FLOPs (no recomputation counted) of the forward: 2 * (block matmul
parameters) per computed token, where the shared prompt is computed once per prompt (U*S) and
the responses per row (N*C); causal attention 4 * heads * head_dim * keys per query and block;
the vocabulary readout 2 * D * V per response token. Backward: 2x the forward for full
fine-tuning, 1x for LoRA (activation gradients; the frozen weights get none).
"""

import mlx.core as mx
import numpy as np

from mlx_oisd import load
from mlx_oisd.config import validate
from mlx_oisd.lora import apply_lora, lora_parameters
from mlx_oisd.objective import ObjectiveGrad
from mlx_oisd.trainer import loss_spec

from .common import Table, timed


def peak_matmul_flops(sizes, dtype=mx.float32) -> tuple[float, int]:
    """(best FLOP/s, its size) over square matmuls of `sizes`."""
    best = (0.0, 0)
    for n in sizes:
        a = mx.random.normal((n, n)).astype(dtype)
        b = mx.random.normal((n, n)).astype(dtype)
        mx.eval(a, b)
        t, _, _ = timed(lambda x, y: mx.eval(x @ y), a, b, repeats=3)
        best = max(best, (2 * n**3 / t, n))
    return best


def forward_flops(args, batch) -> float:
    """Model FLOPs of `objective.forward` + the policy readout for a packed `Batch`."""
    D, L, H, kv, hd = (args.hidden_size, args.num_hidden_layers, args.num_attention_heads,
                       args.num_key_value_heads, args.head_dim)
    per_token = 2 * L * (D * H * hd * 2 + 2 * D * kv * hd + 3 * D * args.intermediate_size)
    N, C = batch.response_mask.shape
    U, S = batch.prompt_rows.shape[0], batch.prompt_len - 1
    tokens = U * S + N * C
    keys = U * S * (S + 1) / 2 + N * (C * S + C * (C + 1) / 2)  # causal keys over all queries
    return per_token * tokens + 4 * L * H * hd * keys + 2 * D * args.vocab_size * N * C


def gradient(grad_fn, batch, adv, spec):
    mx.eval(grad_fn(batch, adv, None, None, spec, batch.response_mask.sum(), batch.tokens.shape[0]))


def run(model_path, batch, repeats: int) -> Table:
    dtype = load(str(model_path))[0].model.norm.weight.dtype  # the compute dtype
    gpu = mx.default_device() == mx.gpu
    peak, n = peak_matmul_flops((1024, 2048, 4096) if gpu else (256, 512, 1024), dtype)
    table = Table(
        "MFU of the training forward+backward",
        f"Peak: best square {str(dtype).split('.')[-1]} matmul, {peak / 1e9:.2f} GFLOP/s "
        f"(n={n}). Batch: {batch.tokens.shape[0]} rows, prompt {batch.prompt_len}, "
        f"{batch.response_mask.shape[1]} response tokens; one gradient of the GRPO objective.",
        ["fine-tuning", "model GFLOP", "seconds", "achieved GFLOP/s", "MFU"])
    adv = mx.array(np.linspace(-1, 1, batch.tokens.shape[0], dtype=np.float32))
    cfg = validate({"model": "bench", "dataset": {"source": "x.jsonl"}, "algorithm": "grpo"})
    for kind in ("full", "lora"):
        model, _ = load(str(model_path))
        if kind == "lora":
            apply_lora(model, -1, lora_parameters(8, 20.0, 0.0, None))
        model.train()
        grad_fn = ObjectiveGrad(model, compile=False)
        flops = forward_flops(model.args, batch) * (3 if kind == "full" else 2)
        t, _, _ = timed(gradient, grad_fn, batch, adv, loss_spec(cfg), repeats=repeats)
        table.rows.append([kind, flops / 1e9, t, flops / t / 1e9, f"{flops / t / peak:.0%}"])
    return table
