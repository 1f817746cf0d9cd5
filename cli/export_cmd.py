"""`oisd-mlx export`: a trained adapter folder as PEFT, a fused model or mlx-lm, optionally pushed."""

from enum import StrEnum
from pathlib import Path

import typer

from cli.options import positional_or_flag, usage_error


class ExportFormat(StrEnum):
    peft = "peft"
    fused = "fused"
    mlx = "mlx"


def export(
    adapter_dir: Path = typer.Argument(None, help="mlx-lm adapter folder, e.g. runs/X/adapters.",
                                       show_default=False),
    adapter_path: Path = typer.Option(None, "--adapter-path", help="ADAPTER_DIR, mlx-lm style."),
    fmt: ExportFormat = typer.Option(..., "--format", help="peft: Hugging Face PEFT LoRA adapter; "
                                     "fused: base + adapters merged, HF safetensors, unquantized "
                                     "(a QLoRA run: its quantized base, dequantized); "
                                     "mlx: the mlx-lm adapter folder."),
    out: Path = typer.Option(..., "--out", help="Folder to write (created if needed)."),
    base: str = typer.Option(None, "--base", help="Base model (Hub id or folder); default: "
                             "`model` in the run's config.yaml next to the adapters."),
    push_to_hub: str = typer.Option(None, "--push-to-hub", help="Upload the folder to this Hub "
                                    "repo (owner/name), created if needed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out "
                                   "(never a run's adapters/ or checkpoints/)."),
    evals: list[Path] = typer.Option([], "--eval", help="Results JSON of `oisd-mlx eval --out "
                                     "FILE` for the model card's table (repeatable); the run "
                                     "folder's eval.json is added when present."),
):
    """Export trained adapters as a PEFT adapter, a fused model or an mlx-lm adapter folder.

    Writes a README.md model card in every format: named after the run, with the base model,
    the checkpoint step, the prompt format (instruction, system prompt, enable_thinking), code
    that loads it, the OISD settings and the eval results. The adapters are checked against the
    base's config.json before anything is written.

    Examples:

      oisd-mlx export runs/qwen3-0.6b-oisd/adapters --format peft --out exports/peft

      oisd-mlx export runs/qwen3-0.6b-oisd/adapters --format fused --out exports/fused

      oisd-mlx export runs/qwen3-0.6b-oisd/checkpoints/step_000040 --format peft --out exports/step40 --eval eval-step40.json

      oisd-mlx export runs/demo/adapters --format mlx --out exports/mlx --base builtin:tiny

      oisd-mlx export runs/qwen3-0.6b-oisd/adapters --format peft --out exports/peft --push-to-hub me/qwen3-0.6b-oisd
    """
    from mlx_oisd.export import ExportError
    from mlx_oisd.export import export as run_export
    from mlx_oisd.io import DiskFullError
    from mlx_oisd.loading import ModelLoadError

    adapter_dir = positional_or_flag(adapter_dir, adapter_path, "--adapter-path", "ADAPTER_DIR")

    try:
        path = run_export(adapter_dir, fmt.value, out, base=base, push_to_hub_repo=push_to_hub,
                          overwrite=overwrite, evals=evals)
    except (ExportError, ModelLoadError, DiskFullError) as e:
        usage_error(str(e))
    typer.echo(f"wrote {path}")
    if push_to_hub:
        typer.echo(f"pushed to https://huggingface.co/{push_to_hub}")


def register(app):
    """Add this module's commands to `app`."""
    app.command("export")(export)
