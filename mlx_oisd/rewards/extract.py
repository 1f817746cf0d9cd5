"""Find the final answer in a completion: think-block removal and answer extraction.

Rules, in the order they apply:
- `strip_thinking` drops reasoning: every closed `<think>...</think>` block; then, if a `</think>`
  is left without its `<think>` (the chat template opened the block in the prompt), everything up
  to the last `</think>`; then, if a `<think>` is left open (generation stopped while thinking),
  everything from it to the end.
- `extract_answer` reads the text up to its first end-of-turn token (`<|im_end|>`,
  `<|endoftext|>`: a decoded completion ends with the EOS it sampled), and returns the content of
  the LAST `\\boxed{...}` / `\\fbox{...}` with balanced braces (or `\\boxed 5`, the brace-less
  form); else the text after the last `#### ` (GSM8K);
  else the rest of the last `Answer: X` / `The (final) answer is X` line; else None.
  The result loses surrounding whitespace, `$` and `\\( \\)` delimiters and one trailing period.
"""

import re

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*")
_GSM8K = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_ANCHOR = re.compile(r"answer\s+is|answer\s*(?:\*\*)?\s*:", re.IGNORECASE)
END_OF_TURN = ("<|im_end|>", "<|endoftext|>")  # Qwen's EOS tokens, kept in decoded completions
_END_OF_TURN = re.compile("|".join(re.escape(t) for t in END_OF_TURN))


def strip_thinking(text: str) -> str:
    """`text` without its reasoning: closed think blocks, an orphan `</think>` prefix, an open tail."""
    text = _THINK_BLOCK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the `{...}` group opening at `text[start]`, and the index after it; None if open.

    Escaped braces (`\\{`, `\\}`, as in `\\left\\{ ... \\right.`) do not count.
    """
    depth = 0
    i = start
    while i < len(text):
        if text[i] == "\\":
            i += 2  # a backslash escapes the next character: \{ and \} are not groups
            continue
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def boxed_contents(text: str) -> list[str | None]:
    """Every `\\boxed`/`\\fbox` in `text`, in order: its content, or None when its braces never close.

    The brace-less form `\\boxed 5` gives the token up to the next space or `$`.
    """
    found = []
    for match in _BOX_START.finditer(text):
        end = match.end()
        if end < len(text) and text[end] == "{":
            group = _braced(text, end)
            found.append(group[0] if group else None)
        elif match.group().endswith(" ") or match.group().endswith("\n"):
            token = re.match(r"[^\s$]+", text[end:])
            found.append(token.group() if token else None)
        # `\boxedx` with neither a brace nor a space is not a box
    return found


def clean_answer(answer: str) -> str:
    """Drop surrounding whitespace, `$`, `\\( \\)` / `\\[ \\]` delimiters and one trailing period."""
    answer = answer.strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right):
            answer = answer[len(left) : -len(right)].strip()
    answer = answer.strip("$").strip()
    if answer.endswith(".") and not answer.endswith(("..", "\\right.")):
        answer = answer[:-1].rstrip()
    return answer.strip("$").strip()


def _answer_lines(text: str) -> list[str]:
    """The rest of the line after the last `answer is` / `answer:` anchor (one item), or []."""
    anchors = list(_ANSWER_ANCHOR.finditer(text))
    if not anchors:
        return []
    rest = text[anchors[-1].end() :].split("\n", 1)[0].strip(" \t*:")
    math = re.match(r"(\$+)(.+?)\1", rest)
    if math:  # "The final answer is $\frac{1}{2}$. I hope it is correct."
        return [math.group(2)]
    # markdown bold around the answer ("**Answer:** **5**."), then the first sentence only
    return [re.split(r"\.\s", rest + " ", maxsplit=1)[0].strip(" \t*:")]


def extract_answer(text: str) -> str | None:
    """The final answer of `text` (see the module docstring for the rule), or None when there is none.

    Call `strip_thinking` first if the text may contain reasoning blocks.
    """
    text = _END_OF_TURN.split(text, maxsplit=1)[0]  # else "#### 5<|im_end|>" reads "5<|im_end|>"
    boxed = [b for b in boxed_contents(text) if b is not None]
    if boxed:
        candidates = boxed
    else:
        candidates = _GSM8K.findall(text) or _answer_lines(text)
    if not candidates:
        return None
    answer = clean_answer(candidates[-1])
    return answer or None


def gsm8k_gold(answer_field: str) -> str:
    """The reference of a GSM8K `answer` field: the text after `####`, without thousands commas.

    Raises ValueError when the field has no `####` line.
    """
    if "####" not in answer_field:
        raise ValueError(f"GSM8K answer has no '####' line: {answer_field[-80:]!r}")
    gold = answer_field.rsplit("####", 1)[1].strip()
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", gold)
