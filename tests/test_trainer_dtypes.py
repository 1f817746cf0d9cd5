"""trainer.py on the dtypes users train: bf16 / fp16 checkpoints, QLoRA on a bf16 base, and
mlx-lm-converted 4-bit / 8-bit models, through `oisd-mlx train` (the float32 runs are in
test_trainer.py). Each run must train (adapters move), stay finite, save adapters that load,
and resume."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from test_trainer import _config, _train

from mlx_oisd import load
from mlx_oisd.metrics import read_metrics


@pytest.fixture(scope="module")
def converted(tmp_path_factory, make_tiny):
    """make_tiny(dtype=...) and mlx-lm `convert -q` of the bf16 one, by name."""
    from mlx_lm import convert

    bf16 = make_tiny(dtype="bfloat16")
    folders = {"bfloat16": bf16, "float16": make_tiny(dtype="float16")}
    for bits in (4, 8):
        out = tmp_path_factory.mktemp("convert") / f"q{bits}"
        convert(str(bf16), mlx_path=str(out), quantize=True, q_group_size=32, q_bits=bits)
        folders[f"mlx-{bits}bit"] = out
    return folders


def _finite(path):
    weights = mx.load(str(path))
    return weights, all(bool(mx.isfinite(w.astype(mx.float32)).all()) for w in weights.values())


@pytest.mark.parametrize("base,over", [
    ("bfloat16", {}),
    ("bfloat16", {"compile": True, "algorithm": "bupo", "bupo": {"internal_steps": 1}, "beta": 0.05}),
    ("bfloat16", {"lora": None, "learning_rate": 1e-4}),
    ("bfloat16", {"quantize": {"bits": 4, "group_size": 32}, "num_iterations": 2}),
    ("bfloat16", {"gradient_checkpointing": True, "compile": True, "minibatch_size": 2}),
    ("float16", {"compile": True, "algorithm": "grpo"}),
    ("mlx-4bit", {}),
    ("mlx-8bit", {"algorithm": "bupo", "bupo": {"internal_steps": 1}, "compile": True}),
])
def test_half_precision_and_quantized_bases_train(tmp_path, converted, base, over):
    folder = converted[base]
    cfg = _config(tmp_path, model=str(folder), max_steps=2, save_every=1, **over)
    _train(cfg)
    out = tmp_path / "run"
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for key in ("loss", "grad_norm", "entropy", "kl"):
            assert r[key] is not None and np.isfinite(r[key]), (key, r)
        assert (r["grad_norm"] > 0) == (r["frac_zero_std_groups"] < 1)
    weights, finite = _finite(out / "adapters" / "adapters.safetensors")
    assert finite
    config = json.loads((out / "adapters" / "adapter_config.json").read_text())
    if over.get("lora", {}) is None:  # full fine-tuning keeps the checkpoint's dtype
        assert config["fine_tune_type"] == "full"
        assert {w.dtype for w in weights.values()} == {getattr(mx, base)}
    else:  # LoRA matrices are float32 on any base (as mlx-lm makes them)
        assert {w.dtype for w in weights.values()} == {mx.float32}
        assert any(float(mx.abs(w).max()) > 0 for k, w in weights.items() if k.endswith("lora_b"))
    if "quantize" not in over:  # (a QLoRA adapter needs its base quantized at load)
        model, _ = load(folder, adapter_path=out / "adapters")
        assert bool(mx.isfinite(model(mx.array([[1, 5, 9, 13]])).astype(mx.float32)).all())
    # resumed from the step-1 checkpoint, step 2 is redone exactly
    shutil.rmtree(out / "checkpoints" / "step_000002")
    (out / "checkpoints" / "latest").write_text("step_000001\n")
    _train(cfg, "--resume")
    again, _ = _finite(out / "adapters" / "adapters.safetensors")
    assert again.keys() == weights.keys()
    for k in weights:
        np.testing.assert_array_equal(np.asarray(again[k].astype(mx.float32)),
                                      np.asarray(weights[k].astype(mx.float32)), err_msg=k)
