"""Launch a built studio app on a free local port (shared by the UI tests)."""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import gradio as gr
import torch


CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright never downloads its own
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"  # screenshots the browser tests leave


@contextmanager
def studio_page(model_dir, library_dir, viewport: tuple[int, int], init_script: str | None = None) -> Iterator:
    """A chromium page of `viewport` (width, height) open on a fresh studio over the model in `model_dir` and an
    empty library in `library_dir`; `init_script` runs in the page before the studio's own scripts."""
    from playwright.sync_api import sync_playwright

    from studio.engine.models import ModelManager
    from studio.library import ConceptLibrary
    from studio.ui.app import build_app

    manager = ModelManager()
    manager.load(model_dir)
    app = build_app(manager, ConceptLibrary(library_dir))
    url = launch(app)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            if init_script:
                page.add_init_script(init_script)
            page.goto(url)
            yield page
            browser.close()
    finally:
        app.close()


def launch(app: gr.Blocks) -> str:
    """Start `app` in the background on a free port; returns its URL. Close it with `app.close()`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/"


class UNetCalls:
    """Counts the forward calls of a pipeline's UNet (one per denoising step, batched CFG, or per training step).

    The test servers run in the test's own process, so this is the server's own count: a test of "stops within one
    step" compares steps, not seconds. A real forward hook on the real module; removed on exit."""

    def __init__(self, pipe, training_only: bool = False) -> None:
        self.count = 0
        self.training_only = training_only  # count the forwards that build a graph: training steps, not the
        self._handle = pipe.unet.register_forward_hook(self._seen)  # trainer's no-grad scoring or previews

    def _seen(self, *_args) -> None:
        if not self.training_only or torch.is_grad_enabled():
            self.count += 1

    def __enter__(self) -> "UNetCalls":
        return self

    def __exit__(self, *_exc) -> None:
        self._handle.remove()


def wait_until_running(job, limit_s: float = 60) -> float:
    """Wait for a gradio_client job's first progress report (its first denoising step); returns the time then."""
    started = time.monotonic()
    while not job.status().progress_data:
        assert not job.done(), "the job ended before it reported progress"
        assert time.monotonic() - started < limit_s, f"the job did not start within {limit_s:.0f} s"
        time.sleep(0.05)
    return time.monotonic()


def import_word(page, word: str, width: int, path: Path, seed: int) -> None:
    """In a browser's Library tab: import a random word of `width` (written to `path` as the studio's file) and pick
    it in the Concept box, ready for a button of the concept panel."""
    from playwright.sync_api import expect

    from studio.engine.learned.registry import save_concept
    from studio.engine.learned.word import Concept

    torch.manual_seed(seed)
    file = save_concept(Concept(word, {"text_encoder": torch.randn(1, width)}, {}), path)
    page.get_by_role("tab", name="Library").click()
    page.locator("#library-import input[type=file]").set_input_files([str(file)])
    expect(page.locator("#library-table")).to_contain_text(word, timeout=20000)
    page.get_by_label("Concept", exact=True).fill(word)
    page.get_by_label("Concept", exact=True).press("Enter")
