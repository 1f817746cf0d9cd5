"""Held-out accuracy: n sampled completions per problem from the acting policy, scored by `math`.

    Avg@n  = mean over problems of c / n
    Pass@k = mean over problems of 1 - C(n - c, k) / C(n, k)      (k <= n)

with c the problem's number of correct completions among its n samples. Pass@k is the unbiased
estimator of Chen et al. 2021 (Codex), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never
forms the huge binomial coefficients. Benchmarks are averaged with equal weight (macro mean).

`lens@l` is the greedy accuracy of block l's logit-lens policy (`lens.lens_generate`: every next
token is argmax W_U · N_L(h^l)): how much of the task the lower layers solve on their own, which is
what OISD's alignment term pushes up. Sampling goes through `rollout.sample` (all rows of a chunk
decode together), so evaluation sees exactly the policy that training optimises; with a
`draft_layer`, through `speculative.speculative_sample` instead (the same distribution, one
sequence at a time, with the draft acceptance rate reported); scoring goes
through a `MathChecker` worker when one is given (time-limited: a hang scores 0 and is counted).

Benchmarks by name (`BENCHMARKS`) are public Hub datasets read through `data.sources.load_examples`
(Hub cache, offline fallback), or local copies `NAME.jsonl` in a folder; their field names agree
with `rewards.benchmarks.BENCHMARK_FIELDS` (amc23's "question" equals the local file's "problem").
"""

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from .data.prompts import PromptFormat
from .data.sources import DataError, Example, load_examples
from .lens import lens_generate
from .rewards import MathChecker, score_batch
from .rollout import sample
from .samples import eval_rows


class Benchmark(NamedTuple):
    repo: str  # Hugging Face Hub dataset id
    config: str | None
    split: str
    prompt_field: str
    answer_field: str


