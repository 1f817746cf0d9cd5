"""lens.py: the logit-lens table of every block, the lens policy's greedy decoding, `oisd-mlx lens`."""

import json

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from mlx_oisd import load
from mlx_oisd.lens import (
    LensRun,
    agreement_stats,
    format_lens_table,
    format_stats_table,
    lens_generate,
    lens_run,
    lens_table,
    plot_lens_heatmap,
    response_positions,
)
from mlx_oisd.lora import apply_lora, lora_layers, lora_parameters, save_adapters
from mlx_oisd.rollout import sample

runner = CliRunner()


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """A tiny untied model with large weights, so its argmaxes have clear margins."""
    from mlx_oisd.tiny import TinySpec, build_tiny_model

    spec = TinySpec(init_std=0.3, tie_word_embeddings=False, seed=5)
    return build_tiny_model(tmp_path_factory.mktemp("sharp"), spec)


def _numpy_lens(model, ids, layer):
    """Reference: block `layer`'s lens distribution from its own forward pass, in numpy."""
    h = model.forward_internals(mx.array(ids)[None], hidden_layers=[layer]).hidden[layer]
    z = np.array(model.lens(h)[0], dtype=np.float64)  # (T, V)
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def test_table_shapes_final_layer_and_reference(sharp):
    model, tok = load(sharp)
    ids = tok.encode("What is 12 + 35? Think.")
    L, T = model.args.num_hidden_layers, len(ids)
    table = lens_table(model, ids)
    assert {k: v.shape for k, v in table.items()} == {k: (L, T) for k in
                                                      ("top_ids", "agree", "entropy", "final_prob")}
    assert table["agree"][L - 1].all()  # the last block agrees with itself everywhere
    final = np.array(mx.argmax(model(mx.array(ids)[None]), axis=-1)[0])
    np.testing.assert_array_equal(table["top_ids"][L - 1], final)  # lens of block L = the logits
    for layer in (1, L):
        p = _numpy_lens(model, ids, layer)
        np.testing.assert_array_equal(table["top_ids"][layer - 1], p.argmax(-1))
        np.testing.assert_allclose(table["entropy"][layer - 1], -(p * np.log(p)).sum(-1),
                                   rtol=1e-4)
        np.testing.assert_allclose(table["final_prob"][layer - 1], p[np.arange(T), final],
                                   rtol=1e-4, atol=1e-7)
        np.testing.assert_array_equal(table["agree"][layer - 1], p.argmax(-1) == final)


def test_table_chunked_and_batched_agree_with_single(sharp):
    model, tok = load(sharp)
    a, b = tok.encode("hello there, friend"), tok.encode("What is 1+2?")
    ref = [lens_table(model, a), lens_table(model, b)]
    small = lens_table(model, a, chunk_size=3)
    np.testing.assert_array_equal(small["top_ids"], ref[0]["top_ids"])
    np.testing.assert_allclose(small["entropy"], ref[0]["entropy"], rtol=1e-5)
    T = max(len(a), len(b))
    ids = np.zeros((2, T), dtype=np.int32)
    mask = np.zeros((2, T), dtype=np.int32)
    for i, s in enumerate((a, b)):  # right padding
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    batched = lens_table(model, ids, mask=mx.array(mask))
    assert batched["top_ids"].shape == (2, model.args.num_hidden_layers, T)
    for i, s in enumerate((a, b)):
        np.testing.assert_array_equal(batched["top_ids"][i][:, :len(s)], ref[i]["top_ids"])
        np.testing.assert_allclose(batched["final_prob"][i][:, :len(s)], ref[i]["final_prob"],
                                   rtol=1e-4, atol=1e-6)


def test_lens_generate_last_layer_is_greedy_generation(sharp):
    """At layer L the lens policy is the model: equal to greedy `rollout.sample`, with prompts of
    different lengths decoding together (left padding)."""
    model, tok = load(sharp)
    prompts = [tok.encode("What is 1+2?"), tok.encode("hello there, friend"), tok.encode("a")]
    L = model.args.num_hidden_layers
    ours = lens_generate(model, prompts, L, 10, tok.eos_token_ids)
    greedy = sample(model, prompts, 1, 10, tok.eos_token_ids, temperature=0.0)
    assert ours == greedy.completions


