"""reference.py: the KL term's reference is the starting policy, for full fine-tuning and BuPO."""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlx_oisd import load
from mlx_oisd.config import validate
from mlx_oisd.lora import apply_lora, lora_parameters
from mlx_oisd.objective import ObjectiveGrad, policy_logprobs
from mlx_oisd.reference import frozen_copy, reference_policy
from mlx_oisd.rollout import Rollout, pack
from mlx_oisd.trainer import loss_spec, update

ROLLOUT = Rollout([[5, 6, 7], [8, 9]], [[10, 11, 2], [12], [13, 14, 15, 16], [17, 2]],
                  [False, True, True, False], 2)
ADV = mx.array([1.0, -1.0, 0.5, -0.5])


def _cfg(**over):
    raw = {"model": "x", "dataset": {"source": "x.jsonl"}, "lora": None, "max_grad_norm": 0.0,
           "max_completion_length": 4, "oisd": {"student_layers": [2]}}
    return validate({**raw, **over})


def _params(model):
    return {k: np.asarray(v) for k, v in tree_flatten(model.parameters())}


def _two_updates(folder, beta, reference: bool):
    """Full fine-tuning: two SGD updates on one batch; returns (model, reference, stats)."""
    cfg = _cfg(beta=beta)
    model, _ = load(folder)
    ref = frozen_copy(model) if reference else None
    opt, grad_fn, batch = optim.SGD(learning_rate=0.5), ObjectiveGrad(model, False), pack(ROLLOUT, 0)
    stats = [update(model, opt, grad_fn, batch, ADV, loss_spec(cfg), cfg, ref) for _ in range(2)]
    return model, ref, stats


def test_the_frozen_copy_keeps_the_starting_weights_while_the_model_trains(make_tiny):
    folder = make_tiny(init_std=0.1, tie_word_embeddings=False)
    model, ref, _ = _two_updates(folder, 0.5, reference=True)
    start, _ = load(folder)
    batch, spec = pack(ROLLOUT, 0), loss_spec(_cfg())
    with reference_policy(model, ref) as scored:
        assert scored is ref
        ref_logp, _ = policy_logprobs(scored, batch, spec)
    np.testing.assert_array_equal(np.asarray(ref_logp), np.asarray(policy_logprobs(start, batch, spec)[0]))
    moved = policy_logprobs(model, batch, spec)[0]
    assert float(mx.abs(moved - ref_logp).max()) > 1e-3
    assert all(k in _params(start) for k in _params(ref))


def test_beta_changes_the_full_fine_tuning_update(make_tiny):
    """The KL gradient is zero while the policy equals the reference (first update) and not
    after: with a frozen reference, beta changes the second update; with the current weights as
    their own reference (what switching off absent adapters gives) it would change nothing."""
    folder = make_tiny(init_std=0.1, tie_word_embeddings=False)
    plain, _, _ = _two_updates(folder, 0.0, reference=True)
    with_kl, _, stats = _two_updates(folder, 1.0, reference=True)
    self_ref, _, self_stats = _two_updates(folder, 1.0, reference=False)
    assert stats[0]["kl"] == 0.0 and stats[1]["kl"] > 1e-4
    assert self_stats[1]["kl"] == 0.0  # the current weights as reference: k3 is 0
    a, b, c = _params(plain), _params(with_kl), _params(self_ref)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) > 1e-5
    assert max(float(np.abs(a[k] - c[k]).max()) for k in a) < 1e-6


def test_bupo_reference_is_the_starting_models_own_lens(make_tiny):
    """Under BuPO's internal phase the k3 term compares the layer-l lens with the reference's
    layer-l lens: fresh LoRA adapters (B = 0) are the reference itself, so k3 is exactly 0."""
    model, _ = load(make_tiny(init_std=0.1, tie_word_embeddings=False))
    model.freeze()
    apply_lora(model, -1, lora_parameters(4, 10.0, 0.0, None))
    cfg = _cfg(algorithm="bupo", beta=0.1, lora={"rank": 4}, bupo={"internal_steps": 5})
    spec = loss_spec(cfg)
    from dataclasses import replace

    opt = optim.Adam(learning_rate=1e-3)
    stats = update(model, opt, ObjectiveGrad(model, False), pack(ROLLOUT, 0), ADV,
                   replace(spec, bupo_active=True), cfg)
    assert abs(stats["kl"]) < 1e-6


def test_a_resumed_full_fine_tuning_run_keeps_the_base_as_reference(tmp_path):
    """The reference is taken before a checkpoint loads: after --resume it is still the base."""
    import test_trainer as tt

    from mlx_oisd.config import load_config
    from mlx_oisd.trainer import setup

    path = tt._config(tmp_path, lora=None, beta=0.1, max_steps=2, learning_rate=1e-2,
                      rewards=[{"name": "test_trainer:parity_reward"}])
    tt._train(path)
    run = setup(load_config(path), resume=True)
    try:
        base, _ = load("builtin:tiny")
        ref, trained, start = _params(run.reference), _params(run.model), _params(base)
        assert all(np.array_equal(ref[k], start[k]) for k in start)
        assert max(float(np.abs(trained[k] - start[k]).max()) for k in start) > 1e-4
    finally:
        run.lock.release()
        for w in run.workers.values():
            w.close()
