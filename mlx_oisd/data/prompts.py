"""The prompt a policy sees: chat template around the question and an instruction.

`render_prompt` builds `[system?, user]` messages, the user turn being the question followed by
the instruction (`dataset.instruction`; default `MATH_INSTRUCTION`, the suffix Qwen's math
evaluations use; None for none), renders them with the tokenizer's chat template with the
assistant header open, and returns the token ids. `enable_thinking` reaches Qwen3's template:
False pre-fills an empty `<think>` block, True lets the model reason. `PromptFormat` holds the
three settings, so train, eval, lens, generate and the model card use one format.

`render_examples` renders a whole dataset once and applies `max_prompt_length` (TRL's name:
tokens of the rendered prompt): longer prompts are dropped and reported, or cut from the left.
No prompt of any size reaches the model, whose attention over a huge prompt would exhaust memory.
"""

from dataclasses import dataclass

from .sources import DataError, Example

_SHOWN_ROWS = 10  # rows named in the dropped-prompts report

MATH_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def prompt_messages(question: str, system_prompt: str | None = None,
                    instruction: str | None = MATH_INSTRUCTION) -> list[dict[str, str]]:
    """Chat messages for `question`: an optional system turn, then the user turn (the question,
    then `instruction` when it is not None)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": question + (instruction or "")}]


def render_prompt(
    tokenizer, question: str, system_prompt: str | None = None, enable_thinking: bool = False,
    instruction: str | None = MATH_INSTRUCTION,
) -> list[int]:
    """Token ids of the templated prompt, ending with the assistant header.

    tokenizer: mlx-lm's TokenizerWrapper or a Hugging Face tokenizer with a chat template.
    The text is encoded without adding special tokens: the template already holds them.
    """
    text = tokenizer.apply_chat_template(
        prompt_messages(question, system_prompt, instruction),
        add_generation_prompt=True,
        tokenize=False,
        enable_thinking=enable_thinking,
    )
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes a prompt: the run's `dataset.system_prompt`,
    `dataset.instruction` and `enable_thinking` (`PromptFormat.of(cfg)`)."""

    system_prompt: str | None = None
    instruction: str | None = MATH_INSTRUCTION
    enable_thinking: bool = False

    @classmethod
    def of(cls, cfg) -> "PromptFormat":
        """The format of a TrainConfig."""
        d = cfg.dataset
        return cls(d.system_prompt, d.instruction, cfg.enable_thinking)

    def render(self, tokenizer, question: str) -> list[int]:
        return render_prompt(tokenizer, question, self.system_prompt, self.enable_thinking,
                             self.instruction)

    def messages(self, question: str) -> list[dict[str, str]]:
        return prompt_messages(question, self.system_prompt, self.instruction)


def fit_prompts(
    prompts: list[list[int]], max_len: int, truncate: bool
) -> tuple[list[int], list[list[int]], list[int]]:
    """Apply a prompt length limit: returns (kept indices, their token ids, too-long indices).

    A prompt longer than `max_len` tokens is dropped, or with `truncate` kept as its last
    `max_len` tokens (left truncation, as TRL: the end of the prompt, where the assistant turn
    opens, is what the completion continues)."""
    long = [i for i, p in enumerate(prompts) if len(p) > max_len]
    if truncate:
        return list(range(len(prompts))), [p[-max_len:] for p in prompts], long
    skip = set(long)
    kept = [i for i in range(len(prompts)) if i not in skip]
    return kept, [prompts[i] for i in kept], long


def render_examples(
    tokenizer, examples: list[Example], max_len: int, truncate: bool,
    fmt: PromptFormat = PromptFormat(), what: str = "dataset",
) -> tuple[list[Example], list[list[int]], str | None]:
    """Render every example once and apply `max_len` (`fit_prompts`).

    Returns the kept examples, their prompt ids, and a one-line report of what was dropped or
    truncated (None when every prompt fits). Raises DataError when every prompt is too long.
    """
    ids = [fmt.render(tokenizer, ex.prompt) for ex in examples]
    kept, prompts, long = fit_prompts(ids, max_len, truncate)
    if not long:
        return examples, prompts, None
    rows = ", ".join(str(i + 1) for i in long[:_SHOWN_ROWS])
    rows += ", ..." if len(long) > _SHOWN_ROWS else ""
    longest = max(len(ids[i]) for i in long)
    limit = f"max_prompt_length={max_len} tokens"
    if truncate:
        return examples, prompts, (f"{what}: truncated {len(long)} of {len(ids)} prompts longer "
                                   f"than {limit} (rows {rows}; longest {longest})")
    if not kept:
        raise DataError(f"{what}: all {len(ids)} prompts are longer than {limit} (longest "
                        f"{longest}); raise max_prompt_length or set truncate_prompts: true")
    note = f"{what}: dropped {len(long)} of {len(ids)} prompts longer than {limit} (rows {rows})"
    return [examples[i] for i in kept], prompts, note
