"""The Train tab's "Encode (1 s)" as a plain handler call (no server), on the demo model with a 3-step demo encoder:
the pictures become the session's own image concept, listed in its concepts, found by its prompts (and read back
from the session's folder after a restart), and drawing another picture than its start word alone; bad input is one
gr.Error line."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest

from studio.demo.concept_sets import CONCEPTS_DIR
from studio.engine.generate import generate
from studio.engine.models import ModelManager
from studio.jobs.generation import request_for
from studio.library import ConceptLibrary
from studio.ui.state import Studio
from studio.ui.tabs.train import train_handlers

PLUM = sorted(str(p) for p in (CONCEPTS_DIR / "toy-plum").glob("*.png"))


@pytest.fixture()
def studio(demo_encoder, tmp_path):
    manager = ModelManager()
    manager.load(None)
    return Studio(manager, ConceptLibrary(tmp_path / "lib"), work_dir=tmp_path / "work",
                  image_adapter=str(demo_encoder))


def _picture(studio, session, prompt):
    req, _unknown = request_for({"prompt": prompt, "seed": 1, "steps": 4}, studio.library, session)
    return np.asarray(generate(studio.model, req).images[0]).astype(int), req


def test_encode_keeps_an_image_concept_in_the_session_that_its_prompts_use(studio):
    request = gr.Request(session_hash="encode-page")
    status, download = train_handlers(studio).encode(PLUM, "<plum>", "toy", request)
    assert status.startswith("<plum> encoded from 5 picture(s) in ") and download is None
    session = studio.session_of(request)
    (entry,) = [e for e in studio.library.entries(studio.model.encoder_dims, session) if e.token == "<plum>"]
    assert entry.kind == "image" and entry.fits and entry.session == session
    encoded, req = _picture(studio, session, "a photo of <plum> on a black background")
    assert [use.thing.kind for use in req.concepts] == ["image"]
    plain, _ = _picture(studio, session, "a photo of toy on a black background")
    assert not np.array_equal(encoded, plain)  # the pictures condition it; "toy" stands where the word is
    studio.library.drop_session(session)  # a restart: read back from the session's folder
    assert np.array_equal(_picture(studio, session, "a photo of <plum> on a black background")[0], encoded)


def test_bad_input_is_one_line(studio, tmp_path):
    handlers, request = train_handlers(studio), gr.Request(session_hash="encode-bad")
    with pytest.raises(gr.Error, match="Upload at least one picture"):
        handlers.encode([], "<plum>", "toy", request)
    studio.image_adapter = str(tmp_path / "none.safetensors")
    with pytest.raises(gr.Error, match="needs the IP-Adapter .*none.safetensors, which is not on this machine"):
        handlers.encode(PLUM, "<plum>", "toy", request)
