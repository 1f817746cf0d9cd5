"""export.py: PEFT adapters, fused models, mlx-lm copies, model cards, push, and the errors."""

import json
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
    assert config["base_model_name_or_path"] == str(tiny_dir)  # from the run's config.yaml
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
        assert f"base model: `{tiny_dir}`" in card and f"format: `{fmt}`" in card
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
    assert (json.loads((out / "adapter_config.json").read_text())
            == json.loads((committed / "adapter_config.json").read_text()))
    new, old = load_file(out / "adapter_model.safetensors"), load_file(committed / "adapter_model.safetensors")
    assert new.keys() == old.keys()
    for k in new:
        np.testing.assert_array_equal(new[k], old[k])


def test_push_failure_is_a_clear_error(run_dir, tmp_path):
    class UnauthorizedApi(FakeHfApi):
        def create_repo(self, repo_id, repo_type="model", exist_ok=False):
            raise ConnectionError("no route to huggingface.co")  # Hub HTTP errors are OSErrors too

    with pytest.raises(ExportError, match=r"could not push .* 'me/x'.*hf auth login"):
        export(run_dir / "adapters", "mlx", tmp_path / "mlx", push_to_hub_repo="me/x", api=UnauthorizedApi())
    assert (tmp_path / "mlx" / "README.md").is_file()  # the folder is written; push again later


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
