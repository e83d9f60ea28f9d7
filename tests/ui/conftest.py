"""A real studio server on the tiny SD1 model, launched per test module, and a few pictures to train on."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from studio.engine.models import ModelManager
from studio.library import ConceptLibrary
from studio.ui.app import build_app
from ui_server import launch


@pytest.fixture(scope="module")
def studio_server(tiny_model_dirs, tmp_path_factory):
    """`(url, manager, library_root)` of a launched studio whose shared library starts empty."""
    manager = ModelManager()
    manager.load(tiny_model_dirs["sd1"])
    root = tmp_path_factory.mktemp("shared-library")
    app = build_app(manager, ConceptLibrary(root))
    yield launch(app), manager, root
    app.close()


@pytest.fixture(scope="module")
def concept_pictures(tmp_path_factory) -> list[str]:
    """Three 48x48 pictures of a blue box on white."""
    folder = tmp_path_factory.mktemp("concept-pics")
    paths = []
    for k in range(3):
        arr = np.full((48, 48, 3), 240, np.uint8)
        arr[10:38, 10:38] = (40, 60 + 40 * k, 200)
        Image.fromarray(arr).save(folder / f"p{k}.png")
        paths.append(str(folder / f"p{k}.png"))
    return paths

