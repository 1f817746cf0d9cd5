"""The update's micro-batches (mlx_oisd.batching): skipping rows with no gradient and
length-sorted, trimmed micro-batches change neither the gradient nor the update."""

import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_oisd import load
from mlx_oisd.advantages import group_advantages
from mlx_oisd.batching import micro_batches
from mlx_oisd.config import validate
from mlx_oisd.objective import LossSpec, ObjectiveGrad, zero_gradient_rows
from mlx_oisd.rollout import Rollout, pack
from mlx_oisd.trainer import loss_spec, update

G = 3
PROMPTS = [[5, 6, 7], [8, 9], [20, 21, 22, 23, 24], [40]]
COMPLETIONS = [[10, 11, 2], [12], [13, 14, 15, 16],  # prompt 0: rewards differ
               [17, 2], [18, 19, 25, 26], [27, 2],  # prompt 1: all equal, A = 0
               [30, 31], [32, 33, 34, 2], [35],  # prompt 2: rewards differ
               [36, 37, 38, 39], [41, 2], [42, 43, 2]]  # prompt 3: all equal, A = 0
TRUNCATED = [False, True, True, False, True, False, False, False, True, True, False, False]
REWARDS = [1.0, 0.0, 0.5, 0.3, 0.3, 0.3, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]


def _cfg(**over):
    base = {"model": "x", "dataset": {"source": "x.jsonl"}, "lora": None, "max_grad_norm": 0.0,
            "max_completion_length": 4, "oisd": {"student_layers": [1], "lambda_attn": 0.5}}
    for key, value in over.items():
        if key == "oisd":
            base["oisd"] = {**base["oisd"], **value}
        else:
            base[key] = value
    return validate(base)


def _update(folder, cfg, adv, optimizer=None, steps=1):
    """Parameters after `steps` updates on the fixed batch, and the last update's stats."""
    model, _ = load(folder)
    batch = pack(Rollout(PROMPTS, COMPLETIONS, TRUNCATED, G), 0, cfg.mask_truncated,
                 bucket=32 if cfg.compile else 1)
    optimizer = optimizer or optim.SGD(learning_rate=1.0)
    grad_fn = ObjectiveGrad(model, compile=cfg.compile)
    for _ in range(steps):
        stats = update(model, optimizer, grad_fn, batch, adv, loss_spec(cfg), cfg)
    return dict(tree_flatten(model.parameters())), stats


def _assert_same(a, b, atol=3e-6):
    for k, v in a.items():
        np.testing.assert_allclose(np.asarray(b[k]), np.asarray(v), atol=atol, err_msg=k)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from mlx_oisd.tiny import TinySpec, build_tiny_model

    spec = TinySpec(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4,
                    num_kv_heads=2, head_dim=8, init_std=0.1, tie_word_embeddings=False)
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), spec)


ADV = group_advantages(np.array(REWARDS), G, "grpo")

CASES = [
    {"algorithm": "grpo", "loss_agg": "token_mean"},
    {"algorithm": "grpo", "loss_agg": "seq_mean_token_mean"},
    {"algorithm": "grpo", "loss_agg": "seq_mean_token_sum_norm"},
    {"algorithm": "oisd", "loss_agg": "token_mean"},
    {"algorithm": "oisd", "loss_agg": "seq_mean_token_mean"},
    {"algorithm": "oisd", "loss_agg": "seq_mean_token_sum_norm", "oisd": {"weighting": "sign"}},
    {"algorithm": "bupo", "loss_agg": "token_mean"},
    {"algorithm": "bupo", "loss_agg": "seq_mean_token_sum_norm"},
    {"algorithm": "oisd", "loss_agg": "token_mean", "importance_sampling_level": "sequence",
     "minibatch_size": 4, "num_iterations": 2},
    {"algorithm": "grpo", "loss_agg": "seq_mean_token_mean", "mask_truncated": True,
     "advantage": "rloo", "minibatch_size": 5},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(
    str(v) for k, v in c.items() if k != "oisd") + ("-sign" if "oisd" in c else ""))
def test_skipping_zero_gradient_rows_leaves_the_update_unchanged(folder, case):
    """The same SGD update (so parameters move by exactly the gradient) with and without
    skipping; the loss and KL agree, and rows were really skipped."""
    adv = group_advantages(np.array(REWARDS), G, case.get("advantage", "grpo"))
    full, s_full = _update(folder, _cfg(skip_zero_advantage=False, **case), adv)
    skip, s_skip = _update(folder, _cfg(skip_zero_advantage=True, **case), adv)
    _assert_same(full, skip)
    assert s_full["loss"] == pytest.approx(s_skip["loss"], abs=1e-6)
    assert s_full["skipped_tokens_frac"] == 0.0
    assert s_skip["skipped_tokens_frac"] > 0.3  # two of the four groups have A = 0
    assert s_skip["trained_tokens"] < s_full["trained_tokens"]


