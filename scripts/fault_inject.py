"""Kill -9 fault injection: SIGKILL a small training run at random moments, resume it each time,
and check that it ends exactly where an uninterrupted run ends (RELIABILITY.md).

    .venv/bin/python scripts/fault_inject.py                       # 30 kills, seed 0
    .venv/bin/python scripts/fault_inject.py --kills 5 --seed 3 --json faults.json

The run: `oisd-mlx train` on builtin:tiny with builtin:arith (a held-out split, so the step-0
evaluation runs), OISD, LoRA, a checkpoint every 2 steps. First uninterrupted (the reference),
then again in a fresh output_dir and model cache: each attempt is SIGKILLed at a moment drawn from
the reference run's phases (start-up, model build, load, restore, rollout, reward, update, metrics
write, checkpoint write, plot, eval, ...) and started again with `--resume`, until the kills are
spent and a last attempt finishes. The first kill lands in the build of the built-in model.

Each trainer process is this file in `child` mode: it writes a line to a pipe when one of the
trainer's calls begins or ends (unbuffered: the parent sees each phase begin within microseconds,
and a SIGKILL leaves the phase it interrupted on record), then runs the `oisd-mlx` app unchanged. The markers only observe; the checks read what
the contract promises:
  - each resume's first step is the newest complete checkpoint's step + 1, and no kill loses a
    checkpoint that was complete before it;
  - metrics.jsonl holds every step once (the step-0 evaluation too), with the reference's values;
  - the final adapters and the last checkpoint's adapters and optimizer state equal the
    reference's bit for bit (dtype, shape, bytes);
  - a killed model build is rebuilt into the reference's files; no process outlives a kill.
Exit status 0 when every check passes, 1 otherwise.
"""

import argparse
import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATASET = "builtin:arith?digits=1&terms=2&n=20&n_test=4"
# phases a kill is aimed at; "any" is a moment uniform over the attempt's expected run time
TARGETS = ["startup", "setup", "verify", "load", "restore", "workers", "eval", "rollout", "reward",
           "update", "step", "metrics", "checkpoint", "plot", "any"]
NOISY_KEYS = ("_per_sec", "step_time", "peak_memory", "timestamp", "elapsed_s")  # clock-dependent


def length_parity_reward(completion: str, answer: str) -> float:
    """Rewards that differ within a group, so a random model still gets a gradient."""
    return float(len(completion) % 2)


def run_config(max_steps: int, save_every: int) -> dict:
    """The run's config, less output_dir."""
    return {
        "model": "builtin:tiny",
        "dataset": {"source": DATASET, "split": "train"},
        "eval_split": "test", "eval_samples": 4, "eval_k": 1,
        "algorithm": "oisd", "max_steps": max_steps, "batch_size": 2, "num_generations": 3,
        "max_completion_length": 8, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
        "lora": {"rank": 4, "scale": 10.0, "dropout": 0.0, "num_layers": -1},
        "oisd": {"student_layers": [1], "lambda_logit": 1.0, "lambda_attn": 0.1},
        "rewards": [{"name": "math", "weight": 1.0},
                    {"name": "scripts.fault_inject:length_parity_reward", "weight": 1.0},
                    {"name": "format", "weight": 0.1}],
        "save_every": save_every, "seed": 0, "minibatch_size": 3,
    }


# ---- child mode: the trainer with phase markers --------------------------------------------

