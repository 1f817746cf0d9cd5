"""What a training run prints (on stderr): a start banner, progress, evals and warnings.

Progress is a live tqdm bar in a terminal, and plain lines when the output is a file or a pipe
(`oisd-mlx train cfg.yaml > log 2>&1`), so a log holds no carriage returns and no redraws:

- `logging_steps: null` (default): the bar when stderr is a terminal, else one line every
  `max(1, max_steps // 50)` steps;
- `logging_steps: N`: one line every N steps, terminal or not;
- `--quiet`: no progress at all.

A progress line is written at every multiple of N and at the last step; it averages the steps
since the previous line (peak memory: their maximum). The banner, eval results, warnings and
notes always print, `--quiet` included.
"""

import sys
from collections import Counter

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import get_total_parameters
from tqdm import tqdm

# (record key, label, format) of a progress line, in order; absent keys are left out
LINE_KEYS = (("js_logit", "js_logit", ".4g"), ("js_attn", "js_attn", ".4g"), ("kl", "kl", ".3g"),
             ("entropy", "entropy", ".3g"), ("clip_frac", "clip", ".3g"),
             ("tokens_per_sec", "tok/s", ".0f"), ("peak_memory_gb", "mem", ".2f"))
BAR_KEYS = {"reward": "reward", "tokens_per_sec": "tok/s", "peak_memory_gb": "mem GB"}


