"""Experiment tracking: a run's metrics, config and logged completions sent to Weights & Biases
and/or TensorBoard (`report_to`, TRL's key; `[]`: neither).

Each step every numeric value of the metrics record becomes a scalar at that step (booleans as
0/1; `step`, `timestamp` and non-finite values are left out, as metrics.jsonl writes null for
the latter); the resolved config goes to wandb's run config and to a TensorBoard text; the
completions of `log_completions` become a `wandb.Table` and a TensorBoard text (a Markdown
table) per step.

The libraries are optional (`pip install mlx-oisd[track]`) and imported only when a run names
them. TensorBoard event files are written by tensorboardX's `SummaryWriter`, pure Python over
protobuf (TensorBoard's own TF-free writer is private and scalar-only), to
`output_dir/tensorboard/`; `tensorboard --logdir output_dir/tensorboard` shows them. wandb keeps
its run folders in `output_dir/wandb/` (`WANDB_MODE=offline` works, `wandb sync` uploads later).

Resume from step s: wandb continues the same run (its id is kept in `output_dir/wandb/run_id`,
`resume="allow"`); steps after s that the stopped run already sent keep their first values, as
wandb drops a step lower than the run's last one. TensorBoard appends a new event file with
`purge_step = s + 1`, so it hides the stopped run's events after the checkpoint.
"""

import importlib.util
import math
import os
import secrets
from pathlib import Path

import yaml

from .config import ConfigError
from .io import write_text

PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboardX"}  # report_to name -> module
SAMPLE_COLUMNS = ("group", "prompt", "completion", "answer", "reward", "advantage", "length")


def check_installed(report_to: list[str]) -> None:
    """Raise ConfigError naming the install command when a tracker's library is missing (without
    importing it: this runs before the model loads)."""
    for name in report_to:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"report_to: {name} needs `pip install mlx-oisd[track]` "
                              f"({PACKAGES[name]} is not installed)")


def scalars(record: dict) -> dict[str, float]:
    """The numeric values of a metrics record, as floats; step, timestamp and non-finite left out."""
    out = {}
    for key, v in record.items():
        if key in ("step", "timestamp") or not isinstance(v, int | float):
            continue
        if math.isfinite(v):
            out[key] = float(v)
    return out


def _cell(value) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """Rows as a Markdown table (TensorBoard's text plugin renders it); `|` and newlines escaped."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def sample_columns(rows: list[dict]) -> list[str]:
    """SAMPLE_COLUMNS with each row's `reward/<name>` columns after `answer`."""
    per_reward = [k for k in rows[0] if k.startswith("reward/")] if rows else []
    i = SAMPLE_COLUMNS.index("answer") + 1
    return [*SAMPLE_COLUMNS[:i], *per_reward, *SAMPLE_COLUMNS[i:]]


class _Wandb:
    def __init__(self, out_dir: Path, name: str, project: str | None, config: dict,
                 start_step: int):
        import wandb

        self.wandb = wandb
        id_file = out_dir / "wandb" / "run_id"
        resumed = start_step > 0 and id_file.is_file()
        run_id = id_file.read_text().strip() if resumed else secrets.token_hex(4)
        write_text(id_file, run_id + "\n")
        project = project or os.environ.get("WANDB_PROJECT") or "mlx-oisd"
        try:
            self.run = wandb.init(project=project, name=name, id=run_id, resume="allow",
                                  dir=str(out_dir), config=config)
        except wandb.errors.Error as e:
            raise ConfigError(f"report_to: wandb could not start a run ({e}); run `wandb login`, "
                              "or set WANDB_MODE=offline and `wandb sync` later") from None

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        columns = sample_columns(rows)
        table = self.wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
        self.run.log({"completions": table}, step=step)

    def close(self) -> None:
        self.run.finish()


class _TensorBoard:
    def __init__(self, out_dir: Path, config: dict, start_step: int):
        from tensorboardX import SummaryWriter

        # the event file is named by the second it opens: the suffix keeps a resume within
        # the same second from overwriting the file before it, and sorts after it
        self.writer = SummaryWriter(logdir=str(out_dir / "tensorboard"),
                                    purge_step=start_step + 1 if start_step > 0 else None,
                                    filename_suffix=f".from{start_step:09d}")
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), start_step)

    def log(self, values: dict, step: int) -> None:
        for key, v in values.items():
            self.writer.add_scalar(key, v, step)
        self.writer.flush()  # a killed run keeps every step it finished

    def log_samples(self, rows: list[dict], step: int) -> None:
        self.writer.add_text("completions", markdown_table(rows, sample_columns(rows)), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Tracker:
    """The trackers of `report_to`; with none, every method does nothing."""

    def __init__(self, backends=()):
        self.backends = list(backends)

    @classmethod
    def open(cls, report_to: list[str], out_dir: str | Path, config: dict, start_step: int = 0,
             run_name: str | None = None, wandb_project: str | None = None) -> "Tracker":
        """Start the trackers of a run in `out_dir` that begins after step `start_step` (0: a
        fresh run); `config` is the resolved config as plain data (`config.to_dict`)."""
        check_installed(report_to)
        out_dir = Path(out_dir)
        name = run_name or out_dir.resolve().name
        tracker = cls()
        try:
            for kind in report_to:
                tracker.backends.append(
                    _Wandb(out_dir, name, wandb_project, config, start_step) if kind == "wandb"
                    else _TensorBoard(out_dir, config, start_step))
        except BaseException:
            tracker.close()
            raise
        return tracker

    def log(self, record: dict, step: int) -> None:
        """The scalars of a metrics record, at `step`."""
        values = scalars(record)
        if values:
            for b in self.backends:
                b.log(values, step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        """A step's logged completions (`samples.step_rows`); nothing when `rows` is empty."""
        if rows:
            for b in self.backends:
                b.log_samples(rows, step)

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []
