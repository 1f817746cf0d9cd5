"""Tests for mlx_oisd.data: sources, the arith task, prompt rendering and the sampler."""

import ast
import json
import operator
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import hub_error

from mlx_oisd.data import (
    MATH_INSTRUCTION,
    DataError,
    Example,
    PromptSampler,
    load_examples,
    match_split_files,
    render_prompt,
)

SHARED_BENCHMARKS = Path(__file__).resolve().parents[2] / "shared/data/benchmarks"


def write_jsonl(path: Path, rows: list, blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- local files


ROWS = [
    {"question": "What is 1 + 1?", "answer": "2", "idx": 0},
    {"question": "How many?", "answer": 7, "idx": 1},
    {"question": "Half of 5?", "answer": 2.5, "idx": 2},
    {"question": "Float that is whole?", "answer": 27.0, "idx": 3},
]
EXPECTED = [
    Example("What is 1 + 1?", "2"),
    Example("How many?", "7"),
    Example("Half of 5?", "2.5"),
    Example("Float that is whole?", "27"),
]


def test_jsonl_round_trip(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS, blank_after=2)
    assert load_examples(str(path)) == EXPECTED


def test_json_list_round_trip(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS))
    assert load_examples(str(path)) == EXPECTED


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "data.parquet"
    table = pa.table(
        {
            "question": [r["question"] for r in ROWS[:2]],
            "answer": ["2", "7"],
            "extra": [1, 2],
        }
    )
    pq.write_table(table, path)
    assert load_examples(str(path)) == EXPECTED[:2]
    pq.write_table(pa.table({"q": ["a?", "b?"], "a": [3, 4]}), path)  # integer column
    assert load_examples(str(path), prompt_field="q", answer_field="a") == [
        Example("a?", "3"),
        Example("b?", "4"),
    ]


def test_custom_fields_and_boxed_solution(tmp_path):
    rows = [
        {"problem": "Compute $x$.", "solution": "So $x=\\frac{1}{2}$, i.e. \\boxed{\\frac{1}{2}}."},
        {"problem": "Two boxes?", "solution": "First \\boxed{3}, then really \\boxed{4}."},
    ]
    path = write_jsonl(tmp_path / "math.jsonl", rows)
    examples = load_examples(str(path), prompt_field="problem", answer_field="solution")
    assert examples == [Example("Compute $x$.", "\\frac{1}{2}"), Example("Two boxes?", "4")]


def test_gsm8k_answers_are_normalised(tmp_path):
    rows = [
        {"question": "q1", "answer": "She has 3 * 2 = <<3*2=6>>6.\n#### 6"},
        {"question": "q2", "answer": "Total is 1,000 + 234 = 1,234 dollars.\n#### 1,234"},
        {"question": "q3", "answer": "#### 5\nOops, corrected:\n#### 1,234,567"},
        {"question": "q4", "answer": "#### -3.5"},
    ]
    path = write_jsonl(tmp_path / "gsm.jsonl", rows)
    assert [ex.answer for ex in load_examples(str(path))] == ["6", "1234", "1234567", "-3.5"]


def test_max_samples_takes_the_first_rows(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    assert load_examples(str(path), max_samples=2) == EXPECTED[:2]
    assert load_examples(str(path), max_samples=100) == EXPECTED
    with pytest.raises(DataError, match="max_samples"):
        load_examples(str(path), max_samples=0)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_examples(str(path))


def test_missing_field_names_file_line_field_and_keys(tmp_path):
    rows = [ROWS[0], ROWS[1], {"question": "q", "solution": "s"}]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_examples(str(path))
    message = str(err.value)
    assert "line 3 of" in message and str(path) in message
    assert "no field 'answer'" in message
    assert "(fields: question, solution)" in message
    assert "dataset.answer_field" in message

    with pytest.raises(DataError, match=r"line 1 of .*no field 'problem'.*dataset\.prompt_field"):
        load_examples(str(path), prompt_field="problem")


def test_jsonl_line_numbers_count_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [ROWS[0], {"question": "q"}], blank_after=1)
    with pytest.raises(DataError, match="line 3 of"):
        load_examples(str(path))


def test_missing_field_in_json_list_names_the_row(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([ROWS[0], ROWS[1], {"prompt": "p", "answer": "1"}]))
    with pytest.raises(
        DataError, match=r"row 3 of .*data\.json has no field 'question' \(fields: prompt, answer\)"
    ):
        load_examples(str(path))


