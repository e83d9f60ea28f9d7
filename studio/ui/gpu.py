"""Hugging Face Spaces ZeroGPU hook: GPU work is decorated with `spaces.GPU` only where `spaces` is importable.

On a ZeroGPU Space a GPU is attached only while a function decorated with `spaces.GPU` runs; everywhere else
(a local machine, a normal GPU Space, the tests) the `spaces` package is absent and the handlers run unchanged.
"""

from __future__ import annotations

import importlib
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

# Seconds of GPU a call may hold on ZeroGPU (its default is 60). Training a concept takes minutes.
GENERATE_SECONDS = 60
TRAIN_SECONDS = 600


def gpu_task(fn: F, seconds: int = GENERATE_SECONDS) -> F:
    """`spaces.GPU(duration=seconds)(fn)` when the `spaces` package is importable, else `fn` itself."""
    try:
        spaces = importlib.import_module("spaces")
    except ImportError:
        return fn
    return spaces.GPU(duration=seconds)(fn)
