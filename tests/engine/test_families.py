"""One source for what a pipeline is: its (key, tokenizer, text encoder) list, their widths, and its family."""

import pytest

from studio.engine.families import FAMILIES, detect_family, encoder_dims, encoders_of, family_of, family_of_pipe
from studio.engine.models import ModelManager

WIDTHS = {"sd1": {"text_encoder": 768}, "sd2": {"text_encoder": 1024},
          "sdxl": {"text_encoder": 768, "text_encoder_2": 1280}}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_encoders_widths_and_family_of_each_pipeline(tiny_model_dirs, family):
    model = ModelManager().load(tiny_model_dirs[family])
    pipe = model.pipe
    encoders = encoders_of(pipe)
    assert [key for key, _, _ in encoders] == list(WIDTHS[family])
    assert encoders[0][1] is pipe.tokenizer and encoders[0][2] is pipe.text_encoder
    if family == "sdxl":
        assert encoders[1][1] is pipe.tokenizer_2 and encoders[1][2] is pipe.text_encoder_2
    assert encoder_dims(pipe) == WIDTHS[family]
    # The model, its prompt encoder and a concept file of those widths all name the same family.
    assert detect_family(pipe) == model.family == model.encoder.family == family_of(WIDTHS[family])[0]
    assert model.encoder_dims == model.encoder.encoder_dims == WIDTHS[family]


def test_the_demo_model_has_sd1s_architecture_and_its_own_width(demo_model_dir):
    """Its 128-wide encoder names concept files "the built-in demo model", but the pipeline is SD 1.x's."""
    model = ModelManager().load(None)
    assert model.family == "sd1" and model.encoder_dims == {"text_encoder": 128}
    assert family_of(model.encoder_dims)[0] == "demo"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_each_familys_record_names_its_pipelines_modules(tiny_model_dirs, family):
    """The record answers what callers used to name by hand: the denoiser, the encoders, the mode's pipeline class."""
    model = ModelManager().load(tiny_model_dirs[family])
    record = family_of_pipe(model.pipe)
    assert record is FAMILIES[family] and record.denoiser_of(model.pipe) is model.pipe.unet
    assert record.encoder_keys == tuple(WIDTHS[family])
    assert isinstance(model.pipe, record.pipeline_class("txt2img"))
    assert isinstance(model.img2img(), record.pipeline_class("img2img"))
    assert isinstance(model.inpaint(), record.pipeline_class("inpaint"))