def test_missing_parquet_column_lists_the_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"question": ["q"], "solution": ["s"]}), path)
    with pytest.raises(DataError) as err:
        load_examples(str(path))
    message = str(err.value)
    assert str(path) in message and "'answer'" in message
    assert "question, solution" in message and "dataset.answer_field" in message


MATH500_ROW = {"problem": "What is $2+2$?", "solution": "So it is $\\boxed{4}$, not 5.",
               "answer": "4", "subject": "Algebra"}


def test_fields_given_as_none_are_detected_on_the_first_row(tmp_path):
    """question/problem/prompt for the prompt; `answer` wins over `solution` (MATH-500 has both:
    the final answer and the worked one), and a lone solution gives its boxed answer."""
    math500 = write_jsonl(tmp_path / "math500.jsonl", [MATH500_ROW, {**MATH500_ROW, "answer": "5"}])
    assert load_examples(str(math500), prompt_field=None, answer_field=None) == [
        Example("What is $2+2$?", "4"), Example("What is $2+2$?", "5")]
    worked = write_jsonl(tmp_path / "worked.jsonl", [{"prompt": "p", "solution": "\\boxed{7}"}])
    assert load_examples(str(worked), prompt_field=None, answer_field=None) == [Example("p", "7")]
    gsm8k = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "q", "answer": "so\n#### 1,200"}])
    assert load_examples(str(gsm8k), prompt_field=None, answer_field=None) == [Example("q", "1200")]
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"problem": ["p"], "solution": ["s \\boxed{3}"], "answer": ["3"]}),
                   tmp_path / "m.parquet")
    assert load_examples(str(tmp_path / "m.parquet"), prompt_field=None,
                         answer_field=None) == [Example("p", "3")]


def test_missing_field_errors_say_where_the_name_comes_from(tmp_path):
    """The default names the config key (with a likely field); `field_hints` names another
    origin, here a command-line flag, and `{prompt}` is the prompt field in use."""
    path = write_jsonl(tmp_path / "math500.jsonl", [MATH500_ROW])
    with pytest.raises(DataError) as err:
        load_examples(str(path))
    assert str(err.value) == (f"line 1 of {path} has no field 'question' (fields: problem, "
                              "solution, answer, subject); set dataset.prompt_field: problem")
    hints = ("pass --data m:{field}", "pass --data m:{prompt}:{field}")
    with pytest.raises(DataError, match=r"no field 'final'.*; pass --data m:problem:answer$"):
        load_examples(str(path), prompt_field="problem", answer_field="final", field_hints=hints)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"text": "t", "label": "1"}])
    with pytest.raises(DataError) as err:
        load_examples(str(odd), prompt_field=None, answer_field=None, field_hints=hints)
    assert str(err.value) == (f"line 1 of {odd} has none of the fields question, problem, "
                              "prompt, query, input (fields: text, label); pass --data m:FIELD")
    with pytest.raises(DataError, match=r"none of the fields answer, .*; pass --data m:text:FIELD"):
        load_examples(str(odd), prompt_field="text", answer_field=None, field_hints=hints)


def test_parse_source_spec(tmp_path):
    from mlx_oisd.data.sources import parse_source_spec

    assert parse_source_spec("a.jsonl:problem:answer") == ("a.jsonl", "problem", "answer")
    assert parse_source_spec("a.jsonl::solution") == ("a.jsonl", None, "solution")
    assert parse_source_spec("o/r:question") == ("o/r", "question", None)
    spec = "builtin:arith?digits=1&terms=2"
    assert parse_source_spec(spec) == (spec, None, None)
    odd = tmp_path / "x:y.jsonl"  # an existing path is taken whole
    odd.write_text("")
    assert parse_source_spec(str(odd)) == (str(odd), None, None)
    with pytest.raises(DataError, match="expected SOURCE\\[:PROMPT_FIELD"):
        parse_source_spec("a.jsonl:p:a:x")


def test_bad_json_line_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"question": "q", "answer": \n')
    with pytest.raises(DataError, match=r"line 2 of .*data\.jsonl: invalid JSON"):
        load_examples(str(path))


