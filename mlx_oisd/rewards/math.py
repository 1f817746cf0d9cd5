"""Math correctness reward: `math_reward`, and `MathChecker`, which runs it in a killable worker.

`math_reward(completion, answer)` is 1.0 when the completion's final answer (`strip_thinking`, then
`extract_answer`) equals the reference, else 0.0. Equality is decided in two steps:
1. fast path, no sympy: equal when the two strings are equal after `normalize_answer` (spacing,
   `\\left`, `\\dfrac`, `\\text{}`, `\\$`, degrees, thousands commas, leading zeros); when both
   are then plain integers, they are compared as integers and math_verify is not asked;
2. math_verify: both sides wrapped as `\\boxed{...}` and parsed, then `verify(gold, pred)`, which
   handles `3/4` = `\\frac{3}{4}` = `0.75`, `x=5` = `5`, `\\text{(C)}` = `C`, intervals, sets,
   matrices and symbolic equality.

sympy can hang (or spin in C code a signal cannot interrupt), so training scores through
`MathChecker`: one worker process with a per-item timeout that is killed and restarted when an
item runs over, the item scoring 0.0. The worker is started with "spawn", never "fork": a forked
child would inherit the parent's MLX/Metal state.
"""

import ast
import multiprocessing as mp
import re
import signal
import sys
import threading
from collections import Counter
from collections.abc import Sequence

from .calls import RewardFailure, Scored
from .extract import extract_answer, strip_thinking

DEFAULT_SCORE_FN = "mlx_oisd.rewards.math:math_reward"
_INTEGER = re.compile(r"-?\d+")
_MATH_VERIFY_TIMEOUT_S = 5  # math_verify's own signal-based limit, per parse / verify call


def normalize_answer(answer: str) -> str:
    """A canonical string for the fast path: equal strings here are equal answers.

    Drops whitespace, `\\left`/`\\right`, thin spaces (`\\!`, `\\,`, `\\;`), `\\$`, `^\\circ`, a
    `\\text{...}` / `\\mbox{...}` wrapper around the whole answer, and one trailing period; maps
    `\\dfrac`/`\\tfrac` to `\\frac`; removes thousands commas and leading zeros from plain numbers.
    """
    s = answer.strip()
    s = re.sub(r"\\left\b|\\right\b|(?<!\\)\\[!,;: ]|\s+", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\$", "")
    s = re.sub(r"\^\{?\\circ\}?", "", s)
    wrapper = re.fullmatch(r"\\(?:text|textbf|mbox|mathrm)\{(.*)\}", s)
    if wrapper and "{" not in wrapper.group(1):
        s = wrapper.group(1)
    s = s.removesuffix(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    number = re.fullmatch(r"(-?)0*(\d+(\.\d+)?)", s)
    if number:
        s = number.group(1) + number.group(2)
    return s


def _as_gold(answer: str) -> str:
    """The reference answer as a bare string: a full solution with a `\\boxed{}` gives its box."""
    answer = str(answer).strip()
    if "\\boxed" in answer or "\\fbox" in answer:
        return extract_answer(answer) or answer
    return answer


def answers_equal(pred: str, gold: str) -> bool:
    """True when the extracted answer `pred` is mathematically equal to the reference `gold`."""
    pred_norm, gold_norm = normalize_answer(pred), normalize_answer(gold)
    if pred_norm == gold_norm:
        return True
    if _INTEGER.fullmatch(pred_norm) and _INTEGER.fullmatch(gold_norm):
        return int(pred_norm) == int(gold_norm)
    from math_verify import parse, verify  # sympy and ANTLR load on first use, not on import

    # math_verify times itself out with SIGALRM, which only the main thread may set
    limit = _MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else 0
    gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=limit)
    pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=limit)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=limit or None))


def math_reward(completion: str, answer: str) -> float:
    """1.0 when the final answer of `completion` is mathematically equal to `answer`, else 0.0.

    The final answer is `extract_answer(strip_thinking(completion))`; no answer scores 0.0.
    Runs in-process: use `MathChecker` where a hang must not stop the caller.
    """
    pred = extract_answer(strip_thinking(completion))
    if pred is None:
        return 0.0
    return 1.0 if answers_equal(pred, _as_gold(answer)) else 0.0


