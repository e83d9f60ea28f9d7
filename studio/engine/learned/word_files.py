"""Word files: read every textual-inversion form people share, write the studio's canonical one, convert.

Forms read (`word_from_data`, after `read_container`; `studio.engine.learned.registry.load_concept` is the entry):

- diffusers: `{token: tensor}` (`.bin` torch zip with 1-D `[dim]` vectors, or `.safetensors` with `[n, dim]`);
  SDXL as two files `<stem>.safetensors` (text_encoder) + `<stem>_2.safetensors` (text_encoder_2).
- AUTOMATIC1111 / the paper's layout: `{"string_to_param": {"*": t}, "name", "step", "sd_checkpoint(_name)"}`.
- kohya: `{"emb_params": [n, dim]}`; SDXL (kohya and A1111): `{"clip_l": [n, 768], "clip_g": [n, 1280]}`.
- A1111 PNG/WebP with the embedding in an `sd-ti-embedding` text chunk (base64 of JSON; tensors as
  `{"TORCHTENSOR": nested lists}`).

Safety: `.pt`/`.bin` are opened only with `torch.load(weights_only=True)`; a pickle holding anything but tensors and
plain containers is refused, never executed. Every file's size is checked from its container before it is read
(`studio.engine.containers`: zip entries, the safetensors header, the picture's header, the JSON's depth), against
`MAX_EMBEDDING_BYTES`; whatever a reader still raises becomes a one-line `ConceptError` (`failing_closed`).

The trigger word follows A1111: the file name stem (for PNG/WebP: the name stored inside), unless the caller passes
`token=`; the name stored inside is kept in `meta["stored_name"]`.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import io
import os
import pickle
import re
import threading
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from studio.engine.containers import (
    MAX_EMBEDDING_BYTES,
    MAX_EMBEDDING_TEXT_BYTES,
    check_file_size,
    check_zip,
    failing_closed,
    load_json,
    safetensors_header,
    size_text,
)
from studio.engine.families import FAMILIES, SDXL_ENCODER_NAMES, family_of, family_of_file_names
from studio.engine.files import atomic_write
from studio.engine.learned.word import MAX_DIM, MAX_VECTORS, Concept, ConceptError, _describe
from studio.engine.names import file_stem
from studio.errors import UserError


FORMATS = ("studio", "diffusers", "a1111", "kohya")
IMAGE_SUFFIXES = (".png", ".webp")
READ_SUFFIXES = (".safetensors", ".pt", ".bin", *IMAGE_SUFFIXES)
A1111_STAR_TOKEN_ID = 265  # what A1111 writes in string_to_token["*"]; nobody reads it back


# --------------------------------------------------------------------------------------------------------- reading


def read_word_container(path: Path) -> tuple[object, dict[str, str]]:
    """The raw content (+ safetensors metadata) of a word file, its size checked first (`read_container`)."""
    return read_container(path, READ_SUFFIXES, ConceptError, "concept file", MAX_EMBEDDING_BYTES)


def load_word(path: str | os.PathLike, token: str | None = None) -> Concept:
    """A plain word file read as a word (`word_from_data`), failing closed; `registry.load_concept` reads any word
    file, per-layer ones too."""
    path = Path(path)
    with failing_closed(path, ConceptError, "concept file"):
        return word_from_data(*read_word_container(path), path, token)


def word_from_data(data: object, metadata: dict[str, str], path: Path, token: str | None = None) -> Concept:
    """The word a word file holds, from its container's content (`read_container`): which layout, which vectors,
    which token (the registry's `load_concept` is the entry that reads any word file, per-layer ones too)."""
    suffix = path.suffix.lower()
    vectors, stored_name, source_format, extra = _interpret(data, path)
    if "studio_version" in metadata:  # our canonical form: emb_params / clip_l+clip_g plus metadata strings
        source_format, stored_name = "studio", metadata.get("token") or stored_name
    stem = path.stem

    # 3. A diffusers SDXL concept is two one-key files; join the pair whichever half was asked for.
    if source_format == "diffusers" and suffix == ".safetensors":
        partner = companion_of(path)
        if partner is not None:
            pair = _read_diffusers_pair(path, partner, vectors, stored_name)
            if pair is not None:
                vectors, stem = pair, (stem[:-2] if stem.endswith("_2") else stem)

    # 4. Validate every tensor (finite, sane sizes) and build the concept.
    vectors = {key: _check_tensor(t, path, key) for key, t in vectors.items()}
    meta = {k: v for k, v in metadata.items() if k not in ("format",)}
    meta.update(extra)
    if stored_name is not None:
        meta["stored_name"] = stored_name
    meta["source_format"] = source_format
    meta["source_path"] = str(path)
    if token is None and suffix in IMAGE_SUFFIXES and stored_name and not any(c.isspace() for c in stored_name):
        token = stored_name  # A1111 names picture embeddings by the name inside ("name-500.png" holds "name")
    if token is None and source_format == "studio" and stored_name and not any(c.isspace() for c in stored_name):
        # Our own files carry the word they were trained for ("<my-cat>" in my-cat.safetensors): a step-500
        # checkpoint or a renamed copy still answers to the word the user trained.
        token = stored_name
    if token is None and stored_name and _named_after(stem, stored_name, source_format):
        token = stored_name
    try:
        concept = Concept(token=token or stem, vectors=vectors, meta=meta)
    except ConceptError as exc:
        raise ConceptError(f"{path.name}: {exc}") from None
    concept.meta["family"] = concept.family
    return concept


# The file name diffusers' textual_inversion script gives every result: it names no concept.
DIFFUSERS_DEFAULT_STEM = "learned_embeds"


def _named_after(stem: str, stored_name: str, source_format: str) -> bool:
    """Whether the word stored inside a file, not its file name, is its trigger word.

    - a diffusers file still called `learned_embeds` (its script's default name for every concept): the stored
      token, as diffusers' own `load_textual_inversion` uses; two such files are two concepts, not one;
    - a file whose name is the file-safe form of the stored word (`zz.pt` holding `<zz>`, as the studio's a1111
      export writes it, since `<` and `>` cannot be in a file name on Windows): the stored word round-trips.
    A1111's own rule otherwise: the file name wins (badhandv4.pt holding "badhandv3" answers to badhandv4).
    """
    if any(c.isspace() for c in stored_name):
        return False
    if source_format == "diffusers" and stem == DIFFUSERS_DEFAULT_STEM:
        return True
    return stored_name != stem and file_stem(stored_name) == stem


def read_container(path: Path, suffixes: tuple[str, ...], error: type[UserError], what: str,
                   max_bytes: int) -> tuple[object, dict]:
    """The raw content of a weights file and its safetensors metadata ({} for others), by the one set of safe rules:
    sizes checked from the container against `max_bytes` before anything is inflated or mapped
    (`studio.engine.containers`), then safetensors as they are, `.pt`/`.bin` only through the weights-only
    unpickler, PNG/WebP through their text chunk. `error` (with `what`, e.g. "concept file") for a missing file, a
    suffix outside `suffixes` or a container over its cap."""
    if not path.is_file():
        raise error(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise error(f"{path.name}: unsupported file type {suffix!r}; {what}s are {', '.join(suffixes)}")
    check_file_size(path, max_bytes, what, error)
    if suffix == ".safetensors":
        safetensors_header(path, error)
        return _read_safetensors(path)
    if suffix in (".pt", ".bin"):
        check_zip(path, max_bytes, what, error)
        return _read_torch(path), {}
    return _read_image(path), {}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata; its header has passed `safetensors_header` (`read_container`)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConceptError(f"{path.name}: not a readable safetensors file ({exc}); re-download or re-export it") from None


class _PickledParameterDict:
    """Inert stand-in for the `torch.nn.ParameterDict` in files of the paper's code: keeps the pickled attributes.

    A real ParameterDict would run `Module.__setstate__`, and its methods need `_keys`, which torch of 2022 did not
    pickle; both layouts keep the vectors in `_parameters`, the one attribute we read.
    """

    def __setstate__(self, state: object) -> None:
        self.state = state


# Torch's own weights-only unpickler (a GLOBAL allowlist, os/sys blocked, BUILD and REDUCE only on allowlisted
# names) reads the paper's files once the one name it refuses, torch.nn.modules.container.ParameterDict, resolves
# to the stand-in above; every other class or function is still refused before anything runs. Chosen over reading
# the tensor records straight out of the zip (ComfyUI's fallback): the records carry no shape, dtype or key (in the
# paper's file data/0 is the token id, data/1 the vector), while torch's reader keeps them and applies map_location
# to the storages saved from cuda:0. safe_globals is process-wide while the `with` lasts (a concurrent torch.load
# elsewhere would get the inert stand-in too) and removes its entry on exit, so the lock keeps two loads from
# removing each other's entry mid-load.
_PAPER_SAFE_GLOBALS = [(_PickledParameterDict, "torch.nn.modules.container.ParameterDict")]
_PAPER_SAFE_GLOBALS_LOCK = threading.Lock()


def _read_torch(path: Path) -> object:
    """A `.pt`/`.bin` through torch's weights-only unpickler; a paper-style ParameterDict comes back as a dict."""
    try:
        with _PAPER_SAFE_GLOBALS_LOCK, torch.serialization.safe_globals(_PAPER_SAFE_GLOBALS):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)|Unsupported global|Unsupported class", text)
        if found is None:  # garbage rather than an object: the byte stream is not a pickle we understand
            raise ConceptError(f"{path.name}: not a readable torch file (broken pickle); "
                               "re-download or re-export it") from None
        what = f" ({found.group(1)})" if found.group(1) else ""
        raise ConceptError(
            f"{path.name}: refused: the pickle holds a non-tensor object{what}; we never unpickle arbitrary objects "
            "(only tensors, numbers, strings and dicts). Ask for a .safetensors version of this embedding."
        ) from None
    except Exception as exc:  # noqa: BLE001 - a corrupt file raises struct/EOF/Runtime/Unicode errors and more;
        # the weights-only unpickler has executed nothing, so every failure here means "not a readable torch file".
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConceptError(f"{path.name}: not a readable torch file ({first_line}); re-download or re-export it") from None
    return _with_plain_string_to_param(data, path)


def _with_plain_string_to_param(data: object, path: Path) -> object:
    """`data` with a pickled ParameterDict under `string_to_param` replaced by the dict of its parameters."""
    params = data.get("string_to_param") if isinstance(data, dict) else None
    if not isinstance(params, _PickledParameterDict):
        return data
    state = params.state
    found = state.get("_parameters") if isinstance(state, dict) else None
    if not isinstance(found, dict):
        raise ConceptError(f"{path.name}: string_to_param is a ParameterDict without its parameters; "
                           "re-export the embedding")
    return {**data, "string_to_param": dict(found)}


def _read_image(path: Path) -> dict:
    """A1111's PNG/WebP form: base64 of JSON in an `sd-ti-embedding` text chunk. Only the header and the chunks
    before the pixels are read (Image.open is lazy), never the pixels: the size the header claims is refused over
    the pictures' pixel cap, the text over MAX_EMBEDDING_TEXT_BYTES, the JSON over its depth."""
    from PIL import Image, UnidentifiedImageError

    from studio.engine.pictures import MAX_PICTURE_PIXELS

    try:
        with Image.open(path, formats=("PNG", "WEBP")) as image:
            width, height = image.size
            chunk = image.info.get("sd-ti-embedding")
    except Image.DecompressionBombError as exc:  # Pillow's own refusal from the header, at twice its pixel limit
        raise ConceptError(f"{path.name}: refused: a picture of too many pixels ({exc}); an embedding picture is a "
                           "card of a few hundred pixels") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ConceptError(f"{path.name}: not a readable image ({exc})") from None
    if width * height > MAX_PICTURE_PIXELS:
        raise ConceptError(f"{path.name}: refused: its header claims {width}x{height} pixels, more than the "
                           f"{MAX_PICTURE_PIXELS:,} a picture may have; an embedding picture is a card of a few "
                           "hundred pixels")
    if chunk is None:
        raise ConceptError(f"{path.name}: no 'sd-ti-embedding' text chunk; this image carries no embedding we can "
                           "read (A1111's pixel-hidden form is not supported: export the .pt instead)")
    if not isinstance(chunk, str):
        raise ConceptError(f"{path.name}: its 'sd-ti-embedding' chunk is not text")
    if len(chunk) > MAX_EMBEDDING_TEXT_BYTES:
        raise ConceptError(f"{path.name}: refused: its 'sd-ti-embedding' chunk is {size_text(len(chunk))}, more than "
                           f"the {size_text(MAX_EMBEDDING_TEXT_BYTES)} an embedding's text has")

    def tensors_back(obj: dict) -> object:
        # A1111 writes each tensor as {"TORCHTENSOR": nested lists}; JSON floats are float32 values, exact in float64.
        if "TORCHTENSOR" in obj:
            return torch.tensor(obj["TORCHTENSOR"], dtype=torch.float64).to(torch.float32)
        return obj

    try:
        text = base64.b64decode(chunk)
    except (binascii.Error, ValueError) as exc:
        raise ConceptError(f"{path.name}: the 'sd-ti-embedding' chunk is not valid base64 ({exc})") from None
    return load_json(text, path, ConceptError, "its 'sd-ti-embedding' chunk", object_hook=tensors_back)


def _interpret(data: object, path: Path) -> tuple[dict[str, torch.Tensor], str | None, str, dict[str, str]]:
    """Identify the layout: (vectors by encoder key, stored name, source format, extra metadata)."""
    if isinstance(data, torch.Tensor):  # a bare tensor (diffusers' loader accepts it too, with token=)
        return {"text_encoder": data}, None, "tensor", {}
    if not isinstance(data, dict) or not data:
        raise ConceptError(f"{path.name}: expected a dict of tensors, found {_describe(data)}")
    extra: dict[str, str] = {}

    if "string_to_param" in data:  # A1111 / the paper's layout
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ConceptError(f"{path.name}: string_to_param must hold exactly one tensor, found {_describe(params)}")
        name = data.get("name")
        if data.get("step") is not None:
            extra["steps"] = str(data["step"])
        for src, dst in (("sd_checkpoint_name", "base_model"), ("sd_checkpoint", "base_model_hash")):
            if data.get(src) is not None:
                extra[dst] = str(data[src])
        return {"text_encoder": next(iter(params.values()))}, (str(name) if name is not None else None), "a1111", extra

    if set(data) == {"clip_l"}:  # diffusers' SD 1.x pivotal-tuning words (`<name>_emb.safetensors`): one encoder
        return {"text_encoder": data["clip_l"]}, None, "diffusers-pivotal", extra

    if "t5" in data:  # SD3 and Flux: diffusers' advanced scripts ({"clip_l", "t5"}), OneTrainer
        family = family_of_file_names(data)
        if family is None:
            raise ConceptError(f"{path.name}: a word file with T5 vectors holds clip_l + t5 (Flux) or clip_l + clip_g "
                               f"+ t5 (SD3), not {' + '.join(sorted(map(str, data)))}")
        return {key: data[name] for key, name in zip(family.encoder_keys, family.file_names)}, None, family.id, extra

    if "clip_l" in data or "clip_g" in data:  # SDXL, kohya and A1111
        missing = [k for k in SDXL_ENCODER_NAMES if k not in data]
        if missing:
            raise ConceptError(f"{path.name}: SDXL file without {missing[0]!r}; it needs both clip_l and clip_g")
        return {dst: data[src] for src, dst in SDXL_ENCODER_NAMES.items()}, None, "sdxl", extra

    if "emb_params" in data:  # kohya (also the studio's SD1/SD2 canonical form)
        return {"text_encoder": data["emb_params"]}, None, "kohya", extra

    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(data) == 1 and len(tensors) == 1:  # diffusers {token: tensor}
        key = next(iter(tensors))
        return {"text_encoder": tensors[key]}, str(key), "diffusers", extra

    raise ConceptError(f"{path.name}: unknown embedding layout with keys {sorted(map(str, data))[:8]}; expected "
                       "{token: tensor}, string_to_param, emb_params or clip_l+clip_g")


def companion_of(path: Path) -> Path | None:
    """The other half of a diffusers SDXL pair (`x.safetensors` <-> `x_2.safetensors`) when it exists."""
    stem = path.stem
    other = path.with_name(stem[:-2] + path.suffix) if stem.endswith("_2") else path.with_name(stem + "_2" + path.suffix)
    return other if other.is_file() else None


def is_second_half(path: Path) -> bool:
    """True for `x_2.safetensors` that is the text_encoder_2 half of a diffusers SDXL pair with `x.safetensors`.

    Both must be one-key files for the same token (only the headers are read); the library lists the pair once.
    """
    partner = companion_of(path) if path.stem.endswith("_2") and path.suffix == ".safetensors" else None
    if partner is None:
        return False
    keys, widths = [], []
    for file in (partner, path):
        try:
            with failing_closed(file, ConceptError, "concept file"):
                tensors, _ = safetensors_header(file, ConceptError)
                keys.append(list(tensors))
                shape = tensors[keys[-1][0]]["shape"] if len(keys[-1]) == 1 else []
                widths.append(shape[-1] if shape else 0)
        except UserError:  # unreadable: listed on its own, with its reason
            return False
    known = {"emb_params", "string_to_param", *SDXL_ENCODER_NAMES}
    return (len(keys[0]) == 1 and keys[0] == keys[1] and keys[0][0] not in known
            and _is_sdxl_pair(widths[0], widths[1]))


def _is_sdxl_pair(first_width: int, second_width: int) -> bool:
    # Two SD1 files that happen to be called x / x_2 with the same key are two concepts, not one SDXL pair.
    return family_of({"text_encoder": first_width, "text_encoder_2": second_width})[0] == "sdxl"


def _read_diffusers_pair(path: Path, partner: Path, vectors: dict[str, torch.Tensor],
                         stored_name: str | None) -> dict[str, torch.Tensor] | None:
    """Join a diffusers SDXL pair when the partner is a one-key file for the same token; else None."""
    try:
        with failing_closed(partner, ConceptError, "concept file"):
            other, _ = read_container(partner, (".safetensors",), ConceptError, "concept file", MAX_EMBEDDING_BYTES)
    except ConceptError:
        return None
    if list(other) != [stored_name]:
        return None
    first, second = (vectors["text_encoder"], other[stored_name])
    if path.stem.endswith("_2"):
        first, second = second, first
    if not _is_sdxl_pair(first.shape[-1], second.shape[-1]):
        return None
    return {"text_encoder": first, "text_encoder_2": second}


def _check_tensor(tensor: object, path: Path, key: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise ConceptError(f"{path.name}: the {key} vectors must be a float tensor, found {_describe(tensor)}")
    if tensor.dim() == 1:  # diffusers .bin files hold a single 1-D vector
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2:
        raise ConceptError(f"{path.name}: the {key} vectors must be 1-D or 2-D, found shape {list(tensor.shape)}")
    n, dim = tensor.shape
    if not (1 <= n <= MAX_VECTORS) or not (8 <= dim <= MAX_DIM):
        raise ConceptError(f"{path.name}: implausible {key} size {n} x {dim}; a concept has 1-{MAX_VECTORS} vectors "
                           "of a text encoder's width (768, 1024, 1280 ...)")
    if not torch.isfinite(tensor).all():
        raise ConceptError(f"{path.name}: the {key} vectors contain NaN or infinite values (a diverged training run); "
                           "use an earlier checkpoint of this embedding")
    return tensor.detach().contiguous()


# --------------------------------------------------------------------------------------------------------- writing


def save_word(concept: Concept, path: str | os.PathLike, format: str = "studio") -> Path:
    """Write a word atomically in one of `FORMATS` (checked by the caller, `registry.save_concept`); returns the
    path written (the first file of a pair).

    - "studio": safetensors `{"emb_params"}` (SD1/SD2) or `{"clip_l", "clip_g"}` (SDXL) with metadata strings.
    - "diffusers": safetensors `{token: [n, dim]}`; SDXL as `<stem>.safetensors` + `<stem>_2.safetensors`
      (one per encoder, as diffusers' SDXL script writes; load each with `text_encoder=`/`tokenizer=`).
    - "a1111": `.pt` dict `{string_to_token, string_to_param, name, step, sd_checkpoint, sd_checkpoint_name}`;
      SDXL as safetensors `{"clip_l", "clip_g"}` (A1111 has no SDXL .pt form).
    - "kohya": safetensors `{"emb_params"}` / `{"clip_l", "clip_g"}`.
    SD3 and Flux words are one safetensors `{"clip_l", ("clip_g",) "t5"}` in every form (diffusers' advanced Flux
    script's layout; "studio" adds the metadata strings).
    Vectors are written bit for bit as they are (same dtype); a file with no suffix gets the right one.
    """
    path = Path(path)
    family = FAMILIES.get(concept.family)
    named = family.file_names if family else ()  # SD3, Flux: {"clip_l", ("clip_g",) "t5"} in every form
    sdxl = "text_encoder_2" in concept.vectors
    suffix = ".pt" if (format == "a1111" and not sdxl) else ".safetensors"
    if path.suffix == "":
        path = path.with_name(path.name + suffix)
    elif path.suffix.lower() != suffix:
        raise ConceptError(f"{path.name}: {format} files for {family_of(concept.dims)[1]} end in {suffix}; "
                           f"name the output {path.stem}{suffix}")
    tensors = {key: _for_writing(t, concept, key) for key, t in concept.vectors.items()}
    if named:  # one file, as diffusers' advanced Flux script writes it and OneTrainer reads it
        body = {name: tensors[key] for name, key in zip(named, family.encoder_keys)}
        atomic_write(path, safetensors_save(body, _studio_metadata(concept) if format == "studio" else None))
        return path

    if format == "a1111" and not sdxl:
        data = {
            "string_to_token": {"*": A1111_STAR_TOKEN_ID},
            "string_to_param": {"*": tensors["text_encoder"]},
            "name": concept.token,
            "step": _int_or_zero(concept.meta.get("steps")),
            "sd_checkpoint": concept.meta.get("base_model_hash"),
            "sd_checkpoint_name": concept.meta.get("base_model"),
        }
        buffer = io.BytesIO()
        torch.save(data, buffer)
        atomic_write(path, buffer.getvalue())
        return path

    if format == "diffusers":
        atomic_write(path, safetensors_save({concept.token: tensors["text_encoder"]}, {"format": "pt"}))
        if sdxl:
            second = path.with_name(path.stem + "_2" + path.suffix)
            atomic_write(second, safetensors_save({concept.token: tensors["text_encoder_2"]}, {"format": "pt"}))
        return path

    if sdxl:
        body = {"clip_l": tensors["text_encoder"], "clip_g": tensors["text_encoder_2"]}
    else:
        body = {"emb_params": tensors["text_encoder"]}
    metadata = _studio_metadata(concept) if format == "studio" else None
    atomic_write(path, safetensors_save(body, metadata))
    return path


def safetensors_output(path: str | os.PathLike, what: str) -> Path:
    """`path` as a .safetensors file to write (the suffix added when it has none); `ConceptError` for another suffix,
    saying that `what` ("per-layer files", ...) are written as .safetensors."""
    path = Path(path)
    if path.suffix == "":
        return path.with_name(path.name + ".safetensors")
    if path.suffix.lower() != ".safetensors":
        raise ConceptError(f"{path.name}: {what} are written as .safetensors; name the output {path.stem}.safetensors")
    return path


def _for_writing(tensor: torch.Tensor, concept: Concept, key: str) -> torch.Tensor:
    tensor = tensor.detach().to("cpu").contiguous().clone()  # clone: never save a view of a bigger storage
    if not torch.isfinite(tensor).all():
        raise ConceptError(f"concept {concept.token!r}: the {key} vectors contain NaN or infinite values; not saved")
    return tensor


def _studio_metadata(concept: Concept) -> dict[str, str]:
    meta = {k: v for k, v in concept.meta.items() if k not in ("source_path", "source_format")}
    meta.update(
        token=concept.token,
        family=concept.family,
        base_model=concept.meta.get("base_model", ""),
        init_text=concept.meta.get("init_text", ""),
        steps=concept.meta.get("steps", ""),
        created=concept.meta.get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        studio_version=_studio_version(),
        format="pt",
    )
    return meta


def _studio_version() -> str:
    try:
        return importlib.metadata.version("concept-studio")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "0.1.0"


def _int_or_zero(value: str | None) -> int:
    try:
        return int(value) if value else 0
    except ValueError:
        return 0