@pytest.mark.parametrize(
    "row, pattern",
    [
        ({"question": "q", "answer": None}, "field 'answer' is NoneType"),
        ({"question": "q", "answer": ["1"]}, "field 'answer' is list"),
        ({"question": "q", "answer": True}, "field 'answer' is bool"),
        ({"question": "q", "answer": "  "}, "field 'answer' is empty"),
        ({"question": "q", "answer": "see \\boxed{12"}, "never closes"),
        ({"question": "", "answer": "1"}, "field 'question' is '', expected a non-empty string"),
        ({"question": 5, "answer": "1"}, "field 'question' is 5"),
        (["q", "1"], "is a JSON list, expected an object"),
    ],
)
def test_bad_values_name_the_row(tmp_path, row, pattern):
    path = write_jsonl(tmp_path / "data.jsonl", [ROWS[0], row])
    with pytest.raises(DataError, match=r"line 2 of .*" + re.escape(pattern)):
        load_examples(str(path))


def test_empty_dataset_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="has no rows"):
        load_examples(str(path))


def test_unsupported_and_unknown_sources(tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(DataError, match=r"unsupported file type.*\.jsonl"):
        load_examples(str(csv))
    with pytest.raises(DataError, match="is a folder"):
        load_examples(str(tmp_path))
    with pytest.raises(DataError, match="not a local"):
        load_examples("not a dataset id!")


# ---------------------------------------------------------------- Hugging Face Hub


def test_hub_dataset_offline_error_names_repo_and_suggests_local_file():
    with pytest.raises(DataError) as err:
        load_examples("mlx-oisd-tests/no-such-dataset", split="train")
    message = str(err.value)
    assert "'mlx-oisd-tests/no-such-dataset'" in message
    assert "local .jsonl or .parquet file" in message


def test_unreachable_hub_dataset_fails_after_one_request(hub_down):
    calls = hub_down(hub_error("connect"))
    with pytest.raises(DataError) as err:
        load_examples("mlx-oisd-tests/gsm8k-copy", split="train")
    assert calls == ["dataset_info"]  # not list_repo_files' six tries with backoff
    assert str(err.value) == (
        "the Hugging Face Hub cannot be reached (ConnectError: [Errno -2] Name or service not "
        "known) and dataset 'mlx-oisd-tests/gsm8k-copy' is not in the local Hugging Face cache; "
        "check the network (or proxy), or pass a local .jsonl or .parquet file as dataset.source")


@pytest.mark.parametrize("kind, message", [
    ("404", "dataset 'o/r' does not exist on the Hugging Face Hub; check the id, or pass a local"),
    ("401", "dataset 'o/r' does not exist on the Hugging Face Hub (or it is private: log in "
            "with `hf auth login` or set HF_TOKEN); check the id"),
    ("gated", "dataset 'o/r' is gated or private and this machine may not read it; accept its "
              "terms on https://huggingface.co/datasets/o/r and log in with `hf auth login`"),
])
def test_hub_dataset_refusals_name_the_problem(hub_down, kind, message):
    calls = hub_down(hub_error(kind))
    with pytest.raises(DataError, match=re.escape(message)):
        load_examples("o/r")
    assert calls == ["dataset_info"]


def test_hub_dataset_listing_comes_from_the_one_info_request(hub_down, tmp_path, monkeypatch):
    """Online: dataset_info's file list picks the split's files, fetched through the cache."""
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub import HfApi

    calls = hub_down(AssertionError("no other request"))
    local = write_jsonl(tmp_path / "test.jsonl", ROWS[:3])
    files = ["README.md", "data/train-0.parquet", "data/test.jsonl"]
    monkeypatch.setattr(HfApi, "dataset_info", lambda self, repo: calls.append("dataset_info") or
                        SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in files]))
    fetched = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, f, repo_type: fetched.append((repo, f, repo_type)) or local)
    assert load_examples("o/r", split="test") == EXPECTED[:3]
    assert calls == ["dataset_info"] and fetched == [("o/r", "data/test.jsonl", "dataset")]


