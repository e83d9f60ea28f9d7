"""The concept library: a folder of concept files (searched recursively) plus concepts private to one session.

Files are picked up without a restart. The library watches its folder (watchdog: inotify, FSEvents, Windows), and an
event only marks its path: the next read re-stats and re-reads that file (or rescans that sub-folder, re-reading the
files whose stamp, mtime_ns, size and inode, changed), so a request when nothing changed makes no file-system call.
Where no events can be had, reads rescan the folder at most every `refresh_interval` seconds, by each file's own
stat rather than the folder's mtime, which does not change on every platform (A1111's Windows bug) nor when a file
is rewritten in place. Parsed concepts are cached per file either way.
"""

from __future__ import annotations

import dataclasses

import errno
import hashlib
import logging
import os
import shutil
import stat
import threading
import time
import weakref
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from studio.engine.containers import failing_closed
from studio.engine.files import atomic_write, remove_temp_leftovers
from studio.engine.learned.lora import LoraFile
from studio.engine.learned.lora_files import LORA_SUFFIXES, is_lora_file, load_lora
from studio.engine.learned.plan import Learned
from studio.engine.learned.registry import load_concept, read_learned, save_concept
from studio.engine.learned.word import Concept, ConceptError, ConceptMismatchError
from studio.engine.learned.word_files import IMAGE_SUFFIXES, READ_SUFFIXES, companion_of, is_second_half
from studio.engine.names import check_word, file_stem, inside, session_key
from studio.engine.prompts import split_concept_words, split_lora_tags
from studio.errors import LoraError, UserError

log = logging.getLogger(__name__)

# What a save does when the word (or its file) is already in the shared library.
IF_TAKEN = ("refuse", "replace", "keep both")
# The sub-folder of a session's folder that keeps its LoRA files under their own names (the name a prompt uses).
SESSION_LORAS = "loras"
# Temp files of a write that a kill interrupted (`.<name>.<random>.tmp`) are removed once older than this.
STALE_TEMP_S = 3600.0

# Source formats whose files store the token inside: renaming rewrites the file; others are renamed as they are.
_REWRITE_ON_RENAME = {"studio": "studio", "a1111": "a1111", "diffusers": "diffusers"}

# The events that can change what the folder holds. Passed to the observer, which then asks the kernel for nothing
# else: not the open/close-without-write events that the library's own reads of its files would cause.
_WATCHED_EVENTS = (FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileDeletedEvent, FileMovedEvent,
                   DirCreatedEvent, DirDeletedEvent, DirMovedEvent)
# watchdog's observers that report the kernel's events. Its PollingObserver re-walks the whole tree every second on
# a thread of its own (more work than the periodic scan it would replace), and its kqueue one (BSD) keeps one open
# descriptor per file, which a library of thousands of files would exhaust: both fall back to the periodic scan.
_EVENT_OBSERVERS = ("InotifyObserver", "FSEventsObserver", "WindowsApiObserver")


@dataclass
class LibraryEntry:
    """One row of the library listing: a learned thing (from a file, or a session's own), whether it fits the model
    and why not; `thing` None for a file that could not be read (`reason` says why).

    A LoRA file is listed by its name, the file's stem that `<lora:name:w>` uses (A1111's rule); the words it
    carries, if any, are `lora.words`, so a word+LoRA file is one entry."""

    path: Path | None
    token: str
    thing: Learned | None
    fits: bool
    reason: str
    session: str | None

    @property
    def kind(self) -> str:
        """"word", "xti" (a word per layer), "lora" or "word+lora" (the thing's `kind`); "" for a file that could
        not be read."""
        return self.thing.kind if self.thing is not None else ""

    @property
    def concept(self) -> Concept | None:
        """The word (or per-layer word) of this entry; None for a LoRA file."""
        return _word(self.thing)

    @property
    def lora(self) -> LoraFile | None:
        """The LoRA file of this entry; None for a word."""
        return _lora(self.thing)

    @property
    def prompt_text(self) -> str:
        """What a concept picker writes into a prompt: the word itself; for a word+LoRA file (pivotal tuning) its
        words, which bring its LoRA (`ConceptLibrary.resolve`); `<lora:name:1>` for a LoRA alone (A1111 inserts a
        LoRA's tag at weight 1 too)."""
        if self.lora is None:
            return self.token
        return " ".join(word.token for word in self.lora.words) or f"<lora:{self.lora.name}:1>"


@dataclass
class _CachedFile:
    stamp: tuple
    thing: Learned | None  # None: unreadable, `error` says why
    error: str


class _FolderEvents(FileSystemEventHandler):
    """What the watcher saw change since the library last caught up: concept files to re-stat, folders to rescan.

    Fed on the observer's thread. It holds no reference to its library, so that a library nobody uses any more is
    collected (a finalizer then stops its observer) instead of being kept alive by its own watcher.
    """

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        # The folder itself, which is what the events name: a watch on a symlinked root would see no events at all.
        self.watched = Path(os.path.realpath(root))
        self.changed = threading.Condition()  # guards the fields below; notified after each recorded change
        self.count = 0                        # changes recorded so far
        self.files: set[Path] = set()
        self.folders: set[Path] = set()
        self.ended = False                    # the root itself was removed, which ends its watch

    def on_any_event(self, event: FileSystemEvent) -> None:
        marked = []
        for raw in (event.src_path, event.dest_path):  # dest_path: only moves have one (os.replace of a temp file)
            path = Path(os.fsdecode(raw)) if raw else None
            if path is None or not path.is_relative_to(self.watched):
                continue
            inside = path.relative_to(self.watched).parts
            if any(part.startswith(".") for part in inside):
                continue  # hidden, as in _scan: our own temp files mid-write
            if event.is_directory or _is_concept_file_name(path.name):
                marked.append(self.root.joinpath(*inside))  # the path as the library names it
        if not marked:
            return
        with self.changed:
            for path in marked:
                (self.folders if event.is_directory else self.files).add(path)
            if isinstance(event, DirDeletedEvent) and self.root in marked:
                self.ended = True
            self.count += 1
            self.changed.notify_all()

    def take(self) -> tuple[int, set[Path], set[Path]]:
        """The change count, files and folders recorded so far; the next take starts from nothing."""
        with self.changed:
            taken = self.count, self.files, self.folders
            self.files, self.folders = set(), set()
            return taken


