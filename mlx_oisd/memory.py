"""A memory plan: the peak of a training run, estimated from config.json and the TrainConfig alone.

Nothing is loaded. The components, in bytes (b = bytes per element of the model's dtype):

- weights: every parameter in its dtype; a quantized layer (config.json `quantization`, or QLoRA
  `quantize`, which mlx quantizes at load: every Linear and the embedding) holds `bits / 8` bytes
  per weight plus a scale and a bias in b per group of `group_size`; norms stay in b.
- optimizer: trainable parameters, their gradients and AdamW's two moments (mlx keeps the
  moments in the parameter's dtype: float32 for LoRA, b for full fine-tuning), plus one more
  gradient copy when micro-batches accumulate.
- reference: full fine-tuning with `beta > 0` keeps a frozen copy of the starting weights for the
  KL term (LoRA's reference is the same weights with the adapters switched off: nothing).
- rollout: the KV cache of `rollout_batch_size` rows, `L * 2 * H_kv * Dh * b * (P + C)` per row
  (mlx-lm allocates the completion in steps of 256 positions), the caches of the prompts entering
  the batch, and a few float32 (rows, V) logits of a decode step.
- update: one micro-batch of `minibatch_size` rows through `objective.forward`: each block keeps
  its activations for the backward pass, per prompt token of each distinct prompt (the prompt is
  computed once) and per response token of each row, plus each row's gathered keys/values over
  P + C positions; the chunked vocabulary loss (a few float32 (rows, V) arrays of
  `objective.chunk_rows` rows); with OISD attention alignment, float32 (N, H, C, P + C)
  probabilities for each student block and the final block, and the JS intermediates.

The peak is weights + reference + optimizer + max(rollout, update): rollouts and updates do not
overlap.
The budget is `memory_limit_gb` when set, else Metal's recommended working set, else the RAM.

The activation and loss coefficients are counts of arrays, calibrated against
`mx.get_peak_memory()` on tiny models of varied shapes with the CPU build (tests/test_memory.py
holds every component within 25%). They include the (H, C, P + C) attention probabilities that
the unfused attention keeps per block; where Metal's fused attention keeps fewer, the update term
is an overestimate. The weights and optimizer terms are exact counts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx

from .config import ConfigError, TrainConfig
from .objective import CHUNK_LOGITS, MIN_CHUNK_ROWS

GB = 1e9
KV_STEP = 256  # mlx-lm's KVCache / BatchKVCache grow in steps of 256 positions
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Arrays mlx keeps for the backward pass, measured with `mx.get_peak_memory()` on tiny models of
# varied shapes (tests/test_memory.py holds the totals within 25%). Per block and token, in the
# model's dtype: multiples of D (residual stream, norm outputs, o_proj / down_proj outputs), of I
# (gate, up, silu(gate), their product), of H * Dh (q and its normed / rotated forms, the
# attention output) and of H_kv * Dh (k, v and their forms); per block and row, the attention
# probabilities (H, C, P + C) of mlx's unfused attention and the prompt's gathered keys/values.
# In a bf16 / fp16 model each LoRA layer's input is also kept as the float32 copy that
# `x @ lora_a` (float32 adapters) promotes it to.
_ACT_D, _ACT_I, _ACT_Q, _ACT_KV, _ACT_PROBS = 6, 6, 5, 4, 1.5
_LOGIT_ARRAYS = 3  # float32 (rows, V) arrays of a decode step (logits, log-softmax, sample)
# float32 (chunk, V) arrays of one chunk of the vocabulary loss (logits, softmax, log-softmax and
# the gradient taken in the same pass), and the extra ones per logit-lens student
_LOSS_ARRAYS, _LOSS_ARRAYS_PER_STUDENT = 15, 8
# float32 (N, H, C, P + C) arrays of OISD attention alignment: the first student block with the
# final block (beyond the attention the blocks keep anyway), then each further student block
_ATTN_FIRST, _ATTN_PER_STUDENT = 4, 8
_KEPT = 0.6  # share of the blocks' peak that the forward pass keeps for the backward pass


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs from a Qwen3 config.json."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    dtype_bytes: int
    quant_bits: int | None = None  # a quantized checkpoint (mlx-lm `quantization`)
    quant_group: int | None = None
    quant_affine: bool = True  # affine: a scale and a bias per group; mxfp4 etc.: a 1-byte scale

    @classmethod
    def from_config(cls, config: dict, source: str = "config.json") -> ModelShape:
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            q = config.get("quantization") or {}  # mlx-lm's; per-layer overrides are ignored
            dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
            return cls(
                layers=int(config["num_hidden_layers"]), hidden=hidden,
                intermediate=int(config["intermediate_size"]), heads=heads,
                kv_heads=int(config.get("num_key_value_heads", heads)),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab=int(config["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", False)),
                dtype_bytes=_DTYPE_BYTES.get(str(dtype), 2),
                quant_bits=q.get("bits"), quant_group=q.get("group_size"),
                quant_affine=q.get("mode", "affine") == "affine",
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{source}: not a Qwen3 config.json the memory plan can read "
                              f"(missing or bad {e}); expected hidden_size, num_hidden_layers, "
                              "intermediate_size, num_attention_heads, vocab_size") from None

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each Linear of a block."""
        D, I = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"self_attn.q_proj": (D, q), "self_attn.k_proj": (D, kv),
                "self_attn.v_proj": (D, kv), "self_attn.o_proj": (q, D),
                "mlp.gate_proj": (D, I), "mlp.up_proj": (D, I), "mlp.down_proj": (I, D)}

    def matrix_params(self) -> int:
        """Elements of every Linear and of the embedding / LM head (the quantizable weights)."""
        block = sum(i * o for i, o in self.linear_dims().values())
        return self.layers * block + self.vocab * self.hidden * (1 if self.tied else 2)

    def vector_params(self) -> int:
        """Elements of the norms (never quantized)."""
        return self.layers * (2 * self.hidden + 2 * self.head_dim) + self.hidden


