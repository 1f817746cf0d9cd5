"""Peak memory of one loss step vs vocabulary size and sequence length.

On a narrow model (so the vocabulary-sized work dominates), one gradient of the objective
(`ObjectiveGrad`, eager) for N rows x C response tokens, for several V and C, with the loss
chunked as configured (`loss_chunk_size` default) and unchunked (one chunk of all N*C rows: the
full (N*C, V) logits at once, as a naive implementation holds them). Reported: the step's
working memory (peak minus the memory held before it) and the least-squares slope of working
memory against N*C*V as V grows (bytes per logit): a chunked loss keeps it near zero. Growth with
C at fixed V is the model's own activations (hidden states, attention), not the loss.
"""

import mlx.core as mx
import numpy as np

from mlx_oisd import load
from mlx_oisd.objective import LossSpec, ObjectiveGrad
from mlx_oisd.rollout import Rollout, pack
from mlx_oisd.tiny import TinySpec

from .common import Table, bench_model

NARROW = dict(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1,
              head_dim=16, tokenizer_vocab=512, seed=2)


def working_memory(model, batch, spec) -> float:
    """GB above the memory already held, for one gradient of the objective."""
    N = batch.tokens.shape[0]
    adv = mx.array(np.linspace(-1, 1, N, dtype=np.float32))
    grad_fn = ObjectiveGrad(model, compile=False)
    mx.synchronize()
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    (loss, stats), grads = grad_fn(batch, adv, None, None, spec, batch.response_mask.sum(), N)
    mx.eval(loss, stats, grads)
    return (mx.get_peak_memory() - held) / 1e9


def run(vocabs=(2048, 8192, 32768), lengths=(64, 256), N=4, prompt_len=16) -> Table:
    table = Table(
        "Loss-step memory vs vocabulary and sequence length",
        f"Narrow Qwen3 (2 blocks, D=32, full fine-tuning), N={N} rows, prompt {prompt_len} "
        "tokens, C response tokens. Working memory (GB) of one gradient of the objective; "
        "chunked = default `loss_chunk_size`, unchunked = all N*C rows in one chunk.",
        ["algorithm", "V", "C", "N*C*V", "chunked GB", "unchunked GB"])
    points = {}
    rng = np.random.default_rng(0)
    for V in vocabs:
        model, _ = load(bench_model(TinySpec(**NARROW, vocab_size=V)))
        for C in lengths:
            prompts = [list(rng.integers(300, V, prompt_len)) for _ in range(N // 2)]
            comps = [list(rng.integers(300, V, C)) for _ in range(N)]
            batch = pack(Rollout(prompts, comps, [True] * N, 2), pad_id=0)
            for algorithm in ("grpo", "oisd"):
                spec = LossSpec(algorithm=algorithm, student_layers=(1,), max_len=C)
                chunked = working_memory(model, batch, spec)
                whole = working_memory(model, batch, LossSpec(
                    algorithm=algorithm, student_layers=(1,), max_len=C, chunk_size=N * C))
                points.setdefault((algorithm, C), []).append((N * C * V, chunked, whole))
                table.rows.append([algorithm, V, C, N * C * V, chunked, whole])
    table.notes.append("Slope of working memory against N*C*V as V grows at fixed C (bytes per "
                       "logit; a loss holding all logits needs 4 per float32 array):")
    for (algorithm, C), pts in points.items():
        x = np.array([p[0] for p in pts], dtype=np.float64)
        slopes = [np.polyfit(x, np.array([p[i] for p in pts]) * 1e9, 1)[0] for i in (1, 2)]
        table.notes.append(f"- {algorithm}, C={C}: chunked {slopes[0]:.2f}, unchunked "
                           f"{slopes[1]:.2f}")
    return table
