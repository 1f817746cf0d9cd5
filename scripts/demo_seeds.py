"""Held-out accuracy of the offline demo under GRPO and OISD, over several seeds (BENCHMARKS.md).

    .venv/bin/python scripts/demo_seeds.py --seeds 0 1 2 --out runs/demo-seeds

Runs `configs/demo.yaml` once per (algorithm, seed) with the same budget and prints a markdown
table of held-out Avg@16 before and after training.
"""

import argparse
import statistics
from pathlib import Path

from mlx_oisd.config import load_config
from mlx_oisd.metrics import read_metrics
from mlx_oisd.trainer import train


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--algorithms", nargs="+", default=["grpo", "oisd"])
    parser.add_argument("--out", default="runs/demo-seeds")
    args = parser.parse_args()
    rows = []
    for algorithm in args.algorithms:
        finals = []
        for seed in args.seeds:
            out = Path(args.out) / f"{algorithm}-seed{seed}"
            cfg = load_config(args.config, [f"algorithm={algorithm}", f"seed={seed}",
                                            f"output_dir={out}", "eval_every=0", "save_every=0"])
            train(cfg, resume=(out / "checkpoints" / "latest").exists(), show_progress=False)
            evals = [r["eval_accuracy"] for r in read_metrics(out / "metrics.jsonl")
                     if r.get("eval_accuracy") is not None]
            rows.append((algorithm, seed, evals[0], evals[-1]))
            finals.append(evals[-1])
        rows.append((algorithm, "mean", None, statistics.mean(finals)))
    print("| algorithm | seed | held-out before | held-out after |\n|---|---|---|---|")
    for algorithm, seed, before, after in rows:
        b = "" if before is None else f"{100 * before:.1f}%"
        print(f"| {algorithm} | {seed} | {b} | {100 * after:.1f}% |")


if __name__ == "__main__":
    main()
