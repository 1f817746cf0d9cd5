"""mlx-oisd: On-Policy Internal Self-Distillation (OISD) on top of GRPO, for Qwen3, in MLX."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mlx-oisd")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+src"

__all__ = ["load", "__version__"]


def __getattr__(name):
    # `load` pulls in MLX and mlx-lm; importing it lazily keeps light entry points (the math
    # checker's worker process, `oisd-mlx --help`) from paying for them.
    if name == "load":
        from .loading import load

        return load
    raise AttributeError(f"module 'mlx_oisd' has no attribute {name!r}")
