"""`python -m bench`: the speed and memory suite; prints tables and appends them to BENCHMARKS.md.

    python -m bench                              # the CPU-sized suite (under 10 minutes, 2 cores)
    python -m bench --model Qwen/Qwen3-0.6B --max-tokens 256 --batch-size 8   # a real size
    python -m bench --only rollout,step --no-write

Benchmarks: rollout (ours vs mlx-lm BatchGenerator), step (full GRPO step vs mlx-lm-lora),
overhead (oisd vs grpo update), memory (loss memory vs vocabulary and length), mfu, realistic
(the warm demo / study model on its own task, ours vs mlx-lm-lora, and our update variants).
mlx-lm-lora runs from its own environment (`make bench-env` creates .venv-bench).
"""

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

from mlx_oisd import load
from mlx_oisd.io import write_text
from mlx_oisd.rollout import pack, sample

from . import memory, mfu, overhead, realistic, rollout, step
from .common import arith_prompts, bench_model, machine

ALL = ("rollout", "step", "overhead", "memory", "mfu", "realistic")
ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder or Hub id (default: a random 4-block D=128 "
                   "Qwen3 built into the cache)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per step B")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt G")
    p.add_argument("--max-tokens", type=int, default=64, help="completion length")
    p.add_argument("--steps", type=int, default=3,
                   help="timed training steps per trainer at B, after a warm-up (one fewer at 2B)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats after one warm-up")
    p.add_argument("--only", default=",".join(ALL), help=f"comma list of {', '.join(ALL)}")
    p.add_argument("--peer-python", type=Path, default=ROOT / ".venv-bench" / "bin" / "python",
                   help="python of the environment holding mlx-lm-lora")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--no-write", action="store_true", help="print only")
    realistic.add_arguments(p)
    args = p.parse_args(argv)
    realistic.check_arguments(p, args)
    only = args.only.split(",")
    if unknown := set(only) - set(ALL):
        p.error(f"--only: unknown benchmark(s) {sorted(unknown)}; expected some of {ALL}")

    start = time.perf_counter()
    model_path = Path(args.model) if args.model and Path(args.model).exists() else args.model
    label = f"`{model_path}`" if model_path else (
        "random Qwen3 built by `bench.common.CPU_MODEL` (4 blocks, D=128, 4 query / 2 KV heads, "
        "MLP 384, V=2048, float32)")
    model_path = model_path or bench_model()
    B, G, M = args.batch_size, args.group_size, args.max_tokens
    if set(only) - {"realistic"}:  # realistic loads its own models (and measures peaks alone)
        model, tok = load(str(model_path))
        prompts, _ = arith_prompts(tok, 2 * B)
    peer = args.peer_python if args.peer_python.exists() else None
    print(f"machine: {machine()}\nmodel: {label}\n", flush=True)

    tables = []
    for name in only:
        t = time.perf_counter()
        if name == "realistic":
            out = realistic.run(args.realistic_models, args.realistic_dtypes,
                                args.realistic_batch_size, args.realistic_group_size,
                                args.realistic_steps, args.realistic_repeats, peer)
            out[-1].notes.append(f"(realistic: {time.perf_counter() - t:.0f} s)")
            for table in out:
                print(table.markdown(), flush=True)
            tables += out
            continue
        if name == "rollout":
            table = rollout.run(model, prompts, [(B, G, M), (B // 2 or 1, 2 * G, M)], args.repeats)
        elif name == "step":
            table = step.run(model_path, tok,
                             [(B, G, M, args.steps + 1), (2 * B, G, M, args.steps)], peer)
        elif name == "overhead":
            table = overhead.run(load(str(model_path))[0], prompts, B, G, M, args.repeats)
        elif name == "memory":
            table = memory.run()
        else:
            batch = pack(sample(model, prompts[:B], G, M, stop_ids=[]), pad_id=0)
            table = mfu.run(model_path, batch, args.repeats)
        table.notes.append(f"({name}: {time.perf_counter() - t:.0f} s)")
        print(table.markdown(), flush=True)
        tables.append(table)

    total = time.perf_counter() - start
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    section = (f"## Benchmark suite, {datetime.date.today()}\n\n"
               f"Machine: {machine()}.\n\nCommand: `{command.strip()}` ({total / 60:.1f} min). "
               f"Model: {label}.\n\n" + "\n".join(t.markdown() for t in tables))
    print(f"total {total / 60:.1f} min")
    if not args.no_write:
        old = args.out.read_text() if args.out.exists() else "# Benchmarks\n"
        write_text(args.out, old.rstrip("\n") + "\n\n" + section)
        print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
