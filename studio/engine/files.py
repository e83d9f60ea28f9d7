"""Writing outputs without destroying anything: each file atomically (readers, and a crash, see the old file or the
new one, never half of one), a model folder swapped in whole, and every output checked before any work is done, so
that nothing the user did not ask to replace is replaced (`--overwrite`)."""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from studio.engine.names import FILE_MODE
from studio.errors import UserError


class OutputError(UserError):
    """An output that cannot be written without destroying something; the message names it and says what to do."""


def check_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """`path` if a folder can be made (or used) there; OutputError when it, or a folder above it, is a plain file
    (writing would fail only after the work, with a FileExistsError)."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise OutputError(f"{folder} is a file, not a folder: give {option} a path in a folder")
            break
    return path


def check_new_output(path: str | os.PathLike, *, overwrite: bool, folder: bool = False, marker: str | None = None,
                     option: str = "--out") -> Path:
    """`path` if writing a file there (`folder`: a folder) destroys nothing the user did not ask to replace, else
    OutputError naming what is there and what to do. Meant to run before any work, so a refusal costs nothing.

    - A plain file where a folder goes (`path` itself for a folder, or any folder above it) is refused, and so is a
      folder where a file goes: `overwrite` replaces like with like only.
    - Anything existing is refused unless `overwrite`.
    - With `overwrite`, a folder is replaced only when it is empty or holds `marker`, the file the studio writes into
      every folder it makes (a DreamBooth model's `studio_training.json`): never a folder of someone else's files.
    """
    path = Path(path)
    check_folder(path.parent, option)
    if not (path.exists() or path.is_symlink()):
        return path
    if folder and not path.is_dir():
        raise OutputError(f"{path} is a file, and a folder is written there: move it away or give {option} another "
                          "path")
    if not folder and path.is_dir():
        raise OutputError(f"{path} is a folder, and a file is written there: give {option} a file name")
    if not overwrite:
        what = "folder" if folder else "file"
        raise OutputError(f"{path} already exists ({what}): pass --overwrite to replace it, or give {option} "
                          "another path")
    if folder and any(path.iterdir()) and (marker is None or not (path / marker).is_file()):
        raise OutputError(f"{path} is a folder the studio did not write (no {marker}); --overwrite replaces only "
                          f"the studio's own: move it away or give {option} another path")
    return path


def write_new_files(path: str | os.PathLike, write: Callable[[Path], Path], *, overwrite: bool,
                    option: str = "--out") -> Path:
    """Run `write(p)`, a writer that may choose names of its own (a suffix added, a second file of a pair beside
    `p`), in a hidden staging folder beside `path`; then check every file it made against `path`'s folder
    (`check_new_output`) and move them in, each atomically. A refusal leaves the folder as it was. Returns where the
    path `write` returned now is."""
    path = Path(path)
    check_folder(path.parent, option).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        written = write(staging / path.name)
        made = sorted(staging.iterdir())
        for file in made:
            check_new_output(path.parent / file.name, overwrite=overwrite, option=option)
        for file in made:
            os.replace(file, path.parent / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path.parent / Path(written).name


# renameat2(2)'s flag that swaps two paths in one step (Linux 3.15+; glibc 2.28+ has the call).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` atomically where the system can (Linux, on file systems with RENAME_EXCHANGE); False when it
    cannot, having changed nothing."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def replace_folder(new: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Put the finished folder `new` at `path` (both in one folder) and delete what was there.

    On Linux the two are swapped in one step, so a reader (or a crash) finds the old folder or the new one, never
    none; elsewhere the old one is first moved aside into a hidden `.<name>.<random>.tmp` folder (a crash between
    the two renames leaves it there, never half a model at `path`). Callers check first (`check_new_output`) that
    the old folder is one they may replace."""
    new, path = Path(new), Path(path)
    if not path.exists():
        new.rename(path)
        return path
    if _exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # the old folder, now under the temp name
        return path
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    path.rename(old / path.name)
    new.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


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


def remove_temp_leftovers(folder: Path, older_than_s: float = 0.0) -> list[Path]:
    """Delete the hidden `.<name>.<random>.tmp` files and folders under `folder` that a killed write left (an atomic
    write's temp file, a DreamBooth model written beside its place) and that are older than `older_than_s`; what was
    removed. 0 at start, when no write of this studio runs; later an hour, so a running write keeps its own."""
    if not Path(folder).is_dir():
        return []
    now, removed = time.time(), []
    for path in sorted(Path(folder).rglob(".*.tmp")):
        if any(parent in removed for parent in path.parents):
            continue
        try:
            if now - path.lstat().st_mtime < older_than_s:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # its writer finished (os.replace) meanwhile
            continue
        removed.append(path)
    return removed