class ConceptLibrary:
    """Concept files under `root` (recursive) plus per-session concepts; thread-safe."""

    def __init__(self, root: Path | str, refresh_interval: float = 1.0, sessions_dir: Path | str | None = None,
                 *, watch: bool = True) -> None:
        """`watch`: learn about changes from the file system's events, so that `get`/`resolve` re-read only what
        changed and make no file-system call when nothing did. `watching` says whether that is in use, and
        `watch_error` why not (events unavailable on this platform, inotify limits reached, `watch=False`).

        `refresh_interval`: without events, seconds during which `get`/`resolve` reuse the last full scan.
        `entries()` and the writing methods always rescan.

        `sessions_dir`: where each session's concepts are also kept on disk (one folder per session), so that they
        outlive a page reload or a restart; None keeps them in memory only.

        The watcher runs on daemon threads (nothing waits for them at exit); `close()`, or leaving a `with` block,
        stops them, as does the library being collected.
        """
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.sessions_dir = Path(sessions_dir) if sessions_dir is not None else None
        self.refresh_interval = refresh_interval
        remove_temp_leftovers(self.root, older_than_s=STALE_TEMP_S)
        self._lock = threading.RLock()
        self._files: dict[Path, _CachedFile] = {}
        self._sessions: dict[str, dict[str, Concept]] = {}
        self._by_token: dict[str, Path] = {}     # token -> the file that wins it
        self._loras_by_name: dict[str, Path] = {}  # LoRA name (file stem) -> the file that wins it
        self._lora_words: dict[str, Path] = {}   # word a LoRA file carries (pivotal tuning) -> that LoRA file
        self._parts: set[Path] = set()           # words files of pivotal pairs, listed with their LoRA file
        self._session_loras: dict[str, dict[str, LoraFile]] = {}
        self._shadowed: dict[Path, Path] = {}    # losing duplicate -> winner
        self._last_scan = float("-inf")
        self._events = _FolderEvents(self.root)
        self._caught_up = 0                      # the events' change count that the cache reflects
        self._observer = None
        self._finalize_watch: weakref.finalize | None = None
        self.watching = False
        self.watch_error = "not asked to watch (watch=False)"
        if watch:
            self._start_watching()

    # ----------------------------------------------------------------------------------------------- scanning

    def refresh(self) -> None:
        """Rescan the whole folder: pick up added, changed and removed files by their own stat; re-read only what
        changed."""
        with self._lock:
            self._caught_up, _, _ = self._events.take()  # a full scan covers every change recorded before it
            if self._update(self._scan(), list(self._files)):
                self._index_tokens()
            self._last_scan = time.monotonic()

    def _update(self, seen: dict[Path, tuple], maybe_gone: Iterable[Path], written: Collection[Path] = ()) -> bool:
        """Make the cache agree with `seen` (path -> stamp): drop the files of `maybe_gone` that are not in it, re-read
        those whose stamp changed and those in `written` (an event said so: an in-place rewrite of the same size
        within one mtime tick keeps its stamp). True when the token index must be rebuilt: a file came or went, or
        one now holds another token (a rewrite of the same word, such as a retrained concept, needs no rebuild: about
        60 ms at 10,000 files)."""
        reindex = False
        for path in [p for p in maybe_gone if p in self._files and p not in seen]:
            del self._files[path]
            reindex = True
        for path, stamp in seen.items():
            cached = self._files.get(path)
            if cached is not None and cached.stamp == stamp and path not in written:
                continue
            fresh = _read_file(path, stamp)
            self._files[path] = fresh
            reindex = reindex or cached is None or _token_of(cached) != _token_of(fresh)
        return reindex

    def _scan(self, top: Path | None = None) -> dict[Path, tuple]:
        """Every concept file under `top` (the root by default) with its stamp: (mtime_ns, size, inode) of the file
        (and its `_2` half); a symbolic link the library does not follow (`_link_stamp`) with a stamp that
        says why, so that it is listed once as unreadable with its reason.

        The inode too: an atomic rewrite (os.replace) of the same size within one mtime tick is still seen.
        One directory listing per folder and one stat per file (1,000 files: a few ms).
        """
        found: dict[Path, tuple] = {}
        root = os.path.realpath(self.root)
        if top is not None and top != self.root and top.is_symlink():
            return found  # a linked folder: its parent's scan lists the link with its reason
        folders = [self.root if top is None else top]
        while folders:
            folder = folders.pop()
            try:
                with os.scandir(folder) as listing:
                    entries = [e for e in listing if not e.name.startswith(".")]  # hidden: our temp files mid-write
            except (FileNotFoundError, NotADirectoryError):  # a sub-folder removed (or replaced) while we walked
                continue
            stamps = {}
            for entry in entries:
                try:
                    if entry.is_symlink() and (stamp := _link_stamp(Path(entry.path), root)) is not None:
                        stamps[entry.name] = stamp
                    elif entry.is_dir():
                        folders.append(Path(entry.path))
                    elif _is_concept_file_name(entry.name):
                        info = entry.stat()
                        stamps[entry.name] = (info.st_mtime_ns, info.st_size, info.st_ino)
                except FileNotFoundError:  # removed while we walked
                    continue
            found.update(_listed(folder, stamps, stamps))
        return found

    def _apply_events(self) -> None:
        """Re-read only what the watcher's events name: a changed file by one stat (two with its `_2` half), a
        created, moved or removed folder by a scan of that folder alone."""
        self._caught_up, files, folders = self._events.take()
        reindex = False
        for folder in folders:
            inside = str(folder) + os.sep
            reindex |= self._update(self._scan(folder), [p for p in self._files if str(p).startswith(inside)])
        if files:
            affected = {touched for path in files for touched in _entries_touched_by(path)}
            reindex |= self._update(_stamp_files(affected, self.root), affected, written=files)
        if reindex:
            self._index_tokens()

    def _index_tokens(self) -> None:
        """Duplicates: the file nearest the root wins, then the first in path order; the others are listed as shadowed.

        Words and LoRA names are apart (a prompt writes `cat` and `<lora:cat>`). The words file of a diffusers
        pivotal pair belongs to its LoRA file's entry (`_pivotal_parts`), not to an entry of its own."""
        self._by_token, self._loras_by_name, self._lora_words, self._shadowed = {}, {}, {}, {}
        self._parts = _pivotal_parts(self._files)
        order = sorted(self._files, key=lambda p: (len(p.relative_to(self.root).parts), p.relative_to(self.root).as_posix()))
        for path in order:
            thing = self._files[path].thing
            if path in self._parts or thing is None:
                continue
            index = self._loras_by_name if thing.tag == "lora" else self._by_token
            winner = index.get(thing.name)
            if winner is None:
                index[thing.name] = path
                for word in getattr(thing, "words", ()):  # the words a LoRA file carries
                    self._lora_words.setdefault(word.token, path)  # the first LoRA file in this order wins a word
            else:
                self._shadowed[path] = winner

    def _refresh_if_stale(self) -> None:
        if time.monotonic() - self._last_scan >= self.refresh_interval:
            self.refresh()

    def _catch_up(self) -> None:
        """Bring the cache up to date before a read: from the watcher's events when watching (nothing to do, and no
        file-system call, when none came), else by a full scan once `refresh_interval` has passed."""
        if self.watching and self._events.ended:
            self._unwatch("the library folder was removed, which ends its watch")
        if not self.watching:
            self._refresh_if_stale()
        elif self._last_scan == float("-inf"):
            self.refresh()  # the first scan: the watch started before it, so no change falls between the two
        elif self._events.count != self._caught_up:
            self._apply_events()

    # ------------------------------------------------------------------------------------------------ watching

    def _start_watching(self) -> None:
        """Watch the root recursively; on failure keep the periodic scan and say why in `watch_error`."""
        try:
            observer = _start_observer(self._events)
        except OSError as exc:
            self.watch_error = f"file-system events unavailable, rescanning every {self.refresh_interval} s: {exc}"
            return
        self._observer = observer
        # Stops the observer when the library is collected unclosed; not at exit, where its daemon threads just end.
        self._finalize_watch = weakref.finalize(self, _stop_observer, observer)
        self._finalize_watch.atexit = False
        self.watching, self.watch_error = True, ""

    @property
    def changes_seen(self) -> int:
        """How many changes the watcher has recorded so far (0 when not watching); see `wait_for_change`."""
        return self._events.count

    def wait_for_change(self, seen: int, timeout: float) -> bool:
        """Block until the watcher has recorded a change after `seen` (an earlier `changes_seen`); False when
        `timeout` seconds pass first, and at once when not watching. For tests and tools that must know that a
        change on disk was noticed before they read; a read after it sees the change."""
        if not self.watching:
            return False
        with self._events.changed:
            return self._events.changed.wait_for(lambda: self._events.count > seen, timeout=max(timeout, 0.0))

    def close(self) -> None:
        """Stop watching the folder and wait for the watcher's threads to end. The library stays usable: reads fall
        back to the periodic scan, starting with a full one. Closing twice does nothing more."""
        self._unwatch("closed")

    def _unwatch(self, reason: str) -> None:
        with self._lock:
            observer, self._observer = self._observer, None
            if observer is None:
                return
            self.watching, self.watch_error = False, reason
            self._last_scan = float("-inf")  # changes recorded but not yet applied are found by the next scan
            self._finalize_watch()  # stops the observer now; a finalizer runs once, so not again later
        observer.join(timeout=10.0)  # its dispatch thread ends on the stop; daemon, so a hang cannot block exit

    def __enter__(self) -> ConceptLibrary:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ reading

    def entries(self, encoder_dims: dict[str, int] | None = None, session: str | None = None, *,
                model_name: str = "") -> list[LibraryEntry]:
        """Every file (unreadable ones with their error) and this session's concepts, with fits/reason for the model.

        `encoder_dims` (the loaded model's, `LoadedModel.encoder_dims`) judges words by their widths (`check_fits`)
        and LoRA files by `studio.engine.learned.lora.check_loras_fit`: the checks a request makes, so what is listed as
        fitting is what generation takes. `model_name` names the model in a reason. Without `encoder_dims`
        everything is listed as fitting."""
        with self._lock:
            self.refresh()
            session_concepts = self._session(session) if session is not None else {}
            session_loras = self._session_loras.get(session, {}) if session is not None else {}
            rows = [self._session_entry(thing, encoder_dims, model_name, session)
                    for _, thing in [*sorted(session_concepts.items()), *sorted(session_loras.items())]]
            for path in sorted(self._files, key=lambda p: p.relative_to(self.root).as_posix()):
                if path not in self._parts:  # a pivotal pair's words file is listed with its LoRA file
                    rows.append(self._file_entry(path, encoder_dims, model_name, session_concepts, session_loras))
            return rows

    @staticmethod
    def _session_entry(thing: Learned, encoder_dims: dict[str, int] | None, model_name: str,
                       session: str) -> LibraryEntry:
        fits, reason = _fit(thing, encoder_dims, model_name, f"session concept {thing.name!r}")
        return LibraryEntry(None, thing.name, thing, fits, reason, session)

    def _file_entry(self, path: Path, encoder_dims: dict[str, int] | None, model_name: str,
                    session_concepts: dict, session_loras: dict) -> LibraryEntry:
        cached = self._files[path]
        thing = cached.thing
        if thing is None:
            return LibraryEntry(path, path.stem, None, False, cached.error, None)
        if path in self._shadowed:
            winner = self._shadowed[path].relative_to(self.root).as_posix()
            what = "LoRA name" if thing.tag == "lora" else "token"
            reason = (f"{what} {thing.name!r} is also used by {winner}, which wins (nearest the library folder, then "
                      "first by path); rename one of them to use both")
            return LibraryEntry(path, thing.name, thing, False, reason, None)
        fits, reason = _fit(thing, encoder_dims, model_name, str(path))
        own = session_loras if thing.tag == "lora" else session_concepts
        if fits and thing.name in own:
            mine = "LoRA with this name" if thing.tag == "lora" else "concept with this token"
            reason = f"this session has its own {mine}, which is used instead"
        return LibraryEntry(path, thing.name, thing, fits, reason, None)

    def get(self, token: str, session: str | None = None) -> Concept:
        """The concept for `token`: this session's own first, then the library's; ConceptError when unknown.

        The word of a word+LoRA file (pivotal tuning) is no concept on its own: its vectors were learned with its
        LoRA, and a prompt that writes it gets both (`resolve`). Asked for here, the error says so."""
        with self._lock:
            if self.watching:
                self._catch_up()
            found = self._lookup_word(token, session)
            if found is None:  # a miss only: a full scan finds what no event told of (e.g. on a network share)
                self.refresh()
                found = self._lookup_word(token, session)
            if found is None:
                raise ConceptError(f"no concept named {token!r} in the shared library or this session: check the "
                                   "spelling, or train or import it first")
            concept, lora = found
            if lora is not None:
                raise ConceptError(f"{token!r} is the word of the LoRA {lora.name} ({lora.path.name}) and works only "
                                   f"with it: write {token} in a prompt, which applies the LoRA too")
            return concept

    def _lookup_word(self, word: str, session: str | None) -> tuple[Concept, LoraFile | None] | None:
        """The concept a prompt's `word` names and the LoRA file it comes with (None for a word alone): this
        session's words, then the words its LoRA files carry, then the library's in the same order."""
        if session is not None:
            mine = self._session(session)
            if word in mine:
                return mine[word], None
            for lora in self._session_loras.get(session, {}).values():
                carried = next((w for w in lora.words if w.token == word), None)
                if carried is not None:
                    return carried, lora
        path = self._by_token.get(word)
        if path is not None:  # a word, or another thing a prompt names by its word (an image concept)
            return self._files[path].thing, None
        path = self._lora_words.get(word)
        if path is not None:
            lora = _lora(self._files[path].thing)
            return next(((w, lora) for w in lora.words if w.token == word), None)
        return None

    def lora(self, name: str, session: str | None = None) -> LoraFile:
        """The LoRA file a prompt names as `<lora:name>`: this session's own first, then the library's (by file stem,
        as in A1111); LoraError naming what is there when none is called so."""
        with self._lock:
            if self.watching:
                self._catch_up()
            found = self._lookup_lora(name, session)
            if found is None:  # a miss only: a full scan finds what no event told of
                self.refresh()
                found = self._lookup_lora(name, session)
            if found is not None:
                return found
            unreadable = next((c.error for p, c in self._files.items() if p.stem == name and c.error), None)
            if unreadable is not None:
                raise LoraError(f"<lora:{name}>: {unreadable}")
            known = sorted(set(self._loras_by_name) | set(self._session_loras.get(session, {})))
            listed = f" (LoRAs here: {', '.join(known[:8])}{', ...' if len(known) > 8 else ''})" if known else ""
            raise LoraError(f"<lora:{name}> names no LoRA file in the library or this session{listed}: check the "
                            f"spelling (the name is the file's stem, {name}.safetensors) or import the file first")

    def _lookup_lora(self, name: str, session: str | None) -> LoraFile | None:
        if session is not None:
            self._session(session)  # read back from its folder after a restart
            if name in self._session_loras.get(session, {}):
                return self._session_loras[session][name]
        path = self._loras_by_name.get(name)
        return _lora(self._files[path].thing) if path is not None else None

    def resolve(self, prompt: str, session: str | None = None) -> list[Concept | tuple[LoraFile, float]]:
        """What `prompt` names: the concepts whose token occurs in it as a whole word
        (`studio.engine.prompts.split_concept_words`, the rule the prompt encoder places them by), in order of first
        use, then a `(LoraFile, weight)` for each `<lora:name:weight>` tag (`split_lora_tags`, the rule `generate`
        reads tags by), in the order written, then `(LoraFile, 1.0)` for each LoRA file whose word the prompt writes
        without a tag for it (pivotal tuning: the word brings the weights learned with it; a tag sets their weight,
        and the file is named once): the items `GenerateRequest(concepts=...)` takes. A tag that names no LoRA of
        the library or `session` raises LoraError (a UserError).

        Costs a few dict look-ups per prompt word (one per place the word could end), whatever the library size;
        while watching, no file-system call unless an event came since the last read. Whether a concept fits the
        model is not checked here but once per request, by the prompt encoder every request passes
        (ConceptMismatchError naming the concept's file) and by `check_loras_fit` for LoRAs.
        """
        text, tags = split_lora_tags(prompt)  # words inside a tag (<lora:cat:1>) are no concept words
        with self._lock:
            self._catch_up()
            carried_by: dict[int, LoraFile] = {}  # id of a word a LoRA file carries -> that file

            def lookup(word: str) -> Concept | None:
                found = self._lookup_word(word, session)
                if found is None:
                    return None
                if found[1] is not None:
                    carried_by[id(found[0])] = found[1]
                return found[0]

            words: dict[str, Concept] = {}
            for part in split_concept_words(text, lookup):
                if not isinstance(part, str):  # a word, or an image concept written like one
                    words.setdefault(part.name, part)
            loras = [(self.lora(name, session), weight) for name, weight in tags]
            for word in words.values():
                lora = carried_by.get(id(word))
                if lora is not None and not any(lora is named for named, _ in loras):
                    loras.append((lora, 1.0))
            return [*words.values(), *loras]

    # ------------------------------------------------------------------------------------------------ writing

    def add_session_concept(self, session: str, concept: Concept, if_taken: str = "replace") -> Concept:
        """Make `concept` usable by `session` only (e.g. a concept just trained); other sessions never see it.

        `if_taken` when the session already has a concept with this word: "replace" it (training the same word
        again), "keep both" (this one gets the next free word, `<w>-2`, ...) or "refuse". Returns what was added.
        """
        with self._lock:
            mine = self._session(session)
            if concept.token in mine:
                if if_taken == "refuse":
                    raise ConceptError(f"this session already has a concept called {concept.token!r}; "
                                       "rename or delete that one first")
                if if_taken == "keep both":
                    concept = _renamed(concept, self._free_word(concept.token, session))
            self._write_session_file(session, concept)
            mine[concept.token] = concept
            return concept

    def add_session_lora(self, session: str, path: Path | str) -> LoraFile:
        """Make the LoRA file at `path` usable by `session` only, as `<lora:{its stem}>` (an upload keeps its file's
        name); a LoRA of the same name in the session is replaced. The file is checked first (LoraError), then
        copied into the session's folder, so that it outlives the upload and a restart. Returns what was added."""
        source = Path(path)
        lora = load_lora(source)  # validate first: a bad file never enters the session
        with self._lock:
            self._session(session)
            folder = self._session_folder(session)
            if folder is not None:
                kept = inside(folder / SESSION_LORAS, file_stem(source.stem) + source.suffix.lower())
                kept.parent.mkdir(parents=True, exist_ok=True)
                # A diffusers pivotal pair's words file goes with it; one left by an earlier LoRA of this name
                # would be read as this one's words.
                kept.with_name(_emb_name(kept.name)).unlink(missing_ok=True)
                for words in _pivotal_words_file(lora):
                    _atomic_copy(words, kept.with_name(_emb_name(kept.name)))
                _atomic_copy(source, kept)
                lora = load_lora(kept)
            self._session_loras.setdefault(session, {})[lora.name] = lora
            return lora

    def drop_session(self, session: str, *, files: bool = False) -> None:
        """Forget a session's concepts in memory (its files stay for a later visit); `files=True` deletes those too."""
        with self._lock:
            self._sessions.pop(session, None)
            self._session_loras.pop(session, None)
            folder = self._session_folder(session)
            if files and folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    def expire_sessions(self, max_age_s: float) -> list[str]:
        """Delete the folders of sessions unused for `max_age_s` seconds (and forget them); returns their ids."""
        if self.sessions_dir is None or not self.sessions_dir.is_dir():
            return []
        now, expired = time.time(), []
        with self._lock:
            for folder in self.sessions_dir.iterdir():
                if folder.is_dir() and session_key(folder.name) and now - folder.stat().st_mtime > max_age_s:
                    self.drop_session(folder.name, files=True)
                    expired.append(folder.name)
        return expired

    def _session(self, session: str) -> dict[str, Concept]:
        """This session's concepts, read back from its folder on the first use after a restart."""
        mine = self._sessions.get(session)
        if mine is None:
            mine = self._sessions[session] = {}
            folder = self._session_folder(session)
            if folder is not None and folder.is_dir():
                os.utime(folder)  # in use: not expired
                for file in sorted(folder.glob("*.safetensors")):
                    try:
                        concept = load_concept(file)
                    except ConceptError:
                        continue  # a file a kill left half-written is never final (atomic writes): not ours
                    mine[concept.token] = concept
                loras = self._session_loras.setdefault(session, {})
                for file in sorted((folder / SESSION_LORAS).glob("*")):
                    if file.suffix.lower() not in LORA_SUFFIXES:
                        continue
                    try:
                        loras[file.stem] = load_lora(file)
                    except UserError:
                        continue  # as above
        return mine

    def _session_folder(self, session: str) -> Path | None:
        if self.sessions_dir is None or session_key(session) is None:
            return None  # e.g. "anonymous": memory only
        return inside(self.sessions_dir, session)

    def _session_file(self, session: str, token: str) -> Path | None:
        folder = self._session_folder(session)
        # Words that make the same file stem (<a> and a) stay apart by a digest of the word itself.
        digest = hashlib.sha1(token.encode("utf-8")).hexdigest()[:8]
        return None if folder is None else inside(folder, f"{file_stem(token)}-{digest}.safetensors")

    def _write_session_file(self, session: str, concept: Concept) -> None:
        path = self._session_file(session, concept.token)
        if path is not None:
            save_concept(concept, path, format="studio")

    def _free_word(self, token: str, session: str | None = None) -> str:
        """`token` with the first `-2`, `-3` ... (inside any <>) that neither the library nor `session` uses."""
        opening, core, closing = ("<", token[1:-1], ">") if token.startswith("<") and token.endswith(">") else ("", token, "")
        for k in range(2, 10_000):
            word = f"{opening}{core}-{k}{closing}"
            taken = word in self._by_token or (session is not None and word in self._session(session))
            path_taken = (self.root / f"{file_stem(word)}.safetensors").exists()
            if not taken and not path_taken:
                return word
        raise ConceptError(f"no free variant of {token!r} in the library; rename it")

    def save(self, concept: Concept, format: str = "studio", *, if_taken: str = "refuse") -> Path:
        """Write `concept` into the library folder as `<file_stem(token)>.safetensors` (`.pt` for SD1/SD2 a1111).

        When the word or its file is already there: `if_taken="refuse"` (the default) raises ConceptExistsError,
        "replace" overwrites that file, "keep both" saves this one under the next free word (`<w>-2`).
        """
        if if_taken not in IF_TAKEN:
            raise ConceptError(f"if_taken must be one of {', '.join(IF_TAKEN)}, not {if_taken!r}")
        with self._lock:
            self.refresh()
            target = inside(self.root, file_stem(concept.token))
            holder = self._by_token.get(concept.token)
            clash = holder or next((p for p in self._files if p.with_suffix("") == target), None)
            if clash is not None:
                if if_taken == "refuse":
                    raise ConceptExistsError(
                        f"{concept.token!r} is already in the shared library ({clash.relative_to(self.root)}): "
                        "choose replace or keep both")
                if if_taken == "keep both":
                    concept = _renamed(concept, self._free_word(concept.token))
                    target = inside(self.root, file_stem(concept.token))
                elif holder is not None and holder.with_suffix("") != target:
                    raise ConceptExistsError(f"{concept.token!r} is used by {holder.relative_to(self.root)}, another "
                                             "file: rename or delete that one first")
            path = save_concept(concept, target, format=format)
            _training_state(path).unlink(missing_ok=True)  # a replaced file's resume state belongs to the old vectors
            self.refresh()
            return path

    def import_file(self, path: Path | str) -> LibraryEntry:
        """Copy a concept file (a word, or a LoRA file with its pivotal words file) into the library after checking that
        it reads; refuses to overwrite a file."""
        source = Path(path)
        # Validate first, failing closed: a bad or hostile file never enters the library, and is refused in one line.
        with failing_closed(source, ConceptError, "concept or LoRA file"):
            if is_second_half(source):  # asked for x_2 of a diffusers SDXL pair: import the pair through x
                source = companion_of(source)
            if is_lora_file(source):
                sources = [source] + _pivotal_words_file(load_lora(source))
            else:
                sources = [source] + _second_half(source, load_concept(source))
        with self._lock:
            targets = [inside(self.root, file_stem(src.stem) + src.suffix.lower()) for src in sources]
            for target in targets:
                if target.exists():
                    raise ConceptExistsError(f"{target.name} is already in the library; rename or delete that one first")
            for src, target in zip(sources, targets):
                _atomic_copy(src, target)
            self.refresh()
            return self._entry_for(targets[0])

    def rename(self, token: str, new_token: str, session: str | None = None) -> LibraryEntry:
        """Give a concept a new trigger word: rewrites the token stored inside and the file name. A LoRA file of the
        library (`token`: its name) gets the new name as its file's stem, which is all its name is.

        All or nothing: the new word is checked (one word, free, its file free) before anything changes.
        """
        check_word(new_token, "new word")
        with self._lock:
            self.refresh()
            if session is not None and token in self._session(session):
                mine = self._sessions[session]
                if new_token in mine:
                    raise ConceptError(f"this session already has a concept called {new_token!r}; pick another word")
                renamed = _renamed(mine[token], new_token)
                self._write_session_file(session, renamed)
                mine[new_token] = renamed
                del mine[token]
                old_file = self._session_file(session, token)
                if old_file is not None:
                    old_file.unlink(missing_ok=True)
                return LibraryEntry(None, new_token, renamed, True, "", session)
            if session is not None and token in self._session_loras.get(session, {}):
                raise LoraError(f"{token!r} is a LoRA of this session: import it again under the new name")
            if token not in self._by_token and token in self._loras_by_name:
                return self._rename_lora(token, new_token)
            old_path = self._by_token.get(token)
            if old_path is None:
                raise ConceptError(f"no concept file named {token!r} in the library")
            if new_token in self._by_token:
                raise ConceptError(f"{new_token!r} is already used by {self._by_token[new_token].name}; pick another name")
            concept = _word(self._files[old_path].thing)
            renamed = _renamed(concept, new_token)
            new_path = inside(old_path.parent, file_stem(new_token) + old_path.suffix)
            old_files = [old_path] + _second_half(old_path, concept)
            if new_path.exists() and new_path not in old_files:
                raise ConceptError(f"{new_path.name} already exists in the library; pick another word")
            fmt = _REWRITE_ON_RENAME.get(concept.meta.get("source_format", ""))
            if fmt is not None:
                save_concept(renamed, new_path, format=fmt)  # written atomically before the old one goes
                for old in old_files:
                    if old != new_path and not (fmt == "diffusers" and old == companion_of(new_path)):
                        old.unlink()
            else:  # the token is only the file name (kohya, SDXL, PNG): a rename is the whole change
                os.replace(old_path, new_path)
            # A trainer's resume state names the old token, so it cannot continue the renamed concept.
            _training_state(old_path).unlink(missing_ok=True)
            self.refresh()
            return self._entry_for(new_path)

    def _rename_lora(self, name: str, new_name: str) -> LibraryEntry:
        """Rename a LoRA file of the library (and the words file of a pivotal pair with it): its name is its stem."""
        old_path = self._loras_by_name[name]
        new_stem = file_stem(new_name)
        if new_stem in self._loras_by_name:
            raise LoraError(f"a LoRA called {new_stem!r} is already in the library "
                            f"({self._loras_by_name[new_stem].name}); pick another name")
        moves = [(old_path, inside(old_path.parent, new_stem + old_path.suffix))]
        moves += [(words, inside(words.parent, f"{new_stem}_emb{words.suffix}"))
                  for words in _pivotal_words_file(_lora(self._files[old_path].thing))]
        for _, target in moves:
            if target.exists():
                raise LoraError(f"{target.name} already exists in the library; pick another name")
        for source, target in moves:
            os.replace(source, target)
        self.refresh()
        return self._entry_for(moves[0][1])

    def delete(self, token: str, session: str | None = None) -> None:
        """Remove a session concept or LoRA, or delete the library file (both halves of a diffusers SDXL pair, both
        files of a pivotal pair). `token` is a word, else a LoRA's name."""
        with self._lock:
            if session is not None and token in self._session(session):
                del self._sessions[session][token]
                old_file = self._session_file(session, token)
                if old_file is not None:
                    old_file.unlink(missing_ok=True)
                return
            if session is not None and token in self._session_loras.get(session, {}):
                kept = self._session_loras[session].pop(token).path
                folder = self._session_folder(session)
                if folder is not None and kept.is_relative_to(folder):  # a memory-only session's is the user's own
                    kept.unlink(missing_ok=True)
                return
            self.refresh()
            path = self._by_token.get(token)
            if path is not None:
                files = [path] + _second_half(path, _word(self._files[path].thing))
            elif token in self._loras_by_name:
                path = self._loras_by_name[token]
                files = [path] + _pivotal_words_file(_lora(self._files[path].thing))
            else:
                raise ConceptError(f"no concept named {token!r} in the library")
            for file in files:
                file.unlink()
            _training_state(path).unlink(missing_ok=True)
            self.refresh()

    def _entry_for(self, path: Path) -> LibraryEntry:
        for entry in self.entries():
            if entry.path == path:
                return entry
        raise ConceptError(f"{path} did not appear in the library after writing it")


