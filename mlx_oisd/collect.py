"""One step's scored rollouts: B prompts x G completions sampled from the acting policy (the final
layer), decoded and scored (DESIGN.md section 1), and DAPO's dynamic sampling.

`collect` draws one round of `batch_size` prompts, or with `dynamic_sampling` keeps drawing
rounds of `batch_size` prompts until `batch_size` groups hold rewards that differ (the raw
weighted reward: groups with equal rewards have zero advantage and teach nothing), at most
`max_sampling_rounds`; the step then trains on the groups found (fewer than `batch_size` when
the rounds ran out, reported). Every round advances the prompt sampler, whose state the
checkpoint keeps, and the RNG stream seeded once per step, so a resumed run draws the same.

With several ranks (`distributed.World`) each draws its share of every round's prompts; the
rounds stop in lock-step on the global count of groups found, and the groups kept are the first
ones in global (rank) order, as one process would keep them.
"""

from collections import Counter
from dataclasses import dataclass

import numpy as np

from .advantages import zero_std_groups
from .distributed import World
from .rewards import check_first_batch, score_batch
from .rollout import Rollout, sample


@dataclass
class Scored:
    """Scored rollouts of B prompts; row g*G + j is the j-th completion of prompt g."""

    examples: list  # [B] the prompts' examples (.prompt, .answer)
    rollout: Rollout  # B prompts, B*G completions
    texts: list[str]  # [B*G] decoded completions
    rewards: np.ndarray  # [B*G] float32 weighted sum of the rewards
    per_reward: dict[str, np.ndarray]  # name -> [B*G] unweighted
    stats: dict  # score_batch's stats, counts added over rounds
    drawn: int  # groups sampled over every round
    drawn_zero_std: int  # of which had equal rewards
    drawn_reward_sum: float  # sum of the rewards of every row sampled
    rounds: int = 1
    pad: Rollout | None = None  # one drawn group, for a zero-weight pass when no group is kept

    def groups(self, idx) -> "Scored":
        """The groups `idx` (prompt indices) only; the drawn counts unchanged."""
        G = self.rollout.group_size
        rows = [g * G + j for g in idx for j in range(G)]
        r = self.rollout
        rollout = Rollout([r.prompts[g] for g in idx], [r.completions[i] for i in rows],
                          [r.truncated[i] for i in rows], G)
        return Scored([self.examples[g] for g in idx], rollout, [self.texts[i] for i in rows],
                      self.rewards[rows], {k: v[rows] for k, v in self.per_reward.items()},
                      self.stats, self.drawn, self.drawn_zero_std, self.drawn_reward_sum,
                      self.rounds)


def merge(parts: list[Scored]) -> Scored:
    """The groups of every part, in order; stats and drawn counts added, first errors kept."""
    if len(parts) == 1:
        return parts[0]
    G = parts[0].rollout.group_size
    stats = {"error_types": {}, "first_errors": {}}
    for p in parts:
        for key, value in p.stats.items():
            if key == "error_types":
                for name, kinds in value.items():
                    stats[key][name] = dict(Counter(stats[key].get(name, {})) + Counter(kinds))
            elif key == "first_errors":
                stats[key] = {**value, **stats[key]}
            else:
                stats[key] = stats.get(key, 0) + value
    rollout = Rollout([q for p in parts for q in p.rollout.prompts],
                      [c for p in parts for c in p.rollout.completions],
                      [t for p in parts for t in p.rollout.truncated], G)
    return Scored([e for p in parts for e in p.examples], rollout,
                  [t for p in parts for t in p.texts],
                  np.concatenate([p.rewards for p in parts]),
                  {k: np.concatenate([p.per_reward[k] for p in parts]) for k in parts[0].per_reward},
                  stats, sum(p.drawn for p in parts), sum(p.drawn_zero_std for p in parts),
                  sum(p.drawn_reward_sum for p in parts), len(parts))


