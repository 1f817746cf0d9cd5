"""The OISD study: GRPO, OISD and its ablations, same budget, several seeds (RESULTS.md).

    python scripts/study.py                       # 7 variants x 3 seeds, about an hour on 2 cores
    python scripts/study.py --seeds 0 --variants grpo oisd --set max_steps=5   # a smoke run

Every run trains `configs/study.yaml` (builtin:study-arith, 6 blocks, student block 2) with the
variant's overrides and the seed; finished runs are kept under `--runs` and not trained again.
Then, per run, on the held-out problems (one completion each, sampled at the training
temperature with a fixed seed): accuracy, and the student block's lens against the final layer
(top-1 agreement and JS, overall and on correct / incorrect completions) plus every block's
agreement. Writes the tables to `--out` (markdown), the numbers to `--out`.json, and a figure
of the lens of GRPO, OISD and OISD with `weighting: none` on one held-out problem (seed 0), each
model's own greedy completion, next to it.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_oisd import load  # noqa: E402
from mlx_oisd.config import load_config  # noqa: E402
from mlx_oisd.data import PromptFormat, load_examples  # noqa: E402
from mlx_oisd.evaluate import sample_correct  # noqa: E402
from mlx_oisd.io import write_json, write_text  # noqa: E402
from mlx_oisd.lens import compare_lens, lens_table, plot_lens_heatmap  # noqa: E402
from mlx_oisd.losses import js_divergence  # noqa: E402
from mlx_oisd.metrics import read_metrics  # noqa: E402
from mlx_oisd.rewards import MathChecker  # noqa: E402
from mlx_oisd.rollout import sample  # noqa: E402
from mlx_oisd.trainer import train  # noqa: E402

VARIANTS = {  # name -> overrides of configs/study.yaml
    "grpo": ["algorithm=grpo"],
    "oisd": [],
    "logit_only": ["oisd.lambda_attn=0.0"],
    "attn_only": ["oisd.lambda_logit=0.0"],
    "sign": ["oisd.weighting=sign"],
    "none": ["oisd.weighting=none"],
    "bupo": ["algorithm=bupo"],
}
FIGURE = {"grpo": "GRPO", "oisd": "OISD", "none": "OISD, weighting: none"}  # lens panels
EVAL_SEED = 1234  # the held-out samples' randomness, the same for every run


def run_variant(config: Path, name: str, seed: int, runs: Path, extra: list[str]) -> Path:
    """Train one run unless it is already finished; returns its folder."""
    out = runs / f"{name}-s{seed}"
    overrides = VARIANTS[name] + [f"seed={seed}", f"output_dir={out}"] + extra
    cfg = load_config(config, overrides)
    records = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    if not any(r.get("step") == cfg.max_steps and "eval_accuracy" in r for r in records):
        t0 = time.time()
        train(cfg, resume=(out / "checkpoints").is_dir(), show_progress=False)
        write_json(out / "study_time.json", {"seconds": time.time() - t0})
    return out


def lens_js_agree(model, ids: list[int], prompt_len: int, layer: int):
    """[C] JS and top-1 agreement of block `layer`'s lens with the final layer at the positions
    that predict the completion's tokens."""
    L = model.args.num_hidden_layers
    out = model.forward_internals(mx.array(ids)[None], hidden_layers=[layer, L],
                                  return_logits=False)
    s = slice(prompt_len - 1, len(ids) - 1)
    student = model.lens(out.hidden[layer][0, s]).astype(mx.float32)
    final = model.lens(out.hidden[L][0, s]).astype(mx.float32)
    js = js_divergence(student, final)
    agree = mx.argmax(student, -1) == mx.argmax(final, -1)
    return np.asarray(js), np.asarray(agree)