@dataclass
class MemoryPlan:
    """Estimated peak of a run, in bytes, and the values the plan chose."""

    weights: int
    optimizer: int
    rollout: int
    update: int
    budget: int
    budget_source: str  # "memory_limit_gb", "Metal recommended working set" or "system RAM"
    rollout_batch_size: int
    minibatch_size: int  # rows per update micro-batch (the whole batch when not split)
    prompt_length: int
    completion_length: int
    reference: int = 0  # frozen copy of the starting weights (full fine-tuning with beta > 0)

    @property
    def total(self) -> int:
        return self.weights + self.reference + self.optimizer + max(self.rollout, self.update)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def to_json(self) -> dict:
        """Plain dict: one `<component>_gb` field per component, `total_gb`, `budget_gb`, ..."""
        gb = {k: round(getattr(self, k) / GB, 4)
              for k in ("weights", "reference", "optimizer", "rollout", "update", "total",
                        "budget")}
        return {**{f"{k}_gb": v for k, v in gb.items()}, "fits": self.fits,
                "budget_source": self.budget_source,
                "rollout_batch_size": self.rollout_batch_size,
                "minibatch_size": self.minibatch_size, "prompt_length": self.prompt_length,
                "completion_length": self.completion_length}

    def summary(self) -> str:
        """A few lines: the components in GB, the total against the budget, the chosen values."""
        rows = [("weights", self.weights), ("optimizer (trainable + grads + AdamW)", self.optimizer),
                *([("reference (frozen starting weights, beta > 0)", self.reference)]
                  if self.reference else []),
                (f"rollout ({self.rollout_batch_size} rows decoding)", self.rollout),
                (f"update ({self.minibatch_size} rows per micro-batch)", self.update)]
        lines = [f"  {name:<50} {b / GB:9.3f} GB" for name, b in rows]
        verdict = "fits" if self.fits else f"does NOT fit (over by {(self.total - self.budget) / GB:.2f} GB)"
        peak = "peak = weights + " + ("reference + " if self.reference else "") + \
            "optimizer + max(rollout, update)"
        lines.append(f"  {peak:<50} "
                     f"{self.total / GB:9.3f} GB")
        lines.append(f"  {'budget (' + self.budget_source + ')':<50} {self.budget / GB:9.3f} GB: "
                     f"{verdict}")
        lines.append(f"  prompt <= {self.prompt_length} + completion <= {self.completion_length} tokens")
        return "memory plan:\n" + "\n".join(lines)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def weight_bytes(shape: ModelShape, bits: int | None = None, group_size: int | None = None) -> int:
    """Every parameter: quantized matrices when `bits` (or the checkpoint's quantization)."""
    affine = shape.quant_affine or bits is not None  # QLoRA quantizes in affine mode
    bits, group_size = bits or shape.quant_bits, group_size or shape.quant_group
    b, n = shape.dtype_bytes, shape.matrix_params()
    if bits is None:
        return (n + shape.vector_params()) * b
    per_group = 2 * b if affine else 1
    return n * bits // 8 + (n // group_size) * per_group + shape.vector_params() * b


