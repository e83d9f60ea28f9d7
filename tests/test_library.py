"""Concept library: hot pick-up by each file's own stat, session isolation, unfit files listed, resolve, file ops."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from studio.engine.learned.registry import load_concept, save_concept
from studio.engine.learned.word import Concept, ConceptError, ConceptMismatchError, check_fits
import studio.library
from studio.errors import LoraError, UserError
from studio.jobs.generation import request_for
from studio.library import ConceptLibrary

SD1 = {"text_encoder": 768}
SD2 = {"text_encoder": 1024}


def vectors(dim: int = 768, n: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def write_kohya(path: Path, dim: int = 768, n: int = 1, seed: int = 0) -> torch.Tensor:
    tensor = vectors(dim, n, seed)
    save_file({"emb_params": tensor}, path)
    return tensor


def freeze_folder_mtime(folder: Path, stat: os.stat_result) -> None:
    """Put the folder's times back, as on platforms where the folder mtime does not change (A1111's Windows bug)."""
    os.utime(folder, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_hot_pickup_of_add_change_remove_without_folder_mtime_change(tmp_path):
    """Guards the 'new embeddings need a restart' bug: pick-up follows each file's own stat, not the folder's."""
    root = tmp_path / "lib"
    library = ConceptLibrary(root)
    assert library.entries() == []
    folder_stat = root.stat()

    first = write_kohya(root / "alpha.safetensors", seed=1)
    freeze_folder_mtime(root, folder_stat)
    assert [e.token for e in library.entries()] == ["alpha"]
    assert torch.equal(library.get("alpha").vectors["text_encoder"], first)

    # Change the file's content in the same second, in place (same size), folder mtime held constant.
    second = write_kohya(root / "alpha.safetensors", seed=2)
    freeze_folder_mtime(root, folder_stat)
    assert root.stat().st_mtime_ns == folder_stat.st_mtime_ns
    library.refresh()
    assert torch.equal(library.get("alpha").vectors["text_encoder"], second)

    # Add in a sub-folder (recursive) and remove, again with the folder mtime frozen.
    (root / "styles").mkdir()
    write_kohya(root / "styles" / "beta.safetensors", n=2)
    (root / "alpha.safetensors").unlink()
    freeze_folder_mtime(root, folder_stat)
    assert [e.token for e in library.entries()] == ["beta"]
    with pytest.raises(ConceptError, match="no concept named 'alpha'"):
        library.get("alpha")


def test_unchanged_files_are_served_from_the_cache(tmp_path):
    # Written before the library (and its watch) starts: a write's events, delivered late on a busy machine after the
    # scan had read the file, would rightly make the next read re-read it, which is not what this test is about.
    write_kohya(tmp_path / "alpha.safetensors")
    library = ConceptLibrary(tmp_path)
    library.refresh()
    cached = library.get("alpha")
    library.refresh()
    assert library.get("alpha") is cached


def test_unfit_and_unreadable_files_are_listed_with_their_reason(tmp_path):
    """Guards 'embeddings skipped with no explanation': every file is listed; the unfit/broken say why."""
    write_kohya(tmp_path / "sd1-style.safetensors", dim=768)
    write_kohya(tmp_path / "sd2-style.safetensors", dim=1024, n=4)
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    (tmp_path / "readme.txt").write_text("ignored: not a concept file type")
    entries = {e.token: e for e in ConceptLibrary(tmp_path).entries(SD1)}
    assert sorted(entries) == ["broken", "sd1-style", "sd2-style"]
    assert entries["sd1-style"].fits and entries["sd1-style"].reason == ""
    assert not entries["sd2-style"].fits
    assert "trained for SD 2.x (1024-d) but the model is SD 1.x (768-d)" in entries["sd2-style"].reason
    assert not entries["broken"].fits and entries["broken"].concept is None
    assert "broken.pt: not a readable torch file" in entries["broken"].reason


def test_session_concepts_are_private_to_their_session(tmp_path):
    library = ConceptLibrary(tmp_path)
    mine = Concept("<mine>", {"text_encoder": vectors()})
    library.add_session_concept("session-a", mine)
    assert library.get("<mine>", session="session-a") is mine
    assert [c.token for c in library.resolve("a <mine> photo", session="session-a")] == ["<mine>"]
    assert library.resolve("a <mine> photo", session="session-b") == []
    assert library.resolve("a <mine> photo") == []
    assert [e.token for e in library.entries(SD1, session="session-b")] == []
    assert [(e.token, e.session) for e in library.entries(SD1, session="session-a")] == [("<mine>", "session-a")]
    with pytest.raises(ConceptError):
        library.get("<mine>", session="session-b")
    library.drop_session("session-a")
    with pytest.raises(ConceptError):
        library.get("<mine>", session="session-a")


def test_session_concept_overrides_a_library_file_for_that_session_only(tmp_path):
    on_disk = write_kohya(tmp_path / "<x>.safetensors", seed=1)
    library = ConceptLibrary(tmp_path)
    private = Concept("<x>", {"text_encoder": vectors(seed=2)})
    library.add_session_concept("a", private)
    assert library.get("<x>", session="a") is private
    assert torch.equal(library.get("<x>", session="b").vectors["text_encoder"], on_disk)


def test_resolve_matches_whole_words_only_including_punctuated_tokens(tmp_path):
    for token in ("<cat-toy>", "bad-hands-5", "SD1.5-Hair", "style_x"):
        write_kohya(tmp_path / f"{token}.safetensors")
    library = ConceptLibrary(tmp_path)

    def used(prompt: str) -> list[str]:
        return [c.token for c in library.resolve(prompt)]

    assert used("a photo of <cat-toy>, (bad-hands-5:1.2)") == ["<cat-toy>", "bad-hands-5"]
    assert used("a <cat-toy>. SD1.5-Hair! [style_x|dog]") == ["<cat-toy>", "SD1.5-Hair", "style_x"]
    assert used("bad-hands-55 <cat-toy>s xstyle_x cat-toy") == []
    assert used("<cat-toy> and <cat-toy> again") == ["<cat-toy>"]


def test_resolve_leaves_the_fit_check_to_the_encoder_and_keeps_the_file_for_its_message(tmp_path):
    """The fit is checked once per request, by the prompt encoder every request passes; what resolve returns still
    names its file, so that check's message says which file does not fit."""
    write_kohya(tmp_path / "old-sd1.safetensors")
    library = ConceptLibrary(tmp_path)
    assert library.resolve("a cat") == []
    found = library.resolve("a cat, old-sd1")
    assert [c.token for c in found] == ["old-sd1"]
    with pytest.raises(ConceptMismatchError, match=r"old-sd1\.safetensors.*SD 1\.x \(768-d\) but the model is SD 2\.x"):
        check_fits(found[0], SD2)


