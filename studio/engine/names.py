"""Words and the file names made from them: the one place that turns a user's word into a path.

A concept's word is whatever the user typed (`<my-cat>`, `../../evil`, `CON`, 300 characters, unicode). Every writer
(the library, the trainer, exports, session folders) names its files through `file_stem` and checks the result
with `inside`, so no word can leave its folder, clash with a Windows device name or exceed a file system's limits.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from studio.errors import UserError

# A word is one prompt word; longer than this is no trigger word anyone types (CLIP's whole window is 77 tokens).
MAX_WORD_CHARS = 100
# File names: 255 bytes on ext4/NTFS/APFS; the stem leaves room for "-step12345", "_2", ".safetensors.trainstate".
MAX_STEM_BYTES = 120
# Windows refuses these as file names, with or without an extension (CON.safetensors is the console).
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
# A written file's mode: what open() gives under the usual umask 022 (tempfile.mkstemp alone makes 0600, which
# hides a shared library's files from the other accounts that serve it).
FILE_MODE = 0o644
# What a file name stem may hold: letters and digits of any script, - and _; everything else becomes "_" (dots too:
# a stem with a dot would read as a name plus a suffix, and "." / ".." are folders).
_NOT_FILE_SAFE = re.compile(r"[^\w\-]+")


class WordError(UserError):
    """A word or name that cannot be used; the message says what to type instead."""


def check_word(word: str, what: str = "word") -> str:
    """`word` if it can be a concept's trigger word (one prompt word, printable, at most MAX_WORD_CHARS); else
    WordError naming what is wrong with it."""
    if not isinstance(word, str) or not word:
        raise WordError(f"the {what} is empty: type one word, like <my-cat>")
    if any(ch.isspace() for ch in word):
        raise WordError(f"the {what} {word!r} has spaces: a {what} is one word, like <my-cat>")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in word):
        raise WordError(f"the {what} {word!r} holds control or invisible characters: type it again without them")
    if len(word) > MAX_WORD_CHARS:
        raise WordError(f"the {what} is {len(word)} characters long: use at most {MAX_WORD_CHARS}")
    return word


def file_stem(word: str, fallback: str = "concept") -> str:
    """A file name stem for `word` that is safe in any folder on Linux, macOS and Windows.

    `<my-cat>` -> `my-cat`; `../../evil` -> `evil`; `a/b` -> `a_b`; `CON` -> `_CON`; `v1.5` -> `v1_5`; unicode letters are kept;
    empty or nothing left -> `fallback`. The same word always gives the same stem.
    """
    text = unicodedata.normalize("NFC", str(word)).strip().strip("<>")
    text = _NOT_FILE_SAFE.sub("_", text).strip("_-")
    while len(text.encode("utf-8")) > MAX_STEM_BYTES:
        text = text[:-1]
    text = text.rstrip("_-") or fallback
    if text.lower() in _WINDOWS_DEVICES:
        text = "_" + text
    return text


def inside(folder: Path | str, name: str) -> Path:
    """`folder / name`, refused (WordError) unless it resolves to a path inside `folder` (symlinks followed)."""
    root = Path(folder).resolve()
    path = (root / name).resolve()
    if path == root or root not in path.parents:
        raise WordError(f"{name!r} would be written outside {root}; choose a plain name")
    return path


def session_key(value: object) -> str | None:
    """`value` when it is a session id this studio could have made (letters, digits, - and _, 8-64 long), else None:
    a session id picks a folder, so one read from a browser is never trusted as a path."""
    text = str(value or "")
    return text if re.fullmatch(r"[A-Za-z0-9_-]{8,64}", text) else None
