"""One full training step (rollout + scoring + update) of `algorithm: grpo`: ours vs mlx-lm-lora.

Ours: `trainer.train_step` of a real run (math reward in its worker process, AdamW on LoRA).
The peer: mlx-lm-lora's own `train_grpo` loop run by `bench/peer_mlx_lm_lora.py` in a separate
environment (it pins its own packages), on the same model folder, prompts, B, G, max tokens,
LoRA rank/scale/keys, learning rate, temperature 1, beta 0 and token-mean loss. Both sample
until EOS or max tokens, so lengths differ by chance: tokens per step are reported beside the
times. The first step of each is a warm-up and is not counted.
"""

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mlx_oisd.config import validate
from mlx_oisd.trainer import setup, train_step

from .common import ARITH, Table, arith_prompts


def our_steps(model_path: Path, B: int, G: int, max_tokens: int, steps: int,
              minibatch_size: int | None = None) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        cfg = validate({
            "model": str(model_path), "output_dir": out, "algorithm": "grpo",
            "dataset": {"source": ARITH}, "batch_size": B, "num_generations": G,
            "max_completion_length": max_tokens, "max_steps": steps, "learning_rate": 1e-5,
            "lr_scheduler_type": "constant", "lora": {"rank": 8, "scale": 20.0, "dropout": 0.0},
            "oisd": {"student_layers": [2]}, "rewards": [{"name": "math", "weight": 1.0}],
            "minibatch_size": minibatch_size, "seed": 0,
            # the worst case: every row is computed, as if each had an advantage
            "skip_zero_advantage": False,
        })
        run = setup(cfg)
        try:
            return [train_step(run, step) for step in range(1, steps + 1)]
        finally:
            for worker in run.workers.values():
                worker.close()


def peer_steps(python: Path, model_path: Path, tokenizer, B, G, max_tokens, steps) -> dict:
    prompts, answers = arith_prompts(tokenizer, B * steps)
    spec = {
        "model": str(model_path), "batch_size": B, "group_size": G, "max_tokens": max_tokens,
        "steps": steps, "lora_rank": 8, "lora_scale": 20.0, "lora_dropout": 0.0,
        "lora_keys": None, "num_layers": -1, "learning_rate": 1e-5, "seed": 0,
        "temperature": 1.0, "top_p": 1.0,
        "prompts": [{"tokens": p, "prompt": tokenizer.decode(p), "answer": a}
                    for p, a in zip(prompts, answers)],
    }
    return run_peer(python, spec)


def run_peer(python: Path, spec: dict) -> dict:
    """bench/peer_mlx_lm_lora.py on `spec` in the peer's environment; its one JSON line."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(spec, f)
        f.flush()
        script = Path(__file__).with_name("peer_mlx_lm_lora.py")
        proc = subprocess.run([str(python), str(script), "--spec", f.name], capture_output=True,
                              text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise RuntimeError(f"mlx-lm-lora harness failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(model_path: Path, tokenizer, settings: list[tuple[int, int, int, int]],
        peer_python: Path | None) -> Table:
    """settings: (B, G, max_tokens, steps) per row group; each run's first step is a warm-up."""
    table = Table(
        "Full GRPO step: ours vs mlx-lm-lora",
        "Median seconds per training step (rollout + reward + update) over the steps after a "
        "warm-up step; peak memory over those steps; tokens = generated tokens per step (mean). "
        "mlx-lm-lora differentiates micro-batches of B rows (fixed in its code); ours by default "
        "the whole batch, and at the first B also micro-batches of B rows (`minibatch_size`). "
        "Rewards: ours `math` (math-verify in its worker process), the peer's an answer "
        "substring check; the random model earns none, so advantages are zero; ours runs with "
        "`skip_zero_advantage: false` here, so both compute every row (the worst case).",
        ["B", "G", "max_tokens", "trainer", "s/step", "tokens", "peak GB", "speed-up vs peer",
         "memory vs peer"])
    for B, G, M, steps in settings:
        rows = []
        if peer_python is not None:
            peer = peer_steps(peer_python, model_path, tokenizer, B, G, M, steps)
            rows.append(("mlx-lm-lora " + peer["version"], statistics.median(peer["step_times"][1:]),
                         statistics.mean(peer["generated_tokens"][1:]),
                         max(peer["peak_memory_per_step_gb"][1:])))
        for size in (None, B) if B == settings[0][0] else (None,):
            ours = our_steps(model_path, B, G, M, steps, minibatch_size=size)[1:]
            rows.append((f"ours, minibatch_size {size or 'all'}",
                         statistics.median(r["step_time"] for r in ours),
                         statistics.mean(r["completion_len_mean"] * B * G for r in ours),
                         max(r["peak_memory_gb"] for r in ours)))
        for name, t, tokens, mem in rows:
            vs = (rows[0][1] / t, mem / rows[0][3]) if peer_python is not None else ("", "")
            table.rows.append([B, G, M, name, t, tokens, mem, *vs])
    if peer_python is None:
        table.notes.append("mlx-lm-lora was not run: `make bench-env` installs it into "
                           ".venv-bench, or pass --peer-python.")
    return table
