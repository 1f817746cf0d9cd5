"""bench/: the FLOP count behind MFU and the per-function peak memory of interleaved timing.
(No timing is asserted: the suite's numbers live in BENCHMARKS.md.)"""

import mlx.core as mx
import mlx.nn as nn
import pytest

from bench.common import compare
from bench.mfu import forward_flops
from mlx_oisd import load
from mlx_oisd.rollout import Rollout, pack


def test_forward_flops_counts_every_matmul_once(make_tiny):
    """Against a count from the model's own weight shapes and a brute-force walk over queries:
    the shared prompt once per prompt, responses once per row, causal keys, readout per
    response token."""
    model, _ = load(make_tiny(num_layers=2, hidden_size=32, intermediate_size=48, num_heads=4,
                              num_kv_heads=2, head_dim=8))
    rollout = Rollout([[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14], [15, 16], [17, 18, 19]],
                      [False] * 4, 2)
    batch = pack(rollout, pad_id=0)
    P, C, N, U = batch.prompt_len, batch.response_mask.shape[1], 4, 2
    block_weights = sum(m.weight.size for layer in model.layers for _, m in layer.named_modules()
                        if isinstance(m, nn.Linear))
    args = model.args
    keys = U * sum(range(1, P)) + N * sum(P - 1 + c + 1 for c in range(C))
    expected = (2 * block_weights * (U * (P - 1) + N * C)
                + 2 * 2 * args.num_attention_heads * args.head_dim * keys * args.num_hidden_layers
                + 2 * args.hidden_size * args.vocab_size * N * C)
    assert forward_flops(args, batch) == pytest.approx(expected)


def test_compare_reports_each_functions_own_peak():
    def big():
        return mx.eval(mx.zeros((1024, 1024)) + 1)  # 4 MB

    def small():
        return mx.eval(mx.zeros((16,)) + 1)

    out = compare({"big": big, "small": small}, repeats=2)
    assert out["big"][1] >= 4 * 1024 * 1024 / 1e9 > out["small"][1]
    assert out["big"][0] > 0 and out["small"][0] > 0
