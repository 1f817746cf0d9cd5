"""bench/realistic.py: the dtype copy of a model folder, the zero-advantage count, the tables."""

import json

import mlx.core as mx
import numpy as np

from bench.realistic import cast_copy, tables, variants, zero_advantage_fraction


def test_cast_copy_casts_floats_exactly_and_keeps_the_rest(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    w = {"a.weight": mx.random.normal((5, 7)), "b.scales": mx.random.normal((3,)).astype(mx.float16),
         "c.indices": mx.arange(6, dtype=mx.uint32)}
    mx.save_safetensors(str(src / "model.safetensors"), w, metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"torch_dtype": "float32", "hidden_size": 7}))
    (src / "tokenizer.json").write_text('{"x": 1}')

    assert cast_copy(src, dst, mx.bfloat16) == dst
    out, meta = mx.load(str(dst / "model.safetensors"), return_metadata=True)
    assert meta == {"format": "pt"}
    for k in ("a.weight", "b.scales"):
        assert out[k].dtype == mx.bfloat16
        assert mx.array_equal(out[k], w[k].astype(mx.bfloat16)).item()
    assert out["c.indices"].dtype == mx.uint32 and mx.array_equal(out["c.indices"], w["c.indices"])
    assert json.loads((dst / "config.json").read_text()) == {"torch_dtype": "bfloat16",
                                                             "hidden_size": 7}
    assert (dst / "tokenizer.json").read_text() == '{"x": 1}'
    assert not list(tmp_path.glob(".tmp-*"))
    # back to float32: bf16 values are exactly representable
    back = cast_copy(dst, tmp_path / "back", mx.float32)
    again = mx.load(str(back / "model.safetensors"))
    assert mx.array_equal(again["a.weight"], out["a.weight"].astype(mx.float32)).item()


def test_zero_advantage_fraction_counts_groups_with_equal_rewards():
    rewards = [1, 1, 1, 1, 0, 1, 0, 1, 0, 0, 0, 0]  # G=4: equal, mixed, equal
    assert zero_advantage_fraction(rewards, 4) == 2 / 3
    assert zero_advantage_fraction(np.arange(8.0), 2) == 0.0


def test_variants_cover_each_switch_and_minibatch_size():
    names = dict(variants(8, 8))
    assert len(names) == len(variants(8, 8))  # unique names
    sizes = {v.get("minibatch_size") for v in names.values()}
    assert sizes == {None, 32, 16, 8}
    assert names["all rows, no skip"] == {"skip_zero_advantage": False}
    assert names["minibatch 8, no sort"] == {"minibatch_size": 8, "sort_by_length": False}


def _rows(t, peak, roll=0.1):
    return [{"step_time": t, "rollout_s": roll, "update_s": t - roll, "peak_memory_gb": peak,
             "rollout_peak_gb": peak / 2, "frac_zero_std_groups": 0.5,
             "completion_len_mean": 4.0, "completion_len_max": 6, "tokens": 256,
             "reward": 0.25}]


def test_tables_ratios_are_against_the_peer():
    res = {"mlx-lm-lora 1": [_rows(2.0, 0.4), _rows(4.0, 0.4)],
           "ours, all rows": [_rows(1.0, 0.8), _rows(1.0, 0.8)],
           "update: all rows, no skip": [_rows(0.5, 0.2)], "update: all rows": [_rows(0.25, 0.1)]}
    full, upd = tables({("tiny-arith", "float32"): {"B": 8, "G": 8, "M": 8, "results": res}})
    peer, ours = full.rows
    assert peer[4] == "3 (2-4)" and peer[-2:] == ["1.00", "1.00"]
    assert ours[-2:] == ["3.00", "2.00"]  # 3 s / 1 s; 0.8 GB / 0.4 GB
    no_skip, skip = upd.rows
    assert skip[-1] == "2.00" and no_skip[-1] == "1.00"
    # the peer's update: its 3 s step minus 0.1 s rollout, over ours
    assert skip[-2] == f"{2.9 / 0.25:.2f}"
    assert skip[5] == f"{0.1 / 0.4:.2f}"  # the update's peak / the peer's step peak
