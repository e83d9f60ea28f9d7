"""Safe to share: no word a user types can write outside its folder, replace another user's file, or lose a concept.

Guards the bugs found by trying the studio as a hostile user would: a concept trained as `../../evil` and saved to
the shared library was written outside it; two users saving the same word silently replaced one another; a failed
rename deleted the concept; a page reload lost every session concept.
"""

from __future__ import annotations

import os
import stat
import time

import pytest
import torch

from studio.engine.files import remove_temp_leftovers
from studio.engine.learned.registry import load_concept, save_concept
from studio.engine.learned.word import Concept, ConceptError
from studio.engine.names import MAX_WORD_CHARS, WordError, check_word, file_stem, inside
from studio.library import STALE_TEMP_S, ConceptExistsError, ConceptLibrary

HOSTILE = ["..", "../../x", "/abs", "/etc/passwd", "a/b", "a\\b", "CON", "con.txt", "LPT1", "x" * 300, "a\x00b",
           "ünï-кот-🐱", "two words", "", ".", ".hidden", "<..>", "<../../evil>", "~", "a:b*c?d|e\"f", " <pad> "]


def concept(token: str, seed: int = 0) -> Concept:
    return Concept(token, {"text_encoder": torch.randn(1, 768, generator=torch.Generator().manual_seed(seed))}, {})


@pytest.mark.parametrize("word", HOSTILE)
def test_every_file_stem_stays_in_its_folder_and_is_safe_on_windows(tmp_path, word):
    stem = file_stem(word)
    assert stem and len(stem.encode()) <= 120
    assert not set(stem) & set('/\\:*?"<>|\x00') and not stem.startswith(".")
    assert stem.split(".")[0].lower() not in {"con", "prn", "aux", "nul", "lpt1"}
    path = inside(tmp_path, stem + ".safetensors")
    assert path.parent == tmp_path.resolve()
    path.write_bytes(b"x")  # the file system takes it


def test_inside_refuses_what_would_leave_the_folder(tmp_path):
    for name in ("../x", "/abs/x", "a/../../x", "."):
        with pytest.raises(WordError, match="outside"):
            inside(tmp_path, name)
    os.symlink(tmp_path.parent, tmp_path / "link")
    with pytest.raises(WordError, match="outside"):
        inside(tmp_path, "link/escape.safetensors")


def test_words_are_checked_with_a_message_that_says_what_to_do():
    assert check_word("<my-cat>") == "<my-cat>"
    for word, why in (("", "empty"), ("two words", "spaces"), ("a\x00b", "control"),
                      ("x" * (MAX_WORD_CHARS + 1), f"at most {MAX_WORD_CHARS}")):
        with pytest.raises(WordError, match=why):
            check_word(word)


@pytest.mark.parametrize("word", [w for w in HOSTILE if w.strip() and " " not in w.strip() and "\x00" not in w
                                  and len(w) <= MAX_WORD_CHARS])
def test_saving_any_word_to_the_shared_library_writes_inside_it(tmp_path, word):
    """Guards the path traversal: `../../evil` was written to concepts/../../evil.safetensors."""
    root = tmp_path / "lib" / "concepts"
    library = ConceptLibrary(root)
    path = library.save(concept(word.strip()))
    assert path.resolve().parent == root.resolve()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [path.name]
    assert library.get(word.strip()).token == word.strip()  # the word itself survives in the file


def test_a_second_save_of_the_same_word_is_refused_unless_told(tmp_path):
    """Guards the silent overwrite: the second user's save replaced the first one's file."""
    library = ConceptLibrary(tmp_path)
    first = library.save(concept("<zz>", seed=1))
    before = first.read_bytes()
    with pytest.raises(ConceptExistsError, match=r"'<zz>' is already in the shared library \(zz.safetensors\)"):
        library.save(concept("<zz>", seed=2))
    assert first.read_bytes() == before
    # Same file stem from another word (<zz> and zz): also refused, not replaced.
    with pytest.raises(ConceptExistsError):
        library.save(concept("zz", seed=3))
    both = library.save(concept("<zz>", seed=4), if_taken="keep both")
    assert both.name == "zz-2.safetensors" and load_concept(both).token == "<zz-2>"
    assert first.read_bytes() == before
    replaced = library.save(concept("<zz>", seed=5), if_taken="replace")
    assert replaced == first and torch.equal(library.get("<zz>").vectors["text_encoder"],
                                             concept("<zz>", seed=5).vectors["text_encoder"])


