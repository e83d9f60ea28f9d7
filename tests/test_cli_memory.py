"""`studio generate --memory MODE` through the real CLI on a tiny model: the mode is reported, applied, images written."""

import pytest
from PIL import Image

from studio.cli import main


@pytest.mark.parametrize("mode, expected", [
    ("fast", "attention slicing off, vae slicing off, vae tiling off"),
    ("balanced", "attention slicing off, vae slicing on, vae tiling off"),
    ("low-vram", "attention slicing on, vae slicing on, vae tiling on"),
    ("auto", "attention slicing off"),  # no CUDA here: auto picks fast
])
def test_memory_mode_is_reported_applied_and_pictures_written(tiny_model_dirs, tmp_path, capsys, mode, expected):
    out = tmp_path / "pic.png"
    code = main(["generate", "--model", str(tiny_model_dirs["sd1"]), "--prompt", "a red cat", "--steps", "2",
                 "--width", "32", "--height", "32", "--seed", "3", "--batch", "2", "--memory", mode, "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    name = "fast" if mode == "auto" else mode
    assert f"memory mode: {name}" in printed
    assert ("(auto)" in printed) == (mode == "auto")
    assert f"memory settings on cpu: {expected}" in printed
    for k in (1, 2):
        picture = Image.open(tmp_path / f"pic-{k}.png")
        assert picture.size == (32, 32) and "Seed: " in picture.info["parameters"]


def test_unknown_memory_mode_is_refused_with_the_choices(tiny_model_dirs, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "a cat", "--memory", "tiny"])
    assert "choose from 'auto', 'fast', 'balanced', 'low-vram'" in capsys.readouterr().err


def test_every_memory_mode_list_is_the_presets_and_auto():
    """Guards a preset added to studio.engine.memory that the CLI or TrainConfig would still refuse."""
    import argparse

    from studio.cli import build_parser
    from studio.engine.memory import MEMORY_MODES, PRESETS
    from studio.training import TrainConfig

    assert MEMORY_MODES == ("auto", *PRESETS)
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("generate", "train"):
        memory = next(a for a in commands[command]._actions if a.dest == "memory")
        assert tuple(memory.choices) == MEMORY_MODES
    assert [TrainConfig("<t>", memory=mode).memory for mode in MEMORY_MODES] == list(MEMORY_MODES)
