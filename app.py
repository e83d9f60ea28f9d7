"""Hugging Face Space entry point: the studio on the built-in demo model (ZeroGPU too, see studio/ui/gpu.py)."""

import os

try:  # ZeroGPU wants `spaces` imported before torch touches CUDA; elsewhere the package is absent
    import spaces  # noqa: F401
except ImportError:
    pass

os.environ.setdefault("GRADIO_SERVER_NAME", "0.0.0.0")

from launch import main  # noqa: E402

main([])
