"""evaluate.py: the Pass@k estimator, Avg@k on a fake policy, benchmark loading, `oisd-mlx eval`."""

import itertools
import json
import math
from fractions import Fraction

import pytest
from conftest import SHARED_BENCHMARKS
from typer.testing import CliRunner

import mlx_oisd.evaluate as evaluate
from cli.main import app
from mlx_oisd.data.prompts import PromptFormat
from mlx_oisd.data.sources import DataError, Example
from mlx_oisd.evaluate import (
    BENCHMARKS,
    avg_at_k,
    evaluate_benchmarks,
    format_results,
    load_benchmark,
    pass_at_k,
    sample_correct,
    summarize,
)
from mlx_oisd.rewards.benchmarks import BENCHMARK_FIELDS, load_benchmark_rows
from mlx_oisd.rollout import Rollout

runner = CliRunner()


# --- Pass@k -------------------------------------------------------------------------------------

def _brute_force(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration_and_closed_form():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12)
                assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)


def test_pass_at_k_edges():
    assert pass_at_k(8, 0, 1) == 0.0 and pass_at_k(8, 0, 8) == 0.0  # nothing correct
    assert pass_at_k(8, 8, 1) == 1.0 and pass_at_k(8, 8, 8) == 1.0  # everything correct
    assert pass_at_k(8, 1, 8) == 1.0  # k = n: the one correct sample is always drawn
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # Pass@1 is c / n


def test_pass_at_k_is_stable_for_large_n():
    """n = 1000: the binomials have hundreds of digits; the product form still matches exactly."""
    n, c, k = 1000, 7, 300
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


def test_summarize_hand_computed():
    correct = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]  # c = 1, 4, 0 of n = 4
    s = summarize(correct, ks=[1, 2, 4, 8])
    assert s["problems"] == 3 and s["samples"] == 4
    assert s["avg@4"] == pytest.approx(5 / 12)
    assert s["pass@1"] == pytest.approx(5 / 12)
    assert s["pass@2"] == pytest.approx((0.5 + 1 + 0) / 3)  # 1 - C(3,2)/C(4,2) = 1/2
    assert s["pass@4"] == pytest.approx(2 / 3)
    assert "pass@8" not in s  # k > n is skipped


# --- Avg@k on a fake policy with known accuracy --------------------------------------------------

class ByteTokenizer:
    """Bytes as tokens; the chat template is the bare question; EOS is token 0."""

    eos_token_ids = {0}
    pad_token_id = 0

    def apply_chat_template(self, messages, **kwargs):
        return messages[-1]["content"]

    def encode(self, text, add_special_tokens=False):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i).decode()


class FakePolicy:
    """Stands in for `rollout.sample`: for question q, the first `right[q]` of each group's samples
    box the right answer and the others a wrong one. Records the rows of each call."""

    def __init__(self, examples: list[Example], right: list[int]):
        self.by_prompt = {ex.prompt: (ex.answer, r) for ex, r in zip(examples, right)}
        self.calls: list[int] = []

    def eval(self):
        pass

    def __call__(self, model, prompts, group_size, max_tokens, stop_ids, temperature=1.0,
                 top_p=1.0):
        tok = ByteTokenizer()
        self.calls.append(len(prompts) * group_size)
        completions = []
        for p in prompts:
            question = tok.decode(p).split("\n")[0]
            answer, right = self.by_prompt[question]
            for j in range(group_size):
                text = f"so \\boxed{{{answer if j < right else answer + '1'}}}"
                completions.append(tok.encode(text) + [0])
        return Rollout(list(prompts), completions, [False] * len(completions), group_size)


EXAMPLES = [Example(f"What is {i} + {i}?", str(2 * i)) for i in range(5)]
RIGHT = [0, 1, 2, 4, 4]  # correct samples out of 4 per problem


