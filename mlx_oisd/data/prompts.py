"""The prompt a policy sees: chat template around the question and Qwen's math instruction.

`render_prompt` builds `[system?, user]` messages, the user turn being the question followed by
`MATH_INSTRUCTION` (the suffix Qwen's math evaluations use), renders them with the tokenizer's
chat template with the assistant header open, and returns the token ids. `enable_thinking`
reaches Qwen3's template: False pre-fills an empty `<think>` block, True lets the model reason.
"""

MATH_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def prompt_messages(question: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """Chat messages for `question`: an optional system turn, then the user turn."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": question + MATH_INSTRUCTION}]


def render_prompt(
    tokenizer, question: str, system_prompt: str | None = None, enable_thinking: bool = False
) -> list[int]:
    """Token ids of the templated prompt, ending with the assistant header.

    tokenizer: mlx-lm's TokenizerWrapper or a Hugging Face tokenizer with a chat template.
    The text is encoded without adding special tokens: the template already holds them.
    """
    text = tokenizer.apply_chat_template(
        prompt_messages(question, system_prompt),
        add_generation_prompt=True,
        tokenize=False,
        enable_thinking=enable_thinking,
    )
    return tokenizer.encode(text, add_special_tokens=False)
