"""The on-policy loop of DESIGN.md section 1: sample -> reward -> advantage -> update.

Each step: B prompts, G completions each from the final layer (`rollout.sample`), rewards
(`rewards.score_batch`), group advantages (`advantages`), old (and reference) log-probs from a
forward pass of the current model, then `num_iterations` optimizer updates over micro-batches of
the objective (`objective.objective`: GRPO surrogate + OISD alignment terms), one
`nn.value_and_grad` over their sum. Gradients of micro-batches add up to the full-batch gradient.

Departures from the paper's setup: none in the objective. The RNG is re-seeded from (seed, step),
so a resumed run samples what an uninterrupted one would have.

Under `mlx.launch` the step is data-parallel (`distributed.py`): each rank trains on its share
of the prompts with the global normalisers and one gradient all-reduce per update; rank 0 alone
writes metrics, logs and checkpoints.
"""

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx.utils import tree_flatten, tree_map

from .advantages import group_advantages, keep_rows, overlong_penalty
from .batching import micro_batches
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    open_checkpoints,
    resume_notes,
    save_checkpoint,
)
from .collect import collect, gather_scored, reward_metrics
from .config import (
    ConfigError,
    TrainConfig,
    hub_repo,
    quantize_problem,
    save_config,
    to_dict,
)
from .console import banner_lines, model_summary, nonfinite_message, step_report
from .data.prompts import PromptFormat, render_examples
from .data.sampler import PromptSampler
from .data.sources import load_examples
from .distributed import Watchdog, World, init_world, start_mismatch
from .evaluate import avg_at_k
from .export import publish_run
from .init_adapter import init_from_adapter, read_init_adapter
from .loading import load_model, tokenizer_for
from .lora import apply_lora, lora_parameters
from .memory import plan_run, read_model_config, set_memory_limits
from .metrics import MetricsWriter, NullWriter
from .objective import LossSpec, ObjectiveGrad, policy_logprobs, zero_gradient_rows
from .plot import plot_metrics
from .precision import make_adamw
from .reference import frozen_copy, reference_policy
from .rewards import MathChecker, resolve_reward, reward_record
from .rewards.math import DEFAULT_SCORE_FN, exit_if_reimported
from .rollout import Batch, pack
from .runlock import RunLock
from .samples import CompletionsLog, step_rows
from .signals import StopSignals
from .tracking import Tracker, check_installed


@dataclass
class Run:
    cfg: TrainConfig
    model: nn.Module
    tokenizer: object
    optimizer: optim.Optimizer
    examples: list
    eval_examples: list  # held-out problems (`load_eval_examples`)
    sampler: PromptSampler
    workers: dict[str, MathChecker]  # reward name -> its time-limited worker process
    spec: LossSpec
    grad_fn: ObjectiveGrad
    out_dir: Path
    start_step: int = 0
    prompts: list = field(default_factory=list)  # rendered prompt ids of `examples`
    notes: list = field(default_factory=list)  # lines for the console before step 1
    nonfinite_steps: int = 0  # steps whose update was skipped (non-finite), over the whole run
    lock: RunLock | None = None  # held until train() ends: one writer per output_dir
    model_path: Path | None = None  # the folder the weights were read from
    samples: list = field(default_factory=list)  # the latest step's logged completion rows
    reference: nn.Module | None = None  # frozen starting weights (full fine-tuning, beta > 0)
    world: World = field(default_factory=World)  # the ranks (`mlx.launch`); one process: size 1


def loss_spec(cfg: TrainConfig) -> LossSpec:
    o = cfg.oisd
    return LossSpec(
        algorithm=cfg.algorithm, student_layers=tuple(o.student_layers),
        lambda_logit=o.lambda_logit, lambda_attn=o.lambda_attn, tau=o.tau,
        weighting=o.weighting, lens_norm=o.lens_norm, head_grad=o.head_grad,
        bupo_lens_norm=cfg.bupo.lens_norm, beta=cfg.beta, loss_agg=cfg.loss_agg,
        importance_sampling_level=cfg.importance_sampling_level,
        **({"epsilon": cfg.sequence_epsilon, "epsilon_high": cfg.sequence_epsilon_high}
           if cfg.importance_sampling_level == "sequence"
           else {"epsilon": cfg.epsilon, "epsilon_high": cfg.epsilon_high}),
        max_len=cfg.max_completion_length, temperature=cfg.temperature,
        chunk_size=cfg.loss_chunk_size,
    )


