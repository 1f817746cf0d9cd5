"""`oisd-mlx generate` and `oisd-mlx chat`: a trained adapter, prompted as in training."""

import contextlib
import dataclasses
import sys
from pathlib import Path

import typer

from cli.options import usage_error

HELP = {"help_option_names": ["-h", "--help"]}
DEFAULT_MAX_TOKENS = 512  # without --run; with it, the run's max_completion_length


def _no_text(value: str) -> bool:
    return value.strip().lower() in ("none", "null", "")


def parse_draft_layer(value: str | None) -> int | str | None:
    """--draft-layer: None, 'auto' or a block number (ValueError naming the flag otherwise)."""
    if value is None:
        return None
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--draft-layer {value!r}: expected a block number or 'auto'") from None


def _setup(model, adapter_path, run, system, instruction, enable_thinking, max_tokens, seed,
           draft_layer=None, draft_tokens=4):
    """Resolve the flags over the run's values, load the model; returns (model, tokenizer,
    format, max_tokens, draft settings for `generate_text`). Exits with `error: ...` on a bad
    run folder, model or draft flag."""
    from mlx_oisd.data.prompts import PromptFormat
    from mlx_oisd.generate import RunFolderError, RunFormat, draft_layer_of, load_for_generation
    from mlx_oisd.loading import ModelLoadError
    from mlx_oisd.speculative import check_draft

    try:
        found = RunFormat.read(run) if run is not None else None
        if model is None and found is None:
            raise ValueError("no model: give --model MODEL or --run RUN_FOLDER")
        fmt = found.fmt if found else PromptFormat()
        changes = {}
        if system is not None:
            changes["system_prompt"] = None if _no_text(system) else system
        if instruction is not None:
            changes["instruction"] = None if _no_text(instruction) else instruction
        if enable_thinking is not None:
            changes["enable_thinking"] = enable_thinking
        fmt = dataclasses.replace(fmt, **changes)
        if max_tokens is None:
            max_tokens = (found and found.max_tokens) or DEFAULT_MAX_TOKENS
        if max_tokens < 1:
            raise ValueError(f"--max-tokens {max_tokens}: expected an integer >= 1")
        draft_layer = parse_draft_layer(draft_layer)
        if draft_layer is not None and draft_tokens < 1:
            raise ValueError(f"--draft-tokens {draft_tokens}: expected an integer >= 1")
        from_run = found is not None and model is None and adapter_path is None
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the answer
            net, tokenizer = load_for_generation(
                model or found.model,
                adapter_path if adapter_path is not None else (found and found.adapter_path),
                found.quantize if from_run else None)  # the QLoRA base the adapters trained on
        if fmt.instruction is not None:
            source = ("--instruction" if instruction is not None
                      else f"{Path(run) / 'config.yaml'}" if found else "the training default")
            typer.echo(f"instruction ({source}; --instruction none for none): "
                       f"{fmt.instruction!r}", err=True)
        draft = {}
        if draft_layer is not None:
            if draft_layer == "auto":
                draft_layer = draft_layer_of(
                    adapter_path if adapter_path is not None else (found and found.adapter_path))
                typer.echo(f"draft layer {draft_layer} (the run's student layer)", err=True)
            check_draft(net, draft_layer, draft_tokens)
            draft = {"draft_layer": draft_layer, "draft_tokens": draft_tokens}
    except (RunFolderError, ModelLoadError, ValueError) as e:
        usage_error(str(e))
    if seed is not None:
        import mlx.core as mx

        mx.random.seed(seed)
    return net, tokenizer, fmt, max_tokens, draft


