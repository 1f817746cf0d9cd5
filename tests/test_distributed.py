"""Data-parallel training (`mlx_oisd/distributed.py`): 2 local ranks on the ring backend over
loopback against one process.

The 2-rank cases run this file as a script (`python tests/test_distributed.py MODE ...`) under
`mlx.launch -n 2 --backend ring`, or, for the failure cases, as two processes given the launcher's
environment (MLX_RANK, MLX_HOSTFILE) directly: `mlx.launch` itself terminates the other ranks when
one exits with an error, which would hide what the watchdog does on a machine that lost its peer.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
G = 2
# 3 prompts x G: rank 0 gets 2 prompts (2 micro-batches of 2 rows), rank 1 one (1 micro-batch)
PROMPTS = [[5, 6, 7], [8, 9], [20, 21, 22, 23]]
COMPLETIONS = [[10, 11, 2], [12], [13, 14, 15, 16], [17, 2], [30, 31], [32, 33, 34, 2]]
TRUNCATED = [False, True, True, False, False, False]
REWARDS = [1.0, 0.0, 0.5, 0.2, 0.0, 1.0]
FILTERED = [1.0, 0.0, 0.5, 0.2, 1.0, 1.0]  # prompt 3 (rank 1's only one): zero-std, filtered out
CASES = [(mode, REWARDS) for mode in AGG_MODES] + [("filtered", FILTERED), ("iterations", REWARDS)]


def _ring_available() -> bool:
    import mlx.core as mx

    return mx.distributed.is_available()


pytestmark = pytest.mark.skipif(not _ring_available(), reason="mx.distributed is unavailable")


def _free_port() -> int:
    """A base port with the next one free too (the ring listens on base + rank)."""
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(HERE.parent), "MLX_OISD_CACHE": str(tmp_path / "cache")}


def _launch(args: list[str], tmp_path: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """`mlx.launch -n 2 --backend ring` on loopback."""
    launcher = Path(sys.executable).with_name("mlx.launch")  # mlx's console script
    if not launcher.is_file():
        pytest.skip(f"mlx.launch not found next to {sys.executable}")
    cmd = [str(launcher), "-n", "2", "--backend", "ring",
           "--starting-port", str(_free_port()), "--", *args]
    return subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path)


# ---------------------------------------------------------------- one process (no launcher)

def test_single_process_world_is_the_identity():
    from mlx_oisd.distributed import World, init_world

    world = init_world()
    assert (world.rank, world.size, world.main) == (0, 1, True)
    x = np.arange(6.0).reshape(3, 2)
    assert np.array_equal(world.all_sum(x), x) and np.array_equal(world.gather(x), x)
    assert np.array_equal(world.share(np.arange(5)), np.arange(5))
    shares = [World(None, r, 3).share(np.arange(8)) for r in range(3)]
    assert np.array_equal(np.concatenate(shares), np.arange(8))  # contiguous, in rank order
    assert [len(s) for s in shares] == [3, 3, 2]


def test_reinforce_pp_whitens_over_every_rank():
    """Two halves whitened with a sum across them equal the whole batch whitened at once."""
    from mlx_oisd.advantages import group_advantages

    rewards = np.random.default_rng(0).random(12)
    whole = group_advantages(rewards, 3, "reinforce_pp")
    halves = [rewards[:6], rewards[6:]]

    def sums(x):
        return np.array([len(x), x.sum(), (x * x).sum()])

    def centred(r):
        g = r.reshape(-1, 3)
        return (g - g.mean(axis=1, keepdims=True)).reshape(-1)

    parts = [group_advantages(h, 3, "reinforce_pp",
                              all_sum=lambda v, o=centred(halves[1 - i]): v + sums(o))
             for i, h in enumerate(halves)]
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-6)
    assert not np.allclose(group_advantages(halves[0], 3, "reinforce_pp"), whole[:6])


def test_dynamic_sampling_keeps_the_global_first_groups(monkeypatch):
    """Each rank keeps the groups one process would keep from the same round, and the rounds
    stop together: a fake 2-rank sum adds the other rank's group counts."""
    from types import SimpleNamespace

    from test_collect import _scored

    import mlx_oisd.collect as collect_module
    from mlx_oisd.collect import collect

    shares = [_scored("a", [1, 0, 1, 1, 0, 1]), _scored("b", [0, 1, 0, 1, 1, 1])]  # 2 + 2 found
    whole = _scored("w", [1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1])
    cfg = SimpleNamespace(dynamic_sampling=True, max_sampling_rounds=3, batch_size=3,
                          num_generations=2)

    def kept(scored, world):
        monkeypatch.setattr(collect_module, "draw", lambda run, first_step: scored)
        return collect(SimpleNamespace(cfg=cfg, world=world), first_step=True)

    class FakeWorld:  # rank `rank` of 2; the other rank found `other` groups
        def __init__(self, rank, other):
            self.rank, self.size, self.other = rank, 2, other

        def all_sum(self, x, phase=""):
            counts = np.zeros(2)
            counts[1 - self.rank] = self.other
            return np.asarray(x) + counts

    one = kept(whole, None)
    parts = [kept(shares[r], FakeWorld(r, 2)) for r in range(2)]
    assert [len(p.examples) for p in parts] == [2, 1]
    assert np.array_equal(np.concatenate([p.rewards for p in parts]), one.rewards)
    assert [e for p in parts for e in p.examples] == ["a0", "a2", "b0"]
    assert parts[1].pad is not None and parts[1].rounds == one.rounds == 1


