"""The GPU memory the README and the Model tab state for SD3 and Flux is counted from the real models' weights:
`PARAMETERS` equals the components built on the meta device from their configs (a table written by hand, or a
config changed, would differ)."""

from __future__ import annotations

import pytest

from studio.engine.family_memory import PARAMETERS, count_parameters, memory_lines


@pytest.mark.parametrize("name", list(PARAMETERS))
def test_parameter_table_is_the_count_of_the_configs(name):
    assert count_parameters(name) == PARAMETERS[name]


def test_memory_lines_say_counted_and_offload_is_the_largest_part():
    (flux,) = memory_lines("flux")
    assert flux.startswith("Flux.1-dev: 16.9B parameters; fast/balanced 31.4 GiB") and "counted" in flux
    assert "low-vram 22.2 GiB (model offload: the transformer alone)" in flux
    assert len(memory_lines("sd3")) == 2


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_low_vram_on_a_transformer_is_reported_as_low_vram(flow_model_dirs, family):
    """VAE slicing and tiling apply to SD3/Flux; attention slicing does not exist for their transformers, so a model
    loaded in low-vram must not be reported as balanced for want of it."""
    from studio.engine.memory import apply_preset, memory_settings, mode_in_effect
    from studio.engine.models import ModelManager

    pipe = ModelManager().load(flow_model_dirs[family], apply_preset("low-vram")).pipe
    assert memory_settings(pipe)["vae_tiling"] and mode_in_effect(pipe) == "low-vram"
