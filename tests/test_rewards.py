"""Tests for mlx_oisd/rewards: extraction, math equivalence, format, registry, checker, benchmarks."""

import itertools
import json
import re
import threading
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

import mlx_oisd.rewards.math as math_module
from mlx_oisd.metrics import read_metrics
from mlx_oisd.rewards import (
    MathChecker,
    RewardFailedError,
    call_batched,
    call_reward,
    check_first_batch,
    extract_answer,
    format_reward,
    gsm8k_gold,
    is_batched,
    math_reward,
    resolve_reward,
    reward_record,
    score_batch,
    strip_thinking,
)
from mlx_oisd.rewards.benchmarks import BENCHMARK_FIELDS, load_benchmark_rows

BENCHMARKS = Path(__file__).resolve().parents[2] / "shared/data/benchmarks"


# user rewards and checker hooks, importable by name (`f"{__name__}:fn"`) in the worker too


def _half(completion, answer):
    return 0.5


def _divide(completion, answer):
    return 1.0 / len(completion)  # ZeroDivisionError on ""


def _not_a_number(completion, answer):
    return "1.0"


def _nan(completion, answer):
    return float("nan")


def _huge(completion, answer):
    return 1e300


def _checker_hook(completion, answer):
    """Hangs, raises, or answers at once (no sympy: a loaded CI machine must not time it out)."""
    if completion == "hang":
        time.sleep(3600)
    if completion == "raise":
        raise ZeroDivisionError("from the hook")
    return float(extract_answer(completion) == answer)


def _key_error(completion, answer):
    """Raises KeyError('answer') on an empty completion, as a reward reading a missing column."""
    return 1.0 if completion else {"question": "q"}["answer"]


def _long_error(completion, answer):
    raise ValueError("9" * 400)


def _always_key_error(completion, answer):
    return {"question": "q"}["answer"]


def _trl(prompts, completions, answer, **kwargs):
    """TRL's batched signature: len(completion) / 10, plus 1 when the question holds the answer.
    Hangs on a batch holding the completion "hang"; takes 0.8 s on one holding "slow"."""
    if "hang" in completions or "slow" in completions:
        time.sleep(3600 if "hang" in completions else 0.8)
    return [len(c) / 10 + float(a in p) for p, c, a in zip(prompts, completions, answer, strict=True)]


def _trl_named(completions, prompts):
    """Batched, no **kwargs: gets only the arguments it names (no `answer`)."""
    return np.array([float(len(p)) for p in prompts])


NOT_CALLABLE = 3


def _kind(scored):
    """(score, failure kind) of a call_reward result."""
    score, failure = scored
    return score, None if failure is None else failure.kind


# extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{1} first, then \boxed{2}", "2"),
        (r"\boxed{\left\{1, 2\right\}}", r"\left\{1, 2\right\}"),
        (r"\fbox{x^{2}+1}", "x^{2}+1"),
        (r"\boxed{\left\{ x \mid x>1 \right.}", r"\left\{ x \mid x>1 \right."),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"the box \boxed 5$ ends", "5"),
        (r"\boxed{3} and a cut-off \boxed{\frac{1}{2", "3"),
        ("so 3 + 4 = 7\n#### 1,000\n", "1,000"),
        ("#### 5\nlater #### 6", "6"),
        ("The answer is $\\frac{3}{4}$. I hope it is correct.", r"\frac{3}{4}"),
        ("Final Answer: The final answer is 12. I hope it is correct.", "12"),
        ("**Answer:** **7**.", "7"),
        ("Answer: 42\n", "42"),
        (r"\boxed{}", None),
        ("no answer here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"<think>maybe \boxed{3}</think> so \boxed{4}", r" so \boxed{4}"),
        (r"a<think>x</think>b<think>y</think>c", "abc"),
        (r"opened in the prompt </think> \boxed{4}", r" \boxed{4}"),
        (r"answer \boxed{4} <think> still thinking \boxed{5}", r"answer \boxed{4} "),
        ("no reasoning", "no reasoning"),
    ],
)
def test_strip_thinking(text, expected):
    assert strip_thinking(text) == expected


