"""Logit lens of every block: what each layer would predict, and whether the final layer agrees.

The lens distribution of block l at position t is the OISD student at tau = 1 (DESIGN.md §1):

    p^l_t = softmax(W_U · N_L(h^l_t))        h^l_t = residual stream after block l

`lens_table` reads all L blocks from one `forward_internals` pass and reports, per block and
position, the top token, whether it equals the final layer's top token (the paper's Figures 2 and 7),
the lens entropy and the lens probability of the final layer's token. `agreement_stats` averages
those over the response positions of many sequences, so two adapters can be compared.
Position t predicts token t+1: a response of C tokens after a P-token prompt is read at positions
P-1 .. P+C-2, as the training loss reads it.

`lens_generate` decodes greedily from one block's lens instead of the final layer ("the policy of
block l", reported as lens@l by evaluate.py). It is for evaluation only: rollouts never sample
from a lens.
"""

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from .data.prompts import PromptFormat
from .data.sources import DataError
from .io import atomic_write, read_jsonl
from .models.qwen3 import Internals, padding_attention_mask


def _check_layer(model, layer: int) -> None:
    L = model.args.num_hidden_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= L:
        raise ValueError(f"layer {layer!r} out of range: blocks are numbered 1..{L} for this model")


def lens_table(model, ids, mask=None, chunk_size: int = 256) -> dict[str, np.ndarray]:
    """The logit lens of every block at every position, from one forward pass.

    ids [T] (or [B, T]) token ids; mask [B, T] 1 on real tokens (None: no padding; padded positions
    get values that callers must ignore). chunk_size: positions whose (chunk, V) lens logits are
    materialised at once (Qwen3's V is 151,936).
    Returns numpy arrays of shape [L, T] (or [B, L, T]), row l-1 for block l:
      top_ids    argmax_v p^l_t(v)
      agree      top_ids[l] == top_ids[L] (the final layer's choice); row L is all True
      entropy    H(p^l_t) in nats
      final_prob p^l_t(top_ids[L, t]): how much block l already believes the final answer
    """
    ids = mx.array(ids)
    single = ids.ndim == 1
    if single:
        ids = ids[None]  # (1, T)
    B, T = ids.shape
    L = model.args.num_hidden_layers
    out = model.forward_internals(ids, hidden_layers=list(range(1, L + 1)), mask=mask,
                                  return_logits=False)
    mx.eval(list(out.hidden.values()))  # one forward pass; the chunks below only read from it
    top = np.zeros((L, B * T), dtype=np.int64)
    entropy = np.zeros((L, B * T), dtype=np.float32)
    final_prob = np.zeros((L, B * T), dtype=np.float32)
    for l in [L, *range(1, L)]:  # the final block first: every other block is compared with it
        h = out.hidden[l].reshape(B * T, -1)  # (B, T, D) -> (B*T, D)
        for s in range(0, B * T, chunk_size):
            logits = model.lens(h[s:s + chunk_size]).astype(mx.float32)  # (c, V), float32 softmax
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            final = mx.array(top[L - 1, s:s + chunk_size]) if l != L else mx.argmax(logits, -1)
            rows = (
                mx.argmax(logits, axis=-1),
                -(mx.exp(logp) * logp).sum(axis=-1),
                mx.exp(mx.take_along_axis(logp, final[:, None], axis=-1))[:, 0],
            )
            mx.eval(rows)
            for dest, r in zip((top, entropy, final_prob), rows):
                dest[l - 1, s:s + chunk_size] = np.array(r)
    table = {"top_ids": top, "agree": top == top[L - 1], "entropy": entropy,
             "final_prob": final_prob}
    # (L, B*T) -> (B, L, T), or (L, T) for one sequence
    table = {k: v.reshape(L, B, T).transpose(1, 0, 2) for k, v in table.items()}
    return {k: v[0] for k, v in table.items()} if single else table


def response_positions(prompt_len: int, completion_len: int) -> np.ndarray:
    """[P + C] bool, True at the positions that predict a completion token (P-1 .. P+C-2)."""
    keep = np.zeros(prompt_len + completion_len, dtype=bool)
    keep[prompt_len - 1:prompt_len + completion_len - 1] = True
    return keep


