"""Writing one file atomically: readers (and a crash) see the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from studio.engine.names import FILE_MODE


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[Path], object]) -> Path:
    """Write `data` to `path` through a temp file in the same folder, then `os.replace`; return `path`.

    `data` is the file's bytes, or a function that writes the file at the path it is given (for writers that take a
    path, such as safetensors' `save_file`, `shutil.copyfile` or PIL's `Image.save`). The temp file is named
    `.<name>.<random>.tmp` (what `studio.library` sweeps up after a killed write), is flushed to disk before the
    rename and gets `FILE_MODE` (mkstemp alone makes 0600); it is removed when anything fails. Missing folders are made.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
            with open(tmp, "rb+") as handle:  # the writer's own handle is closed: flush its pages from here
                os.fsync(handle.fileno())
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
