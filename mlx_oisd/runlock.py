"""One writer per run folder: an exclusive `flock` on `output_dir/.lock` for a run's lifetime.

Two trainers on one `output_dir` would log every step twice and mix configs and checkpoints, so
the second one is refused, naming the holder's PID. The kernel drops a `flock` when its holder
dies (kill -9 included), so a lock left by a dead run is simply taken over; the PID written in
the file only informs the message.
"""

import fcntl
import os
from pathlib import Path

LOCK_NAME = ".lock"


class RunLockedError(ValueError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """An acquired lock; `release()` (or leaving the `with` block) frees it."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")  # a+: never truncate a holder's PID before we hold it
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise RunLockedError(f"{self.path.parent} is in use by another training run (PID "
                                 f"{holder}, lock file {self.path}); wait for it to finish, stop "
                                 "it, or choose another output_dir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
