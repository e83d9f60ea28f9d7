"""Hugging Face Space entry point: the studio on the built-in demo model (ZeroGPU too, see studio/ui/gpu.py).

A Space runs `python app.py` from the repository root with only requirements.txt installed. With persistent storage
on, the Space mounts it at /data; the library and every session's concepts are kept there, since the rest of a
Space's disk is reset at each restart (and launch.py keeps a session's concepts 7 days after its last visit).
"""

import os
import sys
from pathlib import Path

try:  # ZeroGPU wants `spaces` imported before torch touches CUDA; elsewhere the package is absent
    import spaces  # noqa: F401
except ImportError:
    pass

SPACE_STORAGE = Path("/data")  # where a Space mounts its persistent storage


def storage_args(storage: Path = SPACE_STORAGE) -> list[str]:
    """launch.py's folders inside `storage` when it is a writable folder, else none (launch.py's defaults)."""
    if not (storage.is_dir() and os.access(storage, os.W_OK)):
        return []
    return ["--data", str(storage / "studio-data"), "--concepts", str(storage / "concepts")]


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_SERVER_NAME", "0.0.0.0")
    from launch import main

    sys.exit(main(storage_args()))
