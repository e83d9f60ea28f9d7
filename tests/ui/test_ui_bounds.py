"""Bounds through a real server and gradio_client: a camera-sized content picture is drawn at the model's working
size, a broken one or a decompression bomb is refused in one clear line (by the studio, not by Gradio's decoder),
and Cancel stops a running style transfer within a step."""

import re
import struct
import zlib

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from studio.engine.models import ModelManager
from studio.library import ConceptLibrary
from studio.ui.app import build_app
from ui_server import UNetCalls, launch, wait_until_running

CONTENT_SIZE = (1200, 900)  # a camera-like picture, far above the working size
WORKING_SIZE = (192, 144)  # 2x the model's native 96 px, aspect kept


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A studio on a tiny SD1 pipeline of native side 96 (UNet sample size 48): a step at its working size takes
    about 0.1-0.3 s on one CPU core, so a transfer of 20 steps runs long enough to be cancelled halfway."""
    from benchmarks.architectures import build_random_pipeline

    root = tmp_path_factory.mktemp("native-96")
    pipe = build_random_pipeline("sd1", "tiny", tokenizer_dir=root / "tok")
    pipe.unet.register_to_config(sample_size=48)
    pipe.save_pretrained(root / "model")
    manager = ModelManager()
    manager.load(root / "model")
    app = build_app(manager, ConceptLibrary(root / "library"))
    yield launch(app), manager
    app.close()


@pytest.fixture(scope="module")
def content(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("content") / "camera.jpg"
    Image.radial_gradient("L").resize(CONTENT_SIZE).convert("RGB").save(path, quality=90)
    return str(path)


def test_a_big_content_picture_is_transferred_at_the_working_size(server, content):
    client = Client(server[0], verbose=False)
    before, after = client.predict(handle_file(content), "a picture in mosaic style", 0.1, 3,
                                   api_name="/style_transfer")
    assert Image.open(before["image"]).size == WORKING_SIZE
    assert Image.open(after["image"]).size == WORKING_SIZE
    assert f"Size: {WORKING_SIZE[0]}x{WORKING_SIZE[1]}" in Image.open(after["image"]).info["parameters"]


def test_a_truncated_picture_or_a_bomb_gives_one_clear_line_and_the_server_lives_on(server, content, tmp_path):
    cut = tmp_path / "cut.jpg"
    with open(content, "rb") as whole:
        cut.write_bytes(whole.read()[:2000])
    client = Client(server[0], verbose=False)
    with pytest.raises(Exception, match=re.escape("content picture cut.jpg: not a readable picture (image file is "
                                                  "truncated") + r".*; upload a PNG, JPEG or WebP"):
        client.predict(handle_file(str(cut)), "a cat", 0.5, 1, api_name="/style_transfer")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"  # a header claiming 100000x100000, and no pixels: Gradio's decoder never sees it
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    with pytest.raises(Exception, match=r"content picture bomb.png: it is 10,000,000,000 pixels, .*decompression bomb"):
        client.predict(handle_file(str(bomb)), "a cat", 0.5, 1, api_name="/style_transfer")
    assert len(client.predict(handle_file(content), "a cat", 0.1, 1, api_name="/style_transfer")) == 2


def test_cancel_style_stops_a_running_transfer_within_a_step(server, content):
    url, manager = server
    client = Client(url, verbose=False)
    with UNetCalls(manager.current.pipe) as unet:
        job = client.submit(handle_file(content), "a picture in mosaic style", 1.0, 5, api_name="/style_transfer")
        wait_until_running(job)
        client.predict(api_name="/cancel_style")  # not queued behind the transfer: it runs at once
        steps_at_cancel = unet.count
        with pytest.raises(Exception, match=r"cancelled at step (\d+) of 20") as caught:
            job.result(timeout=60)
        assert int(re.search(r"step (\d+) of 20", str(caught.value)).group(1)) < 20
        assert unet.count - steps_at_cancel <= 1  # at most the step that was running
    assert len(client.predict(handle_file(content), "a cat", 0.1, 1, api_name="/style_transfer")) == 2
