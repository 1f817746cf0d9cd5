"""Self-speculative decoding: block l's logit lens drafts, the full model verifies.

A model whose block l agrees with its final layer (what OISD trains for) carries its own draft
model: blocks 1..l, the shared final norm and the head, i.e. the logit lens of block l,
W_U · N_L(h^l). One round, from the pending token d_0 (chosen, not yet run through the model):

    draft   for i = 0..k-1:  h^l_i = blocks 1..l (d_i),  q_i = lens(h^l_i),  d_{i+1} ~ q_i
    verify  h^l_k = blocks 1..l (d_k);  p_0..p_k = head(norm(blocks l+1..L (h^l_0..h^l_k)))
    accept  the longest passing prefix d_1..d_m, then one more token from p_m

Blocks 1..l see the same tokens as in the full model, so the keys / values (and h^l) the draft
computes for d_0..d_{k-1} are the full model's: the verifier runs blocks 1..l on d_k alone and
blocks l+1..L on the k+1 positions, in one pass, over one KV cache shared by draft and verifier.
Every cache then holds d_0..d_k; the rejected positions are trimmed from every block's cache, so
after a generation the cache holds the prompt and every generated token but the last, as plain
decoding's does.

Acceptance (Leviathan et al. 2023; Chen et al. 2023): p and q are the target and draft
distributions after the plain sampler's own processing (mlx-lm's top_p, min_p, top_k filters on
the log-probs, in `make_sampler`'s order, then the temperature). Draft token x_i is kept with
probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the token is drawn from
normalize(max(0, p_m - q_m)); after k acceptances a bonus token is drawn from p_k. Each token so
has exactly the plain sampler's distribution. Greedy (temp 0): keep while the draft equals the
full model's argmax, then take that argmax: the output is plain greedy decoding's (up to float
rounding between one k+1-token pass and k+1 one-token passes).
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.generate import GenerationResponse
from mlx_lm.models.cache import make_prompt_cache

from .rollout import Rollout, filter_logprobs


@dataclass
class DraftStats:
    """Counts of a speculative generation (summed over rounds)."""

    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of them kept by the verifier
    rejected: int = 0  # rounds that ended at a rejected draft (the others kept all k)
    passes: int = 0  # verify passes (rounds); each yields accepted + 1 tokens at most
    tokens: int = 0  # tokens generated
    seconds: float = 0.0  # wall time of the generation, prefill included

    @property
    def acceptance(self) -> float | None:
        """accepted / drafted."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def per_token(self) -> float | None:
        """Per-token acceptance a (each draft kept with probability a given the earlier ones
        were): accepted / (accepted + rejected), the estimate under that model."""
        judged = self.accepted + self.rejected
        return self.accepted / judged if judged else None


@dataclass
class SpeculativeResponse(GenerationResponse):
    """mlx-lm's `GenerationResponse` with the draft counts so far."""

    drafted: int = 0
    accepted: int = 0


def check_draft(model, draft_layer: int, draft_tokens: int) -> None:
    """ValueError unless block `draft_layer` can draft for `model` (1..L-1) and draft_tokens >= 1."""
    L = len(model.layers)
    if not hasattr(model, "lens") or not hasattr(model.model, "run_blocks"):
        raise ValueError("speculative decoding needs mlx-oisd's Qwen3 model (mlx_oisd.load)")
    if isinstance(draft_layer, bool) or not isinstance(draft_layer, int) \
            or not 1 <= draft_layer <= L - 1:
        raise ValueError(f"--draft-layer {draft_layer!r}: expected a block in 1..{L - 1} for this "
                         f"{L}-block model (the draft is blocks 1..l and the shared head)")
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise ValueError(f"--draft-tokens {draft_tokens!r}: expected an integer >= 1")


