"""Random-weight Qwen3 models with the exact architectures of Qwen3-0.6B, 1.7B, 4B and 8B.

For runs and measurements at real sizes without downloading a checkpoint: the folder has the real
model's config, parameter names, shapes, dtype and file layout, and random weights.

    python -m bench.full_size qwen3-0.6b /tmp/fullsize/qwen3-0.6b
    python -m bench.full_size qwen3-8b /tmp/fullsize/qwen3-8b --quantize 4   # also ...-8b-4bit
    python -m bench.full_size --list

    from bench.full_size import QWEN3_ARCHS, build_full_size
    path = build_full_size("qwen3-1.7b", "/tmp/fullsize/qwen3-1.7b")   # the bf16 folder

The folder is what transformers' `save_pretrained` writes for a Qwen3ForCausalLM: config.json
(the Hub config's fields and values), generation_config.json, bf16 weights in shards of at most
`max_shard_bytes` (model-0000i-of-0000n.safetensors + model.safetensors.index.json, or a single
model.safetensors when they fit in one), plus a tokenizer. Every matrix is uniform with standard
deviation 0.02 from its own key, every norm 1.0; each shard is generated, written and freed
before the next, so building holds about one shard in memory (8B: 16 GB on disk, 2 GiB at a time).
Measured on 2 shared CPU cores: qwen3-0.6b in 29 s (peak RSS 1.6 GB), its 4-bit convert in 13 s.

The tokenizer is tiny.py's byte-level BPE (few merges) with Qwen3's chat template, its special
tokens at Qwen3's ids (<|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645, <think>
151667, </think> 151668) and `<|placeholder_i|>` at every other id below vocab_size: encoding
never produces a placeholder, but any id a random model samples decodes (tokenizers' `decode`
would otherwise drop ids it does not know, silently).

`--quantize B` also runs `mlx_lm.convert` on the bf16 folder (affine, group size 64, B bits) into
`OUT-Bbit`: the layout of the mlx-community checkpoints Mac users train on.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tokenizers import Tokenizer

from mlx_oisd.io import atomic_write, write_json
from mlx_oisd.models.qwen3 import Model, ModelArgs
from mlx_oisd.tiny import DEFAULT_CORPUS, build_tokenizer, save_tokenizer

QWEN3_VOCAB = 151936
# Ids of the special tokens in Qwen3's tokenizer_config.json (`added_tokens_decoder`).
QWEN3_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                     "<think>": 151667, "</think>": 151668}
NOT_SPECIAL = ("<think>", "</think>")  # Qwen3 marks its reasoning tags `"special": false`
MAX_SHARD_BYTES = 2 << 30
TOKENIZER_VOCAB = 1024
TOKENIZER_CORPUS = DEFAULT_CORPUS + [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May? 48 / 2 = 24. 48 + 24 = 72.",
] * 4


@dataclass(frozen=True)
class Qwen3Arch:
    """The architecture fields of a Qwen3 config.json (names as in the config)."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    head_dim: int = 128
    vocab_size: int = QWEN3_VOCAB
    max_position_embeddings: int = 40960
    rope_theta: int = 1000000
    rms_norm_eps: float = 1e-6


# From the config.json of each Hub repository (huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json,
# and Qwen3-1.7B, Qwen3-4B, Qwen3-8B): all four have head_dim 128, vocab 151936, rope_theta 1e6,
# max_position_embeddings 40960, rms_norm_eps 1e-6, torch_dtype bfloat16; only 8B unties the head.
QWEN3_ARCHS = {
    "qwen3-0.6b": Qwen3Arch(28, 1024, 3072, 16, 8, tie_word_embeddings=True),
    "qwen3-1.7b": Qwen3Arch(28, 2048, 6144, 16, 8, tie_word_embeddings=True),
    "qwen3-4b": Qwen3Arch(36, 2560, 9728, 32, 8, tie_word_embeddings=True),
    "qwen3-8b": Qwen3Arch(36, 4096, 12288, 32, 8, tie_word_embeddings=False),
}


