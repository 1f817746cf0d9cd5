"""Prompt data: sources (local files, Hub datasets, built-in tasks), prompt rendering, sampling."""

from .prompts import MATH_INSTRUCTION, PromptFormat, prompt_messages, render_prompt
from .sampler import PromptSampler
from .sources import (
    DataError,
    Example,
    gold_answer,
    load_examples,
    match_split_files,
)

__all__ = [
    "MATH_INSTRUCTION",
    "DataError",
    "Example",
    "PromptFormat",
    "PromptSampler",
    "gold_answer",
    "load_examples",
    "match_split_files",
    "prompt_messages",
    "render_prompt",
]
