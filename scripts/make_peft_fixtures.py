"""Generate the PEFT parity fixtures in tests/fixtures/peft/ (two steps, two environments).

Step 1, with the project's .venv (MLX): a tiny random Qwen3 (`base/`, untied head, 2 blocks),
two mlx-lm adapter folders written the way training writes them (`mlx_all/`: every linear of
every block; `mlx_partial/`: three modules of the last block only) and their PEFT exports
(`peft_all/`, `peft_partial/`) made by `mlx_oisd.export`:

    .venv/bin/python scripts/make_peft_fixtures.py --step mlx

Step 2, with the torch env (.venv-ref: torch, transformers, peft; no MLX): loads `base/` with
transformers (float32, eager attention), applies each PEFT adapter with `PeftModel.from_pretrained`
and records the logits of fixed token ids in `reference.npz`:

    .venv-ref/bin/pip install peft
    .venv-ref/bin/python scripts/make_peft_fixtures.py --step torch

reference.npz: `input_ids` int32 (B, T); `logits_base`, `logits_all`, `logits_partial` float32
(B, T, V). tests/test_export.py checks that our MLX model with each mlx-lm adapter gives PEFT's
logits, and that re-exporting the mlx-lm folders gives the committed PEFT folders.
"""

import argparse
import os
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "tests" / "fixtures" / "peft"
BASE_REF = "tests/fixtures/peft/base"  # base_model_name_or_path, relative to the repo root
SEED = 0
BATCH, SEQ_LEN = 2, 8

# name -> (num_layers, mlx-lm lora_parameters)
CASES = {
    "all": (-1, {"rank": 4, "scale": 20.0, "dropout": 0.0}),
    "partial": (1, {"rank": 2, "scale": 6.5, "dropout": 0.0,
                    "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]}),
}


def step_mlx() -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_oisd import load
    from mlx_oisd.export import export
    from mlx_oisd.lora import apply_lora, save_adapters
    from mlx_oisd.tiny import TinySpec, build_tiny_model

    for name in ["base", *(f"{kind}_{case}" for kind in ("mlx", "peft") for case in CASES)]:
        shutil.rmtree(OUT_DIR / name, ignore_errors=True)
    spec = TinySpec(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=2,
                    num_kv_heads=1, head_dim=16, init_std=0.2, tie_word_embeddings=False)
    build_tiny_model(OUT_DIR / "base", spec)
    for i, (case, (num_layers, params)) in enumerate(CASES.items()):
        mx.random.seed(SEED + i)  # LoRALinear draws lora_a from the global generator
        model, _ = load(OUT_DIR / "base")
        apply_lora(model, num_layers, params)
        lora_b = [(n, p) for n, p in tree_flatten(model.trainable_parameters()) if n.endswith("lora_b")]
        keys = mx.random.split(mx.random.key(SEED + i), len(lora_b))
        model.load_weights([(n, 0.1 * mx.random.normal(p.shape, key=k))
                            for k, (n, p) in zip(keys, lora_b)], strict=False)
        save_adapters(model, OUT_DIR / f"mlx_{case}", num_layers, params)
        rel = OUT_DIR.relative_to(ROOT)  # paths in the model cards stay repo-relative
        export(rel / f"mlx_{case}", "peft", rel / f"peft_{case}", base=BASE_REF)
    print(f"wrote {OUT_DIR}; now run: .venv-ref/bin/python {Path(__file__).relative_to(ROOT)} --step torch")


def step_torch() -> None:
    import peft
    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def base_model():
        return AutoModelForCausalLM.from_pretrained(
            OUT_DIR / "base", dtype=torch.float32, attn_implementation="eager").eval()

    model = base_model()
    vocab = model.config.vocab_size
    ids = np.random.default_rng(SEED).integers(0, vocab, (BATCH, SEQ_LEN)).astype(np.int32)
    with torch.no_grad():
        out = {"input_ids": ids, "logits_base": model(torch.from_numpy(ids).long()).logits.numpy()}
        for case in CASES:
            adapted = PeftModel.from_pretrained(base_model(), OUT_DIR / f"peft_{case}").eval()
            n_lora = sum(1 for n, _ in adapted.named_modules() if n.endswith("lora_A.default"))
            out[f"logits_{case}"] = adapted(torch.from_numpy(ids).long()).logits.numpy()
            diff = np.abs(out[f"logits_{case}"] - out["logits_base"]).max()
            print(f"{case}: {n_lora} LoRA modules, max |logits - base| = {diff:.4f}")
            assert diff > 1e-2, "the PEFT adapter changed nothing: wrong key names?"
    np.savez_compressed(OUT_DIR / "reference.npz", **{k: v.astype(np.float32) if k != "input_ids"
                                                      else v for k, v in out.items()})
    print(f"wrote {OUT_DIR / 'reference.npz'} (torch {torch.__version__}, transformers "
          f"{transformers.__version__}, peft {peft.__version__})")


if __name__ == "__main__":
    os.chdir(ROOT)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", choices=["mlx", "torch"], required=True)
    {"mlx": step_mlx, "torch": step_torch}[parser.parse_args().step]()
