"""Per-completion advantages from grouped rewards (DESIGN.md section 1, "Advantages").

Rewards arrive grouped contiguously: with group size G, rows ``[g*G:(g+1)*G]`` are the G
completions of prompt g. The estimators (``advantage:`` in the config):

- ``grpo``:          A_i = (r_i - mean_g r) / (std_g r + 1e-6)
- ``dr_grpo``:       A_i = r_i - mean_g r
- ``rloo``:          A_i = r_i - mean_{j != i} r_j  =  G/(G-1) * (r_i - mean_g r)
- ``reinforce_pp``:  x_i = r_i - mean_g r, then A = (x - mean x) / (std x + 1e-6) over the batch

Choices:
- ``std`` is the unbiased one (ddof=1), as TRL (torch ``.std()``) and verl's ``masked_whiten``.
- ``reinforce_pp`` whitens per completion, not per token as verl does.
- A group whose rewards are all equal ("zero-std group") gets an advantage of exactly 0 under
  every estimator. Floating point would otherwise leave residues such as ``0.1 - mean(0.1, 0.1,
  0.1) = -1.4e-17``, which ``grpo`` divides by 1e-6. For ``reinforce_pp`` the group-centred values
  sum to zero in every group, so the batch mean is zero by construction and is not subtracted:
  whitening reduces to dividing by the batch std, which keeps those rows at exactly 0.

Rewards are a few hundred host floats returned by Python reward functions, and the keep mask
is used to index the batch on the host, so this module uses numpy (float64 inside) rather than
mlx; ``group_advantages`` returns float32 ready for ``mx.array``.
"""

import numpy as np

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
STD_EPS = 1e-6


def _grouped(rewards, group_size: int) -> np.ndarray:
    """Rewards [N] as float64 [N/G, G]; checks that the batch is made of whole groups of >= 2."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"rewards must be one-dimensional [N], got shape {r.shape}")
    if group_size < 2:
        raise ValueError(f"group_size (num_generations) must be >= 2, got {group_size}")
    if r.shape[0] % group_size != 0:
        raise ValueError(
            f"{r.shape[0]} rewards do not split into whole groups of {group_size} (num_generations)"
        )
    return r.reshape(-1, group_size)  # [N/G, G]


def zero_std_groups(rewards, group_size: int) -> np.ndarray:
    """Which groups carry no signal: all G rewards equal.

    Args:
        rewards: [N] rewards, N = num_prompts * G, grouped contiguously.
        group_size: G.
    Returns:
        bool [N/G], True for a group whose rewards are all (exactly) equal.
    """
    r = _grouped(rewards, group_size)  # [N/G, G]
    return r.max(axis=1) == r.min(axis=1)


def keep_rows(rewards, group_size: int) -> np.ndarray:
    """Per-row keep mask for ``filter_zero_std_groups``.

    Args:
        rewards: [N] rewards, grouped contiguously in groups of G.
        group_size: G.
    Returns:
        bool [N], False for every row of a zero-std group.
    """
    return np.repeat(~zero_std_groups(rewards, group_size), group_size)


def group_advantages(rewards, group_size: int, estimator: str = "grpo", all_sum=None) -> np.ndarray:
    """Advantages A [N] from rewards [N] grouped contiguously in groups of G.

    See the module docstring for each estimator's equation. Zero-std groups get exactly 0.

    Args:
        rewards: [N] rewards (list, numpy or mx array), N = num_prompts * G.
        group_size: G, completions per prompt (>= 2).
        estimator: one of "grpo", "dr_grpo", "rloo", "reinforce_pp".
        all_sum: with several ranks, sums a host array across them (`World.all_sum`), so
            `reinforce_pp` whitens over the global batch; None: this batch is the whole batch.
    Returns:
        float32 numpy [N].
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"advantage estimator {estimator!r}: expected one of {ESTIMATORS}")
    r = _grouped(rewards, group_size)  # [N/G, G]
    centred = r - r.mean(axis=1, keepdims=True)  # [N/G, G]
    if estimator == "grpo":
        adv = centred / (r.std(axis=1, ddof=1, keepdims=True) + STD_EPS)
    elif estimator == "rloo":
        adv = centred * group_size / (group_size - 1)
    else:  # dr_grpo and reinforce_pp
        adv = centred
    adv = np.where(zero_std_groups(rewards, group_size)[:, None], 0.0, adv).reshape(-1)  # [N]
    if estimator == "reinforce_pp":
        adv = adv / (batch_std(adv, all_sum) + STD_EPS)
    return adv.astype(np.float32)


def batch_std(x: np.ndarray, all_sum=None) -> float:
    """The unbiased (ddof=1) std of x [n], or of the ranks' x together (`all_sum` sums
    [n, sum x, sum x^2] across them)."""
    if all_sum is None:
        return float(x.std(ddof=1))
    n, s, q = all_sum(np.array([len(x), x.sum(), (x * x).sum()], dtype=np.float64))
    return float(np.sqrt(max(q - s * s / n, 0.0) / (n - 1)))


def overlong_penalty(lengths, max_len: int, buffer_len: int, penalty: float = 1.0) -> np.ndarray:
    """DAPO's soft overlong punishment, added to the rewards before the advantages:

        r_i += -penalty * clip((len_i - (max_len - buffer_len)) / buffer_len, 0, 1)

    0 up to max_len - buffer_len tokens, then linearly down to -penalty at max_len (a truncated
    completion has max_len tokens), as verl's `overlong_buffer` (DAPO, arXiv 2503.14476, eq. 13).

    Args:
        lengths: [N] completion lengths in tokens (the sampled EOS included).
        max_len: max_completion_length.
        buffer_len: the buffer's length L_cache (0: no shaping, all zeros).
        penalty: the reward subtracted at max_len.
    Returns:
        float32 [N], <= 0.
    """
    n = np.asarray(lengths, dtype=np.float64)
    if buffer_len <= 0:
        return np.zeros(n.shape, dtype=np.float32)
    over = np.clip((n - (max_len - buffer_len)) / buffer_len, 0.0, 1.0)
    return (-penalty * over).astype(np.float32)