def agreement_stats(tables, masks=None) -> dict:
    """Per-block averages over the positions of many sequences.

    tables: `lens_table` results of shape [L, T_i]; masks: one [T_i] bool per table, True where a
    position counts (None: all). Returns {"layers": [1..L], "agreement": [L] fraction of positions
    where block l's top token is the final layer's, "entropy": [L] mean lens entropy (nats),
    "final_prob": [L] mean lens probability of the final layer's token, "positions": count}.
    """
    if masks is None:
        masks = [np.ones(t["agree"].shape[-1], dtype=bool) for t in tables]
    if len(masks) != len(tables):
        raise ValueError(f"agreement_stats: {len(tables)} tables but {len(masks)} masks")
    sums = {"agreement": 0.0, "entropy": 0.0, "final_prob": 0.0}
    n = 0
    for table, keep in zip(tables, masks):
        keep = np.asarray(keep, dtype=bool)
        sums["agreement"] = sums["agreement"] + table["agree"][:, keep].sum(axis=1)
        sums["entropy"] = sums["entropy"] + table["entropy"][:, keep].sum(axis=1)
        sums["final_prob"] = sums["final_prob"] + table["final_prob"][:, keep].sum(axis=1)
        n += int(keep.sum())
    if n == 0:
        raise ValueError("agreement_stats: no positions to average over")
    L = tables[0]["agree"].shape[0]
    stats = {k: (np.asarray(v, dtype=np.float64) / n).tolist() for k, v in sums.items()}
    return {"layers": list(range(1, L + 1)), **stats, "positions": n}


def lens_generate(model, prompts: list[list[int]], layer: int, max_tokens: int, eos_ids,
                  pad_id: int = 0) -> list[list[int]]:
    """Greedy completions from block `layer`'s lens: token t+1 = argmax W_U · N_L(h^layer_t).

    All prompts decode together with a KV cache through the model's own layer loop, capturing
    block `layer`'s residual stream (the later blocks still run to keep their caches aligned; their
    output is unused). Prompts are left-padded and padding keys are masked; RoPE scores depend only
    on relative positions, so a row does not depend on its padding. Each completion ends with the
    EOS token it produced (kept, as rollouts keep it) or after `max_tokens` tokens.
    With layer = L this is greedy decoding of the model itself.
    """
    _check_layer(model, layer)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("lens_generate: expected non-empty prompts")
    stop = set(eos_ids)
    B, P = len(prompts), max(len(p) for p in prompts)
    tokens = np.full((B, P), pad_id, dtype=np.int32)
    real = np.zeros((B, P), dtype=bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):], real[i, P - len(p):] = p, True
    keys = mx.array(real)  # (B, keys so far) True on real tokens
    mask = padding_attention_mask(keys)  # (B, 1, P, P) causal, no padding keys
    inputs = mx.array(tokens)
    cache = make_prompt_cache(model)
    completions: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, dtype=bool)
    for _ in range(max_tokens):
        capture = Internals(logits=None, hidden={layer: None})
        model.model(inputs, cache=cache, capture=capture, mask=mask)
        nxt = mx.argmax(model.lens(capture.hidden[layer][:, -1]), axis=-1)  # (B,)
        nxt_np = np.array(nxt)
        for i in np.flatnonzero(~done):
            completions[i].append(int(nxt_np[i]))
            done[i] = int(nxt_np[i]) in stop
        if done.all():
            break
        inputs = nxt[:, None].astype(mx.int32)  # (B, 1)
        keys = mx.concatenate([keys, mx.ones((B, 1), dtype=mx.bool_)], axis=1)
        mask = keys[:, None, None, :]  # (B, 1, 1, keys): the new query sees every real key
    return completions


@dataclass
class LensRun:
    """One model's lens over a set of sequences (prompt ids, completion ids)."""

    label: str
    sequences: list[tuple[list[int], list[int]]]
    tables: list[dict] = field(default_factory=list)

    @property
    def stats(self) -> dict:
        masks = [response_positions(len(p), len(c)) for p, c in self.sequences]
        return agreement_stats(self.tables, masks)


def read_completions(path: str | Path) -> list[dict]:
    """Rows {"prompt": question text, "completion": text, ...} of a jsonl file, such as a run's
    completions.jsonl or the file of `oisd-mlx eval --save-samples` (`samples.py`); other fields
    are kept. DataError names the row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"completions file {str(path)!r} does not exist")
    rows = []
    for where, row in read_jsonl(path, DataError):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in
                                                ("prompt", "completion")):
            raise DataError(f"{where}: expected an object with string fields 'prompt' and "
                            "'completion'")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} has no rows")
    return rows


def lens_run(model, tokenizer, label: str, prompts: list[str], completions: list[str] | None,
             max_tokens: int = 64, fmt: PromptFormat = PromptFormat()) -> LensRun:
    """Lens tables of `model` over questions `prompts` (rendered with the chat template) followed
    by the given `completions` texts, or, when None, by the model's own greedy completions."""
    model.eval()
    ids = [fmt.render(tokenizer, q) for q in prompts]
    if completions is None:
        eos = sorted(tokenizer.eos_token_ids)
        outs = lens_generate(model, ids, model.args.num_hidden_layers, max_tokens, eos,
                             tokenizer.pad_token_id or 0)
    else:
        outs = [tokenizer.encode(c, add_special_tokens=False) for c in completions]
    run = LensRun(label, [(p, c) for p, c in zip(ids, outs)])
    run.tables = [lens_table(model, p + c) for p, c in run.sequences]
    return run


