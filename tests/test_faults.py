"""scripts/fault_inject.py: SIGKILLed training runs resume to the uninterrupted run's exact state,
and the suite's own checks catch what they claim to catch."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from scripts.fault_inject import (
    Target,
    candidates,
    check_metrics,
    compare_tensors,
    expected_time,
    moment,
    newest_checkpoint,
    phase_counts,
    phase_hit,
    plan,
    read_trace,
    run_suite,
)


def test_three_kills_build_checkpoint_write_final_eval_resume_bit_for_bit(tmp_path):
    """Killed in the model build, in the middle of the first checkpoint write and in the final
    evaluation; each --resume continues from the newest complete checkpoint and the run ends
    with the reference's adapters and optimizer state, byte for byte."""
    summary = run_suite(tmp_path, [Target("build", 1, 0.01), Target("checkpoint", 1, 0.005),
                                   Target("eval", 2, 0.05)], max_steps=2, save_every=1)
    assert summary["failures"] == [], summary["failures"]
    assert summary["kills"] == 3 and summary["attempts"] == 4
    assert summary["phases_hit"] == {"build": 1, "checkpoint": 1, "eval": 1}
    assert [a["first_step"] for a in summary["log"]] == [None, 1, 1, 2]
    assert summary["log"][3]["restored"] == "step_000001"  # the mid-write step 1 was redone
    assert summary["duplicates"] == [] and summary["missing"] == [] and summary["metric_steps"] == 3
    assert summary["bitwise_equal"] and summary["max_abs_diff"] == 0.0
    assert summary["tensors_compared"] > 0 and summary["build_rebuilt_equal"]
    assert summary["orphans"] == 0


@pytest.mark.slow
def test_twelve_random_kills(tmp_path):
    summary = run_suite(tmp_path, 12, seed=1)
    assert summary["failures"] == [], summary["failures"]
    assert summary["kills"] == 12 and summary["max_abs_diff"] == 0.0


def _trace(tmp_path, lines, torn=""):
    path = tmp_path / "trace.txt"
    path.write_text("".join(f"{line}\n" for line in lines) + torn)
    return read_trace(path)


def test_trace_names_the_innermost_open_call_and_the_step_each_call_belongs_to(tmp_path):
    events = _trace(tmp_path, ["B 1.0 startup ", "E 1.5 startup ", "B 1.6 train ", "B 1.7 setup ",
                               "B 1.8 load ", "E 1.9 load ", "E 2.0 setup ", "B 2.1 eval ",
                               "E 2.2 eval ", "B 2.3 step 1", "B 2.4 rollout ", "E 2.5 rollout ",
                               "E 2.6 step ", "B 2.7 metrics 1", "E 2.75 metrics ",
                               "B 2.8 checkpoint 1"], torn="E 2.9 chec")
    assert phase_hit(events) == "checkpoint"  # the torn last line is not a call
    assert {e.phase: e.ctx for e in events} == {"startup": -1, "train": -1, "setup": -1, "load": -1,
                                                "eval": 0, "step": 1, "rollout": 1, "metrics": 1,
                                                "checkpoint": 1}
    assert phase_hit(events[:3]) == "train" and phase_hit([]) == "interpreter"
    assert phase_hit(events[:1]) == "cli"  # start-up done, training not begun
    for e in events:
        e.end = e.end or 3.0
    assert phase_hit(events) == "exit"
    # resumed from step 1: no step-0 eval, no step-1 calls; from step 0: both
    assert [e.phase for e in candidates(events, 1, 2)] == ["startup", "train", "setup", "load"]
    assert [e.phase for e in candidates(events, 0, 1)][4:] == ["eval", "step", "rollout",
                                                                "metrics", "checkpoint"]
    assert [e.phase for e in candidates(events, 0, 0)][4:] == ["eval"]
    assert expected_time(candidates(events, 0, 1)) == pytest.approx((2.0 - 1.0) + (3.0 - 2.1))
    fixed = type("FixedDraw", (), {"uniform": lambda self, lo, hi: self.t})()
    for t, want in ((0.85, ("load", 1, 0.05)), (1.35, ("rollout", 1, 0.05)), (1.15, ("train", 1, 0.65))):
        fixed.t = t  # 1.0 s of prologue (1.0-2.0), then the steps from 2.1
        got = moment(candidates(events, 0, 1), fixed)
        assert (got.phase, got.occurrence, got.aimed) == (*want[:2], "any")
        assert got.delay == pytest.approx(want[2])
    counts = phase_counts(candidates(events, 1, 2), build=True, restore=True)
    assert counts["build"] == counts["restore"] == counts["load"] == 1 and counts["eval"] == 0


