"""The offline demo model `builtin:tiny-arith`: a tiny Qwen3 warmed up on built-in arithmetic.

The first use builds a random 2-block Qwen3 (D = 48) with a byte-level tokenizer, fine-tunes it
for a short supervised phase on `DEMO_TASK` (sums of two one-digit numbers: 61 train questions,
20 held out) and caches it.

The warm-up imitates a sloppy teacher: in `SLOPPY` of its answers the teacher gives the bare
number instead of `\\boxed{n}`, the format the math reward reads (and Qwen's prompt asks for).
The warm model inherits the habit and a partial grasp of the sums, so sampled at temperature 1 it
is right on roughly a third of the held-out questions. That is the situation RL with a verifiable
reward is for: GRPO + OISD (configs/demo.yaml) removes the habit, which carries over to questions
it never trained on, and sharpens the sums it half knows.

Sized for a 2-core CPU with a reference BLAS (about 3 GFLOP/s): the tokenizer holds the prompt's
fixed strings (Qwen's math instruction, the empty think block, `\\boxed{`) as single tokens, so
the compute goes to the arithmetic rather than to re-reading the instruction.
"""

import os
import shutil
from pathlib import Path

import numpy as np

from .data import load_examples
from .data.prompts import MATH_INSTRUCTION, prompt_messages
from .sft import sft
from .tiny import TinySpec, build_tiny_model

DEMO_TASK = "builtin:arith?digits=1&terms=2&n=61&n_test=20"
EMPTY_THINK = "<think>\n\n</think>\n\n"
SPEC = TinySpec(
    num_layers=2, hidden_size=48, intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=12,
    tokenizer_vocab=300, added_tokens=(MATH_INSTRUCTION, EMPTY_THINK, "\\boxed{", "What is"),
)
WARMUP = {"iters": 500, "batch_size": 32, "learning_rate": 1e-2, "seed": 0}
SLOPPY = 0.3  # fraction of warm-up answers given without \\boxed{}


def chat_rows(examples, sloppy: float = SLOPPY, seed: int = 0, worked=None) -> list[dict]:
    """mlx-lm chat rows: the RL prompt's messages, then the answer as the assistant turn (after
    `worked(example)`, a worked solution, when given), boxed except in a seeded `sloppy`
    fraction of the rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for ex in examples:
        answer = ex.answer if rng.random() < sloppy else f"\\boxed{{{ex.answer}}}"
        steps = worked(ex) if worked else ""
        rows.append({"messages": prompt_messages(ex.prompt) + [
            {"role": "assistant", "content": EMPTY_THINK + steps + answer}]})
    return rows


def _render(row: dict) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in row["messages"])


def build_warm_model(path: Path, spec: TinySpec, rows: list[dict], warmup: dict) -> Path:
    """Build a random model of `spec` (its tokenizer learned from the first rows), fine-tune it
    on chat `rows` (full fine-tuning, `warmup` = sft's iters / batch_size / learning_rate /
    seed) and move it into `path`: complete or absent, never half."""
    tmp = path.parent / f".tmp-{path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    base = build_tiny_model(tmp / "base", spec, corpus=[_render(r) for r in rows[:300]])
    warm = sft(base, rows, tmp / "warm", lora=None, **warmup)
    os.replace(warm, path)
    shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_tiny_arith(path: Path) -> Path:
    """Build, warm up and move the demo model into `path`."""
    return build_warm_model(path, SPEC, chat_rows(load_examples(DEMO_TASK, "train")), WARMUP)