def optimizer_bytes(shape: ModelShape, cfg: TrainConfig, accumulate: bool) -> int:
    """Trainable parameters + gradients + AdamW's two moments (+ an accumulated gradient).

    Full fine-tuning: the parameters are the weights (counted there); gradients in their dtype,
    and for a half-precision model `precision.MasterAdamW`'s float32 master copy and float32
    moments, else moments in the parameters' dtype."""
    copies = 4 + (1 if accumulate else 0)
    if cfg.lora is None:
        quantized = shape.quant_bits is not None
        n = shape.vector_params() + (0 if quantized else shape.matrix_params())
        b = shape.dtype_bytes
        state = 3 * 4 if b < 4 else 2 * b  # master + moments in float32, or the moments alone
        return n * ((copies - 3) * b + state)
    dims = shape.linear_dims()
    keys = cfg.lora.keys or list(_LINEARS)
    unknown = sorted(set(keys) - set(dims))
    if unknown:
        raise ConfigError(f"lora.keys: no module {unknown} in a Qwen3 block; expected some of "
                          f"{list(_LINEARS)}")
    layers = shape.layers if cfg.lora.num_layers == -1 else min(cfg.lora.num_layers, shape.layers)
    n = layers * sum(cfg.lora.rank * (dims[k][0] + dims[k][1]) for k in keys)
    return copies * n * 4  # mlx-lm's LoRA matrices are float32


def rollout_bytes(shape: ModelShape, rows: int, group_size: int, prompt_len: int,
                  completion_len: int) -> int:
    """KV cache of `rows` decoding rows (the prompt, then steps of 256 positions), the prompt
    caches entering with them and their merged copy, a decode step's logits."""
    per_pos = shape.layers * 2 * shape.kv_heads * shape.head_dim * shape.dtype_bytes
    kv = rows * per_pos * (prompt_len + _round_up(completion_len, KV_STEP))
    prompts = (math.ceil(rows / group_size) + 1) * per_pos * _round_up(prompt_len, KV_STEP)
    merged = rows * per_pos * prompt_len
    logits = _LOGIT_ARRAYS * rows * shape.vocab * 4
    return kv + prompts + merged + logits


