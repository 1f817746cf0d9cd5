"""Sampled completions on disk, one JSON object per completion.

Two files share the two fields `oisd-mlx lens --completions` reads, `prompt` (the question as
the dataset has it, without chat template or instruction) and `completion` (the decoded text):

- `output_dir/completions.jsonl` of a training run (`log_completions: N`): the G completions of
  the first N prompts of every step, with `step`, `group`, `answer`, each reward unweighted
  (`reward/<name>`), the weighted total `reward`, `advantage`, `truncated` and `length` (tokens).
  A step's rows are appended together; on resume from step s the rows of later steps (written
  after the checkpoint) are dropped first, as `MetricsWriter` does for metrics.jsonl.
- the file of `oisd-mlx eval --save-samples FILE`: every sample, with `benchmark`, `problem`
  (its index in the benchmark), `sample`, `answer`, `correct`, `truncated` and `length`.
"""

import json
from pathlib import Path

from .io import append_text, read_log, write_text


def step_rows(step: int, examples, texts: list[str], rewards, per_reward: dict, adv, rollout,
              groups: int) -> list[dict]:
    """Rows of the first `groups` prompts of a step (all B when groups >= B).

    examples: B examples (.prompt, .answer); texts, rewards, adv: [B*G], row g*G + j the j-th
    completion of prompt g; per_reward {name: [B*G]} unweighted; rollout: its `completions`
    (token lists) and `truncated` flags, both [B*G], and `group_size` G.
    """
    G = rollout.group_size
    rows = []
    for g, ex in enumerate(examples[:groups]):
        for i in range(g * G, (g + 1) * G):
            rows.append({
                "step": step, "group": g, "prompt": ex.prompt, "completion": texts[i],
                "answer": ex.answer,
                **{f"reward/{name}": float(v[i]) for name, v in per_reward.items()},
                "reward": float(rewards[i]), "advantage": float(adv[i]),
                "truncated": bool(rollout.truncated[i]), "length": len(rollout.completions[i]),
            })
    return rows


def eval_rows(first: int, examples, texts: list[str], correct, rollout) -> list[dict]:
    """Rows of the n samples of each of `examples` (problems first, first + 1, ... of a
    benchmark): texts, correct [P*n], row i*n + j sample j of problem i; rollout as in
    `step_rows` (n = its group_size)."""
    n = rollout.group_size
    return [{"problem": first + i // n, "sample": i % n, "prompt": examples[i // n].prompt,
             "completion": text, "answer": examples[i // n].answer,
             "correct": bool(correct[i] > 0.5), "truncated": bool(rollout.truncated[i]),
             "length": len(rollout.completions[i])}
            for i, text in enumerate(texts)]


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a completions / samples jsonl file; a torn last line is skipped."""
    return read_log(path)


def _lines(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


class CompletionsLog:
    """output_dir/completions.jsonl of a run that starts (or resumes) after step `start_step`:
    rows of later steps are dropped at once; a fresh start (0) removes the old file."""

    def __init__(self, path: str | Path, start_step: int = 0):
        self.path = Path(path)
        if self.path.exists():
            if start_step > 0:
                kept = [r for r in read_rows(self.path) if r.get("step", 0) <= start_step]
                write_text(self.path, _lines(kept))
            else:
                self.path.unlink()

    def write(self, rows: list[dict]) -> None:
        """Append one step's rows in one write (nothing when `rows` is empty)."""
        if rows:
            append_text(self.path, _lines(rows))


def write_samples(path: str | Path, rows: list[dict]) -> Path:
    """Write eval samples as jsonl, atomically."""
    return write_text(path, _lines(rows))
