"""Atomic writes: every file a run leaves behind goes through here (temp file, fsync, rename).

A full disk surfaces as one `DiskFullError` naming the file and the free space, whichever layer
noticed it: Python's `OSError(ENOSPC)`, or MLX's `RuntimeError("[write] Unable to write N bytes
to file.")` from `mx.save_safetensors`. The temp file is removed and the old file kept.
"""

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A write that ran out of disk space; the message names the file and the space left."""

    def __init__(self, path: str | Path, cause: Exception | str, note: str | None = None):
        self.path, self.cause = Path(path), cause
        super().__init__(errno.ENOSPC, f"disk full: could not write {self.path} ({cause}); "
                         f"{_free_space(self.path)} free on its disk{'; ' + note if note else ''}. "
                         "Free some space and rerun (with --resume for a training run)")

    def __str__(self) -> str:
        return self.strerror


def _free_space(path: Path) -> str:
    for folder in (path, *path.parents):
        if folder.is_dir():
            return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB"
    return "unknown space"


def is_disk_full(e: BaseException) -> bool:
    """True for ENOSPC / EDQUOT and for MLX's failed-write RuntimeError."""
    if isinstance(e, OSError):
        return e.errno in _NO_SPACE
    return isinstance(e, RuntimeError) and "Unable to write" in str(e)


@contextmanager
def disk_full_names(path: str | Path):
    """Re-raise a disk-full error inside the block as a `DiskFullError` naming `path`."""
    try:
        yield
    except DiskFullError:
        raise
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        raise DiskFullError(path, e) from None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` and move the result onto `path` in one `os.replace`.

    A reader (or a resumed run) sees either the old file or the complete new one, never a half.
    """
    path = Path(path)
    with disk_full_names(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
        os.close(fd)
        tmp = Path(tmp)
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual mode
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def temp_files(folder: Path, names) -> list[Path]:
    """The temp files `atomic_write` leaves in `folder` when killed mid-write, for each of `names`."""
    return [p for name in names for p in folder.glob(f".{name}.*") if p.is_file()]


def append_text(path: str | Path, text: str) -> None:
    """Append `text` and fsync (a log line: a torn last line is the most a kill can leave)."""
    with disk_full_names(path), open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(path: str | Path, error: type[Exception] = ValueError):
    """Yield (where, row) for each non-blank line of a jsonl file, `where` naming the file and
    line ("line 3 of data.jsonl") for the caller's own errors; invalid JSON raises `error`."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"line {lineno} of {path}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None


def read_log(path: str | Path) -> list[dict]:
    """The records of a jsonl log this project appends to (metrics.jsonl, completions.jsonl);
    a torn line (a write killed midway) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
