"""The concept library: a folder of concept files (searched recursively) plus concepts private to one session.

Files are picked up without a restart by each file's own stat (mtime_ns, size, inode) rather than the folder's mtime,
which does not change on every platform (A1111's Windows bug) nor when a file is rewritten in place. Parsed concepts
are cached per file, so a refresh costs one `stat` per file and a re-read only of what changed.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from studio.engine.concepts import (
    IMAGE_SUFFIXES,
    READ_SUFFIXES,
    Concept,
    ConceptError,
    ConceptMismatchError,
    check_fits,
    companion_of,
    is_second_half,
    load_concept,
    save_concept,
)

# Characters that end a word in a prompt: whitespace and A1111/compel prompt syntax. Tokens may hold < > - _ . etc.
_PROMPT_SEPARATORS = re.compile(r"[\s,()\[\]{}:|]+")
# Punctuation that may close a sentence right after a token ("a photo of <cat-toy>.").
_TRAILING_PUNCTUATION = ".!?;'\""

# Source formats whose files store the token inside: renaming rewrites the file; others are renamed as they are.
_REWRITE_ON_RENAME = {"studio": "studio", "a1111": "a1111", "diffusers": "diffusers"}


@dataclass
class LibraryEntry:
    """One row of the library listing: a file (or a session concept), whether it fits the model and why not."""

    path: Path | None
    token: str
    concept: Concept | None
    fits: bool
    reason: str
    session: str | None


@dataclass
class _CachedFile:
    stamp: tuple
    concept: Concept | None
    error: str


class ConceptLibrary:
    """Concept files under `root` (recursive) plus per-session concepts; thread-safe."""

    def __init__(self, root: Path | str, refresh_interval: float = 1.0) -> None:
        """`refresh_interval`: seconds during which `get`/`resolve` reuse the last scan (entries() always rescans)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.refresh_interval = refresh_interval
        self._lock = threading.RLock()
        self._files: dict[Path, _CachedFile] = {}
        self._sessions: dict[str, dict[str, Concept]] = {}
        self._by_token: dict[str, Path] = {}     # token -> the file that wins it
        self._shadowed: dict[Path, Path] = {}    # losing duplicate -> winner
        self._last_scan = float("-inf")

    # ----------------------------------------------------------------------------------------------- scanning

    def refresh(self) -> None:
        """Pick up added, changed and removed files by their own stat; re-read only what changed."""
        with self._lock:
            seen = self._scan()
            changed = False
            for path in list(self._files):
                if path not in seen:
                    del self._files[path]
                    changed = True
            for path, stamp in seen.items():
                cached = self._files.get(path)
                if cached is not None and cached.stamp == stamp:
                    continue
                changed = True
                try:
                    self._files[path] = _CachedFile(stamp, load_concept(path), "")
                except ConceptError as exc:
                    self._files[path] = _CachedFile(stamp, None, str(exc))
            if changed:
                self._index_tokens()
            self._last_scan = time.monotonic()

    def _scan(self) -> dict[Path, tuple]:
        """Every concept file under the root with its stamp: (mtime_ns, size, inode) of the file (and its `_2` half).

        The inode too: an atomic rewrite (os.replace) of the same size within one mtime tick is still seen.
        One directory listing per folder and one stat per file (1,000 files: a few ms).
        """
        found: dict[Path, tuple] = {}
        folders = [self.root]
        while folders:
            folder = folders.pop()
            try:
                with os.scandir(folder) as listing:
                    entries = [e for e in listing if not e.name.startswith(".")]  # hidden: our temp files mid-write
            except FileNotFoundError:  # a sub-folder removed while we walked
                continue
            stamps = {}
            for entry in entries:
                try:
                    if entry.is_dir():
                        folders.append(Path(entry.path))
                    elif _is_concept_file_name(entry.name):
                        stat = entry.stat()
                        stamps[entry.name] = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
                except FileNotFoundError:  # removed while we walked
                    continue
            for name, stamp in stamps.items():
                stem, suffix = os.path.splitext(name)
                path = Path(folder, name)
                # The second half of a diffusers SDXL pair is listed (and stamped) through its first half.
                if stem.endswith("_2") and stem[:-2] + suffix in stamps and is_second_half(path):
                    continue
                found[path] = stamp + stamps.get(stem + "_2" + suffix, ())
        return found

    def _index_tokens(self) -> None:
        """Duplicates: the file nearest the root wins, then the first in path order; the others are listed as shadowed."""
        self._by_token, self._shadowed = {}, {}
        order = sorted(self._files, key=lambda p: (len(p.relative_to(self.root).parts), p.relative_to(self.root).as_posix()))
        for path in order:
            concept = self._files[path].concept
            if concept is None:
                continue
            winner = self._by_token.get(concept.token)
            if winner is None:
                self._by_token[concept.token] = path
            else:
                self._shadowed[path] = winner

    def _refresh_if_stale(self) -> None:
        if time.monotonic() - self._last_scan >= self.refresh_interval:
            self.refresh()

    # ------------------------------------------------------------------------------------------------ reading

    def entries(self, encoder_dims: dict[str, int] | None = None, session: str | None = None) -> list[LibraryEntry]:
        """Every file (unreadable ones with their error) and this session's concepts, with fits/reason for the model."""
        with self._lock:
            self.refresh()
            session_concepts = self._sessions.get(session, {}) if session is not None else {}
            rows = []
            for token, concept in sorted(session_concepts.items()):
                fits, reason = self._fit(concept, encoder_dims, where=f"session concept {token!r}")
                rows.append(LibraryEntry(None, token, concept, fits, reason, session))
            for path in sorted(self._files, key=lambda p: p.relative_to(self.root).as_posix()):
                cached = self._files[path]
                concept = cached.concept
                if concept is None:
                    rows.append(LibraryEntry(path, path.stem, None, False, cached.error, None))
                    continue
                if path in self._shadowed:
                    winner = self._shadowed[path].relative_to(self.root).as_posix()
                    reason = (f"token {concept.token!r} is also used by {winner}, which wins (nearest the library "
                              "folder, then first by path); rename one of them to use both")
                    rows.append(LibraryEntry(path, concept.token, concept, False, reason, None))
                    continue
                fits, reason = self._fit(concept, encoder_dims, where=str(path))
                if fits and concept.token in session_concepts:
                    reason = "this session has its own concept with this token, which is used instead"
                rows.append(LibraryEntry(path, concept.token, concept, fits, reason, None))
            return rows

    @staticmethod
    def _fit(concept: Concept, encoder_dims: dict[str, int] | None, where: str) -> tuple[bool, str]:
        if encoder_dims is None:
            return True, ""
        try:
            check_fits(concept, encoder_dims, where=where)
        except ConceptMismatchError as exc:
            return False, str(exc)
        return True, ""

    def get(self, token: str, session: str | None = None) -> Concept:
        """The concept for `token`: this session's own first, then the library's; ConceptError when unknown."""
        with self._lock:
            found = self._lookup(token, session)
            if found is None:
                self.refresh()
                found = self._lookup(token, session)
            if found is None:
                raise ConceptError(f"no concept named {token!r} in the library ({self.root}) or this session")
            return found

    def _lookup(self, token: str, session: str | None) -> Concept | None:
        if session is not None and token in self._sessions.get(session, {}):
            return self._sessions[session][token]
        path = self._by_token.get(token)
        return self._files[path].concept if path is not None else None

    def resolve(self, prompt: str, encoder_dims: dict[str, int] | None, session: str | None = None) -> list[Concept]:
        """Concepts whose token occurs in `prompt` as a whole word, in order of first use.

        Costs one dict look-up per prompt word, whatever the library size. A used concept that does not fit the
        model raises ConceptMismatchError (never skipped silently).
        """
        with self._lock:
            self._refresh_if_stale()
            found: dict[str, Concept] = {}
            for word in _PROMPT_SEPARATORS.split(prompt):
                for candidate in (word, word.strip(_TRAILING_PUNCTUATION)):
                    if not candidate or candidate in found:
                        continue
                    concept = self._lookup(candidate, session)
                    if concept is not None:
                        if encoder_dims is not None:
                            where = concept.meta.get("source_path") or f"session concept {candidate!r}"
                            check_fits(concept, encoder_dims, where=where)
                        found[candidate] = concept
                        break
            return list(found.values())

    # ------------------------------------------------------------------------------------------------ writing

    def add_session_concept(self, session: str, concept: Concept) -> None:
        """Make `concept` usable by `session` only (e.g. a concept just trained); other sessions never see it."""
        with self._lock:
            self._sessions.setdefault(session, {})[concept.token] = concept

    def drop_session(self, session: str) -> None:
        """Forget a session's concepts (call when the session ends)."""
        with self._lock:
            self._sessions.pop(session, None)

    def save(self, concept: Concept, format: str = "studio") -> Path:
        """Write `concept` into the library folder as `<token>.safetensors` (or `.pt` for SD1/SD2 a1111)."""
        with self._lock:
            path = save_concept(concept, self.root / concept.token, format=format)
            self.refresh()
            return path

    def import_file(self, path: Path | str) -> LibraryEntry:
        """Copy a concept file into the library after checking that it reads; refuses to overwrite a file."""
        source = Path(path)
        if is_second_half(source):  # asked for x_2 of a diffusers SDXL pair: import the pair through x
            source = companion_of(source)
        concept = load_concept(source)  # validate first: a bad file never enters the library
        with self._lock:
            sources = [source] + _second_half(source, concept)
            for src in sources:
                if (self.root / src.name).exists():
                    raise ConceptError(f"{src.name} is already in the library; rename or delete that one first")
            for src in sources:
                _atomic_copy(src, self.root / src.name)
            self.refresh()
            return self._entry_for(self.root / sources[0].name)

    def rename(self, token: str, new_token: str, session: str | None = None) -> LibraryEntry:
        """Give a concept a new trigger word: rewrites the token stored inside and the file name."""
        with self._lock:
            self.refresh()
            if session is not None and token in self._sessions.get(session, {}):
                concept = self._sessions[session].pop(token)
                renamed = Concept(new_token, concept.vectors, dict(concept.meta))
                self._sessions[session][new_token] = renamed
                return LibraryEntry(None, new_token, renamed, True, "", session)
            old_path = self._by_token.get(token)
            if old_path is None:
                raise ConceptError(f"no concept file named {token!r} in the library")
            if new_token in self._by_token:
                raise ConceptError(f"{new_token!r} is already used by {self._by_token[new_token].name}; pick another name")
            concept = self._files[old_path].concept
            renamed = Concept(new_token, concept.vectors, dict(concept.meta))  # validates the new token
            new_path = old_path.with_name(new_token + old_path.suffix)
            fmt = _REWRITE_ON_RENAME.get(concept.meta.get("source_format", ""))
            old_files = [old_path] + _second_half(old_path, concept)
            if fmt is not None:
                save_concept(renamed, new_path, format=fmt)  # written atomically before the old one goes
                for old in old_files:
                    old.unlink()
            else:  # the token is only the file name (kohya, SDXL, PNG): a rename is the whole change
                os.replace(old_path, new_path)
            # A trainer's resume state names the old token, so it cannot continue the renamed concept.
            _training_state(old_path).unlink(missing_ok=True)
            self.refresh()
            return self._entry_for(new_path)

    def delete(self, token: str, session: str | None = None) -> None:
        """Remove a session concept, or delete the library file (both halves of a diffusers SDXL pair)."""
        with self._lock:
            if session is not None and token in self._sessions.get(session, {}):
                del self._sessions[session][token]
                return
            self.refresh()
            path = self._by_token.get(token)
            if path is None:
                raise ConceptError(f"no concept named {token!r} in the library")
            for file in [path] + _second_half(path, self._files[path].concept):
                file.unlink()
            _training_state(path).unlink(missing_ok=True)
            self.refresh()

    def _entry_for(self, path: Path) -> LibraryEntry:
        for entry in self.entries():
            if entry.path == path:
                return entry
        raise ConceptError(f"{path} did not appear in the library after writing it")


def _training_state(path: Path) -> Path:
    """The trainer's resume sidecar of a concept file, which goes with the file."""
    from studio.training.resume import state_path  # imported here: listing concepts need not load the trainer

    return state_path(path)


def _is_concept_file_name(name: str) -> bool:
    stem, suffix = os.path.splitext(name)
    suffix = suffix.lower()
    # A1111 keeps thumbnails as `<name>.preview.png` next to embeddings: pictures, not concepts.
    return suffix in READ_SUFFIXES and not (suffix in IMAGE_SUFFIXES and stem.lower().endswith(".preview"))


def _second_half(path: Path, concept: Concept) -> list[Path]:
    """`[x_2.safetensors]` when `concept` was read from a diffusers SDXL pair, else `[]`."""
    if concept.meta.get("source_format") == "diffusers" and "text_encoder_2" in concept.vectors:
        partner = companion_of(path)
        return [partner] if partner is not None else []
    return []


def _atomic_copy(source: Path, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
