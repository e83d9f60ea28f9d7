"""IP-Adapters (Ye et al. 2023) on a shared UNet: found, read, converted once per model, patched in per request.

An IP-Adapter file is diffusers' layout (h94/IP-Adapter, what `load_ip_adapter` reads): safetensors keys
`image_proj.<name>` and `ip_adapter.<n>.to_k_ip.weight` / `.to_v_ip.weight`, or a `.bin` holding the dict
`{"image_proj": {...}, "ip_adapter": {...}}` (read with `torch.load(weights_only=True)`). Its CLIP vision model is
diffusers' default place for it, the folder `image_encoder` beside the file, unless named. Plain, Plus and full-face
adapters are read; FaceID (face embeddings from insightface) is refused in one line.

The adapter is converted by diffusers' own loader functions (`UNet2DConditionModel._convert_ip_adapter_attn_to_
diffusers`, `_convert_ip_adapter_image_proj_to_diffusers`: what `load_ip_adapter` runs) once per model and kept in
`LoadedModel.image_adapters` (`ImageAdapterCache`), outside the UNet. A request with image prompts patches the shared
UNet for its length (`image_prompts_applied`): diffusers' IP-Adapter processors on the cross-attention layers (built
once per order of adapters and kept), one slot per image prompt with its weight as the slot's scale, the adapters' image projections as `encoder_hid_proj`,
`encoder_hid_dim_type = "ip_image_proj"`: the state `load_ip_adapter([...])` + `set_ip_adapter_scale([...])` leave.
`finally` puts back what was there, so a request without image prompts runs the UNet as loaded.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from studio.engine.containers import MAX_LORA_BYTES, check_file_size, failing_closed, reason_of, safetensors_header
from studio.engine.learned.ip_adapter_fit import adapter_shapes, check_adapter_fit
from studio.engine.learned.word import ConceptError, ConceptMismatchError

# The demo model's adapter and image encoder (studio/demo/encoder.py builds them); an image concept names it "demo".
DEMO_ENCODER_DIR = Path(__file__).resolve().parents[3] / "assets" / "demo-encoder"
DEMO_ADAPTER = "demo"
ADAPTER_FILE = "ip-adapter.safetensors"  # the adapter's name in DEMO_ENCODER_DIR and in what the demo build writes
IMAGE_ENCODER_FOLDER = "image_encoder"  # diffusers' `load_ip_adapter(image_encoder_folder=...)` default
# Adapters converted per model and kept: an SD 1.5 adapter is ~22M parameters (44 MB in fp16), SDXL's ~100M; four
# covers a plain and a Plus adapter of two families without holding a GPU's memory.
MAX_CACHED_ADAPTERS = 4
# Orders of adapters kept slotted (`ImageAdapterCache.slotted`): each is one small processor per cross-attention layer
# (16 in SD 1.x, 70 in SDXL) around weights the adapters already hold, so a few KB; 16 covers a session's mixes.
MAX_SLOTTINGS = 16


class ImagePromptError(ConceptError):
    """An image concept or IP-Adapter file the studio cannot read or use; the message says what to do."""


def find_adapter(concept) -> Path:
    """The IP-Adapter file `concept` names: "demo" (the demo model's), a path as written, a relative path beside the
    concept's file, or a hub file "owner/repo/path/in/repo" already in the hub cache or downloadable."""
    ref = concept.adapter
    if not ref:
        raise ImagePromptError(f"image concept {concept.token!r} names no IP-Adapter; encode it again")
    return resolve_adapter(ref, concept.path.parent if concept.path else None, f"image concept {concept.token!r}")


def resolve_adapter(ref: str, near: Path | None = None, who: str = "this") -> Path:
    """The adapter file `ref` names (see `find_adapter`); `ImagePromptError` saying where it was looked for."""
    if ref == DEMO_ADAPTER:
        candidates = [DEMO_ENCODER_DIR / ADAPTER_FILE]
    else:
        candidates = [Path(ref).expanduser()] + ([near / ref] if near is not None else [])
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    parts = ref.split("/")
    if ref != DEMO_ADAPTER and len(parts) >= 3 and not Path(ref).is_absolute():
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
        except Exception:  # noqa: BLE001 - offline, unknown repo, no network: the line below says what to do
            pass
    where = DEMO_ENCODER_DIR if ref == DEMO_ADAPTER else ref
    raise ImagePromptError(f"{who} needs the IP-Adapter {where}, which is not on this machine: put the file there "
                           "(for the demo adapter: python -m studio.demo.encoder), or download it from the hub")


def read_adapter(path: Path) -> tuple[dict, str]:
    """An IP-Adapter file as diffusers' state dict `{"image_proj": {...}, "ip_adapter": {...}}` and the digest of
    its tensors (`tensors_digest`, names prefixed as in the safetensors form)."""
    with failing_closed(path, ImagePromptError, "IP-Adapter file"):
        check_file_size(path, MAX_LORA_BYTES, "IP-Adapter file", ImagePromptError)
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            safetensors_header(path, ImagePromptError)
            flat = load_file(str(path))
        else:
            nested = torch.load(path, map_location="cpu", weights_only=True)
            flat = {f"{part}.{k}": v for part in ("image_proj", "ip_adapter")
                    for k, v in (nested.get(part, {}) if isinstance(nested, dict) else {}).items()}
        state = {"image_proj": {}, "ip_adapter": {}}
        for key, tensor in flat.items():
            part, _, name = key.partition(".")
            if part in state:
                state[part][name] = tensor
        if not state["image_proj"] or not state["ip_adapter"]:
            raise ImagePromptError(f"{path.name}: not an IP-Adapter file (diffusers' layout has image_proj.* and "
                                   "ip_adapter.* keys); use an IP-Adapter such as h94/IP-Adapter's")
        if not any(k in state["image_proj"] for k in ("proj.weight", "latents", "proj.3.weight")):
            raise ImagePromptError(f"{path.name}: an IP-Adapter variant the studio does not encode for (FaceID needs "
                                   "face embeddings); use a plain, Plus or full-face IP-Adapter")
        return state, tensors_digest(flat)


def adapter_file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of an adapter file's tensors (`ip_adapter_fit.adapter_shapes`); a .safetensors file's from its
    header alone, no tensor read."""
    if path.suffix.lower() != ".safetensors":
        return adapter_shapes(read_adapter(path)[0])
    with failing_closed(path, ImagePromptError, "IP-Adapter file"):
        return {name: tuple(info["shape"]) for name, info in safetensors_header(path, ImagePromptError)[0].items()}


def adapter_reads_hidden_states(state: dict) -> bool:
    """Whether the adapter takes the vision model's penultimate hidden states (Plus, full face) rather than its
    projected image embeddings (plain): diffusers' rule, "not an `ImageProjection`" (`proj.weight`)."""
    return "proj.weight" not in state["image_proj"]


def image_encoder_folder(adapter: Path, given: str | os.PathLike | None = None) -> Path:
    """Where the adapter's CLIP vision model is: `given`, else `image_encoder` beside the adapter file."""
    folder = Path(given) if given else adapter.parent / IMAGE_ENCODER_FOLDER
    if not (folder / "config.json").is_file():
        raise ImagePromptError(f"no CLIP image encoder at {folder} (a folder with config.json): pass --image-encoder "
                               "with the adapter's image encoder folder")
    return folder


# --------------------------------------------------------------------------------------------- adapters per model


@dataclass
class AdapterParts:
    """One IP-Adapter as diffusers converts it for one UNet: its image projection and, per cross-attention
    processor key, the processor holding its `to_k_ip`/`to_v_ip` (one slot)."""

    projection: torch.nn.Module
    processors: dict[str, torch.nn.Module]
    plus: bool


@dataclass
class SlottedAdapters:
    """Adapters in one order as a request puts them on a UNet (`slot_adapters`): per cross-attention module the
    processor with their slots, and their image projections as one module."""

    layers: list[tuple[torch.nn.Module, torch.nn.Module]]  # (attention module, its slotted processor)
    projection: torch.nn.Module


@dataclass
class ImageAdapterCache:
    """The IP-Adapters converted for one model (`LoadedModel.image_adapters`), least recently used first out."""

    max_adapters: int = MAX_CACHED_ADAPTERS
    parts: OrderedDict = field(default_factory=OrderedDict)  # (resolved path, mtime_ns, size) -> AdapterParts
    vision: dict = field(default_factory=dict)  # image encoder folder -> (CLIPVisionModelWithProjection, processor)
    # (adapter key, ...) in a request's order -> SlottedAdapters; they share the cached adapters' weights
    slottings: OrderedDict = field(default_factory=OrderedDict)
    max_slottings: int = MAX_SLOTTINGS

    def image_encoder(self, folder: Path, device, dtype) -> tuple:
        """The CLIP vision model in `folder` and its picture processor (the folder's `preprocessor_config.json`, else
        diffusers' default: CLIP's normalisation at the model's image size), loaded on first use."""
        key = str(folder.resolve())
        if key not in self.vision:
            from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

            with failing_closed(folder / "config.json", ImagePromptError, "CLIP image encoder"):
                encoder = CLIPVisionModelWithProjection.from_pretrained(folder).to(device=device, dtype=dtype).eval()
                size = encoder.config.image_size
                processor = (CLIPImageProcessor.from_pretrained(folder)
                             if (folder / "preprocessor_config.json").is_file()
                             else CLIPImageProcessor(size=size, crop_size=size))
            self.vision[key] = (encoder, processor)
        return self.vision[key]

    def get(self, unet, concept: ImageConcept) -> AdapterParts:
        """The adapter `concept` names, converted for `unet` on first use. Raises `ImagePromptError` (one line) for
        an adapter not found, changed since the concept was encoded, of another kind, or not fitting the UNet."""
        return self.parts[self._convert(unet, concept)]

    def slotted(self, unet, concepts: list[ImageConcept]) -> SlottedAdapters:
        """The adapters of `concepts`, in their order, slotted for `unet` (`slot_adapters`) on first use."""
        keys = tuple(self._convert(unet, concept) for concept in concepts)
        if keys not in self.slottings:
            self.slottings[keys] = slot_adapters(unet, [self.parts[key] for key in keys])
            while len(self.slottings) > self.max_slottings:
                self.slottings.popitem(last=False)
        self.slottings.move_to_end(keys)
        return self.slottings[keys]

    def _convert(self, unet, concept: ImageConcept) -> tuple:
        """The cache key of `concept`'s adapter (its resolved path, mtime and size), converted for `unet` if new."""
        path = find_adapter(concept)
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in self.parts:
            state_dict, digest = read_adapter(path)
            if concept.adapter_sha256 and digest != concept.adapter_sha256:
                raise ImagePromptError(f"image concept {concept.token!r} was encoded with another adapter than "
                                       f"{path.name} (its weights differ); encode the pictures again with this one")
            self.parts[key] = convert_adapter(unet, state_dict, path)
            while len(self.parts) > self.max_adapters:
                gone, _ = self.parts.popitem(last=False)
                for keys in [keys for keys in self.slottings if gone in keys]:  # their slots hold its weights
                    del self.slottings[keys]
        self.parts.move_to_end(key)
        parts = self.parts[key]
        if parts.plus != concept.plus:
            kinds = {True: "IP-Adapter Plus (hidden states)", False: "plain IP-Adapter (image embeddings)"}
            raise ImagePromptError(f"image concept {concept.token!r} holds embeddings for a {kinds[concept.plus]} but "
                                   f"{path.name} is a {kinds[parts.plus]}; encode the pictures again with it")
        return key


def convert_adapter(unet, state_dict: dict, path: Path) -> AdapterParts:
    """Convert an adapter's state dict (`{"image_proj": ..., "ip_adapter": ...}`) for `unet` with diffusers' own
    loader functions, without changing `unet`; on its device and dtype."""
    from diffusers.models.embeddings import ImageProjection

    check_adapter_fit(adapter_shapes(state_dict), unet, path.name)
    try:
        processors = unet._convert_ip_adapter_attn_to_diffusers([state_dict])
        projection = unet._convert_ip_adapter_image_proj_to_diffusers(state_dict["image_proj"])
    except (KeyError, RuntimeError, ValueError) as exc:  # a missing layer, a shape that differs
        raise ConceptMismatchError(f"{path.name}: this IP-Adapter does not fit the model's UNet ({reason_of(exc)}); "
                                   "use the adapter made for this model's family") from None
    # Frozen: nothing learns an adapter through the cache (a word trained beside an image prompt, `studio train
    # --init-from-encoder`, must not leave gradients on it).
    cross = {key: proc.to(device=unet.device, dtype=unet.dtype).requires_grad_(False)
             for key, proc in processors.items() if hasattr(proc, "to_k_ip")}
    projection = projection.to(device=unet.device, dtype=unet.dtype).requires_grad_(False)
    return AdapterParts(projection, cross, plus=not isinstance(projection, ImageProjection))


def slot_adapters(unet, parts: list[AdapterParts]) -> SlottedAdapters:
    """The adapters `parts`, in this order, as one request puts them on `unet`: per cross-attention layer a
    processor of the class diffusers chose for it with one slot per adapter, each slot the cached adapter's
    `to_k_ip`/`to_v_ip` (shared, not copied); the projections as one `MultiIPAdapterImageProjection`."""
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    layers = []
    for key, first in parts[0].processors.items():
        slots = [p.processors[key] for p in parts]
        proc = type(first)(hidden_size=first.hidden_size, cross_attention_dim=first.cross_attention_dim,
                           num_tokens=[], scale=[])  # no slot yet: nothing allocated
        proc.num_tokens = [n for slot in slots for n in slot.num_tokens]
        proc.scale = [0.0] * len(slots)  # set per request (`image_prompts_applied`)
        proc.to_k_ip = torch.nn.ModuleList([slot.to_k_ip[0] for slot in slots])
        proc.to_v_ip = torch.nn.ModuleList([slot.to_v_ip[0] for slot in slots])
        layers.append((unet.get_submodule(key.removesuffix(".processor")), proc))
    return SlottedAdapters(layers, MultiIPAdapterImageProjection([p.projection for p in parts]))


@contextmanager
def image_prompts_applied(model, uses: list[tuple]) -> Iterator[None]:
    """For the block, the shared UNet reads the request's image prompts: each `(concept, weight)` an adapter slot,
    as `load_ip_adapter([...])` + `set_ip_adapter_scale([...])` would leave it; everything it had is put back in
    `finally`. Hold the model's lock around the block (generate does).

    Only the cross-attention layers' processors change, each set on its own module, to processors built once per
    (adapters, order) and kept (`ImageAdapterCache.slotted`); a request sets only their scales. `unet.set_attn_
    processor` would walk every module of the UNet on the way in and out (the cost: docs/benchmarks.md)."""
    unet = model.denoiser
    slotted = model.image_adapters.slotted(unet, [concept for concept, _ in uses])
    weights = [float(weight) for _, weight in uses]
    before = [(module, module.processor, proc.scale) for module, proc in slotted.layers]
    hid_proj, hid_type = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
    try:
        for module, proc in slotted.layers:
            proc.scale = list(weights)
            _set_processor(module, proc)
        unet.encoder_hid_proj = slotted.projection
        unet.config.encoder_hid_dim_type = "ip_image_proj"
        yield
    finally:
        unet.encoder_hid_proj = hid_proj
        unet.config.encoder_hid_dim_type = hid_type
        for (module, processor, scale), (_, proc) in zip(before, slotted.layers):
            _set_processor(module, processor)
            proc.scale = scale  # a block around this one using the same adapters keeps its weights


def _set_processor(attention: torch.nn.Module, processor) -> None:
    """What `Attention.set_processor` does, without its log line: its f-string prints both processors (an
    IP-Adapter processor's modules) whether or not anything logs, 0.1 ms a request on the tiny UNet. A processor
    that is a module is a child module, so it leaves `_modules` before a plain one takes its place."""
    if isinstance(attention.processor, torch.nn.Module) and not isinstance(processor, torch.nn.Module):
        del attention.processor
    attention.processor = processor


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of named tensors (names, dtypes, shapes and bytes, in name order): the same weights give the same
    digest whichever file form holds them."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()

