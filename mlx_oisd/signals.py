"""Stopping a run cleanly on SIGINT (Ctrl-C) and SIGTERM.

The trainer checks `StopSignals.signum` after each step: a signal lets the step in progress
finish, then the run saves and stops. Killing mid-step would lose the step and, during a
checkpoint write, leave a temp folder behind; waiting costs at most one step. A second signal
means "now": the previous handlers come back and KeyboardInterrupt is raised at once.
"""

import signal
import sys
import threading


class StopSignals:
    """While active, SIGINT and SIGTERM only set `signum` (the loop stops after the step in
    progress); a second one restores the previous handlers and raises KeyboardInterrupt at once.
    Handlers can only be installed in the main thread; elsewhere this does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle)
                              for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum
        print(f"{signal.Signals(signum).name}: stopping after the step in progress, saving a "
              "checkpoint (send it again to quit now)", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
