"""The one narrow exit for metrics: a dict per step becomes a JSON line and a console update."""

import json
import math
import time
from pathlib import Path

from .console import Console
from .io import append_text, read_log, write_text


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a killed write) is skipped."""
    return read_log(path)


def run_summary(records: list[dict]) -> dict:
    """First and last values of the headline metrics of a run (for the end-of-run report)."""
    out = {}
    for key in ("eval_accuracy", "reward", "js_logit", "js_attn", "completion_len_mean"):
        values = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if values:
            out[key] = {"first": values[0][1], "last": values[-1][1],
                        "first_step": values[0][0], "last_step": values[-1][0]}
    return out


class MetricsWriter:
    """Appends one JSON object per step to `path` and hands it to the console (`console.py`:
    bar, progress lines, eval results). `write` is the one exit of every record: it stamps it
    with `timestamp` (unix seconds) and `elapsed_s` (seconds since this writer opened, when the
    run or resume starts training, model and data loaded) and returns what it wrote.

    On resume from step s, records after s (written after the checkpoint the run resumes from)
    are dropped first, so the file holds each step once; a fresh start (s = 0) starts a fresh
    file, as its step-0 evaluation is run again."""

    def __init__(self, path: Path, total_steps: int, start_step: int = 0, show: bool = True,
                 logging_steps: int | None = None, console: Console | None = None):
        self.path = Path(path)
        self.started = time.time()
        if self.path.exists():
            kept = ([r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
                    if start_step > 0 else [])
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.console = console or Console(total_steps, start_step, show, logging_steps)

    def write(self, record: dict, advance: bool = True) -> dict:
        """Append `record` (non-finite floats become null); `advance`: it is a training step."""
        now = time.time()
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                  for k, v in {**record, "timestamp": now, "elapsed_s": now - self.started}.items()}
        append_text(self.path, json.dumps(record) + "\n")
        self.console.record(record, advance)
        return record

    def print(self, text: str) -> None:
        self.console.print(text)

    def close(self) -> None:
        self.console.close()


class NullWriter:
    """The writer of a rank other than 0 (data-parallel training): writes and prints nothing."""

    def write(self, record: dict, advance: bool = True) -> dict:
        return record

    def print(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass
