"""Pictures from users: broken files and decompression bombs are refused in one line, before they are decoded;
odd modes become RGB; sizes are fitted to the model."""

import io
import struct
import zlib

import pytest
from PIL import Image

from studio.engine.pictures import (MAX_PICTURE_BYTES, MAX_PICTURE_PIXELS, PictureError, fit_to_model, open_picture,
                                    side_limits, working_size)


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that claims `width` x `height` pixels, followed by almost no pixel data (a bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def one_line_refusal(source, match: str) -> str:
    with pytest.raises(PictureError, match=match) as caught:
        open_picture(source)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_a_truncated_file_is_refused_in_one_line_with_its_name(tmp_path):
    whole = png_bytes(Image.effect_noise((64, 64), 40).convert("RGB"))
    path = tmp_path / "cut.png"
    path.write_bytes(whole[: len(whole) // 2])
    message = one_line_refusal(path, "truncated")
    assert message.startswith("cut.png: not a readable picture (") and message.endswith("upload a PNG, JPEG or WebP")


def test_a_text_file_and_an_empty_file_are_not_pictures(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture at all\n")
    one_line_refusal(text, r"notes.png: not a readable picture \(not a PNG, JPEG or WebP file\)")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    one_line_refusal(empty, r"empty.jpg: not a readable picture \(the file is empty\)")


def test_a_header_claiming_100000x100000_is_refused_without_decoding():
    """Guards against a decompression bomb: a few hundred bytes that would decode to 30 GB."""
    bomb = png_claiming(100_000, 100_000)
    assert len(bomb) < 200
    message = one_line_refusal(bomb, r"it is 10,000,000,000 pixels, more than the 89,478,485 \(89 megapixels\)")
    assert "decompression bomb" in message and "scale it down" in message


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns, and only warns, here
def test_a_picture_just_over_the_pixel_cap_is_named_with_its_size():
    side = int(MAX_PICTURE_PIXELS ** 0.5) + 1  # under Pillow's own error threshold: only our cap stops it
    one_line_refusal(png_claiming(side, side), f"{side}x{side} is {side * side:,} pixels, more than the 89,478,485")


def test_a_file_over_the_byte_cap_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "huge.png"
    with open(big, "wb") as handle:
        handle.truncate(MAX_PICTURE_BYTES + 1)  # sparse: no bytes written, and open_picture reads none
    one_line_refusal(big, r"huge.png: the file is 64 MB, more than the 64 MB")


def test_a_picture_of_0_pixels_is_refused():
    one_line_refusal(Image.new("RGB", (0, 0)), r"0x0, 0 pixels")


def test_rgba_becomes_rgb_on_white_and_1x1_opens():
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = open_picture(png_bytes(rgba))
    assert out.mode == "RGB" and out.size == (4, 2)
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((3, 1)) == (255, 255, 255)
    assert open_picture(png_bytes(Image.new("L", (1, 1), 7))).getpixel((0, 0)) == (7, 7, 7)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif)
    assert open_picture(path).size == (20, 40)


def test_a_pil_image_is_not_changed_in_place():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert open_picture(rgba).getpixel((0, 0)) == (255, 255, 255) and rgba.mode == "RGBA"


@pytest.mark.parametrize("native, smallest, largest", [(32, 8, 128), (64, 8, 256), (512, 64, 2048),
                                                       (768, 96, 2048), (1024, 128, 2048)])
def test_side_limits_follow_the_native_side(native, smallest, largest):
    assert side_limits(native) == (smallest, largest)


def test_working_size_scales_big_pictures_down_and_tiny_ones_up_in_multiples_of_8():
    assert working_size((8000, 6000), 512) == (1024, 768)  # 2x SD1's side, aspect kept
    assert working_size((6000, 8000), 1024) == (1536, 2048)
    assert working_size((1, 1), 512) == (64, 64)  # never diffusers' "multiples of 8" for a 1x1 icon
    assert working_size((500, 375), 512) == (504, 376)
    assert working_size((40, 32), 32) == (40, 32)  # a size that fits is kept
    assert working_size((1, 100_000), 512) == (64, 1024)  # absurdly thin: squeezed into the box


def test_fit_to_model_returns_the_same_picture_when_it_fits():
    small = Image.new("RGB", (48, 32))
    assert fit_to_model(small, 32) is small
    assert fit_to_model(Image.new("RGB", (640, 480)), 32).size == (64, 48)


def test_training_pictures_leave_a_bomb_and_a_broken_file_out_with_a_warning(tmp_path):
    """studio.training.data opens every picture through open_picture: a bomb is left out, never decoded."""
    from studio.training.data import load_images

    (tmp_path / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    (tmp_path / "cut.png").write_bytes(png_bytes(Image.effect_noise((64, 64), 40).convert("RGB"))[:200])
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(tmp_path / "good.png")
    images, warnings = load_images(sorted(tmp_path.glob("*.png")), 32)
    assert [item.path.name for item in images] == ["good.png"]
    assert images[0].image.getpixel((0, 0)) == (255, 255, 255)
    assert warnings[0].startswith("bomb.png: it is 10,000,000,000 pixels") and warnings[0].endswith("; left out")
    assert warnings[1] == "cut.png: not a readable picture (image file is truncated); left out"
