"""Reading files from strangers safely: sizes checked from the container first, and one guard around every reader.

A hostile file is cheap to make and dear to read: a 1.9 MB `.pt` whose zip entries inflate to 2 GB, a safetensors
file of 100 GB (a sparse file) or whose header claims offsets past its end, a PNG whose header claims 20000 x 20000
pixels, an embedding text of deeply nested JSON. So a reader first asks this module what the container claims, from
the few bytes that say so (the zip's central directory, the safetensors header, the JSON's brackets), against a cap
per kind of file (`MAX_EMBEDDING_BYTES`, `MAX_LORA_BYTES`), and only then inflates, maps or parses anything.

What a reader still raises (RecursionError, MemoryError, Pillow's DecompressionBombError, torch's or safetensors'
RuntimeError, an OSError) is turned by `failing_closed` into the reader's own `UserError` naming the file and the
reason, so that no file can take a listing, an upload or a CLI command down with a traceback.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from studio.errors import UserError

# ---- caps, per kind of file ----------------------------------------------------------------------------------------
# An embedding: 75 vectors (A1111's most) of SDXL's 768 + 1280 widths in fp32 is 0.6 MB; a per-layer word (XTI) on
# SDXL's 70 cross-attention layers at 75 vectors is 43 MB, the largest a concept file can be; 50 MB leaves room for
# metadata. A torch or safetensors file of more is refused before it is read.
MAX_EMBEDDING_BYTES = 50 * 2**20
# A LoRA: 5 MB of fp16 weights per unit of rank on SDXL's UNet (its 722 linear layers of attention blocks, kohya's
# default targets; counted on diffusers' SDXL UNet config), so rank 32 is ~160 MB and rank 256 1.3 GB; 2 GB holds
# that with its text-encoder part, and bounds what one upload can make the server hold.
MAX_LORA_BYTES = 2 * 2**30
# The text of an A1111 picture embedding (base64 of JSON): 75 vectors of 1024 floats (SD 2.x) write 2.1 MB. JSON
# becomes Python objects of up to ~20x its size before it is a tensor (an empty list, 64 bytes, per 3 characters
# `[],`), so the text is capped tighter than the file.
MAX_EMBEDDING_TEXT_BYTES = 4 * 2**20
# Nesting of JSON read from a file: A1111's embedding text is 4 deep ({"string_to_param": {"*": {"TORCHTENSOR":
# [[...]]}}}), a safetensors header 3; Python's parser recurses once per level and fails near 1,000.
MAX_JSON_DEPTH = 32
# safetensors' own limit on its JSON header (MAX_HEADER_SIZE in its Rust source); a LoRA's header with kohya's
# training metadata is well under 1 MB.
MAX_SAFETENSORS_HEADER_BYTES = 100_000_000
# A zip's central directory is read whole, one Python object per entry, before any entry is: torch writes ~80 bytes
# per tensor, so 4 MB is ~50,000 tensors (an SDXL LoRA has ~1,500-2,200) and bounds that memory to tens of MB.
MAX_ZIP_DIRECTORY_BYTES = 4 * 2**20
# torch.save writes its zip entries uncompressed (ratio 1); a file whose entries claim 10x its own size is a zip bomb
# (the issue's: 1.9 MB claiming 2 GB), whatever the cap of its kind.
MAX_ZIP_INFLATION = 10

# Bytes per element of each safetensors dtype (its Rust source's Dtype::size); others are left to safetensors.
_SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                            "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes included
_DEPTH_CHUNK = 2**20
_ADVICE = "re-download or re-export it"


# ---- the guard -----------------------------------------------------------------------------------------------------
@contextmanager
def failing_closed(path: str | os.PathLike, error: type[UserError], what: str) -> Iterator[None]:
    """Run a reader of `path`: a `UserError` it raises passes as it is; any other failure (RecursionError,
    MemoryError, DecompressionBombError, RuntimeError, OSError, ...) becomes `error` with one line naming the file,
    `what` it was read as (e.g. "concept file") and the reason. KeyboardInterrupt and SystemExit pass."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the point: no failure of a reader may leave as anything but one line
        raise error(f"{Path(path).name}: not a readable {what} ({reason_of(exc)}); {_ADVICE}") from None


def reason_of(exc: BaseException) -> str:
    """An exception as a short single line: its type and the first line of its message, at most 200 characters."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    name = type(exc).__name__
    return f"{name}: {text[:200]}" if text else name


def _refuse(error: type[UserError], path: Path, problem: str) -> UserError:
    return error(f"{path.name}: {problem}; {_ADVICE}")


def size_text(n_bytes: float) -> str:
    """Bytes for a message: "1.9 MB", "2.0 GB", "12 KB" (powers of 1024, as the caps are written)."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{int(n_bytes)} bytes"


# ---- whole files ---------------------------------------------------------------------------------------------------
def check_file_size(path: Path, max_bytes: int, what: str, error: type[UserError]) -> int:
    """The size of the file at `path` from the file system (nothing is read), refused over `max_bytes`; a sparse file
    counts its apparent size, which is what a reader would map or copy."""
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{path.name}: the file is {size_text(size)}, more than the {size_text(max_bytes)} a {what} may "
                    "have; it is not one, or it is damaged")
    return size


