"""LoRA files in the tabs, through a real server: `<lora:name:w>` in a prompt applies the library's LoRA for that
request only (two clients at once, one with and one without, each get the pictures of their single runs), a tag that
names nothing is one line to the client, the Library table gives kind, rank and why a file does not fit, and the
pickers insert a LoRA as its tag.

The LoRA is written in the test for the server's own tiny SD1 UNet (random A and B on its attention projections),
saved by diffusers' `save_lora_weights`.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image
from safetensors.torch import save_file

from studio.library import ConceptLibrary
from studio.ui.state import Studio
from studio.ui.tabs.generate import insert_word, variation_fields

PROJECTIONS = ("to_q", "to_k", "to_v")
SEED, STEPS, SIDE = 5, 3, 32


def write_unet_lora(unet, path, seed: int = 1, rank: int = 4, scale: float = 0.3) -> None:
    """A LoRA for `unet` (random A and B on every attention's q/k/v projection), moved into `path` once written."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in unet.named_modules():
        if name.rpartition(".")[2] in PROJECTIONS and isinstance(module, torch.nn.Linear):
            layers[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * scale
            layers[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * scale
    staging = path.parent.parent / f"staging-{path.stem}"
    StableDiffusionPipeline.save_lora_weights(staging, unet_lora_layers=layers, weight_name=path.name)
    os.replace(staging / path.name, path)


@pytest.fixture(scope="module")
def lora_x(studio_server):
    """`x.safetensors` in the server's shared library, made for its UNet before any request touched it."""
    _, manager, root = studio_server
    path = root / "x.safetensors"
    write_unet_lora(manager.current.pipe.unet, path)
    return path


def generate(client: Client, prompt: str):
    return client.submit(prompt, "", SEED, STEPS, 7.5, "euler_a", SIDE, SIDE, 1, api_name="/generate")


def picture(gallery) -> tuple[np.ndarray, str]:
    image = Image.open(gallery[0]["image"])
    return np.array(image.convert("RGB")), image.info.get("parameters", "")


def test_two_clients_with_and_without_a_lora_at_once_get_their_single_run_pictures(studio_server, lora_x):
    """Guards the shared UNet between users: one client's LoRA never reaches the other's picture, nor stays on."""
    url, _, _ = studio_server
    prompts = ["a photo of a cat <lora:x:1>", "a photo of a cat"]
    alone = [picture(generate(Client(url, verbose=False), prompt).result(timeout=300)) for prompt in prompts]
    assert not np.array_equal(alone[0][0], alone[1][0]), "the LoRA had no effect on the picture"
    assert "<lora:x:1>" in alone[0][1] and 'Lora hashes: "x: ' in alone[0][1]
    assert "<lora:" not in alone[1][1] and "Lora hashes" not in alone[1][1]

    for order in (prompts, prompts[::-1]):  # each of the two first in the queue once
        clients = [Client(url, verbose=False) for _ in order]
        jobs = [generate(client, prompt) for client, prompt in zip(clients, order)]
        together = dict(zip(order, (picture(job.result(timeout=300))[0] for job in jobs)))
        for prompt, (expected, _) in zip(prompts, alone):
            assert np.array_equal(together[prompt], expected), f"{prompt!r} run beside the other differs"


def test_a_tag_naming_no_lora_is_one_line_to_the_client(studio_server, lora_x):
    url, _, _ = studio_server
    with pytest.raises(AppError) as error:
        generate(Client(url, verbose=False), "a cat <lora:nothing:1>").result(timeout=300)
    message = str(error.value)
    assert "<lora:nothing> names no LoRA file in the library or this session (LoRAs here: x)" in message, message
    assert "\n" not in message.strip()


def test_the_library_table_gives_kind_rank_and_why_a_lora_does_not_fit(studio_server, lora_x):
    url, _, root = studio_server
    xl = {  # an SDXL LoRA: its cross-attention reads 2048-wide prompt embeddings (SDXL's two encoders joined)
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(4, 2048),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(640, 4),
    }
    save_file(xl, root / "xl.safetensors")
    table = Client(url, verbose=False).predict(api_name="/library")
    listed = {row[0]: dict(zip(table["headers"], row)) for row in table["data"]}
    assert (listed["x"]["kind"], listed["x"]["rank"], listed["x"]["fits"]) == ("lora", 4, True)
    assert listed["xl"]["fits"] is False and "xl.safetensors: a LoRA for sdxl, but the model" in listed["xl"]["reason"]
    (root / "xl.safetensors").unlink()


def test_pickers_offer_a_lora_as_its_tag_and_variations_take_it(studio_server, lora_x, tmp_path):
    """The choices every tab's concept picker gets (`Studio.concept_choices`), and what picking one writes."""
    _, manager, root = studio_server
    studio = Studio(manager, ConceptLibrary(root, watch=False), work_dir=tmp_path)
    choices = studio.concept_choices("s")
    assert ("x (lora)", "<lora:x:1>") in choices
    assert insert_word("<lora:x:1>", "a photo of a cat") == "a photo of a cat <lora:x:1>"
    assert variation_fields(studio, "<lora:x:1>", "s", {})["prompt"] == "a photo of <lora:x:1>"
    with pytest.raises(Exception, match="names no LoRA"):
        variation_fields(studio, "<lora:nothing:1>", "s", {})