def test_sample_correct_counts_each_problem_and_chunks_rows():
    policy = FakePolicy(EXAMPLES, RIGHT)
    correct, info = sample_correct(policy, ByteTokenizer(), EXAMPLES, n=4, max_tokens=16,
                                   prompts_per_chunk=2, sampler=policy)
    assert correct.shape == (5, 4)
    assert correct.sum(axis=1).tolist() == RIGHT
    assert policy.calls == [8, 8, 4]  # every row of a chunk in one call
    assert info["truncated"] == 0 and info["failed"] == 0 and info["tokens"] > 0


class ScriptedPolicy:
    """`rollout.sample` stand-in that answers every prompt with the same scripted texts, encoded
    by the real tokenizer, EOS appended unless the text is marked truncated. Records the prompts."""

    def __init__(self, tok, texts: list[tuple[str, bool]]):
        self.tok, self.texts, self.prompts = tok, texts, []

    def __call__(self, model, prompts, group_size, max_tokens, stop_ids, temperature=1.0,
                 top_p=1.0):
        assert group_size == len(self.texts)
        self.prompts += [self.tok.decode(p) for p in prompts]
        eos = self.tok.eos_token_id
        completions = [self.tok.encode(t, add_special_tokens=False) + ([] if cut else [eos])
                       for _ in prompts for t, cut in self.texts]
        return Rollout(list(prompts), completions, [cut for _ in prompts for _, cut in self.texts],
                       group_size)


@pytest.mark.parametrize("enable_thinking, texts, right", [
    (True, [("<think>\nTry \\boxed{4}.\n</think>\n\nSo \\boxed{5}.", False),  # after reasoning
            ("<think>\nIt is \\boxed{5}", True),  # cut off inside the reasoning
            ("<think>\n5\n</think>\n\nThe answer is 6", False),
            ("<think>\n2 + 3\n</think>\n\nThe answer is 5", False)], [1, 0, 0, 1]),
    (False, [("\\boxed{5}", False), ("#### 5", False), ("\\boxed{6}", False),
             ("The answer is 5", True)], [1, 1, 0, 1]),
])
def test_sample_correct_scores_completions_written_after_qwen3s_template(
        tiny_dir, enable_thinking, texts, right):
    from mlx_oisd import load

    _, tok = load(tiny_dir)  # tiny models carry Qwen3's chat template
    policy = ScriptedPolicy(tok, texts)
    correct, info = sample_correct(None, tok, [Example("What is 2 + 3?", "5")], n=len(texts),
                                   max_tokens=64, fmt=PromptFormat(enable_thinking=enable_thinking),
                                   sampler=policy)
    assert correct[0].tolist() == right
    assert info["truncated"] == sum(cut for _, cut in texts)
    end = "<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n")
    assert policy.prompts[0].endswith("\\boxed{}.<|im_end|>\n" + end)


def test_avg_at_k_on_fake_policy(monkeypatch):
    policy = FakePolicy(EXAMPLES, RIGHT)
    monkeypatch.setattr(evaluate, "sample", policy)
    avg, per_problem = avg_at_k(policy, ByteTokenizer(), EXAMPLES, k=4, prompts_per_chunk=3)
    assert per_problem.tolist() == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert avg == pytest.approx(sum(RIGHT) / 20)


def test_evaluate_benchmarks_per_benchmark_and_mean(monkeypatch):
    policy = FakePolicy(EXAMPLES, RIGHT)
    monkeypatch.setattr(evaluate, "sample", policy)
    results = evaluate_benchmarks(policy, ByteTokenizer(), {"a": EXAMPLES[:2], "b": EXAMPLES[2:]},
                                  n=4, ks=[1, 4], max_tokens=16)
    a, b = results["benchmarks"]["a"], results["benchmarks"]["b"]
    assert a["avg@4"] == pytest.approx(1 / 8) and b["avg@4"] == pytest.approx(10 / 12)
    assert a["pass@4"] == pytest.approx(0.5) and b["pass@4"] == 1.0
    assert b["correct_counts"] == [2, 4, 4]
    assert results["mean"]["avg@4"] == pytest.approx((1 / 8 + 10 / 12) / 2)  # macro mean
    table = format_results(results).splitlines()
    assert table[0].split() == ["metric", "(%)", "a", "b", "mean"]
    assert table[1].split() == ["avg@4", "12.5", "83.3", "47.9"]


