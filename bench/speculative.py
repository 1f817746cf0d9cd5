"""`python -m bench.speculative`: self-speculative decoding on the study model (speculative.py).

    python -m bench.speculative                  # base, GRPO and OISD (seed 0) of the study
    python -m bench.speculative --write          # and append the table to BENCHMARKS.md
    python -m bench.speculative --variants base --layers 2 --ks 4 --prompts 4

For the base `builtin:study-arith` and the GRPO and OISD adapters of the study
(`scripts/study.py --seeds 0 --variants grpo oisd`, under runs/study/), per draft layer l and k
drafts per round: the draft acceptance rate, tokens per verify pass, and the wall-time speed-up
of speculative over plain decoding (mlx-lm's `generate_step`) on the same held-out questions,
one sequence at a time, greedy (checked identical) and at temperature 1. The last column is
the speed-up the acceptance implies where decoding is memory-bound (a Mac): a full pass costs
one weight read whatever its k + 1 positions, a draft token l / L of one, so
S = ((1 - a^(k+1)) / (1 - a)) / (1 + k l / L) for per-token acceptance a.
"""

import argparse
import datetime
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from mlx_oisd import load
from mlx_oisd.data import load_examples
from mlx_oisd.data.prompts import PromptFormat
from mlx_oisd.generate import RunFormat
from mlx_oisd.speculative import DraftStats, speculative_generate_step
from mlx_oisd.study import STUDY_TASK

from .common import machine

ROOT = Path(__file__).resolve().parents[1]
SEED = 1234
NOTE = ("Cost models. Compute-bound (a CPU on a model whose matmuls dominate): a round runs "
        "the blocks on k l + l + (k + 1)(L - l) = (k + 1) L block-positions, the compute of "
        "k + 1 plain steps, plus k extra head products for the drafts, so it cannot beat plain "
        "decoding there (speed-up <= tokens per pass / (k + 1) <= 1). Memory-bound "
        "(single-sequence decoding on a Mac): a pass reads the weights once whatever its k + 1 "
        "positions and a draft token l / L of them, which gives the memory-bound column; that "
        "column is the one that predicts a Mac, and the CPU column understates it wherever the "
        "CPU is compute-bound. The study model (D = 64) is neither on this CPU: a step's cost is "
        "mostly per-operation dispatch and synchronisation, which, like weight reads, hardly "
        "grows with the k + 1 positions, so here the CPU column roughly tracks the memory-bound "
        "one (timings share 2 cores with other jobs: about +-20%).")


def plain(model, prompts, max_tokens, temp, stop):
    """(seconds, completions) of mlx-lm's decoding, one prompt at a time."""
    mx.random.seed(SEED)
    out, t0 = [], time.perf_counter()
    for ids in prompts:
        tokens = []
        for t, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens,
                                  sampler=make_sampler(temp)):
            tokens.append(t)
            if t in stop:
                break
        out.append(tokens)
    return time.perf_counter() - t0, out


def speculative(model, prompts, max_tokens, temp, stop, l, k):
    """(seconds, completions, stats) of speculative decoding, one prompt at a time."""
    mx.random.seed(SEED)
    stats, out, t0 = DraftStats(), [], time.perf_counter()
    for ids in prompts:
        out.append([t for t, _ in speculative_generate_step(
            model, ids, l, k, max_tokens, temp, stop_ids=stop, stats=stats)])
    return time.perf_counter() - t0, out, stats


