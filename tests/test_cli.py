"""cli/main.py: the command's surface."""

from typer.testing import CliRunner

import mlx_oisd
from cli.main import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"oisd-mlx {mlx_oisd.__version__}"


def test_help_lists_examples():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "oisd-mlx train configs/demo.yaml" in result.output
