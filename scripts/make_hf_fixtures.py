"""Generate Hugging Face Qwen3 reference fixtures for testing the MLX port.

Builds tiny, randomly initialised ``transformers.Qwen3ForCausalLM`` models
(float32, eager attention; nothing is downloaded), saves each with
``save_pretrained`` and records a reference forward pass on a right-padded
batch into ``reference.npz``:

    input_ids        int32   (B, T)        right-padded with token id 0
    attention_mask   int32   (B, T)        1 for real tokens
    logits           float32 (B, T, V)
    hidden_{l}       float32 (B, T, D)     output of decoder block l (1-based), before the final norm
    attn_{l}         float32 (B, H, T, T)  softmax attention probabilities of block l

The script re-checks what it wrote at the end (shapes, attention rows, and that
logits == lm_head(norm(hidden_L))).

Regenerate (needs the torch/transformers env in .venv-ref, not the project .venv):

    .venv-ref/bin/python scripts/make_hf_fixtures.py
"""

from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import Qwen3Config, Qwen3ForCausalLM

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf_qwen3"
SEED = 0
ROW_LENGTHS = (12, 9, 5)  # B = 3, T = 12
SEQ_LEN = 12
PAD_ID = 0
INIT_STD = 0.1

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    head_dim=16,
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
)

CASES = {
    "tied_gqa1": dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=4),
    "untied_gqa2": dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=2),
    "tied_gqa4": dict(tie_word_embeddings=True, num_attention_heads=8, num_key_value_heads=2),
}


def build_model(settings: dict) -> Qwen3ForCausalLM:
    config = Qwen3Config(**COMMON, **settings)
    config._attn_implementation = "eager"
    model = Qwen3ForCausalLM(config).to(torch.float32).eval()
    # Larger-than-default init so attention maps are far from uniform and errors show.
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied lm_head is listed once, as embed_tokens
            if "norm" in name:  # input/post-attention/final norms and q_norm/k_norm
                param.copy_(1.0 + INIT_STD * torch.randn_like(param))
            else:
                param.normal_(0.0, INIT_STD)
    return model


def make_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = len(ROW_LENGTHS)
    # Real tokens avoid the pad id so padding is unambiguous even without the mask.
    input_ids = torch.randint(1, vocab_size, (batch, SEQ_LEN))
    attention_mask = torch.zeros(batch, SEQ_LEN, dtype=torch.long)
    for row, length in enumerate(ROW_LENGTHS):
        attention_mask[row, :length] = 1
    input_ids[attention_mask == 0] = PAD_ID
    return input_ids, attention_mask


def reference_forward(model: Qwen3ForCausalLM, input_ids, attention_mask) -> dict[str, np.ndarray]:
    layers = model.model.layers
    block_outputs: dict[int, torch.Tensor] = {}

    def capture(index: int):
        def hook(_module, _args, output):
            block_outputs[index] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [layer.register_forward_hook(capture(i + 1)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()

    arrays = {
        "input_ids": input_ids.numpy().astype(np.int32),
        "attention_mask": attention_mask.numpy().astype(np.int32),
        "logits": out.logits.numpy().astype(np.float32),
    }
    for l in range(1, len(layers) + 1):
        arrays[f"hidden_{l}"] = block_outputs[l].numpy().astype(np.float32)
        arrays[f"attn_{l}"] = out.attentions[l - 1].numpy().astype(np.float32)
    return arrays


def verify(case_dir: Path) -> None:
    """Reload what was written and check it is self-consistent."""
    model = Qwen3ForCausalLM.from_pretrained(case_dir, attn_implementation="eager", dtype=torch.float32).eval()
    cfg = model.config
    L, H, D, V = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size, cfg.vocab_size
    ref = np.load(case_dir / "reference.npz")
    B, T = len(ROW_LENGTHS), SEQ_LEN

    expected = {"input_ids": (B, T), "attention_mask": (B, T), "logits": (B, T, V)}
    for l in range(1, L + 1):
        expected[f"hidden_{l}"] = (B, T, D)
        expected[f"attn_{l}"] = (B, H, T, T)
    assert set(ref.files) == set(expected), sorted(ref.files)
    for key, shape in expected.items():
        assert ref[key].shape == shape, (key, ref[key].shape, shape)
    assert ref["input_ids"].dtype == np.int32 and ref["attention_mask"].dtype == np.int32

    mask = ref["attention_mask"].astype(bool)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    for l in range(1, L + 1):
        attn = ref[f"attn_{l}"]
        for b in range(B):
            valid_q = mask[b]
            probs = attn[b][:, valid_q]  # (H, n_valid, T)
            np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
            assert np.all(probs[..., ~mask[b]] == 0.0), f"attn_{l}: mass on padded keys"
            assert np.all(attn[b][:, future] == 0.0), f"attn_{l}: mass on future keys"

    # hidden_L must be pre-norm: logits == lm_head(norm(hidden_L)).
    with torch.no_grad():
        hidden_last = torch.from_numpy(ref[f"hidden_{L}"])
        logits = model.lm_head(model.model.norm(hidden_last)).numpy()
        np.testing.assert_allclose(logits, ref["logits"], atol=1e-5, rtol=1e-5)
        # The reloaded model reproduces the recorded forward pass.
        again = reference_forward(model, torch.from_numpy(ref["input_ids"]).long(),
                                  torch.from_numpy(ref["attention_mask"]).long())
    for key in expected:
        np.testing.assert_allclose(again[key], ref[key], atol=1e-5, rtol=1e-5, err_msg=key)


def main() -> None:
    torch.manual_seed(SEED)
    for case, settings in CASES.items():
        case_dir = OUT_DIR / case
        case_dir.mkdir(parents=True, exist_ok=True)
        model = build_model(settings)
        model.save_pretrained(case_dir, safe_serialization=True)
        input_ids, attention_mask = make_batch(model.config.vocab_size)
        np.savez_compressed(case_dir / "reference.npz", **reference_forward(model, input_ids, attention_mask))

    for case in CASES:
        verify(OUT_DIR / case)
        print(f"{case}: ok")
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
