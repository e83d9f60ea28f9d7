"""atomic_write: the one way a single file is written (concepts, training state, library copies, demo assets)."""

import os
import stat

import pytest

from studio.engine.files import atomic_write
from studio.engine.names import FILE_MODE


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_bytes_replace_the_file_readable_by_others_and_leave_no_temp_file(tmp_path):
    """Guards the 0600 files mkstemp alone makes: a shared library's other accounts could not read them."""
    path = tmp_path / "sub" / "a.safetensors"  # a missing folder is made
    assert atomic_write(path, b"one") == path
    atomic_write(path, b"two")
    assert path.read_bytes() == b"two" and _mode(path) == FILE_MODE
    assert [p.name for p in path.parent.iterdir()] == ["a.safetensors"]


def test_a_writer_gets_a_hidden_temp_path_beside_the_file(tmp_path):
    """The temp name `.<name>.<random>.tmp` is what the library sweeps up after a killed write."""
    seen = []

    def write(tmp):
        seen.append(tmp)
        tmp.write_text("from a writer")

    atomic_write(tmp_path / "b.json", write)
    assert (tmp_path / "b.json").read_text() == "from a writer" and _mode(tmp_path / "b.json") == FILE_MODE
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".b.json.") and seen[0].name.endswith(".tmp")
    assert not seen[0].exists()


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp_file(tmp_path):
    path = tmp_path / "c.bin"
    path.write_bytes(b"old")

    def half_then_fail(tmp):
        tmp.write_bytes(b"ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["c.bin"]