def test_format_results_puts_percentages_and_counts_in_separate_tables():
    """Rows of the % table are only metrics; counts get their own table, pooled over all
    samples (tokens 10 on 2x4 samples and 20 on 3x4: (80 + 240) / 20 = 16)."""
    bench = {"a": {"problems": 2, "samples": 4, "avg@4": 0.125, "pass@4": 0.5,
                   "completion_tokens_mean": 10.0, "truncated_frac": 0.5, "reward_failures": 1},
             "b": {"problems": 3, "samples": 4, "avg@4": 0.75, "pass@4": 1.0,
                   "completion_tokens_mean": 20.0, "truncated_frac": 0.0, "reward_failures": 2}}
    results = {"benchmarks": bench, "mean": {"avg@4": 0.4375, "pass@4": 0.75}}
    percent, counts = format_results(results).split("\n\n")
    rows = {line.split("  ")[0].strip(): line.split()[-3:] for line in percent.splitlines()[1:]}
    assert rows == {"avg@4": ["12.5", "75.0", "43.8"], "pass@4": ["50.0", "100.0", "75.0"]}
    lines = counts.splitlines()
    assert lines[0].split() == ["counts", "a", "b", "all"]
    rows = {line[:16].strip(): line[16:].split() for line in lines[1:]}
    assert rows == {"problems": ["2", "3", "5"], "samples": ["4", "4", "4"],
                    "mean tokens": ["10.0", "20.0", "16.0"],
                    "truncated (%)": ["50.0", "0.0", "20.0"],
                    "reward failures": ["1", "2", "3"]}
    single = format_results({"benchmarks": {"a": bench["a"]}, "mean": {}}).splitlines()
    assert single[0].split() == ["metric", "(%)", "a"] and "all" not in single[4]


# --- benchmark registry and loaders --------------------------------------------------------------

def test_registry_covers_the_shipped_benchmarks():
    assert set(BENCHMARK_FIELDS) <= set(BENCHMARKS) and "aime25" in BENCHMARKS
    assert BENCHMARKS["gsm8k"] == ("openai/gsm8k", "main", "test", "question", "answer")


@pytest.mark.parametrize("name", sorted(BENCHMARK_FIELDS))
def test_local_benchmark_files_load_like_load_benchmark_rows(name):
    """Every row of the real benchmark files gives the same prompt and answer through the registry
    and `load_examples` as through `rewards.benchmarks.load_benchmark_rows`."""
    path = SHARED_BENCHMARKS / f"{name}.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    rows = load_benchmark_rows(path, name)
    examples = load_benchmark(name, benchmark_dir=SHARED_BENCHMARKS)
    assert [(ex.prompt, ex.answer) for ex in examples] == [(r["prompt"], r["answer"]) for r in rows]
    assert [ex.prompt for ex in load_benchmark(name, 3, SHARED_BENCHMARKS)] == \
        [r["prompt"] for r in rows[:3]]


def test_hub_benchmarks_go_through_load_examples(monkeypatch):
    seen = []
    monkeypatch.setattr(evaluate, "load_examples",
                        lambda *args: seen.append(args) or [Example("q", "1")])
    load_benchmark("gsm8k", limit=5)
    load_benchmark("aime25")
    assert seen == [("openai/gsm8k", "test", "main", "question", "answer", 5),
                    ("math-ai/aime25", "test", None, "problem", "answer", None)]


def test_benchmark_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="expected one of math500, aime24"):
        load_benchmark("mmlu")
    with pytest.raises(DataError, match="no amc23.jsonl"):
        load_benchmark("amc23", benchmark_dir=tmp_path)


# --- the command ---------------------------------------------------------------------------------

