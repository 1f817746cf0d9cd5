"""sft.py: chat jsonl checks, and a short warm-up that learns its data."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_oisd import load
from mlx_oisd.sft import SftDataError, read_chat_jsonl, sft

ROWS = [{"messages": [{"role": "user", "content": f"say {w}"},
                      {"role": "assistant", "content": f"{w} {w} {w}"}]}
        for w in ("apple", "pear", "plum", "fig")] * 4


def _answer_nll(model, tok, row):
    """Mean NLL of the assistant turn given the user turn."""
    prompt = tok.apply_chat_template(row["messages"][:1], add_generation_prompt=True)
    full = tok.apply_chat_template(row["messages"])
    ids = mx.array(full)[None]
    logits = model(ids[:, :-1])
    nll = nn.losses.cross_entropy(logits, ids[:, 1:])[0, len(prompt) - 1:]
    return float(nll.mean())


@pytest.mark.parametrize("lora", [None, {"rank": 4, "scale": 10.0, "dropout": 0.0}])
def test_warm_up_learns_the_answers(make_tiny, tmp_path, lora):
    tiny_dir = make_tiny(init_std=0.2)  # logits can peak even with a frozen head (LoRA)
    model, tok = load(tiny_dir)
    before = _answer_nll(model, tok, ROWS[0])
    out = sft(tiny_dir, ROWS, tmp_path / "out", iters=30, batch_size=8,
              learning_rate=1e-2 if lora is None else 3e-3, lora=lora, show_progress=False)
    if lora is None:
        assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
        trained, tok = load(out)
    else:
        assert out.name == "adapters"
        trained, tok = load(tiny_dir, adapter_path=out)
    after = _answer_nll(trained, tok, ROWS[0])
    assert after < 0.5 * before


@pytest.mark.parametrize("line, message", [
    ("{not json", r"line 1 of .*: invalid JSON"),
    (json.dumps({"text": "hi"}), r"line 1 of .*: expected {\"messages\""),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "last message must be the assistant"),
])
def test_bad_chat_rows_name_the_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(SftDataError, match=message):
        read_chat_jsonl(path)
    with pytest.raises(SftDataError, match="does not exist"):
        read_chat_jsonl(tmp_path / "none.jsonl")
