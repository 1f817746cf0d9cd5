"""A realistic GRPO workload: a warm model on its own task, ours vs mlx-lm-lora.

    python -m bench --only realistic                       # tiny-arith (+ study-arith if cached)
    python -m bench.realistic --models tiny-arith --dtypes bfloat16 --repeats 3

Unlike the random-model `step` table (the worst case: all rewards 0, no completion stops early),
the models here are the warm built-in ones (`builtin:tiny-arith` of configs/demo.yaml, and
`builtin:study-arith` of configs/study.yaml when it is already in the cache; this benchmark never
builds it): completions end with EOS at varied lengths and earn rewards with variance, so some
groups are all-correct or all-wrong (zero advantage) and some rows are short.

Both trainers run at the recipe's settings (B, max completion length, LoRA, learning rate) with
G = 8, temperature 1, beta 0, token-mean loss, algorithm grpo, on the same model folder (a float32
and a bfloat16 copy, `cast_copy`) and the same prompts: the ones our prompt sampler draws, rendered
with our prompt format, given to the peer as token ids in that order. The peer's reward is
`boxed_answer` of bench/peer_mlx_lm_lora.py, which scores these integer answers as our `math`
reward does. Each sample their own completions (same seed, different random streams).

Per repeat (the order of ours and the peer alternates between repeats so a slow spell of a
shared machine hits both):
1. full steps of each trainer (`steps` timed after one warm-up): the peer; ours with all rows in
   one micro-batch, with micro-batches of B rows, with B rows decoding at a time as the peer
   does (rollout_batch_size B), and oisd. The rollout (sampling and scoring) time and peak are
   recorded separately; the update is the rest of the step;
2. our update variants replayed on the rollouts of our first full run (its `collect` recorded,
   then returned again step by step to a fresh run of each variant): skip_zero_advantage and
   sort_by_length on and off, minibatch_size None / B*G/2 / B*G/4 / G / B, compile on, oisd.
   Each variant trains on exactly the same rows, so differences are the update's own.
Times are medians over the timed steps of a repeat, then the median and range over repeats.
"""

import argparse
import json
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
import yaml

from mlx_oisd import trainer
from mlx_oisd.config import validate
from mlx_oisd.data.prompts import PromptFormat, render_examples
from mlx_oisd.data.sampler import PromptSampler
from mlx_oisd.data.sources import load_examples
from mlx_oisd.io import write_json
from mlx_oisd.loading import tokenizer_for
from mlx_oisd.tiny import builtin_model_path, cache_dir

from .common import Table, machine
from .step import run_peer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"tiny-arith": ROOT / "configs" / "demo.yaml",
           "study-arith": ROOT / "configs" / "study.yaml"}
DTYPES = {"bfloat16": mx.bfloat16, "float32": mx.float32}
RECIPE_ONLY = ("eval_split", "eval_samples", "eval_k", "eval_every", "save_every",
               "logging_steps", "output_dir")


def cast_copy(src: Path, dst: Path, dtype=mx.bfloat16) -> Path:
    """A copy of the model folder `src` at `dst` with every floating-point weight cast to `dtype`
    (other arrays and every non-weight file unchanged; config.json's torch_dtype updated).
    Built beside `dst` and renamed into place; an existing complete `dst` is returned as is."""
    if (dst / "config.json").is_file():
        return dst
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.suffix == ".safetensors":
            weights, meta = mx.load(str(f), return_metadata=True)
            weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
                       for k, v in weights.items()}
            mx.save_safetensors(str(tmp / f.name), weights, metadata=meta)
        elif f.is_file() and f.name != "config.json":
            shutil.copy2(f, tmp / f.name)
    config = json.loads((src / "config.json").read_text())
    config["torch_dtype"] = str(dtype).split(".")[-1]
    write_json(tmp / "config.json", config)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def model_folder(name: str, dtype: str) -> Path:
    """The built-in model `name` in `dtype`: the cached folder when it is stored so, else a cast
    copy cached beside it."""
    src = builtin_model_path(name)
    stored = json.loads((src / "config.json").read_text()).get("torch_dtype", "float32")
    return src if stored == dtype else cast_copy(src, cache_dir() / "models" / f"{name}-{dtype}",
                                                 DTYPES[dtype])