class ConceptExistsError(ConceptError):
    """A save or import that would replace another file of the shared library; nothing was written."""


def _renamed(concept: Concept, token: str) -> Concept:
    """`concept` under another word (validated); a per-layer word keeps its layers (`dataclasses.replace` keeps its
    class and fields)."""
    return dataclasses.replace(concept, token=token, meta=dict(concept.meta))


def _training_state(path: Path) -> Path:
    """The trainer's resume sidecar of a concept file, which goes with the file."""
    from studio.training.resume import state_path  # imported here: listing concepts need not load the trainer

    return state_path(path)


def _is_concept_file_name(name: str) -> bool:
    stem, suffix = os.path.splitext(name)
    suffix = suffix.lower()
    # A1111 keeps thumbnails as `<name>.preview.png` next to embeddings: pictures, not concepts.
    return suffix in READ_SUFFIXES and not (suffix in IMAGE_SUFFIXES and stem.lower().endswith(".preview"))


def _token_of(cached: _CachedFile) -> tuple[str, ...] | None:
    """What a file is indexed by: its word, or its LoRA name and the words it carries (a retrained pivotal file with
    another word is re-indexed)."""
    thing = cached.thing
    if thing is None:
        return None
    if thing.tag is not None:  # a name apart from every word (<lora:name>): a file turned LoRA is re-indexed
        return (f"<{thing.tag}:{thing.name}>", *(word.token for word in getattr(thing, "words", ())))
    return (thing.name,)