def test_plan_kills_the_build_first_then_every_target(tmp_path):
    import random

    from scripts.fault_inject import TARGETS

    phases = plan(30, random.Random(0))
    assert len(phases) == 30 and phases[0] == "build" and set(phases[1:]) == set(TARGETS)


def test_tensor_check_sees_one_ulp_a_dtype_change_and_a_missing_tensor(tmp_path):
    a = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "step": np.array([3], np.int32)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(dict(a), str(tmp_path / "same.safetensors"))
    assert compare_tensors(tmp_path / "a.safetensors", tmp_path / "same.safetensors") == ([], 0.0, 2)

    ulp = {**a, "w": a["w"].copy()}
    ulp["w"][1, 2] = np.nextafter(ulp["w"][1, 2], np.float32(2))
    save_file(ulp, str(tmp_path / "ulp.safetensors"))
    diffs, worst, _ = compare_tensors(tmp_path / "a.safetensors", tmp_path / "ulp.safetensors")
    assert len(diffs) == 1 and "w differs" in diffs[0] and 0 < worst < 1e-6

    save_file({"w": a["w"].astype(np.float16)}, str(tmp_path / "half.safetensors"))
    diffs, _, _ = compare_tensors(tmp_path / "a.safetensors", tmp_path / "half.safetensors")
    assert any("F16" in d for d in diffs) and any("step only in the reference" in d for d in diffs)


def test_metrics_check_finds_duplicated_missing_torn_and_changed_steps(tmp_path):
    ref, got = tmp_path / "ref", tmp_path / "got"
    for d in (ref, got):
        d.mkdir()
    rows = [{"step": 0, "eval_accuracy": 0.25}] + [
        {"step": s, "reward": s / 4, "step_time": s} for s in (1, 2, 3)]
    (ref / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    changed = [rows[0], rows[0], {**rows[1], "step_time": 9.0}, {**rows[3], "reward": 0.7}]
    (got / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in changed) + '{"st')
    out = check_metrics(ref, got, 3)
    assert out["duplicates"] == [0] and out["missing"] == [2] and out["torn_lines"] == 1
    assert out["metric_mismatches"] == ["step 3 reward: 0.7 != reference 0.75"]  # not step_time
    assert len(out["failures"]) == 2
    (got / "metrics.jsonl").write_text((ref / "metrics.jsonl").read_text())
    assert check_metrics(ref, got, 3)["failures"] == []


def test_newest_checkpoint_skips_torn_and_unfinished_folders(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        d = root / f"step_{step:06d}"
        d.mkdir(parents=True)
        (d / "state.json").write_text(json.dumps({"step": step}))
        for name in ("adapters", "optimizer"):
            save_file({"x": np.ones(4, np.float32)}, str(d / f"{name}.safetensors"))
    (root / ".tmp-step_000008").mkdir()
    blob = (root / "step_000006" / "optimizer.safetensors").read_bytes()
    (root / "step_000006" / "optimizer.safetensors").write_bytes(blob[:-3])  # torn
    assert newest_checkpoint(tmp_path) == 4
    (root / "step_000004" / "state.json").unlink()
    assert newest_checkpoint(tmp_path) == 2
    assert newest_checkpoint(tmp_path / "nothing") == 0


def test_resume_check_flags_a_wrong_first_step_and_a_lost_checkpoint(tmp_path):
    from types import SimpleNamespace

    from scripts.fault_inject import Attempt, Event, check_resumes

    saved_4 = [Event("checkpoint", 1.0, 1.1, "4", 4)]
    good = [Attempt(0, 0, None, True, "rollout", first_step=1, events=saved_4),
            Attempt(1, 4, None, True, "update", first_step=5),
            Attempt(2, 4, None, False, "", first_step=5)]
    assert check_resumes(SimpleNamespace(attempts=good)) == {"resumes_checked": 2, "failures": []}
    lost = [good[0], Attempt(1, 2, None, True, "update", first_step=3)]  # step 4 was written
    (failure,) = check_resumes(SimpleNamespace(attempts=lost))["failures"]
    assert "went back from step 4 to 2" in failure
    redone = [good[0], Attempt(1, 4, None, False, "", first_step=3)]  # resumed from step 2
    (failure,) = check_resumes(SimpleNamespace(attempts=redone))["failures"]
    assert "first step 3, but the newest complete checkpoint was step 4" in failure