def num_warmup_steps(cfg: TrainConfig) -> int:
    """warmup_steps, or ceil(warmup_ratio x max_steps) (rounded to 1e-6 first, so 0.1 x 30 is 3,
    not the 4 of its float product 3.0000000000000004)."""
    return cfg.warmup_steps or math.ceil(round(cfg.warmup_ratio * cfg.max_steps, 6))


def lr_schedule(cfg: TrainConfig):
    """Linear warmup from 0, then cosine / linear decay to 0 or constant, over optimizer updates."""
    total = cfg.max_steps * cfg.num_iterations
    warm = num_warmup_steps(cfg) * cfg.num_iterations
    decay = {
        "cosine": lambda: optim.cosine_decay(cfg.learning_rate, max(total - warm, 1)),
        "linear": lambda: optim.linear_schedule(cfg.learning_rate, 0.0, max(total - warm, 1)),
        "constant": lambda: (lambda _: mx.array(cfg.learning_rate)),
    }[cfg.lr_scheduler_type]()
    if warm == 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, cfg.learning_rate, warm), decay], [warm])


def load_eval_examples(cfg: TrainConfig) -> list:
    """The held-out problems: `eval_split` of `dataset.eval_source` (a local file: all of it),
    else of the training source; [] when neither is set. `validate` refuses eval_split on a
    single-file source, whose only split is the training rows."""
    d = cfg.dataset
    if cfg.eval_split is None and d.eval_source is None:
        return []
    return load_examples(d.eval_source or d.source, cfg.eval_split or "test", d.config,
                         d.prompt_field, d.answer_field, cfg.eval_samples)


def setup(cfg: TrainConfig, resume: bool = False) -> Run:
    """Lock output_dir (before anything there is read or written), then build the run."""
    exit_if_reimported()  # a reward worker importing a script that calls train() unguarded
    world = init_world()
    if cfg.batch_size < world.size:
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be at least the number of ranks "
                          f"({world.size}): each rank trains on whole prompts")
    lock = RunLock(cfg.output_dir) if world.main else None  # rank 0 writes output_dir
    try:
        if not world.main:  # after rank 0 has checked output_dir and removed stale temps
            world.barrier("setup barrier")
        run = _setup(cfg, resume, Path(cfg.output_dir), world)
        if world.main:
            world.barrier("setup barrier")
        if problem := start_mismatch(world, run.start_step, run.model.trainable_parameters()):
            raise CheckpointError(problem)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    run.lock, run.world = lock, world
    return run


