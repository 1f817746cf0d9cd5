"""Shared fixtures: tiny random float32 Qwen3 models built on the fly (no network, no downloads)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"


def batch_generate(model, prompts, max_tokens, stop_ids):
    """mlx-lm's BatchGenerator used directly, each prompt inserted in full: the reference that
    our rollouts and our model are compared against."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=[[t] for t in stop_ids])
    uids = gen.insert(prompts)
    out = {u: [] for u in uids}
    while responses := gen.next_generated():
        for r in responses:
            out[r.uid].append(r.token)
    gen.close()
    return [out[u] for u in uids]


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
