"""The `oisd-mlx` command: parses arguments, calls one mlx_oisd function, formats errors."""

from pathlib import Path

import typer

import mlx_oisd

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
    from mlx_oisd.config import ConfigError, load_config
    from mlx_oisd.data.sources import DataError
    from mlx_oisd.loading import ModelLoadError
    from mlx_oisd.trainer import train as run_training

    try:
        cfg = load_config(config, set_)
        run = run_training(cfg, resume=resume, show_progress=not quiet)
    except (ConfigError, ModelLoadError, DataError) as e:
        _fail(e)
    typer.echo(f"done: {run.out_dir}\n  adapters: {run.out_dir / 'adapters'}\n"
               f"  metrics:  {run.out_dir / 'metrics.jsonl'}")


if __name__ == "__main__":
    app()
