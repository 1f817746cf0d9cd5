"""The one narrow exit for metrics: a dict per step becomes a JSON line and a progress bar update."""

import json
import math
from pathlib import Path

from tqdm import tqdm

from .io import append_text, write_text

BAR_KEYS = {"reward": "reward", "tokens_per_sec": "tok/s", "peak_memory_gb": "mem GB"}


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a killed write) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


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
    """Appends one JSON object per step to `path` and shows a progress bar.

    On resume from step s, records after s (written after the checkpoint the run resumes from)
    are dropped first, so the file holds each step once; a fresh start (s = 0) starts a fresh
    file, as its step-0 evaluation is run again."""

    def __init__(self, path: Path, total_steps: int, start_step: int = 0, show: bool = True):
        self.path = Path(path)
        if self.path.exists():
            kept = ([r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
                    if start_step > 0 else [])
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not show, unit="step",
                        dynamic_ncols=True)

    def write(self, record: dict, advance: bool = True) -> None:
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                  for k, v in record.items()}
        append_text(self.path, json.dumps(record) + "\n")
        self.bar.set_postfix({label: f"{record[k]:.3g}" for k, label in BAR_KEYS.items()
                              if isinstance(record.get(k), (int, float))})
        if advance:
            self.bar.update(1)

    def print(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
