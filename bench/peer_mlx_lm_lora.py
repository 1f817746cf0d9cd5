"""Time GRPO training steps of the peer trainer mlx-lm-lora on a local model folder.

Run with the separate benchmark venv (mlx-lm-lora, mlx, mlx-lm; nothing from mlx_oisd):

    .venv-bench/bin/python bench/peer_mlx_lm_lora.py --spec spec.json

spec.json holds "model" (a local HF-layout folder), "prompts" (a list of {"tokens", "prompt",
"answer"}; the first batch_size * steps are used), "batch_size", "group_size", "max_tokens",
"steps", "lora_rank", "lora_scale", "lora_dropout", "lora_keys" (null: mlx-lm's default keys),
"num_layers" (-1: all blocks), "learning_rate", "seed", "temperature" and "top_p"; optional
"reward" ("substring", the default, or "boxed": `boxed_answer`) and "in_order" (true: the prompts
are trained in the spec's order, batch_size at a time, instead of the peer's length-sorted,
shuffled batches).

The model gets LoRA adapters the way mlx-lm applies them and is trained with the peer's own
`train_grpo` loop (rollout with `generate_grpo`, reward scoring, microbatched value_and_grad and an
AdamW update per step), with beta 0 (no reference model), clipping epsilon 0.2 / 0.28, the
token-mean "bnpo" loss, no top-k / min-p filtering and no validation. The reward is 1.0 when the
answer string occurs in the completion text, else 0.0 ("substring"), or with "boxed" 1.0 when the
last `\\boxed{...}` of the completion holds the answer.

A `TrainingCallback` reporting every step records the peer's own step time (1 / it/s), the wall
time between reports, the peak memory of each step (reset after each report) and the generated
and trained token counts; a wrapper around the peer's `generate_grpo` records each rollout's time,
peak memory and completion lengths, and the reward function each step's rewards (row g*G + j is
completion j of prompt g, as the peer generates them). The peer's output goes to stderr; stdout
gets exactly one JSON line.
"""

import argparse
import contextlib
import importlib.metadata
import json
import re
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
from mlx_lm_lora.trainer import grpo_trainer
from mlx_lm_lora.trainer.grpo_trainer import GRPOTrainingArgs, train_grpo

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def answer_in_completion(prompts, completions, answer, types=None):
    """Peer reward-function signature: 1.0 where the answer string occurs in the completion."""
    out = [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]
    REWARDS.append(out)
    return out


def boxed_answer(prompts, completions, answer, types=None):
    """Peer reward-function signature: 1.0 where the completion's last `\\boxed{...}` (after its
    think blocks, before an end-of-turn token) holds the answer; integers compare as integers.
    On integer answers in a box this scores as the project's `math` reward does (which also
    reads `Answer: X` lines when there is no box, and asks math_verify when strings differ)."""
    out = []
    for c, a in zip(completions, answer):
        c = re.split(r"<\|im_end\|>|<\|endoftext\|>", _THINK.sub("", c), maxsplit=1)[0]
        boxes = _BOXED.findall(c)
        pred = boxes[-1].strip().strip("$").strip() if boxes else None
        out.append(1.0 if pred is not None and _same(pred, a.strip()) else 0.0)
    REWARDS.append(out)
    return out


def _same(pred: str, gold: str) -> bool:
    if re.fullmatch(r"-?\d+", pred) and re.fullmatch(r"-?\d+", gold):
        return int(pred) == int(gold)
    return pred == gold


REWARDS, ROLLOUTS = [], []  # per step: the rewards [B*G]; (seconds, peak GB, lengths [B*G])


def timed_generate(generate):
    """`generate` (the peer's generate_grpo) recording each call's time, peak and lengths."""
    def wrapper(*args, **kwargs):
        mx.synchronize()
        mx.reset_peak_memory()
        t = time.perf_counter()
        completions, texts, indices = generate(*args, **kwargs)
        mx.synchronize()
        ROLLOUTS.append((time.perf_counter() - t, mx.get_peak_memory() / 1e9,
                         [int(c.size) for c in completions]))
        return completions, texts, indices
    return wrapper


def in_order_batches(dataset, batch_size, max_seq_length, train=False):
    """The peer's batch tuples over `dataset` in order, batch_size rows at a time (no sorting,
    no shuffling), cycling like the peer's training iterator."""
    while True:
        for i in range(0, len(dataset) - batch_size + 1, batch_size):
            rows = dataset[i:i + batch_size]
            yield ([r[0][:max_seq_length] for r in rows], [r[1] for r in rows],
                   [r[2] for r in rows], [r[3] for r in rows], None)
        if not train:
            break


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
        reward = spec.get("reward", "substring")
        if reward not in ("substring", "boxed"):
            raise ValueError(f"spec reward: expected substring or boxed, got {reward!r}")
        grpo_trainer.generate_grpo = timed_generate(grpo_trainer.generate_grpo)
        extra = {"iterate_batches": in_order_batches} if spec.get("in_order") else {}
        mx.reset_peak_memory()
        train_grpo(
            model=model,
            ref_model=None,
            tokenizer=tokenizer,
            optimizer=optimizer,
            train_dataset=dataset,
            val_dataset=None,
            reward_funcs=[boxed_answer if reward == "boxed" else answer_in_completion],
            args=args,
            training_callback=recorder,
            end_answer_token="",
            **extra,
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
        "rollout_times": [r[0] for r in ROLLOUTS],
        "rollout_peak_gb": [r[1] for r in ROLLOUTS],
        "completion_lengths": [r[2] for r in ROLLOUTS],
        "rewards": REWARDS,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