def _cache_dataset(cache: Path, repo: str, files: dict[str, list]) -> None:
    """A dataset in the Hub cache layout (refs/main -> snapshots/<commit>/...)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"datasets--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, rows in files.items():
        path = root / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, rows)


def test_hub_dataset_comes_from_the_cache_after_one_failed_request(hub_down, tmp_path,
                                                                   monkeypatch):
    _cache_dataset(tmp_path / "hub", "o/cached", {"data/train.jsonl": ROWS[:2],
                                                  "data/test.jsonl": ROWS[2:]})
    calls = hub_down(hub_error("connect"))
    assert load_examples("o/cached", split="test") == EXPECTED[2:]
    assert calls == ["dataset_info"]
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline mode: not even one request
    assert load_examples("o/cached", split="train") == EXPECTED[:2]
    assert calls == ["dataset_info"]
    with pytest.raises(DataError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\) and dataset "
                                         r"'o/elsewhere' is not in the local Hugging Face cache"):
        load_examples("o/elsewhere")


GSM8K_FILES = [
    ".gitattributes",
    "README.md",
    "main/test-00000-of-00001.parquet",
    "main/train-00000-of-00001.parquet",
    "socratic/test-00000-of-00001.parquet",
    "socratic/train-00000-of-00001.parquet",
]


def test_match_split_files_gsm8k_configs():
    assert match_split_files(GSM8K_FILES, "train", "main") == ["main/train-00000-of-00001.parquet"]
    assert match_split_files(GSM8K_FILES, "test", "socratic") == [
        "socratic/test-00000-of-00001.parquet"
    ]
    with pytest.raises(DataError, match=r"several folders \(main, socratic\).*dataset\.config"):
        match_split_files(GSM8K_FILES, "train")
    with pytest.raises(DataError, match=r"no data file for split 'validation'.*main/train-"):
        match_split_files(GSM8K_FILES, "validation", "main")
    with pytest.raises(DataError, match="config 'nope'"):
        match_split_files(GSM8K_FILES, "train", "nope")


def test_match_split_files_jsonl_and_sharded_layouts():
    math500 = [".gitattributes", "README.md", "test.jsonl"]
    assert match_split_files(math500, "test") == ["test.jsonl"]
    assert match_split_files(math500, "test", "default") == ["test.jsonl"]
    with pytest.raises(DataError, match=r"no data file for split 'train'.*test\.jsonl"):
        match_split_files(math500, "train")

    sharded = [
        "README.md",
        "data/test-00000-of-00001.parquet",
        "data/train-00001-of-00002.parquet",
        "data/train-00000-of-00002.parquet",
    ]
    assert match_split_files(sharded, "train") == [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    ]
    assert match_split_files(sharded, "train", "default") == match_split_files(sharded, "train")


def test_match_split_files_prefers_parquet_and_needs_a_whole_token():
    files = ["train.jsonl", "train-00000-of-00001.parquet", "contest.jsonl", "pretraining.json"]
    assert match_split_files(files, "train") == ["train-00000-of-00001.parquet"]
    assert match_split_files(["contest.jsonl", "test/0000.parquet"], "test") == [
        "test/0000.parquet"
    ]
    assert match_split_files(["gsm8k_train.json"], "train") == ["gsm8k_train.json"]


# ---------------------------------------------------------------- builtin:arith


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def reference_value(question: str) -> int:
    """Evaluate "What is 12 + 3 * 4?" with Python's own grammar, integers and + - * only."""
    match = re.fullmatch(r"What is ([0-9+\-* ]+)\?", question)
    assert match, question

    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        assert isinstance(node, ast.Constant) and type(node.value) is int
        return node.value

    return walk(ast.parse(match.group(1), mode="eval").body)


def test_arith_defaults_and_answers_are_correct():
    train = load_examples("builtin:arith")
    test = load_examples("builtin:arith", split="test")
    assert len(train) == 2000 and len(test) == 200
    for ex in train + test:
        assert re.fullmatch(r"What is \d\d \+ \d\d\?", ex.prompt)
        assert ex.answer == str(reference_value(ex.prompt))


@pytest.mark.parametrize("query", ["digits=3&ops=+-&terms=3&n=300", "ops=+-*&terms=4&n=500"])
def test_arith_mixed_ops_answers_are_correct(query):
    examples = load_examples(f"builtin:arith?{query}") + load_examples(
        f"builtin:arith?{query}", split="test"
    )
    assert any(ex.answer.startswith("-") for ex in examples)  # subtraction goes below zero
    for ex in examples:
        assert ex.answer == str(reference_value(ex.prompt))
    ops = set("".join(re.findall(r" ([+\-*]) ", " ".join(ex.prompt for ex in examples))))
    assert ops == set(re.search(r"ops=([+\-*]+)", query).group(1))


