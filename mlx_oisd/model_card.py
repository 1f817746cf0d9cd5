"""The README.md model card of an export: Hub metadata, what the folder is, the prompt format the
adapter was trained with, how to load it (transformers and mlx-lm), the run's settings, evals.

The card holds no path of the machine that exported it: a local or built-in base and an
unpushed export appear as placeholders (`BASE_PLACEHOLDER`, `HERE_PLACEHOLDER`) in the code.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data.prompts import MATH_INSTRUCTION, PromptFormat
from .export_inputs import HUB_ID

BASE_PLACEHOLDER = "<path to the base model>"
HERE_PLACEHOLDER = "<path to this folder>"
EXAMPLE_QUESTION = "What is 12 + 35?"
_ALGORITHMS = {"oisd": "OISD", "grpo": "GRPO", "bupo": "BuPO"}
_KINDS = {"lora": "LoRA adapter", "dora": "DoRA adapter", "full": "full fine-tune"}
_FORMAT_TEXT = {
    "peft": ("peft", "A LoRA adapter in Hugging Face PEFT format"),
    "fused": ("transformers", "The base model with the adapters merged in (Hugging Face "
              "safetensors, unquantized)"),
    "mlx": ("mlx", "An adapter in mlx-lm format"),
}
_CARD_KEYS = ("algorithm", "dataset", "learning_rate", "max_steps", "lora", "quantize", "oisd")


@dataclass
class CardFacts:
    """What the card says. `base` as the user named it (Hub id, folder or builtin:NAME);
    `hub_id` when the base is on the Hub; `evals` = [(label, eval results JSON)]."""

    fmt: str
    run_name: str
    base: str
    hub_id: str | None
    fine_tune_type: str = "lora"
    run_config: dict | None = None
    step: int | None = None  # the checkpoint step the adapters come from; None: unknown
    max_steps: int | None = None  # the run's
    evals: list = field(default_factory=list)
    repo: str | None = None  # the Hub repo the export is pushed to
    quantize: dict | None = None  # QLoRA: {"bits", "group_size"} the base was quantized with


def prompt_format(run_config: dict | None) -> PromptFormat:
    """The run's prompt format; a config written before `dataset.instruction` existed trained
    with the default instruction."""
    dataset = (run_config or {}).get("dataset") or {}
    return PromptFormat(dataset.get("system_prompt"), dataset.get("instruction", MATH_INSTRUCTION),
                        bool((run_config or {}).get("enable_thinking", False)))


def public_name(model: str) -> str:
    """A Hub id or builtin:NAME as is; a local folder by its name alone (no machine path)."""
    if model.startswith("builtin:") or (HUB_ID.match(model) and not Path(model).expanduser().exists()):
        return model
    return Path(model).name


def model_card(facts: CardFacts) -> str:
    """README.md for an export described by `facts`."""
    library, what = _FORMAT_TEXT[facts.fmt]
    meta = {"library_name": library, "tags": ["mlx-oisd", "oisd", "grpo", "qwen3", "lora"]}
    if facts.hub_id:
        meta["base_model"] = facts.hub_id
    cfg = facts.run_config
    algorithm = _ALGORITHMS.get((cfg or {}).get("algorithm"), "OISD")
    base = facts.hub_id or public_name(facts.base)
    kind = _KINDS.get(facts.fine_tune_type, "adapter")
    if facts.fmt == "fused":
        kind = "full fine-tune" if facts.fine_tune_type == "full" else f"{kind.split()[0]} fine-tune, merged"
    lines = ["---", yaml.safe_dump(meta, sort_keys=True).strip(), "---", "",
             f"# {facts.run_name} ({algorithm} {kind} of {base})", "",
             f"{what}, trained from `{base}` with mlx-oisd "
             "(GRPO + On-Policy Internal Self-Distillation, arXiv 2605.29089, in MLX).", "",
             f"- base model: `{base}`{_base_note(facts)}", f"- format: `{facts.fmt}`"]
    if facts.step is not None:
        of = f" of {facts.max_steps} (`max_steps`)" if facts.max_steps else ""
        lines.append(f"- exported at step {facts.step}{of}")
    if facts.quantize:
        lines.append(f"- {quantize_note(facts.fmt, facts.quantize)}")
    lines += ["", *_prompt_section(prompt_format(cfg)), "", "## Use", "", *usage(facts), "",
              "## Training", "", *_settings(cfg, facts.max_steps)]
    for i, (label, results) in enumerate(facts.evals):
        lines += ["", "## Evaluation", ""] if i == 0 else []
        if len(facts.evals) > 1:
            lines += [f"### {label}", ""]
        lines += [*_evaluated(results), *eval_table(results), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _base_note(facts: CardFacts) -> str:
    if facts.hub_id:
        return ""
    where = ("mlx-oisd's built-in model, not on the Hub" if facts.base.startswith("builtin:")
             else "a local folder")
    note = f" ({where}; the code below needs your copy of it"
    if facts.fmt == "peft":
        note += ", and adapter_config.json's `base_model_name_or_path` is its folder on the "\
                "machine that exported it: point it at your copy for `AutoPeftModelForCausalLM`"
    return note + ")"


def quantize_note(fmt: str, q: dict) -> str:
    """What a QLoRA run's export is relative to the model that was trained."""
    how = f"{q.get('bits')} bits, group size {q.get('group_size')}"
    if fmt == "fused":
        return (f"trained with QLoRA (the base quantized {how}): these weights are that "
                "quantized base, dequantized, with the adapters merged, so the model computes "
                "what was trained (not the full-precision base plus the adapters)")
    if fmt == "mlx":
        return (f"trained with QLoRA (the base quantized by mlx-lm, {how}): quantize the base the "
                "same way before applying the adapter, as the code below does")
    return (f"trained with QLoRA (the base quantized by mlx-lm, {how}): on the full-precision "
            "base the adapter's logits differ slightly from the trained model's; `oisd-mlx "
            "export --format fused` merges it into the quantized base it was trained on")


