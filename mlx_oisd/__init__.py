"""mlx-oisd: On-Policy Internal Self-Distillation (OISD) on top of GRPO, for Qwen3, in MLX."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mlx-oisd")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+src"

from .loading import load  # noqa: E402

__all__ = ["load", "__version__"]