def child(fd: int, argv: list[str]) -> None:
    """Run `oisd-mlx ARGV...`, writing "B|E <monotonic time> <phase> [arg]" lines to file
    descriptor `fd` (a pipe to the parent) as the trainer's calls begin and end."""
    os.set_inheritable(fd, False)  # reward workers must not hold the pipe open

    def mark(kind: str, phase: str, arg="") -> None:
        os.write(fd, f"{kind} {time.monotonic():.6f} {phase} {arg}\n".encode())

    mark("B", "startup")
    sys.path.insert(0, str(ROOT))  # the user reward above, in the trainer and its workers
    from cli.main import app
    from mlx_oisd import tiny, trainer

    def traced(owner, name: str, phase: str, arg=None) -> None:
        fn = getattr(owner, name, None)
        if fn is None:  # the trainer changed shape: the phase goes unobserved, the checks still run
            mark("U", phase)
            return

        def wrapper(*args, **kwargs):
            try:
                label = "" if arg is None else arg(args)
            except (AttributeError, IndexError, TypeError):  # a changed signature: no label
                label = "?"
            mark("B", phase, label)
            try:
                return fn(*args, **kwargs)
            finally:
                mark("E", phase)

        setattr(owner, name, wrapper)

    traced(trainer, "train", "train")
    traced(trainer, "setup", "setup")
    traced(trainer, "load", "load")
    traced(tiny, "build_tiny_model", "build")
    traced(trainer, "open_checkpoints", "verify")
    traced(trainer, "load_checkpoint", "restore", lambda a: Path(getattr(a[0], "path", a[0])).name)
    traced(trainer, "reward_workers", "workers")
    traced(trainer, "evaluate", "eval")
    traced(trainer, "train_step", "step", lambda a: a[1])
    traced(trainer, "sample", "rollout")
    traced(trainer, "score_batch", "reward")
    traced(trainer, "update", "update")
    traced(trainer.MetricsWriter, "write", "metrics", lambda a: a[1].get("step"))
    traced(trainer, "save_checkpoint", "checkpoint", lambda a: a[1])
    traced(trainer, "plot_metrics", "plot")
    mark("E", "startup")
    app(args=argv, prog_name="oisd-mlx")


# ---- traces ---------------------------------------------------------------------------------

@dataclass
class Event:
    phase: str
    begin: float
    end: float | None  # None: still open when the process stopped
    arg: str
    ctx: int  # -1: before training (start-up, setup); 0: step-0 eval; N: step N and after it


def read_trace(path: Path) -> list[Event]:
    """The trace's calls in begin order (a torn last line is skipped)."""
    events, stack, ctx = [], [], -1
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # the last is unfinished
    for line in lines:
        parts = line.split(" ", 3)
        if len(parts) < 3 or parts[0] not in "BEU":
            continue
        kind, t, phase, arg = parts[0], float(parts[1]), parts[2], (parts[3:] or [""])[0]
        if kind == "B":
            ctx = int(arg) if phase == "step" else ctx
            stack.append(Event(phase, t, None, arg, ctx))
            events.append(stack[-1])
        elif kind == "E" and stack and stack[-1].phase == phase:
            stack.pop().end = t
            ctx = max(ctx, 0) if phase == "setup" else ctx
    return events


def phase_hit(events: list[Event]) -> str:
    """The innermost call still open when the process died ("interpreter": before any marker,
    "cli": between the imports and training, "exit": after training returned)."""
    open_ = [e for e in events if e.end is None]
    if open_:
        return open_[-1].phase
    if not events:
        return "interpreter"
    return "exit" if any(e.phase == "train" for e in events) else "cli"


def first_step(events: list[Event]) -> int | None:
    return next((int(e.arg) for e in events if e.phase == "step"), None)


# ---- files: checkpoints, safetensors, metrics -----------------------------------------------

