"""The demo encoder's recipe (studio/demo/encoder.py), a few steps on the built-in demo model.

What it guards: only the vision model and the adapter learn (the demo model's UNet, VAE and text encoder are as
before, and the UNet is left without the adapter), the files are diffusers' IP-Adapter layout (diffusers'
`load_ip_adapter` reads them) and small enough to ship, and `studio encode` makes a concept with them that changes
the demo model's picture.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from studio.demo.encoder import EncoderRecipe, build
from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.image_encoding import encode_pictures
from studio.engine.models import ModelManager
from studio.demo import identity, world


def test_a_few_steps_train_only_the_encoder_and_write_files_diffusers_reads(tmp_path):
    model = ModelManager().load(None)
    frozen = {k: v.clone() for k, v in model.pipe.unet.state_dict().items()}
    processors = dict(model.pipe.unet.attn_processors)
    out = build(tmp_path / "demo-encoder", EncoderRecipe(steps=3, batch=2))
    assert all(torch.equal(v, model.pipe.unet.state_dict()[k]) for k, v in frozen.items())
    assert model.pipe.unet.attn_processors == processors and model.pipe.unet.encoder_hid_proj is None
    from safetensors.torch import load_file
    from studio.engine.learned.layer_word import cross_attention_layers
    first = model.pipe.unet.get_submodule(cross_attention_layers(model.pipe.unet)[0])
    learned = load_file(str(out / "ip-adapter.safetensors"))["ip_adapter.1.to_k_ip.weight"]
    assert learned.shape == first.to_k.weight.shape and not torch.equal(learned, first.to_k.weight)  # it learned
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert size <= 10 * 2**20, f"{size} bytes: too big to ship"

    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(model.source)
    pipe.load_ip_adapter(str(out), subfolder="", weight_name="ip-adapter.safetensors")
    assert pipe.image_encoder is not None and pipe.unet.encoder_hid_proj is not None

    rng = random.Random(1)
    toy = world.individual(5_000_001)
    concept = encode_pictures(model, [identity.render_view(toy, rng) for _ in range(3)], "<toy-x>",
                              str(out / "ip-adapter.safetensors"))
    req = dict(prompt="<toy-x> on a black background", seed=2, steps=4, preview_every=0)
    with_it = np.array(generate(model, GenerateRequest(**req, concepts=[concept])).images[0])
    without = np.array(generate(model, GenerateRequest(**req, concepts=[(concept, 0.0)])).images[0])
    assert not np.array_equal(with_it, without)
