"""The demo model's captions.txt (what Perfusion measures its text encodings on) is its world's captions, drawn as the
build draws them: a stale or hand-edited file fails here."""

from __future__ import annotations

from studio.demo.captions import DEMO_MODEL, captions_of
from studio.training.captions import bundled_captions, captions_for


def test_the_shipped_captions_are_the_worlds():
    shipped = (DEMO_MODEL / "captions.txt").read_text().splitlines()
    assert shipped == captions_of(DEMO_MODEL)
    captions, origin = captions_for(str(DEMO_MODEL))
    assert captions == shipped and origin.endswith("captions.txt")


def test_a_model_without_captions_gets_the_bundled_set(tmp_path):
    captions, origin = captions_for(str(tmp_path))
    assert captions == bundled_captions() and len(set(captions)) == 750 and "bundled" in origin