def compare_lens(model_spec: str, adapters: list[str | None], labels: list[str],
                 prompts: list[str], completions: list[str] | None, **kwargs):
    """`lens_run` for the base model `model_spec` with each adapter folder in turn (None: no
    adapter); returns (runs, tokenizer). kwargs go to `lens_run`."""
    from .loading import load

    if len(labels) != len(adapters):
        raise ValueError(f"{len(labels)} labels for {len(adapters)} adapters")
    runs, tokenizer = [], None
    for adapter, label in zip(adapters, labels):
        model, tokenizer = load(model_spec, adapter_path=adapter)
        runs.append(lens_run(model, tokenizer, label, prompts, completions, **kwargs))
        del model
    return runs, tokenizer


def _token_text(tokenizer, token_id: int, width: int) -> str:
    """A token as one short printable cell: spaces as ·, control characters escaped, and the id
    (#42) for a token that is not valid UTF-8 on its own (a piece of a multi-byte character)."""
    text = tokenizer.decode([int(token_id)])
    if not text or "\ufffd" in text:
        return f"#{int(token_id)}"[:width]
    text = "".join("·" if c == " " else c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text[:width]


def format_lens_table(run: LensRun, tokenizer, index: int = 0, start: int = 0, columns: int = 10,
                      width: int = 7) -> str:
    """Terminal table of sequence `index`: rows = blocks L..1, columns = `columns` response
    positions from `start`; a cell is block l's top next token, marked * when the final layer
    agrees. The header is the token read at that position, the footer the token that followed."""
    prompt, completion = run.sequences[index]
    table = run.tables[index]
    seq = prompt + completion
    first = len(prompt) - 1 + start
    pos = list(range(first, min(first + columns, len(seq) - 1)))
    L = table["top_ids"].shape[0]
    cell = width + 1

    def row(name: str, cells: list[str]) -> str:
        return f"{name:>7} " + " ".join(f"{c:<{cell}}" for c in cells)

    lines = [f"[{run.label}] logit lens, positions {pos[0]}..{pos[-1]} (* = agrees with block {L})"
             if pos else f"[{run.label}] no response positions"]
    lines.append(row("input", [_token_text(tokenizer, seq[t], width) for t in pos]))
    for l in range(L, 0, -1):
        lines.append(row(f"l={l}", [
            _token_text(tokenizer, table["top_ids"][l - 1, t], width)
            + ("*" if table["agree"][l - 1, t] else "") for t in pos]))
    lines.append(row("next", [_token_text(tokenizer, seq[t + 1], width) for t in pos]))
    return "\n".join(lines)


def format_stats_table(runs: list[LensRun]) -> str:
    """Per-block agreement with the final layer and mean lens entropy, one column pair per run."""
    stats = [r.stats for r in runs]
    names = [(f"{r.label} agree%", f"{r.label} H") for r in runs]
    widths = [(max(8, len(a)), max(6, len(h))) for a, h in names]
    lines = [f"{'layer':>5}" + "".join(f"  {a:>{wa}} {h:>{wh}}"
                                       for (a, h), (wa, wh) in zip(names, widths))]
    for i, layer in enumerate(stats[0]["layers"]):
        lines.append(f"{layer:>5}" + "".join(
            f"  {100 * s['agreement'][i]:>{wa}.1f} {s['entropy'][i]:>{wh}.2f}"
            for s, (wa, wh) in zip(stats, widths)))
    lines.append("positions: " + ", ".join(f"{r.label} {s['positions']}"
                                           for r, s in zip(runs, stats)))
    return "\n".join(lines)


HEATMAP_LABELS = {"final_prob": "P(final token)", "agree": "agrees with final layer"}


def lens_window(run: LensRun, index: int, start: int, columns: int) -> tuple[np.ndarray, int]:
    """Positions ([n] ints, n <= columns) of response positions start .. start+columns-1 of
    sequence `index`, and the number of response positions it has. ValueError names the bad
    index or start."""
    n = len(run.sequences)
    if isinstance(index, bool) or not 0 <= index < n:
        raise ValueError(f"sequence index {index} out of range: {run.label} has {n} sequence"
                         f"{'s' if n != 1 else ''} (--index 0..{n - 1})")
    prompt, completion = run.sequences[index]
    response = np.flatnonzero(response_positions(len(prompt), len(completion)))
    if start < 0 or columns < 1 or start >= len(response):
        raise ValueError(f"--start {start} --columns {columns}: sequence {index} of {run.label} "
                         f"has response positions 0..{len(response) - 1}")
    return response[start:start + columns], len(response)


def build_lens_figure(runs: LensRun | list[LensRun], tokenizer, index: int = 0,
                      value: str = "final_prob", start: int = 0, columns: int = 96):
    """A matplotlib Figure: one heatmap panel per run, one above the other so a position's column
    lines up across runs, blocks as rows (1 at the bottom) x response positions `start` ..
    `start+columns-1` of sequence `index`, labelled by the token that followed (once, under the
    last panel, when every run read the same tokens). One colour bar (0..1) serves every panel.
    The size grows with positions and blocks so labels stay 9 pt; a panel whose sequence has more
    positions than shown says so in its title."""
    from matplotlib.figure import Figure

    if value not in HEATMAP_LABELS:
        raise ValueError(f"heatmap value {value!r}: expected 'final_prob' or 'agree'")
    runs = [runs] if isinstance(runs, LensRun) else list(runs)
    windows = [lens_window(run, index, start, columns) for run in runs]
    same = all(run.sequences[index] == runs[0].sequences[index] for run in runs)
    L = runs[0].tables[index][value].shape[0]
    n = max(len(keep) for keep, _ in windows)
    width = max(6.0, 2.6 + 0.2 * n)
    # per panel: title and blocks at 0.24 in; 0.9 in for the rotated token labels
    height = 0.4 + len(runs) * (0.6 + 0.24 * max(L, 4)) + 0.9 * (1 if same else len(runs))
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(len(runs), 1, squeeze=False, sharex=same)[:, 0]
    for i, (ax, run, (keep, total)) in enumerate(zip(axes, runs, windows)):
        im = _lens_panel(ax, run, tokenizer, index, value, keep, total, n)
        if same and i < len(runs) - 1:
            ax.tick_params(axis="x", labelbottom=False)
    axes[-1].set_xlabel("next token of the sequence", fontsize=10)
    bar = fig.colorbar(im, ax=list(axes), fraction=0.3 / width, pad=0.01,
                       aspect=max(20.0, 3.0 * height))  # a 0.3-inch bar, nearly full height
    bar.set_label(HEATMAP_LABELS[value], fontsize=10)
    if value == "agree":
        bar.set_ticks([0.25, 0.75], labels=["no", "yes"])
    bar.ax.tick_params(labelsize=9)
    fig.suptitle(f"Logit lens of every block: {HEATMAP_LABELS[value]}", fontsize=11)
    return fig


def _lens_panel(ax, run: LensRun, tokenizer, index: int, value: str, keep: np.ndarray,
                total: int, n: int):
    """One run's heatmap on `ax`: positions `keep` [k] of sequence `index`, x axis room for n."""
    from matplotlib.colors import ListedColormap

    prompt, completion = run.sequences[index]
    seq = prompt + completion
    grid = run.tables[index][value][:, keep].astype(np.float32)  # (L, k)
    L = grid.shape[0]
    cmap = ListedColormap(["#d9d9d9", "#2b8cbe"]) if value == "agree" else "viridis"
    im = ax.imshow(grid, origin="lower", aspect="auto", vmin=0.0, vmax=1.0, cmap=cmap,
                   extent=(-0.5, len(keep) - 0.5, 0.5, L + 0.5), interpolation="nearest")
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xticks(range(len(keep)))
    ax.set_xticklabels([_token_text(tokenizer, seq[t + 1], 10) for t in keep], rotation=90,
                       fontsize=9)
    ax.set_yticks(range(1, L + 1, 1 if L <= 40 else 2))
    ax.tick_params(axis="y", labelsize=9)
    ax.set_ylabel("block", fontsize=10)
    first = int(keep[0]) - (len(prompt) - 1)
    shown = (f"positions {first}-{first + len(keep) - 1} of {total} shown; use --start/--columns"
             if len(keep) < total else f"all {total} response positions")
    ax.set_title(f"{run.label}: sequence {index}, {shown}", fontsize=10, loc="left")
    return im


def plot_lens_heatmap(runs: LensRun | list[LensRun], tokenizer, out: str | Path, index: int = 0,
                      value: str = "final_prob", start: int = 0, columns: int = 96) -> Path:
    """`build_lens_figure` saved as the PNG `out` (one panel per run)."""
    fig = build_lens_figure(runs, tokenizer, index, value, start, columns)
    out = Path(out)
    atomic_write(out, lambda p: fig.savefig(p, format="png", dpi=100))
    return out