def test_lens_generate_matches_uncached_reference(sharp):
    """A lower block's policy equals the O(T^2) reference that re-runs the full sequence each step."""
    model, tok = load(sharp)
    prompts = [tok.encode("What is 1+2?"), tok.encode("b")]
    layer, steps = 2, 8
    ours = lens_generate(model, prompts, layer, steps, tok.eos_token_ids)
    for prompt, got in zip(prompts, ours):
        seq, ref = list(prompt), []
        for _ in range(steps):
            h = model.forward_internals(mx.array(seq)[None], hidden_layers=[layer]).hidden[layer]
            nxt = int(mx.argmax(model.lens(h[0, -1])))
            ref.append(nxt)
            seq.append(nxt)
            if nxt in tok.eos_token_ids:
                break
        assert got == ref
    with pytest.raises(ValueError, match="blocks are numbered 1..4"):
        lens_generate(model, prompts, 5, steps, tok.eos_token_ids)


def test_lens_generate_stops_at_eos_and_keeps_it(tiny_dir):
    model, tok = load(tiny_dir)
    eos = tok.eos_token_id
    head = model.model.embed_tokens.weight
    model.model.embed_tokens.weight = head.at[eos].add(100.0 * model.model.norm.weight)
    L = model.args.num_hidden_layers
    assert lens_generate(model, [tok.encode("hi"), tok.encode("hello")], L, 5,
                         tok.eos_token_ids) == [[eos], [eos]]


def test_response_positions_and_agreement_stats():
    np.testing.assert_array_equal(response_positions(3, 2), [False, False, True, True, False])
    t1 = {"agree": np.array([[True, False, False], [True, True, True]]),
          "entropy": np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]]),
          "final_prob": np.array([[0.2, 0.4, 0.6], [0.9, 0.9, 0.9]])}
    t2 = {k: v[:, :1] for k, v in t1.items()}
    stats = agreement_stats([t1, t2], [np.array([False, True, True]), np.array([True])])
    assert stats["layers"] == [1, 2] and stats["positions"] == 3
    assert stats["agreement"] == pytest.approx([1 / 3, 1.0])
    assert stats["entropy"] == pytest.approx([(2 + 3 + 1) / 3, 0.5])
    assert stats["final_prob"] == pytest.approx([(0.4 + 0.6 + 0.2) / 3, 0.9])
    with pytest.raises(ValueError, match="no positions"):
        agreement_stats([t2], [np.array([False])])


def test_run_table_heatmap_and_stats(sharp, tmp_path):
    model, tok = load(sharp)
    run = lens_run(model, tok, "base", ["What is 1+2?"], None, max_tokens=6)
    prompt, completion = run.sequences[0]
    assert 1 <= len(completion) <= 6
    L = model.args.num_hidden_layers
    lines = format_lens_table(run, tok, columns=4).splitlines()
    assert len(lines) == L + 3  # title, input, one row per block, next
    assert lines[2].split()[0] == f"l={L}" and lines[2].count("*") == min(4, len(completion))
    png = plot_lens_heatmap(run, tok, tmp_path / "lens.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    stats = run.stats
    assert stats["agreement"][-1] == 1.0 and stats["positions"] == len(completion)
    table = format_stats_table([run, LensRun("other", run.sequences, run.tables)])
    assert "base agree%" in table and "other agree%" in table


def _adapter(model_dir, out_dir):
    """An mlx-lm LoRA adapter folder with non-zero weights (so it changes the model)."""
    model, _ = load(model_dir)
    apply_lora(model, -1, lora_parameters(4, 20.0, 0.0, None))
    for i, m in enumerate(lora_layers(model)):
        m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape, key=mx.random.key(i))
    return save_adapters(model, out_dir, -1, lora_parameters(4, 20.0, 0.0, None))