def test_watchdog_fires_with_the_step_and_the_peer():
    from mlx_oisd.distributed import Watchdog, World

    codes = []
    world = World(None, 1, 2)
    dog = Watchdog(world, 0.3, exit=codes.append, poll_s=0.05)
    dog.arm(7)
    world.phase, world.waiting = "gradient all-reduce", True
    time.sleep(0.6)
    dog.close()
    assert codes == [3]
    assert "rank 1: step 7" in dog.fired and "gradient all-reduce" in dog.fired
    assert "waited for rank 0" in dog.fired and "distributed_timeout_s = 0.3" in dog.fired
    dog = Watchdog(world, 0.2, exit=codes.append, poll_s=0.05)
    dog.arm(8)
    dog.disarm()  # a step that finished in time
    time.sleep(0.4)
    assert codes == [3] and dog.fired is None
    dog.arm(9)  # this rank's own work (not a collective) ran late
    world.waiting = False
    time.sleep(0.4)
    dog.close()
    assert codes == [3, 3] and "step 9" in dog.fired and "this rank itself" in dog.fired


# ---------------------------------------------------------------- 2 ranks

def _worker_update(model_dir: str, out: str) -> None:
    """Two optimizer updates on this rank's share of fixed rollouts, per loss_agg (OISD on, KL
    to the adapter-free reference, reinforce_pp whitening), and with zero-std groups filtered
    (rank 1 is left without rows: its zero-weight pass); rank 0 saves the LoRA weights.

    SGD with momentum, not AdamW: Adam's first steps move a weight by about lr x sign(g), so a
    gradient within float noise of 0 flips a weight by up to 2 lr (a rank pads its rows to its
    own longest prompt and completion, so its matmuls add in another order); SGD carries the
    gradients' own agreement (~1e-7) into the weights. (AdamW at lr 1e-2: one weight of 256
    off by 5e-5.)"""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from mlx_oisd import load
    from mlx_oisd.advantages import group_advantages, keep_rows
    from mlx_oisd.config import validate
    from mlx_oisd.distributed import init_world
    from mlx_oisd.lora import apply_lora, lora_parameters
    from mlx_oisd.objective import ObjectiveGrad
    from mlx_oisd.rollout import Rollout
    from mlx_oisd.trainer import loss_spec, training_rows, update

    world = init_world()
    prompts = world.share(np.arange(len(PROMPTS)))
    rows = [p * G + j for p in prompts for j in range(G)]
    rollout = Rollout([PROMPTS[p] for p in prompts], [COMPLETIONS[i] for i in rows],
                      [TRUNCATED[i] for i in rows], G)
    saved = {}
    for case, rewards in CASES:
        rewards = np.array(rewards)[rows]
        adv = group_advantages(rewards, G, "reinforce_pp", world.all_sum if world.size > 1 else None)
        keep = keep_rows(rewards, G)
        mode = {"filtered": "seq_mean_token_mean", "iterations": "token_mean"}.get(case, case)
        cfg = validate({"model": "x", "dataset": {"source": "x.jsonl"}, "loss_agg": mode,
                        "compile": False,
                        "lora": {"rank": 4, "scale": 10.0, "dropout": 0.0, "num_layers": -1},
                        "minibatch_size": 2, "max_completion_length": 4, "beta": 0.1,
                        "num_iterations": 2 if case == "iterations" else 1,
                        "max_grad_norm": 1.0, "advantage": "reinforce_pp", "algorithm": "oisd",
                        "oisd": {"student_layers": [2], "lambda_logit": 1.0, "lambda_attn": 0.5}})
        model, _ = load(model_dir)
        mx.random.seed(0)
        apply_lora(model, -1, lora_parameters(4, 10.0, 0.0, None))
        optimizer = optim.SGD(learning_rate=0.5, momentum=0.9)
        grad_fn = ObjectiveGrad(model, compile=False)
        batch, adv = training_rows(rollout, adv, keep, rollout, 0, cfg)
        for _ in range(2):
            stats = update(model, optimizer, grad_fn, batch, mx.array(adv), loss_spec(cfg), cfg,
                           None, world, pad=not keep.any())
        saved.update({f"{case}/{k}": np.array(v)
                      for k, v in tree_flatten(model.trainable_parameters())})
        saved.update({f"{case}/{k}": np.array(stats[k]) for k in ("loss", "kl", "js_logit")})
    if world.main:
        np.savez(out, **saved)