def implied(a: float | None, k: int, l: int, L: int) -> float | None:
    """Memory-bound speed-up of per-token acceptance a: expected tokens per full pass
    (1 - a^(k+1)) / (1 - a) over the cost of a round, one pass plus k drafts of l / L."""
    if a is None:
        return None
    tokens = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
    return tokens / (1 + k * l / L)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.speculative",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:study-arith", help="base model")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "study",
                   help="folder of the study's runs (grpo-s0, oisd-s0)")
    p.add_argument("--variants", default="base,grpo,oisd", help="comma list: base and run names")
    p.add_argument("--seed", type=int, default=0, help="the study seed of the runs")
    p.add_argument("--layers", default=None, help="comma list of draft layers (default 1..L-1)")
    p.add_argument("--ks", default="2,4,8", help="comma list of draft tokens per round")
    p.add_argument("--temps", default="0,1", help="comma list of temperatures")
    p.add_argument("--prompts", type=int, default=20, help="held-out questions")
    p.add_argument("--max-tokens", type=int, default=24, help="completion length limit")
    p.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="file --write appends to")
    args = p.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    temps = [float(t) for t in args.temps.split(",")]
    questions = [ex.prompt for ex in load_examples(STUDY_TASK, "test")[:args.prompts]]

    rows, t_start, shape = [], time.perf_counter(), ""
    for variant in args.variants.split(","):
        fmt, adapter = PromptFormat(), None
        if variant != "base":
            run = RunFormat.read(args.runs / f"{variant}-s{args.seed}")
            fmt, adapter = run.fmt, run.adapter_path
        model, tok = load(args.model, adapter_path=adapter)
        model.eval()
        L = len(model.layers)
        layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(1, L))
        prompts = [fmt.render(tok, q) for q in questions]
        stop = set(tok.eos_token_ids)
        shape = f"L = {L} blocks, D = {model.args.hidden_size}"
        for temp in temps:
            plain(model, prompts[:2], args.max_tokens, temp, stop)  # warm-up
            base_s, base_out = plain(model, prompts, args.max_tokens, temp, stop)
            base_tps = sum(map(len, base_out)) / base_s
            for l in layers:
                for k in ks:
                    speculative(model, prompts[:1], args.max_tokens, temp, stop, l, k)  # warm-up
                    s, out, st = speculative(model, prompts, args.max_tokens, temp, stop, l, k)
                    tps = sum(map(len, out)) / s
                    same = sum(a == b for a, b in zip(out, base_out)) if temp == 0 else None
                    a, a1 = st.acceptance, st.per_token
                    rows.append([variant, f"{temp:g}", l, k,
                                 f"{100 * a:.1f}" if a is not None else "-",
                                 f"{100 * a1:.1f}" if a1 is not None else "-",
                                 f"{st.tokens / st.passes:.2f}",
                                 f"{tps / base_tps:.2f}x",
                                 f"{implied(a1, k, l, L):.2f}x" if a1 is not None else "-",
                                 f"{same}/{len(prompts)}" if same is not None else "-"])
                    print("| " + " | ".join(map(str, rows[-1])) + " |", flush=True)
            rows.append([variant, f"{temp:g}", "plain", "-", "-", "-", "1.00", "1.00x", "1.00x",
                         f"{base_tps:.0f} tok/s"])  # the baseline of this (variant, temp)
            print("| " + " | ".join(map(str, rows[-1])) + " |", flush=True)

    header = ["variant", "T", "draft layer l", "k", "accept (%)", "a (%)", "tokens / pass",
              "CPU speed-up", "memory-bound S", "greedy identical"]
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join(map(str, r)) + " |" for r in rows])
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    text = (f"## Self-speculative decoding, {today}\n\n"
            f"machine: {machine()}\n\n"
            f"`python -m bench.speculative` ({time.perf_counter() - t_start:.0f} s): "
            f"`{args.model}` ({shape}) and the study's GRPO / OISD adapters "
            f"(configs/study.yaml, seed {args.seed}, student block 2), {len(questions)} held-out "
            f"questions, up to {args.max_tokens} tokens, one sequence at a time. accept = "
            "accepted / drafted tokens; a = per-token acceptance, accepted / (accepted + "
            "rejections), each draft kept with probability a once the earlier ones were; "
            "tokens / pass = tokens per verify pass; CPU speed-up = "
            "speculative over plain (mlx-lm `generate_step`) tokens/s, wall time; the plain "
            "row gives the baseline tokens/s. memory-bound S = ((1 - a^(k+1)) / (1 - a)) / "
            "(1 + k l / L) for the measured acceptance a.\n\n" + table + "\n\n" + NOTE + "\n")
    print("\n" + text)
    if args.write:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + text)
        print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
