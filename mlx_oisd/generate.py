"""Generate with a trained model in the prompt format it was trained with (`oisd-mlx generate`,
`oisd-mlx chat`).

A prompt is the run's `PromptFormat` around the user's text: the optional system turn, then each
user turn followed by the instruction (`dataset.instruction`), rendered with the chat template
with the assistant header open (`enable_thinking` reaches Qwen3's template). In a chat the
instruction follows EVERY user turn, not only the first: training appends it to every prompt the
policy sees, so each turn looks like a training prompt; earlier turns enter the template as
`user` / `assistant` messages (Qwen3's template drops their reasoning).

Decoding is mlx-lm's `stream_generate` with `make_sampler(temp, top_p)`, in one function,
`generate_text`; with a `draft_layer` it is self-speculative decoding (`speculative.py`), which
gives the same tokens greedily and the same distribution when sampling.
`draft_layer_of` finds the student layer of the OISD run an adapter folder came from.
`RunFormat` reads the model, the adapter folder and the prompt format from a run's config.yaml
without validating the rest, so runs written by older versions still load (no
`dataset.instruction` there means the default `MATH_INSTRUCTION`, as training used then).
"""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import yaml
from mlx_lm.generate import GenerationResponse, stream_generate
from mlx_lm.sample_utils import make_sampler

from .data.prompts import MATH_INSTRUCTION, PromptFormat, prompt_messages

QUIT = ("q",)
RESET = ("r", "/reset")


class RunFolderError(ValueError):
    """A `--run` folder that cannot be read; the message names the file and key."""


@dataclass(frozen=True)
class RunFormat:
    """What generation takes from a run folder: its base model, adapters and prompt format,
    and the QLoRA quantization its adapters were trained on (None: an unquantized base)."""

    model: str
    adapter_path: Path
    fmt: PromptFormat
    quantize: dict | None = None
    max_tokens: int | None = None  # the run's max_completion_length

    @classmethod
    def read(cls, folder: str | Path) -> "RunFormat":
        """Read `folder/config.yaml` (as `oisd-mlx train` writes it). `folder` is a run's
        output_dir (adapters: `folder/adapters`) or one of its `checkpoints/step_N` (the adapters
        are in the folder itself). Raises RunFolderError naming the file and the bad key."""
        folder = Path(folder)
        path = folder / "config.yaml"
        if not folder.is_dir():
            raise RunFolderError(f"run folder {str(folder)!r} does not exist")
        if not path.is_file():
            raise RunFolderError(f"{folder}: no config.yaml; expected a training run's "
                                 "output_dir (config.yaml, adapters/)")
        try:
            raw = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise RunFolderError(f"{path}: invalid YAML ({_one_line(e)})") from None
        if not isinstance(raw, dict):
            raise RunFolderError(f"{path}: expected a mapping of config keys")
        dataset = raw.get("dataset") or {}
        if not isinstance(dataset, dict):
            raise RunFolderError(f"{path}: dataset: expected a mapping")
        model = _key(path, "model", raw.get("model"), str, required=True)
        fmt = PromptFormat(
            _key(path, "dataset.system_prompt", dataset.get("system_prompt"), str),
            _key(path, "dataset.instruction", dataset.get("instruction", MATH_INSTRUCTION), str),
            _key(path, "enable_thinking", raw.get("enable_thinking", False), bool),
        )
        quantize = _key(path, "quantize", raw.get("quantize"), dict)
        if quantize is not None and not {"bits", "group_size"} <= set(quantize):
            raise RunFolderError(f"{path}: quantize: expected bits and group_size")
        max_tokens = _key(path, "max_completion_length", raw.get("max_completion_length"), int)
        in_place = (folder / "adapters.safetensors").is_file()  # a checkpoint folder
        adapters = folder if in_place else folder / "adapters"
        return cls(model, adapters, fmt, quantize, max_tokens)


def _one_line(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    if mark is not None and getattr(e, "problem", None):
        return f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}"
    return " ".join(str(e).split())


def _key(path: Path, key: str, value, tp: type, required: bool = False):
    if value is None and not required:
        return None
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise RunFolderError(f"{path}: {key}: expected {'a ' if required else ''}{tp.__name__}"
                             f"{'' if required else ' or null'}, got {value!r}")
    return value


def load_for_generation(model: str, adapter_path: str | Path | None = None,
                        quantize: dict | None = None):
    """(model, tokenizer) through `mlx_oisd.loading.load`. With `quantize` (a QLoRA run's
    {bits, group_size}) the base Linear/Embedding layers are quantized as training did; LoRA
    layers keep their float adapters around the quantized base, as in training."""
    import mlx.nn as nn

    from .loading import load

    net, tokenizer = load(model, adapter_path=adapter_path)
    if quantize is not None:
        nn.quantize(net, group_size=quantize["group_size"], bits=quantize["bits"])
    return net, tokenizer


def build_prompt(tokenizer, fmt: PromptFormat, history: list[tuple[str, str]], user: str) -> list[int]:
    """Token ids of the next prompt: `fmt`'s system turn, the earlier (user, assistant) turns of
    `history`, then `user`; the instruction follows every user turn. Without history this is
    exactly `fmt.render(tokenizer, user)`, a training prompt."""
    if not history:
        return fmt.render(tokenizer, user)
    messages = prompt_messages(history[0][0], fmt.system_prompt, fmt.instruction)
    messages.append({"role": "assistant", "content": history[0][1]})
    for question, answer in history[1:]:
        messages += prompt_messages(question, None, fmt.instruction)
        messages.append({"role": "assistant", "content": answer})
    messages += prompt_messages(user, None, fmt.instruction)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         enable_thinking=fmt.enable_thinking)
    return tokenizer.encode(text, add_special_tokens=False)


