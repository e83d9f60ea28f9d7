"""The shared library keeps listing whatever one user drops into its folder (issue 23, item 4).

Guards: `ln -s . loop` in the concepts folder, a PNG embedding of deeply nested JSON (RecursionError), a PNG whose
header claims 20000x20000 pixels (DecompressionBombError), a 100 GB (sparse) safetensors file and a zip bomb made
`/library` (`ConceptLibrary.entries`) fail for every user. Now each such file is one entry that does not fit, with its
reason; a link that loops or leaves the library folder is not followed, is listed once and logged once; the other
concepts are listed and resolve as before. The files are made in the test (tests/hostile_files.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hostile_files
from studio.engine.learned.word import ConceptError
from studio.errors import UserError
from studio.library import ConceptLibrary

DEMO = {"text_encoder": 128}  # the demo model's encoder width


def write_word(path: Path, seed: int = 0) -> Path:
    save_file({"emb_params": torch.randn(1, 128, generator=torch.Generator().manual_seed(seed))}, path)
    return path


@pytest.fixture
def hostile_folder(tmp_path) -> Path:
    """A library folder with one good word and everything a stranger could drop beside it."""
    root = tmp_path / "concepts"
    root.mkdir()
    write_word(root / "good.safetensors")
    hostile_files.nested_json_png(root / "nested.png")
    hostile_files.pixel_bomb_png(root / "pixels.png")
    hostile_files.sparse_safetensors(root / "huge.safetensors")
    hostile_files.lying_safetensors(root / "liar.safetensors")
    hostile_files.zip_bomb_pt(root / "bomb.pt", megabytes=64)
    os.symlink(".", root / "loop")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    write_word(outside / "secret.safetensors", seed=1)
    os.symlink(outside / "secret.safetensors", root / "secret.safetensors")
    os.symlink(outside, root / "away")
    return root


UNREADABLE = {  # entry path -> what its reason says
    "nested.png": "nested 50000 deep",
    "pixels.png": "too many pixels",
    "huge.safetensors": "the file is 100.0 GB",
    "liar.safetensors": "claims bytes 0-107374182400",
    "bomb.pt": "zip bomb",
    "loop": "a symbolic link back to a folder it is in (a loop); not followed",
    "secret.safetensors": "a symbolic link to a file outside the library folder; not followed",
    "away": "a symbolic link to a folder outside the library folder; not followed",
}


@pytest.mark.parametrize("watch", [True, False], ids=["watching", "scanning"])
def test_the_library_keeps_listing_with_a_loop_hostile_pictures_and_huge_files(hostile_folder, watch):
    library = ConceptLibrary(hostile_folder, watch=watch)
    rows = {entry.path.relative_to(hostile_folder).as_posix(): entry for entry in library.entries(DEMO)}
    assert sorted(rows) == sorted(["good.safetensors", *UNREADABLE]), "each file once; nothing under loop/ or away/"
    assert rows["good.safetensors"].fits and rows["good.safetensors"].reason == ""
    for name, expected in UNREADABLE.items():
        entry = rows[name]
        assert not entry.fits and entry.concept is None and entry.lora is None and entry.kind == "", name
        assert entry.reason.startswith(f"{name}: ") and expected in entry.reason, entry.reason
        assert "\n" not in entry.reason
    assert library.get("good").token == "good"
    assert [c.token for c in library.resolve("a good toy")] == ["good"]
    with pytest.raises(ConceptError):
        library.get("secret")  # the file a link outside names is never read


def test_a_link_that_is_not_followed_is_reported_once(hostile_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="studio.library"):
        library = ConceptLibrary(hostile_folder, watch=False)
        for _ in range(3):
            library.entries(DEMO)
            library.refresh()
    reports = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert sorted(reports) == sorted(f"concept library: skipped {hostile_folder / name}: {UNREADABLE[name]}"
                                     for name in ("loop", "secret.safetensors", "away")), reports


def test_a_link_out_of_the_library_made_while_it_watches_is_not_followed(tmp_path):
    """The watcher's path (one file re-stamped on its event) applies the same rule as the scan."""
    root = tmp_path / "concepts"
    write_word(tmp_path / "secret.safetensors")
    library = ConceptLibrary(root, refresh_interval=float("inf"))
    assert library.watching, library.watch_error
    assert library.entries(DEMO) == []
    seen = library.changes_seen
    os.symlink(tmp_path / "secret.safetensors", root / "leak.safetensors")
    assert library.wait_for_change(seen, timeout=10)
    with pytest.raises(ConceptError):
        library.get("leak")
    entry, = library.entries(DEMO)
    assert entry.token == "leak" and "outside the library folder" in entry.reason


@pytest.mark.parametrize("name", ["nested.png", "pixels.png", "huge.safetensors", "bomb.pt"])
def test_import_refuses_a_hostile_file_in_one_line_and_adds_nothing(hostile_folder, tmp_path, name):
    library = ConceptLibrary(tmp_path / "library", watch=False)
    with pytest.raises(UserError, match=rf"^{name}: .*{UNREADABLE[name]}") as caught:
        library.import_file(hostile_folder / name)
    assert "\n" not in str(caught.value)
    assert list((tmp_path / "library").iterdir()) == []