def update_bytes(shape: ModelShape, cfg: TrainConfig, rows: int, prompt_len: int,
                 completion_len: int) -> int:
    """One micro-batch of `rows` rows: block activations kept for backward (prompt tokens once
    per distinct prompt, at most ceil(rows / G) + 1 in a slice; response tokens per row), the
    chunked vocabulary loss, the OISD attention rows."""
    s, b = shape, shape.dtype_bytes
    P, C = prompt_len, completion_len
    prompts = min(math.ceil(rows / cfg.num_generations) + 1, cfg.batch_size)
    per_token = b * (_ACT_D * s.hidden + _ACT_I * s.intermediate
                     + _ACT_Q * s.heads * s.head_dim + _ACT_KV * s.kv_heads * s.head_dim)
    if cfg.lora is not None and b < 4:  # x @ lora_a promotes each LoRA input to float32
        dims = s.linear_dims()
        per_token += 4 * sum(dims[k][0] for k in (cfg.lora.keys or _LINEARS) if k in dims)
    tokens = prompts * (P - 1) + rows * C
    per_row = b * (_ACT_PROBS * s.heads * C * (P + C) + 2 * s.kv_heads * s.head_dim * (P + C))
    block = tokens * per_token + rows * per_row  # everything one block keeps for its backward
    chunk = cfg.loss_chunk_size or max(MIN_CHUNK_ROWS, CHUNK_LOGITS // s.vocab)
    chunk = min(chunk, rows * C)
    oisd = cfg.algorithm == "oisd"
    k = len(cfg.oisd.student_layers)
    students = k if oisd and cfg.oisd.lambda_logit > 0 else 0
    loss = (_LOSS_ARRAYS + _LOSS_ARRAYS_PER_STUDENT * students) * chunk * s.vocab * 4
    attn = 0
    if oisd and cfg.oisd.lambda_attn > 0:
        attn = rows * s.heads * C * (P + C) * 4 * (_ATTN_FIRST + _ATTN_PER_STUDENT * (k - 1))
    if cfg.gradient_checkpointing:
        # Each block keeps only its input (and the prompt's keys / values): that is held while
        # the loss runs, then the backward pass recomputes one block at a time (its activations
        # and about as much again of its VJP's temporaries).
        kept = s.layers * b * (tokens * s.hidden + prompts * (P - 1) * 2 * s.kv_heads * s.head_dim)
        return int(kept + max(2 * block, loss + attn))
    # The loss runs after the forward pass, when about _KEPT of the blocks' peak is held; the
    # rest of that peak is the backward pass's own temporaries.
    blocks = s.layers * block
    return int(max(blocks, _KEPT * blocks + loss + attn))


def memory_budget(limit_gb: float | None = None) -> tuple[int, str]:
    """(bytes, source): `memory_limit_gb` when set, else Metal's recommended working set,
    else the machine's RAM."""
    if limit_gb is not None:
        return int(limit_gb * GB), "memory_limit_gb"
    if mx.metal.is_available():
        size = mx.device_info().get("max_recommended_working_set_size")
        if size:
            return int(size), "Metal recommended working set"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "system RAM"


def _largest(fits, n: int) -> int | None:
    """The largest k in 1..n with fits(k) (fits is monotone: True up to some k)."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo or None


def plan(cfg: TrainConfig, model_config: dict, budget_bytes: int | None = None,
         budget_source: str | None = None, prompt_length: int | None = None) -> MemoryPlan:
    """The memory plan of `cfg` on the model of `model_config` (a parsed config.json).

    `rollout_batch_size: auto` and `minibatch_size: auto` become the largest values (<= B*G)
    whose peak fits the budget (`budget_bytes`, default `memory_budget(cfg.memory_limit_gb)`).
    prompt_length: tokens per prompt (default cfg.max_prompt_length).
    Raises ConfigError with one message when no value fits."""
    shape = ModelShape.from_config(model_config)
    if budget_bytes is None:
        budget_bytes, budget_source = memory_budget(cfg.memory_limit_gb)
    P = prompt_length or cfg.max_prompt_length
    C = cfg.max_completion_length
    N = cfg.batch_size * cfg.num_generations
    q = cfg.quantize
    weights = weight_bytes(shape, q and q.bits, q and q.group_size)
    # LoRA's reference is the base with adapters off; full fine-tuning keeps a frozen copy
    reference = weights if cfg.lora is None and cfg.beta > 0 else 0

    def update(rows):
        return update_bytes(shape, cfg, rows, P, C)

    def rollout(rows):
        return rollout_bytes(shape, rows, cfg.num_generations, P, C)

    def fixed(rows):
        return weights + reference + optimizer_bytes(shape, cfg, accumulate=rows < N)

    if cfg.minibatch_size == "auto":
        mb = _largest(lambda m: fixed(m) + update(m) <= budget_bytes, N)
    else:
        mb = cfg.minibatch_size or N
    rb = cfg.rollout_batch_size
    if rb == "auto":
        base = fixed(mb or 1)
        rb = _largest(lambda r: base + rollout(r) <= budget_bytes, N)
    nothing = mb is None or rb is None  # an `auto` search found no value that fits
    rb, mb = min(rb or 1, N), min(mb or 1, N)
    p = MemoryPlan(weights=weights, optimizer=fixed(mb) - weights - reference,
                   rollout=rollout(rb), update=update(mb), budget=budget_bytes,
                   budget_source=budget_source or "given", rollout_batch_size=rb,
                   minibatch_size=mb, prompt_length=P, completion_length=C, reference=reference)
    if nothing:
        raise ConfigError(too_big_message(p))
    return p


def too_big_message(p: MemoryPlan) -> str:
    """The one message for a run whose `auto` values find nothing that fits."""
    return (f"the run does not fit in memory: even with rollout_batch_size "
            f"{p.rollout_batch_size} and minibatch_size {p.minibatch_size} its peak is about {p.total / GB:.2f} GB (weights {p.weights / GB:.2f}, optimizer "
            f"{p.optimizer / GB:.2f}, rollout {p.rollout / GB:.2f}, update {p.update / GB:.2f}) "
            f"against a budget of {p.budget / GB:.2f} GB ({p.budget_source}), over by "
            f"{(p.total - p.budget) / GB:.2f} GB. To fit: train QLoRA (quantize: {{bits: 4}}) or "
            "use a quantized checkpoint, shorten max_completion_length / max_prompt_length, put "
            "LoRA on fewer blocks (lora.num_layers), lower num_generations / batch_size, or "
            "raise memory_limit_gb if the machine has more")


def resolve(cfg: TrainConfig, p: MemoryPlan) -> TrainConfig:
    """`cfg` with its `auto` values replaced by the plan's choices."""
    out = cfg
    if cfg.rollout_batch_size == "auto":
        out = replace(out, rollout_batch_size=p.rollout_batch_size)
    if cfg.minibatch_size == "auto":
        out = replace(out, minibatch_size=p.minibatch_size)
    return out


def read_model_config(model: str) -> dict:
    """config.json of a local folder, a `builtin:` model or a Hub id (from the Hugging Face
    cache, or downloaded alone when online); never the weights."""
    from .loading import BUILTIN_PREFIX

    if model.startswith(BUILTIN_PREFIX):
        from .tiny import builtin_model_path

        try:
            path = builtin_model_path(model[len(BUILTIN_PREFIX):]) / "config.json"
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
    elif Path(model).expanduser().exists():
        path = Path(model).expanduser() / "config.json"
        if not path.is_file():
            raise ConfigError(f"model: {Path(model)} has no config.json")
    else:
        path = _hub_config(model)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it as JSON ({e})") from None


def _hub_config(repo: str) -> Path:
    """The cached snapshot's config.json, else config.json alone from the Hub."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    failures = (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError)
    try:
        return Path(hf_hub_download(repo, "config.json", local_files_only=True))
    except failures:
        pass
    try:
        return Path(hf_hub_download(repo, "config.json"))
    except failures as e:
        raise ConfigError(
            f"model: no config.json for {repo!r}: it is neither a local folder nor in the "
            f"Hugging Face cache, and the Hub did not answer ({type(e).__name__}); download it "
            "once (huggingface-cli download REPO config.json) or pass a local model folder"
        ) from None


def plan_for(cfg: TrainConfig, model_config: dict | None = None, budget_gb: float | None = None,
             prompt_length: int | None = None) -> MemoryPlan:
    """The plan of `cfg` (reading config.json of cfg.model when `model_config` is None), with
    an optional budget in GB instead of this machine's."""
    model_config = model_config if model_config is not None else read_model_config(cfg.model)
    budget = None if budget_gb is None else int(budget_gb * GB)
    return plan(cfg, model_config, budget, None if budget is None else f"{budget_gb:g} GB given",
                prompt_length)


def print_plan(cfg: TrainConfig, model_config: dict | None = None,
               budget_gb: float | None = None) -> MemoryPlan:
    """Print `plan_for(...)`'s summary and return the plan."""
    p = plan_for(cfg, model_config, budget_gb)
    print(p.summary())
    return p


def plan_run(cfg: TrainConfig) -> tuple[TrainConfig, MemoryPlan]:
    """The plan of `cfg` on this machine, and `cfg` with its `auto` values resolved."""
    p = plan_for(cfg)
    return resolve(cfg, p), p


def set_memory_limits() -> int | None:
    """On Metal, wire up to the recommended working set as mlx-lm's generate does (keeps the
    weights resident); returns the previous wired limit. A no-op (None) elsewhere."""
    if not mx.metal.is_available():
        return None
    size = mx.device_info().get("max_recommended_working_set_size")
    return mx.set_wired_limit(size) if size else None