def _prompt_section(fmt: PromptFormat) -> list[str]:
    lines = ["## Prompt format", "", "Use the prompts the adapter was trained on: the model's chat "
             "template with `add_generation_prompt=True`, "
             f"`enable_thinking={fmt.enable_thinking}`, "
             + (f"the system prompt {json.dumps(fmt.system_prompt)}" if fmt.system_prompt
                else "no system prompt") + ", and a user turn that is the question"]
    if fmt.instruction:
        lines[-1] += " followed by this instruction (a Python string):"
        lines += ["", "```python", f"INSTRUCTION = {json.dumps(fmt.instruction)}", "```", "",
                  "Without it the model answers in a format it was not trained on."]
    else:
        lines[-1] += " alone (no instruction appended)."
    return lines


def _messages_code(fmt: PromptFormat) -> list[str]:
    """Python lines building the chat messages of `EXAMPLE_QUESTION` as training did."""
    content = json.dumps(EXAMPLE_QUESTION) + (" + INSTRUCTION" if fmt.instruction else "")
    system = (f'{{"role": "system", "content": {json.dumps(fmt.system_prompt)}}}, '
              if fmt.system_prompt else "")
    define = ([f"INSTRUCTION = {json.dumps(fmt.instruction)}  # appended to every question in "
               "training"] if fmt.instruction else [])
    return define + [f'messages = [{system}{{"role": "user", "content": {content}}}]']


def usage(facts: CardFacts) -> list[str]:
    """Markdown code blocks that load the export and answer one question in the trained format."""
    fmt = prompt_format(facts.run_config)
    base = json.dumps(facts.hub_id or BASE_PLACEHOLDER)
    here = json.dumps(facts.repo or HERE_PLACEHOLDER)
    hf_prompt = [*_messages_code(fmt),
                 "text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
                 f"tokenize=False, enable_thinking={fmt.enable_thinking})",
                 'inputs = tokenizer(text, return_tensors="pt")',
                 "output = model.generate(**inputs, max_new_tokens=1024)",
                 'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], '
                 "skip_special_tokens=True))"]
    mlx_prompt = [*_messages_code(fmt),
                  "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
                  f"enable_thinking={fmt.enable_thinking})",
                  "print(generate(model, tokenizer, prompt=prompt, max_tokens=1024))"]
    if facts.fmt == "peft":
        hf = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, "
              "AutoTokenizer", "", f"base = AutoModelForCausalLM.from_pretrained({base})",
              f"model = PeftModel.from_pretrained(base, {here})",
              f"tokenizer = AutoTokenizer.from_pretrained({base})", "", *hf_prompt]
        return _block(hf)
    if facts.fmt == "fused":
        hf = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"model = AutoModelForCausalLM.from_pretrained({here})",
              f"tokenizer = AutoTokenizer.from_pretrained({here})", "", *hf_prompt]
        mlx = ["from mlx_lm import generate, load", "", f"model, tokenizer = load({here})", "",
               *mlx_prompt]
        return ["With transformers:", "", *_block(hf), "", "With mlx-lm:", "", *_block(mlx)]
    if facts.quantize:
        q = facts.quantize
        mlx = ["import mlx.nn as nn", "from mlx_lm import generate, load",
               "from mlx_lm.utils import load_adapters", "", f"model, tokenizer = load({base})",
               f"nn.quantize(model, group_size={q.get('group_size')}, bits={q.get('bits')})  "
               "# as in training (QLoRA)", f"model = load_adapters(model, {here})", "",
               *mlx_prompt]
    else:
        mlx = ["from mlx_lm import generate, load", "",
               f"model, tokenizer = load({base}, adapter_path={here})", "", *mlx_prompt]
    return ["With mlx-lm:", "", *_block(mlx)]