def _read_file(path: Path, stamp: tuple) -> _CachedFile:
    """A library file read as whatever learned thing it holds (`studio.engine.learned.registry.read_learned`), or
    the one-line reason it reads as none.

    Fails closed: whatever reading raises (a hostile file's RecursionError, MemoryError, a library's RuntimeError)
    is the entry's reason, never the listing's failure (`failing_closed`). A link the library does not follow
    (`_link_stamp`) is not read; its reason is logged once, when it appears, and listed."""
    if stamp[:1] == (_LINK_NOT_FOLLOWED,):
        reason = f"{path.name}: {stamp[1]}"
        log.warning("concept library: skipped %s: %s", path, stamp[1])
        return _CachedFile(stamp, None, reason)
    try:
        return _CachedFile(stamp, read_learned(path), "")
    except UserError as exc:  # ConceptError, LoraError: the file's own reason
        return _CachedFile(stamp, None, str(exc))


def _word(thing: Learned | None) -> Concept | None:
    """`thing` when it is a word (a per-layer word too), else None."""
    return thing if isinstance(thing, Concept) else None


def _lora(thing: Learned | None) -> LoraFile | None:
    """`thing` when it is a LoRA file, else None."""
    return thing if isinstance(thing, LoraFile) else None


def _fit(thing: Learned, encoder_dims: dict[str, int] | None, model_name: str, where: str) -> tuple[bool, str]:
    """Whether `thing` fits the model with `encoder_dims` (None: any model), and why not: by its own `check_fit`,
    the check every request makes, so what is listed as fitting is what generation takes."""
    if encoder_dims is None:
        return True, ""
    try:
        thing.check_fit(encoder_dims, model_name, where=where)
    except (LoraError, ConceptMismatchError) as exc:
        return False, str(exc)
    return True, ""


