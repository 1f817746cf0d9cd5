"""The `oisd-mlx` command: parses arguments, calls one mlx_oisd function, formats errors."""

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


if __name__ == "__main__":
    app()