BENCHMARKS: dict[str, Benchmark] = {
    "math500": Benchmark("HuggingFaceH4/MATH-500", None, "test", "problem", "answer"),
    "aime24": Benchmark("HuggingFaceH4/aime_2024", None, "train", "problem", "answer"),
    "aime25": Benchmark("math-ai/aime25", None, "test", "problem", "answer"),
    "amc23": Benchmark("math-ai/amc23", None, "test", "question", "answer"),
    "gsm8k": Benchmark("openai/gsm8k", "main", "test", "question", "answer"),
}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k of one problem with c correct among n samples: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: expected 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def summarize(correct: np.ndarray, ks: Sequence[int]) -> dict:
    """Avg@n and Pass@k (each k <= n of `ks`; larger ones are skipped) of a benchmark.

    correct [P, n]: 1 where sample j of problem i is correct. Returns {"problems": P,
    "samples": n, "avg@n": ..., "pass@k": ...}, fractions in [0, 1].
    """
    correct = np.asarray(correct) > 0.5  # [P, n]
    if correct.ndim != 2 or correct.size == 0:
        raise ValueError(f"summarize: expected a non-empty [problems, samples] array, "
                         f"got shape {correct.shape}")
    P, n = correct.shape
    counts = correct.sum(axis=1)  # [P]
    out = {"problems": P, "samples": n, f"avg@{n}": float(correct.mean())}
    for k in sorted({int(k) for k in ks if 1 <= k <= n}):
        out[f"pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in counts]))
    return out


def load_benchmark(name: str, limit: int | None = None,
                   benchmark_dir: str | Path | None = None) -> list[Example]:
    """The first `limit` problems of benchmark `name` (see `BENCHMARKS`), from the Hub or, with
    `benchmark_dir`, from its local copy `benchmark_dir/NAME.jsonl` (or `.parquet`)."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)} "
                        "(or a local file with --data)")
    b = BENCHMARKS[name]
    if benchmark_dir is None:
        return load_examples(b.repo, b.split, b.config, b.prompt_field, b.answer_field, limit)
    folder = Path(benchmark_dir).expanduser()
    files = [folder / f"{name}{suffix}" for suffix in (".jsonl", ".parquet")]
    path = next((f for f in files if f.is_file()), None)
    if path is None:
        raise DataError(f"benchmark {name!r}: no {files[0].name} or {files[1].name} in {folder}")
    return load_examples(str(path), prompt_field=b.prompt_field, answer_field=b.answer_field,
                         max_samples=limit)


def _score(texts: list[str], answers: list[str], checker: MathChecker | None):
    """math reward of each text [N], and the errors + timeouts count."""
    workers = {"math": checker} if checker is not None else None
    correct, _, stats = score_batch(texts, answers, [("math", 1.0)], workers)
    return correct, stats["errors/math"] + stats["timeouts/math"]


def sample_correct(model, tokenizer, examples, n: int, max_tokens: int, temperature: float = 1.0,
                   top_p: float = 1.0, fmt: PromptFormat = PromptFormat(),
                   checker: MathChecker | None = None,
                   prompts_per_chunk: int = 64, sampler: Callable | None = None,
                   max_prompt_length: int | None = None, top_k: int = 0, min_p: float = 0.0):
    """Sample n completions per example and score them (prompts longer than
    `max_prompt_length` tokens keep their last ones, as training's `truncate_prompts`;
    top_k / min_p as in `rollout.sample`, passed on only when set).

    Returns correct [P, n] float32 (row i: the n samples of example i) and info {"tokens": total
    completion tokens, "truncated": completions cut by max_tokens, "failed": reward errors and
    timeouts, "samples": a row per completion (`samples.eval_rows`: prompt, completion, answer,
    correct, ...)}. `sampler` (default `rollout.sample`, same signature) is a test hook.
    """
    sampler = sampler or sample
    filters = {k: v for k, v in (("top_k", top_k), ("min_p", min_p)) if v}
    rows, info = [], {"tokens": 0, "truncated": 0, "failed": 0, "samples": []}
    for start in range(0, len(examples), prompts_per_chunk):
        chunk = examples[start:start + prompts_per_chunk]
        prompts = [fmt.render(tokenizer, ex.prompt)[-(max_prompt_length or 0):] for ex in chunk]
        rollout = sampler(model, prompts, n, max_tokens, tokenizer.eos_token_ids, temperature,
                          top_p, **filters)
        texts = [tokenizer.decode(c) for c in rollout.completions]
        correct, failed = _score(texts, [ex.answer for ex in chunk for _ in range(n)], checker)
        rows.append(correct.reshape(len(chunk), n))  # [B*n] -> [B, n]
        info["samples"] += eval_rows(start, chunk, texts, correct, rollout)
        info["tokens"] += sum(len(c) for c in rollout.completions)
        info["truncated"] += sum(rollout.truncated)
        info["failed"] += failed
    correct = np.concatenate(rows) if rows else np.zeros((0, n), dtype=np.float32)
    return correct, info


def avg_at_k(model, tokenizer, examples, k: int = 1, max_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, fmt: PromptFormat = PromptFormat(),
             checker: MathChecker | None = None,
             prompts_per_chunk: int = 64,
             max_prompt_length: int | None = None, top_k: int = 0,
             min_p: float = 0.0) -> tuple[float, np.ndarray]:
    """Avg@k of `examples` (each with .prompt, .answer); returns (avg, per-problem accuracy [n])."""
    correct, _ = sample_correct(model, tokenizer, examples, k, max_tokens, temperature, top_p,
                                fmt, checker, prompts_per_chunk,
                                max_prompt_length=max_prompt_length, top_k=top_k, min_p=min_p)
    acc = correct.mean(axis=1) if len(correct) else np.zeros(0)
    return float(acc.mean()) if len(acc) else 0.0, acc


def lens_correct(model, tokenizer, examples, layer: int, max_tokens: int,
                 fmt: PromptFormat = PromptFormat(), checker: MathChecker | None = None,
                 prompts_per_chunk: int = 64):
    """Greedy completions of block `layer`'s lens policy, scored: correct [P] and info as in
    `sample_correct`."""
    eos = sorted(tokenizer.eos_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, info = [], {"tokens": 0, "truncated": 0, "failed": 0}
    for start in range(0, len(examples), prompts_per_chunk):
        chunk = examples[start:start + prompts_per_chunk]
        prompts = [fmt.render(tokenizer, ex.prompt) for ex in chunk]
        completions = lens_generate(model, prompts, layer, max_tokens, eos, pad)
        correct, failed = _score([tokenizer.decode(c) for c in completions],
                                 [ex.answer for ex in chunk], checker)
        rows.append(correct)
        info["tokens"] += sum(len(c) for c in completions)
        info["truncated"] += sum(not c or c[-1] not in eos for c in completions)
        info["failed"] += failed
    return np.concatenate(rows), info


def _timed(sampler: Callable, clock: list[float]) -> Callable:
    """`sampler` adding its wall time to clock[0]."""

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = sampler(*args, **kwargs)
        clock[0] += time.perf_counter() - t
        return out

    return timed


def evaluate_benchmarks(model, tokenizer, benchmarks: dict[str, list[Example]], n: int = 8,
                        ks: Sequence[int] = (1,), max_tokens: int = 4096,
                        temperature: float = 0.6, top_p: float = 0.95,
                        fmt: PromptFormat = PromptFormat(), checker: MathChecker | None = None,
                        layer: int | None = None,
                        rows_per_chunk: int = 64, seed: int = 0,
                        progress: Callable[[str], None] | None = None,
                        samples: list | None = None, top_k: int = 0,
                        min_p: float = 0.0, draft_layer: int | None = None,
                        draft_tokens: int = 4) -> dict:
    """Avg@n, Pass@k (and lens@layer) of every benchmark, and their mean over benchmarks.

    benchmarks: name -> examples. rows_per_chunk: sequences decoding together (n per problem).
    samples: a list that receives a row per sampled completion, {"benchmark": name, **row of
    `samples.eval_rows`} (None: not kept). draft_layer: sample by self-speculative decoding
    drafted by that block (`draft_tokens` per round).
    Returns {"benchmarks": {name: {"problems", "samples", "avg@n", "pass@k"..., "lens@l",
    "completion_tokens_mean", "truncated_frac", "reward_failures", "correct_counts": [P],
    "tokens_per_s" (sampling only), and with a draft layer "draft_acceptance"}},
    "mean": {metric: macro mean over benchmarks}}.
    """
    if n < 1:
        raise ValueError(f"n (samples per problem) must be >= 1, got {n}")
    model.eval()
    per_chunk = max(1, rows_per_chunk // n)
    results = {}
    for name, examples in benchmarks.items():
        t0 = time.perf_counter()
        mx.random.seed(seed)  # a benchmark's samples do not depend on which ran before it
        draft, clock, sampler = None, [0.0], sample
        if draft_layer is not None:
            from functools import partial

            from .speculative import DraftStats, speculative_sample

            draft = DraftStats()
            sampler = partial(speculative_sample, draft_layer=draft_layer,
                              draft_tokens=draft_tokens, stats=draft)
        correct, info = sample_correct(model, tokenizer, examples, n, max_tokens, temperature,
                                       top_p, fmt, checker, per_chunk,
                                       sampler=_timed(sampler, clock), top_k=top_k, min_p=min_p)
        res = summarize(correct, ks)
        res["completion_tokens_mean"] = info["tokens"] / correct.size
        res["truncated_frac"] = info["truncated"] / correct.size
        res["reward_failures"] = info["failed"]
        res["correct_counts"] = correct.sum(axis=1).astype(int).tolist()
        res["tokens_per_s"] = info["tokens"] / clock[0] if clock[0] > 0 else None
        if draft is not None:
            res["draft_acceptance"] = draft.acceptance
            res["draft_counts"] = {"drafted": draft.drafted, "accepted": draft.accepted,
                                   "passes": draft.passes}
        if samples is not None:
            samples += [{"benchmark": name, **row} for row in info["samples"]]
        if layer is not None:
            lens_ok, lens_info = lens_correct(model, tokenizer, examples, layer, max_tokens,
                                              fmt, checker,
                                              rows_per_chunk)
            res[f"lens@{layer}"] = float(lens_ok.mean())
            res["reward_failures"] += lens_info["failed"]
        results[name] = res
        if progress:
            progress(f"{name}: {len(examples)} problems x {n} samples in "
                     f"{time.perf_counter() - t0:.1f} s, avg@{n} {res[f'avg@{n}']:.3f}")
    metrics = [k for k in next(iter(results.values())) if "@" in k] if results else []
    mean = {k: float(np.mean([r[k] for r in results.values() if k in r])) for k in metrics}
    return {"benchmarks": results, "mean": mean}


def format_results(results: dict) -> str:
    """Two plain-text tables, columns = benchmarks: the metrics in % (avg@n, pass@k, lens@l; and
    their macro mean), then the counts (problems, samples, mean completion tokens, truncated %,
    reward failures; and all benchmarks pooled)."""
    benches = results["benchmarks"]
    names = list(benches)
    many = len(names) > 1
    metrics = [k for k in next(iter(benches.values())) if "@" in k]
    width = max(8, *(len(c) for c in names)) + 2

    def table(title: str, last: str, rows: list[tuple[str, list[str]]]) -> list[str]:
        header = names + ([last] if many else [])
        return [f"{title:<16}" + "".join(f"{c:>{width}}" for c in header)] + [
            f"{name:<16}" + "".join(f"{c:>{width}}" for c in cells) for name, cells in rows]

    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    percent = [(m, [pct(benches[c].get(m)) for c in names] + ([pct(results["mean"].get(m))]
                                                               if many else []))
               for m in metrics]
    problems = [benches[c]["problems"] for c in names]
    weights = np.array([b["problems"] * b["samples"] for b in benches.values()], dtype=float)

    def pooled(key: str) -> float | None:
        values = [b.get(key) for b in benches.values()]
        if None in values:
            return None
        return float(np.dot(weights, values) / weights.sum())

    def count_row(name: str, key: str, fmt, total) -> tuple[str, list[str]]:
        cells = [fmt(benches[c][key]) if key in benches[c] else "-" for c in names]
        return name, cells + ([fmt(total) if total is not None else "-"] if many else [])

    samples = {b["samples"] for b in benches.values()}
    counts = [
        count_row("problems", "problems", str, sum(problems)),
        count_row("samples", "samples", str, samples.pop() if len(samples) == 1 else None),
        count_row("mean tokens", "completion_tokens_mean", lambda v: f"{v:.1f}",
                  pooled("completion_tokens_mean")),
        count_row("truncated (%)", "truncated_frac", pct, pooled("truncated_frac")),
        count_row("reward failures", "reward_failures", str,
                  sum(b.get("reward_failures", 0) for b in benches.values())),
    ]
    if any("tokens_per_s" in b for b in benches.values()):
        counts.append(count_row("tokens/s", "tokens_per_s",
                                lambda v: "-" if v is None else f"{v:.1f}", None))
    if any("draft_acceptance" in b for b in benches.values()):
        drafted = sum(b["draft_counts"]["drafted"] for b in benches.values())
        accepted = sum(b["draft_counts"]["accepted"] for b in benches.values())
        counts.append(count_row("draft accept (%)", "draft_acceptance", pct,
                                accepted / drafted if drafted else None))
    return "\n".join(table("metric (%)", "mean", percent) + [""]
                     + table("counts", "all", counts))
