"""Tiny random Qwen3 models with a working tokenizer, saved as normal model folders.

Tests build them on the fly, and `builtin:tiny` names one cached under the user's cache directory.
The folder is what `save_pretrained` would write for a Qwen3ForCausalLM (config.json,
model.safetensors with PyTorch-format metadata, generation_config.json) plus a byte-level BPE
tokenizer built with `tokenizers` and Qwen3's own chat template, so every loader
(`mlx_oisd.load`, `mlx_lm.load`, transformers) reads it.
"""

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from .io import atomic_write, write_json
from .models.qwen3 import Model, ModelArgs

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3's own chat template, verbatim: the `chat_template` of Qwen/Qwen3-0.6B's
# tokenizer_config.json (tools, `reasoning_content`, earlier turns' reasoning dropped, and
# `enable_thinking=False` pre-filling an empty think block).
CHAT_TEMPLATE = (Path(__file__).parent / "data" / "qwen3_chat_template.jinja").read_text(
    encoding="utf-8")

# Qwen2/3's pre-tokenizer pattern: among others, every digit is its own token.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Text the BPE merges are learned from when a vocabulary larger than the byte alphabet is asked.
DEFAULT_CORPUS = [
    "What is 12 + 35? Please reason step by step, and put your final answer within \\boxed{}.",
    "The answer is \\boxed{47}. Let me think about it. First add the tens, then the ones.",
    "user assistant system You are a helpful assistant. Solve the problem.",
] * 4


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny Qwen3. vocab_size None: exactly the tokenizer's size."""

    num_layers: int = 4
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    tie_word_embeddings: bool = True
    tokenizer_vocab: int = 256 + len(SPECIAL_TOKENS)
    added_tokens: tuple[str, ...] = ()  # strings that become single (non-special) tokens
    vocab_size: int | None = None
    init_std: float = 0.02
    dtype: str = "float32"  # of the saved weights: float32, bfloat16 (real checkpoints), float16
    seed: int = 0


def build_tokenizer(vocab_size: int, corpus: list[str] | None = None,
                    added_tokens: tuple[str, ...] = ()) -> Tokenizer:
    """Byte-level BPE (every byte a token, as Qwen's) with Qwen3's special tokens; merges are
    learned from `corpus` until the vocabulary has `vocab_size` entries, then `added_tokens`
    (whole strings, such as a prompt's fixed instruction) are appended as single tokens."""
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"tokenizer_vocab must be >= {min_size} (bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or DEFAULT_CORPUS, trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in added_tokens])
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path, chat_template: str = CHAT_TEMPLATE) -> None:
    atomic_write(out_dir / "tokenizer.json", lambda p: tok.save(str(p)))
    write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "bos_token": None,
            "model_max_length": 4096,
            "chat_template": chat_template,
            "clean_up_tokenization_spaces": False,
        },
    )


def model_config(spec: TinySpec, vocab_size: int, eos_ids: list[int]) -> dict:
    """config.json as transformers 5 writes it for Qwen3ForCausalLM."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "tie_word_embeddings": spec.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": spec.dtype,
        "bos_token_id": None,
        "eos_token_id": eos_ids[0],
        "pad_token_id": eos_ids[1],
    }


def random_weights(model: Model, std: float, seed: int) -> dict[str, mx.array]:
    """Normal(0, std) for every matrix, 1 + small noise for the norms, in float32."""
    keys = mx.random.split(mx.random.key(seed), len(tree_flatten(model.parameters())))
    weights = {}
    for key, (name, p) in zip(keys, sorted(tree_flatten(model.parameters()))):
        noise = mx.random.normal(p.shape, key=key)
        weights[name] = 1.0 + 0.1 * noise if name.endswith("norm.weight") else std * noise
    return weights


def build_tiny_model(out_dir: str | Path, spec: TinySpec = TinySpec(), corpus=None) -> Path:
    """Write a random tiny Qwen3 + tokenizer into `out_dir` and return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(spec.tokenizer_vocab, corpus, spec.added_tokens)
    vocab_size = spec.vocab_size or tok.get_vocab_size()
    if vocab_size < tok.get_vocab_size():
        raise ValueError(f"vocab_size {vocab_size} < tokenizer size {tok.get_vocab_size()}")
    eos_ids = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    config = model_config(spec, vocab_size, eos_ids)
    model = Model(ModelArgs.from_dict(config))
    weights = random_weights(model, spec.init_std, spec.seed)
    weights = {k: v.astype(getattr(mx, spec.dtype)) for k, v in weights.items()}
    mx.eval(weights)
    save_tokenizer(tok, out_dir)
    atomic_write(
        out_dir / "model.safetensors",
        lambda p: mx.save_safetensors(str(p), weights, metadata={"format": "pt"}),
    )
    write_json(out_dir / "generation_config.json", {"eos_token_id": eos_ids, "pad_token_id": eos_ids[1]})
    write_json(out_dir / "tiny_spec.json", asdict(spec))
    write_json(out_dir / "config.json", config)  # last: a folder with config.json is complete
    return out_dir


def _build_tiny_arith(path: Path) -> Path:
    from .demo import build_tiny_arith

    print(f"building builtin:tiny-arith into {path} (first use only: a short supervised warm-up)",
          file=sys.stderr)
    return build_tiny_arith(path)


def _build_study_arith(path: Path) -> Path:
    from .study import build_study_arith

    print(f"building builtin:study-arith into {path} (first use only: a supervised warm-up)",
          file=sys.stderr)
    return build_study_arith(path)


# name -> builder(path): `builtin:NAME` models, built on first use and cached.
BUILTIN_MODELS = {
    "tiny": lambda path: build_tiny_model(path, TinySpec()),
    "tiny-arith": _build_tiny_arith,
    "study-arith": _build_study_arith,
}


def cache_dir() -> Path:
    """Where built-in models are cached: $MLX_OISD_CACHE, else $XDG_CACHE_HOME/mlx-oisd."""
    if env := os.environ.get("MLX_OISD_CACHE"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx-oisd"


def builtin_model_path(name: str) -> Path:
    """Folder of built-in model `name`, built on first use."""
    if name not in BUILTIN_MODELS:
        raise ValueError(
            f"unknown built-in model 'builtin:{name}'; expected one of "
            + ", ".join(f"builtin:{n}" for n in sorted(BUILTIN_MODELS))
        )
    path = cache_dir() / "models" / name
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        BUILTIN_MODELS[name](path)
    return path
