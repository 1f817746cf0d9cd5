"""The `oisd-mlx` command: parses arguments, calls one mlx_oisd function, formats errors."""

from pathlib import Path

import typer

import mlx_oisd
from cli import eval_cmd, export_cmd, plan_cmd

app = typer.Typer(
    name="oisd-mlx",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        typer.echo(f"oisd-mlx {mlx_oisd.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
):
    """GRPO + OISD post-training of Qwen3 models on Apple silicon (and Linux CPU/CUDA).

    Examples:

      oisd-mlx train configs/demo.yaml

      oisd-mlx train configs/qwen3-0.6b-oisd.yaml --set oisd.tau=0.5 --set max_steps=50
    """


def _fail(e: Exception):
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML recipe (see configs/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set oisd.tau=0.5 (YAML value)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in output_dir."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
):
    """Run GRPO + OISD training from a YAML config.

    Examples:

      oisd-mlx train configs/demo.yaml

      oisd-mlx train configs/qwen3-0.6b-oisd.yaml --set algorithm=grpo --set output_dir=runs/grpo

      oisd-mlx train configs/qwen3-0.6b-oisd.yaml --resume
    """
    from mlx_oisd.checkpoint import CheckpointError
    from mlx_oisd.config import ConfigError, load_config
    from mlx_oisd.data.sources import DataError
    from mlx_oisd.io import DiskFullError
    from mlx_oisd.loading import ModelLoadError
    from mlx_oisd.runlock import RunLockedError
    from mlx_oisd.trainer import TrainingStopped
    from mlx_oisd.trainer import train as run_training

    try:
        cfg = load_config(config, set_)
        run = run_training(cfg, resume=resume, show_progress=not quiet)
    except (ConfigError, ModelLoadError, DataError, CheckpointError, RunLockedError,
            DiskFullError) as e:
        _fail(e)
    except TrainingStopped as e:  # a signal or non-finite updates; the good state is saved
        typer.echo(str(e), err=True)
        raise typer.Exit(e.exit_code) from None
    from mlx_oisd.metrics import read_metrics, run_summary

    out = run.out_dir
    for key, v in run_summary(read_metrics(out / "metrics.jsonl")).items():
        typer.echo(f"{key:>20}: {v['first']:.4g} (step {v['first_step']}) -> "
                   f"{v['last']:.4g} (step {v['last_step']})")
    typer.echo(f"adapters: {out / 'adapters'}\nmetrics:  {out / 'metrics.jsonl'}\n"
               f"curves:   {out / 'curves.png'}")


@app.command()
def sft(
    model: str = typer.Argument(..., help="Base model: Hub id, local folder or builtin:tiny."),
    data: Path = typer.Argument(..., help="mlx-lm chat jsonl: {\"messages\": [...]} per line."),
    out: Path = typer.Option(..., "--out", help="Output folder (adapters/ or a full model)."),
    iters: int = typer.Option(200, "--iters", help="Optimizer steps."),
    batch_size: int = typer.Option(16, "--batch-size"),
    learning_rate: float = typer.Option(1e-4, "--learning-rate"),
    lora_rank: int = typer.Option(16, "--lora-rank", help="0: full fine-tuning, writes a model folder."),
    lora_scale: float = typer.Option(20.0, "--lora-scale"),
    max_seq_length: int = typer.Option(2048, "--max-seq-length"),
    seed: int = typer.Option(0, "--seed"),
):
    """Supervised warm-up on chat data (loss on the last assistant turn), before RL.

    Examples:

      oisd-mlx sft Qwen/Qwen3-0.6B chats.jsonl --out runs/sft --iters 500

      oisd-mlx sft builtin:tiny chats.jsonl --out runs/tiny-sft --lora-rank 0 --learning-rate 3e-3
    """
    from mlx_oisd.loading import ModelLoadError
    from mlx_oisd.sft import SftDataError, read_chat_jsonl
    from mlx_oisd.sft import sft as run_sft

    lora = None if lora_rank == 0 else {"rank": lora_rank, "scale": lora_scale, "dropout": 0.0}
    try:
        path = run_sft(model, read_chat_jsonl(data), out, iters, batch_size, learning_rate, lora,
                       max_seq_length=max_seq_length, seed=seed)
    except (SftDataError, ModelLoadError) as e:
        _fail(e)
    typer.echo(f"wrote {path}")


@app.command()
def plot(
    metrics: list[Path] = typer.Argument(..., help="metrics.jsonl files (one line each)."),
    out: Path = typer.Option(Path("curves.png"), "--out", help="PNG to write."),
    label: list[str] = typer.Option([], "--label", help="Legend label per file (default: run folder)."),
):
    """Plot training curves (reward, JS terms, length, KL, entropy) of one or more runs.

    Examples:

      oisd-mlx plot runs/demo/metrics.jsonl --out demo.png

      oisd-mlx plot runs/grpo/metrics.jsonl runs/oisd/metrics.jsonl --label grpo --label oisd
    """
    from mlx_oisd.plot import plot_metrics

    missing = [str(p) for p in metrics if not p.is_file()]
    if missing:
        _fail(FileNotFoundError(f"no such metrics file: {', '.join(missing)}"))
    if label and len(label) != len(metrics):
        _fail(ValueError(f"{len(label)} --label for {len(metrics)} files"))
    try:
        typer.echo(plot_metrics(metrics, out, labels=label or None))
    except ValueError as e:
        _fail(e)


eval_cmd.register(app)
plan_cmd.register(app)
export_cmd.register(app)

if __name__ == "__main__":
    app()
