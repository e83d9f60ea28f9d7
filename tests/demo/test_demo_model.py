"""The embedded demo model: loads through the ModelManager as an SD 1.x-shaped model and serves every mode."""

import numpy as np
from PIL import Image

from studio.engine.generate import GenerateRequest, generate
from studio.engine.models import ModelManager


def test_demo_model_loads_by_default_and_generates_64px(demo_model_dir):
    model = ModelManager().load(None)
    assert model.is_demo and model.family == "sd1" and model.name == "demo"
    out = generate(model, GenerateRequest("a red circle on a white background", seed=1, steps=4))
    image = out.images[0]
    assert image.size == (64, 64)
    assert "Model: demo" in out.infotexts[0]
    assert np.asarray(image).std() > 1.0  # not a blank picture


def test_demo_model_img2img_and_inpaint(demo_model_dir):
    model = ModelManager().load(None)
    picture = Image.new("RGB", (64, 64), (240, 240, 240))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    assert generate(model, GenerateRequest("a blue star", init_image=picture, strength=0.7, steps=4)).images[0].size == (64, 64)
    assert generate(model, GenerateRequest("a blue star", init_image=picture, mask=mask, steps=4)).images[0].size == (64, 64)
