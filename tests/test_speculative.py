"""Self-speculative decoding (speculative.py): greedy output equals plain decoding (mlx-lm's
`generate_step`), sampled output has the plain sampler's distribution (chi-square against the
exact model distribution, with a wrong acceptance rule as negative control), every block's cache
equals plain decoding's after rollback, and the `--draft-layer / --draft-tokens` flags."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from typer.testing import CliRunner

from cli.main import app
from mlx_oisd.generate import draft_layer_of, generate_text
from mlx_oisd.loading import load
from mlx_oisd.lora import apply_lora, save_adapters
from mlx_oisd.models.qwen3 import Model, ModelArgs
from mlx_oisd.speculative import (
    DraftStats,
    accept_draft,
    check_draft,
    prefill,
    sampling_logprobs,
    speculative_generate_step,
    speculative_sample,
)

runner = CliRunner()
N = 24  # max tokens
LORA = {"rank": 4, "scale": 20.0, "dropout": 0.0}
TEXT = "What is 2 + 3? Let me think"


@pytest.fixture(scope="module")
def varied(make_tiny):
    """A tiny 4-block model whose random weights are large enough for varied greedy text."""
    return make_tiny(init_std=0.3)


@pytest.fixture(scope="module")
def adapter(varied, tmp_path_factory):
    """LoRA on the last 2 blocks with large random B: draft blocks 1..l differ from the base's
    for l >= 3, and the verifier's blocks always do."""
    model, _ = load(varied)
    apply_lora(model, 2, LORA)
    lora_b = [(n, p) for n, p in tree_flatten(model.trainable_parameters()) if n.endswith("lora_b")]
    keys = mx.random.split(mx.random.key(3), len(lora_b))
    model.load_weights([(n, 0.3 * mx.random.normal(p.shape, key=k))
                        for k, (n, p) in zip(keys, lora_b)], strict=False)
    return save_adapters(model, tmp_path_factory.mktemp("spec") / "adapters", 2, LORA)


def _plain(model, ids, max_tokens, stop=()):
    """mlx-lm's greedy `generate_step`, cut after the first stop token: the reference."""
    out = []
    for t, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens,
                              sampler=make_sampler(0.0)):
        out.append(t)
        if t in stop:
            break
    return out


def _speculative(model, ids, l, k, max_tokens, stop=(), **kw):
    stats, cache = DraftStats(), make_prompt_cache(model)
    out = [t for t, _ in speculative_generate_step(model, ids, l, k, max_tokens, stop_ids=stop,
                                                   prompt_cache=cache, stats=stats, **kw)]
    return out, stats, cache


def _assert_cache_is_plain(model, cache, tokens):
    """Every block's cache equals a plain full-model pass over `tokens` (offset, keys, values)."""
    ref = make_prompt_cache(model)
    model(mx.array(tokens)[None], cache=ref)
    for c, r in zip(cache, ref):
        assert c.offset == r.offset == len(tokens)
        for a, b in ((c.keys, r.keys), (c.values, r.values)):
            np.testing.assert_allclose(np.array(a[..., :c.offset, :]),
                                       np.array(b[..., :r.offset, :]), atol=1e-5)


@pytest.mark.parametrize("with_adapter", [False, True])
def test_greedy_equals_plain_decoding(varied, adapter, with_adapter):
    """For every draft layer and k (k = 40 exceeds every round's remaining tokens), the tokens
    are plain greedy decoding's, and the final cache is plain decoding's."""
    model, tok = load(varied, adapter_path=adapter if with_adapter else None)
    ids = tok.encode(TEXT)
    ref = _plain(model, ids, N)
    assert len(set(ref)) > 2  # varied text: the drafts get rejected now and then
    rates = []
    for l in (1, 2, 3):
        for k in (1, 4, 40):
            out, stats, cache = _speculative(model, ids, l, k, N)
            assert out == ref, (l, k)
            assert stats.tokens == N and stats.accepted + stats.rejected <= stats.drafted
            assert stats.tokens == stats.accepted + stats.passes  # every pass adds one token
            rates.append(stats.acceptance)
            _assert_cache_is_plain(model, cache, ids + out[:-1])
    assert min(rates) < 1.0  # rejections happened


def test_eos_inside_a_draft_and_max_tokens(varied):
    """A stop token met inside a draft ends the output there (and trims the cache to it);
    max_tokens 1 and 2 make rounds shorter than k."""
    model, tok = load(varied)
    ids = tok.encode(TEXT)
    ref = _plain(model, ids, N)
    stop = {ref[7]}
    expected = ref[:ref.index(ref[7]) + 1]
    for l, k in ((1, 8), (2, 8), (3, 5), (3, 1)):
        out, _, cache = _speculative(model, ids, l, k, N, stop)
        assert out == expected
        _assert_cache_is_plain(model, cache, ids + out[:-1])
    for m in (1, 2):
        out, stats, _ = _speculative(model, ids, 2, 4, m)
        assert out == ref[:m] and stats.drafted == m - 1


