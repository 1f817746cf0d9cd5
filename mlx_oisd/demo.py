"""The offline demo model `builtin:tiny-arith`: a tiny Qwen3 warmed up on built-in arithmetic.

The first use builds a random 2-block Qwen3 (D = 48) with a byte-level tokenizer, fine-tunes it
for a short supervised phase on `DEMO_TASK` (the sum of three one-digit numbers, answered as
`\\boxed{n}` after Qwen3's empty think block, exactly the format the math reward reads), and caches
it. The warm-up is deliberately short: the model answers some held-out questions right and many
wrong, which leaves GRPO + OISD something to improve (configs/demo.yaml).

Sized for a 2-core CPU with a reference BLAS (about 3 GFLOP/s): the tokenizer holds the prompt's
fixed strings (Qwen's math instruction, the empty think block, `\\boxed{`) as single tokens, so
the compute goes to the arithmetic rather than to re-reading the instruction.
"""

import os
import shutil
from pathlib import Path

from .data import load_examples
from .data.prompts import MATH_INSTRUCTION, prompt_messages
from .sft import sft
from .tiny import TinySpec, build_tiny_model

DEMO_TASK = "builtin:arith?digits=1&terms=3&n=500&n_test=200"
EMPTY_THINK = "<think>\n\n</think>\n\n"
SPEC = TinySpec(
    num_layers=2, hidden_size=48, intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=12,
    tokenizer_vocab=300, added_tokens=(MATH_INSTRUCTION, EMPTY_THINK, "\\boxed{", "What is"),
)
WARMUP = {"iters": 400, "batch_size": 64, "learning_rate": 1e-2, "seed": 0}


def chat_rows(examples) -> list[dict]:
    """mlx-lm chat rows: the RL prompt's messages, then the boxed answer as the assistant turn."""
    return [{"messages": prompt_messages(ex.prompt) + [
        {"role": "assistant", "content": f"{EMPTY_THINK}\\boxed{{{ex.answer}}}"}]}
        for ex in examples]


def _render(row: dict) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in row["messages"])


def build_tiny_arith(path: Path) -> Path:
    """Build, warm up and move the demo model into `path` (complete or absent, never half)."""
    rows = chat_rows(load_examples(DEMO_TASK, "train"))
    tmp = path.parent / f".tmp-{path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    base = build_tiny_model(tmp / "base", SPEC, corpus=[_render(r) for r in rows[:300]])
    warm = sft(base, rows, tmp / "warm", lora=None, **WARMUP)
    os.replace(warm, path)
    shutil.rmtree(tmp, ignore_errors=True)
    return path