def test_resolve_and_the_encoder_find_concept_words_by_one_rule(tmp_path):
    """Guards against the library and the encoder disagreeing on what a concept word is (they had two rules: the
    library missed <cat-toy>'s and a/<cat-toy>, which the encoder would have placed)."""
    from studio.engine.prompts import PromptEncoder

    tokens_ = ("<cat-toy>", "bad-hands-5", "SD1.5-Hair", "style_x", "<a>", "<a>b")
    for token in tokens_:
        write_kohya(tmp_path / f"{token}.safetensors")
    library = ConceptLibrary(tmp_path)
    concepts = [library.get(t) for t in tokens_]
    for prompt in ("a photo of <cat-toy>'s toy, a/<cat-toy>", "<a>b <a>, <a><a> (<a>:1.2)", "'SD1.5-Hair'.style_x",
                   "bad-hands-55 <cat-toy>s xstyle_x cat-toy", "<cat-toy>.<cat-toy>!"):
        placed = [p.token for p in PromptEncoder._split(prompt, concepts) if isinstance(p, Concept)]
        assert [c.token for c in library.resolve(prompt)] == list(dict.fromkeys(placed)), prompt
    assert [c.token for c in library.resolve("<a>b <a>, <a><a>")] == ["<a>b", "<a>"]  # the longest word wins