def special_ids(vocab_size: int) -> dict[str, int]:
    """Qwen3's special-token ids, moved down by (151936 - vocab_size) for a smaller vocabulary."""
    return {t: i - (QWEN3_VOCAB - vocab_size) for t, i in QWEN3_SPECIAL_IDS.items()}


def hf_config(arch: Qwen3Arch) -> dict:
    """config.json as the Qwen/Qwen3-* repositories have it (transformers 4.51 keys)."""
    ids = special_ids(arch.vocab_size)
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "hidden_size": arch.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": arch.intermediate_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "max_window_layers": arch.num_hidden_layers,
        "model_type": "qwen3",
        "num_attention_heads": arch.num_attention_heads,
        "num_hidden_layers": arch.num_hidden_layers,
        "num_key_value_heads": arch.num_key_value_heads,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": arch.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": arch.vocab_size,
    }


def generation_config(vocab_size: int) -> dict:
    ids = special_ids(vocab_size)
    return {"bos_token_id": ids["<|endoftext|>"], "do_sample": True,
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"], "temperature": 0.6, "top_k": 20, "top_p": 0.95,
            "transformers_version": "4.51.0"}


def full_vocab_tokenizer(vocab_size: int) -> Tokenizer:
    """tiny.py's BPE re-numbered: regular tokens from 0, Qwen3's special tokens at their ids,
    `<|placeholder_i|>` at every other id, `vocab_size` ids in all."""
    data = json.loads(build_tokenizer(TOKENIZER_VOCAB, TOKENIZER_CORPUS).to_str())
    special = special_ids(vocab_size)
    regular = [t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
               if t not in special]
    if len(regular) > min(special.values()):
        raise ValueError(f"vocab_size {vocab_size} leaves no room below the special tokens for "
                         f"the tokenizer's {len(regular)} regular tokens")
    vocab = {t: i for i, t in enumerate(regular)} | special
    taken = set(vocab.values())
    vocab |= {f"<|placeholder_{i}|>": i for i in range(vocab_size) if i not in taken}
    assert len(vocab) == vocab_size and set(vocab.values()) == set(range(vocab_size))
    data["model"]["vocab"] = vocab
    for added in data["added_tokens"]:
        added["id"] = special[added["content"]]
        added["special"] = added["content"] not in NOT_SPECIAL
    data["added_tokens"].sort(key=lambda a: a["id"])
    return Tokenizer.from_str(json.dumps(data))


def weight_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter, in the model's order, as our Qwen3 (mlx-lm's names,
    which are the checkpoint's) declares them. Building the module allocates nothing: MLX
    initialisers are lazy and never evaluated here."""
    return [(name, tuple(p.shape)) for name, p in
            tree_flatten(Model(ModelArgs.from_dict(config)).parameters())]


def plan_shards(shapes: list[tuple[str, tuple[int, ...]]], max_bytes: int,
                itemsize: int = 2) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors grouped into shards of at most `max_bytes` (a bigger tensor alone)."""
    shards, size = [], 0
    for name, shape in shapes:
        nbytes = itemsize * math.prod(shape)
        if not shards or size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def random_tensor(name: str, shape: tuple[int, ...], key: mx.array, std: float = 0.02) -> mx.array:
    """bf16 uniform(-a, a) of standard deviation `std` (a = std * sqrt(3)) for a matrix, ones for
    a norm. Uniform, not normal: on a CPU `mx.random.normal` (an erfinv per draw) is 7x slower,
    which is minutes for 8B."""
    if name.endswith("norm.weight"):
        return mx.ones(shape, dtype=mx.bfloat16)
    a = std * math.sqrt(3.0)
    return mx.random.uniform(-a, a, shape, dtype=mx.bfloat16, key=key)


def write_weights(config: dict, out_dir: Path, max_shard_bytes: int, seed: int) -> int:
    """Generate and write the shards one at a time (plus the index when there are several);
    returns the total bytes."""
    shapes = weight_shapes(config)
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    key_of = {name: keys[i] for i, (name, _) in enumerate(shapes)}
    shards = plan_shards(shapes, max_shard_bytes)
    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {name: random_tensor(name, shape, key_of[name]) for name, shape in shard}
        atomic_write(out_dir / file, lambda p, t=tensors: mx.save_safetensors(
            str(p), t, metadata={"format": "pt"}))
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        del tensors
        mx.clear_cache()  # give the shard's memory back before the next one
    if n > 1:
        write_json(out_dir / "model.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": weight_map})
    return total


