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
    """Worker loop: resolve `score_fn`, say "ready", then score each batch it receives.

    For a batch (list of (completion, answer)) it sends one (score, error_type | None) per item,
    in order, so the parent can time each item. It exits when the parent closes the pipe.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # imported here, in the child: the package's __init__ imports this module
    from mlx_oisd.rewards import call_reward, resolve_reward

    try:
        fn = resolve_reward(score_fn)
    except ValueError as e:
        conn.send(("failed", str(e)))
        return
    conn.send(("ready", None))
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            return
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
    "WorkerDied". `score_fn` ("module:function", default `math_reward`) is a test hook.

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

    def _stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            self._proc.kill()
            self._proc.join()
        self._proc = self._conn = None

    def _next_result(self) -> tuple[float, str | None] | str:
        """The worker's next (score, error_type), or "timeout" / "died"."""
        if not self._conn.poll(self.timeout_s):
            return "timeout"
        try:
            return self._conn.recv()
        except EOFError:
            return "died"

    def score(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[float], dict]:
        """Scores of `pairs` in order, and stats {"timeouts", "errors", "error_types": {type: n}}."""
        if self._closed:
            raise RuntimeError("MathChecker is closed")
        pairs = [(str(c), str(a)) for c, a in pairs]
        scores = [0.0] * len(pairs)
        error_types = Counter()
        timeouts = 0
        finished = False
        i = 0
        try:
            while i < len(pairs):
                if self._proc is None:  # killed after a timeout: restart only when needed
                    self.restarts += 1
                    self._start()
                self._conn.send(pairs[i:])
                while i < len(pairs):
                    result = self._next_result()
                    i += 1
                    if result == "timeout":
                        timeouts += 1
                    elif result == "died":
                        error_types["WorkerDied"] += 1
                    else:
                        scores[i - 1], error = result
                        if error is not None:
                            error_types[error] += 1
                        continue
                    self._stop()  # item i-1 scores 0.0; the rest is sent to a new worker
                    break
            finished = True
        finally:
            if not finished:  # interrupted mid-batch: the worker still holds the rest of it
                self._stop()
        errors = sum(error_types.values())
        self.timeouts += timeouts
        self.errors += errors
        return scores, {"timeouts": timeouts, "errors": errors, "error_types": dict(error_types)}

    def close(self) -> None:
        """Stop the worker; `score` raises afterwards."""
        self._closed = True
        self._stop()

    def __enter__(self) -> "MathChecker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["MathChecker", "answers_equal", "math_reward", "normalize_answer"]
