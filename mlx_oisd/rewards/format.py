"""Format reward: did the completion end its reasoning and give one boxed answer?

Rule: `format_reward` is 1.0 when
- every `<think>` the completion opens is closed by a later `</think>` (a `</think>` whose
  `<think>` was in the prompt is fine), and
- the text after the reasoning (`strip_thinking`) holds exactly one `\\boxed{...}` / `\\fbox{...}`,
  written with braces, whose braces balance and whose content is not empty;
else 0.0. Boxes inside the reasoning do not count; a nested `\\boxed{\\boxed{1}}` counts as two.
"""

import re

from .extract import boxed_contents, strip_thinking

_BRACED_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def format_reward(completion: str, answer: str | None = None) -> float:
    """1.0 when `completion` closes its reasoning and gives exactly one boxed answer, else 0.0.

    `answer` is ignored; it is there so every reward has the signature (completion, answer).
    """
    last_open = completion.rfind("<think>")
    if last_open >= 0 and completion.find("</think>", last_open) < 0:
        return 0.0
    text = strip_thinking(completion)
    boxes = boxed_contents(text)  # None for a box whose braces never close
    if len(boxes) != 1 or not (boxes[0] or "").strip():
        return 0.0
    # the brace-less form `\boxed 5` is extractable but not the format we ask for
    return 1.0 if _BRACED_BOX.search(text) else 0.0