def test_arith_is_deterministic_per_seed():
    a = load_examples("builtin:arith?n=100&seed=3")
    assert a == load_examples("builtin:arith?n=100&seed=3")
    assert a != load_examples("builtin:arith?n=100&seed=4")
    # the held-out split does not depend on the number of train questions
    assert load_examples("builtin:arith?n=100", split="test") == load_examples(
        "builtin:arith?n=50", split="test"
    )


def test_arith_splits_are_disjoint_and_distinct():
    source = "builtin:arith?digits=1&n=70&n_test=11"  # 81 distinct questions: nearly all drawn
    train = {ex.prompt for ex in load_examples(source)}
    test = {ex.prompt for ex in load_examples(source, split="test")}
    assert len(train) == 70 and len(test) == 11
    assert not train & test


@pytest.mark.parametrize(
    "source, pattern",
    [
        ("builtin:arith?digit=3", "unknown parameter 'digit'"),
        ("builtin:arith?digits=abc", "digits='abc' is not valid, expected int"),
        ("builtin:arith?digits=0", "digits='0' is not valid"),
        ("builtin:arith?ops=/", "ops='/' is not valid"),
        ("builtin:arith?ops=++", "ops='\\+\\+' is not valid"),
        ("builtin:arith?terms=1", "terms='1' is not valid, expected int >= 2"),
        ("builtin:arith?n", "malformed parameter 'n'"),
        ("builtin:arith?digits=1&n=100", "only 81 distinct questions"),
    ],
)
def test_arith_parameter_errors(source, pattern):
    with pytest.raises(DataError, match=pattern) as err:
        load_examples(source)
    if "parameter 'n'" not in pattern and "distinct" not in pattern:
        assert "valid: digits (int, default 2), ops (str, default '+'), terms (int" in str(
            err.value
        )


def test_unknown_builtin_and_split():
    with pytest.raises(DataError, match="unknown built-in task 'builtin:algebra'.*builtin:arith"):
        load_examples("builtin:algebra")
    with pytest.raises(DataError, match="splits train, test, not 'validation'"):
        load_examples("builtin:arith", split="validation")
    with pytest.raises(DataError, match="the split is not a parameter.*--split for oisd-mlx eval"):
        load_examples("builtin:arith?digits=1&split=test", split="test")


# ---------------------------------------------------------------- prompts


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_dir):
    from mlx_oisd import load

    return load(tiny_dir)[1]


def test_render_prompt_chat_markers_and_instruction(tiny_tokenizer):
    ids = render_prompt(tiny_tokenizer, "What is 2 + 3?", system_prompt="Be brief.")
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    text = tiny_tokenizer.decode(ids)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?\n"
        "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    im_start = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == 3  # special tokens are single ids, not spelled out in bytes


def test_render_prompt_thinking_and_no_system(tiny_tokenizer):
    text = tiny_tokenizer.decode(render_prompt(tiny_tokenizer, "Q?", enable_thinking=True))
    assert text == "<|im_start|>user\nQ?" + MATH_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------- sampler


def test_sampler_visits_every_index_once_per_epoch():
    n, batch = 10, 3
    sampler = PromptSampler(n, batch, seed=0)
    flat = np.concatenate([next(sampler) for _ in range(10)])  # 30 indices = 3 epochs
    epochs = flat.reshape(3, n)
    for order in epochs:
        assert sorted(order.tolist()) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled
    assert sampler.state_dict() == {"epoch": 3, "position": 0}


def test_sampler_batch_larger_than_dataset():
    sampler = PromptSampler(3, 7, seed=5)
    flat = np.concatenate([next(sampler) for _ in range(3)])  # 21 = 7 epochs
    for order in flat.reshape(7, 3):
        assert sorted(order.tolist()) == [0, 1, 2]


def test_sampler_seed_changes_order():
    a = next(PromptSampler(50, 50, seed=0))
    assert np.array_equal(a, next(PromptSampler(50, 50, seed=0)))
    assert not np.array_equal(a, next(PromptSampler(50, 50, seed=1)))


