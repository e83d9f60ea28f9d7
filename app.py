"""Hugging Face Space entry point: the studio on the built-in demo model."""

import os

os.environ.setdefault("GRADIO_SERVER_NAME", "0.0.0.0")

from launch import main  # noqa: E402

main([])
