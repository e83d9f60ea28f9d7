"""`studio train` then `studio generate` as subprocesses on a tiny model: the file written is used."""

import subprocess
import sys

import numpy as np
from PIL import Image


def _studio(*args, cwd):
    return subprocess.run([sys.executable, "-m", "studio", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_train_then_generate_with_the_learned_file(tiny_model_dirs, tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    for k in range(2):
        arr = np.full((40, 40, 3), 30 * k, np.uint8)
        Image.fromarray(arr).save(pics / f"{k}.png")
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    done = _studio("train", "--model", tiny_model_dirs["sd1"], "--images", pics, "--token", "<dark>", "--init", "toy",
                   "--steps", "3", "--batch", "1", "--out", tmp_path, cwd=repo)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "x.png"
    done = _studio("generate", "--model", tiny_model_dirs["sd1"], "--prompt", "a photo of <dark>", "--concept",
                   tmp_path / "dark.safetensors", "--steps", "2", "--width", "32",
                   "--height", "32", "--seed", "4", "--out", out, cwd=repo)
    assert done.returncode == 0, done.stderr
    params = Image.open(out).info["parameters"]
    assert "Seed: 4" in params and "Concepts: <dark>" in params  # the file answers to the trained word


def test_user_errors_are_one_line_without_traceback(tiny_model_dirs, tmp_path):
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    done = _studio("generate", "--model", tiny_model_dirs["sd1"], "--prompt", "x", "--width", "65", cwd=repo)
    assert done.returncode == 2
    assert "multiples of 8" in done.stderr and "Traceback" not in done.stderr


def test_bad_sizes_and_pictures_are_one_line_exit_2_before_the_model_loads(tmp_path):
    """Guards against a 100000-wide request, or a broken --init-image, reaching the model: refused first (no --model
    is needed to be refused, and none is loaded: the demo model is never looked for)."""
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    done = _studio("generate", "--prompt", "x", "--width", "100000", cwd=repo)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("studio generate: error: width 100000 is outside 8..2048, the sizes any model "
                                   "draws at; choose a multiple of 8 in that range")
    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(whole)
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[:300])
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    for picture, why in ((cut, "image file is truncated"), (text, "not a PNG, JPEG or WebP file")):
        done = _studio("generate", "--prompt", "x", "--init-image", picture, cwd=repo)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines() == [
            f"studio generate: error: --init-image {picture}: not a readable picture ({why}); upload a PNG, JPEG "
            "or WebP"]
    done = _studio("generate", "--prompt", "x", "--seed", str(2**70), cwd=repo)
    assert done.returncode == 2 and "seed 1180591620717411303424 is out of range" in done.stderr


def test_an_init_image_runs_at_the_working_size_and_seed_minus_1_is_random(tiny_model_dirs, tmp_path):
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    picture = tmp_path / "big.png"
    Image.new("RGB", (300, 200), (200, 40, 40)).save(picture)
    out = tmp_path / "out.png"
    done = _studio("generate", "--model", tiny_model_dirs["sd1"], "--prompt", "a cat", "--init-image", picture,
                   "--steps", "2", "--seed", "-1", "--out", out, cwd=repo)
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (64, 40)  # 2x the tiny model's 32 px side, aspect kept
    assert "Seed: -1," not in Image.open(out).info["parameters"]


def test_train_resume_continues_a_stopped_run_with_memory_and_precision_flags(tiny_model_dirs, tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    for k in range(2):
        Image.fromarray(np.full((40, 40, 3), 60 + 50 * k, np.uint8)).save(pics / f"{k}.png")
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    common = ("train", "--model", tiny_model_dirs["sd1"], "--images", pics, "--token", "<grey>", "--init", "toy",
              "--batch", "1", "--out", tmp_path)
    done = _studio(*common, "--steps", "2", "--save-every", "1", cwd=repo)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "grey-step1.safetensors.trainstate").is_file()
    done = _studio(*common, "--steps", "3", "--resume", tmp_path, "--memory", "low-vram", "--mixed-precision", "bf16",
                   cwd=repo)
    assert done.returncode == 0, done.stderr
    said = done.stdout + done.stderr
    assert "resumed from grey.safetensors at step 2" in said
    assert "memory mode low-vram (savings: gradient checkpointing" in said and "precision bf16" in said
    done = _studio(*common, "--steps", "3", "--resume", tmp_path / "missing", cwd=repo)
    assert done.returncode == 2 and "nothing to resume at" in done.stderr and "Traceback" not in done.stderr