def test_gsm8k_gold_takes_text_after_hashes_without_thousands_commas():
    assert gsm8k_gold("She pays 2 * 3 = <<2*3=6>>6\n#### 1,450,000") == "1450000"
    assert gsm8k_gold("#### -3") == "-3"
    with pytest.raises(ValueError, match="no '####'"):
        gsm8k_gold("no final line")


# math equivalence


@pytest.mark.parametrize(
    "pred, gold",
    [
        (r"\frac{1}{2}", "0.5"),
        ("0.5", r"\frac{1}{2}"),
        (r"\sqrt{2}/2", r"\frac{\sqrt2}{2}"),
        ("3/4", r"\frac{3}{4}"),
        (r"\dfrac34", "0.75"),
        ("1,000", "1000"),
        ("x=5", "5"),
        ("5", "x = 5"),
        ("C", r"\text{(C)}"),
        ("(3, 4]", "(3,4]"),
        (r"x \in [-2,7]", "[-2,7]"),
        ("-2, 1", "1,-2"),
        ("90", r"90^\circ"),
        ("32348", r"\$32,\!348"),
        ("25", "025"),
        (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
        ("1+x^2", "x^2 + 1"),
    ],
)
def test_math_reward_accepts_equal_answers(pred, gold):
    assert math_reward(f"We get \\boxed{{{pred}}}.", gold) == 1.0


@pytest.mark.parametrize(
    "completion, gold",
    [
        (r"\boxed{\frac{1}{3}}", "0.5"),
        (r"\boxed{2}", "3"),
        (r"\boxed{-0.5}", r"\frac12"),
        (r"\boxed{\pi}", "3.14"),
        (r"\boxed{(3,4)}", "(3,4]"),
        (r"\boxed{x^2-1}", "x^2+1"),
        (r"\boxed{\text{(B)}}", r"\text{(C)}"),
        ("I do not know.", "5"),
        (r"<think>\boxed{5}</think> I give up", "5"),
        (r"<think> \boxed{5} and the budget ran out", "5"),
    ],
)
def test_math_reward_rejects_wrong_or_missing_answers(completion, gold):
    assert math_reward(completion, gold) == 0.0


def test_math_reward_reads_final_answer_after_thinking_and_gsm8k_style():
    assert math_reward(r"<think>\boxed{3}</think> so \boxed{4}", "4") == 1.0
    assert math_reward("3 + 4 = 7\n#### 7", "7") == 1.0
    assert math_reward("The answer is $\\frac{3}{4}$.", "0.75") == 1.0


def test_exact_match_fast_path_does_not_call_math_verify(monkeypatch):
    import math_verify

    def fail(*args, **kwargs):
        raise AssertionError("math_verify was called")

    monkeypatch.setattr(math_verify, "parse", fail)
    assert math_reward(r"\boxed{1,000}", "1000") == 1.0
    assert math_reward(r"\boxed{ \dfrac{1}{2} }", r"\frac{1}{2}") == 1.0
    assert math_reward(r"\boxed{\text{(C)}}", "(C)") == 1.0
    assert math_reward(r"\boxed{19}", "18") == 0.0  # two integers: decided without math_verify


def test_math_reward_works_outside_the_main_thread():
    # math_verify's SIGALRM timeout would raise ValueError in a worker thread
    results = []
    thread = threading.Thread(target=lambda: results.append(math_reward(r"\boxed{0.5}", "1/2")))
    thread.start()
    thread.join()
    assert results == [1.0]


# format reward


@pytest.mark.parametrize(
    "completion, expected",
    [
        (r"\boxed{5}", 1.0),
        (r"<think>try \boxed{4}</think> so \boxed{5}", 1.0),
        (r"opened in the prompt </think> \boxed{5}", 1.0),
        (r"<think> never closed \boxed{5}", 0.0),
        (r"\boxed{1} or \boxed{2}", 0.0),
        (r"\boxed{\frac{1}{2}", 0.0),
        (r"\boxed 5", 0.0),
        (r"\boxed{}", 0.0),
        (r"\boxed{\boxed{1}}", 0.0),
        ("The answer is 5.", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected
    assert format_reward(completion, "ignored") == expected


# completions as a Qwen3 policy writes them after its chat template (tests/test_prompts.py): with
# enable_thinking the prompt ends at "<|im_start|>assistant\n" and the model opens <think> itself;
# without, the prompt pre-fills "<think>\n\n</think>\n\n" and the completion is the answer only.
# Decoded completions end with the EOS they sampled, unless cut off by max_completion_length.
@pytest.mark.parametrize(
    "completion, math, fmt",
    [
        # thinking on: the answer after the reasoning counts, boxes inside it do not
        ("<think>\nTry 2 + 2 = \\boxed{4}. No: 2 + 3.\n</think>\n\nThe sum is \\boxed{5}.<|im_end|>",
         1.0, 1.0),
        ("<think>\nIt is \\boxed{5}.\n</think>\n\nThe sum is \\boxed{6}.<|im_end|>", 0.0, 1.0),
        ("<think>\nIt is 5.\n</think>\n\nThe answer is 5.<|im_end|>", 1.0, 0.0),
        # thinking on, truncated while reasoning: an answer inside the open block earns nothing
        ("<think>\nSo the answer is \\boxed{5}", 0.0, 0.0),
        ("<think>\n2 + 3 = 5\n#### 5", 0.0, 0.0),
        # thinking off: the answer only, ended by the sampled EOS
        ("\\boxed{5}<|im_end|>", 1.0, 1.0),
        ("The answer is 5<|im_end|>", 1.0, 0.0),
        ("2 + 3 = 5\n#### 5<|im_end|>", 1.0, 0.0),
        ("Answer: 5<|endoftext|>", 1.0, 0.0),
        ("\\boxed{6}<|im_end|>", 0.0, 1.0),
        # thinking off, yet the model reasons again and is cut off
        ("<think>\nmaybe \\boxed{5}", 0.0, 0.0),
    ],
)
def test_rewards_of_completions_after_qwen3_template(completion, math, fmt):
    assert math_reward(completion, "5") == math
    assert format_reward(completion) == fmt


def test_extract_answer_stops_at_the_end_of_turn():
    assert extract_answer("#### 5<|im_end|>") == "5"
    assert extract_answer("The answer is 7.<|im_end|>") == "7"
    # nothing after the end of the turn is read (a fused or replayed transcript)
    assert extract_answer("\\boxed{1}<|im_end|>\n<|im_start|>user\n\\boxed{2}") == "1"


# registry and score_batch


def test_resolve_reward_builtins_and_user_functions():
    assert resolve_reward("math") is math_reward
    assert resolve_reward("format") is format_reward
    assert resolve_reward(f"{__name__}:_half") is _half


@pytest.mark.parametrize(
    "spec, message",
    [
        ("foo", "reward 'foo': expected one of math, format or 'module:function'"),
        (
            "no_such_module_xyz:fn",
            "reward 'no_such_module_xyz:fn': cannot import module 'no_such_module_xyz'",
        ),
        (
            f"{__name__}:missing",
            f"reward '{__name__}:missing': module '{__name__}' has no attribute 'missing'",
        ),
        (f"{__name__}:NOT_CALLABLE", "is not callable"),
        (":fn", "expected one of math, format"),
    ],
)
def test_resolve_reward_bad_specs_name_the_spec(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_reward(spec)


def test_score_batch_sums_weighted_rewards():
    completions = [r"\boxed{4}", r"\boxed{5}", "4", r"<think>\boxed{4}"]
    answers = ["4", "4", "4", "4"]
    total, per_reward, stats = score_batch(
        completions, answers, [("math", 1.0), ("format", 0.5), (f"{__name__}:_half", -2.0)]
    )
    np.testing.assert_array_equal(per_reward["math"], [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(per_reward["format"], [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(per_reward[f"{__name__}:_half"], [0.5] * 4)
    np.testing.assert_allclose(total, [1.5 - 1.0, 0.5 - 1.0, -1.0, -1.0])
    assert total.dtype == np.float32 and total.shape == (4,)
    assert stats["errors/math"] == 0 and stats["timeouts/math"] == 0
    assert stats["error_types"] == {} and stats["first_errors"] == {}


def test_user_reward_that_raises_scores_zero_and_is_counted():
    name = f"{__name__}:_divide"
    total, per_reward, stats = score_batch(["ab", "", "abcd", ""], ["x"] * 4, [(name, 1.0)])
    np.testing.assert_allclose(total, [0.5, 0.0, 0.25, 0.0])
    assert stats[f"errors/{name}"] == 2
    assert stats["error_types"] == {name: {"ZeroDivisionError": 2}}


def test_reward_returning_a_non_number_is_an_error():
    assert _kind(call_reward(_not_a_number, "a", "b")) == (0.0, "TypeError")
    assert _kind(call_reward(lambda c, a: True, "a", "b")) == (0.0, "TypeError")
    assert _kind(call_reward(_nan, "a", "b")) == (0.0, "ValueError")
    assert call_reward(lambda c, a: np.float32(0.25), "a", "b") == (0.25, None)
    _, _, stats = score_batch(["a"], ["b"], [(f"{__name__}:_not_a_number", 1.0)])
    assert stats["error_types"] == {f"{__name__}:_not_a_number": {"TypeError": 1}}


def test_rewards_not_finite_in_float32_are_errors():
    """1e300 is a finite double but inf as float32 (the rewards array): an error, scored 0."""
    for value in (1e300, -1e39, float("inf"), float("nan"), np.float64(4e38)):
        assert _kind(call_reward(lambda c, a, v=value: v, "a", "b")) == (0.0, "ValueError"), value
    big = float(np.finfo(np.float32).max)
    assert call_reward(lambda c, a: big, "a", "b") == (big, None)
    assert call_reward(lambda c, a: -3e38, "a", "b") == (-3e38, None)
    total, _, stats = score_batch(["a", "b"], ["x", "x"], [(f"{__name__}:_huge", 1.0)])
    assert np.isfinite(total).all() and total.tolist() == [0.0, 0.0]
    assert stats["error_types"] == {f"{__name__}:_huge": {"ValueError": 2}}


@pytest.mark.parametrize("source, error", [
    ("def broken(:\n", "SyntaxError"),
    ("raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here"),
    ("import no_such_dependency_xyz\n", "cannot import module 'bad_reward_mod"),
])
def test_reward_module_failing_at_import_is_named(tmp_path, monkeypatch, source, error):
    name = f"bad_reward_mod_{abs(hash(source))}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(f"reward '{name}:fn'")) as info:
        resolve_reward(f"{name}:fn")
    assert error in str(info.value) and f"'{name}'" in str(info.value)


@pytest.mark.parametrize("guarded", [False, True])
def test_checker_in_a_script_without_main_guard_says_why(tmp_path, guarded):
    """A spawned worker re-imports the main script; without the guard that script starts a
    checker again at import. The error says so and gives the fix; with the guard it works."""
    import subprocess
    import sys

    body = "checker = MathChecker(timeout_s=5.0)\nprint('scores', checker.score([('1', '1')])[0])\n"
    if guarded:
        body = "if __name__ == '__main__':\n" + "".join(f"    {line}\n" for line in body.splitlines())
    script = tmp_path / "train_script.py"
    script.write_text("from mlx_oisd.rewards.math import MathChecker\n" + body)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    if guarded:
        assert result.returncode == 0 and "scores [0.0]" in result.stdout, result.stderr
    else:
        assert result.returncode != 0
        assert "exited while starting (exit code 1)" in result.stderr
        assert f"{script} starts training when it is imported" in result.stderr
        assert 'put the call under if __name__ == "__main__":' in result.stderr


def test_score_batch_rejects_bad_input_before_scoring():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        score_batch(["a", "b"], ["a"], [("math", 1.0)])
    with pytest.raises(ValueError, match="listed more than once: math"):
        score_batch(["a"], ["a"], [("math", 1.0), ("math", 0.5)])
    with pytest.raises(ValueError, match="reward 'format': weight 'high' is not a finite number"):
        score_batch(["a"], ["a"], [("format", "high")])
    with pytest.raises(ValueError, match="reward 'bogus'"):
        score_batch(["a"], ["a"], [("math", 1.0), ("bogus", 1.0)])


# MathChecker: one spawned worker, killed and restarted on a timeout


@pytest.fixture(scope="module")
def hook_checker():
    with MathChecker(timeout_s=2.0, score_fn=f"{__name__}:_checker_hook") as checker:
        yield checker


def test_checker_timeout_scores_zero_and_restarts_the_worker(hook_checker):
    before = hook_checker.timeouts
    start = time.monotonic()
    scores, stats = hook_checker.score([(r"\boxed{1}", "1"), ("hang", "1"), (r"\boxed{2}", "2")])
    assert scores == [1.0, 0.0, 1.0]
    assert stats == {"timeouts": 1, "errors": 0, "error_types": {}, "first_error": None}
    assert hook_checker.timeouts == before + 1
    assert time.monotonic() - start < 60
    scores, stats = hook_checker.score([(r"\boxed{12}", "12")])  # still serving
    assert scores == [1.0] and stats["timeouts"] == 0


def test_checker_counts_errors_with_their_type(hook_checker):
    scores, stats = hook_checker.score([("raise", "1"), (r"\boxed{3}", "3"), ("raise", "1")])
    assert scores == [0.0, 1.0, 0.0]
    first = stats.pop("first_error")
    assert stats == {"timeouts": 0, "errors": 2, "error_types": {"ZeroDivisionError": 2}}
    assert first.message == "ZeroDivisionError: from the hook"
    assert "in _checker_hook" in first.traceback and "raise ZeroDivisionError" in first.traceback


def test_score_batch_routes_math_through_the_checker(hook_checker):
    total, per_reward, stats = score_batch(
        [r"\boxed{4}", "hang", "raise"], ["4", "4", "4"], [("math", 2.0)], workers={"math": hook_checker}
    )
    np.testing.assert_array_equal(total, [2.0, 0.0, 0.0])
    assert stats["timeouts/math"] == 1 and stats["errors/math"] == 1
    assert stats["error_types"] == {"math": {"ZeroDivisionError": 1}}


def test_checker_default_scores_math_reward_and_closes():
    checker = MathChecker()
    scores, stats = checker.score(
        [(r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt2}{2}"), (r"\boxed{1}", "2")]
    )
    assert scores == [1.0, 0.0]
    assert stats == {"timeouts": 0, "errors": 0, "error_types": {}, "first_error": None}
    checker.close()
    with pytest.raises(RuntimeError, match="closed"):
        checker.score([("a", "b")])


def test_checker_rejects_fork_and_bad_score_fn():
    with pytest.raises(ValueError, match="'fork'"):
        MathChecker(context="fork")
    with pytest.raises(ValueError, match=f"reward '{__name__}:missing'"):
        MathChecker(score_fn=f"{__name__}:missing")


# benchmark files


def test_load_benchmark_rows_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "math500.jsonl"
    path.write_text(
        json.dumps({"problem": "1+1?", "answer": "2"})
        + "\n\n"
        + json.dumps({"problem": "x"})
        + "\n"
    )
    with pytest.raises(ValueError, match=re.escape(f"line 3 of {path}: missing field 'answer'")):
        load_benchmark_rows(path, "math500")
    path.write_text('{"question": "q", "answer": "#### 4"}\n{broken\n')
    with pytest.raises(ValueError, match=re.escape(f"line 2 of {path}: invalid JSON")):
        load_benchmark_rows(path, "gsm8k")
    path.write_text('{"question": "q", "answer": "no hashes"}\n')
    with pytest.raises(ValueError, match=re.escape(f"line 1 of {path}: field 'answer'")):
        load_benchmark_rows(path, "gsm8k")
    with pytest.raises(ValueError, match="benchmark 'mmlu': expected one of math500"):
        load_benchmark_rows(path, "mmlu")
    with pytest.raises(FileNotFoundError, match="no file"):
        load_benchmark_rows(tmp_path / "absent.jsonl", "aime24")


def _perturbed(gold: str) -> str:
    """A wrong answer next to `gold`: a number plus one, anything else with "+1" appended."""
    if re.fullmatch(r"-?\d+(\.\d+)?", gold):
        return str(Decimal(gold) + 1)
    return gold + "+1"


@pytest.mark.parametrize("name", sorted(BENCHMARK_FIELDS))
def test_benchmark_golds_self_verify_and_perturbed_golds_fail(name):
    path = BENCHMARKS / f"{name}.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    rows = load_benchmark_rows(path, name)
    assert len(rows) == sum(1 for line in path.read_text().splitlines() if line.strip())
    failures = []
    for row in rows:
        gold = row["answer"]
        assert row["prompt"].strip() and gold
        if math_reward(f"So the answer is \\boxed{{{gold}}}.", gold) != 1.0:
            failures.append(("self", gold))
        if math_reward(f"So the answer is \\boxed{{{_perturbed(gold)}}}.", gold) != 0.0:
            failures.append(("perturbed", gold))
    assert not failures, failures


def test_math500_golds_self_verify_through_math_verify(monkeypatch):
    """The fast path makes self-verification trivial; switch it off so math_verify parses every gold."""
    path = BENCHMARKS / "math500.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    counter = itertools.count()
    monkeypatch.setattr(math_module, "normalize_answer", lambda s: f"{s}\0{next(counter)}")
    rows = load_benchmark_rows(path, "math500")
    failures = [
        r["answer"] for r in rows if math_reward(f"\\boxed{{{r['answer']}}}", r["answer"]) != 1.0
    ]
    assert not failures, failures


def test_math500_reference_solutions_score_one():
    path = BENCHMARKS / "math500.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    failures = [r["answer"] for r in records if math_reward(r["solution"], r["answer"]) != 1.0]
    assert not failures, failures


# batched (TRL-signature) rewards, first errors, and the first-step stop


def test_is_batched_tells_the_two_signatures_apart():
    assert not is_batched(_half) and not is_batched(math_reward) and not is_batched(len)
    assert is_batched(_trl) and is_batched(_trl_named)
    assert is_batched(lambda prompts, completions: None)
    assert is_batched(lambda completion, answer, **kw: None)  # TRL would pass keywords


PROMPTS = ["What is 2 + 2?", "What is 2 + 2?", "Name 7.", "Name 7."]
COMPLETIONS = ["4", "five", "seven!", ""]
ANSWERS = ["4", "4", "7", "7"]


def test_trl_batched_reward_scores_by_hand():
    expected = [0.1, 0.4, 0.6 + 1.0, 0.0 + 1.0]  # "4" is not in "What is 2 + 2?"; "7" is
    name = f"{__name__}:_trl"
    total, per_reward, stats = score_batch(COMPLETIONS, ANSWERS, [(name, 2.0)], prompts=PROMPTS)
    np.testing.assert_allclose(per_reward[name], expected, rtol=1e-6)
    np.testing.assert_allclose(total, [2 * v for v in expected], rtol=1e-6)
    assert stats[f"errors/{name}"] == 0 and stats["first_errors"] == {}
    named = f"{__name__}:_trl_named"
    _, per_reward, _ = score_batch(COMPLETIONS, ANSWERS, [(named, 1.0)], prompts=PROMPTS)
    assert per_reward[named].tolist() == [14.0, 14.0, 7.0, 7.0]
    with pytest.raises(ValueError, match=f"reward '{re.escape(named)}' is batched"):
        score_batch(COMPLETIONS, ANSWERS, [(named, 1.0)])


@pytest.mark.parametrize("returned, scores, kinds, message", [
    ([1.0, None, 0.5], [1.0, 0.0, 0.5], [], None),  # None: TRL's "not applicable", no error
    ([1.0, float("nan"), True], [1.0, 0.0, 0.0], ["ValueError", "TypeError"],
     "ValueError: reward returned nan, not a finite float32"),
    ([1.0, 2.0], [0.0] * 3, ["ValueError"] * 3,
     "ValueError: batched reward returned 2 values for 3 completions"),
    (0.5, [0.0] * 3, ["TypeError"] * 3,
     "TypeError: batched reward returned float, expected a list of 3 numbers"),
])
def test_batched_reward_results_are_checked(returned, scores, kinds, message):
    results = call_batched(lambda prompts, completions, **kw: returned, ["p"] * 3, ["c"] * 3,
                           ["a"] * 3)
    assert [s for s, _ in results] == scores
    failures = [f for _, f in results if f is not None]
    assert [f.kind for f in failures] == kinds
    if message:
        assert failures[0].message == message and "Traceback" in failures[0].traceback


def test_batched_reward_in_a_worker_scores_and_has_the_whole_batchs_time():
    """In the worker, the same scores as by hand; at 0.5 s per item a batch of 4 gets 2 s, so
    a 0.8 s batch passes and a hang times out all four items."""
    expected = [0.1, 0.4, 0.6 + 1.0, 0.0 + 1.0]
    with MathChecker(timeout_s=0.5, score_fn=f"{__name__}:_trl") as checker:
        assert checker.batched
        scores, stats = checker.score(list(zip(COMPLETIONS, ANSWERS)), PROMPTS)
        np.testing.assert_allclose(scores, expected, rtol=1e-6)
        assert stats["errors"] == 0 and stats["timeouts"] == 0
        scores, stats = checker.score(list(zip(["slow", "", "", ""], ANSWERS)), PROMPTS)
        np.testing.assert_allclose(scores, [0.4, 0.0, 1.0, 1.0], rtol=1e-6)
        assert stats["timeouts"] == 0
        scores, stats = checker.score(list(zip(["hang", "", "", ""], ANSWERS)), PROMPTS)
        assert scores == [0.0] * 4 and stats["timeouts"] == 4 and stats["errors"] == 0
        with pytest.raises(ValueError, match="batched .* needs the prompts"):
            checker.score([("a", "b")])


def test_first_error_keeps_type_message_and_traceback_and_names_the_metrics():
    name = f"{__name__}:_key_error"
    total, _, stats = score_batch(["x", "", "y", ""], ["1"] * 4, [(name, 1.0), ("format", 1.0)])
    assert total.tolist() == [1.0, 0.0, 1.0, 0.0]
    first = stats["first_errors"][name]
    assert first.kind == "KeyError" and first.message == "KeyError: 'answer'"
    assert "in _key_error" in first.traceback and first.traceback.startswith("Traceback")
    assert reward_record(stats) == {
        f"reward_errors/{name}": 2, f"reward_timeouts/{name}": 0,
        "reward_errors/format": 0, "reward_timeouts/format": 0,
        "reward_error_types": {name: {"KeyError": 2}},
        "reward_first_error": {name: "KeyError: 'answer'"}}
    check_first_batch(stats, 4)  # some items scored: not broken
    _, long = call_reward(_long_error, "c", "a")
    assert len(long.message) == 300 and long.message.startswith("ValueError: 999")
    assert long.message.endswith("...") and "9" * 400 in long.traceback


def test_check_first_batch_stops_a_reward_failing_on_every_item():
    name = f"{__name__}:_always_key_error"
    _, _, stats = score_batch(["x", "y"], ["1", "1"], [("format", 1.0), (name, 1.0)])
    with pytest.raises(RewardFailedError) as info:
        check_first_batch(stats, 2)
    text = str(info.value)
    assert text.startswith(f"reward '{name}' failed on all 2 completions of the first step")
    assert "KeyError: 'answer'\nTraceback (most recent call last)" in text
    assert "in _always_key_error" in text


def test_a_reward_failing_on_every_item_of_the_first_step_stops_the_run(tmp_path):
    """Through `oisd-mlx train`: exit 2, the reward's name, message and worker traceback, and no
    step recorded."""
    from test_trainer import _config
    from typer.testing import CliRunner

    from cli.main import app

    name = f"{__name__}:_always_key_error"
    cfg = _config(tmp_path, max_steps=2, rewards=[{"name": name}, {"name": "format"}])
    result = CliRunner().invoke(app, ["train", str(cfg), "--quiet"])
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert (f"error: reward '{name}' failed on all 6 completions of the first step, so it is "
            "broken rather than unlucky: KeyError: 'answer'") in result.output
    assert 'in _always_key_error\n    return {"question": "q"}["answer"]' in result.output
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or read_metrics(metrics) == []
