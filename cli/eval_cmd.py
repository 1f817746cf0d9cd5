"""`oisd-mlx eval` (Avg@k / Pass@k on benchmarks) and `oisd-mlx lens` (logit lens per block)."""

from pathlib import Path

import typer


def _fail(e: Exception):
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


def prompt_format(system_prompt: str | None, instruction: str | None, enable_thinking: bool):
    """The PromptFormat of --system-prompt / --instruction ('none': no instruction; unset: the
    training default) / --enable-thinking."""
    from mlx_oisd.data.prompts import MATH_INSTRUCTION, PromptFormat

    if instruction is None:
        instruction = MATH_INSTRUCTION
    elif instruction.lower() in ("none", "null", ""):
        instruction = None
    return PromptFormat(system_prompt, instruction, enable_thinking)


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected comma-separated integers such as 1,4,8",
                                 param_hint="--pass-k") from None
    if not ks or min(ks) < 1:
        raise typer.BadParameter(f"{text!r}: expected integers >= 1", param_hint="--pass-k")
    return ks


def eval_command(
    model: str = typer.Argument(..., help="Base model: Hub id, local folder or builtin:tiny."),
    adapter: Path = typer.Option(None, "--adapter", help="mlx-lm adapter folder (a run's adapters/)."),
    benchmark: list[str] = typer.Option(
        [], "--benchmark", "-b", help="math500 | aime24 | aime25 | amc23 | gsm8k (repeatable)."),
    benchmark_dir: Path = typer.Option(
        None, "--benchmark-dir", help="Read NAME.jsonl from this folder instead of the Hub."),
    data: list[Path] = typer.Option(
        [], "--data", help="Local .jsonl/.json/.parquet benchmark (repeatable), named by its stem."),
    prompt_field: str = typer.Option("question", "--prompt-field", help="Question field of --data."),
    answer_field: str = typer.Option("answer", "--answer-field", help="Answer field of --data."),
    k: int = typer.Option(8, "-k", "--k", help="Samples per problem (n of Avg@n and Pass@k)."),
    pass_k: str = typer.Option("1", "--pass-k", help="Comma-separated k for Pass@k (each <= -k)."),
    temperature: float = typer.Option(0.6, "--temperature"),
    top_p: float = typer.Option(0.95, "--top-p"),
    max_tokens: int = typer.Option(4096, "--max-tokens", help="Completion length limit."),
    limit: int = typer.Option(None, "--limit", help="Only the first N problems of each benchmark."),
    layer: int = typer.Option(None, "--layer", help="Also score block L's greedy logit-lens policy."),
    enable_thinking: bool = typer.Option(False, "--enable-thinking", help="Let Qwen3 reason."),
    system_prompt: str = typer.Option(None, "--system-prompt"),
    instruction: str = typer.Option(
        None, "--instruction", help="Text after each question (default: the math instruction "
        "training uses; 'none' for none)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Sequences decoding together."),
    reward_timeout: float = typer.Option(10.0, "--reward-timeout", help="Seconds per answer check."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(None, "--out", help="Write the results as JSON."),
):
    """Avg@k and unbiased Pass@k of a model (and adapter) on math benchmarks.

    Examples:

      oisd-mlx eval Qwen/Qwen3-0.6B --adapter runs/oisd/adapters -b math500 -b aime24 -k 8 --pass-k 1,4,8 --out oisd.json

      oisd-mlx eval Qwen/Qwen3-0.6B -b gsm8k --limit 200 -k 4 --layer 5

      oisd-mlx eval builtin:tiny-arith --data test.jsonl --prompt-field question -k 4 --max-tokens 16
    """
    from mlx_oisd.data.sources import DataError, load_examples
    from mlx_oisd.evaluate import evaluate_benchmarks, format_results, load_benchmark
    from mlx_oisd.io import write_json
    from mlx_oisd.loading import ModelLoadError, load
    from mlx_oisd.rewards import MathChecker

    ks = _parse_ks(pass_k)
    fmt = prompt_format(system_prompt, instruction, enable_thinking)
    if not benchmark and not data:
        _fail(ValueError("nothing to evaluate: give --benchmark NAME and/or --data FILE"))
    if k < 1 or max_tokens < 1 or batch_size < 1 or (limit is not None and limit < 1):
        _fail(ValueError("-k, --max-tokens, --batch-size and --limit must be >= 1"))
    if [x for x in ks if x > k]:
        typer.echo(f"note: Pass@k for k > {k} skipped (needs at least k samples)", err=True)
    try:
        sets = {name: load_benchmark(name, limit, benchmark_dir) for name in benchmark}
        for path in data:
            sets[path.stem] = load_examples(str(path), prompt_field=prompt_field,
                                            answer_field=answer_field, max_samples=limit)
        net, tokenizer = load(model, adapter_path=adapter)
        with MathChecker(timeout_s=reward_timeout) as checker:
            results = evaluate_benchmarks(
                net, tokenizer, sets, k, ks, max_tokens, temperature, top_p, fmt, checker, layer,
                batch_size, seed,
                progress=lambda msg: typer.echo(msg, err=True))
    except (DataError, ModelLoadError, ValueError) as e:
        _fail(e)
    results["settings"] = {
        "model": model, "adapter": str(adapter) if adapter else None, "k": k, "pass_k": ks,
        "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "limit": limit,
        "layer": layer, "enable_thinking": enable_thinking, "system_prompt": system_prompt,
        "instruction": fmt.instruction, "seed": seed,
    }
    typer.echo(format_results(results))
    if out is not None:
        typer.echo(f"wrote {write_json(out, results)}")


def lens_command(
    model: str = typer.Argument(..., help="Base model: Hub id, local folder or builtin:tiny."),
    adapter: list[str] = typer.Option(
        [], "--adapter", help="Adapter folder, or 'none' for the base model; repeat to compare."),
    label: list[str] = typer.Option([], "--label", help="Column name per --adapter."),
    prompt: str = typer.Option(None, "--prompt", help="A question; the model completes it greedily."),
    completions: Path = typer.Option(
        None, "--completions", help="jsonl rows {\"prompt\": question, \"completion\": text}."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Greedy completion length (--prompt)."),
    enable_thinking: bool = typer.Option(False, "--enable-thinking"),
    system_prompt: str = typer.Option(None, "--system-prompt"),
    instruction: str = typer.Option(
        None, "--instruction", help="Text after each question (default: the math instruction; "
        "'none' for none)."),
    start: int = typer.Option(0, "--start", help="First response position in the terminal table."),
    columns: int = typer.Option(10, "--columns", help="Positions in the terminal table."),
    out_png: Path = typer.Option(None, "--out-png", help="Heatmap PNG (one per --label)."),
    heatmap: str = typer.Option("final_prob", "--heatmap", help="final_prob | agree"),
    json_out: Path = typer.Option(None, "--json", help="Write the per-layer statistics as JSON."),
):
    """Logit lens of every block: top token per layer and agreement with the final layer.

    First sequence: a table (rows = blocks, columns = positions, * = same as the last block).

    All sequences: per-block agreement rate and mean lens entropy, one column pair per --adapter.

    Examples:

      oisd-mlx lens Qwen/Qwen3-0.6B --prompt "What is 17 * 23?" --out-png lens.png

      oisd-mlx lens Qwen/Qwen3-0.6B --adapter none --label base --adapter runs/oisd/adapters --label oisd --completions samples.jsonl --json lens.json
    """
    from mlx_oisd.data.sources import DataError
    from mlx_oisd.io import write_json
    from mlx_oisd.lens import (
        compare_lens,
        format_lens_table,
        format_stats_table,
        plot_lens_heatmap,
        read_completions,
    )
    from mlx_oisd.loading import ModelLoadError

    if (prompt is None) == (completions is None):
        _fail(ValueError("give exactly one of --prompt TEXT or --completions FILE.jsonl"))
    adapters = [None if a.lower() == "none" else a for a in adapter] or [None]
    if label and len(label) != len(adapters):
        _fail(ValueError(f"{len(label)} --label for {len(adapters)} --adapter"))
    labels = label or [(Path(a).parent.name or a) if a else "base" for a in adapters]
    if len(set(labels)) != len(labels):
        labels = [f"{i}-{name}" for i, name in enumerate(labels, start=1)]
    try:
        if prompt is not None:
            prompts, texts = [prompt], None
        else:
            rows = read_completions(completions)
            prompts, texts = [r["prompt"] for r in rows], [r["completion"] for r in rows]
        runs, tokenizer = compare_lens(model, adapters, labels, prompts, texts,
                                       max_tokens=max_tokens,
                                       fmt=prompt_format(system_prompt, instruction,
                                                         enable_thinking))
        for run in runs:
            typer.echo(format_lens_table(run, tokenizer, start=start, columns=columns) + "\n")
            if out_png is not None:
                path = out_png if len(runs) == 1 else out_png.with_name(
                    f"{out_png.stem}-{run.label}{out_png.suffix}")
                typer.echo(f"wrote {plot_lens_heatmap(run, tokenizer, path, value=heatmap)}")
    except (DataError, ModelLoadError, ValueError) as e:
        _fail(e)
    typer.echo(format_stats_table(runs))
    if json_out is not None:
        report = {"model": model, "runs": {r.label: {"adapter": a, **r.stats}
                                           for r, a in zip(runs, adapters)}}
        typer.echo(f"wrote {write_json(json_out, report)}")


def register(app):
    """Add this module's commands to `app`."""
    app.command("eval")(eval_command)
    app.command("lens")(lens_command)