def _setup(cfg: TrainConfig, resume: bool, out_dir: Path, world: World | None = None) -> Run:
    ckpt = open_checkpoints(out_dir, resume)  # verified; stale temps removed
    notes = [] if ckpt is None else resume_notes(ckpt.path / "config.yaml", cfg)
    for i, r in enumerate(cfg.rewards):  # fail before loading anything heavy
        try:
            resolve_reward(r.name)
        except ValueError as e:
            raise ConfigError(f"rewards[{i}].name: {e}") from None
    check_installed(cfg.report_to)
    if cfg.quantize is not None and (problem := quantize_problem(
            cfg.quantize, read_model_config(cfg.model), cfg.model)):  # before any weight loads
        raise ConfigError(problem)
    init = None if ckpt is not None or cfg.init_adapter is None else read_init_adapter(
        cfg.init_adapter)  # a resumed run's weights come from its checkpoint
    set_memory_limits()
    cfg, memory_plan = plan_run(cfg)  # from config.json, before any weights load
    notes.append(memory_plan.summary())
    model, model_path = load_model(cfg.model)
    tokenizer = tokenizer_for(model_path)
    model.model.grad_checkpoint = cfg.gradient_checkpointing
    L = model.args.num_hidden_layers
    if cfg.algorithm != "grpo" and any(not 1 <= l < L for l in cfg.oisd.student_layers):
        raise ConfigError(f"oisd.student_layers {cfg.oisd.student_layers}: student blocks must be "
                          f"in 1..{L - 1} for this {L}-block model (block {L} is the teacher)")
    if cfg.max_prompt_length + cfg.max_completion_length > model.args.max_position_embeddings:
        raise ConfigError(
            f"max_prompt_length ({cfg.max_prompt_length}) + max_completion_length "
            f"({cfg.max_completion_length}) exceeds {cfg.model}'s max_position_embeddings "
            f"({model.args.max_position_embeddings}); lower one of them")
    if cfg.quantize is not None:
        nn.quantize(model, group_size=cfg.quantize.group_size, bits=cfg.quantize.bits)
    if cfg.lora is not None:
        mx.random.seed(cfg.seed)  # LoRA A matrices are random: same seed, same run
        lora = cfg.lora
        apply_lora(model, lora.num_layers, lora_parameters(lora.rank, lora.scale, lora.dropout, lora.keys))
    d = cfg.dataset
    examples = load_examples(d.source, d.split, d.config, d.prompt_field, d.answer_field, d.max_samples)
    eval_examples = load_eval_examples(cfg)
    fit = (cfg.max_prompt_length, cfg.truncate_prompts, PromptFormat.of(cfg))
    examples, prompts, note = render_examples(tokenizer, examples, *fit, f"{d.source} ({d.split})")
    if eval_examples:
        eval_examples, _, eval_note = render_examples(
            tokenizer, eval_examples, *fit, f"{d.eval_source or d.source} ({cfg.eval_split})")
        note = "\n".join(n for n in (note, eval_note) if n) or None
    run = Run(
        cfg=cfg, model=model, tokenizer=tokenizer,
        optimizer=make_adamw(model, lr_schedule(cfg), cfg.weight_decay),
        examples=examples, eval_examples=eval_examples, sampler=PromptSampler(len(examples), cfg.batch_size, cfg.seed),
        workers=reward_workers(cfg), spec=loss_spec(cfg), grad_fn=ObjectiveGrad(model, cfg.compile),
        out_dir=out_dir, prompts=prompts, notes=notes + ([note] if note else []),
        model_path=model_path,
    )
    if cfg.lora is None and cfg.beta > 0:  # before a checkpoint replaces the starting weights
        run.reference = frozen_copy(model)
    if init is not None:  # after the reference copy: the KL (beta > 0) is to the base model
        run.notes.append(init_from_adapter(model, init, cfg.lora, L))
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, run.optimizer)
        run.sampler.load_state_dict(state["sampler"])
        run.start_step = state["step"]
        run.nonfinite_steps = state.get("nonfinite_steps", 0)
    if world is None or world.main:
        save_config(cfg, out_dir / "config.yaml")
    return run


def reward_workers(cfg: TrainConfig) -> dict[str, MathChecker]:
    """`math` and every user reward run in a worker process that a hang cannot freeze; the
    built-in `format` reward is a regex and runs in-process."""
    return {r.name: MathChecker(timeout_s=cfg.reward_timeout,
                                score_fn=DEFAULT_SCORE_FN if r.name == "math" else r.name)
            for r in cfg.rewards if r.name != "format"}