def analyse(folder: Path, cfg, examples, checker) -> dict:
    """Held-out accuracy and the lens statistics of the trained model in `folder`."""
    model, tok = load(cfg.model, adapter_path=folder / "adapters")
    fmt, layer = PromptFormat.of(cfg), cfg.oisd.student_layers[0]
    rollouts = []

    def recording(*args, **kwargs):
        rollouts.append(sample(*args, **kwargs))
        return rollouts[-1]

    mx.random.seed(EVAL_SEED)
    correct, _ = sample_correct(model, tok, examples, 1, cfg.max_completion_length,
                                cfg.temperature, cfg.top_p, fmt, checker, sampler=recording)
    pairs = [(r.prompts[i // r.group_size], c) for r in rollouts for i, c in enumerate(r.completions)]
    ok = correct[:, 0] > 0.5  # [P]: n = 1, row i is problem i
    js_by, agree_by, profile = {True: [], False: []}, {True: [], False: []}, []
    for (prompt, completion), right in zip(pairs, ok):
        if not completion:
            continue
        js, agree = lens_js_agree(model, prompt + completion, len(prompt), layer)
        js_by[bool(right)].append(js)
        agree_by[bool(right)].append(agree)
        table = lens_table(model, prompt + completion)
        profile.append(table["agree"][:, len(prompt) - 1:len(prompt) + len(completion) - 1])
    cat = np.concatenate
    out = {"accuracy": float(ok.mean()), "layer": layer,
           "agree": float(cat(agree_by[True] + agree_by[False]).mean()),
           "js": float(cat(js_by[True] + js_by[False]).mean()),
           "profile": cat(profile, axis=1).mean(axis=1).tolist()}
    for right, tag in ((True, "correct"), (False, "incorrect")):
        out[f"agree_{tag}"] = float(cat(agree_by[right]).mean()) if agree_by[right] else None
        out[f"js_{tag}"] = float(cat(js_by[right]).mean()) if js_by[right] else None
    records = read_metrics(folder / "metrics.jsonl")
    out["eval_accuracy"] = [r["eval_accuracy"] for r in records if "eval_accuracy" in r][-1]
    timing = folder / "study_time.json"
    out["seconds"] = json.loads(timing.read_text())["seconds"] if timing.is_file() else None
    return out


def _ms(values) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    return f"{100 * np.mean(v):.1f} ± {100 * np.std(v, ddof=1):.1f}" if len(v) > 1 else \
        f"{100 * v[0]:.1f}"


def tables(results: dict, seeds: list[int], k: int) -> str:
    """Markdown: accuracy with paired differences to GRPO, then the lens statistics."""
    layer = next(iter(next(iter(results.values())).values()))["layer"]
    lines = [f"| variant | held-out Avg@{k} (%) | paired diff. to GRPO (points) | 1 sample, T=1 (%) |",
             "|---|---|---|---|"]
    for name, per_seed in results.items():
        acc = [per_seed[s]["eval_accuracy"] for s in seeds]
        diff = ([per_seed[s]["eval_accuracy"] - results["grpo"][s]["eval_accuracy"]
                 for s in seeds] if "grpo" in results and name != "grpo" else [])
        lines.append(f"| {name} | {_ms(acc)} | {_ms(diff) if diff else '-'} | "
                     f"{_ms([per_seed[s]['accuracy'] for s in seeds])} |")
    lines += ["", f"| variant | agree@{layer} (%) | on correct | on incorrect | JS@{layer} "
              "(x100) | on correct | on incorrect |", "|---|---|---|---|---|---|---|"]
    for name, per_seed in results.items():
        r = [per_seed[s] for s in seeds]
        lines.append("| " + " | ".join([name] + [_ms([x[k] for x in r]) for k in (
            "agree", "agree_correct", "agree_incorrect", "js", "js_correct", "js_incorrect")])
            + " |")
    L = len(next(iter(results.values()))[seeds[0]]["profile"])
    lines += ["", "| variant | " + " | ".join(f"block {l}" for l in range(1, L)) + " |",
              "|---|" + "---|" * (L - 1)]
    for name, per_seed in results.items():
        prof = np.mean([per_seed[s]["profile"] for s in seeds], axis=0)
        lines.append(f"| {name} | " + " | ".join(f"{100 * p:.1f}" for p in prof[:-1]) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "study.yaml")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "study")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        help="override a key of every run (--set max_steps=5)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "study.md")
    args = parser.parse_args(argv)
    t0 = time.time()
    folders = {name: {s: run_variant(args.config, name, s, args.runs, args.extra)
                      for s in args.seeds} for name in args.variants}
    cfg = load_config(args.config, args.extra)
    examples = load_examples(cfg.dataset.source, cfg.eval_split)[:cfg.eval_samples]
    with MathChecker(timeout_s=cfg.reward_timeout) as checker:
        results = {name: {s: analyse(f, load_config(args.config, VARIANTS[name] + args.extra),
                                     examples, checker) for s, f in per.items()}
                   for name, per in folders.items()}
    figure = None
    shown = [v for v in FIGURE if v in folders]
    if len(shown) > 1:
        s = args.seeds[0]
        runs, tok = compare_lens(cfg.model, [str(folders[v][s] / "adapters") for v in shown],
                                 [FIGURE[v] for v in shown], [examples[0].prompt], None,
                                 max_tokens=cfg.max_completion_length, fmt=PromptFormat.of(cfg))
        figure = plot_lens_heatmap(runs, tok, args.out.with_suffix(".png"))
    trained = sum(r["seconds"] or 0 for per in results.values() for r in per.values())
    text = (f"Study: {', '.join(args.variants)}; seeds {args.seeds}; config {args.config.name}"
            f" {' '.join(args.extra)}; training {trained:.0f} s (this machine, when the runs were "
            f"trained), this invocation {time.time() - t0:.0f} s.\n\n"
            + tables(results, args.seeds, cfg.eval_k) + "\n")
    write_text(args.out, text)
    write_json(args.out.with_suffix(".json"), {n: {str(s): r for s, r in per.items()}
                                               for n, per in results.items()})
    print(text + (f"\nfigure: {figure}" if figure else ""))


if __name__ == "__main__":
    main()
