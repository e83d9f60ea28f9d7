"""A user's session: their scratch space, cancel flags and disk quota. No Gradio: the UI maps its requests to a
`Session` and adapts what runs here to its components.

A `Session` is one user's scratch space: its own folder for pictures and training files, a cancel flag per job kind
("generate", "train", "evaluate"), the thumbnails made in it, and its latest training run (the snapshot the live
view draws and how the run ended). `Sessions` hands them out by id and forgets them when their page closes.

What a session writes is bounded (`DiskLimits`): its folder (pictures, training files, resume files, class pictures,
the uploads it kept) and its folders elsewhere (its concepts in the library) count against one quota, checked before
a write (`Session.make_room`, which first deletes the session's own pictures and training files older than an hour,
never a fine-tuned model); a folder unused for `keep_s` is deleted (`Sessions.expire`), and the hidden
`.<name>.<random>.tmp` files and folders that a killed write leaves are swept up (`remove_temp_leftovers`).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from studio.engine.files import atomic_write, remove_temp_leftovers
from studio.engine.generate import GenerateResult, save_png
from studio.engine.names import file_stem, inside
from studio.errors import UserError
from studio.jobs.fair import FairScheduler
from studio.jobs.training_run import TrainingSnapshot

ANONYMOUS = "anonymous"  # the session of a request that names none
UPLOADS = "uploads"  # in a session's folder: uploads kept for its next job (a second Train with the same pictures)
# A session's pictures and training files make room for new ones once this old: a job of the session may still be
# writing younger ones (a checkpoint, its pictures before Gradio has copied them out for the browser).
EVICT_AFTER_S = 3600.0
MODEL_MARKER = "model_index.json"  # a folder holding this is a fine-tuned model: never evicted, only expired
# A used-up upload is deleted this long after it was last written (`SpentFiles`): the time a user's job may take to
# reach the server after their upload of the same bytes, which shares its path.
UPLOAD_GRACE_S = 600.0


class SessionFull(UserError):
    """A write that would take a session past its disk quota (`DiskLimits.quota_bytes`); nothing was written."""


@dataclass(frozen=True)
class DiskLimits:
    """What one session may keep on disk (launch.py --session-quota-mb; the UI's SESSION_DAYS sets `keep_s`)."""

    quota_bytes: int = 1_000_000_000  # issue 23: 1 GB, ~15 DreamBooth runs of the demo model (63 MB with its resume)
    keep_s: float = 7 * 86400.0  # a session's folder is deleted this long after its last use


@dataclass
class RunEnd:
    """How a session's latest training run ended (set once it has): the status to show and the concept file."""

    done: threading.Event = field(default_factory=threading.Event)
    status: str = ""
    path: str | None = None

    def finish(self, status: str, path: str | None) -> tuple[str, str | None]:
        self.status, self.path = status, path
        self.done.set()
        return status, path


@dataclass
class Session:
    """One user's session. `training` is the latest snapshot of its training run, `training_end` how that run ended."""

    id: str
    work_dir: Path
    thumbnails: dict[str, Path] = field(default_factory=dict)  # concept word -> picture made in this session
    training: TrainingSnapshot | None = None
    training_end: RunEnd | None = None
    disk: DiskLimits = field(default_factory=DiskLimits)
    kept_elsewhere: tuple[Path, ...] = ()  # folders outside `folder` that hold this session's files (its concepts)
    scheduler: FairScheduler | None = None  # the line its jobs wait in: `cancel` also takes its waiting jobs out
    _cancel: dict[str, threading.Event] = field(default_factory=dict)  # job kind -> flag

    @property
    def folder(self) -> Path:
        """The session's own folder for pictures and training files (its name made safe: ids come from clients)."""
        path = self.folder_path
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def folder_path(self) -> Path:
        """Where `folder` is, without making it."""
        return inside(self.work_dir, file_stem(self.id or ANONYMOUS, fallback=ANONYMOUS))

    def usage(self) -> int:
        """Bytes this session keeps on disk: its folder and its folders elsewhere."""
        return sum(file_bytes(root) for root in (self.folder_path, *self.kept_elsewhere))

    def make_room(self, need_bytes: int = 0) -> None:
        """Make sure `need_bytes` more fit in the session's quota: delete its own pictures and training files older
        than EVICT_AFTER_S, oldest first, as far as needed; SessionFull (one line saying how to free space) when that
        is not enough."""
        used = self.usage()
        if used + need_bytes <= self.disk.quota_bytes:
            return
        used -= self._evict(used + need_bytes - self.disk.quota_bytes)
        if used + need_bytes > self.disk.quota_bytes:
            needs = f", this needs {megabytes(need_bytes)} more" if need_bytes else ""
            raise SessionFull(f"This session's files would pass its {megabytes(self.disk.quota_bytes)} limit "
                              f"({megabytes(used)} kept{needs}): delete concepts or LoRAs you no longer need in the "
                              "Library tab (pictures and training files make room by themselves after an hour)")

    def keep_upload(self, upload: Path, name: str) -> Path:
        """A copy of an uploaded file in the session's `UPLOADS` folder under `name` (a relative path: the same name,
        the same file), made within its quota (SessionFull when it does not fit); the one there already, if any."""
        path = inside(self.folder / UPLOADS, name)
        if path.is_file():
            path.touch()  # in use again: evicted last
            return path
        self.make_room(upload.stat().st_size)
        return atomic_write(path, lambda temporary: shutil.copyfile(upload, temporary))

    def _evict(self, need_bytes: int) -> int:
        """Delete the session's own files older than EVICT_AFTER_S (not a model folder's), oldest first, until
        `need_bytes` are free; the bytes freed."""
        now, freed = time.time(), 0
        files = []
        for path in self.folder_path.rglob("*") if self.folder_path.is_dir() else ():
            try:
                stat = path.lstat()
            except FileNotFoundError:
                continue
            if path.is_file() and now - stat.st_mtime > EVICT_AFTER_S and not in_model_folder(path, self.folder_path):
                files.append((stat.st_mtime, stat.st_size, path))
        for _, size, path in sorted(files):
            if freed >= need_bytes:
                break
            path.unlink(missing_ok=True)
            freed += size
        return freed

    def cancel_flag(self, job: str = "generate") -> threading.Event:
        """The flag that stops this session's running `job` ("generate", "train" or "evaluate") within one step."""
        return self._cancel.setdefault(job, threading.Event())

    def fresh_cancel_flag(self, job: str = "generate") -> threading.Event:
        """A new, unset flag for a `job` that starts now (what `cancel` sets from here on). A run that was closed
        early keeps its own, set, flag: clearing a shared one could let it run on after its cancel."""
        flag = self._cancel[job] = threading.Event()
        return flag

    def cancel(self, job: str = "generate") -> None:
        """Stop this session's running `job` within one step, and take its jobs of that kind that wait for the
        device out of line."""
        self.cancel_flag(job).set()
        if self.scheduler is not None:
            self.scheduler.cancel_waiting(self.id, job)

    def save_pictures(self, result: GenerateResult) -> list[str]:
        """Save each picture of `result` (PNG with its parameters) in the session folder; return their paths."""
        out = self.folder
        paths = []
        for image, seed in zip(result.images, result.seeds):
            path = out / f"{len(list(out.glob('*.png'))):05d}-{seed}.png"
            save_png(image, path)
            paths.append(str(path))
        return paths

    def rename_thumbnail(self, old: str, new: str) -> None:
        """The thumbnail of concept `old` now belongs to `new` (after a rename, or a save under the next free word)."""
        if old in self.thumbnails:
            self.thumbnails[new] = self.thumbnails.pop(old)


class Sessions:
    """The open sessions of one studio, by id; their folders live under `work_dir`, within `disk`'s limits.

    `elsewhere`: other folders that keep a sub-folder per session, named by its id (the library's session concepts),
    counted in its quota. `scheduler`: the line the sessions' jobs wait in. Opening sweeps up what killed writes left
    in `work_dir` (`remove_temp_leftovers`): nothing of this studio writes there yet."""

    def __init__(self, work_dir: Path, disk: DiskLimits | None = None, scheduler: FairScheduler | None = None,
                 elsewhere: Iterable[Path] = ()) -> None:
        self.work_dir = Path(work_dir)
        self.disk = disk or DiskLimits()
        self.scheduler = scheduler
        self.elsewhere = tuple(Path(p) for p in elsewhere)
        self._open: dict[str, Session] = {}
        self._lock = threading.Lock()
        remove_temp_leftovers(self.work_dir)

    def get(self, session_id: str | None) -> Session:
        """The session with this id, opened when it is new; its folder counts as used now (`expire`)."""
        key = session_id or ANONYMOUS
        with self._lock:
            if key not in self._open:
                kept = tuple(p for p in (_session_folder(root, key) for root in self.elsewhere) if p is not None)
                self._open[key] = Session(key, self.work_dir, disk=self.disk, kept_elsewhere=kept,
                                          scheduler=self.scheduler)
            session = self._open[key]
        try:
            os.utime(session.folder_path)
        except FileNotFoundError:  # nothing written yet
            pass
        return session

    def expire(self) -> list[Path]:
        """Delete the session folders unused for `disk.keep_s` (and forget their sessions), and the leftovers of
        killed writes older than an hour; the folders deleted."""
        if not self.work_dir.is_dir():
            return []
        now, expired = time.time(), []
        for folder in self.work_dir.iterdir():
            try:
                used = folder.stat().st_mtime
            except FileNotFoundError:
                continue
            if folder.name.startswith(".") or not folder.is_dir() or now - used <= self.disk.keep_s:
                continue
            with self._lock:
                for key in [k for k, s in self._open.items() if s.folder_path == folder.resolve()]:
                    del self._open[key]
            shutil.rmtree(folder, ignore_errors=True)
            expired.append(folder)
        remove_temp_leftovers(self.work_dir, older_than_s=EVICT_AFTER_S)
        return expired

    def forget(self, session_id: str) -> None:
        """Drop what a session keeps in memory (its flags, thumbnails, training view); its files stay."""
        with self._lock:
            self._open.pop(session_id or ANONYMOUS, None)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._open))


