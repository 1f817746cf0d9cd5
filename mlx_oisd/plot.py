"""Training curves from one or more metrics.jsonl files into one PNG (GRPO vs OISD side by side)."""

from pathlib import Path

from .io import atomic_write
from .metrics import read_metrics

DEFAULT_KEYS = ("reward", "eval_accuracy", "js_logit", "js_attn", "completion_len_mean", "kl",
                "entropy", "grad_norm")


def plot_metrics(paths: list[str | Path], out: str | Path, keys=DEFAULT_KEYS,
                 labels: list[str] | None = None) -> Path:
    """One panel per key present in any file, one line per file; writes `out` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_metrics(p) for p in paths]
    labels = labels or [Path(p).parent.name or str(p) for p in paths]
    keys = [k for k in keys if any(k in r for records in runs for r in records)]
    if not keys:
        raise ValueError(f"none of {', '.join(DEFAULT_KEYS)} found in {', '.join(map(str, paths))}")
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for records, label in zip(runs, labels):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 4 else None, label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend()
    fig.tight_layout()
    out = Path(out)
    atomic_write(out, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return out
