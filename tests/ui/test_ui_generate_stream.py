"""The Generate tab through a real server and gradio_client: step previews stream into the gallery before the
finished pictures, Cancel takes a job that still waits in the GPU queue off it (the running one is untouched), and
Variations give four seeds of a concept whose PNGs name it."""

import re
import time
from pathlib import Path

import pytest
import torch
from gradio_client import Client
from gradio_client.utils import Status
from PIL import Image

from studio.engine.learned.registry import save_concept
from studio.engine.learned.word import Concept
from studio.engine.models import ModelManager
from studio.library import ConceptLibrary
from studio.ui.app import build_app
from ui_server import UNetCalls, wait_until_running


def parameters(path) -> str:
    return Image.open(path).info.get("parameters", "")


def test_generate_streams_step_previews_then_returns_the_finished_pngs(studio_server):
    url, _, _ = studio_server
    client = Client(url, verbose=False)
    job = client.submit("a red circle", "", 5, 12, 7.5, "euler_a", 32, 32, 2, api_name="/generate")
    final = job.result(timeout=300)
    *previews, last = job.outputs()
    # The engine previews every 5 steps (GenerateRequest.preview_every): steps 5 and 10 of 12, in order, each a
    # one-picture gallery captioned with its step; then the finished pictures, which are what predict returns.
    assert [[item["caption"] for item in gallery] for gallery in previews] == [["step 5/12"], ["step 10/12"]]
    assert all(Image.open(gallery[0]["image"]).size == (32, 32) for gallery in previews)
    assert last == final and len(final) == 2 and all(item["caption"] is None for item in final)
    assert [re.search(r"Seed: (\d+),", parameters(item["image"])).group(1) for item in final] == ["5", "6"]
    assert client.predict("a red circle", "", 5, 12, 7.5, "euler_a", 32, 32, 2, api_name="/generate")[0]["image"]


def test_cancel_takes_a_waiting_job_off_the_queue_and_the_running_one_finishes(studio_server):
    url, _, _ = studio_server
    first, second = Client(url, verbose=False), Client(url, verbose=False)
    running = first.submit("a red circle", "", 1, 60, 7.5, "euler_a", 64, 64, 2, api_name="/generate")
    deadline = wait_until_running(running, 120) + 60  # the first job holds the one GPU slot
    waiting = second.submit("a blue square", "", 2, 4, 7.5, "euler_a", 32, 32, 2, api_name="/generate")
    while not (waiting.status().progress_data or [None])[0] or not waiting.status().progress_data[0].desc:
        # It waits in the studio's line for the device, which its progress bar says ("waiting: 1 job ahead").
        assert time.monotonic() < deadline, f"the second job never waited in the queue: {waiting.status()}"
        time.sleep(0.02)
    # What the Cancel button does for a browser: its own /cancel (the flag of this session's running job) and,
    # through `cancels=`, Gradio's /cancel of this session's event, which an API client sends with job.cancel().
    second.predict(api_name="/cancel")
    assert waiting.cancel()

    finished = running.result(timeout=600)
    assert len(finished) == 2 and "Seed: 1," in parameters(finished[0]["image"])  # untouched by the other Cancel
    # A job queued after the cancel has run: a waiting job not taken off the queue (first in, first out) would have
    # run before it.
    later = Client(url, verbose=False).predict("a cat", "", 9, 2, 7.5, "euler_a", 32, 32, 1, api_name="/generate")
    assert "Seed: 9," in parameters(later[0]["image"])
    assert waiting.status().code == Status.CANCELLED and waiting.outputs() == []
    # The cancelled job never ran: the second session's folder holds only the pictures of its next request.
    fresh = second.predict("a blue square", "", 3, 2, 7.5, "euler_a", 32, 32, 1, api_name="/generate")
    assert sorted(p.name for p in Path(fresh[0]["image"]).parent.glob("*.png")) == ["00000-3.png"]


def test_variations_give_four_seeds_of_the_concept_and_name_it_in_each_png(studio_server):
    url, manager, library_root = studio_server
    width = manager.current.encoder_dims["text_encoder"]
    save_concept(Concept("<vary-me>", {"text_encoder": torch.randn(1, width)}, {}), library_root / "vary-me")
    client = Client(url, verbose=False)
    gallery = client.predict("<vary-me>", 40, 3, 7.5, "euler_a", 32, 32, api_name="/variations")
    texts = [parameters(item["image"]) for item in gallery]
    assert len(texts) == 4
    for k, text in enumerate(texts):
        assert text.startswith("a photo of <vary-me>\n") and "Concepts: <vary-me>" in text
        assert f"Seed: {40 + k}," in text
    with pytest.raises(Exception, match="no concept named '<nobody>'"):  # as written, not &lt;nobody&gt;
        client.predict("<nobody>", 1, 3, 7.5, "euler_a", 32, 32, api_name="/variations")
    with pytest.raises(Exception, match="Pick a concept"):
        client.predict(None, 1, 3, 7.5, "euler_a", 32, 32, api_name="/variations")


