"""Shared pieces of the suite: the machine, the bench models and prompts, timing, tables.

Every benchmark returns a `Table`; `__main__` prints them and appends them to BENCHMARKS.md.
Timings are medians over repeats after a warm-up run; peak memory is MLX's allocator peak
(`mx.get_peak_memory`, which the CPU backend tracks too) since a reset just before the timed work.
"""

import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlx_oisd.data import load_examples, render_prompt
from mlx_oisd.tiny import TinySpec, build_tiny_model, cache_dir

# The model of the step, rollout and overhead benchmarks on a CPU: 4 blocks, D=128, V=2048.
# Wide enough that matmuls dominate, narrow enough for the reference BLAS of `mlx[cpu]` on Linux.
CPU_MODEL = TinySpec(num_layers=4, hidden_size=128, intermediate_size=384, num_heads=4,
                     num_kv_heads=2, head_dim=32, tokenizer_vocab=512, vocab_size=2048, seed=1)
ARITH = "builtin:arith?digits=2&terms=2&n=256"


@dataclass
class Table:
    """A benchmark's result: a title, a few sentences of setup, markdown rows."""

    title: str
    setup: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", self.setup, "",
                 "| " + " | ".join(self.columns) + " |",
                 "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + self.notes
        return "\n".join(lines) + "\n"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def bench_model(spec: TinySpec = CPU_MODEL) -> Path:
    """A random Qwen3 folder of shape `spec`, built once into the cache."""
    name = "bench-" + "-".join(str(v) for v in spec.__dict__.values() if not isinstance(v, tuple))
    path = cache_dir() / "models" / name
    if not (path / "config.json").is_file():
        build_tiny_model(path, spec)
    return path


def arith_prompts(tokenizer, n: int) -> tuple[list[list[int]], list[str]]:
    """Token ids of `n` chat-templated two-digit-sum prompts (about 40 tokens each with a Qwen
    tokenizer) and their answers."""
    examples = load_examples(ARITH, "train")[:n]
    return [render_prompt(tokenizer, ex.prompt) for ex in examples], [ex.answer for ex in examples]


def timed(fn, *args, repeats: int = 3, warmup: int = 1) -> tuple[float, float, object]:
    """(median seconds, peak memory in GB over the timed runs, last result) of `fn(*args)`, which
    must evaluate its own work (mx.eval) before returning."""
    return compare({"fn": lambda: fn(*args)}, repeats, warmup)["fn"]


def compare(fns: dict, repeats: int = 3, warmup: int = 1) -> dict:
    """{name: (median seconds, peak GB, last result)} of the zero-argument `fns`, run interleaved
    (one of each per round) so that a slow spell of a shared machine hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    peaks = dict.fromkeys(fns, 0)
    outs = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            mx.synchronize()
            mx.reset_peak_memory()
            t = time.perf_counter()
            outs[name] = fn()
            mx.synchronize()
            times[name].append(time.perf_counter() - t)
            peaks[name] = max(peaks[name], mx.get_peak_memory())
    return {name: (statistics.median(times[name]), peaks[name] / 1e9, outs[name]) for name in fns}


def machine() -> str:
    """One line: OS, CPU, cores, memory, Python, MLX version and device."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    cpu = platform.processor() or platform.machine()
    if platform.system() == "Darwin":
        cpu = _run(["sysctl", "-n", "machdep.cpu.brand_string"]) or cpu
    elif Path("/proc/cpuinfo").is_file():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, "
            f"{mem:.0f} GiB, Python {platform.python_version()}, MLX {mx.__version__} "
            f"on {mx.default_device()}")


def _run(cmd) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""