def _worker_stall(out_dir: str) -> None:
    """Steps of one collective each under a 2 s watchdog; rank 1 announces step 3 and waits to be
    killed or stopped there."""
    from mlx_oisd.distributed import PeerLost, Watchdog, init_world

    world = init_world()
    dog = Watchdog(world, 2.0, poll_s=0.1)
    try:
        for step in range(1, 1000):
            dog.arm(step)
            if world.rank == 1 and step == 3:
                (Path(out_dir) / "at_step_3").write_text("")
                time.sleep(60)
            world.all_sum(np.ones(4), "gradient all-reduce")
            dog.disarm()
            time.sleep(0.05)
    except PeerLost as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(3)


def test_two_ranks_update_equals_one_process(make_tiny, tmp_path):
    """Fed the same rollouts (3 prompts split 2 + 1, so the ranks run different micro-batch
    counts), 2 ranks give the single process's adapters after 2 SGD steps: all loss_agg modes,
    and a filtered batch that leaves rank 1 without rows."""
    folder = str(make_tiny(init_std=0.1, tie_word_embeddings=False))
    one = subprocess.Popen([sys.executable, str(HERE), "update", folder, str(tmp_path / "one.npz")],
                           env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    two = _launch([sys.executable, str(HERE), "update", folder, str(tmp_path / "two.npz")],
                  tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    assert one.wait(timeout=240) == 0, one.stdout.read()
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert sorted(a.files) == sorted(b.files)
    assert {k.split("/")[0] for k in a.files} == {case for case, _ in CASES}
    for k in a.files:
        np.testing.assert_allclose(b[k], a[k], atol=1e-5, rtol=0, err_msg=k)
    moved = [np.abs(a[k]).max() for k in a.files if k.endswith("lora_b")]  # B starts at 0
    assert moved and max(moved) > 1e-4


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_a_dead_or_stalled_rank_stops_the_other(tmp_path, how):
    """Rank 1 killed (its socket closes) or stopped (its socket stays open: the ring would wait
    forever) in step 3: rank 0 exits within the 2 s timeout, naming rank 1 and the step."""
    port = _free_port()
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    procs = [subprocess.Popen([sys.executable, str(HERE), "stall", str(tmp_path)],
                              env={**_env(tmp_path), "MLX_RANK": str(r),
                                   "MLX_HOSTFILE": str(hosts)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "at_step_3").exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stderr.read()
            time.sleep(0.05)
        procs[1].send_signal(how)
        killed = time.monotonic()
        code = procs[0].wait(timeout=20)
        took = time.monotonic() - killed
        err = procs[0].stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert code == 3, err
    assert took < 2.0 + 1.5, took
    assert "rank 0" in err and "rank 1" in err and "step 3" in err, err


def _train_config(tmp_path: Path, **over) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"q": f"What is {a} + {b}?", "a": a + b}) + "\n"
                            for a in range(10, 16) for b in range(20, 23)))
    cfg = {"model": "builtin:tiny", "output_dir": str(tmp_path / "run"),
           "dataset": {"source": str(data), "prompt_field": "q", "answer_field": "a"},
           "algorithm": "oisd", "max_steps": 2, "batch_size": 3, "num_generations": 2,
           "max_completion_length": 6, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
           "lora": {"rank": 4, "scale": 10.0, "dropout": 0.0, "num_layers": -1},
           "oisd": {"student_layers": [1], "lambda_logit": 1.0, "lambda_attn": 0.1},
           "rewards": [{"name": "test_trainer:parity_reward"}], "save_every": 1,
           "advantage": "reinforce_pp", "distributed_timeout_s": 120, **over}
    path = tmp_path / "cfg.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_two_rank_train_writes_once_and_resumes_on_one(tmp_path):
    """`oisd-mlx train` on 2 ranks: metrics.jsonl holds each step once, the checkpoints are
    written once; `--resume` on 1 rank continues from the 2-rank checkpoint."""
    cli = str(Path(sys.executable).with_name("oisd-mlx"))
    cfg = _train_config(tmp_path)
    two = _launch([cli, "train", str(cfg), "--quiet"], tmp_path, timeout=400)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    run = tmp_path / "run"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000001", "step_000002"]
    one = subprocess.run([cli, "train", str(cfg), "--quiet", "--resume", "--set", "max_steps=3"],
                         env=_env(tmp_path), capture_output=True, text=True, timeout=400)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"update": _worker_update, "stall": _worker_stall}[mode](*rest)