def read_safetensors(path: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """name -> (dtype, shape, raw bytes), read without MLX; raises ValueError on a torn file."""
    blob = path.read_bytes()
    if len(blob) < 8:
        raise ValueError(f"{path}: {len(blob)} bytes, no safetensors header")
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        if 8 + n + stop > len(blob):
            raise ValueError(f"{path}: tensor {name} runs past the end of the file")
        out[name] = (info["dtype"], tuple(info["shape"]), blob[8 + n + start:8 + n + stop])
    return out


def as_float(dtype: str, shape: tuple, raw: bytes) -> np.ndarray:
    if dtype == "BF16":  # numpy has no bfloat16: its bits are float32's upper half
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    np_type = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
               "I32": np.int32, "U32": np.uint32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
    return np.frombuffer(raw, np_type[dtype]).reshape(shape).astype(np.float64)


def compare_tensors(a_path: Path, b_path: Path) -> tuple[list[str], float, int]:
    """(differences, max |a - b|, tensors compared); equal means same names, dtypes, shapes, bytes."""
    a, b = read_safetensors(a_path), read_safetensors(b_path)
    diffs = [f"{k} only in the reference" for k in sorted(a.keys() - b.keys())]
    diffs += [f"{k} not in the reference" for k in sorted(b.keys() - a.keys())]
    worst = 0.0
    for k in sorted(a.keys() & b.keys()):
        (da, sa, ra), (db, sb, rb) = a[k], b[k]
        if (da, sa) != (db, sb):
            diffs.append(f"{k} is {db} {list(sb)}, the reference {da} {list(sa)}")
            continue
        if ra != rb:
            d = float(np.max(np.abs(as_float(da, sa, ra) - as_float(db, sb, rb)), initial=0.0))
            worst = max(worst, d if np.isfinite(d) else float("inf"))
            diffs.append(f"{k} differs (max abs {d:.3g})")
    return diffs, worst, len(a.keys() & b.keys())


def step_dirs(out_dir: Path) -> dict[int, Path]:
    root = out_dir / "checkpoints"
    found = {}
    for p in root.glob("step_*") if root.is_dir() else []:
        if p.is_dir() and p.name[5:].isdigit():
            found[int(p.name[5:])] = p
    return found


def complete(ckpt: Path) -> bool:
    """state.json parses and both safetensors files read in full."""
    try:
        json.loads((ckpt / "state.json").read_text())["step"]
        read_safetensors(ckpt / "adapters.safetensors")
        read_safetensors(ckpt / "optimizer.safetensors")
    except (OSError, ValueError, KeyError):
        return False
    return True


def newest_checkpoint(out_dir: Path) -> int:
    """Step of the newest complete checkpoint, 0 when there is none."""
    return max((s for s, p in step_dirs(out_dir).items() if complete(p)), default=0)


def metric_rows(path: Path) -> tuple[list[dict], int]:
    """(records, torn lines) of a metrics.jsonl."""
    rows, torn = [], 0
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1
    return rows, torn


def stray_temp_files(*folders: Path) -> list[str]:
    """Temp files and folders of interrupted atomic writes left behind (".name.XXXX.ext",
    ".tmp-*"; a ".lock" is not one)."""
    return sorted(str(p) for f in folders if f.is_dir() for p in f.rglob(".*")
                  if p.name.startswith(".tmp") or "." in p.name[1:])


# ---- attempts -------------------------------------------------------------------------------

@dataclass
class Target:
    phase: str  # a phase of the trace
    occurrence: int = 1  # the k-th begin of `phase` in the attempt
    delay: float = 0.0  # seconds after that begin
    aimed: str = ""  # the planned target ("any": a uniform moment of the run)


@dataclass
class Attempt:
    index: int
    resumed_from: int  # newest complete checkpoint at launch (0: none)
    target: dict | None
    killed: bool = False
    phase: str = ""  # what the kill interrupted
    first_step: int | None = None
    restored: str = ""  # the checkpoint the trainer loaded
    rc: int | None = None
    wall_s: float = 0.0
    orphans: int = 0
    untraced: list = field(default_factory=list)  # phases whose trainer function was not found
    log_tail: str = ""
    events: list = field(default_factory=list, repr=False)


class Runner:
    """Launches trainer attempts of one run (its own output_dir and model cache)."""

    def __init__(self, work: Path, name: str, cfg: dict):
        self.dir = work / name
        self.out = self.dir / "run"
        self.cache = self.dir / "cache"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg_path = self.dir / "cfg.yaml"
        self.cfg_path.write_text(yaml.safe_dump({**cfg, "output_dir": str(self.out)}))
        self.attempts: list[Attempt] = []

    def launch(self, target: Target | None, timeout_s: float = 600.0) -> Attempt:
        i = len(self.attempts)
        a = Attempt(i, newest_checkpoint(self.out), None if target is None else asdict(target))
        trace, log = self.dir / f"trace-{i:02d}.txt", self.dir / f"log-{i:02d}.txt"
        r, w = os.pipe()  # the markers come through a pipe: the parent wakes within microseconds
        cmd = [sys.executable, str(Path(__file__).resolve()), "child", str(w), "train",
               str(self.cfg_path), "--quiet", *(["--resume"] if i else [])]
        env = {**os.environ, "MLX_OISD_CACHE": str(self.cache), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        t0 = time.monotonic()
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True, pass_fds=[w])
            os.close(w)
            text, a.killed, hung = watch(proc, r, target, t0, timeout_s)
            a.rc = proc.wait()
        a.wall_s = time.monotonic() - t0
        trace.write_bytes(text)
        a.untraced = sorted({line.split()[2] for line in text.decode().splitlines()
                             if line.startswith("U ")})
        a.orphans = reap_session(proc.pid)
        a.events = read_trace(trace)
        a.phase = phase_hit(a.events) if a.killed else ""
        a.first_step = first_step(a.events)
        a.restored = next((e.arg for e in a.events if e.phase == "restore"), "")
        a.log_tail = (f"HUNG: killed after {timeout_s} s\n" if hung else "") + \
            log.read_text(errors="replace")[-1500:]
        self.attempts.append(a)
        return a


def watch(proc: subprocess.Popen, r: int, target: Target | None, t0: float,
          timeout_s: float) -> tuple[bytes, bool, bool]:
    """Read the child's markers until it exits; SIGKILL it `target.delay` s after the target
    phase's k-th begin. Returns (trace, killed, hung)."""
    deadline = None
    needle = None if target is None else f" {target.phase} ".encode()
    text, seen, killed = b"", 0, False
    while True:
        now = time.monotonic()
        if deadline is not None and now >= deadline and not killed:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
        if now - t0 > timeout_s:
            os.kill(proc.pid, signal.SIGKILL)
            os.close(r)
            return text, False, True
        wait = 0.5 if deadline is None or killed else max(deadline - now, 0.0)
        ready, _, _ = select.select([r], [], [], wait)
        if not ready:
            continue
        chunk = os.read(r, 1 << 16)
        if not chunk:  # every writer is gone: the child exited or was killed
            os.close(r)
            return text, killed, False
        start = len(text)
        text += chunk
        if needle is None or deadline is not None:
            continue
        for line in text[text.rfind(b"\n", 0, start) + 1:].split(b"\n")[:-1]:
            if line.startswith(b"B ") and needle in line + b" ":
                seen += 1
                if seen == target.occurrence:
                    deadline = float(line.split()[1]) + target.delay
                    break


def session_pids(sid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(d.name))
    return pids


def reap_session(sid: int, grace_s: float = 3.0) -> int:
    """Processes of the attempt's session still alive `grace_s` after it ended (then killed)."""
    end = time.monotonic() + grace_s
    while (left := session_pids(sid)) and time.monotonic() < end:
        time.sleep(0.05)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return len(left)


# ---- the plan: which phase each kill aims at ------------------------------------------------

def durations(attempts: list[Attempt]) -> dict[str, float]:
    """Shortest duration of each phase over the finished calls seen so far (a delay within it
    lands inside the call even when the machine is less loaded than when it was measured)."""
    spans: dict[str, list[float]] = {}
    for a in attempts:
        for e in a.events:
            if e.end is not None:
                spans.setdefault(e.phase, []).append(e.end - e.begin)
    return {k: min(v) for k, v in spans.items()}


def candidates(reference: list[Event], resume_from: int, limit: int) -> list[Event]:
    """The reference run's calls that an attempt resuming from `resume_from` makes up to the end
    of step `limit`, in order (the build and the restore are not in the reference)."""
    return [e for e in reference if e.phase != "build" and (
        e.ctx == -1 or resume_from < e.ctx <= limit or (e.ctx == 0 and resume_from == 0))]


def phase_counts(calls: list[Event], build: bool, restore: bool) -> Counter:
    """How often each target phase begins among `calls`."""
    counts = Counter(e.phase for e in calls)
    counts.update({"build": int(build), "restore": int(restore), "any": 1})
    return counts


def segments(calls: list[Event]) -> list[tuple[float, float]]:
    """The reference's time spans of `calls`: the prologue (start-up, setup), then the steps."""
    prologue = [e for e in calls if e.ctx == -1 and e.phase != "train" and e.end is not None]
    body = [e for e in calls if e.ctx >= 0 and e.end is not None]
    return [(min(e.begin for e in g), max(e.end for e in g)) for g in (prologue, body) if g]


def expected_time(calls: list[Event]) -> float:
    """Seconds from the start of the process to the end of `calls`, as in the reference."""
    return sum(b - a for a, b in segments(calls))


def moment(calls: list[Event], rng: random.Random) -> Target:
    """A moment uniform over the reference time of `calls`, named by the innermost call running
    then (so it lands at the same point of the run however fast the machine is today)."""
    t = rng.uniform(0.0, expected_time(calls))
    for a, b in segments(calls):
        if t <= b - a:
            t += a
            break
        t -= b - a
    inside = [e for e in calls if e.end is not None and e.begin <= t <= e.end]
    if not inside:
        return Target("startup", 1, 0.0, "any")
    e = inside[-1]  # the latest begun of the calls containing t is the innermost
    k = sum(c.phase == e.phase for c in calls[:calls.index(e) + 1])
    return Target(e.phase, k, t - e.begin, "any")


def aim(phase: str, calls: list[Event], counts: Counter, spans: dict,
        rng: random.Random) -> Target:
    """A Target for `phase` in this attempt, or for another phase when it will not occur."""
    if counts[phase] == 0:
        phase = rng.choice(sorted(p for p in TARGETS if counts[p] > 0))
    if phase == "any":
        return moment(calls, rng)
    dur = spans.get(phase, 0.05)
    return Target(phase, rng.randint(1, counts[phase]), rng.uniform(0.0, 0.8 * dur), phase)


def plan(kills: int, rng: random.Random) -> list[str]:
    """The build first, then rounds of every target in a shuffled order, the writes and the
    evaluation twice per round (they are the phases a kill is likeliest to break)."""
    phases, round_ = ["build"], TARGETS + ["checkpoint", "metrics", "eval"]
    while len(phases) < kills:
        phases += rng.sample(round_, len(round_))
    return phases[:kills]


# ---- the suite ------------------------------------------------------------------------------

def kill_run(work: Path, cfg: dict, reference: Runner, phases: list[str] | list[Target],
             rng: random.Random) -> Runner:
    """Attempts of the faulted run: one per planned kill, then one to the end."""
    run = Runner(work, "faulted", cfg)
    ref, steps = reference.attempts[0], cfg["max_steps"]
    for i, aimed in enumerate(phases):
        if isinstance(aimed, Target):
            run.launch(aimed)
            continue
        # kill i may land up to the next checkpoint or step ~steps * (i + 1) / kills, whichever
        # is later: the kills spread over the whole run, which is not finished while kills are left
        s = newest_checkpoint(run.out)
        limit = max(s + cfg["save_every"], -(-steps * (i + 1) // len(phases)))
        calls = candidates(ref.events, s, min(limit, steps))
        if i < len(phases) - 1:  # no kill after the last checkpoint before the last kill
            last = [e.begin for e in calls if e.phase == "checkpoint" and e.ctx == steps]
            calls = [e for e in calls if not last or e.ctx < steps or e.begin <= last[0]]
        built = (run.cache / "models" / "tiny" / "config.json").is_file()
        counts = phase_counts(calls, build=not built, restore=s > 0)
        run.launch(aim(aimed, calls, counts, durations([ref, *run.attempts]), rng))
    run.launch(None)
    return run


def check(reference: Runner, faulted: Runner, cfg: dict) -> dict:
    """The summary: counts, what each check found, and `failures` (empty when all hold)."""
    failures = []
    ref_final, last = reference.attempts[-1], faulted.attempts[-1]
    if ref_final.rc != 0:
        failures.append(f"the reference run failed (exit {ref_final.rc}): {ref_final.log_tail}")
    if last.rc != 0:
        failures.append(f"the last resume failed (exit {last.rc}): {last.log_tail}")
    failures += [f"attempt {a.index} exited {a.rc} without being killed: {a.log_tail}"
                 for a in faulted.attempts[:-1] if not a.killed and a.rc != 0]
    resumes = check_resumes(faulted)
    failures += resumes["failures"]
    metrics = check_metrics(reference.out, faulted.out, cfg["max_steps"])
    failures += metrics["failures"]
    tensors = check_tensors(reference.out, faulted.out, cfg["max_steps"])
    failures += tensors["failures"]
    build = check_build(reference.cache, faulted)
    failures += build["failures"]
    orphans = sum(a.orphans for a in faulted.attempts)
    if orphans:
        failures.append(f"{orphans} process(es) outlived a killed trainer (reward workers?)")
    killed = [a for a in faulted.attempts if a.killed]
    return {
        "kills": len(killed),
        "planned_kills": len(faulted.attempts) - 1,
        "phases_hit": dict(Counter(a.phase for a in killed).most_common()),
        "attempts": len(faulted.attempts),
        "resumes": len(faulted.attempts) - 1,
        **{k: v for k, v in resumes.items() if k != "failures"},
        **{k: v for k, v in metrics.items() if k != "failures"},
        **{k: v for k, v in tensors.items() if k != "failures"},
        **{k: v for k, v in build.items() if k != "failures"},
        "orphans": orphans,
        "untraced_phases": sorted({p for a in faulted.attempts for p in a.untraced}),
        "stray_temp_files": stray_temp_files(faulted.out, faulted.cache),
        "reference_wall_s": round(ref_final.wall_s, 2),
        "faulted_wall_s": round(sum(a.wall_s for a in faulted.attempts), 2),
        "log": [{"attempt": a.index, "resumed_from": a.resumed_from, "restored": a.restored,
                 "first_step": a.first_step, "target": a.target, "killed": a.killed,
                 "phase": a.phase, "at_s": round(a.wall_s, 3), "rc": a.rc}
                for a in faulted.attempts],
        "failures": failures,
    }


def check_resumes(run: Runner) -> dict:
    """Each attempt's first step is the newest complete checkpoint at its launch + 1; no kill
    leaves an older newest checkpoint than the one before it."""
    failures, checked = [], 0
    for prev, a in zip(run.attempts, run.attempts[1:]):
        saved = [int(e.arg) for e in prev.events if e.phase == "checkpoint" and e.end is not None
                 and e.arg.isdigit()]  # checkpoints the previous attempt finished writing
        had = max([prev.resumed_from, *saved])
        if a.resumed_from < had:
            failures.append(f"attempt {a.index}: newest complete checkpoint went back from step "
                            f"{had} to {a.resumed_from} (killed in {prev.phase})")
    for a in run.attempts[1:]:
        if a.first_step is None:
            continue  # killed before its first step (or nothing left to do)
        checked += 1
        if a.first_step != a.resumed_from + 1:
            failures.append(f"attempt {a.index}: first step {a.first_step}, but the newest "
                            f"complete checkpoint was step {a.resumed_from} (loaded: "
                            f"{a.restored or 'none'})")
    return {"resumes_checked": checked, "failures": failures}


def check_metrics(ref_out: Path, out: Path, max_steps: int) -> dict:
    """metrics.jsonl: steps 0..max_steps once each, values equal to the reference's."""
    rows, torn = metric_rows(out / "metrics.jsonl")
    ref_rows, _ = metric_rows(ref_out / "metrics.jsonl")
    steps = Counter(r.get("step") for r in rows)
    duplicates = sorted(s for s, n in steps.items() if n > 1)
    missing = sorted(set(range(0, max_steps + 1)) - set(steps))
    extra = sorted(s for s in steps if s not in range(0, max_steps + 1))
    ref_by_step = {r["step"]: r for r in ref_rows}
    mismatches = []
    for r in rows:
        want = ref_by_step.get(r.get("step"), {})
        keys = {k for k in want.keys() | r.keys() if not any(n in k for n in NOISY_KEYS)}
        mismatches += [f"step {r.get('step')} {k}: {r.get(k)!r} != reference {want.get(k)!r}"
                       for k in sorted(keys) if r.get(k) != want.get(k)]
    failures = []
    if duplicates or missing or extra or torn:
        failures.append(f"metrics.jsonl: duplicated steps {duplicates}, missing {missing}, "
                        f"unexpected {extra}, torn lines {torn}")
    if mismatches:
        failures.append(f"metrics.jsonl: {len(mismatches)} value(s) differ from the reference, "
                        f"first: {mismatches[0]}")
    return {"metric_steps": len(rows), "duplicates": duplicates, "missing": missing,
            "torn_lines": torn, "metric_mismatches": mismatches[:10], "failures": failures}


def check_tensors(ref_out: Path, out: Path, max_steps: int) -> dict:
    """Final adapters and the last checkpoint's tensors against the reference, bit for bit."""
    pairs = [Path("adapters") / "adapters.safetensors"]
    ref_last, last = step_dirs(ref_out).get(max_steps), step_dirs(out).get(max_steps)
    if ref_last is None or last is None:
        return {"bitwise_equal": False, "tensors_compared": 0, "max_abs_diff": None,
                "failures": [f"no checkpoint of step {max_steps} (reference: {ref_last}, "
                             f"faulted: {last})"]}
    for name in ("adapters.safetensors", "optimizer.safetensors"):
        pairs.append(last.relative_to(out) / name)
    failures, worst, n = [], 0.0, 0
    for rel in pairs:
        ref_rel = rel if rel.parts[0] == "adapters" else ref_last.relative_to(ref_out) / rel.name
        try:
            diffs, d, k = compare_tensors(ref_out / ref_rel, out / rel)
        except (OSError, ValueError) as e:
            failures.append(f"{rel}: cannot be read ({e})")
            continue
        worst, n = max(worst, d), n + k
        if diffs:
            failures.append(f"{rel}: {len(diffs)} of {k} tensors differ from the reference "
                            f"(max abs {d:.3g}); first: {diffs[0]}")
    return {"bitwise_equal": not failures, "tensors_compared": n, "max_abs_diff": worst,
            "failures": failures}


def check_build(ref_cache: Path, run: Runner) -> dict:
    """A built-in model whose build was killed is rebuilt into the reference's exact files."""
    killed = any(a.phase == "build" for a in run.attempts if a.killed)
    ref_dir, got_dir = ref_cache / "models" / "tiny", run.cache / "models" / "tiny"
    names = sorted(p.name for p in ref_dir.iterdir() if not p.name.startswith("."))
    got = sorted(p.name for p in got_dir.iterdir() if not p.name.startswith(".")) \
        if got_dir.is_dir() else []
    failures = [] if names == got else [f"built-in model files {got}, expected {names}"]
    failures += [f"built-in model: {n} differs from a clean build" for n in names
                 if n in got and (ref_dir / n).read_bytes() != (got_dir / n).read_bytes()]
    return {"build_killed": killed, "build_rebuilt_equal": not failures, "failures": failures}


def run_suite(work: Path, kills: int | list[Target] = 30, seed: int = 0, max_steps: int = 6,
              save_every: int = 2) -> dict:
    """Reference run, faulted run, checks; returns the summary (see `check`)."""
    rng = random.Random(seed)
    cfg = run_config(max_steps, save_every)
    reference = Runner(work, "reference", cfg)
    reference.launch(None)
    phases = kills if isinstance(kills, list) else plan(kills, rng)
    faulted = kill_run(work, cfg, reference, phases, rng)
    summary = check(reference, faulted, cfg)
    summary.update(seed=seed, max_steps=max_steps, save_every=save_every)
    return summary


def print_summary(s: dict) -> None:
    print(f"kills: {s['kills']} (planned {s['planned_kills']}), resumes: {s['resumes']} "
          f"({s['resumes_checked']} checked against the newest checkpoint)")
    print("phases hit: " + ", ".join(f"{k} {v}" for k, v in s["phases_hit"].items()))
    print(f"metrics: {s['metric_steps']} records, duplicated steps {s['duplicates']}, missing "
          f"{s['missing']}, torn lines {s['torn_lines']}, values differing "
          f"{len(s['metric_mismatches'])}")
    print(f"tensors: {s['tensors_compared']} compared, bitwise equal {s['bitwise_equal']}, "
          f"max abs difference {s['max_abs_diff']}")
    print(f"build killed: {s['build_killed']}, rebuilt equal: {s['build_rebuilt_equal']}; "
          f"orphan processes: {s['orphans']}; stray temp files: {len(s['stray_temp_files'])}")
    if s["untraced_phases"]:
        print(f"not traced (trainer functions not found): {', '.join(s['untraced_phases'])}")
    print(f"time: reference {s['reference_wall_s']} s, faulted run {s['faulted_wall_s']} s")
    for f in s["failures"]:
        print(f"FAIL: {f}")
    print("PASS" if not s["failures"] else f"FAILED ({len(s['failures'])} problem(s))")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        child(int(argv[1]), argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=30, help="SIGKILLs to send (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the summary here as JSON")
    p.add_argument("--workdir", type=Path, help="keep the runs here (default: a temp folder)")
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fault-inject-"))
    try:
        summary = run_suite(work, args.kills, args.seed, args.max_steps, args.save_every)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