def test_eval_command_end_to_end(make_tiny, tmp_path):
    """A tiny model on a local jsonl and a local benchmark folder, with the lens policy of block 1."""
    model_dir = make_tiny(num_layers=2, hidden_size=32, intermediate_size=64, head_dim=8)
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"q": f"What is {i}+1?", "a": i + 1}) + "\n"
                            for i in range(3)))
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "amc23.jsonl").write_text(json.dumps(
        {"id": 0, "problem": "Find 2+2.", "question": "Find 2+2.", "answer": 4.0}) + "\n")
    out = tmp_path / "res.json"
    result = runner.invoke(app, [
        "eval", str(model_dir), "--data", str(data), "--prompt-field", "q", "--answer-field", "a",
        "-b", "amc23", "--benchmark-dir", str(bench), "-k", "2", "--pass-k", "1,2,4",
        "--max-tokens", "5", "--layer", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    res = json.loads(out.read_text())
    assert set(res["benchmarks"]) == {"sums", "amc23"}
    sums = res["benchmarks"]["sums"]
    assert sums["problems"] == 3 and sums["samples"] == 2 and len(sums["correct_counts"]) == 3
    assert {"avg@2", "pass@1", "pass@2", "lens@1"} <= set(sums) and "pass@4" not in sums
    assert 0.0 <= sums["avg@2"] <= sums["pass@2"] <= 1.0
    assert set(res["mean"]) == {"avg@2", "pass@1", "pass@2", "lens@1"}
    assert res["settings"]["k"] == 2 and res["settings"]["layer"] == 1
    assert "lens@1" in result.output and "Pass@k for k > 2 skipped" in result.output


def test_eval_command_errors(tiny_dir):
    result = runner.invoke(app, ["eval", str(tiny_dir)])
    assert result.exit_code == 2 and "--benchmark NAME and/or --data FILE" in result.output
    result = runner.invoke(app, ["eval", str(tiny_dir), "-b", "mmlu"])
    assert result.exit_code == 2 and "unknown benchmark 'mmlu'" in result.output
    result = runner.invoke(app, ["eval", str(tiny_dir), "-b", "gsm8k", "--pass-k", "1,x"])
    assert result.exit_code != 0 and "comma-separated integers" in result.output


def test_eval_help_has_examples():
    result = runner.invoke(app, ["eval", "--help"])
    assert result.exit_code == 0 and "Examples:" in result.output
    assert "oisd-mlx eval Qwen/Qwen3-0.6B" in result.output


# --- --data sources, fields and splits -----------------------------------------------------------

def _captured_sets(monkeypatch, args: list[str]):
    """Run `oisd-mlx eval` with `args`, capturing the benchmark sets instead of sampling."""
    seen = {}

    def fake_evaluate(model, tokenizer, sets, *args, **kwargs):
        seen.update(sets)
        return {"benchmarks": {name: {"problems": len(ex), "samples": 1, "avg@1": 0.0}
                               for name, ex in sets.items()}, "mean": {"avg@1": 0.0}}

    monkeypatch.setattr(evaluate, "evaluate_benchmarks", fake_evaluate)
    result = runner.invoke(app, ["eval", *args])
    return result, seen


def test_eval_builtin_test_split_is_the_demo_held_out_set(monkeypatch, tiny_dir):
    """`--data builtin:... --split test` gives exactly the problems the demo's training run
    scores as eval_accuracy (configs/demo.yaml: eval_split test of the same source)."""
    from pathlib import Path

    from mlx_oisd.config import load_config
    from mlx_oisd.trainer import load_eval_examples

    spec = "builtin:arith?digits=1&terms=2&n=61&n_test=20"
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    assert cfg.dataset.source == spec and cfg.eval_split == "test"
    result, sets = _captured_sets(monkeypatch, [str(tiny_dir), "--data", spec, "--split", "test"])
    assert result.exit_code == 0, result.output
    assert list(sets) == ["arith-test"] and sets["arith-test"] == load_eval_examples(cfg)
    assert len(sets["arith-test"]) == 20
    result, sets = _captured_sets(monkeypatch, [str(tiny_dir), "--data", spec, "--split", "train"])
    assert len(sets["arith-train"]) == 61 and not set(sets["arith-train"]) & set(
        load_eval_examples(cfg))
    result = runner.invoke(app, ["eval", str(tiny_dir), "--data", spec + "&split=test"])
    assert result.exit_code == 2 and "--split for oisd-mlx eval" in result.output


def test_eval_mixes_files_with_their_own_fields(monkeypatch, tiny_dir, tmp_path):
    """A GSM8K-style file, a MATH-500-style file (fields detected: problem, and answer rather
    than the worked solution) and one with odd fields named after its path."""
    gsm8k = tmp_path / "gsm8k_test.jsonl"
    gsm8k.write_text(json.dumps({"question": "Q1?", "answer": "work\n#### 1,000"}) + "\n")
    math500 = tmp_path / "math500.jsonl"
    math500.write_text(json.dumps({"problem": "P1?", "solution": "\\boxed{5}", "answer": "4"})
                       + "\n")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"text": "T1?", "gold": 7}) + "\n")
    result, sets = _captured_sets(monkeypatch, [
        str(tiny_dir), "--data", str(gsm8k), "--data", str(math500), "--data", f"{odd}:text:gold",
        "--data", f"{math500}::solution"])
    assert result.exit_code == 0, result.output
    assert sets == {"gsm8k_test": [Example("Q1?", "1000")], "math500": [Example("P1?", "4")],
                    "odd": [Example("T1?", "7")], "math500-4": [Example("P1?", "5")]}
    assert "metric (%)" in result.output and "counts" in result.output


