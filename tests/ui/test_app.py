"""The studio end to end through a real Gradio server and gradio_client: train, generate, style, compose, inpaint."""

import pytest
from gradio_client import Client, handle_file
from PIL import Image


@pytest.fixture(scope="module")
def server(studio_server):
    return studio_server[0]


@pytest.fixture(scope="module")
def pictures(concept_pictures):
    return concept_pictures


def _parameters(path) -> str:
    return Image.open(path).info.get("parameters", "")


def test_generate_returns_pngs_carrying_their_parameters(server):
    client = Client(server, verbose=False)
    gallery = client.predict("a red cat", "", 7, 2, 7.5, "euler_a", 32, 32, 2, api_name="/generate")
    assert len(gallery) == 2
    text = _parameters(gallery[0]["image"])
    assert text.startswith("a red cat\n") and "Seed: 7" in text and "Size: 32x32" in text


def test_train_then_use_the_word_everywhere_and_sessions_stay_apart(server, pictures):
    client = Client(server, verbose=False)
    status, concept_file = client.predict([handle_file(p) for p in pictures], "<blue-box>", "toy", "object",
                                          1, 4, 0.005, 2, api_name="/train")
    assert "<blue-box> is ready" in status and concept_file.endswith("blue-box.safetensors")
    gallery = client.predict("a photo of <blue-box>", "", 1, 2, 7.5, "euler_a", 32, 32, 1, api_name="/generate")
    assert "Concepts: <blue-box>" in _parameters(gallery[0]["image"])

    before_after = client.predict(handle_file(pictures[0]), "a picture of <blue-box>", 0.5, 3, api_name="/style_transfer")
    assert len(before_after) == 2 and "Concepts: <blue-box>" in _parameters(before_after[1]["image"])
    grid = client.predict("<blue-box>", "red", "a {A} on a {B} background", 2, api_name="/compose")
    assert len(grid) == 2 and "Concepts: <blue-box>" in _parameters(grid[0]["image"])

    other = Client(server, verbose=False)  # another browser session: the session concept is not there
    gallery = other.predict("a photo of <blue-box>", "", 1, 2, 7.5, "euler_a", 32, 32, 1, api_name="/generate")
    assert "Concepts:" not in _parameters(gallery[0]["image"])

    exported = client.predict("<blue-box>", "a1111", api_name="/export_concept")
    assert exported.endswith("blue-box.pt")


def test_inpaint_and_bad_input_gives_a_readable_error_and_the_server_lives_on(server, pictures):
    client = Client(server, verbose=False)
    mask = Image.new("RGBA", (48, 48), (0, 0, 0, 0))
    mask.paste((255, 255, 255, 255), (5, 5, 20, 20))
    mask_path = pictures[0].replace("p0.png", "mask.png")
    mask.save(mask_path)
    value = {"background": handle_file(pictures[0]), "layers": [handle_file(mask_path)], "composite": None}
    out = client.predict(value, "a blue star", 0.9, api_name="/inpaint")
    assert len(out) == 2 and Image.open(out[1]["image"]).size == (48, 48)

    with pytest.raises(Exception, match="multiples of 8 but are 65"):
        client.predict("a cat", "", 1, 2, 7.5, "euler_a", 65, 64, 1, api_name="/generate")
    assert len(client.predict("a cat", "", 1, 2, 7.5, "euler_a", 32, 32, 1, api_name="/generate")) == 1