def _pivotal_words_file(lora: LoraFile | None) -> list[Path]:
    """`[x_emb.safetensors]` when `lora` (x.safetensors) took its words from diffusers' pivotal-tuning file beside it,
    else `[]`: that file goes with its LoRA (one entry; imported, renamed and deleted together)."""
    if lora is None:
        return []
    return [Path(w.meta["source_path"]) for w in lora.words if w.meta.get("source_format") == "diffusers-pivotal"
            and Path(w.meta["source_path"]).name == _emb_name(lora.path.name)]


def _pivotal_parts(files: dict[Path, _CachedFile]) -> set[Path]:
    """The words files that belong to a LoRA file's entry (`_pivotal_words_file`)."""
    return {part for cached in files.values() for part in _pivotal_words_file(_lora(cached.thing)) if part in files}


def _half_name(name: str) -> str:
    """`x_2.safetensors` for `x.safetensors`: where the second half of a diffusers SDXL pair would be."""
    stem, suffix = os.path.splitext(name)
    return stem + "_2" + suffix


def _emb_name(name: str) -> str:
    """`x_emb.safetensors` for `x.safetensors`: where diffusers' pivotal tuning puts the words of LoRA x."""
    stem, suffix = os.path.splitext(name)
    return stem + "_emb" + suffix