def _block(code: list[str]) -> list[str]:
    return ["```python", *code, "```"]


def _settings(cfg: dict | None, max_steps: int | None) -> list[str]:
    if cfg is None:
        return ["No run config.yaml was found next to the adapters."]
    cfg = {**cfg, **({"max_steps": max_steps} if max_steps is not None else {})}
    lines = ["| setting | value |", "|---|---|"]
    keys = list(_CARD_KEYS) + (["bupo"] if cfg.get("algorithm") == "bupo" else [])
    for key in keys:
        if key in cfg:
            lines += [f"| `{k}` | `{_show(v)}` |" for k, v in _flatten(key, cfg[key])]
    return lines


def _evaluated(results) -> list[str]:
    """One line naming what an `oisd-mlx eval --out` file evaluated (model, with or without an
    adapter), without machine paths."""
    settings = results.get("settings") if isinstance(results, dict) else None
    if not isinstance(settings, dict) or not isinstance(settings.get("model"), str):
        return []
    adapter = "with an adapter" if settings.get("adapter") else "without an adapter (the base)"
    return [f"Evaluated: `{public_name(settings['model'])}` {adapter}.", ""]


def _flatten(prefix: str, value) -> list[tuple[str, object]]:
    """("oisd", {"tau": 1.0, "x": None}) -> [("oisd.tau", 1.0)]: unset sub-keys are left out."""
    if isinstance(value, dict):
        return [kv for k, v in value.items() if v is not None for kv in _flatten(f"{prefix}.{k}", v)]
    return [(prefix, value)]


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def eval_table(evals) -> list[str]:
    """Eval results as a table: `oisd-mlx eval --out`'s {"benchmarks", "mean", "settings"}, or
    {bench: {metric: v}}, [{...row...}], {metric: v}; anything else as JSON."""
    if isinstance(evals, dict) and isinstance(evals.get("benchmarks"), dict):
        benches = dict(evals["benchmarks"])
        if len(benches) > 1 and isinstance(evals.get("mean"), dict):
            benches["mean"] = evals["mean"]
        rows = [{"benchmark": name, **{k: v for k, v in m.items() if k == "problems" or "@" in k}}
                for name, m in benches.items()]
        settings = evals.get("settings") or {}
        shown = {k: settings[k] for k in ("k", "temperature", "top_p", "max_tokens") if k in settings}
        note = ", ".join(f"{k} = {v}" for k, v in shown.items())
        return _table(rows) + (["", f"Sampling: {note}."] if note else [])
    if isinstance(evals, dict) and evals and all(isinstance(v, dict) for v in evals.values()):
        rows = [{"benchmark": k, **{c: x for c, x in _flatten_row(v)}} for k, v in evals.items()]
    elif isinstance(evals, list) and evals and all(isinstance(r, dict) for r in evals):
        rows = [dict(_flatten_row(r)) for r in evals]
    elif isinstance(evals, dict) and evals:
        rows = [{"metric": k, "value": v} for k, v in evals.items()]
    else:
        return [f"```json\n{json.dumps(evals, indent=2)}\n```"]
    return _table(rows)


def _table(rows: list[dict]) -> list[str]:
    columns = list(dict.fromkeys(c for r in rows for c in r))
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return table


def _flatten_row(row: dict) -> list[tuple[str, object]]:
    return [kv for k, v in row.items() for kv in _flatten(k, v)]


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else _show(v) if isinstance(v, list) else str(v)
