"""The `oisd-mlx` command: parses arguments, calls one mlx_oisd function, formats errors."""

from pathlib import Path

import typer

import mlx_oisd
from cli import eval_cmd, export_cmd, generate_cmd, plan_cmd
from cli.options import positional_or_flag, usage_error

app = typer.Typer(
    name="oisd-mlx",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # every command, as mlx-lm's
    rich_markup_mode=None,  # plain click help: flags show no value (rich shows `<bool>`)
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
    config: Path = typer.Argument(None, help="YAML recipe (see configs/).", show_default=False),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a key: --set oisd.tau=0.5 (YAML value)."),
    print_config: bool = typer.Option(False, "--print-config", metavar="", help="Print every "
                                      "config key (type, default, meaning) and exit."),
    resume: bool = typer.Option(False, "--resume", metavar="",
                                help="Continue from the last checkpoint in output_dir."),
    quiet: bool = typer.Option(False, "--quiet", metavar="",
                               help="No progress bar or step lines (banner, evals, warnings "
                               "and the summary still print)."),
):
    """Run GRPO + OISD training from a YAML config.

    Examples:

      oisd-mlx train configs/demo.yaml

      oisd-mlx train configs/qwen3-0.6b-oisd.yaml --set algorithm=grpo --set output_dir=runs/grpo

      oisd-mlx train configs/qwen3-0.6b-oisd.yaml --resume

      oisd-mlx train --print-config
    """
    if print_config:
        from mlx_oisd.config_reference import format_reference

        typer.echo(format_reference())
        raise typer.Exit()
    if config is None:
        usage_error("missing CONFIG: give a YAML recipe (see configs/), or --print-config")
    from mlx_oisd.checkpoint import CheckpointError
    from mlx_oisd.config import ConfigError, load_config
    from mlx_oisd.data.sources import DataError
    from mlx_oisd.distributed import PeerLost
    from mlx_oisd.io import DiskFullError
    from mlx_oisd.loading import ModelLoadError
    from mlx_oisd.rewards import RewardFailedError
    from mlx_oisd.runlock import RunLockedError
    from mlx_oisd.trainer import TrainingStopped
    from mlx_oisd.trainer import train as run_training

    try:
        cfg = load_config(config, set_)
        run = run_training(cfg, resume=resume, show_progress=not quiet)
    except (ConfigError, ModelLoadError, DataError, CheckpointError, RunLockedError,
            DiskFullError, RewardFailedError) as e:
        _fail(e)
    except PeerLost as e:  # another rank died; this one's checkpoints are intact
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(3) from None
    except TrainingStopped as e:  # a signal or non-finite updates; the good state is saved
        typer.echo(str(e), err=True)
        raise typer.Exit(e.exit_code) from None
    from mlx_oisd.metrics import read_metrics, run_summary

    if not run.world.main:  # data-parallel: rank 0 reports
        return
    out = run.out_dir
    for key, v in run_summary(read_metrics(out / "metrics.jsonl")).items():
        typer.echo(f"{key:>20}: {v['first']:.4g} (step {v['first_step']}) -> "
                   f"{v['last']:.4g} (step {v['last_step']})")
    typer.echo(f"adapters: {out / 'adapters'}\nmetrics:  {out / 'metrics.jsonl'}\n"
               f"curves:   {out / 'curves.png'}")


