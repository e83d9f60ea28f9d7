"""Hostile files, made as a stranger would make them to upload to a public studio, for the tests of the readers that
fail closed (tests/engine/test_hostile_files.py, tests/test_library_hostile.py; tests/ is on sys.path through its
conftest.py).

Each is small on disk and claims to be something expensive or impossible to read: a PNG embedding whose text is JSON
nested 50,000 deep (Python's parser: RecursionError), a PNG whose header claims 20000 x 20000 pixels (Pillow:
DecompressionBombError), a sparse 100 GB safetensors file (a reader would map or copy 100 GB), a safetensors header
whose offsets point far past the file's end, a torch `.pt` whose zip entry inflates to hundreds of MB from ~1 MB.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zipfile
import zlib
from pathlib import Path

import torch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def a1111_embedding_text(dim: int = 128) -> str:
    """The base64 JSON A1111 writes into a picture's `sd-ti-embedding` chunk, for a one-vector embedding."""
    data = {"string_to_param": {"*": {"TORCHTENSOR": [[0.01] * dim]}}, "name": "card", "step": 1}
    return base64.b64encode(json.dumps(data).encode()).decode()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def nested_json_png(path: Path, depth: int = 50_000) -> Path:
    """An 8x8 PNG whose embedding chunk is base64 of `[[[...]]]` nested `depth` deep (~130 KB for 50,000)."""
    text = base64.b64encode(b"[" * depth + b"]" * depth)
    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\0" + b"\0" * 24 for _ in range(8)))
    path.write_bytes(PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"tEXt", b"sd-ti-embedding\0" + text)
                     + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b""))
    return path


def pixel_bomb_png(path: Path, side: int = 20_000) -> Path:
    """A PNG of a few hundred bytes whose header claims `side` x `side` pixels, with a valid embedding chunk."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    text = b"sd-ti-embedding\0" + a1111_embedding_text().encode()
    path.write_bytes(PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"tEXt", text)
                     + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))
    return path


def _safetensors_header(tensors: dict[str, dict], metadata: dict[str, str] | None = None) -> bytes:
    header = dict(tensors)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
    return struct.pack("<Q", len(text)) + text


def sparse_safetensors(path: Path, gigabytes: int = 100) -> Path:
    """A valid safetensors file of `gigabytes` GB holding one embedding tensor, made sparse (a few KB on disk)."""
    rows = gigabytes * 2**30 // (128 * 4)
    head = _safetensors_header({"emb_params": {"dtype": "F32", "shape": [rows, 128],
                                               "data_offsets": [0, rows * 128 * 4]}})
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(len(head) + rows * 128 * 4)
    return path


def lying_safetensors(path: Path) -> Path:
    """A 1 KB safetensors file whose header says its one tensor lies at bytes 0 to 100 GB."""
    rows = 100 * 2**30 // (128 * 4)
    path.write_bytes(_safetensors_header({"emb_params": {"dtype": "F32", "shape": [rows, 128],
                                                         "data_offsets": [0, rows * 128 * 4]}}) + b"\0" * 1024)
    return path


def zip_bomb_pt(path: Path, megabytes: int = 400) -> Path:
    """A torch `.pt` (zip) holding `{"emb_params": tensor}` whose storage entry is `megabytes` MB of zeros,
    deflate-compressed to ~1/1000 of that: torch's reader inflates it whole. Made from a real `torch.save` of a
    small tensor whose element count (a number found once in the pickle) is rewritten to the large one."""
    small, large = 123_457, megabytes * 2**20 // 4
    buffer = io.BytesIO()
    torch.save({"emb_params": torch.zeros(small)}, buffer)
    template = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(path, "w") as bomb:
        for info in template.infolist():
            data = template.read(info)
            if info.filename.endswith("data.pkl"):
                marker = b"J" + struct.pack("<i", small)  # pickle's BININT opcode and the count
                assert marker in data, "torch's pickle no longer stores the element count as BININT"
                bomb.writestr(info.filename, data.replace(marker, b"J" + struct.pack("<i", large)))
            elif info.filename.endswith("/data/0"):
                deflated = zipfile.ZipInfo(info.filename)
                deflated.compress_type = zipfile.ZIP_DEFLATED
                with bomb.open(deflated, "w", force_zip64=True) as entry:
                    block = bytes(2**20)
                    for _ in range(large * 4 // len(block)):
                        entry.write(block)
            else:
                bomb.writestr(info.filename, data)
    return path
