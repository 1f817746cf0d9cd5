"""data/prompts.py through Qwen3's real chat template (tests/fixtures/qwen3_chat_template.jinja,
the `chat_template` of the public Qwen/Qwen3-0.6B tokenizer_config.json, see fixtures/README.md).
"""

from pathlib import Path

import pytest

from mlx_oisd import load
from mlx_oisd.data import MATH_INSTRUCTION, load_examples, prompt_messages, render_prompt
from mlx_oisd.demo import DEMO_TASK, chat_rows

FIXTURE = Path(__file__).parent / "fixtures" / "qwen3_chat_template.jinja"
PACKAGE_COPY = Path(__file__).parents[1] / "mlx_oisd" / "data" / "qwen3_chat_template.jinja"
QWEN3 = FIXTURE.read_text(encoding="utf-8")

# The hand-written template tiny models carried before they used Qwen3's own: the cached
# `builtin:tiny-arith` was warmed up through it, so what it renders for the demo must not move.
WARMUP_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' and not loop.last and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


@pytest.fixture(scope="module")
def qwen_tok(tiny_dir):
    """mlx-lm's tokenizer wrapper of a tiny model, whose template must be Qwen3's own."""
    return load(tiny_dir)[1]


@pytest.fixture(scope="module")
def hf_tok(tiny_dir):
    """The same tokenizer in transformers, to swap templates in."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tiny_dir))


def _text(tok, ids):
    return tok.decode(ids)


def test_package_template_is_the_fixture_byte_for_byte():
    assert PACKAGE_COPY.read_bytes() == FIXTURE.read_bytes()
    # what the fixture is: Qwen3's full template, not a plain-turns subset
    for part in ("enable_thinking is defined and enable_thinking is false", "reasoning_content",
                 "multi_step_tool", "<tool_call>", "<tool_response>"):
        assert part in QWEN3


def test_tiny_models_carry_qwen3s_template(tiny_dir, qwen_tok):
    assert qwen_tok.chat_template == QWEN3


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_render_prompt_exact_text_thinking_on_and_off(qwen_tok, system):
    q = "What is 2 + 3?"
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    user = f"<|im_start|>user\n{q}{MATH_INSTRUCTION}<|im_end|>\n"
    on = _text(qwen_tok, render_prompt(qwen_tok, q, system, enable_thinking=True))
    off = _text(qwen_tok, render_prompt(qwen_tok, q, system, enable_thinking=False))
    # thinking on: the header only, the model opens `<think>` itself
    assert on == head + user + "<|im_start|>assistant\n"
    # thinking off: Qwen3 pre-fills an empty think block, the model answers directly
    assert off == head + user + "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_multi_turn_drops_earlier_reasoning_keeps_the_last(qwen_tok):
    turns = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>\nfirst thoughts\n</think>\n\nA"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "B", "reasoning_content": "second thoughts"},
    ]
    text = qwen_tok.apply_chat_template(turns, tokenize=False)
    assert text == ("<|im_start|>user\na<|im_end|>\n"
                    "<|im_start|>assistant\nA<|im_end|>\n"  # reasoning of an answered turn: gone
                    "<|im_start|>user\nb<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\nsecond thoughts\n</think>\n\nB<|im_end|>\n")
    # a last answer without reasoning still gets the (empty) think block Qwen3 was trained on
    plain = qwen_tok.apply_chat_template(turns[:1] + [{"role": "assistant", "content": "A"}],
                                         tokenize=False)
    assert plain.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>\n")


def test_think_markers_and_eos_survive_encode_decode(qwen_tok):
    """Completions are scored on `tokenizer.decode(ids)`: reasoning tags and the sampled EOS must
    come back as text, not vanish as special tokens."""
    completion = "<think>\nadd 2 and 3\n</think>\n\n\\boxed{5}<|im_end|>"
    assert qwen_tok.decode(qwen_tok.encode(completion, add_special_tokens=False)) == completion


@pytest.mark.parametrize("enable_thinking", [True, False])
@pytest.mark.parametrize("system", [None, "You are a careful calculator."])
def test_demo_prompts_and_warmup_rows_render_as_before(hf_tok, enable_thinking, system):
    """builtin:tiny-arith's prompts and warm-up chats: same text under Qwen3's template as under
    the template its warm-up used."""
    examples = load_examples(DEMO_TASK, "train") + load_examples(DEMO_TASK, "test")
    assert len(examples) == 81

    def rendered(template):
        hf_tok.chat_template = template
        prompts = [_text(hf_tok, render_prompt(hf_tok, ex.prompt, system, enable_thinking))
                   for ex in examples]
        rows = chat_rows(examples)  # the SFT rows: the target and its prompt, as sft.encode_rows
        full = [hf_tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
        heads = [hf_tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True,
                                            tokenize=False) for r in rows]
        return prompts, full, heads

    try:
        before, after = rendered(WARMUP_TEMPLATE), rendered(QWEN3)
    finally:
        hf_tok.chat_template = QWEN3
    assert after == before
    assert all(f.startswith(h) for f, h in zip(after[1], after[2]))  # the prompt is a prefix


def test_prompt_messages_user_turn_holds_the_instruction():
    msgs = prompt_messages("Q?", "sys")
    assert msgs == [{"role": "system", "content": "sys"},
                    {"role": "user", "content": "Q?" + MATH_INSTRUCTION}]
