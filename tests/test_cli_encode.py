"""`studio encode` and an image concept through `studio generate --concept` and `studio concepts inspect`.

A tiny random SD1 pipeline and an IP-Adapter with random weights in diffusers' layout (tests/engine/test_image_prompt.py
makes both); what these guard: the command writes an image concept the other commands read (inspect says its kind,
generate draws the engine's picture with it), and bad input stops it in one line (exit 2) before any work, an
existing --out included.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from studio.cli import main
from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.registry import read_learned
from studio.engine.models import ModelManager
from tests.engine.test_image_prompt import _adapter_file, _pictures


@pytest.fixture(scope="module")
def setup(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("encode")
    model = ModelManager().load(tiny_model_dirs["sd1"])
    adapter = _adapter_file(root / "adapter", model.denoiser, plus=False, seed=5)
    (root / "pics").mkdir()
    for i, picture in enumerate(_pictures(12, 3)):
        picture.save(root / "pics" / f"{i}.png")
    return model, adapter, root


def _encode(setup, out, *extra) -> int:
    model, adapter, root = setup
    return main(["encode", "--model", model.source, "--images", str(root / "pics"), "--token", "<toy>",
                 "--adapter", str(adapter), "--out", str(out), *extra])


def test_encode_inspect_and_generate(setup, tmp_path, capsys):
    model = setup[0]
    out = tmp_path / "toy.safetensors"
    assert _encode(setup, out, "--class-word", "toy") == 0
    assert "image concept '<toy>' from 3 picture(s)" in capsys.readouterr().out
    assert main(["concepts", "inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "image" and info["pictures"] == 3 and info["prompt_text"] == "toy"
    png = tmp_path / "toy.png"
    assert main(["generate", "--model", model.source, "--prompt", "<toy> on a black background", "--concept",
                 f"{out}:0.8", "--seed", "4", "--steps", "2", "--width", "64", "--height", "64",
                 "--out", str(png)]) == 0
    req = GenerateRequest("<toy> on a black background", concepts=[(read_learned(out), 0.8)], seed=4, steps=2,
                          width=64, height=64, preview_every=0)
    assert np.array_equal(np.array(Image.open(png).convert("RGB")), np.array(generate(model, req).images[0]))


@pytest.mark.parametrize("change, message", [
    ({"--images": "missing-folder"}, "is not a folder"),
    ({"--images": "empty"}, "holds no pictures"),
    ({"--token": "two words"}, "--token"),
    ({"--out": "toy.png"}, "ends in .safetensors"),
    ({"--adapter": "nowhere/ip.safetensors"}, "not on this machine"),
])
def test_bad_input_is_one_line_and_exit_2(setup, tmp_path, capsys, change, message):
    model, adapter, root = setup
    (tmp_path / "empty").mkdir()
    args = {"--model": model.source, "--images": str(root / "pics"), "--token": "<toy>", "--adapter": str(adapter),
            "--out": str(tmp_path / "toy.safetensors")}
    args.update({k: (str(tmp_path / v) if k in ("--images", "--out") else v) for k, v in change.items()})
    assert main(["encode", *[x for pair in args.items() for x in pair]]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_an_existing_out_is_kept_unless_overwrite(setup, tmp_path, capsys):
    out = tmp_path / "toy.safetensors"
    out.write_bytes(b"mine")
    assert _encode(setup, out) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert _encode(setup, out, "--overwrite") == 0 and read_learned(out).kind == "image"
