"""Pictures from users, opened safely and fitted to a model.

`open_picture` is the one way a picture from outside (an upload, a CLI path, a training folder) is decoded: it
refuses a file too large to read, reads only the header to refuse a picture of too many pixels (a decompression
bomb: a few KB that claim 100000x100000), and only then decodes. `working_size` / `fit_to_model` scale a picture to
a size the model can draw at, so a camera original is not run at 8000x6000 and a 1x1 icon never reaches diffusers'
"multiples of 8" check.
"""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from studio.errors import UserError

# A file over this many bytes is refused before it is read: several times a 48-megapixel camera JPEG (about 10-25 MB).
MAX_PICTURE_BYTES = 64 * 1024 * 1024
# A picture of more pixels is refused from its header, before it is decoded. Pillow's own default MAX_IMAGE_PIXELS
# (1024 * 1024 * 1024 // 4 // 3), where it warns of a decompression bomb: ~270 MB once decoded as RGB, and above any
# 48- or 50-megapixel camera. Kept here so that no global Pillow setting is read or changed.
MAX_PICTURE_PIXELS = 89_478_485
# Formats decoded, by Pillow's format id (JPEG includes the MPO files many phones write). Other decoders are never
# tried on an upload: EPS runs Ghostscript, and TIFF, PSD and the rest are large parsers no one needs here.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
ADVICE = "upload a PNG, JPEG or WebP"

# Sizes, in pixels. diffusers' SD pipelines need sides that are multiples of the VAE's factor 8.
SIDE_STEP = 8
# The largest side asked for explicitly: A1111's width/height sliders end at 2048 (SDXL's 2x, SD1's 4x); small test
# and demo models (native 32 or 64 px) get 4x their native side.
MAX_SIDE = 2048
LARGEST_SIDE_FACTOR = 4
# The smallest side: an eighth of the native side, as A1111's sliders start at 64 for SD1's 512 (and 8 at least).
SMALLEST_SIDE_DIVISOR = 8
# An uploaded picture runs at its own size up to 2x the model's native side (SD1 1024, SD2 1536, SDXL 2048), the
# sizes A1111 users run img2img at without an upscaler; a larger one is scaled down to fit.
PICTURE_SIDE_FACTOR = 2

# What Pillow raises on a broken file: UnidentifiedImageError and "image file is truncated" are OSErrors; broken PNG
# chunks raise SyntaxError; an oversized text chunk ValueError; cut-off headers EOFError or struct.error.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


class PictureError(UserError):
    """A picture that cannot be used; the message says which, what is wrong and what to do.

    `problem` is the middle part alone (e.g. "not a readable picture (image file is truncated)"), for callers that
    give their own advice, such as the trainer leaving a picture out."""

    def __init__(self, name: str, problem: str, advice: str = ADVICE):
        super().__init__(f"{name}: {problem}; {advice}")
        self.name, self.problem = name, problem


def open_picture(source: str | os.PathLike | bytes | Image.Image, *, what: str | None = None) -> Image.Image:
    """Decode `source` (a path, the file's bytes, or a PIL image) into a new RGB picture, upright per its EXIF.

    Refused with a one-line PictureError: a file over MAX_PICTURE_BYTES, a picture over MAX_PICTURE_PIXELS (checked
    on the header, before decoding), an empty, truncated or non-picture file, a picture of 0 pixels. Transparent
    parts become white. `what` names the picture in messages (default: the file's name, else "the picture")."""
    # 1. Name, and the byte cap (a path's size is read from the file system, not from the file).
    if isinstance(source, Image.Image):
        name = what or "the picture"
        return _to_rgb(_decoded(source, name))
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, size, fp = what or "the picture", len(source), io.BytesIO(source)
    else:
        path = Path(source)
        name = what or path.name
        if not path.is_file():
            raise PictureError(name, f"no such file ({path})", "check the path")
        size, fp = path.stat().st_size, path
    if size > MAX_PICTURE_BYTES:
        raise PictureError(name, f"the file is {size / 2**20:.0f} MB, more than the {MAX_PICTURE_BYTES // 2**20} MB a "
                                 "picture may have", "scale it down or save it as JPEG")
    if size == 0:
        raise PictureError(name, "not a readable picture (the file is empty)")
    # 2. The header only (Image.open is lazy), then decode.
    try:
        with Image.open(fp, formats=FORMATS) as lazy:
            return _to_rgb(_decoded(lazy, name))
    except PictureError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own refusal, at twice its warning size
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_many_pixels(name, int(claimed.group(1)) if claimed else None) from None
    except _DECODE_ERRORS as exc:
        raise PictureError(name, f"not a readable picture ({_reason(exc)})") from None


