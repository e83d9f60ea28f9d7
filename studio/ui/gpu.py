"""Hugging Face Spaces ZeroGPU hook: GPU work is decorated with `spaces.GPU` only where `spaces` is importable.

On a ZeroGPU Space a GPU is attached only while a function decorated with `spaces.GPU` runs; everywhere else
(a local machine, a normal GPU Space, the tests) the `spaces` package is absent and the handlers run unchanged.

ZeroGPU runs a decorated function in a forked worker process, sending its arguments and results through pickled
queues. So only the model work is decorated (`Studio.render_streamed` for every tab's pictures, the training and
evaluation generators of `tabs/train.py` and `tabs/evaluate.py`), with plain values in and out (requests, session
ids, concepts, file paths, TrainingSnapshots), and everything that changes the server's state (session concepts,
thumbnails, the loss plot's data) happens in the handler around it, in the server process. Known limits there: the Cancel buttons set a flag in the server process, which a running
ZeroGPU worker does not see (the call ends at its time limit instead); a worker that ZeroGPU reuses keeps the model
that was loaded when it was forked.
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
