"""Training pictures: load, check, crop, flip, and encode each one once with the VAE (the latent cache)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from studio.engine.pictures import PictureError, open_picture
from studio.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
MIN_SIDE = 32  # smaller pictures carry too little to learn from


class TrainError(UserError):
    """Training cannot start or go on; the message says what to do."""


@dataclass
class TrainingImage:
    path: Path
    image: Image.Image  # RGB, square, at the training resolution
    caption: str | None


def find_images(images: list[Path] | Path | str) -> list[Path]:
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise TrainError(f"{folder} is not a folder of pictures")
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [Path(p) for p in images]


def caption_path(picture: Path) -> Path:
    """Where a picture's caption is read from: `name.txt` beside `name.png` (kohya's and A1111's layout)."""
    return picture.with_suffix(".txt")


def check_captions(images: list[TrainingImage]) -> None:
    """For template "captions": every picture needs a caption; else a TrainError naming the ones without (a run
    would otherwise prompt them with something the user did not write)."""
    missing = [item.path for item in images if not item.caption]
    if not missing:
        return
    shown = ", ".join(f"{p.name} ({caption_path(p).name} {'is empty' if caption_path(p).is_file() else 'missing'})"
                      for p in missing[:10])
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    raise TrainError(f"template 'captions' needs a caption for every picture, but {len(missing)} of {len(images)} "
                     f"have none: {shown}{more}. Write each one's caption in a .txt file of the picture's name beside "
                     "it (with {} or [name] where the new word goes), or train with template 'object' or 'style'")


def load_images(paths: list[Path], resolution: int) -> tuple[list[TrainingImage], list[str]]:
    """Load and center-crop every readable picture; return them and one warning per picture left out.

    Pictures are opened by `open_picture` (upright, transparency on white); a broken file, or one too large to
    decode (a decompression bomb), is left out with a warning without being decoded in full."""
    good, warnings = [], []
    for path in paths:
        try:
            img = open_picture(path)
        except PictureError as exc:
            warnings.append(f"{path.name}: {exc.problem}; left out")
            continue
        if min(img.size) < MIN_SIDE:
            warnings.append(f"{path.name}: {img.size[0]}x{img.size[1]} is smaller than {MIN_SIDE}px; left out")
            continue
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        caption_file = caption_path(path)
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else None
        good.append(TrainingImage(path, img, caption))
    if not good:
        detail = "; ".join(warnings) if warnings else "no PNG/JPEG/WebP files were given"
        raise TrainError(f"no usable training pictures: {detail}")
    return good, warnings


@torch.no_grad()
def encode_latents(vae, images: list[TrainingImage], flip: bool, device, dtype, batch: int = 8) -> torch.Tensor:
    """VAE latents of every picture (and its mirror image), computed once: [N(*2), 4, h, w].

    The posterior mean is used (A1111's "deterministic" latent sampling), shifted by the VAE's shift factor (SD3's
    and Flux's VAEs have one) and scaled by its scaling factor, as the pipelines do. `batch` pictures go through the VAE at a time (1 saves memory on large models).
    """
    arrays = []
    for item in images:
        arr = np.asarray(item.image, dtype=np.float32) / 127.5 - 1.0
        arrays.append(arr)
        if flip:
            arrays.append(arr[:, ::-1].copy())
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(device=device, dtype=dtype)
    latents = torch.cat([vae.encode(pixels[i:i + batch]).latent_dist.mean for i in range(0, len(pixels), batch)])
    return (latents - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor
