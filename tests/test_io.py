"""io.py: atomic writes."""

import os
import stat

import pytest

from mlx_oisd.io import atomic_write, write_json, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = write_text(tmp_path / "a.txt", "old")

    def half(p):
        p.write_text("ne")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, half)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_written_files_get_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "sub" / "c.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert path.read_text() == '{\n  "x": 1\n}\n'


def test_a_full_disk_is_one_error_naming_the_file(tmp_path):
    import errno

    from mlx_oisd.io import DiskFullError, append_text

    path = write_text(tmp_path / "a.txt", "old")

    def full(p):
        p.write_text("ne")
        raise OSError(errno.ENOSPC, "No space left on device")

    def mlx_full(p):  # what mx.save_safetensors raises on a full disk
        raise RuntimeError("[write] Unable to write 3647 bytes to file.")

    for write, cause in ((full, "No space left on device"), (mlx_full, "Unable to write 3647 bytes")):
        with pytest.raises(DiskFullError) as e:
            atomic_write(path, write)
        assert e.value.errno == errno.ENOSPC and e.value.path == path
        assert str(e.value).startswith(f"disk full: could not write {path} (") and cause in str(e.value)
        assert " MiB free on its disk. Free some space and rerun" in str(e.value)
        assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    if os.path.exists("/dev/full"):  # a real ENOSPC from the kernel
        with pytest.raises(DiskFullError, match="could not write /dev/full"):
            append_text("/dev/full", "x" * 10_000)