def test_eval_data_field_errors_name_the_flag(tiny_dir, tmp_path):
    math500 = tmp_path / "math500.jsonl"
    math500.write_text(json.dumps({"problem": "P?", "answer": "4"}) + "\n")
    result = runner.invoke(app, ["eval", str(tiny_dir), "--data", f"{math500}:question"])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert (f"line 1 of {math500} has no field 'question' (fields: problem, answer); pass --data "
            f"{math500}:problem") in message and "dataset." not in message
    result = runner.invoke(app, ["eval", str(tiny_dir), "--data", f"{math500}:problem:final"])
    assert f"pass --data {math500}:problem:answer" in " ".join(result.output.split())


@pytest.mark.parametrize("name", sorted(BENCHMARK_FIELDS))
def test_detected_fields_of_the_shipped_benchmark_files_match_the_registry(name):
    """`--data NAME.jsonl` without fields reads the same problems and answers as `-b NAME`."""
    from mlx_oisd.data.sources import load_examples

    path = SHARED_BENCHMARKS / f"{name}.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    assert load_examples(str(path), prompt_field=None, answer_field=None) == load_benchmark(
        name, benchmark_dir=SHARED_BENCHMARKS)


def test_eval_cli_draws_the_samples_of_the_trainers_held_out_evaluation(monkeypatch, tiny_dir):
    """With the demo's eval settings (README: -k 16 --max-tokens 8 --temperature 1.0 --top-p 1.0
    --seed 7) `oisd-mlx eval` samples exactly the completions `trainer.evaluate` scores."""
    from pathlib import Path
    from types import SimpleNamespace

    from mlx_oisd import load
    from mlx_oisd.config import load_config
    from mlx_oisd.rollout import sample
    from mlx_oisd.trainer import evaluate as trainer_evaluate
    from mlx_oisd.trainer import load_eval_examples

    drawn = []

    def recording_sample(*args, **kwargs):
        rollout = sample(*args, **kwargs)
        drawn.append(rollout.completions)
        return rollout

    monkeypatch.setattr(evaluate, "sample", recording_sample)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml",
                      ["rollout_batch_size=64", "eval_samples=6"])  # auto: B*G; 6 for speed
    model, tokenizer = load(tiny_dir)
    run = SimpleNamespace(cfg=cfg, model=model, tokenizer=tokenizer,
                          eval_examples=load_eval_examples(cfg), workers={})
    trainer_evaluate(run)
    by_trainer, drawn[:] = list(drawn), []
    result = runner.invoke(app, [
        "eval", str(tiny_dir), "--data", cfg.dataset.source, "--split", "test", "-k", "16",
        "--max-tokens", "8", "--temperature", "1.0", "--top-p", "1.0", "--seed", "7",
        "--limit", "6"])
    assert result.exit_code == 0, result.output
    assert len(by_trainer) == 2 and drawn == by_trainer  # 4 problems per chunk of 64 rows