def _decoded(image: Image.Image, name: str) -> Image.Image:
    """`image` decoded and upright, after its header passed the pixel cap; a new picture, never `image` itself."""
    width, height = image.size
    if width * height > MAX_PICTURE_PIXELS:
        raise _too_many_pixels(name, width * height, image.size)
    if width <= 0 or height <= 0:
        raise PictureError(name, f"not a readable picture (it is {width}x{height}, 0 pixels)")
    try:
        image.load()
        upright = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as exc:
        raise PictureError(name, f"not a readable picture ({_reason(exc)})") from None
    return upright.copy() if upright is image else upright


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit greys: convert("RGB") would clip them to white
        image = Image.fromarray((np.asarray(image, np.float64) / 257).clip(0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))  # transparent parts become white
        return white
    return image.convert("RGB")


def _too_many_pixels(name: str, pixels: int | None, size: tuple[int, int] | None = None) -> PictureError:
    told = f"{size[0]}x{size[1]} is " if size else "it is "
    told += f"{pixels:,} pixels" if pixels else "too many pixels"
    side = int(MAX_PICTURE_PIXELS ** 0.5)
    return PictureError(name, f"{told}, more than the {MAX_PICTURE_PIXELS:,} ({MAX_PICTURE_PIXELS / 1e6:.0f} "
                              "megapixels) a picture may have (a decompression bomb, or just too large)",
                        f"scale it down (to {side}x{side} or less) and try again")


def _reason(exc: BaseException) -> str:
    text = str(exc).split("\n")[0]
    if "cannot identify image file" in text:  # Pillow names the file object here, not the problem
        return "not a PNG, JPEG or WebP file"
    return text or exc.__class__.__name__


def side_limits(native_side: int) -> tuple[int, int]:
    """(smallest, largest) width or height a model of `native_side` px draws at, both multiples of SIDE_STEP."""
    smallest = max(SIDE_STEP, -(-native_side // SMALLEST_SIDE_DIVISOR // SIDE_STEP) * SIDE_STEP)
    return smallest, min(MAX_SIDE, LARGEST_SIDE_FACTOR * native_side)


def working_size(size: tuple[int, int], native_side: int) -> tuple[int, int]:
    """The size a picture of `size` is drawn at on a model of `native_side`: its own, aspect kept, when its longer
    side is within PICTURE_SIDE_FACTOR x native, else scaled down to that; scaled up until the shorter side reaches
    the smallest of side_limits; sides rounded to multiples of SIDE_STEP. A size that already fits is kept."""
    width, height = size
    smallest, largest = side_limits(native_side)
    box = min(largest, PICTURE_SIDE_FACTOR * native_side)
    scale = min(1.0, box / max(width, height))
    scale = max(scale, smallest / min(width, height))

    def side(value: int) -> int:  # a very long, thin picture is squeezed rather than made longer than the box
        return min(box, max(smallest, SIDE_STEP * int(value * scale / SIDE_STEP + 0.5)))

    return side(width), side(height)


def fit_to_model(image: Image.Image, native_side: int) -> Image.Image:
    """`image` at its `working_size` for a model of `native_side` px (the same picture when it already fits)."""
    return scaled(image, working_size(image.size, native_side))


def scaled(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` resized to `size` (Pillow's default bicubic filter); the same picture when it has that size."""
    if image.size == size:
        return image
    # reducing_gap: a camera original is first shrunk by whole factors (fast), then filtered.
    return image.resize(size, Image.BICUBIC, reducing_gap=3.0)
