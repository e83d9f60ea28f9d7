"""Single-file SD3 and Flux checkpoints (the original layouts, as stabilityai's sd3_medium.safetensors and BFL's
flux1-dev.safetensors hold them) are named and refused in one line, not taken for a UNet-only SD file: diffusers 0.42.1
has no converter back to their layout to write a tiny one for a test, and its Flux converter reads FLUX.1's 3072-wide
blocks only (docs/families.md)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from studio.engine.models import ModelManager
from studio.errors import ModelError

LAYOUTS = {  # a few keys of each original file, small tensors
    "SD3": {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": torch.zeros(8),
            "model.diffusion_model.x_embedder.proj.weight": torch.zeros(4, 16, 2, 2),
            "first_stage_model.decoder.conv_out.weight": torch.zeros(3, 8, 3, 3)},
    "Flux.1": {"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(8),
               "single_blocks.0.linear1.weight": torch.zeros(8, 4), "img_in.weight": torch.zeros(4, 64)},
}


@pytest.mark.parametrize("title", LAYOUTS)
def test_a_flow_single_file_is_named_and_refused_in_one_line(tmp_path, title):
    path = tmp_path / "model.safetensors"
    save_file(LAYOUTS[title], str(path))
    with pytest.raises(ModelError) as err:
        ModelManager().load(path)
    message = str(err.value)
    assert message.startswith(f"model.safetensors is a single-file {title} checkpoint, which the studio does not load")
    assert "diffusers folder" in message and "\n" not in message
