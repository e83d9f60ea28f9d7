"""The ZeroGPU hook: without the `spaces` package nothing changes; with it, only the GPU work is decorated, and
that work takes and returns plain data (what crosses to a ZeroGPU worker process is pickled), while the session's
bookkeeping stays in the server process."""

import functools
import importlib.util
import inspect
import pickle
import sys
import types

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from studio.engine.models import ModelManager
from studio.library import ConceptLibrary
from studio.ui.gpu import gpu_task
from ui_server import launch


def test_without_spaces_the_function_is_returned_unchanged():
    if importlib.util.find_spec("spaces") is not None:
        pytest.skip("the spaces package is installed here")
    def work():
        return 1
    assert gpu_task(work) is work


def _round_trip(value):
    return pickle.loads(pickle.dumps(value))


def fake_spaces(calls: list) -> types.ModuleType:
    """A stand-in for `spaces` whose GPU decorator pickles arguments and results the way ZeroGPU's worker queue does."""
    def gpu(duration=None):
        def decorate(fn):
            if inspect.isgeneratorfunction(fn):
                @functools.wraps(fn)
                def generator(*args, **kwargs):
                    calls.append((fn.__name__, duration))
                    for item in fn(*_round_trip(args), **_round_trip(kwargs)):
                        yield _round_trip(item)
                return generator

            @functools.wraps(fn)
            def regular(*args, **kwargs):
                calls.append((fn.__name__, duration))
                return _round_trip(fn(*_round_trip(args), **_round_trip(kwargs)))
            return regular
        return decorate
    return types.SimpleNamespace(GPU=gpu)


def test_with_spaces_gpu_work_crosses_as_plain_data_and_the_concept_still_reaches_the_session(
        tiny_model_dirs, tmp_path, concept_pictures, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "spaces", fake_spaces(calls))
    from studio.ui.app import build_app

    manager = ModelManager()
    manager.load(tiny_model_dirs["sd1"])
    app = build_app(manager, ConceptLibrary(tmp_path / "library"))
    url = launch(app)
    try:
        client = Client(url, verbose=False)
        status, _ = client.predict([handle_file(p) for p in concept_pictures], "<zero>", "toy", "object", 1, 3,
                                   0.005, 1, 0, api_name="/train")
        assert "<zero> is ready" in status
        gallery = client.predict("a photo of <zero>", "", 1, 2, 7.5, "euler_a", 32, 32, 1, api_name="/generate")
        assert "Concepts: <zero>" in Image.open(gallery[0]["image"]).info["parameters"]
        with pytest.raises(Exception, match="multiples of 8"):  # an engine error still reads as one
            client.predict("a cat", "", 1, 2, 7.5, "euler_a", 36, 32, 1, api_name="/generate")
    finally:
        app.close()
    assert ("snapshots", 600) in calls and ("render_streamed", 60) in calls
