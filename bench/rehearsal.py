"""Dress rehearsal at full size: the shipped recipes on random models with Qwen3's real shapes.

    python -m bench.rehearsal                      # plans of every recipe + a 0.6B training step
    python -m bench.rehearsal --run qwen3-0.6b,qwen3-1.7b --steps 1 --no-write
    python -m bench.rehearsal --run none           # the plans only (seconds)

1. For every `configs/qwen3-*.yaml` at its shipped settings, the memory plan (`mlx_oisd.memory`)
   of the model's exact architecture (`bench.full_size.QWEN3_ARCHS`) against the working set of
   each Mac size: the smallest Mac it fits and the planned peak there. A Mac's budget is Metal's
   recommended working set, which macOS sets to about 2/3 of RAM up to 32 GB and 3/4 above
   (`MAC_WORKING_SET`); `memory_limit_gb` stands for it here.
2. For the sizes in `--run`: the bf16 random model is built (cached under `--models`), then
   `oisd-mlx train` runs the size's recipe for `--steps` full steps (rollout, rewards, update,
   checkpoint) with the dataset swapped for a local file and B / G / lengths cut so a CPU finishes,
   OISD on. Reported: wall time, the step's time, the measured peak (MLX's allocator peak during
   the step, `peak_memory_gb` of metrics.jsonl, and the process's max RSS) and the plan's total for
   the same settings and prompt length: measured / planned.
Results are printed as markdown and appended to BENCHMARKS.md (unless --no-write).
"""

import argparse
import datetime
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlx_oisd.config import ConfigError, load_config
from mlx_oisd.io import write_text
from mlx_oisd.memory import GB, plan
from mlx_oisd.metrics import read_metrics

from .common import Table, machine
from .full_size import QWEN3_ARCHS, build_full_size, hf_config

ROOT = Path(__file__).resolve().parents[1]
MAC_SIZES = (16, 24, 32, 48, 64, 128)


def mac_budget_gb(ram_gb: int) -> float:
    """Metal's recommended working set of a Mac with `ram_gb` of unified memory (approximate)."""
    return ram_gb * (2 / 3 if ram_gb <= 32 else 3 / 4)


MAC_WORKING_SET = {ram: mac_budget_gb(ram) for ram in MAC_SIZES}
# Cut settings of the training run: what a 2-core CPU finishes in minutes.
RUN_SETTINGS = {"batch_size": 1, "num_generations": 2, "max_completion_length": 16,
                "rollout_batch_size": 2, "minibatch_size": 2, "max_steps": 1, "save_every": 0,
                "eval_split": None, "warmup_steps": 0, "max_prompt_length": 256}
QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
    "How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money "
    "she needs. How much more money does Betty need?",
]


def recipes() -> list[Path]:
    return sorted((ROOT / "configs").glob("qwen3-*.yaml"))


def arch_name(model: str) -> str:
    """`Qwen/Qwen3-1.7B` (or an mlx-community convert of it) -> `qwen3-1.7b`."""
    name = model.rstrip("/").split("/")[-1].lower()
    for arch in sorted(QWEN3_ARCHS, key=len, reverse=True):
        if name.startswith(arch):
            return arch
    raise ValueError(f"{model}: no architecture in bench.full_size.QWEN3_ARCHS")


def model_config(cfg_model: str) -> dict:
    """The architecture's config.json, with mlx-lm's `quantization` entry for a 4-bit convert."""
    config = hf_config(QWEN3_ARCHS[arch_name(cfg_model)])
    if "4bit" in cfg_model.lower():
        config["quantization"] = {"group_size": 64, "bits": 4}
    return config


def shipped_plans() -> Table:
    table = Table(
        "Dress rehearsal: memory plans of the shipped recipes",
        "`oisd-mlx plan` of each recipe at its shipped settings on its model's exact architecture "
        "(`auto` values chosen for each budget). Budget of a Mac: Metal's recommended working set, "
        "taken as 2/3 of RAM up to 32 GB and 3/4 above. Planned peak = weights + optimizer + "
        "max(rollout, update), at the smallest Mac it fits.",
        ["recipe", "model", "smallest Mac", "planned peak GB", "weights", "optimizer", "rollout",
         "update", "rollout_batch_size", "minibatch_size"])
    for path in recipes():
        cfg = load_config(path)
        config = model_config(cfg.model)
        for ram in MAC_SIZES:
            try:
                p = plan(cfg, config, int(MAC_WORKING_SET[ram] * GB), f"{ram} GB Mac")
            except ConfigError:
                continue
            if p.fits:
                break
        else:
            table.rows.append([path.name, cfg.model, "none", "-", "-", "-", "-", "-", "-", "-"])
            continue
        table.rows.append([path.name, cfg.model, f"{ram} GB", f"{p.total / GB:.2f}",
                           f"{p.weights / GB:.2f}", f"{p.optimizer / GB:.2f}",
                           f"{p.rollout / GB:.2f}", f"{p.update / GB:.2f}",
                           p.rollout_batch_size, p.minibatch_size])
    return table