def _listed(folder: Path | str, stamps: dict[str, tuple], names: Iterable[str]) -> dict[Path, tuple]:
    """The library entries among `names` in `folder`, from each file's own (mtime_ns, size, inode) in `stamps`.

    The second half of a diffusers SDXL pair is listed, and stamped, through its first half.
    """
    found: dict[Path, tuple] = {}
    for name in names:
        if name not in stamps:
            continue
        stem, suffix = os.path.splitext(name)
        path = Path(folder, name)
        pair = stem.endswith("_2") and _followed(stamps, stem[:-2] + suffix) and _followed(stamps, name)
        if pair and is_second_half(path):
            continue
        # A file's stamp covers its partners: a changed `_2` half or pivotal words file re-reads it.
        found[path] = stamps[name] + stamps.get(_half_name(name), ()) + stamps.get(_emb_name(name), ())
    return found


def _entries_touched_by(path: Path) -> list[Path]:
    """The files whose library entry a change of `path` can alter: itself, its `_2` half (x's entry carries x_2's
    stamp), for an x_2, x (x_2 is listed on its own only while x does not pair with it) and, for an x_emb, x (a LoRA
    file's entry carries the stamp of its pivotal words file)."""
    touched = [path, path.with_name(_half_name(path.name))]
    stem, suffix = os.path.splitext(path.name)
    if stem.endswith("_2"):
        touched.append(path.with_name(stem[:-2] + suffix))
    if stem.endswith("_emb"):  # the words file of a pivotal pair: its LoRA file's entry carries its stamp
        touched.append(path.with_name(stem[:-4] + suffix))
    return touched