@pytest.mark.parametrize("bad", ["two words", "", "a\x00b", "x" * 300])
def test_a_failed_rename_keeps_the_concept(tmp_path, bad):
    """Guards 'renaming a session concept to `two words` or "" shows an error and the concept is gone'."""
    library = ConceptLibrary(tmp_path / "lib", sessions_dir=tmp_path / "sessions")
    session = "browser-session-1"
    library.add_session_concept(session, concept("<mine>"))
    library.save(concept("<shared>"))
    for token, where in (("<mine>", session), ("<shared>", None)):
        with pytest.raises(ValueError):
            library.rename(token, bad, where)
        assert library.get(token, session).token == token
    library.add_session_concept(session, concept("<other>", seed=2))
    with pytest.raises(ConceptError, match="already has"):
        library.rename("<mine>", "<other>", session)
    assert {e.token for e in library.entries(session=session)} == {"<mine>", "<other>", "<shared>"}


def test_session_concepts_outlive_a_new_library_object_and_stay_private(tmp_path):
    """Guards 'a page reload drops every concept': a session's concepts are on disk and read back by its id only."""
    sessions = tmp_path / "sessions"
    library = ConceptLibrary(tmp_path / "lib", sessions_dir=sessions)
    library.add_session_concept("browser-aaaaaaaa", concept("<mine>", seed=7))
    library.add_session_concept("browser-aaaaaaaa", concept("<tmp>"))
    library.rename("<tmp>", "<kept>", "browser-aaaaaaaa")
    library.drop_session("browser-aaaaaaaa")  # the page closed: memory freed, files stay
    again = ConceptLibrary(tmp_path / "lib", sessions_dir=sessions)  # a restarted server
    assert sorted(e.token for e in again.entries(session="browser-aaaaaaaa")) == ["<kept>", "<mine>"]
    assert torch.equal(again.get("<mine>", "browser-aaaaaaaa").vectors["text_encoder"],
                       concept("<mine>", seed=7).vectors["text_encoder"])
    assert again.entries(session="browser-bbbbbbbb") == []
    with pytest.raises(ConceptError):
        again.get("<mine>", "browser-bbbbbbbb")
    # A session id that is a path is never a folder.
    again.add_session_concept("../../escape", concept("<x>"))
    assert sorted(p.name for p in sessions.iterdir()) == ["browser-aaaaaaaa"]
    # Unused for longer than the expiry: gone, files and all.
    old = time.time() - 10 * 86400
    os.utime(sessions / "browser-aaaaaaaa", (old, old))
    assert again.expire_sessions(7 * 86400) == ["browser-aaaaaaaa"]
    assert not (sessions / "browser-aaaaaaaa").exists()


def test_imports_of_the_same_word_keep_both(tmp_path):
    """Guards 'importing two diffusers learned_embeds.bin files names both learned_embeds, the second replacing
    the first': the word stored inside names each, and a clash in a session keeps both."""
    library = ConceptLibrary(tmp_path / "lib")
    for k, token in enumerate(("<cat-toy>", "<dog-toy>")):
        folder = tmp_path / f"run{k}"
        folder.mkdir()
        torch.save({token: torch.randn(768)}, folder / "learned_embeds.bin")
        library.add_session_concept("s", load_concept(folder / "learned_embeds.bin"), if_taken="keep both")
    added = library.add_session_concept("s", concept("<cat-toy>"), if_taken="keep both")
    assert added.token == "<cat-toy-2>"
    assert sorted(e.token for e in library.entries(session="s")) == ["<cat-toy-2>", "<cat-toy>", "<dog-toy>"]


def test_an_a1111_export_of_a_bracketed_word_reimports_as_that_word(tmp_path):
    path = save_concept(concept("<zz>"), tmp_path / file_stem("<zz>"), format="a1111")
    assert path.name == "zz.pt" and load_concept(path).token == "<zz>"


def test_written_files_are_readable_by_others_and_stale_temp_files_are_cleaned(tmp_path):
    """Guards concept files written 0600 (mkstemp's mode) and `.tmp` files a kill left behind forever."""
    library = ConceptLibrary(tmp_path / "lib")
    path = library.save(concept("<a>"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    stale, fresh = tmp_path / "lib" / ".b.safetensors.x1.tmp", tmp_path / "lib" / ".c.safetensors.x2.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert remove_temp_leftovers(tmp_path / "lib", older_than_s=STALE_TEMP_S) == [stale]
    assert fresh.exists() and not stale.exists()
    ConceptLibrary(tmp_path / "lib")  # a library opened later cleans up too
    assert fresh.exists()
