"""The device's line through a real server: every model endpoint takes its turn in it, cancel of a running generation
returns promptly and the server keeps serving; two clients at once both get their own, correct pictures."""

import inspect
import re

import numpy as np
from gradio_client import Client
from PIL import Image

from studio.engine.generate import GenerateRequest, generate
from ui_server import UNetCalls, wait_until_running

GPU_ENDPOINTS = ("generate", "variations", "train", "style_transfer", "compose", "inpaint", "preview_concept",
                 "evaluate_concept", "compare_methods", "load_model", "set_memory_mode")


def test_every_model_endpoint_takes_its_turn_in_the_studios_line(tiny_model_dirs, tmp_path):
    from studio.engine.models import ModelManager
    from studio.library import ConceptLibrary
    from studio.ui.app import build_app
    from studio.ui.turns import WAITING_ROOM

    manager = ModelManager()
    manager.load(tiny_model_dirs["sd1"])
    app = build_app(manager, ConceptLibrary(tmp_path))
    by_name = {fn.api_name: fn for fn in app.fns.values()}
    # Gradio lets up to WAITING_ROOM of them into their handlers (one queue for them all) ...
    assert {name: (by_name[name].concurrency_id, by_name[name].concurrency_limit) for name in GPU_ENDPOINTS} == {
        name: ("gpu", WAITING_ROOM) for name in GPU_ENDPOINTS}
    # ... where each waits for its turn on the device without a thread (studio.ui.turns.in_turn), one job at a time.
    assert all(inspect.iscoroutinefunction(by_name[name].fn) or inspect.isasyncgenfunction(by_name[name].fn)
               for name in GPU_ENDPOINTS)


def test_cancel_stops_a_running_generation_within_a_step_and_the_server_keeps_serving(studio_server):
    url, manager, _ = studio_server
    client = Client(url, verbose=False)
    with UNetCalls(manager.current.pipe) as unet:
        job = client.submit("a red circle", "", 3, 100, 7.5, "euler_a", 64, 64, 8, api_name="/generate")
        wait_until_running(job)
        client.predict(api_name="/cancel")  # the flag is set when this returns
        steps_at_cancel = unet.count
        try:
            job.result(timeout=30)
            raise AssertionError("a cancelled generation returned pictures")
        except Exception as exc:  # gradio_client raises AppError with the server's message
            stopped_at = re.search(r"cancelled at step (\d+) of 100", str(exc))
            assert stopped_at and int(stopped_at.group(1)) < 100, exc
        assert unet.count - steps_at_cancel <= 1  # at most the step that was running
    assert len(client.predict("a cat", "", 1, 2, 7.5, "euler_a", 32, 32, 1, api_name="/generate")) == 1


def test_two_clients_at_once_each_get_their_own_correct_pictures(studio_server):
    url, manager, _ = studio_server
    requests = [("a red circle", 11), ("a blue square", 22)]
    clients = [Client(url, verbose=False) for _ in requests]
    jobs = [c.submit(prompt, "", seed, 6, 7.5, "euler_a", 32, 32, 2, api_name="/generate")
            for c, (prompt, seed) in zip(clients, requests)]
    results = [job.result(timeout=60) for job in jobs]
    for (prompt, seed), gallery in zip(requests, results):
        reference = generate(manager.current, GenerateRequest(prompt, seed=seed, steps=6, width=32, height=32, batch=2))
        assert len(gallery) == 2
        for item, expected, k in zip(gallery, reference.images, range(2)):
            served = Image.open(item["image"])
            assert served.info["parameters"].startswith(prompt) and f"Seed: {seed + k}," in served.info["parameters"]
            diff = np.abs(np.asarray(served.convert("RGB"), np.int16) - np.asarray(expected, np.int16)).max()
            assert diff == 0, f"{prompt!r} seed {seed + k}: the served picture differs from a lone run by {diff}"