def test_cancel_buttons_take_their_jobs_off_the_queue(tiny_model_dirs, tmp_path):
    """Guards the wiring: each Cancel button also cancels (in the browser) the events of its tab's GPU jobs."""
    manager = ModelManager()
    manager.load(tiny_model_dirs["sd1"])
    app = build_app(manager, ConceptLibrary(tmp_path))
    fns = app.fns
    names = {fn.api_name: fn for fn in fns.values()}
    cancelled_by = {}
    for fn in fns.values():
        for stop in ("cancel", "cancel_training"):
            if fn.is_cancel_function and fn.targets == names[stop].targets:
                cancelled_by[stop] = sorted(fns[i].api_name for i in fn.cancels)
    assert cancelled_by == {"cancel": ["generate", "variations"], "cancel_training": ["train"]}
    assert names["variations"].concurrency_id == "gpu"


def test_closing_a_running_job_stops_the_work_and_a_closed_training_keeps_its_word(studio_server, concept_pictures):
    """job.cancel() on a running event takes the server path of the browser's Cancel (`cancels=`): Gradio closes
    the handler. Guards against the engine or the trainer running on, holding the one model, after that."""
    from gradio_client import handle_file

    url, manager, _ = studio_server
    client = Client(url, verbose=False)
    with UNetCalls(manager.current.pipe) as unet:
        job = client.submit("a red circle", "", 1, 100, 7.5, "euler_a", 64, 64, 8, api_name="/generate")
        wait_until_running(job, 120)
        steps_at_close = unet.count
        job.cancel()
        assert len(client.predict("a cat", "", 1, 2, 7.5, "euler_a", 32, 32, 1, api_name="/generate")) == 1
        ran_on = unet.count - steps_at_close - 2  # less the 2 steps of "a cat", which waited for the model
    # Gradio closes the handler at its next output (a preview every 5 steps), the engine stops one step later;
    # running on would take the remaining ~95 steps.
    assert ran_on <= 12, f"the closed generation ran on for {ran_on} steps"
    deadline = time.monotonic() + 120  # failure bounds only: the waits below are for reported events

    job = client.submit([handle_file(p) for p in concept_pictures], "<closed>", "toy", "object", 1, 2000, 0.005, 1, 0,
                        api_name="/train")
    while not any("loss" in (out[0] or "") for out in job.outputs()):
        assert time.monotonic() < deadline + 120, "no training step was reported"
        time.sleep(0.1)
    job.cancel()
    closed_at = time.monotonic()
    while "<closed>" not in [row[0] for row in client.predict(api_name="/library")["data"]]:
        assert time.monotonic() - closed_at < 60, "the closed training's word never reached the session"
        time.sleep(0.2)
    gallery = client.predict("a photo of <closed>", "", 1, 2, 7.5, "euler_a", 32, 32, 1, api_name="/generate")
    assert "Concepts: <closed>" in parameters(gallery[0]["image"])


README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_gradio_client_example_runs_and_lists_every_named_endpoint(studio_server, concept_pictures):
    """Guards the README against drift: its gradio_client example runs as written (against this server, on these
    pictures) and its list of named endpoints is the app's."""
    url, manager, library_root = studio_server
    text = README.read_text()
    example = re.search(r"```python\n(from gradio_client import .*?)```", text, re.S).group(1)
    example = (example.replace('"http://127.0.0.1:7860/"', repr(url))
               .replace('"pics/1.png"', repr(concept_pictures[0])).replace('"pics/2.png"', repr(concept_pictures[1])))
    names: dict = {}
    exec(compile(example, "README.md", "exec"), names)  # noqa: S102 - the documented example, run as written
    assert "<my-toy> is ready" in names["status"]
    for item in names["gallery"] + names["variations"]:
        assert "Concepts: <my-toy>" in parameters(item["image"])
    assert len(names["gallery"]) == 4 and len(names["variations"]) == 4
    assert [gallery[0]["caption"] for gallery in names["step_previews"]] == [f"step {k}/20" for k in (5, 10, 15, 20)]

    listed = set(re.findall(r"`/(\w+)`", text.split("Named endpoints")[1].split("\n\n")[0]))
    app = build_app(manager, ConceptLibrary(library_root))
    public = {fn.api_name for fn in app.fns.values() if fn.api_name and fn.api_visibility == "public"}
    assert listed == public, f"README lists {sorted(listed - public)} extra, misses {sorted(public - listed)}"
