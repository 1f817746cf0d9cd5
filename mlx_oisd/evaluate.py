"""Held-out accuracy: k sampled completions per problem from the acting policy, scored by `math`.

    Avg@k = mean over problems of (correct completions / k)

Sampling goes through `rollout.sample` (all rows of a chunk decode together), so evaluation sees
exactly the policy that training optimises.
"""

import numpy as np

from .data.prompts import render_prompt
from .rewards import MathChecker, score_batch
from .rollout import sample


def avg_at_k(model, tokenizer, examples, k: int = 1, max_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, system_prompt: str | None = None,
             enable_thinking: bool = False, checker: MathChecker | None = None,
             prompts_per_chunk: int = 64) -> tuple[float, np.ndarray]:
    """Avg@k of `examples` (each with .prompt, .answer); returns (avg, per-problem accuracy [n])."""
    per_problem = []
    for start in range(0, len(examples), prompts_per_chunk):
        chunk = examples[start:start + prompts_per_chunk]
        prompts = [render_prompt(tokenizer, ex.prompt, system_prompt, enable_thinking) for ex in chunk]
        rollout = sample(model, prompts, k, max_tokens, tokenizer.eos_token_ids, temperature, top_p)
        texts = [tokenizer.decode(c) for c in rollout.completions]
        answers = [ex.answer for ex in chunk for _ in range(k)]
        workers = {"math": checker} if checker is not None else None
        correct, _, _ = score_batch(texts, answers, [("math", 1.0)], workers)
        per_problem.append(correct.reshape(len(chunk), k).mean(axis=1))
    acc = np.concatenate(per_problem) if per_problem else np.zeros(0)
    return float(acc.mean()) if len(acc) else 0.0, acc