@pytest.mark.parametrize("stop", [0, 1, 3, 4, 7])
def test_sampler_resume_gives_identical_batches(stop):
    reference = PromptSampler(11, 4, seed=2)
    expected = [next(reference).tolist() for _ in range(12)]

    first = PromptSampler(11, 4, seed=2)
    for _ in range(stop):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = PromptSampler(11, 4, seed=2)
    resumed.load_state_dict(state)
    assert [next(resumed).tolist() for _ in range(12 - stop)] == expected[stop:]


def test_sampler_rejects_bad_state_and_sizes():
    sampler = PromptSampler(5, 2)
    with pytest.raises(ValueError, match="position 5 is out of range"):
        sampler.load_state_dict({"epoch": 0, "position": 5})
    with pytest.raises(ValueError, match="'epoch' must be an integer"):
        sampler.load_state_dict({"position": 0})
    with pytest.raises(ValueError, match="n_examples >= 1"):
        PromptSampler(0, 2)


# ---------------------------------------------------------------- shared benchmark file


@pytest.mark.skipif(
    not (SHARED_BENCHMARKS / "gsm8k.jsonl").is_file(), reason="no shared gsm8k.jsonl"
)
def test_shared_gsm8k_answers_are_plain_numbers():
    examples = load_examples(str(SHARED_BENCHMARKS / "gsm8k.jsonl"))
    assert len(examples) > 1000
    for ex in examples:
        assert re.fullmatch(r"-?\d+(\.\d+)?", ex.answer), ex.answer


# ---------------------------------------------------------------- prompt length limit


def test_fit_prompts_drops_or_left_truncates_long_prompts():
    from mlx_oisd.data.prompts import fit_prompts

    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13]]
    assert fit_prompts(prompts, 4, truncate=False) == ([0, 2, 3], [[1, 2, 3], [9], [10, 11, 12, 13]], [1])
    assert fit_prompts(prompts, 4, truncate=True) == (
        [0, 1, 2, 3], [[1, 2, 3], [5, 6, 7, 8], [9], [10, 11, 12, 13]], [1])
    assert fit_prompts(prompts, 1, truncate=False) == ([2], [[9]], [0, 1, 3])


class _CharTokenizer:
    """One token per character of the rendered text: lengths can be counted by hand."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, enable_thinking):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def encode(self, text, add_special_tokens):
        return [ord(c) for c in text]


def test_render_examples_reports_dropped_rows_and_truncates_from_the_left():
    from mlx_oisd.data.prompts import render_examples

    tok = _CharTokenizer()
    overhead = len(render_prompt(tok, ""))  # template + instruction around an empty question
    examples = [Example("x" * n, str(n)) for n in (1, 50, 2, 80, 3)]
    limit = overhead + 10
    kept, prompts, note = render_examples(tok, examples, limit, False, what="data.jsonl (train)")
    assert [ex.answer for ex in kept] == ["1", "2", "3"]
    assert prompts == [render_prompt(tok, ex.prompt) for ex in kept]
    assert note == (f"data.jsonl (train): dropped 2 of 5 prompts longer than "
                    f"max_prompt_length={limit} tokens (rows 2, 4)")
    kept, prompts, note = render_examples(tok, examples, limit, True)
    assert kept == examples and all(len(p) <= limit for p in prompts)
    assert prompts[3] == render_prompt(tok, "x" * 80)[-limit:]  # the end, with <assistant>, kept
    assert note.endswith(f"truncated 2 of 5 prompts longer than max_prompt_length={limit} "
                         f"tokens (rows 2, 4; longest {overhead + 80})")
    assert render_examples(tok, examples[:1], limit, False)[2] is None
    with pytest.raises(DataError, match=r"all 2 prompts are longer than max_prompt_length=5 tokens "
                                        r"\(longest \d+\); raise max_prompt_length or set truncate"):
        render_examples(tok, examples[:2], 5, False)


def test_dropped_rows_report_is_cut_after_ten():
    from mlx_oisd.data.prompts import render_examples

    tok = _CharTokenizer()
    limit = len(render_prompt(tok, "x"))
    examples = [Example("x" * (1 + (i % 2) * 5), "1") for i in range(30)]
    _, _, note = render_examples(tok, examples, limit, False)
    assert note.endswith("dropped 15 of 30 prompts longer than "
                         f"max_prompt_length={limit} tokens (rows 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, ...)")
