"""LoRA files as concepts: the studio's pictures equal diffusers' own `load_lora_weights` pictures, a word+LoRA file
(A1111 bundle, diffusers pivotal pair) is one concept, and `studio generate --concept FILE[:WEIGHT]` takes LoRAs.

LoRAs are made in the test from real components (peft on a tiny random UNet, saved by diffusers' `save_lora_weights`,
kohya names by diffusers' `convert_state_dict_to_kohya`). What these tests guard: the studio applies a LoRA the way
diffusers does (max abs difference <= 1e-4 in fp32, SD1/SD2/SDXL, diffusers and kohya forms), the words a LoRA file
carries are used in the prompt, and a weight of 0 gives the picture without the LoRA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from PIL import Image
from safetensors.torch import load_file, save_file

from studio.cli import main
from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.lora import loras_applied
from studio.engine.learned.lora_files import load_lora
from studio.engine.models import ModelManager
from test_lora_runtime import _unet_lora_file

PIPELINES = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def make_unet_lora(pipeline_dir, pipeline_class, out_file, seed: int = 1, scale: float = 0.2):
    """A diffusers-form LoRA (rank 4, random non-zero A and B on the UNet's attention) written to `out_file`."""
    written = _unet_lora_file(out_file.parent, pipeline_dir, pipeline_class, seed, scale)
    return written if written == out_file else written.rename(out_file)


def draw(pipe, prompt: str = "a photo of a cat", seed: int = 5) -> np.ndarray:
    """The pipeline's float picture (fp32, before any rounding to 8 bits)."""
    return pipe(prompt, num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images[0]


def studio_draw(model, loras, prompt: str = "a photo of a cat") -> np.ndarray:
    """The same picture with the studio's mechanism: its adapters enabled on the shared UNet for the block."""
    with model.lock, loras_applied(model, loras):
        return draw(model.pipe, prompt)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_studio_lora_pictures_equal_diffusers_load_lora_weights(family, tiny_model_dirs, tmp_path):
    path = make_unet_lora(tiny_model_dirs[family], PIPELINES[family], tmp_path / f"{family}.safetensors")
    reference = PIPELINES[family].from_pretrained(tiny_model_dirs[family])
    reference.load_lora_weights(str(path), adapter_name="x")
    reference.set_adapters(["x"], [0.8])
    model = ModelManager().load(tiny_model_dirs[family])
    ours = studio_draw(model, [(load_lora(path), 0.8)])
    assert np.abs(ours - draw(reference)).max() <= 1e-4
    assert np.abs(ours - studio_draw(model, [])).max() > 1e-3, "the LoRA changed nothing: the test shows nothing"


def test_a_kohya_file_gives_diffusers_pictures_too(tiny_model_dirs, tmp_path):
    path = make_unet_lora(tiny_model_dirs["sd1"], StableDiffusionPipeline, tmp_path / "d.safetensors")
    kohya = tmp_path / "k.safetensors"
    save_file(convert_state_dict_to_kohya(load_file(path)), kohya)
    reference = StableDiffusionPipeline.from_pretrained(tiny_model_dirs["sd1"])
    reference.load_lora_weights(str(path))
    model = ModelManager().load(tiny_model_dirs["sd1"])
    lora = load_lora(kohya)
    assert lora.source_format == "kohya"
    assert np.abs(studio_draw(model, [(lora, 1.0)]) - draw(reference)).max() <= 1e-4


def test_a_diffusers_pivotal_pair_is_one_concept_prompted_as_in_diffusers(tiny_model_dirs, tmp_path):
    """diffusers' advanced script writes `pytorch_lora_weights.safetensors` and `<folder>_emb.safetensors`
    (`clip_l`: one row per token "<s0>", "<s1>"); its model card prompts "<s0><s1>"."""
    folder = tmp_path / "my-pivotal"
    path = make_unet_lora(tiny_model_dirs["sd1"], StableDiffusionPipeline, folder / "pytorch_lora_weights.safetensors")
    reference = StableDiffusionPipeline.from_pretrained(tiny_model_dirs["sd1"])
    width = reference.text_encoder.config.hidden_size
    save_file({"clip_l": torch.randn(2, width, generator=torch.Generator().manual_seed(3))},
              folder / "my-pivotal_emb.safetensors")

    lora = load_lora(path)
    assert lora.kind == "word+lora" and [w.token for w in lora.words] == ["<s0><s1>"]
    reference.load_lora_weights(str(path))
    reference.load_textual_inversion(load_file(folder / "my-pivotal_emb.safetensors")["clip_l"],
                                     token=["<s0>", "<s1>"], text_encoder=reference.text_encoder,
                                     tokenizer=reference.tokenizer)
    prompt = "a photo of <s0><s1>"
    model = ModelManager().load(tiny_model_dirs["sd1"])
    req = GenerateRequest(prompt, concepts=[(lora, 1.0)])
    assert req.loras == [(lora, 1.0)] and req.words == lora.words
    kwargs = model.encoder.pipeline_kwargs(prompt, "", req.words, 1, 7.5)
    with model.lock, loras_applied(model, req.loras):
        ours = model.pipe(**kwargs, num_inference_steps=3, height=64, width=64, output_type="np",
                          generator=torch.Generator().manual_seed(5)).images[0]
    assert np.abs(ours - draw(reference, prompt)).max() <= 1e-4


def test_a_bundled_word_is_used_by_a_request_that_names_the_file(tiny_model_dirs, tmp_path):
    plain = make_unet_lora(tiny_model_dirs["sd1"], StableDiffusionPipeline, tmp_path / "plain.safetensors")
    model = ModelManager().load(tiny_model_dirs["sd1"])
    width = model.pipe.text_encoder.config.hidden_size
    bundle = tmp_path / "bundle.safetensors"
    save_file({**load_file(plain), "bundle_emb.mychar.string_to_param.*": torch.randn(1, width) * 3}, bundle)

    def picture(file):
        req = GenerateRequest("a photo of mychar", concepts=[(load_lora(file), 1.0)], seed=2, steps=3, width=64,
                              height=64, preview_every=0)
        return np.array(generate(model, req).images[0])

    assert not np.array_equal(picture(bundle), picture(plain)), "the bundled word was not applied"


def test_cli_concept_takes_a_lora_with_a_weight_and_weight_0_is_the_picture_without_it(demo_model_dir, tmp_path,
                                                                                      capsys):
    """The issue's interface: `studio generate --model assets/demo-model --prompt P --concept FILE[:WEIGHT]`."""
    lora = make_unet_lora(demo_model_dir, StableDiffusionPipeline, tmp_path / "demo-lora.safetensors", scale=0.5)

    def run(*concept: str) -> np.ndarray:
        out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}.png"
        args = ["generate", "--model", str(demo_model_dir), "--prompt", "a red circle", "--seed", "4", "--steps",
                "8", "--out", str(out)]
        for c in concept:
            args += ["--concept", c]
        assert main(args) == 0
        return np.array(Image.open(out))

    without = run()
    assert np.array_equal(run(f"{lora}:0"), without)
    assert not np.array_equal(run(f"{lora}:1"), without), "the LoRA had no effect on the demo model's picture"
    assert "<lora:demo-lora:1>" in Image.open(sorted(tmp_path.glob("out-*.png"))[-1]).info["parameters"]

    capsys.readouterr()
    assert main(["generate", "--model", str(demo_model_dir), "--prompt", "a cat", "--concept", f"{lora}:heavy",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'heavy' is not a weight" in err
