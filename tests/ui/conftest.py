"""A real studio server on the tiny SD1 model, launched per test module, and a few pictures to train on."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.engine.models import ModelManager
from studio.library import ConceptLibrary
from studio.ui.app import build_app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def studio_server(tiny_model_dirs, tmp_path_factory):
    """`(url, manager, library_root)` of a launched studio whose shared library starts empty."""
    manager = ModelManager()
    manager.load(tiny_model_dirs["sd1"])
    root = tmp_path_factory.mktemp("shared-library")
    app = build_app(manager, ConceptLibrary(root))
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", manager, root
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

