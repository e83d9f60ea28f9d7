"""Launch a built studio app on a free local port (shared by the UI tests)."""

from __future__ import annotations

import socket
import time

import gradio as gr


def launch(app: gr.Blocks) -> str:
    """Start `app` in the background on a free port; returns its URL. Close it with `app.close()`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/"


def wait_until_running(job, limit_s: float = 60) -> float:
    """Wait for a gradio_client job's first progress report (its first denoising step); returns the time then."""
    started = time.monotonic()
    while not job.status().progress_data:
        assert not job.done(), "the job ended before it reported progress"
        assert time.monotonic() - started < limit_s, f"the job did not start within {limit_s:.0f} s"
        time.sleep(0.05)
    return time.monotonic()
