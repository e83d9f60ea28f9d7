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