def test_generate_text_speculative_streams_the_same_text(varied, adapter):
    model, tok = load(varied, adapter_path=adapter)
    ids = tok.encode(TEXT)
    plain = list(generate_text(model, tok, ids, max_tokens=N))
    spec = list(generate_text(model, tok, ids, max_tokens=N, draft_layer=2, draft_tokens=3))
    assert "".join(r.text for r in spec) == "".join(r.text for r in plain)
    assert spec[-1].generation_tokens == plain[-1].generation_tokens
    assert spec[-1].finish_reason == plain[-1].finish_reason
    assert 0 <= spec[-1].accepted <= spec[-1].drafted


def test_sampled_rollback_leaves_the_plain_cache(varied):
    """Temperature 1, top_p 0.9: many rejections, and the cache still equals plain decoding's
    after the same tokens; between completions `speculative_sample` trims back to the prompt."""
    model, tok = load(varied)
    ids = tok.encode(TEXT)
    mx.random.seed(0)
    out, stats, cache = _speculative(model, ids, 2, 4, N, temp=1.0, top_p=0.9)
    assert len(out) == N and stats.accepted < stats.drafted
    _assert_cache_is_plain(model, cache, ids + out[:-1])
    mx.random.seed(1)
    stats = DraftStats()
    rollout = speculative_sample(model, [ids, ids[:3]], 2, 6, (), 1.0,
                                 draft_layer=1, draft_tokens=2, stats=stats)
    assert [len(c) for c in rollout.completions] == [6] * 4 and rollout.truncated == [True] * 4
    assert stats.tokens == 24 and stats.passes >= 24 // 3


# --- the sampled distribution ---------------------------------------------------------------------

V = 8  # vocabulary of the chi-square model: 64 cells for the first two tokens
PROMPT = [1, 5, 3, 7]


@pytest.fixture(scope="module")
def small():
    """A 2-block random Qwen3 with an 8-token vocabulary; block 1's lens and the final layer
    disagree (total variation ~0.3), so the acceptance rule matters."""
    mx.random.seed(0)
    args = ModelArgs(model_type="qwen3", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                     num_attention_heads=4, rms_norm_eps=1e-6, vocab_size=V, num_key_value_heads=2,
                     max_position_embeddings=64, head_dim=8, tie_word_embeddings=True,
                     rope_theta=10000.0)
    model = Model(args)
    model.eval()
    mx.eval(model.parameters())
    return model


