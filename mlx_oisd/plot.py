"""Training curves of one or more runs in one PNG (GRPO vs OISD side by side).

Each run keeps one colour in every panel, and one legend for the whole figure names the runs.
With smoothing, the raw points are drawn faint and an exponential moving average solid:

    s_1 = x_1,    s_i = a * s_(i-1) + (1 - a) * x_i        (a = --smooth, 0 <= a < 1)

over the logged points of a metric (steps where it is None are skipped). `eval_accuracy` is
measured every `eval_every` steps, so it is never smoothed. A panel whose values are all zero or
None in every run (js_attn of a GRPO run, clipping that never happens) is left out.
"""

from pathlib import Path

from .io import atomic_write
from .metrics import read_metrics

DEFAULT_KEYS = ("reward", "eval_accuracy", "js_logit", "js_attn", "completion_len_mean", "kl",
                "entropy", "grad_norm", "clip_high_frac")
NEVER_SMOOTHED = ("eval_accuracy",)
# matplotlib's default cycle (tab10), fixed here so that run i has the same colour in every panel
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf")


def metrics_path(path: str | Path) -> Path:
    """A run folder (`runs/x` -> `runs/x/metrics.jsonl`) or a metrics file; FileNotFoundError
    names the path when neither exists."""
    path = Path(path)
    if path.is_dir():
        if not (path / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"no such metrics file: {path} is a folder without "
                                    "metrics.jsonl")
        return path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no such metrics file: {path}")
    return path


def run_labels(paths: list[str | Path]) -> list[str]:
    """Legend labels: the run folder name of each metrics file, with its parent folder added
    where two runs share a name (runs/a/grpo vs runs/b/grpo), numbered if still equal."""
    folders = [Path(p).resolve().parent for p in paths]
    labels = [f.name for f in folders]
    if len(set(labels)) < len(labels):
        labels = [f"{f.parent.name}/{f.name}" for f in folders]
    if len(set(labels)) < len(labels):
        labels = [f"{i}-{name}" for i, name in enumerate(labels, start=1)]
    return labels


def ema(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average [N] -> [N], s_1 = x_1 (no warm-up bias towards zero)."""
    out = []
    for x in values:
        out.append(x if not out else alpha * out[-1] + (1.0 - alpha) * x)
    return out


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the records that logged a number for it."""
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return ([s for s, _ in points], [float(v) for _, v in points]) if points else ([], [])


def panel_keys(runs: list[list[dict]], keys) -> list[str]:
    """The keys some run logged a non-zero value for, in `keys` order. If every logged key is
    all zero (a run's first steps), those keys are shown rather than an empty figure."""
    values = {k: [v for records in runs for v in series(records, k)[1]] for k in keys}
    logged = [k for k in keys if values[k]]
    nonzero = [k for k in logged if any(v != 0.0 for v in values[k])]
    return nonzero or logged


def build_figure(runs: list[list[dict]], labels: list[str], keys=DEFAULT_KEYS,
                 smooth: float = 0.0):
    """A matplotlib Figure: one panel per key of `panel_keys`, run i drawn in COLORS[i] in every
    panel, a figure legend below the panels with one entry per run. `runs`: one list of metrics
    records per run; `smooth`: EMA factor in [0, 1), 0 for none. ValueError when no key is logged."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smoothing {smooth}: expected a factor in [0, 1) (0.9 is typical)")
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    shown = panel_keys(runs, keys)
    if not shown:
        raise ValueError(f"none of {', '.join(keys)} found in these metrics")
    rows = -(-len(shown) // 4)  # at most 4 panels a row, rows filled evenly (5 -> 3 + 2)
    cols = -(-len(shown) // rows)
    fig = Figure(figsize=(3.8 * cols, 2.9 * rows + 0.5), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax, key in zip(axes, shown):
        for i, records in enumerate(runs):
            _draw(ax, *series(records, key), COLORS[i % len(COLORS)],
                  0.0 if key in NEVER_SMOOTHED else smooth)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=COLORS[i % len(COLORS)], lw=2) for i in range(len(runs))]
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(runs), 6),
               title=f"EMA smoothing {smooth:g} (faint: raw)" if smooth else None, frameon=False)
    return fig


def _draw(ax, steps: list[int], values: list[float], color: str, smooth: float) -> None:
    """One run's line in one panel: raw points (faint when smoothed) and the EMA line."""
    if not steps:
        return
    marker = "o" if len(steps) <= 12 else None  # sparse series (eval_accuracy): show the points
    if smooth == 0.0:
        ax.plot(steps, values, color=color, marker=marker, ms=4, lw=1.5)
        return
    ax.plot(steps, values, color=color, alpha=0.25, lw=1.0, marker=marker, ms=3)
    ax.plot(steps, ema(values, smooth), color=color, lw=1.8)


def plot_metrics(paths: list[str | Path], out: str | Path, keys=DEFAULT_KEYS,
                 labels: list[str] | None = None, smooth: float = 0.0) -> Path:
    """Curves of the runs at `paths` (metrics.jsonl files or run folders) into the PNG `out`."""
    files = [metrics_path(p) for p in paths]
    runs = [read_metrics(f) for f in files]
    if not panel_keys(runs, keys):
        raise ValueError(f"none of {', '.join(keys)} found in {', '.join(map(str, files))}")
    fig = build_figure(runs, labels or run_labels(files), keys, smooth)
    out = Path(out)
    atomic_write(out, lambda p: fig.savefig(p, format="png", dpi=100))
    return out
