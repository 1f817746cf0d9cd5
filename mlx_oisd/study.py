"""The study model `builtin:study-arith`: deep enough for "intermediate layer" to mean something.

The demo's model has 2 blocks and 4-token answers: its student block is half the model. This one
is a random 6-block Qwen3 (D = 64), warmed up like the demo (mlx_oisd/demo.py) on sums of
three one-digit numbers answered in a short worked form, a running sum, then boxed:

    What is 3 + 5 + 8?  ->  3+5=8, 8+8=16, \\boxed{16}

about 15 answer tokens (digits are single tokens). The warm-up teacher is sloppy in `SLOPPY` of
its answers (no box), so RL with the math reward has a habit to remove and sums to sharpen. The
study (scripts/study.py) trains GRPO, OISD and its ablations from it with student block 2 (L/3).
"""

from pathlib import Path

from .data import load_examples
from .data.prompts import MATH_INSTRUCTION
from .demo import EMPTY_THINK, build_warm_model, chat_rows
from .tiny import TinySpec

STUDY_TASK = "builtin:arith?digits=1&terms=3&n=600&n_test=100"
SPEC = TinySpec(
    num_layers=6, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
    tokenizer_vocab=300, added_tokens=(MATH_INSTRUCTION, EMPTY_THINK, "\\boxed{", "What is"),
)
WARMUP = {"iters": 1000, "batch_size": 32, "learning_rate": 1e-2, "seed": 0}
SLOPPY = 0.3  # fraction of warm-up answers given without \\boxed{}


def worked_answer(question: str) -> str:
    """The running-sum form of a sum question: 'What is 3 + 5 + 8?' -> '3+5=8, 8+8=16, '
    (without the box)."""
    terms = [int(x) for x in question.removeprefix("What is ").rstrip("?").split(" + ")]
    steps, total = [], terms[0]
    for x in terms[1:]:
        steps.append(f"{total}+{x}={total + x}")
        total += x
    return ", ".join(steps) + ", "


def build_study_arith(path: Path, warmup: dict = WARMUP) -> Path:
    """Build, warm up and move the study model into `path`."""
    rows = chat_rows(load_examples(STUDY_TASK, "train"), SLOPPY,
                     worked=lambda ex: worked_answer(ex.prompt))
    return build_warm_model(path, SPEC, rows, {**warmup, "show_progress": False})
