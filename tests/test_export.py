"""export.py: PEFT adapters, fused models, mlx-lm copies, model cards, push, and the errors."""

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import yaml
from conftest import FIXTURES
from mlx.utils import tree_flatten
from safetensors import safe_open
from safetensors.numpy import load_file
from typer.testing import CliRunner

from cli.main import app
from mlx_oisd import load
from mlx_oisd.export import ExportError, export
from mlx_oisd.lora import apply_lora, save_adapters

PARTIAL = {"rank": 4, "scale": 10.0, "dropout": 0.0,
           "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]}
ALL = {"rank": 2, "scale": 20.0, "dropout": 0.0}
RUN_CONFIG = {"algorithm": "oisd", "learning_rate": 1e-5, "max_steps": 200,
              "dataset": {"source": "openai/gsm8k", "split": "train"},
              "lora": {"rank": 4, "scale": 10.0, "num_layers": 2},
              "oisd": {"student_layers": [1], "lambda_logit": 1.0, "lambda_attn": 0.1, "tau": 1.0}}


def _ids(vocab, shape=(2, 7), seed=0):
    return mx.random.randint(0, vocab, shape, key=mx.random.key(seed))


def make_adapter(base, folder, num_layers=2, params=PARTIAL, seed=0, fine_tune_type="lora"):
    """An adapter folder as training writes it, with random non-zero lora_b."""
    mx.random.seed(seed)
    model, _ = load(base)
    apply_lora(model, num_layers, params)
    lora_b = [(n, p) for n, p in tree_flatten(model.trainable_parameters()) if n.endswith("lora_b")]
    keys = mx.random.split(mx.random.key(seed), len(lora_b))
    model.load_weights([(n, 0.05 * mx.random.normal(p.shape, key=k))
                        for k, (n, p) in zip(keys, lora_b)], strict=False)
    save_adapters(model, folder, num_layers, params)
    if fine_tune_type != "lora":
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "fine_tune_type": fine_tune_type}))
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir):
    """runs/X: config.yaml (model = the tiny base), eval.json, adapters/ (last 2 of 4 blocks)."""
    run = tmp_path_factory.mktemp("run")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(tiny_dir), **RUN_CONFIG}))
    gsm8k = {"problems": 50, "samples": 400, "avg@8": 0.4213, "pass@8": 0.8, "correct_counts": [1]}
    (run / "eval.json").write_text(json.dumps({  # as `oisd-mlx eval --out` writes it
        "benchmarks": {"gsm8k": gsm8k, "math500": {**gsm8k, "avg@8": 0.25}},
        "mean": {"avg@8": 0.33565, "pass@8": 0.8}, "settings": {"k": 8, "temperature": 0.6}}))
    make_adapter(tiny_dir, run / "adapters")
    return run