class TrainingStopped(RuntimeError):
    """The run stopped early, its good state saved: a signal, or non-finite updates in a row.
    `exit_code` is the process's (128 + signal number, or 1)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def train(cfg: TrainConfig, resume: bool = False, show_progress: bool = True) -> Run:
    """Run (or continue) training; returns the finished Run.

    SIGINT / SIGTERM finish the step in progress, save it and raise TrainingStopped (a second
    signal quits at once); so do `max_nonfinite_steps` skipped updates in a row, keeping the
    last good checkpoint."""
    run = setup(cfg, resume)
    streak, saved = 0, run.start_step or None  # non-finite steps in a row; newest checkpoint
    writer = tracker = None
    main = run.world.main  # rank 0 writes; the other ranks only train
    watchdog = Watchdog(run.world, cfg.distributed_timeout_s)
    try:
        writer = (MetricsWriter(run.out_dir / "metrics.jsonl", cfg.max_steps, run.start_step,
                                show_progress, cfg.logging_steps) if main else NullWriter())
        completions = CompletionsLog(run.out_dir / "completions.jsonl", run.start_step) if main \
            else None
        tracker = Tracker.open(cfg.report_to if main else [], run.out_dir, to_dict(cfg),
                               run.start_step, cfg.run_name, cfg.wandb_project)
        shown = {}  # reward error message -> the step it was last printed
        with StopSignals() as signals:
            for line in banner_lines(cfg, run.model_path, model_summary(run.model),
                                     len(run.examples), len(run.eval_examples), run.start_step):
                writer.print(line)
            for note in run.notes:
                writer.print(note)
            if run.eval_examples and run.start_step == 0 and main:
                record = {"step": 0, "eval_accuracy": evaluate(run)}
                writer.write(record, advance=False)
                tracker.log(record, 0)
            for step in range(run.start_step + 1, cfg.max_steps + 1):
                watchdog.arm(step)
                record = train_step(run, step)
                streak = streak + 1 if record["nonfinite"] else 0
                if run.eval_examples and main and (step == cfg.max_steps or
                                                   (cfg.eval_every and step % cfg.eval_every == 0)):
                    record["eval_accuracy"] = evaluate(run)
                writer.write(record)
                tracker.log(record, step)
                if main:
                    completions.write(run.samples)
                tracker.log_samples(run.samples, step)
                for line in step_report(record, streak, shown):
                    writer.print(line)
                if streak >= cfg.max_nonfinite_steps:
                    raise TrainingStopped(nonfinite_message(streak, step, saved), 1)
                if step == cfg.max_steps or (cfg.save_every and step % cfg.save_every == 0
                                             and not record["nonfinite"]):
                    save(run, step)
                    saved = step
                signum = stop_signal(run.world, signals.signum)  # every rank stops together
                watchdog.disarm()
                if signum is not None and step < cfg.max_steps:
                    if saved != step:
                        save(run, step)
                    raise TrainingStopped(f"interrupted at step {step}; saved checkpoint step "
                                          f"{step}; continue with --resume", 128 + signum)
    finally:
        watchdog.close()
        if writer is not None:
            writer.close()
        if tracker is not None:
            tracker.close()
        if run.lock is not None:
            run.lock.release()
        for worker in run.workers.values():
            worker.close()
    if (repo := hub_repo(cfg)) is not None and main:  # a failed push does not fail the run
        print(publish_run(run.out_dir, repo), flush=True)
    return run


def evaluate(run: Run) -> float:
    """Held-out Avg@k of the acting policy at the training temperature."""
    cfg = run.cfg
    run.model.eval()
    mx.random.seed(cfg.seed + 7)  # the same eval samples' randomness before and after training
    acc, _ = avg_at_k(run.model, run.tokenizer, run.eval_examples, cfg.eval_k,
                      cfg.max_completion_length, cfg.temperature, cfg.top_p,
                      PromptFormat.of(cfg), run.workers.get("math"),
                      prompts_per_chunk=max(1, cfg.rollout_batch_size // cfg.eval_k),  # the cap
                      max_prompt_length=cfg.max_prompt_length, top_k=cfg.top_k, min_p=cfg.min_p)
    return acc


def stop_signal(world: World, signum: int | None) -> int | None:
    """The signal that stops the run: this rank's, or (several ranks) SIGTERM's number when any
    rank got one, so that every rank stops at the same step."""
    if world.size == 1:
        return signum
    any_rank = world.all_sum([signum is not None], "signal all-sum")[0] > 0
    return (signum or 15) if any_rank else None


def save(run: Run, step: int) -> Path | None:
    """Rank 0 writes the checkpoint, after every rank has finished the step."""
    run.world.barrier("checkpoint barrier")
    if not run.world.main:
        return None
    lora = run.cfg.lora
    params = None if lora is None else lora_parameters(lora.rank, lora.scale, lora.dropout, lora.keys)
    path = save_checkpoint(run.out_dir, step, run.model, run.optimizer,
                           {"sampler": run.sampler.state_dict(),
                            "nonfinite_steps": run.nonfinite_steps},
                           yaml.safe_dump(to_dict(run.cfg), sort_keys=False),
                           -1 if lora is None else lora.num_layers, params,
                           keep=run.cfg.save_total_limit)
    plot_metrics([run.out_dir / "metrics.jsonl"], run.out_dir / "curves.png")
    return path


def train_step(run: Run, step: int) -> dict:
    cfg, model, tok, world = run.cfg, run.model, run.tokenizer, run.world
    G = cfg.num_generations
    t0 = time.perf_counter()
    mx.reset_peak_memory()
    mx.random.seed((cfg.seed * 1_000_003 + step) * world.size + world.rank)
    scored = collect(run, first_step=step == run.start_step + 1)
    rollout, rewards = scored.rollout, scored.rewards
    t_rollout = time.perf_counter() - t0

    lengths = np.array([len(c) for c in rollout.completions])
    shaping = overlong_penalty(lengths, cfg.max_completion_length, cfg.overlong_buffer_len,
                               cfg.overlong_penalty)
    adv = group_advantages(rewards + shaping, G, cfg.advantage,
                           world.all_sum if world.size > 1 else None)
    run.samples = step_rows(step, scored.examples, scored.texts, rewards, scored.per_reward, adv,
                            rollout, cfg.log_completions)
    keep = keep_rows(rewards, G) if cfg.filter_zero_std_groups else np.ones(len(adv), bool)
    t1 = time.perf_counter()
    stats, train_tokens = {}, 0.0
    # several ranks: all train, or none; a rank without kept rows runs a zero-weight pass
    pad = not keep.any()
    if world.all_sum([keep.sum()], "rows all-sum")[0] > 0:
        batch, adv_kept = training_rows(rollout, adv, keep, scored.pad or rollout,
                                        tok.pad_token_id if tok.pad_token_id is not None else 0,
                                        cfg)
        spec = replace(run.spec, bupo_active=step <= cfg.bupo.internal_steps)
        stats = update(model, run.optimizer, run.grad_fn, batch, mx.array(adv_kept), spec, cfg,
                       run.reference, world, pad)
        train_tokens = stats.pop("trained_tokens")
    nonfinite = stats.pop("nonfinite", False)
    run.nonfinite_steps += nonfinite
    t_train = time.perf_counter() - t1
    truncated = np.asarray(rollout.truncated, float)
    if world.size > 1:  # the metrics of the global batch; timings are this rank's
        scored, shaping, lengths, truncated, (train_tokens, num_tokens) = gather_scored(
            world, scored, shaping, sorted(scored.per_reward), (train_tokens, rollout.num_tokens))
    else:
        num_tokens = rollout.num_tokens

    return {
        "step": step,
        **reward_metrics(scored, shaping, cfg),
        **reward_record(scored.stats),
        "frac_zero_std_groups": scored.drawn_zero_std / max(scored.drawn, 1),
        "completion_len_mean": float(lengths.mean()) if len(lengths) else 0.0,
        "completion_len_max": int(lengths.max()) if len(lengths) else 0,
        "truncated_frac": float(np.mean(truncated)) if len(lengths) else 0.0,
        **stats,
        "nonfinite": nonfinite,
        "nonfinite_steps": run.nonfinite_steps,
        "lr": float(run.optimizer.learning_rate.item()),
        "rollout_tokens_per_sec": num_tokens / max(t_rollout, 1e-9),
        "train_tokens_per_sec": train_tokens * cfg.num_iterations / max(t_train, 1e-9),
        "tokens_per_sec": num_tokens / max(time.perf_counter() - t0, 1e-9),
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "step_time": time.perf_counter() - t0,
    }


def training_rows(rollout, adv: np.ndarray, keep: np.ndarray, pad_rollout, pad_id: int,
                  cfg: TrainConfig) -> tuple[Batch, np.ndarray]:
    """The packed rows [n] kept by `keep` [N] and their advantages [n]. No row kept (possible on
    one of several ranks): `pad_rollout` packed with its response mask zeroed and advantages 0,
    a zero-weight pass that lets this rank take part in the update's collectives."""
    bucket = 32 if cfg.compile else 1
    if not keep.any():
        batch = pack(pad_rollout, pad_id, cfg.mask_truncated, bucket=bucket)
        batch = replace(batch, response_mask=mx.zeros_like(batch.response_mask))
        return batch, np.zeros(batch.tokens.shape[0], np.float32)
    batch = pack(rollout, pad_id, cfg.mask_truncated, bucket=bucket)
    return select_rows(batch, adv, keep) if not keep.all() else (batch, adv)


