"""Out of memory while generating (every UI tab goes through `generate`): a clear error naming the memory mode to
switch to, the memory of the failed step freed, and the same loaded model still generating afterwards.

The error is simulated (no GPU here): a forward pre-hook on a real tiny pipeline's UNet raises
torch.OutOfMemoryError on its Nth call, as CUDA's allocator does in the middle of a denoising step.
"""

import gc

import numpy as np
import pytest
import torch
from simulated_oom import OutOfMemoryOnCall

from studio.engine.generate import GenerateRequest, generate
from studio.engine.memory import OutOfMemory, apply_preset, is_out_of_memory, mode_in_effect, oom_guard
from studio.engine.models import LoadOptions, ModelError, ModelManager

REQUEST = dict(prompt="a red cat", seed=3, steps=3, width=32, height=32, preview_every=0)


@pytest.mark.parametrize("mode, advice", [("fast", "switch the memory mode to 'balanced'"),
                                          ("balanced", "switch the memory mode to 'low-vram'"),
                                          ("low-vram", "use a smaller picture size or batch")])
def test_generate_out_of_memory_names_the_next_mode_frees_the_step_and_the_model_keeps_working(
        tiny_model_dirs, mode, advice):
    model = ModelManager(apply_preset(mode, LoadOptions(device="cpu"))).load(tiny_model_dirs["sd1"])
    assert mode_in_effect(model.pipe) == mode
    expected = np.asarray(generate(model, GenerateRequest(**REQUEST)).images[0])

    failing = OutOfMemoryOnCall(n=2)
    handle = model.pipe.unet.register_forward_pre_hook(failing)
    try:
        with pytest.raises(ModelError, match=f"ran out of memory in '{mode}' memory mode: {advice}") as caught:
            generate(model, GenerateRequest(**REQUEST))
    finally:
        handle.remove()
    assert isinstance(caught.value, OutOfMemory) and caught.value.__cause__ is None  # no CUDA traceback shown
    gc.collect()
    assert failing.held() is None, "the failed step's tensors are still held by the error's traceback"

    # The studio keeps running: the same loaded model generates the same picture as before the error.
    again = generate(model, GenerateRequest(**REQUEST))
    assert np.array_equal(np.asarray(again.images[0]), expected)


def test_the_ui_shows_the_advice_as_a_readable_error(tiny_model_dirs, tmp_path):
    import gradio as gr

    from studio.library import ConceptLibrary
    from studio.ui.state import Studio

    manager = ModelManager(apply_preset("fast", LoadOptions(device="cpu")))
    manager.load(tiny_model_dirs["sd1"])
    studio = Studio(manager, ConceptLibrary(tmp_path / "library"), memory_mode="fast")
    handle = manager.current.pipe.unet.register_forward_pre_hook(OutOfMemoryOnCall(n=1))
    try:
        with pytest.raises(gr.Error, match="switch the memory mode to 'balanced' and try again"):
            studio.run_generate(dict(REQUEST), session="s1")
    finally:
        handle.remove()
    assert len(studio.run_generate(dict(REQUEST), session="s1")) == 1


def test_only_out_of_memory_errors_are_turned_into_advice():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 8 GB)"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 4 GB"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        with oom_guard("fast"):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    # A nested guard's advice (the inner one knows the mode) passes the outer one unchanged.
    with pytest.raises(OutOfMemory, match="'balanced' memory mode: switch the memory mode to 'low-vram'"):
        with oom_guard("fast"), oom_guard("balanced"):
            raise torch.OutOfMemoryError("CUDA out of memory")
