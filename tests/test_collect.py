"""collect.py: DAPO's dynamic sampling keeps drawing until batch_size groups have rewards that differ."""

from types import SimpleNamespace

import numpy as np
import pytest

import mlx_oisd.collect as collect_module
from mlx_oisd.collect import Scored, collect, merge
from mlx_oisd.rollout import Rollout

G = 2


def _scored(tag: str, rewards: list[float]) -> Scored:
    """Groups of G rows named tag0, tag1, ...; rewards [B*G]."""
    B = len(rewards) // G
    r = np.array(rewards, np.float32)
    rollout = Rollout([[g] for g in range(B)], [[g, j] for g in range(B) for j in range(G)],
                      [False] * (B * G), G)
    stats = {"errors/math": 1, "timeouts/math": 0, "error_types": {"math": {"KeyError": 1}},
             "first_errors": {"math": tag}}
    zero = int((r.reshape(B, G).max(1) == r.reshape(B, G).min(1)).sum())
    return Scored([f"{tag}{g}" for g in range(B)], rollout, [f"{tag}{i}" for i in range(B * G)],
                  r, {"math": r}, stats, B, zero, float(r.sum()))


def _run(monkeypatch, rounds: list[Scored], batch_size=2, max_rounds=3, dynamic=True):
    calls = []

    def fake_draw(run, first_step):
        calls.append(first_step)
        return rounds[len(calls) - 1]

    monkeypatch.setattr(collect_module, "draw", fake_draw)
    cfg = SimpleNamespace(dynamic_sampling=dynamic, max_sampling_rounds=max_rounds,
                          batch_size=batch_size, num_generations=G)
    return collect(SimpleNamespace(cfg=cfg), first_step=True), calls


def test_rounds_until_enough_groups_differ(monkeypatch):
    rounds = [_scored("a", [1, 1, 0, 1]), _scored("b", [0, 0, 1, 1]), _scored("c", [1, 0, 0, 1])]
    got, calls = _run(monkeypatch, rounds)
    assert calls == [True, False, False]  # the first-step reward check on the first round only
    assert got.examples == ["a1", "c0"]  # a1 differs; b has none; c0 fills the batch, c1 unused
    assert got.texts == ["a2", "a3", "c0", "c1"]
    np.testing.assert_array_equal(got.rewards, [0, 1, 1, 0])
    assert got.rollout.completions == [[1, 0], [1, 1], [0, 0], [0, 1]]
    assert got.rollout.prompts == [[1], [0]]
    assert (got.rounds, got.drawn, got.drawn_zero_std) == (3, 6, 3)
    assert got.drawn_reward_sum == 3 + 2 + 2
    assert got.stats["errors/math"] == 3 and got.stats["error_types"]["math"]["KeyError"] == 3
    assert got.stats["first_errors"]["math"] == "a"  # the first round's message kept


def test_stops_at_the_first_round_that_fills_the_batch(monkeypatch):
    got, calls = _run(monkeypatch, [_scored("a", [1, 0, 0, 1]), _scored("b", [1, 0, 1, 0])])
    assert len(calls) == 1 and got.rounds == 1 and got.examples == ["a0", "a1"]


def test_rounds_run_out_with_fewer_groups(monkeypatch):
    rounds = [_scored("a", [1, 1, 0, 0]), _scored("b", [1, 1, 1, 0])]
    got, calls = _run(monkeypatch, rounds, max_rounds=2)
    assert len(calls) == 2 and got.examples == ["b1"] and got.rounds == 2


def test_no_group_differs_gives_an_empty_step(monkeypatch):
    got, _ = _run(monkeypatch, [_scored("a", [1, 1, 0, 0])], max_rounds=1)
    assert got.examples == [] and len(got.rewards) == 0 and got.drawn == 2


def test_without_dynamic_sampling_one_round_as_drawn(monkeypatch):
    first = _scored("a", [1, 1, 0, 0])
    got, calls = _run(monkeypatch, [first], dynamic=False)
    assert got is first and calls == [True]


def test_merge_of_one_part_is_that_part():
    part = _scored("a", [1, 0])
    assert merge([part]) is part


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_training_run_with_dynamic_sampling_and_overlong_shaping(tmp_path, dynamic):
    """End to end: rounds and groups reported, every trained group has differing rewards, and
    the overlong penalty is in the logged advantages, not in the logged rewards."""
    import test_trainer as tt

    from mlx_oisd.advantages import group_advantages, overlong_penalty
    from mlx_oisd.metrics import read_metrics
    from mlx_oisd.samples import read_rows

    path = tt._config(tmp_path, dynamic_sampling=dynamic, max_sampling_rounds=3,
                      overlong_buffer_len=4, overlong_penalty=0.5, log_completions=8,
                      max_steps=2)
    tt._train(path)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    rows = read_rows(tmp_path / "run" / "completions.jsonl")
    for rec in records:
        step_rows = [r for r in rows if r["step"] == rec["step"]]
        rewards = np.array([r["reward"] for r in step_rows], np.float32)
        shaped = rewards + overlong_penalty([r["length"] for r in step_rows], 8, 4, 0.5)
        np.testing.assert_allclose([r["advantage"] for r in step_rows],
                                   group_advantages(shaped, 3), atol=1e-5)
        assert "reward/overlong" in rec
        if dynamic:
            assert 1 <= rec["sampling_rounds"] <= 3 and rec["dynamic_groups"] == len(step_rows) // 3
            by_group = rewards.reshape(-1, 3)
            assert (by_group.max(1) > by_group.min(1)).all()
        else:
            assert "sampling_rounds" not in rec and len(step_rows) == 2 * 3