def generate_text(model, tokenizer, ids: list[int], max_tokens: int = 512, temp: float = 0.0,
                  top_p: float = 1.0, draft_layer: int | None = None,
                  draft_tokens: int = 4) -> Iterator[GenerationResponse]:
    """Decode from the prompt `ids` [P] until an end-of-sequence token or `max_tokens`.

    Yields mlx-lm's `GenerationResponse` pieces: `.text` is the next piece of text (the
    end-of-sequence token is not in it), and the last one carries the statistics
    (`prompt_tokens`, `generation_tokens`, `prompt_tps`, `generation_tps`, `peak_memory` GB).
    With `draft_layer` l: self-speculative decoding, `draft_tokens` drafts per round from block
    l's lens (`speculative.stream_speculative`; the responses also carry drafted / accepted)."""
    if draft_layer is not None:
        from .speculative import stream_speculative

        yield from stream_speculative(model, tokenizer, ids, draft_layer, draft_tokens,
                                      max_tokens, temp, top_p)
        return
    yield from stream_generate(model, tokenizer, mx.array(ids), max_tokens=max_tokens,
                               sampler=make_sampler(temp, top_p))


def stats_line(last: GenerationResponse) -> str:
    """The statistics of a finished generation, on one line (mlx-lm prints the same numbers),
    with the draft acceptance of a speculative one."""
    line = (f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s | "
            f"generated: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s | "
            f"peak memory: {last.peak_memory:.3f} GB")
    drafted = getattr(last, "drafted", None)
    if drafted is not None:
        rate = f"{100 * last.accepted / drafted:.1f}%" if drafted else "-"
        line += f" | draft: {last.accepted}/{drafted} accepted ({rate})"
    return line


def draft_layer_of(adapter_path: str | Path | None) -> int:
    """The student layer (oisd.student_layers[0]) of the OISD run whose adapters are in
    `adapter_path`: a run's adapters/ (config.yaml in the folder above) or a checkpoints/step_N
    (config.yaml in it), as `oisd-mlx train` writes them. ValueError saying why not."""
    if adapter_path is None:
        raise ValueError("--draft-layer auto: no adapter; auto takes the student layer of the "
                         "OISD run an adapter came from (give --run, --adapter-path, or a layer "
                         "number)")
    folder = Path(adapter_path)
    path = next((p for p in (folder / "config.yaml", folder.parent / "config.yaml")
                 if p.is_file()), None)
    if path is None:
        raise ValueError(f"--draft-layer auto: no config.yaml in {folder} or {folder.parent}; "
                         "auto needs the adapters of an `oisd-mlx train` run (give a layer "
                         "number)")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"--draft-layer auto: {path}: invalid YAML ({_one_line(e)})") from None
    raw = raw if isinstance(raw, dict) else {}
    algorithm = raw.get("algorithm", "oisd")
    if algorithm != "oisd":
        raise ValueError(f"--draft-layer auto: {path}: not an OISD run (algorithm: {algorithm}); "
                         "it has no student layer (give a layer number)")
    layers = (raw.get("oisd") or {}).get("student_layers") if isinstance(raw.get("oisd"), dict) \
        else None
    if not isinstance(layers, list) or not layers or not isinstance(layers[0], int) \
            or isinstance(layers[0], bool):
        raise ValueError(f"--draft-layer auto: {path}: oisd.student_layers: expected a list of "
                         f"block numbers, got {layers!r}")
    return layers[0]


def stream_answer(model, tokenizer, ids: list[int], write: Callable[[str], None],
                  **sampling) -> tuple[str, GenerationResponse | None]:
    """`generate_text`, each piece passed to `write` as it arrives; returns (the whole text,
    the last response, None when nothing was generated)."""
    pieces, last = [], None
    for last in generate_text(model, tokenizer, ids, **sampling):
        pieces.append(last.text)
        write(last.text)
    return "".join(pieces), last


@dataclass
class ChatTurn:
    user: str
    prompt: list[int]  # [P] the rendered prompt, earlier turns included
    answer: str


def chat(model, tokenizer, fmt: PromptFormat, lines: Iterable[str], write: Callable[[str], None],
         **sampling) -> Iterator[ChatTurn]:
    """A multi-turn conversation over `lines` (one user turn each): every answer streams to
    `write`, followed by a newline. A line `q` (or the end of `lines`) ends it; `r` or `/reset`
    clears the history; blank lines are skipped. Yields each finished turn."""
    history: list[tuple[str, str]] = []
    for line in lines:
        user = line.rstrip("\r\n")
        if user.strip() in QUIT:
            return
        if user.strip() in RESET:
            history = []
            continue
        if not user.strip():
            continue
        ids = build_prompt(tokenizer, fmt, history, user)
        answer, _ = stream_answer(model, tokenizer, ids, write, **sampling)
        write("\n")
        history.append((user, answer))
        yield ChatTurn(user, ids, answer)
