"""Prior preservation's class pictures: what the base model draws for "a photo of a <class>", drawn once and kept.

DreamBooth (Ruiz et al. 2023) trains on these beside the concept's pictures so that "<class>" keeps meaning what it
meant (diffusers' `--with_prior_preservation --class_data_dir`). They are drawn by the studio's own generation path
from the loaded model with seeds 0.., written as PNGs (with their parameters) in a folder named by the prompt and
the model, and reused by every later run that asks for as many or fewer.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from studio.engine.names import file_stem, inside

CLASS_STEPS = 25  # denoising steps per class picture (diffusers' script uses the pipeline's default, 50)


def class_folder(root: Path, model_name: str, prompt: str) -> Path:
    """`root/<prompt as a file stem>-<8 hex of model and prompt>`: one folder per model and class prompt."""
    digest = hashlib.sha256(f"{model_name}\n{prompt}".encode()).hexdigest()[:8]
    return inside(root, f"{file_stem(prompt)}-{digest}")


def class_pictures(model, prompt: str, count: int, root: Path, seed: int = 0) -> list[Path]:
    """`count` pictures of `prompt` by `model`: the ones on disk, plus the missing ones drawn now (seeds `seed`..)."""
    from studio.engine.generate import GenerateRequest, generate, save_png

    folder = class_folder(root, model.name, prompt)
    paths = [folder / f"{k:04d}.png" for k in range(count)]
    for k, path in enumerate(paths):
        if not path.is_file():
            result = generate(model, GenerateRequest(prompt, seed=seed + k, steps=CLASS_STEPS))
            save_png(result.images[0], path)
    return paths