def draw(run, first_step: bool) -> Scored:
    """Sample and score the sampler's next `batch_size` prompts. A reward failing on every item
    of a run's first step raises RewardFailedError (`first_step`)."""
    cfg, tok, G = run.cfg, run.tokenizer, run.cfg.num_generations
    rows = world_of(run).share(run.sampler.next_batch())  # the global batch's share
    examples = [run.examples[i] for i in rows]
    run.model.eval()
    rollout = sample(run.model, [run.prompts[i] for i in rows], G, cfg.max_completion_length,
                     tok.eos_token_ids, cfg.temperature, cfg.top_p,
                     batch_size=cfg.rollout_batch_size, top_k=cfg.top_k, min_p=cfg.min_p)
    texts = [tok.decode(c) for c in rollout.completions]
    rewards, per_reward, stats = score_batch(
        texts, [ex.answer for ex in examples for _ in range(G)],
        [(r.name, r.weight) for r in cfg.rewards], run.workers,
        [ex.prompt for ex in examples for _ in range(G)])
    if first_step:
        check_first_batch(stats, len(texts))
    zero = int(zero_std_groups(rewards, G).sum())
    return Scored(examples, rollout, texts, rewards, per_reward, stats, len(rows), zero,
                  float(rewards.sum()))


def collect(run, first_step: bool) -> Scored:
    """One round (`dynamic_sampling: false`), or rounds until `batch_size` groups with
    differing rewards are found (at most `max_sampling_rounds`; see the module docstring)."""
    cfg = run.cfg
    if not cfg.dynamic_sampling:
        return draw(run, first_step)
    world = world_of(run)
    parts, found, pad = [], 0, None
    for round_ in range(cfg.max_sampling_rounds):
        scored = draw(run, first_step and round_ == 0)
        pad = pad or scored.groups([0]).rollout
        keep = np.flatnonzero(~zero_std_groups(scored.rewards, cfg.num_generations))
        counts = np.zeros(world.size)
        counts[world.rank] = len(keep)
        counts = world.all_sum(counts, "dynamic sampling all-sum")  # [size] groups found
        left = cfg.batch_size - found
        keep = keep[:max(0, left - int(counts[:world.rank].sum()))]  # global order: rank order
        parts.append(scored.groups(keep))
        found += min(int(counts.sum()), left)
        if found == cfg.batch_size:
            break
    out = merge(parts)
    out.pad = pad
    return out


def world_of(run) -> World:
    """The run's ranks (a single process when the run has none)."""
    return getattr(run, "world", None) or World()


def gather_scored(world: World, scored: Scored, shaping: np.ndarray, reward_names: list[str],
                  extra=()):
    """Every rank's rows of `scored` and `shaping` [n] concatenated in rank order (the global
    batch, for metrics), the drawn counts, reward error counts and the numbers `extra` summed;
    error types and first errors stay this rank's. Returns (Scored without rollout texts,
    shaping [N], lengths [N], truncated [N], the sums of `extra`)."""
    r = scored.rollout
    cols = np.stack([scored.rewards, shaping, [len(c) for c in r.completions],
                     np.asarray(r.truncated, float),
                     *(scored.per_reward[k] for k in reward_names)], axis=1)  # [n, 4 + rewards]
    cols = world.gather(cols)  # [N, 4 + rewards]
    counted = [k for k in sorted(scored.stats) if k.startswith(("errors/", "timeouts/"))]
    sums = world.all_sum([len(scored.examples), scored.drawn, scored.drawn_zero_std,
                          scored.drawn_reward_sum, *extra, *(scored.stats[k] for k in counted)])
    e = 4 + len(extra)
    stats = {**scored.stats, **{k: int(v) for k, v in zip(counted, sums[e:])}}
    out = Scored([None] * int(sums[0]), r, [], cols[:, 0].astype(np.float32),
                 {k: cols[:, 4 + i] for i, k in enumerate(reward_names)}, stats, int(sums[1]),
                 int(sums[2]), float(sums[3]), scored.rounds)
    return out, cols[:, 1], cols[:, 2], cols[:, 3], sums[4:e]


def reward_metrics(scored: Scored, shaping: np.ndarray, cfg) -> dict:
    """reward (mean / std of the trained rows' raw rewards) and each reward's mean; with dynamic
    sampling, the rounds drawn, the groups found and the mean over every row drawn; with
    overlong shaping, its mean."""
    r = scored.rewards
    out = {"reward": float(r.mean()) if len(r) else float("nan"),
           "reward_std": float(r.std()) if len(r) else float("nan"),
           **{f"reward/{k}": float(v.mean()) if len(v) else float("nan")
              for k, v in scored.per_reward.items()}}
    if cfg.dynamic_sampling:
        out["sampling_rounds"] = scored.rounds
        out["dynamic_groups"] = len(scored.examples)
        out["reward_drawn"] = scored.drawn_reward_sum / max(scored.drawn * cfg.num_generations, 1)
    if cfg.overlong_buffer_len:
        out["reward/overlong"] = float(shaping.mean()) if len(shaping) else 0.0
    return out