@app.command()
def sft(
    model: str = typer.Argument(None, help="Base model: Hub id, local folder or builtin:tiny.",
                                show_default=False),
    data: Path = typer.Argument(None, help="mlx-lm data folder (train.jsonl, optional "
                                "valid.jsonl) or one .jsonl: chat, prompt/completion or text rows.",
                                show_default=False),
    model_flag: str = typer.Option(None, "--model", help="MODEL, mlx-lm style."),
    data_flag: Path = typer.Option(None, "--data", help="DATA, mlx-lm style."),
    out: Path = typer.Option(..., "--out", help="Output folder (adapters/ or a full model)."),
    iters: int = typer.Option(200, "--iters", help="Optimizer steps."),
    batch_size: int = typer.Option(16, "--batch-size"),
    learning_rate: float = typer.Option(1e-4, "--learning-rate"),
    lora_rank: int = typer.Option(16, "--lora-rank", help="0: full fine-tuning, writes a model folder."),
    lora_scale: float = typer.Option(20.0, "--lora-scale"),
    lora_layers: int = typer.Option(-1, "--lora-layers", help="Last N blocks get LoRA; -1: all."),
    lora_key: list[str] = typer.Option([], "--lora-key", help="Module to adapt, e.g. "
                                       "self_attn.q_proj (repeat; default: mlx-lm's)."),
    max_seq_length: int = typer.Option(2048, "--max-seq-length"),
    seed: int = typer.Option(0, "--seed"),
    steps_per_eval: int = typer.Option(200, "--steps-per-eval", help="Validation loss every N "
                                       "iterations (and before and after); 0: before and after."),
    val_batches: int = typer.Option(25, "--val-batches", help="Validation batches; -1: all."),
    system: str = typer.Option(None, "--system", help="System turn before each prompt "
                               "(prompt/completion rows), like dataset.system_prompt."),
    instruction: str = typer.Option(None, "--instruction", help="Text appended to each prompt "
                                    "(prompt/completion rows); 'math': the RL default instruction."),
):
    """Supervised warm-up before RL, on mlx-lm's data formats: loss on the last assistant turn
    (chat), on the completion (prompt/completion) or on every token (text).

    Writes OUT/adapters (an mlx-lm adapter folder; start RL from it with init_adapter) and
    OUT/config.yaml, or with --lora-rank 0 a full model folder OUT.

    Examples:

      oisd-mlx sft Qwen/Qwen3-0.6B data/ --out runs/sft --iters 500

      oisd-mlx sft builtin:tiny chats.jsonl --out runs/tiny-sft --lora-rank 0 --learning-rate 3e-3

      oisd-mlx sft Qwen/Qwen3-0.6B pairs.jsonl --out runs/sft --instruction math
    """
    from mlx_oisd.loading import ModelLoadError
    from mlx_oisd.sft import INSTRUCTIONS, SftDataError, read_sft_data
    from mlx_oisd.sft import sft as run_sft

    if model_flag is not None and model is not None and data is None and data_flag is None:
        model, data = None, Path(model)  # `sft --model M DATA`: the one positional is DATA
    model = positional_or_flag(model, model_flag, "--model", "MODEL")
    data = positional_or_flag(data, data_flag, "--data", "DATA")
    lora = None if lora_rank == 0 else {"rank": lora_rank, "scale": lora_scale, "dropout": 0.0,
                                        **({"keys": lora_key} if lora_key else {})}
    try:
        path = run_sft(model, read_sft_data(data), out, iters, batch_size, learning_rate, lora,
                       lora_layers, max_seq_length=max_seq_length, seed=seed,
                       steps_per_eval=steps_per_eval, val_batches=val_batches,
                       system_prompt=system, instruction=INSTRUCTIONS.get(instruction, instruction))
    except (SftDataError, ModelLoadError) as e:  # LoRA settings named as their flags
        _fail(ValueError(str(e).replace("lora.num_layers", "--lora-layers")
                         .replace("lora.keys", "--lora-key")))
    typer.echo(f"wrote {path}")


@app.command()
def plot(
    runs: list[Path] = typer.Argument(..., help="Run folders or their metrics.jsonl files."),
    out: Path = typer.Option(Path("curves.png"), "--out", help="PNG to write."),
    label: list[str] = typer.Option([], "--label", help="Legend label per run (default: run folder)."),
    smooth: float = typer.Option(
        0.0, "--smooth", help="EMA factor in [0, 1), e.g. 0.9: raw points faint, smoothed line "
        "solid (eval_accuracy is never smoothed)."),
):
    """Plot training curves (reward, accuracy, JS terms, length, KL, entropy) of one or more runs.

    One colour per run in every panel; panels that are zero in every run are left out.

    Examples:

      oisd-mlx plot runs/demo --out demo.png

      oisd-mlx plot runs/grpo runs/oisd --smooth 0.9 --out grpo-vs-oisd.png
    """
    from mlx_oisd.plot import plot_metrics

    if label and len(label) != len(runs):
        _fail(ValueError(f"{len(label)} --label for {len(runs)} runs"))
    if not 0.0 <= smooth < 1.0:
        _fail(ValueError(f"--smooth {smooth}: expected an EMA factor in [0, 1), e.g. 0.9"))
    try:
        typer.echo(plot_metrics(runs, out, labels=label or None, smooth=smooth))
    except (FileNotFoundError, ValueError) as e:
        _fail(e)


eval_cmd.register(app)
plan_cmd.register(app)
export_cmd.register(app)
generate_cmd.register(app)

if __name__ == "__main__":
    app()