def build_folder(arch: Qwen3Arch, out_dir: str | Path, quantize_bits: int | None = None,
                 max_shard_bytes: int = MAX_SHARD_BYTES, seed: int = 0) -> Path:
    """Write the bf16 folder of `arch` into `out_dir` (and its `-{bits}bit` convert when asked);
    returns `out_dir`. Each folder is built beside its target and renamed into place when
    complete; an existing target (other than an empty folder) is an error, never overwritten."""
    out_dir = Path(out_dir).expanduser()
    targets = [out_dir] + ([quantized_dir(out_dir, quantize_bits)] if quantize_bits else [])
    for target in targets:
        if target.exists() and not (target.is_dir() and not any(target.iterdir())):
            raise FileExistsError(f"{target} already exists; remove it or choose another folder")
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = hf_config(arch)
    save_tokenizer(full_vocab_tokenizer(arch.vocab_size), tmp)
    write_json(tmp / "generation_config.json", generation_config(arch.vocab_size))
    write_weights(config, tmp, max_shard_bytes, seed)
    write_json(tmp / "full_size_arch.json", asdict(arch))
    write_json(tmp / "config.json", config)  # last: a folder with config.json is complete
    os.replace(tmp, out_dir)
    if quantize_bits:
        quantize(out_dir, quantize_bits)
    return out_dir


def quantized_dir(out_dir: Path, bits: int) -> Path:
    """Where `--quantize bits` puts the converted folder: OUT-{bits}bit beside OUT."""
    return out_dir.with_name(f"{out_dir.name}-{bits}bit")


def quantize(bf16_dir: Path, bits: int, group_size: int = 64) -> Path:
    """`mlx_lm.convert` of `bf16_dir` (affine quantization) into `quantized_dir(bf16_dir, bits)`."""
    from mlx_lm.convert import convert

    dst = quantized_dir(bf16_dir, bits)
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    convert(str(bf16_dir), mlx_path=str(tmp), quantize=True, q_bits=bits, q_group_size=group_size)
    os.replace(tmp, dst)
    return dst


def build_full_size(name: str, out_dir: str | Path, quantize_bits: int | None = None) -> Path:
    """Build the random bf16 model `name` (a key of QWEN3_ARCHS) into `out_dir`; with
    `quantize_bits`, also its mlx-lm quantized convert at `quantized_dir(out_dir, bits)`.
    Returns `out_dir`."""
    if name not in QWEN3_ARCHS:
        raise ValueError(f"unknown architecture {name!r}; expected one of "
                         + ", ".join(QWEN3_ARCHS))
    return build_folder(QWEN3_ARCHS[name], out_dir, quantize_bits)


def parameter_count(arch: Qwen3Arch) -> int:
    return sum(math.prod(s) for _, s in weight_shapes(hf_config(arch)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.full_size",
                                description=__doc__.splitlines()[0])
    p.add_argument("name", nargs="?", help=f"one of {', '.join(QWEN3_ARCHS)}")
    p.add_argument("out_dir", nargs="?", help="folder to create (must not exist)")
    p.add_argument("--quantize", type=int, choices=(2, 3, 4, 5, 6, 8), metavar="BITS",
                   help="also write an mlx-lm BITS-bit convert into OUT_DIR-BITSbit")
    p.add_argument("--list", action="store_true", help="print the architectures and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, arch in QWEN3_ARCHS.items():
            n = parameter_count(arch)
            print(f"{name:11s} {n / 1e9:5.2f}B params  {2 * n / 2**30:5.1f} GiB bf16  {arch}")
        return 0
    if not args.name or not args.out_dir:
        p.error("give NAME and OUT_DIR (or --list)")
    start = time.perf_counter()
    try:
        path = build_full_size(args.name, args.out_dir, args.quantize)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} in {time.perf_counter() - start:.1f} s"
          + (f" (and {quantized_dir(path, args.quantize)})" if args.quantize else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