def test_lens_command_prompt_and_side_by_side(sharp, tmp_path):
    result = runner.invoke(app, ["lens", str(sharp), "--prompt", "What is 1+2?", "--max-tokens",
                                 "5", "--out-png", str(tmp_path / "p.png"),
                                 "--json", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").stat().st_size > 0
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["runs"]["base"]["agreement"][-1] == 1.0

    rows = tmp_path / "c.jsonl"
    rows.write_text("".join(json.dumps({"prompt": q, "completion": c}) + "\n" for q, c in
                            [("What is 1+2?", "It is \\boxed{3}."), ("Say hi", "hi there")]))
    adapter = _adapter(sharp, tmp_path / "adapters")
    result = runner.invoke(app, ["lens", str(sharp), "--completions", str(rows),
                                 "--adapter", "none", "--label", "base",
                                 "--adapter", str(adapter), "--label", "tuned",
                                 "--out-png", str(tmp_path / "c.png"),
                                 "--json", str(tmp_path / "c.json")])
    assert result.exit_code == 0, result.output
    assert "base agree%" in result.output and "tuned agree%" in result.output
    assert "wrote" in result.output and (tmp_path / "c.png").is_file()  # one PNG, both panels
    assert not (tmp_path / "c-base.png").exists()
    report = json.loads((tmp_path / "c.json").read_text())
    base, tuned = report["runs"]["base"], report["runs"]["tuned"]
    assert base["adapter"] is None and tuned["adapter"] == str(adapter)
    assert base["positions"] == tuned["positions"] > 0  # the same completions, read by both
    assert base["entropy"] != tuned["entropy"]  # the adapter changes the lens


def test_lens_command_errors_and_help(tiny_dir, tmp_path):
    result = runner.invoke(app, ["lens", str(tiny_dir)])
    assert result.exit_code == 2 and "exactly one of --prompt" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q"}\n')
    result = runner.invoke(app, ["lens", str(tiny_dir), "--completions", str(bad)])
    assert result.exit_code == 2 and "line 1 of" in result.output
    result = runner.invoke(app, ["lens", "--help"])
    assert result.exit_code == 0 and "Examples:" in result.output
    assert "oisd-mlx lens Qwen/Qwen3-0.6B --prompt" in result.output


class _LetterTokenizer:
    """decode: token id i is the letter chr(97 + i % 26)."""

    def decode(self, ids):
        return "".join(chr(97 + int(i) % 26) for i in ids)


def _fake_run(label, prompt_len, completion_len, blocks, seed=0):
    """A LensRun over one sequence with random tables [blocks, P + C]."""
    rng = np.random.default_rng(seed)
    T = prompt_len + completion_len
    top = rng.integers(0, 26, size=(blocks, T))
    table = {"top_ids": top, "agree": top == top[-1], "entropy": rng.random((blocks, T)),
             "final_prob": rng.random((blocks, T))}
    seq = list(rng.integers(0, 26, size=T))
    return LensRun(label, [(seq[:prompt_len], seq[prompt_len:])], [table])


def _heatmaps(fig):
    return [ax for ax in fig.axes if ax.get_images()]


def test_heatmap_size_readable_labels_and_cut_note():
    from mlx_oisd.lens import build_lens_figure

    tok = _LetterTokenizer()
    small = build_lens_figure(_fake_run("a", 3, 30, 4), tok)
    wide = build_lens_figure(_fake_run("a", 3, 80, 4), tok)
    tall = build_lens_figure(_fake_run("a", 3, 30, 28), tok)
    assert wide.get_size_inches()[0] > small.get_size_inches()[0]
    assert tall.get_size_inches()[1] > small.get_size_inches()[1]
    for fig in (small, wide, tall):
        fig.draw_without_rendering()
        (ax,) = _heatmaps(fig)
        labels = ax.get_xticklabels() + ax.get_yticklabels()
        assert min(t.get_fontsize() for t in labels) >= 9
        x = [t.get_window_extent() for t in ax.get_xticklabels()]
        assert all(a.x1 <= b.x0 for a, b in zip(x, x[1:]))  # token labels do not overlap
        y = [t.get_window_extent() for t in ax.get_yticklabels()]
        assert all(a.y1 <= b.y0 for a, b in zip(y, y[1:]))
    assert "all 30 response positions" in _heatmaps(small)[0].get_title(loc="left")
    cut = build_lens_figure(_fake_run("a", 3, 240, 4), tok)
    (ax,) = _heatmaps(cut)
    assert ax.get_title(loc="left").endswith("positions 0-95 of 240 shown; use --start/--columns")
    assert len(ax.get_xticklabels()) == 96
    later = build_lens_figure(_fake_run("a", 3, 240, 4), tok, start=200, columns=96)
    assert "positions 200-239 of 240 shown" in _heatmaps(later)[0].get_title(loc="left")
    with pytest.raises(ValueError, match="response positions 0..239"):
        build_lens_figure(_fake_run("a", 3, 240, 4), tok, start=240)


def test_heatmap_colour_bar_and_one_panel_per_run(tmp_path):
    from mlx_oisd.lens import build_lens_figure

    tok = _LetterTokenizer()
    runs = [_fake_run("base", 3, 12, 4, seed=1), _fake_run("oisd", 3, 20, 4, seed=2)]
    fig = build_lens_figure(runs, tok)
    panels = _heatmaps(fig)
    assert [ax.get_title(loc="left").split(":")[0] for ax in panels] == ["base", "oisd"]
    assert all(ax.get_images()[0].get_clim() == (0.0, 1.0) for ax in panels)  # one scale
    bars = [ax for ax in fig.axes if ax not in panels]
    assert len(bars) == 1 and bars[0].get_ylabel() == "P(final token)"
    # each panel's columns are its own sequence's next tokens
    prompt, completion = runs[1].sequences[0]
    assert [t.get_text() for t in panels[1].get_xticklabels()] == [
        tok.decode([i]) for i in completion]
    agree = build_lens_figure(runs, tok, value="agree")
    (bar,) = [ax for ax in agree.axes if not ax.get_images()]
    assert bar.get_ylabel() == "agrees with final layer"
    png = plot_lens_heatmap(runs, tok, tmp_path / "two.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    two_runs = fig.get_size_inches()[1]
    assert two_runs > build_lens_figure(runs[:1], tok).get_size_inches()[1]


def _png_width(path):
    return int.from_bytes(path.read_bytes()[16:20], "big")


def test_lens_command_index_picks_the_sequence(sharp, tmp_path):
    rows = tmp_path / "c.jsonl"
    long = "First add the tens, then the ones. " * 4
    rows.write_text("".join(json.dumps({"prompt": q, "completion": c}) + "\n" for q, c in
                            [("What is 1+2?", "3"), ("Say hi", long)]))
    shown = {}
    for index in (0, 1):
        out = tmp_path / f"i{index}.png"
        result = runner.invoke(app, ["lens", str(sharp), "--completions", str(rows),
                                     "--index", str(index), "--out-png", str(out)])
        assert result.exit_code == 0, result.output
        shown[index] = result.output.splitlines()[0]
    assert _png_width(tmp_path / "i1.png") > _png_width(tmp_path / "i0.png")  # more positions
    assert shown[0] != shown[1]
    result = runner.invoke(app, ["lens", str(sharp), "--completions", str(rows), "--index", "2"])
    assert result.exit_code == 2 and "--index 2: expected 0..1" in result.output


def test_heatmap_same_tokens_labelled_once():
    from mlx_oisd.lens import build_lens_figure

    tok = _LetterTokenizer()
    base = _fake_run("base", 3, 12, 4, seed=1)
    tuned = LensRun("tuned", base.sequences, [_fake_run("t", 3, 12, 4, seed=2).tables[0]])
    panels = _heatmaps(build_lens_figure([base, tuned], tok))
    shown = [[t.label1.get_visible() for t in ax.xaxis.get_major_ticks()] for ax in panels]
    assert shown == [[False] * 12, [True] * 12]  # the shared tokens under the last panel only
    assert panels[0].get_images()[0].get_array().tolist() != panels[1].get_images()[0].get_array(
    ).tolist()
