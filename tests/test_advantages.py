"""Advantage estimators against per-element references written with loops and `statistics`."""

import statistics

import numpy as np
import pytest

from mlx_oisd.advantages import ESTIMATORS, group_advantages, keep_rows, zero_std_groups

G = 4
# Three prompts: a mixed group, a constant group whose mean does not round-trip (0.1 * 3 / 3),
# and another mixed group.
REWARDS = [1.0, 0.0, 0.5, 0.0, 0.1, 0.1, 0.1, 0.1, 0.0, 1.0, 1.0, 1.0]


def _groups(rewards, g):
    return [rewards[i : i + g] for i in range(0, len(rewards), g)]


def _ref(rewards, g, estimator):
    out = []
    for grp in _groups(rewards, g):
        if len(set(grp)) == 1:
            out += [0.0] * g
            continue
        mean = sum(grp) / g
        for i, r in enumerate(grp):
            if estimator == "grpo":
                out.append((r - mean) / (statistics.stdev(grp) + 1e-6))
            elif estimator == "rloo":
                others = grp[:i] + grp[i + 1 :]
                out.append(r - sum(others) / (g - 1))
            else:
                out.append(r - mean)
    if estimator == "reinforce_pp":
        mean, std = statistics.fmean(out), statistics.stdev(out)
        out = [(x - mean) / (std + 1e-6) for x in out]
    return out


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimator_matches_reference(estimator):
    adv = group_advantages(REWARDS, G, estimator)
    assert adv.dtype == np.float32 and adv.shape == (len(REWARDS),)
    np.testing.assert_allclose(adv, _ref(REWARDS, G, estimator), rtol=1e-5, atol=1e-6)


def test_hand_computed_group():
    # rewards (1, 0): mean 0.5, unbiased std sqrt(0.5)
    np.testing.assert_allclose(
        group_advantages([1.0, 0.0], 2, "grpo"), [0.5 / (0.5**0.5 + 1e-6), -0.5 / (0.5**0.5 + 1e-6)]
    )
    np.testing.assert_allclose(group_advantages([1.0, 0.0], 2, "dr_grpo"), [0.5, -0.5])
    np.testing.assert_allclose(group_advantages([1.0, 0.0, 0.0], 3, "rloo"), [1.0, -0.5, -0.5])


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_zero_std_groups_get_exactly_zero(estimator):
    adv = group_advantages(REWARDS, G, estimator)
    assert np.all(adv[4:8] == 0.0)
    assert np.all(group_advantages([0.1] * 6, 3, estimator) == 0.0)


def test_reinforce_pp_is_whitened_over_the_batch():
    adv = group_advantages(REWARDS, G, "reinforce_pp")
    assert abs(adv.mean()) < 1e-6
    assert abs(adv.std(ddof=1) - 1.0) < 1e-4


def test_zero_std_masks():
    np.testing.assert_array_equal(zero_std_groups(REWARDS, G), [False, True, False])
    np.testing.assert_array_equal(keep_rows(REWARDS, G), [True] * 4 + [False] * 4 + [True] * 4)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="expected one of"):
        group_advantages(REWARDS, G, "ppo")
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(REWARDS, 5)
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages(REWARDS, 1)


def test_overlong_penalty_by_hand():
    """DAPO's soft punishment with max_len 10 and a buffer of 4: free up to 6 tokens, then
    -penalty * (len - 6) / 4, reaching -penalty at 10 (a truncated completion)."""
    from mlx_oisd.advantages import overlong_penalty

    got = overlong_penalty([1, 6, 7, 8, 10], max_len=10, buffer_len=4, penalty=0.5)
    np.testing.assert_allclose(got, [0.0, 0.0, -0.125, -0.25, -0.5])
    assert got.dtype == np.float32
    assert not overlong_penalty([10, 3], 10, 0).any()  # buffer 0: off