def _exact_pairs(model, temp, top_p):
    """[V, V] the plain sampler's distribution of the first two tokens after PROMPT."""
    p1 = sampling_logprobs(model(mx.array(PROMPT)[None])[0, -1:], temp, top_p)[0]
    p2 = sampling_logprobs(model(mx.array([PROMPT + [t] for t in range(V)]))[:, -1], temp, top_p)
    return np.exp(np.array(p1))[:, None] * np.exp(np.array(p2))


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's chi-square test of counts against probs, cells expected < 5 pooled into one;
    the p-value by the Wilson-Hilferty approximation of the chi-square tail."""
    e, o = probs.ravel() * counts.sum(), counts.ravel()
    big = e >= 5
    stat, dof = float((((o - e) ** 2)[big] / e[big]).sum()), int(big.sum()) - 1
    if e[~big].sum() > 0:
        stat += (o[~big].sum() - e[~big].sum()) ** 2 / e[~big].sum()
        dof += 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _first_pairs(model, n, temp, top_p, accept=accept_draft, k=2):
    """Counts [V, V] of the first two tokens of n speculative samples (one prefill, the cache
    trimmed back to the prompt between samples)."""
    cache = make_prompt_cache(model)
    prefill(model, PROMPT[:-1], cache)
    counts = np.zeros((V, V))
    for _ in range(n):
        a, b, *_ = [t for t, _ in speculative_generate_step(
            model, PROMPT[-1:], 1, k, 3, temp, top_p, prompt_cache=cache, accept=accept)]
        counts[a, b] += 1
        for c in cache:
            c.trim(c.offset - (len(PROMPT) - 1))
    return counts


def _resample_from_p(logp, logq, draft):
    """A wrong rule (the classic bug): on rejection, draw from p instead of max(0, p - q)."""
    m, _ = accept_draft(logp, logq, draft)
    return m, mx.random.categorical(logp[m])


@pytest.mark.parametrize("temp, top_p", [
    (1.0, 1.0), pytest.param(0.7, 0.8, marks=pytest.mark.slow)])
def test_sampled_pairs_follow_the_model_distribution(small, temp, top_p):
    """800 samples of the first two tokens (k = 2 drafts from block 1, 3 tokens each) against
    the exact distribution of the plain sampler (p ~ 0.5-0.9 for seeds 0, 1; the wrong rule
    below gives p < 1e-6 with 300)."""
    mx.random.seed(0)
    probs = _exact_pairs(small, temp, top_p)
    assert _chi2_pvalue(_first_pairs(small, 800, temp, top_p), probs) > 1e-3


def test_chi_square_catches_a_wrong_acceptance_rule(small):
    mx.random.seed(0)
    counts = _first_pairs(small, 300, 1.0, 1.0, accept=_resample_from_p)
    assert _chi2_pvalue(counts, _exact_pairs(small, 1.0, 1.0)) < 1e-3


def test_accept_draft_batched_rounds_match_p():
    """accept_draft over 20000 independent rounds (leading axis) with fixed p_0..p_k, q_0..q_k-1:
    the first token of a round is distributed as p_0, the second (after one acceptance) as p_1;
    the wrong rule fails the same test."""
    mx.random.seed(0)
    R, k = 20000, 3
    logp = mx.log(mx.softmax(2 * mx.random.normal((k + 1, V)), axis=-1))
    logq = mx.log(mx.softmax(2 * mx.random.normal((k, V)), axis=-1))
    draft = mx.random.categorical(mx.broadcast_to(logq, (R, k, V)))  # (R, k)
    args = (mx.broadcast_to(logp, (R, k + 1, V)), mx.broadcast_to(logq, (R, k, V)), draft)
    p = np.exp(np.array(logp))
    for rule, ok in ((accept_draft, True), (_batched_wrong, False)):
        m, token = (np.array(x) for x in rule(*args))
        first = np.where(m > 0, np.array(draft)[:, 0], token)
        pvalue = _chi2_pvalue(np.bincount(first, minlength=V).astype(float), p[0])
        assert (pvalue > 1e-3) == ok
        if ok:
            second = np.where(m > 1, np.array(draft)[:, 1], token)[m >= 1]
            assert _chi2_pvalue(np.bincount(second, minlength=V).astype(float), p[1]) > 1e-3


@pytest.mark.parametrize("temp, top_p, min_p, top_k", [
    (0.7, 1.0, 0.0, 0), (1.0, 0.8, 0.0, 0), (1.3, 1.0, 0.05, 0), (1.0, 1.0, 0.0, 4),
    (0.9, 0.9, 0.02, 5)])
def test_sampling_logprobs_is_the_plain_samplers_distribution(temp, top_p, min_p, top_k):
    """20000 draws of mlx-lm's `make_sampler` against exp(sampling_logprobs): p and q are what
    the plain sampler draws from, filters and temperature included."""
    mx.random.seed(0)
    logits = 1.5 * mx.random.normal((1, V))
    probs = np.exp(np.array(sampling_logprobs(logits, temp, top_p, min_p, top_k)))[0]
    sampler = make_sampler(temp, top_p, min_p, top_k=top_k)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    draws = np.array(sampler(mx.broadcast_to(logprobs, (20000, V))))
    counts = np.bincount(draws, minlength=V).astype(float)
    assert (probs == 0).any() == (top_p < 1 or min_p > 0 or top_k > 0)  # the filters bite
    assert np.all(counts[probs == 0] == 0) and _chi2_pvalue(counts, probs) > 1e-3


def _batched_wrong(logp, logq, draft):
    m, _ = accept_draft(logp, logq, draft)
    p_m = mx.take_along_axis(logp, m[:, None, None], -2)[:, 0]
    return m, mx.random.categorical(p_m)


# --- errors and the CLI ---------------------------------------------------------------------------

def test_check_draft_errors(varied):
    model, _ = load(varied)
    for l, k, message in ((0, 2, "--draft-layer 0: expected a block in 1..3"),
                          (4, 2, "--draft-layer 4: expected a block in 1..3 for this 4-block"),
                          ("2", 2, "--draft-layer '2'"),
                          (2, 0, "--draft-tokens 0: expected an integer >= 1")):
        with pytest.raises(ValueError, match=message):
            check_draft(model, l, k)


def _run(tmp_path, adapter, model, algorithm, layers=(2,)):
    folder = tmp_path / f"run-{algorithm}"
    folder.mkdir()
    (folder / "adapters").symlink_to(adapter, target_is_directory=True)
    raw = {"model": str(model), "dataset": {"source": "builtin:arith"}, "algorithm": algorithm,
           "max_completion_length": N, "oisd": {"student_layers": list(layers)}}
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    return folder


def test_draft_layer_of_run_folders(tmp_path, varied, adapter):
    assert draft_layer_of(_run(tmp_path, adapter, varied, "oisd", (3, 1)) / "adapters") == 3
    with pytest.raises(ValueError, match="not an OISD run .algorithm: grpo"):
        draft_layer_of(_run(tmp_path, adapter, varied, "grpo") / "adapters")
    with pytest.raises(ValueError, match="no config.yaml in"):
        draft_layer_of(adapter)
    with pytest.raises(ValueError, match="no adapter"):
        draft_layer_of(None)


def test_generate_cli_with_a_draft_layer(tmp_path, varied, adapter):
    flags = ["generate", "--model", str(varied), "--adapter-path", str(adapter), "--prompt",
             "What is 2 + 3?", "--max-tokens", str(N)]
    plain = runner.invoke(app, flags)
    assert plain.exit_code == 0, plain.output
    spec = runner.invoke(app, flags + ["--draft-layer", "2", "--draft-tokens", "3"])
    assert spec.exit_code == 0, spec.output
    assert spec.stdout == plain.stdout and "draft: " in spec.stderr and "accepted (" in spec.stderr
    run = _run(tmp_path, adapter, varied, "oisd")
    auto = runner.invoke(app, ["generate", "--run", str(run), "--prompt", "What is 2 + 3?",
                               "--draft-layer", "auto"])
    assert auto.exit_code == 0, auto.output
    assert "draft layer 2 (the run's student layer)" in auto.stderr
    chat = runner.invoke(app, ["chat", "--run", str(run), "--draft-layer", "auto"],
                         input="What is 2 + 3?\n")
    assert chat.exit_code == 0 and chat.stdout.strip() == auto.stdout.strip()


@pytest.mark.parametrize("extra, message", [
    (["--draft-layer", "4"], "--draft-layer 4: expected a block in 1..3"),
    (["--draft-layer", "two"], "--draft-layer 'two': expected a block number or 'auto'"),
    (["--draft-layer", "1", "--draft-tokens", "0"], "--draft-tokens 0: expected an integer >= 1"),
    (["--draft-layer", "auto"], "--draft-layer auto: no adapter"),
    (["--draft-layer", "auto", "--adapter-path", "ADAPTER"], "--draft-layer auto: no config.yaml"),
])
def test_draft_flag_errors_are_one_line(varied, adapter, extra, message):
    extra = [str(adapter) if x == "ADAPTER" else x for x in extra]
    for command in (["generate", "--prompt", "hi"], ["eval", "--data", "builtin:arith"]):
        result = runner.invoke(app, command + ["--model", str(varied)] + extra)
        assert result.exit_code == 2 and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr


def test_eval_cli_with_a_draft_layer(tmp_path, varied, adapter):
    """Greedy eval with and without a draft layer: the same samples; the JSON and the table
    carry the acceptance rate and tokens/s; auto on a GRPO run is a usage error."""
    base = ["eval", str(varied), "--adapter", str(adapter), "--data",
            "builtin:arith?digits=1&terms=2&n=61&n_test=20", "--limit", "3", "-k", "1",
            "--max-tokens", "8", "--temperature", "0", "--batch-size", "1"]
    outs = {}
    for name, extra in (("plain", []), ("draft", ["--draft-layer", "1", "--draft-tokens", "3"])):
        out, samples = tmp_path / f"{name}.json", tmp_path / f"{name}.jsonl"
        result = runner.invoke(app, base + extra + ["--out", str(out), "--save-samples",
                                                    str(samples)])
        assert result.exit_code == 0, result.output
        outs[name] = (json.loads(out.read_text()), samples.read_text(), result.output)
    (plain, plain_samples, _), (draft, draft_samples, text) = outs["plain"], outs["draft"]
    assert draft_samples == plain_samples
    bench = draft["benchmarks"]["arith-test"]
    assert 0.0 <= bench["draft_acceptance"] <= 1.0 and bench["tokens_per_s"] > 0
    assert draft["settings"]["draft_layer"] == 1 and "draft_acceptance" not in \
        plain["benchmarks"]["arith-test"]
    assert "draft accept (%)" in text and "tokens/s" in text
    grpo = _run(tmp_path, adapter, varied, "grpo")
    result = runner.invoke(app, base[:2] + ["--adapter", str(grpo / "adapters"), "--data",
                                            "builtin:arith", "--draft-layer", "auto"])
    assert result.exit_code == 2 and "not an OISD run (algorithm: grpo)" in result.stderr