def _serve(conn, score_fn: str) -> None:
    """Worker loop: resolve `score_fn`, say "ready" (and whether it is batched), then score each
    batch `(prompts, [(completion, answer), ...])` it receives.

    A per-item function gets one `(score, RewardFailure | None)` sent per item, in order, so the
    parent can time each item; a batched one gets the whole batch and sends one list back. It
    exits when the parent closes the pipe.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # imported here, in the child: the package's __init__ imports this module
    from mlx_oisd.rewards import call_batched, call_reward, is_batched, resolve_reward

    try:
        fn = resolve_reward(score_fn)
    except ValueError as e:
        conn.send(("failed", str(e)))
        return
    batched = is_batched(fn)
    conn.send(("ready", batched))
    while True:
        try:
            prompts, batch = conn.recv()
        except EOFError:
            return
        if batched:
            conn.send(call_batched(fn, prompts, [c for c, _ in batch], [a for _, a in batch]))
            continue
        for completion, answer in batch:
            conn.send(call_reward(fn, completion, answer))


_UNGUARDED_HINT = (
    "starts training when it is imported: the reward worker process (started with 'spawn') "
    "imports the main script again, which runs it again; put the call under "
    'if __name__ == "__main__":')


def unguarded_main_script() -> str | None:
    """The path of the running main script when it has no top-level `if __name__ ==
    "__main__":` block (a spawned worker re-runs such a script's code), else None."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    try:
        tree = ast.parse(open(path, encoding="utf-8").read()) if path else None
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    if tree is None:
        return None
    guards = {'__name__ == "__main__"', '"__main__" == __name__'}
    guarded = any(isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') in guards
                  for node in tree.body)
    return None if guarded else path


def exit_if_reimported() -> None:
    """In a spawned worker that is re-importing an unguarded main script (which started a run at
    import), exit now with the fix, instead of loading a model and failing inside
    multiprocessing; the parent's MathChecker then names the script."""
    if getattr(mp.current_process(), "_inheriting", False):
        raise SystemExit(f"mlx-oisd: the main script {_UNGUARDED_HINT}")


class MathChecker:
    """Scores (completion, answer) pairs in ONE worker process, each item under `timeout_s`.

    An item that runs over scores 0.0 and adds to `timeouts`; the worker is killed and restarted
    (its start-up, a few seconds of imports, is not charged to any item). An item whose function
    raises scores 0.0 and adds to `errors`; a worker that dies mid-item counts as an error of type
    "WorkerDied". `score_fn` is "module:function" (default `math_reward`), per item or batched
    (TRL's signature, `rewards/calls.py`); a batched one gets the whole batch in one call, under
    `timeout_s * len(batch)`, and a timeout scores every item of it 0.0.

        with MathChecker(timeout_s=5.0) as checker:
            scores, stats = checker.score([(completion, answer), ...])
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        score_fn: str = DEFAULT_SCORE_FN,
        start_timeout_s: float = 120.0,
        context: str = "spawn",
    ):
        if context not in ("spawn", "forkserver"):
            raise ValueError(
                f"MathChecker context {context!r}: expected 'spawn' or 'forkserver' "
                "(a forked worker would inherit MLX/Metal state)"
            )
        if timeout_s <= 0:
            raise ValueError(f"MathChecker timeout_s={timeout_s}: expected a positive number")
        self.timeout_s = timeout_s
        self.score_fn = score_fn
        self.start_timeout_s = start_timeout_s
        self.timeouts = 0
        self.errors = 0
        self.restarts = 0
        self._ctx = mp.get_context(context)
        self._proc = None
        self._conn = None
        self._closed = False
        self.batched = False  # set from the worker's "ready": score_fn has TRL's signature
        exit_if_reimported()
        self._start()

    def _start(self) -> None:
        conn, child_conn = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_serve, args=(child_conn, self.score_fn), name="mlx-oisd-math", daemon=True
        )
        proc.start()
        child_conn.close()
        self._proc, self._conn = proc, conn
        if not conn.poll(self.start_timeout_s):
            self._stop()
            raise RuntimeError(f"math checker worker did not start in {self.start_timeout_s} s")
        try:
            status, message = conn.recv()
        except EOFError:
            self._stop()
            script = unguarded_main_script()
            why = f": {script} {_UNGUARDED_HINT}" if script else ""
            raise RuntimeError(
                f"math checker worker for {self.score_fn!r} exited while starting "
                f"(exit code {proc.exitcode}){why}"
            ) from None
        if status != "ready":
            self._stop()
            raise ValueError(f"MathChecker score_fn: {message}")
        self.batched = bool(message)

    def _stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            self._proc.kill()
            self._proc.join()
        self._proc = self._conn = None

    def _next_result(self, timeout_s: float):
        """The worker's next message, or "timeout" / "died"."""
        if not self._conn.poll(timeout_s):
            return "timeout"
        try:
            return self._conn.recv()
        except EOFError:
            return "died"

    def _died(self) -> RewardFailure:
        self._proc.join(1.0)  # the exit code is known once the process is reaped
        code = self._proc.exitcode
        return RewardFailure("WorkerDied", f"WorkerDied: the reward worker for {self.score_fn!r} "
                             f"exited while scoring (exit code {code})")

    def score(self, pairs: Sequence[tuple[str, str]],
              prompts: Sequence[str] | None = None) -> tuple[list[float], dict]:
        """Scores of `pairs` in order, and stats {"timeouts", "errors", "error_types": {type: n},
        "first_error": RewardFailure | None}. `prompts` (one per pair) go to a batched score_fn."""
        if self._closed:
            raise RuntimeError("MathChecker is closed")
        pairs = [(str(c), str(a)) for c, a in pairs]
        if self.batched and prompts is None:
            raise ValueError(f"reward {self.score_fn!r} is batched (TRL signature): "
                             "score needs the prompts")
        prompts = None if prompts is None else [str(p) for p in prompts]
        finished = False
        try:
            if self.batched:
                results, timeouts = self._score_batched(pairs, prompts)
            else:
                results, timeouts = self._score_items(pairs)
            finished = True
        finally:
            if not finished:  # interrupted mid-batch: the worker still holds the rest of it
                self._stop()
        failures = [f for _, f in results if f is not None]
        error_types = Counter(f.kind for f in failures)
        self.timeouts += timeouts
        self.errors += len(failures)
        return [s for s, _ in results], {
            "timeouts": timeouts, "errors": len(failures), "error_types": dict(error_types),
            "first_error": failures[0] if failures else None}

    def _score_items(self, pairs: list) -> tuple[list[Scored], int]:
        """Per-item scoring, each item timed: (results, timeouts)."""
        results: list[Scored] = [(0.0, None)] * len(pairs)
        timeouts = i = 0
        while i < len(pairs):
            if self._proc is None:  # killed after a timeout: restart only when needed
                self.restarts += 1
                self._start()
            self._conn.send((None, pairs[i:]))
            while i < len(pairs):
                result = self._next_result(self.timeout_s)
                i += 1
                if result == "timeout":
                    timeouts += 1
                elif result == "died":
                    results[i - 1] = (0.0, self._died())
                else:
                    results[i - 1] = result
                    continue
                self._stop()  # item i-1 scores 0.0; the rest is sent to a new worker
                break
        return results, timeouts

    def _score_batched(self, pairs: list, prompts: list) -> tuple[list[Scored], int]:
        """One call for the whole batch, under timeout_s per item: (results, timeouts)."""
        if not pairs:
            return [], 0
        if self._proc is None:
            self.restarts += 1
            self._start()
        self._conn.send((prompts, pairs))
        result = self._next_result(self.timeout_s * len(pairs))
        if result == "timeout":
            self._stop()
            return [(0.0, None)] * len(pairs), len(pairs)
        if result == "died":
            died = self._died()
            self._stop()
            return [(0.0, died)] * len(pairs), 0
        return result, 0

    def close(self) -> None:
        """Stop the worker; `score` raises afterwards."""
        self._closed = True
        self._stop()

    def __enter__(self) -> "MathChecker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["MathChecker", "answers_equal", "math_reward", "normalize_answer"]