def _stamp_files(paths: Iterable[Path], root: Path) -> dict[Path, tuple]:
    """What `_scan` would find of just these files of the library at `root`: those that exist, with their stamps,
    by one stat of each (and of its `_2` half and `_emb` words file); a link not followed with its reason."""
    names_by_folder: dict[Path, set[str]] = {}
    for path in paths:
        names_by_folder.setdefault(path.parent, set()).add(path.name)
    found: dict[Path, tuple] = {}
    real_root = os.path.realpath(root)
    for folder, names in names_by_folder.items():
        stamps = {}
        for name in names | {_half_name(name) for name in names} | {_emb_name(name) for name in names}:
            try:
                if os.path.islink(folder / name) and (stamp := _link_stamp(folder / name, real_root)) is not None:
                    stamps[name] = stamp
                    continue
                info = os.stat(folder / name)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if not stat.S_ISDIR(info.st_mode):
                stamps[name] = (info.st_mtime_ns, info.st_size, info.st_ino)
        found.update(_listed(folder, stamps, names))
    return found


# The first item of the stamp of a symbolic link the library does not follow: its reason is the second.
_LINK_NOT_FOLLOWED = "link not followed"


def _link_stamp(link: Path, real_root: str) -> tuple | None:
    """The stamp of a symbolic link under the library folder (`real_root`, resolved) that the library does not
    follow: `(_LINK_NOT_FOLLOWED, reason, mtime_ns, inode)` of the link itself; None for one it reads as the file it
    names (a concept file inside the library) or passes over (a link to something else, under another name).

    Links to folders are never followed: one inside the library names a folder listed from where it is (following
    it would list each file twice, and `ln -s . loop` forever), one outside leads where the library does not reach.
    Nor links to files outside the library, links that loop, and links to nothing under a concept file's name."""
    try:
        target = os.path.realpath(link, strict=True)
    except OSError as exc:  # ELOOP: a link that loops; FileNotFoundError: its target is missing
        if exc.errno == errno.ELOOP:
            reason = "a symbolic link that loops; not followed"
        elif _is_concept_file_name(link.name):
            reason = "a symbolic link to nothing (its target is missing)"
        else:
            return None
    else:
        inside_library = os.path.commonpath([target, real_root]) == real_root
        where = os.path.realpath(link.parent)  # the folder the link is in
        if os.path.isdir(target):
            if os.path.commonpath([target, where]) == target:
                reason = "a symbolic link back to a folder it is in (a loop); not followed"
            elif inside_library:
                rel = Path(os.path.relpath(target, real_root)).as_posix()
                reason = f"a symbolic link to the library's folder {rel}/, listed from there; not followed"
            else:
                reason = "a symbolic link to a folder outside the library folder; not followed"
        elif not _is_concept_file_name(link.name):
            return None
        elif inside_library:
            return None
        else:
            reason = "a symbolic link to a file outside the library folder; not followed"
    info = os.lstat(link)
    return (_LINK_NOT_FOLLOWED, reason, info.st_mtime_ns, info.st_ino)