def dataset(folder: Path) -> Path:
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": "72"}) + "\n" for q in QUESTIONS))
    return path


def run_recipe(size: str, models: Path, steps: int) -> list:
    """Build `size` if needed, train its recipe for `steps` steps; one row of the run table."""
    recipe = next(p for p in recipes() if arch_name(load_config(p).model) == size)
    folder = models / size
    if not (folder / "config.json").is_file():
        build_full_size(size, folder)
    work = Path(tempfile.mkdtemp(prefix=f"rehearsal-{size}-"))
    overrides = {**RUN_SETTINGS, "model": str(folder), "output_dir": str(work / "run"),
                 "max_steps": steps,
                 "dataset": {"source": str(dataset(work)), "prompt_field": "question",
                             "answer_field": "answer"}}
    sets = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    cmd = [sys.executable, "-m", "cli.main", "train", str(recipe), "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    rss_gb = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) * 1024 / GB
    if done.returncode != 0:
        raise RuntimeError(f"{size}: oisd-mlx train failed ({done.returncode}):\n"
                           + (done.stdout + done.stderr)[-3000:])
    records = [r for r in read_metrics(work / "run" / "metrics.jsonl") if "step_time" in r]
    cfg = load_config(recipe, sets)
    prompt_len = prompt_tokens(folder, cfg)
    planned = plan(cfg, json.loads((folder / "config.json").read_text()), int(1e15), "unbounded",
                   prompt_len)
    peak = max(r["peak_memory_gb"] for r in records)
    return [recipe.name, f"{cfg.batch_size} x {cfg.num_generations}",
            f"{prompt_len} + {cfg.max_completion_length}", f"{wall:.0f}",
            f"{records[-1]['step_time']:.0f}", f"{peak:.2f}", f"{rss_gb:.2f}",
            f"{planned.total / GB:.2f}", f"{peak * GB / planned.total:.2f}",
            f"{planned.weights / GB:.2f} / {planned.optimizer / GB:.2f} / "
            f"{planned.rollout / GB:.2f} / {planned.update / GB:.2f}"]


def prompt_tokens(folder: Path, cfg) -> int:
    """Tokens of the longest rendered prompt of the rehearsal's dataset."""
    from mlx_oisd.data import PromptFormat
    from mlx_oisd.loading import tokenizer_for

    tok = tokenizer_for(folder)
    return max(len(PromptFormat.of(cfg).render(tok, q))
               for q in QUESTIONS)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.rehearsal",
                                description=__doc__.splitlines()[0])
    p.add_argument("--run", default="qwen3-0.6b",
                   help=f"comma list of sizes to train ({', '.join(QWEN3_ARCHS)}), or none")
    p.add_argument("--steps", type=int, default=1, help="training steps per size")
    p.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "fullsize",
                   help="where the random full-size models are built and cached")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    sizes = [] if args.run == "none" else args.run.split(",")
    if unknown := set(sizes) - set(QWEN3_ARCHS):
        p.error(f"--run: unknown size(s) {sorted(unknown)}; expected some of {list(QWEN3_ARCHS)}")
    tables = [shipped_plans()]
    print(tables[0].markdown(), flush=True)
    if sizes:
        run = Table(
            "Dress rehearsal: full-size training steps, measured against the plan",
            f"`oisd-mlx train` of the size's recipe on its random bf16 model (vocabulary 151,936), "
            f"OISD on, settings cut for this CPU ({json.dumps(RUN_SETTINGS)}). Measured peak: "
            "MLX's allocator peak during the step (`peak_memory_gb`); RSS: the process's maximum "
            "resident set (loading included). Plan: `mlx_oisd.memory.plan` for the same settings "
            "and prompt length.",
            ["recipe", "B x G", "prompt + completion", "wall s", "step s", "measured peak GB",
             "max RSS GB", "planned GB", "measured / planned",
             "plan: weights / optimizer / rollout / update"])
        args.models.mkdir(parents=True, exist_ok=True)
        for size in sizes:
            run.rows.append(run_recipe(size, args.models, args.steps))
            print(run.rows[-1], flush=True)
        tables.append(run)
        print(run.markdown())
    if not args.no_write:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        command = "python -m bench.rehearsal " + shlex.join(argv if argv is not None else sys.argv[1:])
        text = args.out.read_text() if args.out.exists() else "# Benchmarks\n"
        body = "\n\n".join(t.markdown() for t in tables)
        write_text(args.out, text.rstrip("\n") + f"\n\n## Dress rehearsal, {stamp}\n\n"
                   f"Machine: {machine()}. Command: `{command.strip()}`.\n\n{body}\n")


if __name__ == "__main__":
    main()