def check_zip(path: Path, max_bytes: int, what: str, error: type[UserError]) -> None:
    """For a zip file (torch's `.pt`/`.bin`/`.ckpt` form; nothing for another file), refuse before anything is
    inflated: a central directory over MAX_ZIP_DIRECTORY_BYTES, entries whose declared sizes add up to more than
    `max_bytes`, or to more than MAX_ZIP_INFLATION times the file's size (a zip bomb). torch's reader allocates each
    entry's declared size and inflates into it, so the declared sizes bound what reading it takes."""
    directory = _zip_directory_size(path)
    if directory is None:
        return  # not a zip: torch's legacy pickle form, read as it is (its size is the file's)
    if directory > MAX_ZIP_DIRECTORY_BYTES:
        raise _refuse(error, path, f"its zip directory is {size_text(directory)}, more than the "
                                   f"{size_text(MAX_ZIP_DIRECTORY_BYTES)} of a {what}")
    with zipfile.ZipFile(path) as archive:
        declared = sum(info.file_size for info in archive.infolist())
    size = path.stat().st_size
    if declared > MAX_ZIP_INFLATION * max(size, 1):
        raise error(f"{path.name}: refused: a {size_text(size)} zip whose entries inflate to {size_text(declared)} "
                    "(a zip bomb; torch writes these files uncompressed); ask for a .safetensors version")
    if declared > max_bytes:
        raise error(f"{path.name}: its contents are {size_text(declared)}, more than the {size_text(max_bytes)} a "
                    f"{what} may have; it is not one, or it is damaged")


def _zip_directory_size(path: Path) -> int | None:
    """The size of a zip's central directory from its end records (zip64's when present), or None for a file that
    is not a zip (one that does not start with a zip entry, as torch's zips do: its legacy pickles start with the
    pickle's own bytes). Read from the file's last 64 KB, as every zip reader finds them."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if handle.read(4) != b"PK\x03\x04":
            return None
        handle.seek(max(0, size - (22 + 65535 + 20)))  # end record + the longest comment + zip64 locator
        tail = handle.read()
        end = tail.rfind(b"PK\x05\x06")
        if end < 0 or len(tail) - end < 22:
            return None
        directory = struct.unpack_from("<I", tail, end + 12)[0]
        locator = end - 20
        if locator >= 0 and tail[locator:locator + 4] == b"PK\x06\x07":
            record_at = struct.unpack_from("<Q", tail, locator + 8)[0]
            handle.seek(record_at)
            record = handle.read(56)
            if len(record) == 56 and record[:4] == b"PK\x06\x06":
                directory = struct.unpack_from("<Q", record, 40)[0]
    return directory


# ---- safetensors ---------------------------------------------------------------------------------------------------
def safetensors_header(path: Path, error: type[UserError]) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensors (`{name: {"dtype", "shape", "data_offsets"}}`) and metadata strings of a safetensors file, from its
    8-byte length and JSON header alone (no tensor is read or mapped), after checking what the header claims: a
    length within the file and MAX_SAFETENSORS_HEADER_BYTES, bounded JSON, shapes of non-negative integers, and each
    tensor's bytes inside the file and of its shape's size. `error` names the file and the problem."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise _refuse(error, path, "not a safetensors file (shorter than its 8-byte header length)")
        length = struct.unpack("<Q", head)[0]
        if length > min(size - 8, MAX_SAFETENSORS_HEADER_BYTES):
            raise _refuse(error, path, f"not a safetensors file (its header claims {size_text(length)} of a "
                                       f"{size_text(size)} file)")
        text = handle.read(length)
    header = load_json(text, path, error, "its safetensors header")
    if not isinstance(header, dict):
        raise _refuse(error, path, "not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _refuse(error, path, "its safetensors metadata is not a map of strings")
    data_bytes = size - 8 - length
    for name, info in header.items():
        _check_tensor_entry(name, info, data_bytes, path, error)
    return header, metadata


def _check_tensor_entry(name: str, info: object, data_bytes: int, path: Path, error: type[UserError]) -> None:
    fields = info if isinstance(info, dict) else {}
    dtype, shape, offsets = fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")
    valid = (isinstance(dtype, str) and isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)
             and isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets))
    if not valid:
        raise _refuse(error, path, f"tensor {name[:80]!r} has no valid dtype, shape and data_offsets in its header")
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes:
        raise _refuse(error, path, f"tensor {name[:80]!r} claims bytes {begin}-{end} of {data_bytes} (the file is "
                                   "cut short or its header lies)")
    item = _SAFETENSORS_DTYPE_BYTES.get(dtype)
    if item is not None and math.prod(shape) * item != end - begin:
        raise _refuse(error, path, f"tensor {name[:80]!r} of shape {shape[:8]} ({dtype}) claims "
                                   f"{end - begin} bytes, not {math.prod(shape) * item}")


# ---- JSON ----------------------------------------------------------------------------------------------------------
def check_json_text(text: bytes | str, path: Path, error: type[UserError], where: str,
                    max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than `max_depth` before it is parsed (Python's parser recurses per level and ends in
    a RecursionError near 1,000). Counts brackets outside strings; a few ms per MB."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    codes = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    depth = level = 0
    for start in range(0, len(codes), _DEPTH_CHUNK):  # in chunks: a running sum of the whole text would be 8x its size
        chunk = codes[start:start + _DEPTH_CHUNK]
        steps = (chunk == ord("[")).astype(np.int8) + (chunk == ord("{")) - (chunk == ord("]")) - (chunk == ord("}"))
        levels = np.cumsum(steps, dtype=np.int64) + level
        depth, level = max(depth, int(levels.max())), int(levels[-1])
    if depth > max_depth:
        raise _refuse(error, path, f"{where} is JSON nested {depth} deep, more than the {max_depth} a file of this "
                                   "kind has")


def load_json(text: bytes | str, path: Path, error: type[UserError], where: str, **options) -> object:
    """`json.loads(text, **options)` after `check_json_text`; `error` for text that is not JSON."""
    check_json_text(text, path, error, where)
    try:
        return json.loads(text, **options)
    except ValueError as exc:
        raise _refuse(error, path, f"{where} is not valid JSON ({reason_of(exc)})") from None