def test_peft_export_keys_shapes_and_config(run_dir, tiny_dir, tmp_path):
    out = export(run_dir / "adapters", "peft", tmp_path / "peft")
    tensors = load_file(out / "adapter_model.safetensors")
    mlx_weights = mx.load(str(run_dir / "adapters" / "adapters.safetensors"))
    expected = {f"base_model.model.model.layers.{i}.{m}.lora_{ab}.weight"
                for i in (2, 3) for m in PARTIAL["keys"] for ab in "AB"}
    assert set(tensors) == expected
    stem = "model.layers.3.self_attn.v_proj"
    a, b = tensors[f"base_model.model.{stem}.lora_A.weight"], tensors[f"base_model.model.{stem}.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (32, 4)  # (r, in), (out, r): 2 kv heads * 16
    np.testing.assert_array_equal(a, np.array(mlx_weights[f"{stem}.lora_a"]).T)
    np.testing.assert_array_equal(b, np.array(mlx_weights[f"{stem}.lora_b"]).T)
    with safe_open(out / "adapter_model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 40 and config["lora_dropout"] == 0.0
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert config["layers_to_transform"] == [2, 3]
    assert config["base_model_name_or_path"] == str(tiny_dir.resolve())  # the run's config.yaml
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False
    assert config["use_rslora"] is False


def test_peft_all_blocks_have_no_layers_to_transform(tiny_dir, tmp_path):
    adapters = make_adapter(tiny_dir, tmp_path / "ad", num_layers=-1, params=ALL)
    out = export(adapters, "peft", tmp_path / "peft", base=str(tiny_dir))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["layers_to_transform"] is None and config["lora_alpha"] == 40
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj",
                                        "q_proj", "up_proj", "v_proj"]
    assert len(load_file(out / "adapter_model.safetensors")) == 4 * 7 * 2


def test_peft_round_trip_equals_fused_weight(run_dir, tiny_dir, tmp_path):
    """W + (alpha / r) B A from the PEFT tensors (numpy) is the fused model's weight."""
    peft = export(run_dir / "adapters", "peft", tmp_path / "peft")
    fused = export(run_dir / "adapters", "fused", tmp_path / "fused")
    config = json.loads((peft / "adapter_config.json").read_text())
    tensors = load_file(peft / "adapter_model.safetensors")
    base_w, fused_w = load_file(tiny_dir / "model.safetensors"), load_file(fused / "model.safetensors")
    for stem in ("model.layers.2.self_attn.q_proj", "model.layers.3.mlp.down_proj"):
        a = tensors[f"base_model.model.{stem}.lora_A.weight"]
        b = tensors[f"base_model.model.{stem}.lora_B.weight"]
        rebuilt = base_w[f"{stem}.weight"] + config["lora_alpha"] / config["r"] * b @ a
        assert np.abs(rebuilt - fused_w[f"{stem}.weight"]).max() < 1e-5
        assert np.abs(rebuilt - base_w[f"{stem}.weight"]).max() > 1e-3
    unadapted = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(fused_w[unadapted], base_w[unadapted])


def test_fused_model_gives_the_adapter_logits(run_dir, tiny_dir, tmp_path):
    out = export(run_dir / "adapters", "fused", tmp_path / "fused")
    fused, tok = load(out)
    adapted, _ = load(tiny_dir, adapter_path=run_dir / "adapters")
    base, _ = load(tiny_dir)
    ids = _ids(fused.args.vocab_size)
    assert float(mx.abs(fused(ids) - adapted(ids)).max()) < 1e-5
    assert float(mx.abs(fused(ids) - base(ids)).max()) > 1e-3
    assert tok.decode(tok.encode("12 + 35 = \\boxed{47}")) == "12 + 35 = \\boxed{47}"
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                "tokenizer_config.json", "generation_config.json",
                                                "README.md"}
    with safe_open(out / "model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
        assert "model.layers.0.self_attn.q_proj.weight" in f.keys()
        assert not any("lora" in k for k in f.keys())


def test_fused_quantized_base_is_dequantized(tiny_dir, tmp_path):
    from mlx_lm import convert

    q8 = tmp_path / "q8"
    convert(str(tiny_dir), mlx_path=str(q8), quantize=True, q_bits=8, q_group_size=32)
    adapters = make_adapter(q8, tmp_path / "ad", num_layers=-1, params=ALL)
    out = export(adapters, "fused", tmp_path / "fused", base=str(q8))
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    fused, _ = load(out)
    quantized = [n for n, m in fused.named_modules()
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert quantized == []
    assert isinstance(fused.layers[0].self_attn.q_proj, nn.Linear)
    assert not any(k.endswith((".scales", ".biases")) for k in load_file(out / "model.safetensors"))
    adapted, _ = load(q8, adapter_path=adapters)
    ids = _ids(fused.args.vocab_size)
    expected = adapted(ids)
    assert float(mx.abs(fused(ids) - expected).mean()) < 0.02 * float(expected.std())


def test_mlx_export_is_a_validated_copy(run_dir, tiny_dir, tmp_path):
    out = export(run_dir / "adapters", "mlx", tmp_path / "mlx")
    for name in ("adapter_config.json", "adapters.safetensors"):
        assert (out / name).read_bytes() == (run_dir / "adapters" / name).read_bytes()
    model, _ = load(tiny_dir, adapter_path=out)
    adapted, _ = load(tiny_dir, adapter_path=run_dir / "adapters")
    ids = _ids(model.args.vocab_size)
    np.testing.assert_array_equal(model(ids), adapted(ids))


def test_model_card_records_base_settings_and_evals(run_dir, tiny_dir, tmp_path):
    for fmt in ("peft", "mlx"):
        card = (export(run_dir / "adapters", fmt, tmp_path / fmt) / "README.md").read_text()
        assert f"base model: `{tiny_dir.name}` (a local folder" in card and f"format: `{fmt}`" in card
        assert f"\n# {run_dir.name} (OISD LoRA adapter of {tiny_dir.name})\n" in card
        assert str(tmp_path) not in card and str(tiny_dir) not in card  # no machine paths
        for line in ("| `algorithm` | `oisd` |", "| `oisd.student_layers` | `[1]` |",
                     "| `oisd.lambda_attn` | `0.1` |", "| `lora.rank` | `4` |",
                     "| `learning_rate` | `1e-05` |", "| `max_steps` | `200` |",
                     "| `dataset.source` | `openai/gsm8k` |",
                     "| benchmark | problems | avg@8 | pass@8 |", "| gsm8k | 50 | 0.4213 | 0.8 |",
                     "| math500 | 50 | 0.25 | 0.8 |", "| mean |  | 0.3357 | 0.8 |",
                     "Sampling: k = 8, temperature = 0.6."):
            assert line in card, line
    card = (export(run_dir / "adapters", "peft", tmp_path / "hub", base="Qwen/Qwen3-0.6B")
            / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["base_model"] == "Qwen/Qwen3-0.6B"


class FakeHfApi:
    """Records create_repo / upload_folder calls, and what the folder held at upload time."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, repo_type="model", exist_ok=False):
        self.calls.append(("create_repo", repo_id, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, repo_type="model", commit_message=None):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        self.calls.append(("upload_folder", repo_id, folder_path, files))


def test_push_to_hub_uploads_the_written_folder(run_dir, tmp_path):
    api = FakeHfApi()
    out = export(run_dir / "adapters", "peft", tmp_path / "peft", push_to_hub_repo="me/oisd-lora", api=api)
    assert api.calls == [
        ("create_repo", "me/oisd-lora", True),
        ("upload_folder", "me/oisd-lora", str(out),
         ["README.md", "adapter_config.json", "adapter_model.safetensors"]),
    ]
    assert 'PeftModel.from_pretrained(base, "me/oisd-lora")' in (out / "README.md").read_text()
    with pytest.raises(ExportError, match="expected a Hub repo id"):
        export(run_dir / "adapters", "mlx", tmp_path / "x", push_to_hub_repo="not a repo", api=api)
    assert not (tmp_path / "x").exists() and len(api.calls) == 2


def test_errors(tiny_dir, tmp_path):
    with pytest.raises(ExportError, match="adapter folder .* does not exist"):
        export(tmp_path / "nope", "peft", tmp_path / "out", base=str(tiny_dir))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    with pytest.raises(ExportError, match="missing adapters.safetensors"):
        export(tmp_path / "half", "mlx", tmp_path / "out", base=str(tiny_dir))
    adapters = make_adapter(tiny_dir, tmp_path / "ad")
    with pytest.raises(ExportError, match="no base model .* pass --base"):
        export(adapters, "peft", tmp_path / "out")
    with pytest.raises(ExportError, match="expected one of peft, fused, mlx"):
        export(adapters, "gguf", tmp_path / "out", base=str(tiny_dir))
    with pytest.raises(ExportError, match="is the adapter folder itself"):
        export(adapters, "mlx", adapters, base=str(tiny_dir))
    for kind in ("full", "dora"):
        folder = make_adapter(tiny_dir, tmp_path / kind, fine_tune_type=kind)
        with pytest.raises(ExportError, match=f"fine_tune_type '{kind}' cannot be exported as a PEFT"):
            export(folder, "peft", tmp_path / "out", base=str(tiny_dir))


def test_full_fine_tune_folder_fuses(tiny_dir, tmp_path):
    """fine_tune_type full: the folder holds whole weights; fused = base with them loaded."""
    model, _ = load(tiny_dir)
    model.freeze()
    model.layers[1].mlp.unfreeze()
    model.layers[1].mlp.up_proj.weight = model.layers[1].mlp.up_proj.weight * 1.5
    save_adapters(model, tmp_path / "full", num_layers=-1, params=None)
    out = export(tmp_path / "full", "fused", tmp_path / "fused", base=str(tiny_dir))
    fused, _ = load(out)
    ids = _ids(model.args.vocab_size)
    assert float(mx.abs(fused(ids) - model(ids)).max()) < 1e-5


def test_bad_tensor_names_are_listed(tiny_dir, tmp_path):
    adapters = make_adapter(tiny_dir, tmp_path / "ad")
    weights = mx.load(str(adapters / "adapters.safetensors"))
    weights["model.layers.3.mlp.up_proj.lora_a"] = mx.zeros((64, 3))
    weights["lm_head.weight"] = mx.zeros((2, 2))
    mx.save_safetensors(str(adapters / "adapters.safetensors"), weights)
    with pytest.raises(ExportError, match=r"(?s)lm_head.weight: not a LoRA tensor.*up_proj: lora_b is missing"):
        export(adapters, "peft", tmp_path / "out", base=str(tiny_dir))


def test_cli_export(run_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["export", "--help"])
    assert result.exit_code == 0 and "oisd-mlx export runs/" in result.output
    result = runner.invoke(app, ["export", str(run_dir / "adapters"), "--format", "mlx",
                                 "--out", str(tmp_path / "mlx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mlx" / "adapters.safetensors").is_file()
    result = runner.invoke(app, ["export", str(tmp_path / "nope"), "--format", "peft",
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "does not exist" in result.output


# ---- parity with Hugging Face PEFT (fixtures from scripts/make_peft_fixtures.py) ----

PEFT_FIXTURES = FIXTURES / "peft"


@pytest.mark.parametrize("case", ["all", "partial"])
def test_peft_parity_with_huggingface(case, tmp_path):
    """Our model + the mlx-lm adapter gives the logits of transformers + PeftModel loading the
    PEFT export; re-exporting gives the committed PEFT folder (so PEFT saw what we write)."""
    ref = np.load(PEFT_FIXTURES / "reference.npz")
    # a wrong key prefix makes PEFT load nothing and silently keep the base model
    assert np.abs(ref[f"logits_{case}"] - ref["logits_base"]).max() > 0.1
    model, _ = load(PEFT_FIXTURES / "base", adapter_path=PEFT_FIXTURES / f"mlx_{case}")
    logits = np.array(model(mx.array(ref["input_ids"])))
    assert np.abs(logits - ref[f"logits_{case}"]).max() < 1e-4
    out = export(PEFT_FIXTURES / f"mlx_{case}", "peft", tmp_path / "peft", base="tests/fixtures/peft/base")
    committed = PEFT_FIXTURES / f"peft_{case}"
    ours = json.loads((out / "adapter_config.json").read_text())
    theirs = json.loads((committed / "adapter_config.json").read_text())
    assert ours.pop("base_model_name_or_path") == str((PEFT_FIXTURES / "base").resolve())
    assert theirs.pop("base_model_name_or_path") == "tests/fixtures/peft/base"  # as PEFT loaded it
    assert ours == theirs
    new, old = load_file(out / "adapter_model.safetensors"), load_file(committed / "adapter_model.safetensors")
    assert new.keys() == old.keys()
    for k in new:
        np.testing.assert_array_equal(new[k], old[k])


# ---- destination guards ----

def _trained_run(root: Path, tiny_dir) -> Path:
    """A training run's output_dir: config.yaml, adapters/, checkpoints/step_000002/."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"model": str(tiny_dir), **RUN_CONFIG}))
    make_adapter(tiny_dir, root / "adapters")
    make_adapter(tiny_dir, root / "checkpoints" / "step_000002", seed=1)
    return root


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_non_empty_out_needs_overwrite(run_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    runner = CliRunner()
    args = ["export", str(run_dir / "adapters"), "--format", "mlx", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "is not empty (1 entries: notes.txt)" in result.output
    assert "--overwrite" in result.output and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "mine"  # files are written over, nothing deleted
    assert (out / "adapters.safetensors").read_bytes() == (
        run_dir / "adapters" / "adapters.safetensors").read_bytes()
    export(run_dir / "adapters", "peft", tmp_path / "empty")  # an empty or new folder is fine
    (tmp_path / "made").mkdir()
    export(run_dir / "adapters", "peft", tmp_path / "made")


def test_never_onto_a_runs_adapters_or_into_its_checkpoints(run_dir, tiny_dir, tmp_path):
    """Exporting another adapter onto a run's adapters/ or into its checkpoints/ is refused even
    with overwrite, and leaves every file of the run as it was."""
    run = _trained_run(tmp_path / "run", tiny_dir)
    before = _snapshot(run)
    source = run_dir / "adapters"
    with pytest.raises(ExportError, match=r"is the adapters/ folder of the training run .*run"):
        export(source, "mlx", run / "adapters", overwrite=True)
    for out in (run / "checkpoints" / "step_000002", run / "checkpoints", run / "checkpoints" / "new",
                run / "checkpoints" / "step_000002" / "sub"):
        with pytest.raises(ExportError, match=r"is inside the checkpoints/ folder of the training run"):
            export(source, "peft", out, overwrite=True)
    with pytest.raises(ExportError, match="is inside the checkpoints/ folder"):  # via a symlink too
        (tmp_path / "link").symlink_to(run / "checkpoints")
        export(source, "mlx", tmp_path / "link" / "x")
    assert _snapshot(run) == before and not (run / "checkpoints" / "new").exists()
    # a folder merely named adapters/ (no run around it) is an ordinary destination
    out = export(source, "mlx", tmp_path / "elsewhere" / "adapters")
    assert (out / "adapters.safetensors").is_file()


# ---- model cards: the run's name, step, prompt format, placeholders, eval files ----

def _checkpointed_run(root: Path, tiny_dir, step=40, max_steps=60, **dataset) -> Path:
    """runs/X as training leaves it: config.yaml (max_steps of the run), checkpoints/step_N
    (adapters, state.json, its config.yaml, manifest.json) and adapters/ = the newest one."""
    from mlx_oisd.checkpoint import manifest

    cfg = {"model": str(tiny_dir), **RUN_CONFIG, "max_steps": max_steps,
           "dataset": {**RUN_CONFIG["dataset"], **dataset}}
    ckpt = root / "checkpoints" / f"step_{step:06d}"
    make_adapter(tiny_dir, ckpt)
    (ckpt / "state.json").write_text(json.dumps({"step": step, "sampler": {}}))
    (ckpt / "config.yaml").write_text(yaml.safe_dump({**cfg, "max_steps": 50}))  # before a resume
    (ckpt / "manifest.json").write_text(json.dumps(manifest(ckpt)))
    make_adapter(tiny_dir, root / "checkpoints" / "step_000020", seed=3)  # an older checkpoint
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    (root / "adapters").mkdir()
    for name in ("adapters.safetensors", "adapter_config.json"):
        (root / "adapters" / name).write_bytes((ckpt / name).read_bytes())
    return root


def _code_blocks(card: str) -> list[str]:
    return [b.split("\n", 1)[1] for b in card.split("```")[1::2] if b.startswith("python\n")]


def test_card_names_the_run_and_the_checkpoint_step(tiny_dir, tmp_path):
    run = _checkpointed_run(tmp_path / "demo", tiny_dir)
    for source in (run / "adapters", run / "checkpoints" / "step_000040"):
        card = (export(source, "mlx", tmp_path / source.name / "out") / "README.md").read_text()
        assert card.count("\n# demo (OISD LoRA adapter of ") == 1
        assert "- exported at step 40 of 60 (`max_steps`)" in card
        assert "| `max_steps` | `60` |" in card  # the run's, not the checkpoint's 50
    older = export(run / "checkpoints" / "step_000020", "mlx", tmp_path / "old") / "README.md"
    assert "exported at step 20 of 60" in older.read_text()


def test_card_eval_tables_come_from_eval_files(run_dir, tmp_path):
    results = {"benchmarks": {"gsm8k": {"problems": 10, "samples": 10, "avg@1": 0.7}},
               "mean": {"avg@1": 0.7}, "settings": {"model": "Qwen/Qwen3-0.6B", "adapter": "x",
                                                    "k": 1}}
    (tmp_path / "elsewhere").mkdir()
    trained = tmp_path / "elsewhere" / "trained.json"
    trained.write_text(json.dumps(results))
    base = tmp_path / "base.json"
    base.write_text(json.dumps({**results, "settings": {"model": "Qwen/Qwen3-0.6B", "adapter": None}}))
    card = (export(run_dir / "adapters", "mlx", tmp_path / "out", evals=[trained, base])
            / "README.md").read_text()
    assert "### trained.json\n\nEvaluated: `Qwen/Qwen3-0.6B` with an adapter." in card
    assert "### base.json\n\nEvaluated: `Qwen/Qwen3-0.6B` without an adapter (the base)." in card
    assert "### eval.json" in card and "| gsm8k | 50 | 0.4213 | 0.8 |" in card  # the run's own too
    assert card.count("| gsm8k | 10 | 0.7 |") == 2
    with pytest.raises(ExportError, match=r"--eval .*nope.json: no such file; expected the JSON"):
        export(run_dir / "adapters", "mlx", tmp_path / "x", evals=[tmp_path / "nope.json"])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ExportError, match=r"--eval .*bad.json: not valid JSON"):
        export(run_dir / "adapters", "mlx", tmp_path / "x", evals=[tmp_path / "bad.json"])
    assert not (tmp_path / "x").exists()
    result = CliRunner().invoke(app, ["export", str(run_dir / "adapters"), "--format", "mlx",
                                      "--out", str(tmp_path / "cli"), "--eval", str(trained)])
    assert result.exit_code == 0, result.output
    assert "### trained.json" in (tmp_path / "cli" / "README.md").read_text()


@pytest.mark.parametrize("dataset", [
    {}, {"instruction": None, "system_prompt": "You add numbers."}, {"instruction": " Be brief."}])
def test_usage_code_builds_the_training_prompt(dataset, tiny_dir, tmp_path):
    """The card's mlx-lm code, placeholders filled in, runs and renders exactly the prompt that
    training rendered (`PromptFormat`); the transformers code builds the same messages."""
    from mlx_oisd.data.prompts import MATH_INSTRUCTION, PromptFormat
    from mlx_oisd.model_card import BASE_PLACEHOLDER, EXAMPLE_QUESTION, HERE_PLACEHOLDER

    run = _checkpointed_run(tmp_path / "run", tiny_dir, **dataset)
    instruction = dataset.get("instruction", MATH_INSTRUCTION)  # absent key: the default
    fmt = PromptFormat(dataset.get("system_prompt"), instruction, False)
    tokenizer = load(tiny_dir)[1]
    for kind in ("mlx", "fused", "peft"):
        out = export(run / "adapters", kind, tmp_path / kind)
        card = (out / "README.md").read_text()
        assert BASE_PLACEHOLDER in card or kind == "fused"
        assert str(tiny_dir) not in card and str(tmp_path) not in card
        if instruction:
            assert f"INSTRUCTION = {json.dumps(instruction)}" in card
        blocks = [b for b in _code_blocks(card) if "messages = " in b]
        assert len(blocks) == {"peft": 1, "fused": 2, "mlx": 1}[kind]
        for code in blocks:
            compile(code, "card", "exec")
            messages = "\n".join(line for line in code.splitlines()
                                 if line.startswith(("INSTRUCTION", "messages")))
            scope = {}
            exec(messages, scope)
            assert scope["messages"] == fmt.messages(EXAMPLE_QUESTION)
        if kind == "peft":
            continue
        mlx_code = blocks[-1].replace(BASE_PLACEHOLDER, str(tiny_dir)).replace(
            HERE_PLACEHOLDER, str(out)).replace("max_tokens=1024", "max_tokens=2")
        scope = {}
        exec(mlx_code, scope)
        assert scope["prompt"] == fmt.render(tokenizer, EXAMPLE_QUESTION)


# ---- adapter_config.json: a base PEFT can load ----

def test_adapter_config_names_a_loadable_base(tiny_dir, tmp_path, monkeypatch):
    """AutoPeftModelForCausalLM reads adapter_config.json, then loads base_model_name_or_path
    with transformers: a builtin: spec failed there. transformers' AutoConfig (no torch needed)
    stands in for that second step; the keys are those PEFT loaded in tests/fixtures/peft."""
    from transformers import AutoConfig

    from mlx_oisd.tiny import builtin_model_path

    fixture = json.loads((PEFT_FIXTURES / "peft_partial" / "adapter_config.json").read_text())
    adapters = make_adapter(tiny_dir, tmp_path / "ad")
    out = export(adapters, "peft", tmp_path / "builtin", base="builtin:tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(builtin_model_path("tiny").resolve())
    assert AutoConfig.from_pretrained(config["base_model_name_or_path"]).model_type == "qwen3"
    assert set(config) == set(fixture)
    assert {k: type(v) for k, v in config.items()} == {k: type(v) for k, v in fixture.items()}
    card = (out / "README.md").read_text()
    assert "base model: `builtin:tiny` (mlx-oisd's built-in model, not on the Hub" in card
    assert "base_model" not in yaml.safe_load(card.split("---")[1])
    # a Hub cache snapshot folder is its Hub id
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for f in tiny_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    out = export(adapters, "peft", tmp_path / "cached", base=str(snapshot))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == "Qwen/Qwen3-0.6B"
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["base_model"] == "Qwen/Qwen3-0.6B"
    assert 'from_pretrained("Qwen/Qwen3-0.6B")' in card


def test_a_hub_base_that_cannot_be_read_offline_is_exported_with_a_warning(tiny_dir, tmp_path,
                                                                           capsys):
    adapters = make_adapter(tiny_dir, tmp_path / "ad")
    out = export(adapters, "peft", tmp_path / "peft", base="someone/not-cached")
    assert "cannot check the adapters against someone/not-cached" in capsys.readouterr().err
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == "someone/not-cached"
    with pytest.raises(ExportError, match="neither a local folder, builtin:NAME nor a Hugging Face"):
        export(adapters, "peft", tmp_path / "x", base="./missing/folder")


# ---- adapters checked against the base before anything is written ----

@pytest.mark.parametrize("fmt", ["peft", "fused", "mlx"])
def test_adapters_that_do_not_fit_the_base_write_nothing(fmt, run_dir, make_tiny, tmp_path):
    narrow = make_tiny(hidden_size=32, intermediate_size=64)
    deeper = make_tiny(num_layers=6)
    out = tmp_path / "out"
    with pytest.raises(ExportError) as e:
        export(run_dir / "adapters", fmt, out, base=str(narrow))
    message = str(e.value)
    assert f"adapters were trained on a model with hidden size 64; --base {narrow} has 32" in message
    assert ("model.layers.2.self_attn.q_proj: lora_a (64, 4) and lora_b (4, 64) adapt a 64 -> 64 "
            f"layer; {narrow}'s is 32 -> 64") in message
    assert "nothing was written" in message and not out.exists()
    with pytest.raises(ExportError, match=r"adapt blocks 2..3 \(num_layers 2 of a 4-block model\); "
                                          r".* has 6 blocks"):
        export(run_dir / "adapters", fmt, out, base=str(deeper))
    assert not out.exists()
    result = CliRunner().invoke(app, ["export", str(run_dir / "adapters"), "--format", fmt,
                                      "--out", str(out), "--base", str(narrow)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("error: ") and "hidden size 64" in result.output


def test_full_fine_tune_shapes_are_checked(tiny_dir, make_tiny, tmp_path):
    model, _ = load(tiny_dir)
    model.freeze()
    model.layers[1].mlp.unfreeze()
    save_adapters(model, tmp_path / "full", num_layers=-1, params=None)
    with pytest.raises(ExportError, match=r"hidden size 64; --base .* has 32:\n  model.layers.1."
                                          r"mlp.down_proj.weight: shape \(64, 128\); .*\(32, 64\)"):
        export(tmp_path / "full", "fused", tmp_path / "out",
               base=str(make_tiny(hidden_size=32, intermediate_size=64)))
    assert not (tmp_path / "out").exists()


# ---- push errors: one message each (fake Hub clients raising the real exception classes) ----

def _http_error(cls, status: int, text: str):
    import httpx2

    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return cls(text, response=httpx2.Response(status, request=request))


def _failing_api(error):
    class FailingApi(FakeHfApi):
        def create_repo(self, repo_id, repo_type="model", exist_ok=False):
            raise error

    return FailingApi()


def test_push_errors_say_what_to_do(run_dir, tmp_path):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    cases = [
        (httpx2.ConnectError("[Errno -2] Name or service not known"), "cannot reach the Hugging "
         "Face Hub (offline); the export is at {out}; push it later with `hf upload me/x {out}`"),
        (OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled."),
         "cannot reach the Hugging Face Hub (offline); the export is at {out}"),
        (_http_error(HfHubHTTPError, 401, "401 Client Error: Unauthorized"),
         "(HTTP 401: not logged in, or the token may not write there): log in with `hf auth "
         "login` or set HF_TOKEN; the export is at {out}"),
        (_http_error(RepositoryNotFoundError, 401, "Repository Not Found for url"),
         "log in with `hf auth login` or set HF_TOKEN"),
        (_http_error(HfHubHTTPError, 403, "403 Forbidden: you cannot write to me/x"), "HTTP 403"),
        (_http_error(HfHubHTTPError, 500, "500 Server Error: Internal\nmore detail"),
         "the Hub answered HTTP 500 to the push to 'me/x': 500 Server Error: Internal; the export "
         "is at {out}"),
    ]
    for i, (error, expected) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(ExportError) as e:
            export(run_dir / "adapters", "mlx", out, push_to_hub_repo="me/x", api=_failing_api(error))
        message = str(e.value)
        assert expected.format(out=out) in message, message
        assert "\n" not in message and (out / "README.md").is_file()  # written; push again later
        assert ("log in" in message) == (i in (2, 3, 4))
    with pytest.raises(KeyError):  # not a Hub error: not disguised as one
        export(run_dir / "adapters", "mlx", tmp_path / "bug", push_to_hub_repo="me/x",
               api=_failing_api(KeyError("bug")))


def test_cli_push_failure_is_one_line(run_dir, tmp_path, monkeypatch):
    import httpx2

    import mlx_oisd.export as export_module

    monkeypatch.setattr(export_module, "hub_api",
                        lambda: _failing_api(httpx2.ConnectError("no route to host")))
    result = CliRunner().invoke(app, ["export", str(run_dir / "adapters"), "--format", "peft",
                                      "--out", str(tmp_path / "out"), "--push-to-hub", "me/x"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the Hugging Face Hub")


# ---- QLoRA ----

def test_quantize_group_size_must_divide_the_model_widths(make_tiny, tmp_path):
    from mlx_oisd.config import ConfigError, QuantizeConfig, quantize_problem, validate
    from mlx_oisd.trainer import setup

    folder = make_tiny(hidden_size=96, num_heads=6, intermediate_size=192)  # 96 = 3 x 32
    cfg = validate({"model": str(folder), "output_dir": str(tmp_path / "run"),
                    "dataset": {"source": str(tmp_path / "train.jsonl")},
                    "quantize": {"group_size": 64}, "oisd": {"student_layers": [1]}})
    with pytest.raises(ConfigError, match=r"'quantize.group_size' 64 does not divide .*'s "
                                          r"hidden_size 96, num_attention_heads \* head_dim 96 "
                                          r"\(.*\); use quantize.group_size 32$"):
        setup(cfg)
    config = {"hidden_size": 48, "num_attention_heads": 3, "head_dim": 16, "intermediate_size": 128}
    assert "none of 32, 64, 128 divides them" in quantize_problem(QuantizeConfig(), config, "m")
    assert quantize_problem(QuantizeConfig(group_size=32), {**config, "hidden_size": 64,
                                                            "num_attention_heads": 2}, "m") is None


def test_fused_qlora_export_computes_the_trained_model(tiny_dir, tmp_path, capsys):
    """A QLoRA run trained LoRA on the base quantized at load: the fused export holds that
    quantized base (dequantized) + the adapters, so its logits are the trained model's."""
    from mlx_lm.utils import load_adapters

    q = {"bits": 4, "group_size": 32}
    run = tmp_path / "qlora"
    (run / "config.yaml").parent.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(tiny_dir), **RUN_CONFIG,
                                                     "quantize": q}))
    make_adapter(tiny_dir, run / "adapters")
    out = export(run / "adapters", "fused", tmp_path / "fused")
    assert "trained with QLoRA" in capsys.readouterr().err
    trained, _ = load(tiny_dir)
    nn.quantize(trained, **q)
    trained = load_adapters(trained, str(run / "adapters"))
    full_precision, _ = load(tiny_dir, adapter_path=run / "adapters")
    fused, _ = load(out)
    ids = _ids(fused.args.vocab_size)
    expected = trained(ids)
    assert float(mx.abs(fused(ids) - expected).max()) < 1e-4
    assert float(mx.abs(full_precision(ids) - expected).max()) > 1e-3  # what merging used to give
    assert "quantization" not in json.loads((out / "config.json").read_text())
    card = (out / "README.md").read_text()
    assert "trained with QLoRA (the base quantized 4 bits, group size 32): these weights are " \
           "that quantized base, dequantized, with the adapters merged" in card
    mlx_card = (export(run / "adapters", "mlx", tmp_path / "mlx") / "README.md").read_text()
    assert "nn.quantize(model, group_size=32, bits=4)  # as in training (QLoRA)" in mlx_card


# ---- push_to_hub at the end of training ----

def test_push_to_hub_config_keys():
    from mlx_oisd.config import ConfigError, hub_repo, validate

    base = {"model": "builtin:tiny", "dataset": {"source": "builtin:arith"}}
    assert hub_repo(validate({**base, "push_to_hub": "me/oisd"})) == "me/oisd"
    assert hub_repo(validate({**base, "push_to_hub": True, "hub_model_id": "me/oisd"})) == "me/oisd"
    assert hub_repo(validate({**base, "push_to_hub": False, "hub_model_id": "me/oisd"})) is None
    assert hub_repo(validate(base)) is None
    for extra, expected in [
        ({"push_to_hub": "not a repo"}, "'push_to_hub' must be a Hub repo id of the form "
                                        "'owner/name', got 'not a repo'"),
        ({"push_to_hub": True}, "'push_to_hub' is true but 'hub_model_id' is not set"),
        ({"push_to_hub": True, "hub_model_id": "x"}, "'hub_model_id' must be a Hub repo id"),
        ({"push_to_hub": "me/a", "hub_model_id": "me/b"}, "name different repos"),
        ({"push_to_hub": 3}, "for 'push_to_hub', got 3"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            validate({**base, **extra})


def test_a_finished_run_is_exported_and_pushed(tmp_path, monkeypatch, capsys):
    """A push that fails after training prints one line and leaves the run finished and the
    export on disk; pushing that folder later uploads the PEFT export."""
    import httpx2

    import mlx_oisd.export as export_module
    from mlx_oisd.config import validate
    from mlx_oisd.export import publish_run
    from mlx_oisd.trainer import train

    monkeypatch.setattr(export_module, "hub_api",
                        lambda: _failing_api(httpx2.ConnectError("no route to host")))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"q": f"What is {a} + 2?", "a": a + 2}) + "\n"
                            for a in range(4)))
    cfg = validate({"model": "builtin:tiny", "output_dir": str(tmp_path / "run"), "max_steps": 1,
                    "dataset": {"source": str(data), "prompt_field": "q", "answer_field": "a"},
                    "batch_size": 2, "num_generations": 2, "max_completion_length": 4,
                    "lora": {"rank": 2, "num_layers": 1}, "oisd": {"student_layers": [1]},
                    "rewards": [{"name": "format"}], "push_to_hub": "me/run"})
    run = train(cfg, show_progress=False)
    printed = capsys.readouterr().out
    assert f"push_to_hub: cannot reach the Hugging Face Hub (offline); the export is at " \
           f"{run.out_dir / 'export-peft'}" in printed
    assert (run.out_dir / "checkpoints" / "step_000001").is_dir()
    assert (run.out_dir / "export-peft" / "adapter_model.safetensors").is_file()
    assert "exported at step 1 of 1" in (run.out_dir / "export-peft" / "README.md").read_text()
    api = FakeHfApi()
    assert publish_run(run.out_dir, "me/run", api=api) == (
        f"push_to_hub: pushed {run.out_dir / 'export-peft'} to https://huggingface.co/me/run")
    assert api.calls[-1][3] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