def available_models(names: str) -> list[str]:
    """`names` ("auto": tiny-arith, and study-arith when already built) as a list."""
    if names != "auto":
        return names.split(",")
    return ["tiny-arith"] + (["study-arith"] if (cache_dir() / "models" / "study-arith" /
                                                 "config.json").is_file() else [])


def our_config(name: str, model: Path, out: str, B: int | None, G: int, steps: int,
               **overrides):
    """The recipe of built-in model `name` at the benchmark's matched settings."""
    raw = yaml.safe_load(RECIPES[name].read_text())
    for key in RECIPE_ONLY:
        raw.pop(key, None)
    raw.update(model=str(model), output_dir=out, algorithm="grpo", num_generations=G,
               max_steps=steps, beta=0.0, loss_agg="token_mean", temperature=1.0, seed=0,
               lr_scheduler_type="constant", minibatch_size=None, compile=False)
    if B:
        raw["batch_size"] = B
    raw.update(overrides)
    return validate(raw)


def drawn_prompts(cfg, steps: int) -> list[dict]:
    """The prompts our run of `cfg` trains on in its first `steps` steps, in order, as the peer's
    spec rows {"tokens", "prompt", "answer"}."""
    tok = tokenizer_for(Path(cfg.model))
    d = cfg.dataset
    examples = load_examples(d.source, d.split, d.config, d.prompt_field, d.answer_field,
                             d.max_samples)
    examples, prompts, _ = render_examples(tok, examples, cfg.max_prompt_length,
                                           cfg.truncate_prompts, PromptFormat.of(cfg))
    sampler = PromptSampler(len(examples), cfg.batch_size, cfg.seed)
    rows = [i for _ in range(steps) for i in sampler.next_batch()]
    return [{"tokens": prompts[i], "prompt": tok.decode(prompts[i]), "answer": examples[i].answer}
            for i in rows]


@contextmanager
def patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _steps(cfg, steps: int) -> list[dict]:
    run = trainer.setup(cfg)
    try:
        for worker in run.workers.values():  # its one-time math_verify import, before any step
            worker.score([("\\boxed{\\frac{1}{2}}", "0.5")])
        return [trainer.train_step(run, s) for s in range(1, steps + 1)]
    finally:
        for worker in run.workers.values():
            worker.close()
        if run.lock is not None:
            run.lock.release()
        del run
        mx.clear_cache()


def our_full(cfg, steps: int) -> tuple[list[dict], list]:
    """`steps` full training steps of `cfg`: their metrics, each with the rollout's seconds and
    peak (sampling and scoring) added, and the recorded `collect` results."""
    real, scored, rollout = trainer.collect, [], []

    def recording(run, first_step):
        mx.synchronize()
        t = time.perf_counter()
        out = real(run, first_step)
        mx.synchronize()
        rollout.append((time.perf_counter() - t, mx.get_peak_memory() / 1e9))
        scored.append(out)
        return out

    with patched(trainer, "collect", recording):
        rows = _steps(cfg, steps)
    for row, (t, peak) in zip(rows, rollout):
        row.update(rollout_s=t, rollout_peak_gb=peak, update_s=row["step_time"] - t)
    return rows, scored


def our_replay(cfg, scored: list) -> list[dict]:
    """Training steps of `cfg` on the recorded rollouts `scored` (no sampling, no scoring):
    step_time and peak_memory_gb are the update's."""
    it = iter(scored)
    with patched(trainer, "collect", lambda run, first_step: next(it)), \
            patched(trainer, "reward_workers", lambda cfg: {}):
        return _steps(cfg, len(scored))


def peer_full(python: Path, cfg, prompts: list[dict], steps: int) -> dict:
    """The peer's `train_grpo` for `steps` steps at `cfg`'s settings on `prompts` (in order)."""
    lora = cfg.lora
    spec = {
        "model": cfg.model, "batch_size": cfg.batch_size, "group_size": cfg.num_generations,
        "max_tokens": cfg.max_completion_length, "steps": steps, "lora_rank": lora.rank,
        "lora_scale": lora.scale, "lora_dropout": lora.dropout, "lora_keys": lora.keys,
        "num_layers": lora.num_layers, "learning_rate": cfg.learning_rate, "seed": cfg.seed,
        "temperature": cfg.temperature, "top_p": cfg.top_p, "prompts": prompts,
        "reward": "boxed", "in_order": True,
    }
    return run_peer(python, spec)


