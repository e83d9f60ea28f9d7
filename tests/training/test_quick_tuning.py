"""Quick-tuning (`studio train --init-from-encoder`, studio/training/methods/quick_tuning.py) on the demo model with a
3-step demo encoder.

What it guards: the run starts from the encoder's output (at learning rate 0 the written concept draws what `studio
encode --class-word toy` draws), the word then learns beside the image prompt and both are written as one image
concept the library and `generate` read, nothing of the adapter stays on the shared UNet or collects gradients, and
bad uses are one line before any model loads.
"""

from __future__ import annotations

import numpy as np
import torch

from studio.cli import main
from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.image_encoding import encode_pictures
from studio.engine.learned.registry import read_learned
from studio.engine.models import ModelManager
from studio.engine.pictures import open_picture
from studio.demo.concept_sets import CONCEPTS_DIR
from studio.training import TrainConfig, Trainer

PLUM = CONCEPTS_DIR / "toy-plum"


def _picture(model, concepts, prompt="a photo of <plum> on a black background") -> np.ndarray:
    req = GenerateRequest(prompt, seed=4, steps=4, preview_every=0, concepts=list(concepts))
    return np.array(generate(model, req).images[0]).astype(int)


def test_at_learning_rate_0_the_quick_tuned_concept_draws_what_the_encoder_draws(demo_encoder, tmp_path):
    """The word starts at the class word and the image prompt is the encoder's: 1 step at lr 0 changes nothing, so
    the file written draws `encode_pictures(..., prompt_text="toy")`'s picture (within one level)."""
    model = ModelManager().load(None)
    unet = model.denoiser
    processors, proj = dict(unet.attn_processors), unet.encoder_hid_proj
    cfg = TrainConfig("<plum>", init_text="toy", steps=1, batch_size=1, learning_rate=0.0, stop_when_learned=False,
                      init_from_encoder=str(demo_encoder))
    tuned = Trainer(model, cfg, PLUM, tmp_path).run()
    assert unet.attn_processors == processors and unet.encoder_hid_proj is proj  # put back after the run
    read = read_learned(tmp_path / "plum.safetensors")
    assert read.kind == "image" and read.word is not None and read.meta["init_from_encoder"] == str(demo_encoder)
    toy = model.pipe.tokenizer("toy", add_special_tokens=False).input_ids
    assert torch.equal(read.word.vectors["text_encoder"], model.pipe.text_encoder.get_input_embeddings().weight[toy])
    encoded = encode_pictures(model, [open_picture(p) for p in sorted(PLUM.glob("*.png"))], "<plum>",
                              str(demo_encoder), prompt_text="toy")
    assert torch.equal(read.embeds, encoded.embeds) and torch.equal(tuned.embeds, encoded.embeds)
    assert np.abs(_picture(model, [read]) - _picture(model, [encoded])).max() <= 1


def test_the_word_learns_beside_the_image_prompt_and_the_cli_writes_one_image_concept(demo_encoder, tmp_path,
                                                                                     capsys):
    out = tmp_path / "plum.safetensors"
    assert main(["train", "--images", str(PLUM), "--token", "<plum>", "--init", "toy", "--steps", "3", "--batch",
                 "2", "--no-stop-when-learned", "--init-from-encoder", str(demo_encoder), "--out", str(out)]) == 0
    tuned = read_learned(out)
    model = ModelManager().load(None)
    toy = model.pipe.tokenizer("toy", add_special_tokens=False).input_ids
    start = model.pipe.text_encoder.get_input_embeddings().weight[toy]
    assert not torch.equal(tuned.word.vectors["text_encoder"], start)  # the word moved from the class word
    assert tuned.word.token == tuned.token == "<plum>" and tuned.pictures == 5
    parts = model.image_adapters.get(model.denoiser, tuned)
    assert not any(p.requires_grad for m in (parts.projection, *parts.processors.values()) for p in m.parameters())
    with_pictures, word_only = _picture(model, [tuned]), _picture(model, [(tuned, 0.0)])
    assert not np.array_equal(with_pictures, word_only)  # the weight is the image prompt's; 0 leaves the word
    assert np.array_equal(word_only, _picture(model, [tuned.word]))
    assert main(["concepts", "inspect", str(out), "--json"]) == 0 and '"kind": "image"' in capsys.readouterr().out


def test_bad_uses_are_one_line_before_the_model_loads(tmp_path, capsys):
    base = ["train", "--images", str(PLUM), "--token", "<plum>", "--out", str(tmp_path)]
    assert main([*base, "--init-from-encoder", str(tmp_path / "none.safetensors")]) == 2
    assert "--init-from-encoder needs the IP-Adapter" in capsys.readouterr().err
    assert main([*base, "--method", "lora", "--init-from-encoder"]) == 2
    assert "use it with --method ti" in capsys.readouterr().err
