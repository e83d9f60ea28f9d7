"""Launch a built studio app on a free local port (shared by the UI tests)."""

from __future__ import annotations

import socket
import time

import gradio as gr
import torch


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