def zero_advantage_fraction(rewards, G: int) -> float:
    """Fraction of the groups (rows g*G .. g*G + G-1 of `rewards` [B*G]) whose rewards are equal."""
    r = np.asarray(rewards, float).reshape(-1, G)
    return float(np.mean(r.max(axis=1) == r.min(axis=1)))


def peer_summary(out: dict, G: int) -> dict:
    """Per-step rows of the peer's output (the first step, a warm-up, dropped), in the keys of
    ours."""
    rows = []
    for i in range(1, len(out["step_times"])):
        lengths = out["completion_lengths"][i]
        t, roll = out["step_times"][i], out["rollout_times"][i]
        rows.append({"step_time": t, "rollout_s": roll, "update_s": t - roll,
                     "peak_memory_gb": out["peak_memory_per_step_gb"][i],
                     "rollout_peak_gb": out["rollout_peak_gb"][i],
                     "frac_zero_std_groups": zero_advantage_fraction(out["rewards"][i], G),
                     "completion_len_mean": float(np.mean(lengths)),
                     "completion_len_max": int(max(lengths)), "tokens": int(sum(lengths)),
                     "reward": float(np.mean(out["rewards"][i]))})
    return rows


def our_summary(rows: list[dict], B: int, G: int) -> list[dict]:
    """Our per-step rows (the first, a warm-up, dropped), tokens added."""
    return [{**r, "tokens": round(r["completion_len_mean"] * B * G)} for r in rows[1:]]


