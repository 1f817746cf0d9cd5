"""Rollout tok/s, update time and MFU on a Qwen3-0.6B-shaped random bf16 model (bench/device.sh).

    python -m bench.device_bench                       # on a GPU (mlx[cuda]): 0.6B shape
    python -m bench.device_bench --size tiny           # the same code path on a CPU, in seconds

Steps: build the random bf16 model (`bench.full_size`; `tiny` is a 2-block D=64 model with
Qwen3's vocabulary, 151,936), measure the best square bf16 matmul (the peak), sample B*G
completions of `max-tokens` tokens each with `rollout.sample` (no stop tokens, so every row has
exactly max-tokens; temperature 1), then time the update on that fixed batch: one gradient of the
GRPO and of the OISD objective (LoRA rank 8 on every block) plus an AdamW step. MFU = model
FLOPs (`bench.mfu.forward_flops`, LoRA: forward + activation backward = 2x the forward) over
time, against the measured peak (the same model FLOPs for OISD: its student readout and JS are
not counted, so its MFU is the GRPO work per second); for the rollout, 2 x (block + readout
parameters) FLOPs per generated token (attention ignored). Prints a markdown table and a JSON line.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from mlx_oisd import load
from mlx_oisd.config import validate
from mlx_oisd.lora import apply_lora, lora_parameters
from mlx_oisd.objective import ObjectiveGrad
from mlx_oisd.rollout import pack, sample
from mlx_oisd.trainer import loss_spec

from .common import Table, arith_prompts, compare, machine
from .full_size import QWEN3_ARCHS, Qwen3Arch, build_folder
from .mfu import forward_flops, peak_matmul_flops

SIZES = {
    "0.6b": QWEN3_ARCHS["qwen3-0.6b"],
    "tiny": Qwen3Arch(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      head_dim=32),
}


def rollout_flops_per_token(args) -> float:
    """2 x (block matmul parameters + the readout D x V) per generated token."""
    D, L, H, kv, hd = (args.hidden_size, args.num_hidden_layers, args.num_attention_heads,
                       args.num_key_value_heads, args.head_dim)
    block = D * H * hd * 2 + 2 * D * kv * hd + 3 * D * args.intermediate_size
    return 2.0 * (L * block + D * args.vocab_size)


def update_step(model, optimizer, grad_fn, batch, adv, spec):
    """One gradient of the objective and one AdamW step, evaluated."""
    n_tok = float(batch.response_mask.sum().item())
    (loss, _), grads = grad_fn(batch, adv, None, None, spec, n_tok, batch.tokens.shape[0])
    optimizer.update(model, grads)
    mx.eval(loss, model.trainable_parameters(), optimizer.state)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.device_bench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="0.6b")
    p.add_argument("--batch-size", type=int, help="prompts B (default 8; tiny 2)")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt G")
    p.add_argument("--max-tokens", type=int, help="completion length (default 256; tiny 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    p.add_argument("--compile", action="store_true", help="mx.compile the gradient step")
    p.add_argument("--models", type=Path, help="folder for the built model (default: a temp dir)")
    args = p.parse_args(argv)
    tiny = args.size == "tiny"
    B = args.batch_size or (2 if tiny else 8)
    G, M = args.group_size, args.max_tokens or (8 if tiny else 256)
    if min(B, G, M, args.repeats) < 1:
        p.error("--batch-size, --group-size, --max-tokens and --repeats must be >= 1")
    print(f"machine: {machine()}", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = (args.models or Path(tmp)) / f"qwen3-{args.size}-random"
        if not (folder / "config.json").is_file():
            build_folder(SIZES[args.size], folder)
        t_build = time.perf_counter() - start
        model, tok = load(str(folder))
        dtype = model.model.norm.weight.dtype
        gpu = mx.default_device() == mx.gpu
        peak, n = peak_matmul_flops((4096, 8192) if gpu else (256, 512), mx.bfloat16)
        prompts, _ = arith_prompts(tok, B)

        mx.random.seed(0)
        runs = compare({"rollout": lambda: sample(model, prompts, G, M, [])}, args.repeats)
        t_roll, m_roll, rollout = runs["rollout"]
        tokens = rollout.num_tokens
        batch = pack(rollout, pad_id=0)
        adv = mx.array(np.linspace(-1, 1, batch.tokens.shape[0], dtype=np.float32))

        apply_lora(model, -1, lora_parameters(8, 20.0, 0.0, None))
        model.train()
        L = model.args.num_hidden_layers
        fns = {}
        for algo in ("grpo", "oisd"):
            cfg = validate({"model": "bench", "dataset": {"source": "x.jsonl"}, "algorithm": algo,
                            "oisd": {"student_layers": [max(1, L // 3)]}})
            grad_fn = ObjectiveGrad(model, compile=args.compile)
            opt = optim.AdamW(learning_rate=1e-6)
            spec = loss_spec(cfg)
            fns[algo] = (lambda g=grad_fn, o=opt, s=spec:
                         update_step(model, o, g, batch, adv, s))
        upd = compare(fns, args.repeats)

    flops = forward_flops(model.args, batch) * 2  # LoRA: forward + activation backward
    roll_flops = rollout_flops_per_token(model.args) * tokens
    table = Table(
        f"GPU benchmark: Qwen3-{args.size} shape, random {str(dtype).split('.')[-1]} weights",
        f"{machine()}. B={B}, G={G}, {M} completion tokens per row (no stop tokens), prompt "
        f"{batch.prompt_len} tokens; LoRA rank 8 on every block; compile "
        f"{'on' if args.compile else 'off'}. Peak: best square bf16 matmul "
        f"{peak / 1e12:.3g} TFLOP/s (n={n}). Median of {args.repeats} after a warm-up.",
        ["what", "seconds", "rate", "peak GB", "MFU"])
    table.rows.append(["rollout (sample B*G rows)", t_roll, f"{tokens / t_roll:,.0f} tok/s",
                       m_roll, f"{roll_flops / t_roll / peak:.1%}"])
    for algo, (t, mem, _) in upd.items():
        table.rows.append([f"{algo} update (gradient + AdamW)", t,
                           f"{tokens / t:,.0f} response tok/s", mem,
                           f"{flops / t / peak:.1%}"])
    print(table.markdown())
    total = time.perf_counter() - start
    print(json.dumps({
        "size": args.size, "B": B, "G": G, "max_tokens": M, "dtype": str(dtype),
        "device": str(mx.default_device()), "peak_matmul_tflops": peak / 1e12,
        "rollout_s": t_roll, "rollout_tok_s": tokens / t_roll,
        "rollout_mfu": roll_flops / t_roll / peak,
        **{f"{a}_update_s": t for a, (t, _, _) in upd.items()},
        **{f"{a}_update_mfu": flops / t / peak for a, (t, _, _) in upd.items()},
        **{f"{a}_peak_gb": m for a, (_, m, _) in upd.items()},
        "build_s": t_build, "total_s": total}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
