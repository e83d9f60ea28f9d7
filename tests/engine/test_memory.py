"""Memory modes: what each preset turns on, `auto`'s choice, and out-of-memory errors that leave the model usable."""

import pytest
import torch

from studio.engine.generate import GenerateRequest, generate
from studio.engine.memory import PRESETS, apply_preset, oom_guard, pick_auto, preset
from studio.engine.models import ModelError, ModelManager


def test_presets_turn_on_what_they_promise():
    fast, low = apply_preset("fast"), apply_preset("low-vram")
    assert (fast.attention_slicing, fast.vae_slicing, fast.offload) == (False, False, "none")
    assert (low.attention_slicing, low.vae_slicing, low.vae_tiling, low.offload) == (True, True, True, "model")
    assert PRESETS["low-vram"].gradient_checkpointing and PRESETS["low-vram"].offload_frozen_after_caching
    assert all(p.explanation for p in PRESETS.values())
    with pytest.raises(ValueError, match="memory mode must be one of"):
        preset("tiny")


def test_auto_picks_by_free_memory():
    assert pick_auto(24.0).name == "fast"
    assert pick_auto(8.0).name == "balanced"
    assert pick_auto(4.0).name == "low-vram"


def test_out_of_memory_inside_a_pipeline_step_names_the_next_mode_and_the_model_still_works(tiny_model_dirs):
    model = ModelManager().load(tiny_model_dirs["sd1"])

    def explode(step, total, preview):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    # generate's own guard (no outer one here: that would pass without it) reads the mode off the pipeline.
    with pytest.raises(ModelError, match="switch the memory mode to 'balanced'"):
        generate(model, GenerateRequest("a cat", steps=3, width=32, height=32), on_step=explode)
    assert len(generate(model, GenerateRequest("a cat", steps=2, width=32, height=32)).images) == 1
    with pytest.raises(RuntimeError, match="unrelated"):
        with oom_guard("fast"):
            raise RuntimeError("unrelated failure")


def test_memory_settings_read_what_a_preset_really_turned_on(tiny_model_dirs):
    from studio.engine.memory import memory_settings

    fast = ModelManager(apply_preset("fast")).load(tiny_model_dirs["sd1"])
    low = ModelManager(apply_preset("low-vram")).load(tiny_model_dirs["sd1"])
    assert memory_settings(fast.pipe) == {"attention_slicing": False, "vae_slicing": False, "vae_tiling": False,
                                          "cpu_offload": False}
    # Offload is CUDA-only: on the CPU the low-vram preset slices and tiles but keeps the model where it is.
    assert memory_settings(low.pipe) == {"attention_slicing": True, "vae_slicing": True, "vae_tiling": True,
                                         "cpu_offload": torch.cuda.is_available()}


def test_a_capped_process_running_out_of_memory_gets_the_same_one_line_advice():
    """Guards 'with capped memory the UI shows only Gradio's generic error': Python's MemoryError (an allocation
    refused under a ulimit or cgroup cap) is out of memory too."""
    with pytest.raises(ModelError, match="ran out of memory in 'balanced' memory mode: switch the memory mode to "
                                         "'low-vram'"):
        with oom_guard("balanced"):
            raise MemoryError()
