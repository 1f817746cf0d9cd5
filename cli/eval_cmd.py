"""`oisd-mlx eval` (Avg@k / Pass@k on benchmarks) and `oisd-mlx lens` (logit lens per block)."""

from pathlib import Path

import typer

from cli.options import positional_or_flag, usage_error


def _fail(e: Exception):
    usage_error(str(e))


def prompt_format(system_prompt: str | None, instruction: str | None, enable_thinking: bool):
    """The PromptFormat of --system-prompt / --instruction ('none': no instruction; unset: the
    training default) / --enable-thinking."""
    from mlx_oisd.data.prompts import MATH_INSTRUCTION, PromptFormat

    if instruction is None:
        instruction = MATH_INSTRUCTION
    elif instruction.lower() in ("none", "null", ""):
        instruction = None
    return PromptFormat(system_prompt, instruction, enable_thinking)


def load_data_option(spec: str, split: str, prompt_field: str | None, answer_field: str | None,
                     limit: int | None):
    """(column name, examples) of one `--data SOURCE[:PROMPT_FIELD[:ANSWER_FIELD]]`; a missing
    field's error says which --data to pass."""
    from mlx_oisd.data.sources import (
        BUILTIN_PREFIX,
        is_file_source,
        load_examples,
        parse_source_spec,
    )

    source, own_prompt, own_answer = parse_source_spec(spec)
    shown = source.replace("{", "{{").replace("}", "}}")
    hints = (f"pass --data {shown}:{{field}}", f"pass --data {shown}:{{prompt}}:{{field}}")
    examples = load_examples(source, split, None, own_prompt or prompt_field,
                             own_answer or answer_field, limit, field_hints=hints)
    if source.startswith(BUILTIN_PREFIX):
        name = f"{source[len(BUILTIN_PREFIX):].partition('?')[0]}-{split}"
    elif is_file_source(source):
        name = Path(source).stem
    else:  # a Hub id
        name = f"{source.rsplit('/', 1)[-1]}-{split}"
    return name, examples


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
    model: str = typer.Argument(None, help="Base model: Hub id, local folder or builtin:tiny.",
                                show_default=False),
    model_flag: str = typer.Option(None, "--model", help="The base model, mlx-lm style."),
    adapter: Path = typer.Option(None, "--adapter", "--adapter-path",
                                 help="mlx-lm adapter folder (a run's adapters/)."),
    benchmark: list[str] = typer.Option(
        [], "--benchmark", "-b", help="math500 | aime24 | aime25 | amc23 | gsm8k (repeatable)."),
    benchmark_dir: Path = typer.Option(
        None, "--benchmark-dir", help="Read NAME.jsonl from this folder instead of the Hub."),
    data: list[str] = typer.Option(
        [], "--data", help="SOURCE[:PROMPT_FIELD[:ANSWER_FIELD]] (repeatable): a local "
        ".jsonl/.json/.parquet file (named by its stem), a builtin: task or a Hub dataset id; "
        "fields not given are detected (question, problem, prompt, ...; answer, ..., solution)."),
    split: str = typer.Option("test", "--split", help="Split of builtin: and Hub --data sources."),
    prompt_field: str = typer.Option(
        None, "--prompt-field", help="Question field of every --data without its own."),
    answer_field: str = typer.Option(
        None, "--answer-field", help="Answer field of every --data without its own."),
    k: int = typer.Option(8, "-k", "--k", help="Samples per problem (n of Avg@n and Pass@k)."),
    pass_k: str = typer.Option("1", "--pass-k", help="Comma-separated k for Pass@k (each <= -k)."),
    temperature: float = typer.Option(0.6, "--temperature", "--temp"),
    top_p: float = typer.Option(0.95, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k likeliest tokens; 0: off."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top "
                                "probability; 0: off."),
    max_tokens: int = typer.Option(4096, "--max-tokens", help="Completion length limit."),
    limit: int = typer.Option(None, "--limit", help="Only the first N problems of each benchmark."),
    layer: int = typer.Option(None, "--layer", help="Also score block L's greedy logit-lens policy."),
    draft_layer: str = typer.Option(
        None, "--draft-layer", help="Sample by self-speculative decoding drafted by block L's "
        "logit lens (same distribution, one sequence at a time; 'auto': the OISD run's student "
        "layer)."),
    draft_tokens: int = typer.Option(4, "--draft-tokens", help="Draft tokens per verify pass "
                                     "(with --draft-layer)."),
    enable_thinking: bool = typer.Option(False, "--enable-thinking", help="Let Qwen3 reason."),
    system_prompt: str = typer.Option(None, "--system-prompt"),
    instruction: str = typer.Option(
        None, "--instruction", help="Text after each question (default: the math instruction "
        "training uses; 'none' for none)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Sequences decoding together."),
    reward_timeout: float = typer.Option(10.0, "--reward-timeout", help="Seconds per answer check."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(None, "--out", help="Write the results as JSON."),
    save_samples: Path = typer.Option(
        None, "--save-samples", help="Write every sample (prompt, completion, answer, correct, "
        "...) as jsonl; `oisd-mlx lens --completions` reads it."),
):
    """Avg@k and unbiased Pass@k of a model (and adapter) on math benchmarks.

    Examples:

      oisd-mlx eval Qwen/Qwen3-0.6B --adapter runs/oisd/adapters -b math500 -b aime24 -k 8 --pass-k 1,4,8 --out oisd.json

      oisd-mlx eval Qwen/Qwen3-0.6B -b gsm8k --limit 200 -k 4 --layer 5

      oisd-mlx eval builtin:tiny-arith --data "builtin:arith?digits=1&terms=2&n=61&n_test=20" --split test -k 16 --max-tokens 8

      oisd-mlx eval Qwen/Qwen3-0.6B --data gsm8k_test.jsonl --data math500.jsonl:problem:answer -k 4

      oisd-mlx eval Qwen/Qwen3-0.6B -b math500 --limit 50 -k 4 --save-samples samples.jsonl

      oisd-mlx eval builtin:study-arith --adapter runs/study/oisd-s0/adapters --data "builtin:arith?digits=1&terms=3&n=600&n_test=100" -k 1 --max-tokens 24 --draft-layer auto
    """
    from cli.generate_cmd import parse_draft_layer
    from mlx_oisd.data.sources import DataError
    from mlx_oisd.evaluate import evaluate_benchmarks, format_results, load_benchmark
    from mlx_oisd.generate import draft_layer_of
    from mlx_oisd.io import write_json
    from mlx_oisd.loading import ModelLoadError, load
    from mlx_oisd.rewards import MathChecker
    from mlx_oisd.samples import write_samples
    from mlx_oisd.speculative import check_draft

    model = positional_or_flag(model, model_flag, "--model", "MODEL")
    ks = _parse_ks(pass_k)
    samples = [] if save_samples is not None else None
    fmt = prompt_format(system_prompt, instruction, enable_thinking)
    if not benchmark and not data:
        _fail(ValueError("nothing to evaluate: give --benchmark NAME and/or --data FILE"))
    if k < 1 or max_tokens < 1 or batch_size < 1 or (limit is not None and limit < 1):
        _fail(ValueError("-k, --max-tokens, --batch-size and --limit must be >= 1"))
    if top_k < 0 or not 0 <= min_p <= 1:
        _fail(ValueError(f"--top-k must be >= 0 (got {top_k}) and --min-p in [0, 1] "
                         f"(got {min_p})"))
    if [x for x in ks if x > k]:
        typer.echo(f"note: Pass@k for k > {k} skipped (needs at least k samples)", err=True)
    try:
        draft_layer = parse_draft_layer(draft_layer)
        if draft_layer is not None and draft_tokens < 1:
            raise ValueError(f"--draft-tokens {draft_tokens}: expected an integer >= 1")
        if draft_layer == "auto":
            draft_layer = draft_layer_of(adapter)
            typer.echo(f"draft layer {draft_layer} (the run's student layer)", err=True)
    except ValueError as e:
        _fail(e)
    try:
        sets = {name: load_benchmark(name, limit, benchmark_dir) for name in benchmark}
        for spec in data:
            name, examples = load_data_option(spec, split, prompt_field, answer_field, limit)
            sets[name if name not in sets else f"{name}-{len(sets) + 1}"] = examples
        net, tokenizer = load(model, adapter_path=adapter)
        if draft_layer is not None:
            check_draft(net, draft_layer, draft_tokens)
        with MathChecker(timeout_s=reward_timeout) as checker:
            results = evaluate_benchmarks(
                net, tokenizer, sets, k, ks, max_tokens, temperature, top_p, fmt, checker, layer,
                batch_size, seed,
                progress=lambda msg: typer.echo(msg, err=True), samples=samples,
                top_k=top_k, min_p=min_p, draft_layer=draft_layer, draft_tokens=draft_tokens)
    except (DataError, ModelLoadError, ValueError) as e:
        _fail(e)
    results["settings"] = {
        "model": model, "adapter": str(adapter) if adapter else None, "k": k, "pass_k": ks,
        "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
        "max_tokens": max_tokens, "limit": limit,
        "split": split,
        "layer": layer, "draft_layer": draft_layer,
        "draft_tokens": draft_tokens if draft_layer is not None else None,
        "enable_thinking": enable_thinking, "system_prompt": system_prompt,
        "instruction": fmt.instruction, "seed": seed,
    }
    typer.echo(format_results(results))
    if out is not None:
        typer.echo(f"wrote {write_json(out, results)}")
    if save_samples is not None:
        typer.echo(f"wrote {write_samples(save_samples, samples)} ({len(samples)} samples)")


