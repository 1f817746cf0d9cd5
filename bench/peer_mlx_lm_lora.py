"""Time GRPO training steps of the peer trainer mlx-lm-lora on a local model folder.

Run with the separate benchmark venv (mlx-lm-lora, mlx, mlx-lm; nothing from mlx_oisd):

    .venv-bench/bin/python bench/peer_mlx_lm_lora.py --spec spec.json

spec.json holds "model" (a local HF-layout folder), "prompts" (a list of {"tokens", "prompt",
"answer"}; the first batch_size * steps are used), "batch_size", "group_size", "max_tokens",
"steps", "lora_rank", "lora_scale", "lora_dropout", "lora_keys" (null: mlx-lm's default keys),
"num_layers" (-1: all blocks), "learning_rate", "seed", "temperature" and "top_p".

The model gets LoRA adapters the way mlx-lm applies them and is trained with the peer's own
`train_grpo` loop (rollout with `generate_grpo`, reward scoring, microbatched value_and_grad and an
AdamW update per step), with beta 0 (no reference model), clipping epsilon 0.2 / 0.28, the
token-mean "bnpo" loss, no top-k / min-p filtering and no validation. The reward is 1.0 when the
answer string occurs in the completion text, else 0.0.

A `TrainingCallback` reporting every step records the peer's own step time (1 / it/s), the wall
time between reports, the peak memory of each step (reset after each report) and the generated
and trained token counts. The peer's output goes to stderr; stdout gets exactly one JSON line.
"""

import argparse
import contextlib
import importlib.metadata
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx_lm import load
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm_lora.trainer.grpo_trainer import GRPOTrainingArgs, train_grpo


def answer_in_completion(prompts, completions, answer, types=None):
    """Peer reward-function signature: 1.0 where the answer string occurs in the completion."""
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]


class StepRecorder(TrainingCallback):
    """Collects the per-step report of `train_grpo` (called with steps_per_report=1)."""

    def __init__(self, rows_per_step: int):
        self.rows_per_step = rows_per_step
        self.step_times, self.wall_step_times, self.peak_memory_gb = [], [], []
        self.generated_tokens, self.trained_tokens, self.hit_max_tokens_ratio = [], [], []
        self.last_report = time.perf_counter()

    def on_train_loss_report(self, train_info: dict):
        now = time.perf_counter()
        self.wall_step_times.append(now - self.last_report)
        self.step_times.append(1.0 / train_info["iterations_per_second"])
        self.peak_memory_gb.append(train_info["peak_memory"])
        mx.reset_peak_memory()
        self.generated_tokens.append(
            round(train_info["train_average_generated_tokens"] * self.rows_per_step)
        )
        # The peer reports a running total of trained (completion) tokens.
        self.trained_tokens.append(int(train_info["trained_tokens"]) - sum(self.trained_tokens))
        self.hit_max_tokens_ratio.append(train_info["train_hit_max_tokens_ratio"])
        self.last_report = time.perf_counter()


def build_model(spec: dict):
    """Load the model and add LoRA adapters the way mlx-lm's LoRA trainer does."""
    model, tokenizer = load(spec["model"])
    model.freeze()
    num_layers = spec["num_layers"]
    if num_layers == -1:
        num_layers = len(model.layers)
    lora_config = {
        "rank": spec["lora_rank"],
        "scale": spec["lora_scale"],
        "dropout": spec["lora_dropout"],
    }
    if spec["lora_keys"] is not None:
        lora_config["keys"] = spec["lora_keys"]
    linear_to_lora_layers(model, num_layers, lora_config)
    return model, tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, type=Path, help="benchmark spec JSON file")
    spec = json.loads(parser.parse_args().spec.read_text())

    mx.random.seed(spec["seed"])
    np.random.seed(spec["seed"])

    batch_size, group_size, steps = spec["batch_size"], spec["group_size"], spec["steps"]
    prompts = spec["prompts"][: batch_size * steps]
    if len(prompts) < batch_size * steps:
        raise ValueError(f"spec has {len(prompts)} prompts, needs {batch_size * steps}")

    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = build_model(spec)
        # The peer's dataset rows: (prompt tokens, answer tokens, prompt text, answer text).
        dataset = [
            (p["tokens"], tokenizer.encode(p["answer"]), p["prompt"], p["answer"]) for p in prompts
        ]
        args = GRPOTrainingArgs(
            batch_size=batch_size,
            iters=steps,
            gradient_accumulation_steps=1,
            steps_per_report=1,
            steps_per_save=steps + 1,
            max_seq_length=max(len(p["tokens"]) for p in prompts),
            adapter_file=str(Path(tmp) / "adapters.safetensors"),
            grad_checkpoint=False,
            group_size=group_size,
            beta=0.0,
            epsilon=0.2,
            epsilon_high=0.28,
            max_completion_length=spec["max_tokens"],
            temperature=spec["temperature"],
            top_p=spec["top_p"],
            top_k=0,
            min_p=0.0,
            grpo_loss_type="bnpo",
        )
        optimizer = optim.AdamW(learning_rate=spec["learning_rate"], weight_decay=0.0)
        recorder = StepRecorder(rows_per_step=batch_size * group_size)
        mx.reset_peak_memory()
        train_grpo(
            model=model,
            ref_model=None,
            tokenizer=tokenizer,
            optimizer=optimizer,
            train_dataset=dataset,
            val_dataset=None,
            reward_funcs=[answer_in_completion],
            args=args,
            training_callback=recorder,
            end_answer_token="",
        )

    result = {
        "tool": "mlx-lm-lora",
        "version": importlib.metadata.version("mlx-lm-lora"),
        "step_times": recorder.step_times,
        "wall_step_times": recorder.wall_step_times,
        "peak_memory_gb": max(recorder.peak_memory_gb),
        "peak_memory_per_step_gb": recorder.peak_memory_gb,
        "generated_tokens": recorder.generated_tokens,
        "trained_tokens": recorder.trained_tokens,
        "hit_max_tokens_ratio": recorder.hit_max_tokens_ratio,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
