"""Commands registered on the `oisd-mlx` app (see cli/main.py)."""


def register(app):
    """Add this module's commands to `app`."""