def progress_mode(show: bool, logging_steps: int | None, total_steps: int,
                  tty: bool) -> tuple[str, int]:
    """("quiet" | "bar" | "lines", steps between lines), as the module docstring says."""
    if not show:
        return "quiet", 0
    if logging_steps is not None:
        return "lines", logging_steps
    return ("bar", 0) if tty else ("lines", max(1, total_steps // 50))


def duration(seconds: float) -> str:
    """`H:MM:SS` of a duration in seconds."""
    s = max(int(round(seconds)), 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _mean(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), int | float)]
    return sum(values) / len(values) if values else None


def progress_line(window: list[dict], total_steps: int, eta_s: float | None) -> str:
    """One plain line for the steps in `window` (their records, oldest first): the last step,
    means of reward, reward_std, js_logit, js_attn, kl, entropy, clip fraction
    (clip_low_frac + clip_high_frac) and tok/s, the peak memory, elapsed time and ETA."""
    last = window[-1]
    window = [{**r, "clip_frac": r.get("clip_low_frac", 0.0) + r.get("clip_high_frac", 0.0)}
              if "clip_low_frac" in r else r for r in window]
    parts = [f"step {last['step']}/{total_steps}"]
    reward, std = _mean(window, "reward"), _mean(window, "reward_std")
    if reward is not None:
        parts.append(f"reward {reward:.3f} std {std or 0.0:.3f}")
    for key, label, fmt in LINE_KEYS:
        value = (max((r[key] for r in window if r.get(key) is not None), default=None)
                 if key == "peak_memory_gb" else _mean(window, key))
        if value is not None:
            parts.append(f"{label} {value:{fmt}}" + (" GB" if key == "peak_memory_gb" else ""))
    if "elapsed_s" in last:
        parts.append(f"elapsed {duration(last['elapsed_s'])}")
    if eta_s is not None:
        parts.append(f"eta {duration(eta_s)}")
    return " | ".join(parts)


def eval_line(record: dict, total_steps: int) -> str:
    return f"eval step {record['step']}/{total_steps}: eval_accuracy {record['eval_accuracy']:.4f}"


def model_summary(model) -> tuple[str, int, int]:
    """(weights dtype, total parameters, trainable parameters) of a loaded model; the dtype is
    the floating type holding most weights, plus "quantized" when packed weights are present."""
    sizes = Counter()
    for _, v in tree_flatten(model.parameters()):
        sizes[v.dtype] += v.size
    floats = [(n, d) for d, n in sizes.items() if mx.issubdtype(d, mx.floating)]
    dtype = str(max(floats, key=lambda t: t[0])[1]).removeprefix("mlx.core.") if floats else "?"
    if any(mx.issubdtype(d, mx.integer) for d in sizes):
        dtype += ", quantized"
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return dtype, get_total_parameters(model), trainable


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def banner_lines(cfg, model_path, model_info: tuple[str, int, int], n_train: int, n_eval: int,
                 start_step: int) -> list[str]:
    """The start banner: what runs, on what, where. cfg: the resolved TrainConfig; model_info:
    `model_summary(model)`; n_train / n_eval: rows kept after prompt rendering."""
    dtype, total, trainable = model_info
    d, o = cfg.dataset, cfg.oisd
    if cfg.lora is None:
        tuning = "full fine-tuning"
    else:
        blocks = "all" if cfg.lora.num_layers == -1 else f"the last {cfg.lora.num_layers}"
        tuning = f"LoRA rank {cfg.lora.rank} on {blocks} blocks"
    if cfg.quantize is not None:
        tuning = f"QLoRA {cfg.quantize.bits}-bit, " + tuning
    algorithm = cfg.algorithm
    if cfg.algorithm != "grpo":
        algorithm += (f": student layers {list(o.student_layers)}, lambda_logit {o.lambda_logit}, "
                      f"lambda_attn {o.lambda_attn}, tau {o.tau}, weighting {o.weighting}")
    if cfg.algorithm == "bupo":
        algorithm += f", internal_steps {cfg.bupo.internal_steps}"
    start = ("step 0 (fresh run)" if start_step == 0 else
             f"resuming after step {start_step} ({cfg.max_steps - start_step} steps to go)")
    B, G = cfg.batch_size, cfg.num_generations
    where = cfg.model if str(model_path) == cfg.model else f"{cfg.model} -> {model_path}"
    return [
        f"model:      {where} ({dtype})",
        f"parameters: {_count(total)} total, {_count(trainable)} trainable "
        f"({100 * trainable / max(total, 1):.2f}%), {tuning}",
        f"data:       {d.source} ({d.split}): {n_train} train rows; "
        + (f"{n_eval} eval rows (Avg@{cfg.eval_k}) from {d.eval_source or d.source}" if n_eval
           else "no evaluation"),
        f"batch:      B x G = {B} x {G} = {B * G} completions per step, {cfg.max_steps} steps, "
        f"max_completion_length {cfg.max_completion_length}, lr {cfg.learning_rate:g}",
        f"algorithm:  {algorithm}",
        "rewards:    " + ", ".join(f"{r.name} x {r.weight:g}" for r in cfg.rewards),
        f"output_dir: {cfg.output_dir}",
        f"start:      {start}",
    ]


class Console:
    """The run's human-readable output on `stream` (default: stderr, looked up when built).

    `record(record, advance)` takes every metrics record: an eval result prints at once, a
    training step feeds the bar or the progress lines. `print(text)` writes a line (above a live
    bar), whatever the mode."""

    def __init__(self, total_steps: int, start_step: int = 0, show: bool = True,
                 logging_steps: int | None = None, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.mode, self.every = progress_mode(show, logging_steps, total_steps, tty)
        self.total, self.start_step = total_steps, start_step
        self.window: list[dict] = []
        self.first_step_start: float | None = None  # unix time step start_step + 1 began
        self.bar = (tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         file=self.stream) if self.mode == "bar" else None)

    def print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def record(self, record: dict, advance: bool = True) -> None:
        if advance:
            self.step(record)
        if record.get("eval_accuracy") is not None:
            self.print(eval_line(record, self.total))

    def step(self, record: dict) -> None:
        if self.first_step_start is None and "timestamp" in record:
            self.first_step_start = record["timestamp"] - record.get("step_time", 0.0)
        if self.bar is not None:
            self.bar.set_postfix({label: f"{record[k]:.3g}" for k, label in BAR_KEYS.items()
                                  if isinstance(record.get(k), int | float)})
            self.bar.update(1)
        elif self.mode == "lines":
            self.window.append(record)
            step = record["step"]
            if step % self.every == 0 or step == self.total:
                self.print(progress_line(self.window, self.total, self.eta(record)))
                self.window = []

    def eta(self, record: dict) -> float | None:
        """Seconds left at this step's pace since this session's first step began."""
        done = record["step"] - self.start_step
        if self.first_step_start is None or "timestamp" not in record or done <= 0:
            return None
        return (record["timestamp"] - self.first_step_start) / done * (self.total - record["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


REPEAT_ERROR_EVERY = 10  # steps before the same first-error message of a reward shows again


def step_report(record: dict, streak: int, shown: dict | None = None) -> list[str]:
    """Console lines for a step: rewards that failed (with their first error's message) or timed
    out (scored 0), a skipped update. `shown` {(reward, message): step} is updated in place so
    a message repeats at most once per REPEAT_ERROR_EVERY steps; counts show every step."""
    step, shown = record["step"], {} if shown is None else shown
    first = record.get("reward_first_error", {})
    failed = []
    for name, types in record.get("reward_error_types", {}).items():
        key = (name, first.get(name))
        if key[1] is not None and step - shown.get(key, -REPEAT_ERROR_EVERY) >= REPEAT_ERROR_EVERY:
            shown[key] = step
            failed.append(f"{name}: {sum(types.values())} errors, first {key[1]}")
        else:
            kinds = ", ".join(f"{n} {kind}" for kind, n in types.items())
            failed.append(f"{name}: {sum(types.values())} errors ({kinds})")
    failed += [f"{key.removeprefix('reward_timeouts/')}: {n} timed out"
               for key, n in record.items() if key.startswith("reward_timeouts/") and n]
    lines = [f"step {step}: rewards scored 0 ({'; '.join(failed)})"] if failed else []
    if record["nonfinite"]:
        lines.append(f"step {step}: non-finite loss or gradients, update skipped ({streak} in a "
                     f"row, {record['nonfinite_steps']} in the run)")
    return lines


def nonfinite_message(streak: int, step: int, saved: int | None) -> str:
    kept, then = ((f"the last good checkpoint is step {saved}", "continue with --resume")
                  if saved else ("no checkpoint was written", "start again"))
    return (f"{streak} steps in a row had non-finite loss or gradients (last at step {step}); "
            f"stopped, {kept}; lower learning_rate (or max_grad_norm), check the rewards for "
            f"huge values, then {then}")
