"""`oisd-mlx plan`: the memory plan of a config (mlx_oisd.memory), without loading any weights."""

import json
from pathlib import Path

import typer


def plan_command(
    config: Path = typer.Argument(..., help="YAML recipe (see configs/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set batch_size=4 (YAML value)."),
    budget_gb: float = typer.Option(None, "--budget-gb",
                                    help="Plan for this much memory instead of this machine's."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON (sizes in GB)."),
):
    """Estimate a run's peak memory from config.json and the config, and the `auto` values.

    Examples:

      oisd-mlx plan configs/qwen3-0.6b-oisd.yaml

      oisd-mlx plan configs/qwen3-4b-oisd.yaml --set quantize.bits=4 --budget-gb 16 --json
    """
    from mlx_oisd.config import ConfigError, load_config
    from mlx_oisd.memory import plan_for

    try:
        plan = plan_for(load_config(config, set_), budget_gb=budget_gb)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(plan.to_json(), indent=2) if as_json else plan.summary())


def register(app):
    """Add this module's commands to `app`."""
    app.command("plan")(plan_command)
