"""Shared fixtures: tiny random float32 Qwen3 models built on the fly (no network, no downloads)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"


@pytest.fixture(scope="session")
def make_tiny(tmp_path_factory):
    """make_tiny(**TinySpec fields) -> folder of a tiny random Qwen3 (cached per spec)."""
    from mlx_oisd.tiny import TinySpec, build_tiny_model

    built = {}

    def make(**fields):
        spec = TinySpec(**fields)
        if spec not in built:
            built[spec] = build_tiny_model(tmp_path_factory.mktemp("tiny"), spec)
        return built[spec]

    return make


@pytest.fixture(scope="session")
def tiny_dir(make_tiny):
    """The default tiny model: 4 blocks, D=64, 4 query / 2 kv heads, tied head, V=261."""
    return make_tiny()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Built-in models go to a per-test cache, never the user's."""
    monkeypatch.setenv("MLX_OISD_CACHE", str(tmp_path / "cache"))