@contextlib.contextmanager
def _interruptible():
    """Ctrl-C ends the command quietly (exit 130) instead of with a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        typer.echo("", err=True)
        raise typer.Exit(130) from None


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


MODEL = typer.Option(None, "--model", help="Base model: Hub id, local folder or builtin:tiny "
                     "(default: the run's).")
ADAPTER = typer.Option(None, "--adapter-path", help="mlx-lm adapter folder (default: the run's "
                       "adapters/).")
RUN = typer.Option(None, "--run", help="A training run's output_dir (or a checkpoints/step_N): "
                   "model, adapters and prompt format from its config.yaml; flags override them.")
TEMP = typer.Option(0.0, "--temp", help="Sampling temperature (0: greedy).")
TOP_P = typer.Option(1.0, "--top-p", help="Sampling top-p.")
MAX_TOKENS = typer.Option(None, "--max-tokens", "-m", help="Tokens per answer (default: the "
                          f"run's max_completion_length, else {DEFAULT_MAX_TOKENS}).")
SYSTEM = typer.Option(None, "--system", "--system-prompt", help="System prompt ('none': none; "
                      "default: the run's).")
INSTRUCTION = typer.Option(None, "--instruction", help="Text after each user turn ('none': none; "
                           "default: the run's, else the math instruction training uses).")
THINKING = typer.Option(None, "--enable-thinking/--no-enable-thinking",
                        help="Let Qwen3 reason in <think> (default: the run's, else off).")
SEED = typer.Option(None, "--seed", help="Random seed for sampling.")
DRAFT_LAYER = typer.Option(None, "--draft-layer", help="Self-speculative decoding: block L's "
                           "logit lens drafts, the full model verifies (same output; 'auto': "
                           "the OISD run's student layer).")
DRAFT_TOKENS = typer.Option(4, "--draft-tokens", help="Draft tokens per verify pass (with "
                            "--draft-layer).")


def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user's text; '-' reads stdin."),
    model: str = MODEL, adapter_path: Path = ADAPTER, run: Path = RUN,
    temp: float = TEMP, top_p: float = TOP_P, max_tokens: int = MAX_TOKENS,
    system: str = SYSTEM, instruction: str = INSTRUCTION, enable_thinking: bool = THINKING,
    seed: int = SEED, draft_layer: str = DRAFT_LAYER, draft_tokens: int = DRAFT_TOKENS,
):
    """Answer one prompt, streaming the text to stdout; statistics go to stderr.

    Examples:

      oisd-mlx generate --run runs/qwen3-0.6b-oisd --prompt "What is 17 * 23?"

      oisd-mlx generate --model Qwen/Qwen3-0.6B --adapter-path runs/oisd/adapters --prompt "What is 2^10?" --temp 0.6 --top-p 0.95 --max-tokens 1024

      echo "What is 12 + 35?" | oisd-mlx generate --model builtin:tiny-arith --prompt - --instruction none

      oisd-mlx generate --run runs/study/oisd-s0 --prompt "What is 3 + 5 + 8?" --draft-layer auto --draft-tokens 4
    """
    from mlx_oisd.generate import build_prompt, stats_line, stream_answer

    if prompt == "-":
        prompt = sys.stdin.read().rstrip("\r\n")
    net, tokenizer, fmt, max_tokens, draft = _setup(
        model, adapter_path, run, system, instruction, enable_thinking, max_tokens, seed,
        draft_layer, draft_tokens)
    ids = build_prompt(tokenizer, fmt, [], prompt)
    with _interruptible():
        _, last = stream_answer(net, tokenizer, ids, _write, max_tokens=max_tokens, temp=temp,
                                top_p=top_p, **draft)
        _write("\n")
    if last is not None:
        typer.echo(stats_line(last), err=True)


def chat(
    model: str = MODEL, adapter_path: Path = ADAPTER, run: Path = RUN,
    temp: float = TEMP, top_p: float = TOP_P, max_tokens: int = MAX_TOKENS,
    system: str = SYSTEM, instruction: str = INSTRUCTION, enable_thinking: bool = THINKING,
    seed: int = SEED, draft_layer: str = DRAFT_LAYER, draft_tokens: int = DRAFT_TOKENS,
):
    """A multi-turn chat on stdin: one line per user turn; 'q' or end of input quits, 'r' or
    '/reset' clears the history. The instruction follows every user turn, as in training.

    Examples:

      oisd-mlx chat --run runs/qwen3-0.6b-oisd

      printf 'What is 3 + 4?\\nAnd times 5?\\n' | oisd-mlx chat --run runs/demo --max-tokens 64
    """
    from mlx_oisd.generate import chat as run_chat

    net, tokenizer, fmt, max_tokens, draft = _setup(
        model, adapter_path, run, system, instruction, enable_thinking, max_tokens, seed,
        draft_layer, draft_tokens)
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo("one line per turn; 'q' quits, 'r' clears the history", err=True)

    def lines():
        while True:
            if interactive:
                sys.stderr.write(">> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:
                return
            yield line

    with _interruptible():
        for _ in run_chat(net, tokenizer, fmt, lines(), _write, max_tokens=max_tokens, temp=temp,
                          top_p=top_p, **draft):
            pass


def register(app):
    """Add this module's commands to `app`."""
    app.command("generate", context_settings=HELP)(generate)
    app.command("chat", context_settings=HELP)(chat)