def select_rows(batch: Batch, adv: np.ndarray, keep: np.ndarray):
    return batch.select(np.flatnonzero(keep)), adv[keep]


def update(model, optimizer, grad_fn: ObjectiveGrad, batch: Batch, adv: mx.array, spec: LossSpec,
           cfg: TrainConfig, reference: nn.Module | None = None, world: World | None = None,
           pad: bool = False) -> dict:
    """Ref log-probs (beta > 0; `reference`: the frozen starting model of full fine-tuning, None
    under LoRA), then `num_iterations` optimizer updates; returns per-token metrics. The first iteration's own detached log-probs are the old ones (on-policy: ratio 1,
    no extra forward pass); later iterations reuse them.

    Micro-batches (`batching.micro_batches`): rows whose gradient is exactly zero are left out
    (`skip_zero_advantage`), the rest sorted by completion length (`sort_by_length`) and cut
    `minibatch_size` at a time, each padded to its own longest row; the normalisers are the whole
    batch's, so the gradient is unchanged, and the per-token metrics cover the computed rows
    (`skipped_tokens_frac`: the loss tokens left out). Each micro-batch's gradient is evaluated
    before the next one starts, so the peak holds one micro-batch's activations.

    Several ranks (`world`): the normalisers are the global response-token and sequence counts,
    and each update sums the ranks' gradients and loss stats once (the same collectives on every
    rank, whatever its micro-batch count); `pad`: this rank has no rows, and `batch` (its mask
    zeroed) is a zero-weight pass that only keeps the stats' keys in step."""
    world = world or World()
    adv = np.asarray(adv, np.float32)
    loss_tokens = np.asarray(batch.response_mask.sum(axis=1))
    skip = zero_gradient_rows(adv, loss_tokens, spec) if cfg.skip_zero_advantage else None
    micro, advs = zip(*micro_batches(batch, adv, cfg.minibatch_size, skip, cfg.sort_by_length,
                                     bucket=32 if cfg.compile else 1))
    old = [None] * len(micro)
    ref = [None] * len(micro)
    if cfg.beta > 0:  # the starting policy at the acting layer (BuPO: its layer-l lens)
        ref_spec = replace(spec, lambda_logit=0.0, lambda_attn=0.0)  # no internals captured
        with reference_policy(model, reference) as ref_model:
            ref = [policy_logprobs(ref_model, mb, ref_spec)[0] for mb in micro]
        mx.eval(ref)
    # the global batch's tokens and sequences (the normalisers), and the tokens computed
    covered = sum(float(mb.response_mask.sum().item()) for mb in micro)
    local = [0.0, 0.0, 0.0] if pad else [float(loss_tokens.sum()), len(adv), covered]
    counts = world.all_sum(local, "counts all-sum")
    num_tokens, num_seqs = mx.array(counts[0], mx.float32), float(counts[1])
    model.train()
    totals, entropy = {}, 0.0
    # MLX arrays are immutable: keeping the trees (containers copied) is the whole backup
    before = model.trainable_parameters(), tree_map(lambda x: x, optimizer.state)
    finite = True
    for it in range(cfg.num_iterations):
        grads, sums = None, {}  # this update's gradient and stats, this rank's rows
        for j, (mb, a, ref_logp) in enumerate(zip(micro, advs, ref)):
            (loss, stats), g = grad_fn(mb, a, old[j], ref_logp, spec, num_tokens, num_seqs)
            if it == 0:
                entropy = entropy + stats.pop("entropy_sum")
                logp = stats.pop("logp")
                old[j] = logp if cfg.num_iterations > 1 else None
            grads = g if grads is None else tree_map(mx.add, grads, g)
            stats["loss"] = loss
            sums = {k: sums.get(k, 0.0) + v for k, v in stats.items()}
            mx.eval(grads, sums, entropy, old[j])
        grads = world.sum_gradients(grads)
        if it == 0:  # the entropy rides along with the first update's stats
            sums = world.sum_stats({**sums, "entropy_sum": entropy})
            entropy = sums.pop("entropy_sum")
        else:
            sums = world.sum_stats(sums)
        totals = {k: totals.get(k, 0.0) + v for k, v in sums.items()}  # over the updates
        if cfg.max_grad_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        else:
            norm = optim.clip_grad_norm(grads, float("inf"))[1]
        totals["grad_norm"] = totals.get("grad_norm", 0.0) + norm
        optimizer.update(model, grads)
        ok = (mx.isfinite(totals["loss"]) & mx.isfinite(norm)
              & all_finite(model.trainable_parameters()))
        mx.eval(model.trainable_parameters(), optimizer.state, totals, ok)
        if not ok.item():  # skip the step: parameters and AdamW moments as they were before it
            model.update(before[0])
            optimizer.state = before[1]
            finite = False
            break
    model.eval()
    return {**summarize(totals, entropy, counts[2], it + 1),
            "skipped_tokens_frac": 1.0 - counts[2] / max(counts[0], 1.0),
            "trained_tokens": covered, "nonfinite": not finite}