def _followed(stamps: dict[str, tuple], name: str) -> bool:
    """Whether `name` is in `stamps` as a file the library reads (not a link it does not follow)."""
    return name in stamps and stamps[name][:1] != (_LINK_NOT_FOLLOWED,)


def _start_observer(handler: _FolderEvents):
    """A started watchdog observer that reports `_WATCHED_EVENTS` under `handler.watched` (recursive) to `handler`.

    OSError when this platform has no file-system events, or when the observer cannot start (e.g. inotify's limits
    on instances or watches, shared by every process of the user).
    """
    from watchdog.observers import Observer  # imported here: it loads the platform's event API, for watchers only

    if Observer.__name__ not in _EVENT_OBSERVERS:
        raise OSError(f"watchdog offers no file-system events here, only its {Observer.__name__}")
    observer = Observer()
    # Links to folders are not followed (watchdog's default), as `_scan` does not follow them (`_link_stamp`).
    options = {"recursive": True, "event_filter": list(_WATCHED_EVENTS)}
    try:
        observer.schedule(handler, str(handler.watched), **options)
        observer.start()
    except BaseException:
        _stop_observer(observer)
        raise
    return observer


def _stop_observer(observer) -> None:
    """Stop `observer` and the threads it started (daemon threads: nothing waits for them at exit)."""
    try:
        observer.stop()
    except RuntimeError:  # run by the collector on one of the observer's own threads, which cannot join itself
        pass


def _second_half(path: Path, concept: Concept) -> list[Path]:
    """`[x_2.safetensors]` when `concept` was read from a diffusers SDXL pair, else `[]`."""
    if concept.meta.get("source_format") == "diffusers" and "text_encoder_2" in concept.vectors:
        partner = companion_of(path)
        return [partner] if partner is not None else []
    return []


def _atomic_copy(source: Path, target: Path) -> None:
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