def _session_folder(root: Path, session_id: str) -> Path | None:
    """`root`'s sub-folder of a session (`Sessions.elsewhere`); None for an id that names no folder there."""
    try:
        return inside(root, session_id)
    except UserError:  # WordError: an id that is no plain name
        return None


def file_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (links not followed); 0 when it does not exist."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # deleted meanwhile
                continue
    return total


def megabytes(size: int) -> str:
    """A size as people read it: 12 KB, 63 MB, 1.0 GB."""
    if size >= 1e9:
        return f"{size / 1e9:.1f} GB"
    return f"{size / 1e6:.0f} MB" if size >= 1e6 else f"{size / 1e3:.0f} KB"


def in_model_folder(path: Path, root: Path) -> bool:
    """Whether `path` is inside a folder under `root` that holds a model (`MODEL_MARKER`)."""
    return any((folder / MODEL_MARKER).is_file() for folder in path.parents
               if folder != root and root in folder.parents)


class SpentFiles:
    """Files that were used up (uploads a job has read, or refused), deleted once `grace_s` has passed since each was
    last written. An upload folder may hand the same path to several users (Gradio names an upload by its bytes), and
    a user's new upload of the same bytes writes it again: the grace keeps it for a job of theirs still on its way."""

    def __init__(self, grace_s: float = UPLOAD_GRACE_S) -> None:
        self.grace_s = grace_s
        self._files: dict[Path, Path] = {}  # file -> the folder below which its emptied folders go too
        self._lock = threading.Lock()

    def add(self, files: Iterable[Path], root: Path) -> None:
        """Delete `files` (in `root`) once their grace has passed (`sweep`)."""
        with self._lock:
            self._files.update((Path(f), Path(root)) for f in files)

    def sweep(self) -> list[Path]:
        """Delete the files whose grace has passed, and their folders left empty below their root; what was deleted."""
        now, deleted = time.time(), []
        with self._lock:
            for file, root in list(self._files.items()):
                try:
                    if now - file.stat().st_mtime <= self.grace_s:
                        continue
                    file.unlink()
                    deleted.append(file)
                except FileNotFoundError:  # gone already
                    pass
                del self._files[file]
                for folder in file.parents:
                    if folder == root or root not in folder.parents:
                        break
                    try:
                        folder.rmdir()
                    except OSError:  # not empty
                        break
        return deleted

