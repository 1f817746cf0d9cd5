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


def _http_lib():
    """The HTTP library huggingface_hub speaks through (httpx2 or httpx, by its version)."""
    import importlib

    from huggingface_hub.errors import HfHubHTTPError

    base = next(c for c in HfHubHTTPError.__mro__ if c.__name__ == "HTTPError")
    return importlib.import_module(base.__module__.split(".")[0])


def hub_error(kind: str, url: str = "https://huggingface.co/api/x/o/r"):
    """A Hub client error as huggingface_hub raises it: connect, 404, 401, gated (403)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    http = _http_lib()
    if kind == "connect":
        return http.ConnectError("[Errno -2] Name or service not known")
    status = {"404": 404, "401": 401, "gated": 403}[kind]
    cls = GatedRepoError if kind == "gated" else RepositoryNotFoundError
    return cls(f"{status} Client Error", response=http.Response(status, request=http.Request(
        "GET", url)))


@pytest.fixture
def hub_down(monkeypatch, tmp_path):
    """huggingface_hub with offline mode off, an empty Hub cache under tmp_path and every HfApi
    request counted: `hub_down(error)` makes each request raise `error`; returns the calls."""
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    calls = []

    def install(error):
        def request(name):
            def call(self, *args, **kwargs):
                calls.append(name)
                raise error
            return call

        for name in ("dataset_info", "repo_info", "model_info", "list_repo_files",
                     "list_repo_tree"):
            monkeypatch.setattr(HfApi, name, request(name))
        return calls

    return install