def lens_command(
    model: str = typer.Argument(None, help="Base model: Hub id, local folder or builtin:tiny.",
                                show_default=False),
    model_flag: str = typer.Option(None, "--model", help="The base model, mlx-lm style."),
    adapter: list[str] = typer.Option(
        [], "--adapter", "--adapter-path",
        help="Adapter folder, or 'none' for the base model; repeat to compare."),
    label: list[str] = typer.Option([], "--label", help="Column name per --adapter."),
    prompt: str = typer.Option(None, "--prompt", help="A question; the model completes it greedily."),
    completions: Path = typer.Option(
        None, "--completions", help="jsonl rows {\"prompt\": question, \"completion\": text}: "
        "a run's completions.jsonl or an `eval --save-samples` file."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Greedy completion length (--prompt)."),
    enable_thinking: bool = typer.Option(False, "--enable-thinking"),
    system_prompt: str = typer.Option(None, "--system-prompt"),
    instruction: str = typer.Option(
        None, "--instruction", help="Text after each question (default: the math instruction; "
        "'none' for none)."),
    index: int = typer.Option(0, "--index", help="Sequence shown in the table and the PNG "
                              "(0 = the first row of --completions)."),
    start: int = typer.Option(0, "--start", help="First response position shown."),
    columns: int = typer.Option(
        None, "--columns", help="Positions shown (default: 10 in the table, 96 in the PNG)."),
    out_png: Path = typer.Option(
        None, "--out-png", help="Heatmap PNG, one panel per --adapter on a shared colour scale."),
    heatmap: str = typer.Option("final_prob", "--heatmap", help="final_prob | agree"),
    json_out: Path = typer.Option(None, "--json", help="Write the per-layer statistics as JSON."),
):
    """Logit lens of every block: top token per layer and agreement with the final layer.

    Sequence --index: a table (rows = blocks, columns = positions, * = same as the last block).

    --out-png: a heatmap of it, one panel per --adapter.

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

    model = positional_or_flag(model, model_flag, "--model", "MODEL")
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
        if not 0 <= index < len(prompts):
            raise ValueError(f"--index {index}: expected 0..{len(prompts) - 1} "
                             f"({len(prompts)} sequence{'s' if len(prompts) != 1 else ''})")
        runs, tokenizer = compare_lens(model, adapters, labels, prompts, texts,
                                       max_tokens=max_tokens,
                                       fmt=prompt_format(system_prompt, instruction,
                                                         enable_thinking))
        for run in runs:
            typer.echo(format_lens_table(run, tokenizer, index=index, start=start,
                                         columns=columns or 10) + "\n")
        if out_png is not None:
            png = plot_lens_heatmap(runs, tokenizer, out_png, index, heatmap, start, columns or 96)
            typer.echo(f"wrote {png}")
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