def all_finite(tree) -> mx.array:
    """A scalar bool array, lazy: every element of every array in `tree` is finite."""
    flags = [mx.isfinite(v).all() for _, v in tree_flatten(tree)]
    return mx.stack(flags).all() if flags else mx.array(True)


def summarize(totals: dict, entropy, covered: float, iterations: int) -> dict:
    """Unnormalised sums of the loss stats -> per-token means (Python floats) over the `covered`
    response tokens the update computed (skipped rows have no entropy, ratio or lens stats)."""
    tok = max(covered * iterations, 1.0)
    out = {
        "loss": float(totals["loss"].item()) / iterations,
        "clip_low_frac": float(totals["clip_low"].item()) / tok,
        "clip_high_frac": float(totals["clip_high"].item()) / tok,
        "ratio_mean": float(totals["ratio_sum"].item()) / tok,
        "kl": float(totals["k3_sum"].item()) / tok,
        "entropy": float(entropy.item()) / (tok / iterations),
        "grad_norm": float(totals["grad_norm"].item()) / iterations,
    }
    for key in ("js_logit", "js_attn"):
        if f"{key}_sum" in totals:
            out[key] = float(totals[f"{key}_sum"].item()) / tok
    counts = {s: float(totals.get(f"tokens{s}", mx.array(0.0)).item()) for s in ("_pos", "_neg")}
    for key, value in totals.items():  # lens_agree_pos_sum/l2 -> lens_agree_pos/l2
        name, _, layer = key.partition("/")
        if layer and name.startswith("lens_"):
            name = name.removesuffix("_sum")
            n = counts.get(name[-4:], tok)  # rows with A > 0 / A < 0, else every token
            out[f"{name}/{layer}"] = float(value.item()) / n if n > 0 else float("nan")
    return out
