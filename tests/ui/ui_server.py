"""Launch a built studio app on a free local port (shared by the UI tests)."""

from __future__ import annotations

import socket

import gradio as gr


def launch(app: gr.Blocks) -> str:
    """Start `app` in the background on a free port; returns its URL. Close it with `app.close()`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/"