def test_duplicate_tokens_resolve_deterministically_with_a_reason(tmp_path):
    (tmp_path / "sub").mkdir()
    top = write_kohya(tmp_path / "dup.safetensors", seed=1)
    write_kohya(tmp_path / "sub" / "dup.safetensors", seed=2)
    save_concept(Concept("dup", {"text_encoder": vectors(seed=3)}), tmp_path / "sub" / "dup.pt", format="a1111")
    library = ConceptLibrary(tmp_path)
    entries = library.entries(SD1)
    assert [e.fits for e in entries] == [True, False, False]
    assert entries[0].path == tmp_path / "dup.safetensors"
    assert all("also used by dup.safetensors" in e.reason for e in entries[1:])
    assert torch.equal(library.get("dup").vectors["text_encoder"], top)


def test_save_import_rename_delete(tmp_path, compat_dir):
    library = ConceptLibrary(tmp_path / "lib")
    saved = library.save(Concept("<new>", {"text_encoder": vectors(n=2)}, {"init_text": "cat"}))
    assert saved == tmp_path / "lib" / "new.safetensors"  # file-safe on every system; the word is inside
    assert library.get("<new>").meta["init_text"] == "cat"

    entry = library.import_file(compat_dir / "badhandv4.pt")
    assert entry.token == "badhandv4" and entry.path == tmp_path / "lib" / "badhandv4.pt" and entry.fits
    with pytest.raises(ConceptError, match="already in the library"):
        library.import_file(compat_dir / "badhandv4.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(ConceptError):
        library.import_file(tmp_path / "bad.safetensors")
    assert not (tmp_path / "lib" / "bad.safetensors").exists()

    original = library.get("badhandv4").vectors["text_encoder"]
    renamed = library.rename("badhandv4", "hands-neg")
    assert renamed.path == tmp_path / "lib" / "hands-neg.pt" and not (tmp_path / "lib" / "badhandv4.pt").exists()
    stored = torch.load(renamed.path, map_location="cpu", weights_only=True)
    assert stored["name"] == "hands-neg"  # the token written inside was rewritten too
    assert torch.equal(load_concept(renamed.path).vectors["text_encoder"], original)
    with pytest.raises(ConceptError, match="already used"):
        library.rename("hands-neg", "<new>")

    library.rename("<new>", "<newer>")
    assert load_concept(tmp_path / "lib" / "newer.safetensors").meta["token"] == "<newer>"

    library.delete("hands-neg")
    assert not renamed.path.exists()
    assert [e.token for e in library.entries()] == ["<newer>"]


def test_diffusers_sdxl_pair_is_one_entry_and_deletes_together(tmp_path):
    concept = Concept("<xl>", {"text_encoder": vectors(768, 2), "text_encoder_2": vectors(1280, 2)})
    save_concept(concept, tmp_path / "<xl>.safetensors", format="diffusers")
    library = ConceptLibrary(tmp_path)
    entries = library.entries({"text_encoder": 768, "text_encoder_2": 1280})
    assert [(e.token, e.fits) for e in entries] == [("<xl>", True)]
    library.delete("<xl>")
    assert list(tmp_path.iterdir()) == []


def test_concurrent_refresh_and_resolve_from_threads(tmp_path):
    """The lock keeps scans, resolves and writes from threads consistent (no exceptions, final state complete)."""
    library = ConceptLibrary(tmp_path, refresh_interval=0.0)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            library.save(Concept(f"<c{i}>", {"text_encoder": vectors(seed=i)}))
            library.resolve(f"a <c{i}> photo")
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(e.token for e in library.entries(SD1)) == sorted(f"<c{i}>" for i in range(8))


def test_files_named_x_and_x_2_that_are_not_an_sdxl_pair_are_both_listed(tmp_path):
    save_file({"<tok>": vectors(seed=1)}, tmp_path / "style.safetensors")
    save_file({"<tok>": vectors(seed=2)}, tmp_path / "style_2.safetensors")
    write_kohya(tmp_path / "neg.safetensors")
    write_kohya(tmp_path / "neg_2.safetensors")
    assert [e.token for e in ConceptLibrary(tmp_path).entries(SD1)] == ["neg", "neg_2", "style", "style_2"]


def test_a1111_preview_thumbnails_are_not_listed_but_other_pictures_are_explained(tmp_path):
    from PIL import Image

    write_kohya(tmp_path / "style.safetensors")
    Image.new("RGB", (4, 4)).save(tmp_path / "style.preview.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "holiday.png")
    entries = {e.token: e for e in ConceptLibrary(tmp_path).entries(SD1)}
    assert sorted(entries) == ["holiday", "style"]
    assert not entries["holiday"].fits and "no 'sd-ti-embedding' text chunk" in entries["holiday"].reason


def test_trainer_resume_sidecar_goes_with_its_concept_on_rename_and_delete(tmp_path):
    """Guards leftovers: a `<file>.trainstate` (the trainer's resume state) is not a concept, is never listed, and
    is removed with its concept, and on rename too (it names the old token, so it could not resume the new one)."""
    library = ConceptLibrary(tmp_path / "lib")
    first = library.save(Concept("<a>", {"text_encoder": vectors()}, {}))
    second = library.save(Concept("<b>", {"text_encoder": vectors(seed=1)}, {}))
    for path in (first, second):
        path.with_name(path.name + ".trainstate").write_bytes(b"state")
    assert sorted(e.token for e in library.entries()) == ["<a>", "<b>"]
    library.rename("<a>", "<c>")
    library.delete("<b>")
    assert sorted(p.name for p in (tmp_path / "lib").iterdir()) == ["c.safetensors"]


# ---------------------------------------------------------------------------------------------- file-system events


def after_events(library: ConceptLibrary, check, timeout: float = 10.0):
    """`check()`, tried again after each change the watcher records until it passes: the test waits on events, never
    on a blind sleep; `timeout` only bounds a failure. Returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        seen = library.changes_seen  # taken before the check: a change recorded during it ends the wait at once
        result = check()
        if result or not library.wait_for_change(seen, deadline - time.monotonic()):
            return result


def assert_cache_matches_a_full_scan(library: ConceptLibrary) -> None:
    """What the events built is what a full rescan of the folder would find: the same files, with the same stamps."""
    assert {path: cached.stamp for path, cached in library._files.items()} == library._scan()


def tokens(library: ConceptLibrary, prompt: str) -> list[str]:
    return [c.token for c in library.resolve(prompt)]


# watchdog notes that it watched a folder of a `mkdir -p` twice (once by its walk, once by the folder's own event).
@pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")
def test_events_pick_up_add_change_remove_without_refresh_or_poll(tmp_path):
    """Guards the rescan on (nearly) every request: with the poll off (refresh_interval=inf) only the file-system
    events can explain what resolve sees, including rewrites in place of the same size, atomic os.replace writes
    of `.<name>.<random>.tmp` files and sub-folders, with the folder's mtime held still (A1111's Windows bug)."""
    root = tmp_path / "lib"
    library = ConceptLibrary(root, refresh_interval=float("inf"))
    assert library.watching, library.watch_error
    assert tokens(library, "alpha") == []  # the first scan
    folder_stat = root.stat()

    def alpha_is(expected: torch.Tensor) -> bool:
        found = library.resolve("a photo of alpha")
        return bool(found) and torch.equal(found[0].vectors["text_encoder"], expected)

    first = write_kohya(root / "alpha.safetensors", seed=1)
    freeze_folder_mtime(root, folder_stat)
    assert after_events(library, lambda: alpha_is(first))

    second = write_kohya(root / "alpha.safetensors", seed=2)  # in place, same size
    freeze_folder_mtime(root, folder_stat)
    assert after_events(library, lambda: alpha_is(second))

    third = vectors(seed=3)
    save_concept(Concept("alpha", {"text_encoder": third}), root / "alpha.safetensors")  # temp file + os.replace
    assert after_events(library, lambda: alpha_is(third))
    assert_cache_matches_a_full_scan(library)

    (root / "styles" / "ink").mkdir(parents=True)
    write_kohya(root / "styles" / "ink" / "beta.safetensors", n=2)
    freeze_folder_mtime(root, folder_stat)
    assert after_events(library, lambda: tokens(library, "alpha beta") == ["alpha", "beta"])

    def beta_path() -> str | None:
        found = library.resolve("beta")
        return found[0].meta["source_path"] if found else None

    os.replace(root / "styles", root / "looks")  # a folder moved: its files move with it
    assert after_events(library, lambda: beta_path() == str(root / "looks" / "ink" / "beta.safetensors"))
    assert_cache_matches_a_full_scan(library)

    (root / "alpha.safetensors").unlink()
    freeze_folder_mtime(root, folder_stat)
    assert after_events(library, lambda: tokens(library, "alpha beta") == ["beta"])
    shutil.rmtree(root / "looks")
    assert after_events(library, lambda: tokens(library, "alpha beta") == [])
    assert_cache_matches_a_full_scan(library)
    library.close()


def test_events_list_a_diffusers_sdxl_pair_once(tmp_path):
    """The two halves arrive as two events; x's entry carries x_2's stamp and x_2 is never listed on its own."""
    with ConceptLibrary(tmp_path, refresh_interval=float("inf")) as library:
        assert library.resolve("<xl>") == []
        concept = Concept("<xl>", {"text_encoder": vectors(768, 2), "text_encoder_2": vectors(1280, 2)})
        save_concept(concept, tmp_path / "<xl>.safetensors", format="diffusers")
        paths = {tmp_path / "<xl>.safetensors", tmp_path / "<xl>_2.safetensors"}

        def listed_as_a_pair() -> bool:
            found = library.resolve("<xl>")  # no fit check: the first half alone is seen before the second
            return bool(found) and "text_encoder_2" in found[0].vectors

        assert after_events(library, listed_as_a_pair)
        assert set(library._files) == {tmp_path / "<xl>.safetensors"}
        assert [c.token for c in library.resolve("<xl>")] == ["<xl>"]
        assert_cache_matches_a_full_scan(library)
        for path in paths:
            path.unlink()
        assert after_events(library, lambda: library.resolve("<xl>") == [])
        assert_cache_matches_a_full_scan(library)


def test_resolve_makes_no_file_system_call_when_nothing_changed(tmp_path, monkeypatch):
    """Guards the per-request cost (14-18 ms at 1,000 files, 56-84 ms at 5,000 when it rescanned): with no pending
    event, resolve and get are dictionary look-ups, even with the poll interval at zero."""
    for k in range(20):
        write_kohya(tmp_path / f"c{k}.safetensors", seed=k)
    library = ConceptLibrary(tmp_path, refresh_interval=0.0)
    assert library.watching, library.watch_error
    assert tokens(library, "c1") == ["c1"]  # the first scan

    calls = []
    me = threading.get_ident()

    def counted(name, real):
        def wrapper(*args, **kwargs):
            if threading.get_ident() == me:  # this thread's calls: the watcher's own threads make none of its reads
                calls.append(name)
            return real(*args, **kwargs)
        return wrapper

    for name in ("stat", "lstat", "scandir", "listdir"):
        monkeypatch.setattr(os, name, counted(f"os.{name}", getattr(os, name)))
    monkeypatch.setattr("builtins.open", counted("open", open))
    monkeypatch.setattr(ConceptLibrary, "_scan", counted("_scan", ConceptLibrary._scan))
    monkeypatch.setattr(studio.library, "load_concept", counted("load_concept", studio.library.load_concept))
    for _ in range(3):
        assert tokens(library, "a c1 and c7, c19.") == ["c1", "c7", "c19"]
        assert library.get("c3").token == "c3"
    assert calls == []


def test_a_change_re_reads_only_that_file(tmp_path, monkeypatch):
    """An event costs a stat and a read of the file it names, not a rescan of the library."""
    for k in range(20):
        write_kohya(tmp_path / f"c{k}.safetensors", seed=k)
    library = ConceptLibrary(tmp_path, refresh_interval=float("inf"))
    assert tokens(library, "c5") == ["c5"]  # the first scan
    loads = []
    real_read = studio.library.read_learned
    monkeypatch.setattr(studio.library, "read_learned", lambda path, *a, **k: loads.append(path) or real_read(path, *a, **k))

    def no_rescan(*args, **kwargs):
        raise AssertionError("the library rescanned its folder for a change of one file")

    monkeypatch.setattr(ConceptLibrary, "_scan", no_rescan)
    changed = write_kohya(tmp_path / "c5.safetensors", seed=99)
    assert after_events(library, lambda: torch.equal(library.resolve("c5")[0].vectors["text_encoder"], changed))
    assert set(loads) == {tmp_path / "c5.safetensors"}
    library.close()


def test_events_reach_a_library_whose_folder_is_a_symlink(tmp_path):
    """Guards a silent loss of every event: a watch on the link itself (watchdog's default) reports nothing, so the
    library watches the folder the link points to and names the files by the link, as its scan does."""
    (tmp_path / "real").mkdir()
    (tmp_path / "concepts").symlink_to(tmp_path / "real")
    with ConceptLibrary(tmp_path / "concepts", refresh_interval=float("inf")) as library:
        assert tokens(library, "alpha") == []
        write_kohya(tmp_path / "real" / "alpha.safetensors")
        assert after_events(library, lambda: tokens(library, "alpha") == ["alpha"])
        assert_cache_matches_a_full_scan(library)


def test_close_stops_the_watcher_and_reads_fall_back_to_the_scan(tmp_path):
    before = set(threading.enumerate())
    with ConceptLibrary(tmp_path, refresh_interval=0.0) as library:
        assert library.watching, library.watch_error
        started = set(threading.enumerate()) - before
        assert started and all(thread.daemon for thread in started)  # none can keep the interpreter from exiting
    assert not library.watching and library.watch_error == "closed"
    assert not any(thread.is_alive() for thread in started)
    write_kohya(tmp_path / "late.safetensors")
    assert tokens(library, "late") == ["late"]  # found by the periodic scan now
    library.close()  # a second close does nothing more


def test_removing_the_library_folder_ends_the_watch_and_the_scan_takes_over(tmp_path):
    root = tmp_path / "lib"
    library = ConceptLibrary(root, refresh_interval=0.0)
    write_kohya(root / "a.safetensors")
    assert after_events(library, lambda: tokens(library, "a") == ["a"])
    shutil.rmtree(root)
    assert after_events(library, lambda: tokens(library, "a") == [] and not library.watching)
    assert "removed" in library.watch_error
    root.mkdir()
    write_kohya(root / "b.safetensors")
    assert tokens(library, "b") == ["b"]


@pytest.mark.parametrize("why", ["limit reached", "no events on this platform"])
def test_falls_back_to_the_periodic_scan_where_events_cannot_be_had(tmp_path, monkeypatch, why):
    """Guards a library that would stop picking up files where the observer cannot start (inotify's limits are
    shared by all of a user's processes) or the platform has no events: the periodic scan takes over, and says so."""
    import watchdog.observers
    from watchdog.observers.polling import PollingObserver

    if why == "limit reached":
        def refuse(self):
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        monkeypatch.setattr(watchdog.observers.Observer, "start", refuse)
        expected = "inotify watch limit reached"
    else:
        monkeypatch.setattr(watchdog.observers, "Observer", PollingObserver)
        expected = "no file-system events here, only its PollingObserver"
    before = set(threading.enumerate())
    library = ConceptLibrary(tmp_path, refresh_interval=0.0)
    assert not library.watching and expected in library.watch_error
    assert [thread for thread in set(threading.enumerate()) - before if thread.is_alive()] == []
    assert tokens(library, "new") == []
    write_kohya(tmp_path / "new.safetensors")
    assert tokens(library, "new") == ["new"]
    library.close()  # nothing to stop


# ----------------------------------------------------------------------------------------------------- LoRA files

SD1_MODEL = dict(encoder_dims=SD1, model_name="tiny-sd1")


def write_lora(path: Path, cross_width: int, *, rank: int = 4, seed: int = 0,
               words: dict[str, torch.Tensor] | None = None) -> Path:
    """A LoRA file in diffusers' form (the keys `save_lora_weights` writes: `unet.<module>.lora_A/B.weight`) on one
    cross-attention block, whose to_k and to_v read the prompt embeddings: their input width, `cross_width`, names
    the family (SD1 768, SDXL 2048). Written beside the folder and moved in at once, as a finished download lands.
    `words`: A1111 bundled words (`bundle_emb.<word>.string_to_param.*`) in the same file. Written with safetensors
    alone, so these tests need no diffusers import; tests/engine/test_lora_files.py reads diffusers' own files."""
    generator = torch.Generator().manual_seed(seed)
    block = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    tensors = {}
    for proj in ("to_k", "to_v"):
        tensors[f"{block}.{proj}.lora_A.weight"] = torch.randn(rank, cross_width, generator=generator)
        tensors[f"{block}.{proj}.lora_B.weight"] = torch.randn(640, rank, generator=generator)
    tensors.update({f"bundle_emb.{word}.string_to_param.*": v for word, v in (words or {}).items()})
    staging = path.parent.parent / f".staging-{path.name}"
    save_file(tensors, staging, metadata={"format": "pt"})
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, path)
    return path


def test_lora_files_dropped_into_the_folder_are_listed_with_kind_rank_and_why_they_do_not_fit(tmp_path):
    """Guards the listing of LoRA files beside embeddings: picked up by the folder's events (no restart, no poll),
    one entry per file (a bundled word+LoRA file too), and an SDXL LoRA against an SD1 model says why it does not
    fit with the reason a request would give."""
    root = tmp_path / "lib"
    library = ConceptLibrary(root, refresh_interval=float("inf"))
    assert library.watching, library.watch_error
    write_kohya(root / "cat.safetensors")
    assert [e.token for e in library.entries(**SD1_MODEL)] == ["cat"]  # the first scan

    write_lora(root / "ink.safetensors", 768, rank=8)
    write_lora(root / "xl-style.safetensors", 2048)
    write_lora(root / "toy.safetensors", 768, words={"<toy>": vectors(768, n=2)})

    def listed() -> dict:
        return {e.token: e for e in library.entries(**SD1_MODEL)}

    assert after_events(library, lambda: set(listed()) == {"cat", "ink", "xl-style", "toy"}), list(listed())
    entries = listed()
    assert (entries["cat"].kind, entries["ink"].kind, entries["toy"].kind) == ("word", "lora", "word+lora")
    assert entries["ink"].lora.rank == 8 and entries["toy"].lora.rank == 4 and entries["ink"].lora.size_bytes > 0
    assert entries["ink"].fits and entries["toy"].fits and entries["ink"].reason == ""
    assert [w.token for w in entries["toy"].lora.words] == ["<toy>"]  # its word is in its entry, not one of its own
    assert not entries["xl-style"].fits
    # The reason a request would give (`check_loras_fit`), naming the file, its family and the model's.
    assert entries["xl-style"].reason.startswith("xl-style.safetensors: a LoRA for sdxl, but the model tiny-sd1 is sd1")
    assert entries["ink"].prompt_text == "<lora:ink:1>" and entries["cat"].prompt_text == "cat"
    assert_cache_matches_a_full_scan(library)

    (root / "ink.safetensors").unlink()
    assert after_events(library, lambda: "ink" not in listed())
    library.close()


def test_a_bundled_word_of_the_wrong_width_makes_its_lora_not_fit(tmp_path):
    write_lora(tmp_path / "lib" / "toy.safetensors", 768, words={"<toy>": vectors(1024)})
    entry, = ConceptLibrary(tmp_path / "lib", watch=False).entries(**SD1_MODEL)
    assert not entry.fits and "bundled word '<toy>'" in entry.reason and "1024" in entry.reason


def test_a_diffusers_pivotal_pair_is_one_entry(tmp_path):
    root = tmp_path / "lib"
    write_lora(root / "pet.safetensors", 2048)
    save_file({"clip_l": vectors(768, n=2), "clip_g": vectors(1280, n=2)}, root / "pet_emb.safetensors")
    library = ConceptLibrary(root, watch=False)
    entry, = library.entries({"text_encoder": 768, "text_encoder_2": 1280})
    assert (entry.token, entry.kind, entry.fits) == ("pet", "word+lora", True), entry.reason
    assert [w.token for w in entry.lora.words] == ["<s0><s1>"]
    library.delete("pet")
    assert list(root.iterdir()) == []  # both files of the pair


def test_resolve_finds_lora_tags_with_weights_after_the_words(tmp_path):
    """Guards `<lora:name:w>` in a prompt: the name is the file's stem (A1111), the weight optional (1.0), a word
    inside a tag is no concept word, and a tag naming no LoRA is one clear line rather than a prompt word."""
    root = tmp_path / "lib"
    ink = write_lora(root / "ink.safetensors", 768)
    write_kohya(root / "cat.safetensors")
    library = ConceptLibrary(root, watch=False)
    with pytest.raises(LoraError) as error:
        library.resolve("a cat <lora:cat>")  # `cat` is a word here, not a LoRA
    message = str(error.value)
    assert "<lora:cat> names no LoRA file in the library or this session (LoRAs here: ink)" in message
    assert "\n" not in message and isinstance(error.value, UserError)

    words_and_loras = library.resolve("a photo of <lora:ink:0.6> a cat <lora:ink>")
    assert words_and_loras[0].token == "cat"
    assert [(lora.path, w) for lora, w in words_and_loras[1:]] == [(ink, 0.6), (ink, 1.0)]

    (root / "words").mkdir()
    write_kohya(root / "words" / "ink.safetensors")  # a word called as the LoRA is: the two are apart
    library.refresh()  # not watching: the periodic scan would see it only after refresh_interval
    (lora, weight), = library.resolve("<lora:ink> a dog")  # the name inside the tag is no concept word
    assert lora.path == ink and weight == 1.0
    word, (lora, _) = library.resolve("an ink drawing <lora:ink>")
    assert word.token == "ink" and lora.path == ink


def test_a_session_lora_is_that_sessions_only(tmp_path):
    write_lora(tmp_path / "upload" / "mine.safetensors", 768)
    library = ConceptLibrary(tmp_path / "lib", watch=False, sessions_dir=tmp_path / "sessions")
    added = library.add_session_lora("browser-aaaaaaaa", tmp_path / "upload" / "mine.safetensors")
    assert added.path.is_relative_to(tmp_path / "sessions")  # kept beyond the upload
    (lora, weight), = library.resolve("<lora:mine:0.5> a cat", session="browser-aaaaaaaa")
    assert lora is added and weight == 0.5
    with pytest.raises(LoraError, match="names no LoRA"):
        library.resolve("<lora:mine:0.5> a cat", session="browser-bbbbbbbb")
    again = ConceptLibrary(tmp_path / "lib", watch=False, sessions_dir=tmp_path / "sessions")  # a restart
    assert [e.kind for e in again.entries(session="browser-aaaaaaaa")] == ["lora"]
    again.delete("mine", session="browser-aaaaaaaa")
    assert not added.path.exists() and again.entries(session="browser-aaaaaaaa") == []


def test_request_for_carries_the_loras_of_the_prompt_with_their_weights(tmp_path):
    """Guards the way from a UI form to the engine: the request names the prompt's LoRAs with the tags' weights (and
    a bundled word with its LoRA), while a tag in the negative prompt, where `generate` reads none, is refused."""
    root = tmp_path / "lib"
    write_lora(root / "ink.safetensors", 768)
    write_kohya(root / "cat.safetensors")
    write_lora(root / "toy.safetensors", 768, words={"<toy>": vectors(768)})
    library = ConceptLibrary(root, watch=False)
    fields = dict(prompt="a <toy> cat <lora:ink:0.6> <lora:toy:0.3>", negative_prompt="blurry <nothing>", seed=1)
    req, unknown = request_for(fields, library, "s")
    assert [(lora.name, weight) for lora, weight in req.loras] == [("ink", 0.6), ("toy", 0.3)]
    assert [c.token for c in req.words] == ["<toy>", "cat"]  # the bundled word is a word of the prompt
    assert unknown == ["<nothing>"]
    req, _ = request_for(dict(prompt="a cat", negative_prompt=""), library, "s")
    assert req.loras == [] and [c.token for c in req.words] == ["cat"]
    with pytest.raises(LoraError, match="negative prompt"):
        request_for(dict(prompt="a cat", negative_prompt="<lora:ink:1>"), library, "s")