def sampling_logprobs(logits: mx.array, temp: float, top_p: float = 1.0, min_p: float = 0.0,
                      top_k: int = 0) -> mx.array:
    """(R, V) logits -> (R, V) log-probs of the distribution the plain sampler draws from:
    log-softmax, mlx-lm's filters (`rollout.filter_logprobs`), then the temperature, renormalised
    in float32. temp 0: the log-softmax in the logits' dtype, whose argmax is the greedy token."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if temp == 0:
        return logprobs
    if top_k >= logits.shape[-1]:
        top_k = 0  # keeping every token is no filter (mlx-lm's apply_top_k refuses k >= V)
    scaled = filter_logprobs(logprobs.astype(mx.float32), top_p, min_p, top_k) * (1.0 / temp)
    return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)


def accept_greedy(logp: mx.array, draft: mx.array) -> tuple[mx.array, mx.array]:
    """Greedy verification. logp (k+1, V) target log-probs at d_0..d_k, draft (k,) d_1..d_k.
    Returns (m, token): the number of leading drafts equal to the target's argmax, and the
    argmax after them."""
    target = mx.argmax(logp, axis=-1)  # (k+1,)
    if draft.size == 0:
        return mx.array(0), target[0]
    m = mx.sum(mx.cumprod((target[:-1] == draft).astype(mx.int32)))
    return m, target[m]


def accept_draft(logp: mx.array, logq: mx.array, draft: mx.array) -> tuple[mx.array, mx.array]:
    """Speculative sampling's verification of a round (global RNG, as mlx-lm's sampler).

    logp (..., k+1, V) target log-probs at d_0..d_k, logq (..., k, V) draft log-probs at
    d_0..d_{k-1}, draft (..., k) the drafted d_1..d_k (d_{i+1} drawn from q_i); leading axes
    are independent rounds. d_{i+1} is kept with probability min(1, p_i / q_i) at d_{i+1}, up to
    the first rejection. Returns (m, token), each (...): the m leading drafts kept and the next
    token, drawn from normalize(max(0, p_m - q_m)), or from p_k when all k were kept."""
    k = draft.shape[-1]
    p = mx.exp(logp)
    q = mx.concatenate([mx.exp(logq), mx.zeros_like(p[..., :1, :])], axis=-2)  # q_k = 0: p_k
    if k == 0:
        m = mx.zeros(draft.shape[:-1], mx.int32)
    else:
        idx = draft[..., None]
        ratio = (mx.take_along_axis(logp[..., :k, :], idx, -1)
                 - mx.take_along_axis(logq, idx, -1))[..., 0]  # (..., k) log p/q at the drafts
        keep = mx.log(mx.random.uniform(shape=ratio.shape)) < ratio  # u < min(1, p/q), u < 1
        m = mx.sum(mx.cumprod(keep.astype(mx.int32), axis=-1), axis=-1)
    at_m = m[..., None, None]
    p_m = mx.take_along_axis(p, at_m, -2)[..., 0, :]
    residual = mx.maximum(p_m - mx.take_along_axis(q, at_m, -2)[..., 0, :], 0.0)
    residual = mx.where(mx.sum(residual, -1, keepdims=True) > 0, residual, p_m)  # p_m == q_m
    return m, mx.random.categorical(mx.log(residual))


def prefill(model, ids: list[int], cache, step: int = 2048) -> None:
    """Run `ids` through every block into `cache` (mlx-lm's chunked prefill), no logits."""
    body, L = model.model, len(model.layers)
    for s in range(0, len(ids), step):
        body.run_blocks(body.embed_tokens(mx.array(ids[s:s + step])[None]), cache, 0, L)
        mx.eval([c.state for c in cache])


def speculative_generate_step(
    model, prompt: list[int], draft_layer: int, draft_tokens: int = 4, max_tokens: int = 256,
    temp: float = 0.0, top_p: float = 1.0, min_p: float = 0.0, top_k: int = 0,
    stop_ids=(), prompt_cache=None, stats: DraftStats | None = None,
    accept: Callable = accept_draft,
) -> Iterator[tuple[int, bool]]:
    """Decode after `prompt` [P] (the tokens not yet in `prompt_cache`, P >= 1) by rounds of
    `draft_tokens` drafts from block `draft_layer`. Yields (token, from_draft) until a token of
    `stop_ids` (yielded) or `max_tokens` tokens. `prompt_cache` (mlx-lm's, as `make_prompt_cache`)
    is updated in place: at the end it holds the prompt and every token but the last. `stats`
    receives the counts. `accept` (default `accept_draft`; temp 0 always verifies greedily) is
    the acceptance rule, a test hook."""
    check_draft(model, draft_layer, draft_tokens)
    if len(prompt) == 0:
        raise ValueError("speculative decoding: empty prompt")
    body, L, l = model.model, len(model.layers), draft_layer
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    stats = stats if stats is not None else DraftStats()
    stop = set(stop_ids)
    tic = time.perf_counter()
    prefill(model, list(prompt[:-1]), cache)

    def dist(h):  # (1, T, D) -> (T, V) log-probs of the sampled distribution
        return sampling_logprobs(model.lens(h)[0], temp, top_p, min_p, top_k)

    def pick(logprobs):  # (1, V) -> (1,)
        return mx.argmax(logprobs, -1) if temp == 0 else mx.random.categorical(logprobs)

    pending, n = int(prompt[-1]), 0
    try:
        while n < max_tokens:
            k = min(draft_tokens, max_tokens - n - 1)  # a round yields at most k + 1 tokens
            token = mx.array([pending])
            hidden, logq, drafts = [], [], []
            for _ in range(k):  # draft: blocks 1..l and the lens, one token at a time
                h = body.run_blocks(body.embed_tokens(token[None]), cache, 0, l)
                hidden.append(h)
                logq.append(dist(h))
                token = pick(logq[-1]).astype(mx.int32)
                drafts.append(token)
            h = body.run_blocks(body.embed_tokens(token[None]), cache, 0, l)  # d_k's blocks 1..l
            h = body.run_blocks(mx.concatenate(hidden + [h], axis=1), cache, l, L)
            logp = dist(h)  # (k+1, V)
            draft = mx.concatenate(drafts) if k else mx.zeros((0,), mx.int32)
            if temp == 0:
                m, nxt = accept_greedy(logp, draft)
            else:
                V = logp.shape[-1]
                m, nxt = accept(logp, mx.concatenate(logq) if k else mx.zeros((0, V)), draft)
            mx.eval(m, nxt, draft)
            m = int(m.item())
            out = draft.tolist()[:m] + [int(nxt.item())]
            ends = [j for j, t in enumerate(out) if t in stop]
            out = out[:ends[0] + 1] if ends else out
            for c in cache:  # the cache held d_0..d_k; keep d_0..d_{len(out)-1}
                c.trim(k + 1 - len(out))
            stats.drafted += k
            stats.accepted += m
            stats.rejected += m < k
            stats.passes += 1
            for j, t in enumerate(out):
                n += 1
                stats.tokens += 1
                yield t, j < m
            if ends:
                return
            pending = out[-1]
    finally:
        stats.seconds += time.perf_counter() - tic


def stream_speculative(model, tokenizer, ids: list[int], draft_layer: int, draft_tokens: int = 4,
                       max_tokens: int = 512, temp: float = 0.0, top_p: float = 1.0,
                       min_p: float = 0.0, top_k: int = 0) -> Iterator[SpeculativeResponse]:
    """`speculative_generate_step` as mlx-lm's `stream_generate`: text pieces (end-of-sequence
    token left out), the last response carrying the statistics. As mlx-lm's speculative
    decoding, prompt_tps counts the time to the first token, generation_tps the rest."""
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    stats = DraftStats()
    steps = speculative_generate_step(model, ids, draft_layer, draft_tokens, max_tokens, temp,
                                      top_p, min_p, top_k, tokenizer.eos_token_ids, stats=stats)
    tic = time.perf_counter()
    token, n, prompt_tps, from_draft = None, 0, 0.0, False

    def response(token, n, from_draft, finish_reason=None):
        return SpeculativeResponse(
            text=detokenizer.last_segment, token=token, logprobs=None, from_draft=from_draft,
            prompt_tokens=len(ids), prompt_tps=prompt_tps, generation_tokens=n + 1,
            generation_tps=(n + 1) / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish_reason,
            drafted=stats.drafted, accepted=stats.accepted)

    for n, (token, from_draft) in enumerate(steps):
        if n == 0:
            prompt_tps = len(ids) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        if token in tokenizer.eos_token_ids:
            break
        detokenizer.add_token(token)
        if n + 1 == max_tokens:
            break
        yield response(token, n, from_draft)
    detokenizer.finalize()
    yield response(token, n, from_draft,
                   "stop" if token in tokenizer.eos_token_ids else "length")


def speculative_sample(model, prompts: list[list[int]], group_size: int, max_tokens: int,
                       stop_ids, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                       min_p: float = 0.0, *, draft_layer: int, draft_tokens: int = 4,
                       stats: DraftStats | None = None) -> Rollout:
    """`rollout.sample`'s contract by speculative decoding, one sequence at a time (global RNG):
    `group_size` completions per prompt, each prompt prefilled once and its cache trimmed back
    to it between completions. `stats` receives the counts of all of them."""
    check_draft(model, draft_layer, draft_tokens)
    completions, stop = [], set(stop_ids)
    for prompt in prompts:
        cache = make_prompt_cache(model)
        prefill(model, prompt[:-1], cache)
        for _ in range(group_size):
            tokens = [t for t, _ in speculative_generate_step(
                model, prompt[-1:], draft_layer, draft_tokens, max_tokens, temperature, top_p,
                min_p, top_k, stop, prompt_cache=cache, stats=stats)]
            completions.append(tokens)
            for c in cache:
                c.trim(c.offset - (len(prompt) - 1))
    truncated = [not (c and c[-1] in stop) for c in completions]
    return Rollout(list(prompts), completions, truncated, group_size)