def test_weighting_none_or_kl_computes_every_row(folder):
    """Rows with A = 0 still carry gradient with weighting `none` (alignment) or beta > 0 (KL):
    nothing is skipped but rows with no loss token."""
    for over in ({"algorithm": "oisd", "oisd": {"weighting": "none"}},
                 {"algorithm": "grpo", "beta": 0.1}):
        cfg = _cfg(skip_zero_advantage=True, **over)
        _, stats = _update(folder, cfg, ADV)
        assert stats["skipped_tokens_frac"] == 0.0, over
    spec = LossSpec(algorithm="oisd", weighting="none")
    assert list(zero_gradient_rows([0.0, 1.0, 0.0], [3, 2, 0], spec)) == [False, False, True]
    spec = LossSpec(algorithm="oisd", weighting="advantage")
    assert list(zero_gradient_rows([0.0, 1.0, -0.0], [3, 2, 1], spec)) == [True, False, True]


def test_an_all_zero_advantage_step_updates_adamw_as_without_skipping(folder):
    """Every row skipped: the update still runs (a zero gradient), so AdamW's moments decay and
    its step from earlier momentum lands exactly as it would have computing every row."""
    results = []
    for skipping in (False, True):
        cfg = _cfg(skip_zero_advantage=skipping, algorithm="oisd")
        model, _ = load(folder)
        batch = pack(Rollout(PROMPTS, COMPLETIONS, TRUNCATED, G), 0)
        opt = optim.AdamW(learning_rate=1e-2)
        grad_fn = ObjectiveGrad(model, compile=False)
        update(model, opt, grad_fn, batch, ADV, loss_spec(cfg), cfg)  # builds momentum
        stats = update(model, opt, grad_fn, batch, np.zeros_like(ADV), loss_spec(cfg), cfg)
        results.append(dict(tree_flatten(model.parameters())))
        assert stats["skipped_tokens_frac"] == (1.0 if skipping else 0.0)
    _assert_same(*results)


@pytest.mark.parametrize("size,compile", [(2, False), (4, False), (5, True), (None, False)])
def test_length_sorted_trimmed_micro_batches_give_the_unsorted_gradient(folder, size, compile):
    """Micro-batches of rows sorted by completion length, each cut to its own longest row, give
    the update of the whole unsorted batch (OISD with both alignment terms, full fine-tuning)."""
    ref, _ = _update(folder, _cfg(algorithm="oisd", skip_zero_advantage=False,
                                  sort_by_length=False), ADV)
    got, _ = _update(folder, _cfg(algorithm="oisd", skip_zero_advantage=True,
                                  sort_by_length=True, minibatch_size=size, compile=compile), ADV)
    _assert_same(ref, got)


def test_micro_batches_are_sorted_trimmed_and_share_prompts():
    batch = pack(Rollout(PROMPTS, COMPLETIONS, TRUNCATED, G), 0)
    skip = zero_gradient_rows(ADV, np.asarray(batch.response_mask.sum(axis=1)), LossSpec())
    parts = micro_batches(batch, ADV, 2, skip, sort=True)
    kept = [i for i in range(len(ADV)) if ADV[i] != 0]
    lengths = [len(COMPLETIONS[i]) for i in kept]
    seen = [int(mb.mask[:, mb.prompt_len:].sum(axis=1).max()) for mb, _ in parts]
    assert seen == sorted(seen, reverse=True)  # longest first
    assert sum(mb.tokens.shape[0] for mb, _ in parts) == len(kept)
    for mb, a in parts:
        C = mb.tokens.shape[1] - mb.prompt_len
        assert C == int(mb.mask[:, mb.prompt_len:].sum(axis=1).max())  # own longest completion
        assert mb.prompt_len == int(mb.mask[:, :mb.prompt_len].sum(axis=1).max())  # own prompt
        assert mb.prompt_rows.shape[0] == len(set(np.asarray(mb.group).tolist()))
        assert (np.asarray(a) != 0).all()
    assert sorted(lengths, reverse=True)[0] == seen[0]
    # the rows' tokens are the packed rows' real tokens, realigned
    mb, _ = parts[0]
    row = np.asarray(mb.tokens)[0][np.asarray(mb.mask)[0] > 0].tolist()
    assert row in [PROMPTS[i // G] + COMPLETIONS[i] for i in kept]
    # nothing to compute: one row standing in, with no loss token
    (one, a), = micro_batches(batch, ADV, 2, np.ones(len(ADV), bool))
    assert one.tokens.shape[0] == 1 and float(one.response_mask.sum()) == 0 and float(a[0]) == 0
