"""Concept library: hot pick-up by each file's own stat, session isolation, unfit files listed, resolve, file ops."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from studio.engine.concepts import Concept, ConceptError, ConceptMismatchError, load_concept, save_concept
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
    library = ConceptLibrary(tmp_path)
    write_kohya(tmp_path / "alpha.safetensors")
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
    assert [c.token for c in library.resolve("a <mine> photo", SD1, session="session-a")] == ["<mine>"]
    assert library.resolve("a <mine> photo", SD1, session="session-b") == []
    assert library.resolve("a <mine> photo", SD1) == []
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
        return [c.token for c in library.resolve(prompt, SD1)]

    assert used("a photo of <cat-toy>, (bad-hands-5:1.2)") == ["<cat-toy>", "bad-hands-5"]
    assert used("a <cat-toy>. SD1.5-Hair! [style_x|dog]") == ["<cat-toy>", "SD1.5-Hair", "style_x"]
    assert used("bad-hands-55 <cat-toy>s xstyle_x cat-toy") == []
    assert used("<cat-toy> and <cat-toy> again") == ["<cat-toy>"]


def test_resolve_refuses_a_used_concept_that_does_not_fit(tmp_path):
    write_kohya(tmp_path / "old-sd1.safetensors")
    library = ConceptLibrary(tmp_path)
    assert library.resolve("a cat", SD2) == []  # unused: no error
    with pytest.raises(ConceptMismatchError, match=r"old-sd1\.safetensors.*SD 1\.x \(768-d\) but the model is SD 2\.x"):
        library.resolve("a cat, old-sd1", SD2)


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
            library.resolve(f"a <c{i}> photo", SD1)
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