def variants(B: int, G: int) -> list[tuple[str, dict]]:
    """(name, config overrides) of the update variants replayed on the same rollouts."""
    N = B * G
    sizes = list(dict.fromkeys(s for s in (N // 2, N // 4, G, B) if 1 <= s < N))
    out = [("all rows", {}), ("all rows, no skip", {"skip_zero_advantage": False})]
    out += [(f"minibatch {s}", {"minibatch_size": s}) for s in sizes]
    for s in dict.fromkeys((B, 2 * B)):
        if s < N:
            out += [(f"minibatch {s}, no sort", {"minibatch_size": s, "sort_by_length": False})]
    out += [(f"minibatch {B}, no skip", {"minibatch_size": B, "skip_zero_advantage": False}),
            (f"minibatch {B}, neither", {"minibatch_size": B, "skip_zero_advantage": False,
                                         "sort_by_length": False}),
            ("all rows, compile", {"compile": True}),
            (f"minibatch {B}, compile", {"minibatch_size": B, "compile": True}),
            ("oisd, all rows", {"algorithm": "oisd"}),
            (f"oisd, minibatch {B}", {"algorithm": "oisd", "minibatch_size": B})]
    return out


def median_range(values) -> str:
    """'median (min-max)' of per-repeat values, 3 significant digits; the median alone for one."""
    v = sorted(values)
    med = statistics.median(v)
    return f"{med:.3g}" if len(v) == 1 else f"{med:.3g} ({v[0]:.3g}-{v[-1]:.3g})"


def per_repeat(rows_by_repeat: list[list[dict]], key: str, reduce=statistics.median) -> list:
    return [reduce([r[key] for r in rows]) for rows in rows_by_repeat]


def measure(name: str, dtype: str, B: int | None, G: int, steps: int, repeats: int,
            peer_python: Path | None, log=print) -> dict:
    """{trainer or variant: [per-repeat step rows]} for built-in model `name` in `dtype`."""
    model = model_folder(name, dtype)
    probe = our_config(name, model, "unused", B, G, steps + 1)
    B = probe.batch_size
    prompts = drawn_prompts(probe, steps + 1)
    results: dict[str, list] = {}
    full = [("ours, all rows", {}), (f"ours, minibatch {B}", {"minibatch_size": B}),
            (f"ours, minibatch {B}, rollout_batch_size {B}",  # the peer decodes B rows at a time
             {"minibatch_size": B, "rollout_batch_size": B}),
            ("ours, oisd, all rows", {"algorithm": "oisd"})]
    for rep in range(repeats):
        order = ["peer", "ours"] if rep % 2 else ["ours", "peer"]
        scored = None
        for who in order:
            if who == "peer" and peer_python is not None:
                out = peer_full(peer_python, probe, prompts, steps + 1)
                results.setdefault(f"mlx-lm-lora {out['version']}", []).append(
                    peer_summary(out, G))
            elif who == "ours":
                for label, over in full:
                    with tempfile.TemporaryDirectory() as tmp:
                        rows, rec = our_full(our_config(name, model, tmp, B, G, steps + 1,
                                                        **over), steps + 1)
                    scored = scored or rec
                    results.setdefault(label, []).append(our_summary(rows, B, G))
        for label, over in variants(B, G):
            with tempfile.TemporaryDirectory() as tmp:
                rows = our_replay(our_config(name, model, tmp, B, G, steps + 1, **over), scored)
            results.setdefault(f"update: {label}", []).append(rows[1:])
        log(f"  {name} {dtype}: repeat {rep + 1}/{repeats} done", flush=True)
    return {"B": B, "G": G, "M": probe.max_completion_length, "results": results}


def tables(measured: dict[tuple[str, str], dict]) -> list[Table]:
    """The full-step table and the update-variant table of `measure`'s results per (model,
    dtype)."""
    full = Table(
        "Realistic workload: full GRPO step, ours vs mlx-lm-lora",
        "Median seconds per step over the timed steps (after one warm-up) of each repeat, then "
        "median (range) over repeats; rollout = sampling + scoring, update = the rest of the "
        "step; peak = MLX's allocator peak over the step (median over repeats); zero-adv = "
        "fraction of groups whose rewards are all equal; len = completion tokens (EOS "
        "included); tokens = completion tokens per step; reward = mean reward.",
        ["model", "dtype", "B x G, max len", "trainer", "s/step", "rollout s", "update s",
         "peak GB", "rollout peak GB", "zero-adv", "len mean / max", "tokens", "reward", "speed-up vs peer",
         "memory vs peer"])
    upd = Table(
        "Realistic workload: our update variants on the same rollouts",
        "Seconds per update (advantages, packing, forward + backward + AdamW) replayed on the "
        "rollouts of our first full run of each repeat: median over steps, then median (range) "
        "over repeats. Defaults: skip_zero_advantage and sort_by_length on; `no skip` / "
        "`no sort` turn one off, `neither` both. Peak: the update's (a full step's peak is "
        "the larger of it and the rollout's, in the table above); `vs peer step peak` = it / "
        "the peer's whole-step peak. Speed-up vs peer: the peer's update seconds (its step "
        "minus its rollout) / ours.",
        ["model", "dtype", "variant", "update s", "peak GB", "vs peer step peak",
         "speed-up vs peer update", "vs `all rows, no skip`"])
    for (name, dtype), m in measured.items():
        res = m["results"]
        shape = f"{m['B']} x {m['G']}, {m['M']}"
        peer = next((v for k, v in res.items() if k.startswith("mlx-lm-lora")), None)
        peer_t = statistics.median(per_repeat(peer, "step_time")) if peer else None
        peer_u = statistics.median(per_repeat(peer, "update_s")) if peer else None
        peer_m = statistics.median(per_repeat(peer, "peak_memory_gb", max)) if peer else None
        for label, reps in res.items():
            if label.startswith("update: "):
                continue
            t = per_repeat(reps, "step_time")
            mem = statistics.median(per_repeat(reps, "peak_memory_gb", max))
            vs = (f"{peer_t / statistics.median(t):.2f}", f"{mem / peer_m:.2f}") if peer else ("",
                                                                                             "")
            full.rows.append([
                name, dtype, shape, label, median_range(t),
                median_range(per_repeat(reps, "rollout_s")),
                median_range(per_repeat(reps, "update_s")), f"{mem:.3g}",
                f"{statistics.median(per_repeat(reps, 'rollout_peak_gb', max)):.3g}",
                f"{statistics.mean(per_repeat(reps, 'frac_zero_std_groups', statistics.mean)):.2f}",
                f"{statistics.mean(per_repeat(reps, 'completion_len_mean', statistics.mean)):.1f}"
                f" / {max(per_repeat(reps, 'completion_len_max', max))}",
                round(statistics.mean(per_repeat(reps, "tokens", statistics.mean))),
                f"{statistics.mean(per_repeat(reps, 'reward', statistics.mean)):.2f}", *vs])
        base = res.get("update: all rows, no skip")
        base_t = statistics.median(per_repeat(base, "step_time")) if base else None
        for label, reps in res.items():
            if not label.startswith("update: "):
                continue
            t = statistics.median(per_repeat(reps, "step_time"))
            mem = statistics.median(per_repeat(reps, "peak_memory_gb", max))
            upd.rows.append([
                name, dtype, label.removeprefix("update: "),
                median_range(per_repeat(reps, "step_time")), f"{mem:.3g}",
                f"{mem / peer_m:.2f}" if peer else "",
                f"{peer_u / t:.2f}" if peer else "", f"{base_t / t:.2f}" if base_t else ""])
    return [full, upd]


def run(models: str = "auto", dtypes: str = "bfloat16,float32", B: int | None = None, G: int = 8,
        steps: int = 3, repeats: int = 2, peer_python: Path | None = None,
        raw: Path | None = None) -> list[Table]:
    """The two tables over `models` x `dtypes`; `raw`: also the per-step rows as JSON there."""
    measured = {}
    for name in available_models(models):
        for dtype in dtypes.split(","):
            measured[(name, dtype)] = measure(name, dtype, B, G, steps, repeats, peer_python)
            if raw is not None:
                raw.write_text(json.dumps({f"{k[0]} {k[1]}": v for k, v in measured.items()},
                                          default=float))
    out = tables(measured)
    if peer_python is None:
        out[0].notes.append("mlx-lm-lora was not run: `make bench-env` installs it into "
                            ".venv-bench, or pass --peer-python.")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.realistic",
                                description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--peer-python", type=Path, default=ROOT / ".venv-bench" / "bin" / "python")
    p.add_argument("--json", type=Path, help="also write the raw per-step rows here")
    args = p.parse_args(argv)
    check_arguments(p, args)
    print(f"machine: {machine()}", flush=True)
    start = time.perf_counter()
    out = run(args.realistic_models, args.realistic_dtypes, args.realistic_batch_size,
              args.realistic_group_size, args.realistic_steps, args.realistic_repeats,
              args.peer_python if args.peer_python.exists() else None, args.json)
    for t in out:
        print(t.markdown(), flush=True)
    print(f"total {(time.perf_counter() - start) / 60:.1f} min")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The realistic benchmark's options (shared with `python -m bench`)."""
    p.add_argument("--realistic-models", default="auto",
                   help="comma list of tiny-arith, study-arith; auto: tiny-arith, and study-arith "
                        "when already built")
    p.add_argument("--realistic-dtypes", default="bfloat16,float32",
                   help="comma list of bfloat16, float32")
    p.add_argument("--realistic-batch-size", type=int, help="prompts per step (default: recipe's)")
    p.add_argument("--realistic-group-size", type=int, default=8, help="completions per prompt")
    p.add_argument("--realistic-steps", type=int, default=3, help="timed steps after a warm-up")
    p.add_argument("--realistic-repeats", type=int, default=2, help="repeats of everything")


def check_arguments(p: argparse.ArgumentParser, args) -> None:
    if args.realistic_models != "auto" and (bad := set(args.realistic_models.split(","))
                                            - set(RECIPES)):
        p.error(f"--realistic-models: unknown {sorted(bad)}; expected auto or some of "
                f"{', '.join(RECIPES)}")
    if bad := set(args.realistic_dtypes.split(",")) - set(DTYPES):
        p.error(f"--realistic-dtypes: unknown {sorted(bad)}; expected some of {', '.join(DTYPES)}")
    for flag in ("steps", "repeats", "group_size"):
        if getattr(args, f"realistic_{flag}") < 1:
            p.error(f"--realistic-{flag.replace('_', '-')}: expected >= 1")


if __name__ == "__main__":
    main()
