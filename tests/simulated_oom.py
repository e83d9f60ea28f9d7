"""A simulated out-of-memory error for the tests of OOM handling (no GPU here): a forward pre-hook for a real
module that raises torch.OutOfMemoryError on its Nth call, as CUDA's allocator does in the middle of a step.

Imported by tests/engine/test_oom.py and tests/training/test_train_oom.py (tests/ is on sys.path through its
conftest.py).
"""

import weakref

import torch


class OutOfMemoryOnCall:
    """A forward pre-hook that raises CUDA's out-of-memory error on call `n`, holding a tensor in its frame when it
    does (as a layer holds its activations): `held()` is None once nothing keeps that tensor alive."""

    def __init__(self, n: int):
        self.n, self.calls, self.held = n, 0, None

    def __call__(self, module, args) -> None:
        self.calls += 1
        if self.calls == self.n:
            activations = torch.zeros(256, 256)
            self.held = weakref.ref(activations)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total)")
