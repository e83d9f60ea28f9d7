"""Reading LoRA files: diffusers/peft and kohya/A1111 forms, with A1111's bundled embeddings.

`load_lora(path)` returns a `LoraFile`: the weights as a state dict in the form diffusers' `load_lora_weights` takes,
what they touch (UNet, text encoders; attention or other layers), their rank, the model families they fit, and any
words bundled in the file as `Concept`s. Key names are converted by diffusers' own code
(`StableDiffusionLoraLoaderMixin.lora_state_dict`, which calls `_maybe_map_sgm_blocks_to_diffusers` and
`_convert_non_diffusers_lora_to_diffusers`), so the studio reads exactly what diffusers loads. LyCORIS variants that
are not plain low-rank pairs (LoHa, LoKr, IA3, DoRA, full diffs) are refused with a `LoraError` naming the variant.

`loras_applied(model, loras)` applies LoRA files to a loaded model's shared UNet for the length of a `with` block (one
request, under the model's lock) and turns them off again in `finally`; the adapters stay loaded in the model's
`LoraCache` (least recently used out first, bounded by memory). See docs/architecture.md, "LoRA per request".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError, safe_open

from studio.engine.concepts import _FAMILY_BY_DIMS, _SDXL_KEYS, Concept, family_of, read_container
from studio.errors import LoraError

LORA_SUFFIXES = (".safetensors", ".pt", ".bin")
PARTS = ("unet", "text_encoder", "text_encoder_2")  # diffusers pipeline attribute names, as in the state dict keys
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
WORD_KEY = "studio_word"  # metadata of a pivotal words file the studio wrote: the word its prompts use
PHRASE_KEY = "studio_phrase"  # metadata of a LoRA the studio trained: the words it was trained on
BUNDLE_PREFIX = "bundle_emb."  # A1111 (PR #13568): bundle_emb.<word>.string_to_param.* or .clip_l / .clip_g

# The UNet's cross-attention key/value input width is the width of the prompt embeddings it was trained on: the text
# encoder's width (SD 1.x 768, SD 2.x 1024) or both encoders' joined (SDXL 768 + 1280 = 2048). Derived from the one
# table of encoder widths, so a LoRA and an embedding can never be given a family by two rules.
_FAMILY_BY_CROSS_WIDTH = {sum(dims): family for dims, (family, _) in _FAMILY_BY_DIMS.items()}

# LyCORIS and other variants whose weights are not a down/up pair; diffusers' SD loader does not apply them.
_REFUSED_VARIANTS = (
    (re.compile(r"\.hada_w[12]_[ab]$|\.hada_t[12]$"), "LoHa (LyCORIS)"),
    (re.compile(r"\.lokr_w[12](_[ab])?$|\.lokr_t2$"), "LoKr (LyCORIS)"),
    (re.compile(r"\.dora_scale$|\.lora_magnitude_vector(\.weight)?$"), "DoRA"),
    (re.compile(r"\.lora_mid\.weight$"), "LoCon with a Tucker (lora_mid) core (LyCORIS)"),
    (re.compile(r"\.on_input$|\.ia3_l(\.\w+)?(\.weight)?$"), "IA3"),
    (re.compile(r"\.diff(_b)?$"), "a full weight difference (.diff, LyCORIS 'full')"),
)
_WHAT_TO_DO = ("the studio applies plain LoRA (down/up pairs) only; re-export it as a standard LoRA "
               "(kohya's or diffusers' LoRA format)")

# The down matrix of one LoRA pair, in each key form that `load_lora_weights` reads after conversion: peft
# (`lora_A`), diffusers' attention-processor forms (`to_q_lora.down`, `.lora.down`, `lora_linear_layer.down`).
_DOWN_KEY = re.compile(r"^(?P<module>.+?)(?:\.lora_A|\.lora\.down|_lora\.down|\.lora_linear_layer\.down)"
                       r"(?:\.[A-Za-z0-9_]+)?\.weight$")
_CROSS_KEY_VALUE = re.compile(r"attn2(\.processor)?\.to_[kv]$")
_ENCODER_QUERY = re.compile(r"self_attn\.(q_proj|to_q)$")


@dataclass
class LoraFile:
    """A LoRA file as read: weights in diffusers' form plus what they fit, and any words bundled with them."""

    path: Path
    state_dict: dict[str, torch.Tensor]  # diffusers/peft keys ("unet.…", "text_encoder.…"); kohya alphas folded in
    source_format: str  # "diffusers" or "kohya"
    ranks: tuple[int, ...]  # the distinct ranks of its pairs, smallest first
    modules: dict[str, list[str]]  # part ("unet", "text_encoder", "text_encoder_2") -> module names, sorted
    families: tuple[str, ...]  # "sd1", "sd2", "sdxl", ... it fits; empty when its shapes name none
    size_bytes: int
    words: list[Concept] = field(default_factory=list)  # bundled embeddings
    # diffusers' `lora_adapter_metadata` (the peft LoraConfig per part: "unet.r", "unet.lora_alpha", ...), for
    # `load_lora_into_unet(..., metadata=)`: `load_lora_weights` reads it from a file, never from a state dict.
    adapter_metadata: dict[str, object] = field(default_factory=dict)
    mtime_ns: int = 0  # the file's modification time when read: with the path, the key of its loaded adapter
    # The words a DreamBooth-LoRA was trained on ("<token> <class>", PHRASE_KEY in the file's metadata): plain text
    # to the text encoder, what prompts write to call it; "" when the file says none.
    phrase: str = ""

    @property
    def name(self) -> str:
        """The name a prompt uses for it, `<lora:name:0.8>`: the file's stem, as in A1111."""
        return self.path.stem

    @property
    def kind(self) -> str:
        """"lora" for weights alone, "word+lora" when the file also carries words (pivotal tuning)."""
        return "word+lora" if self.words else "lora"

    @property
    def rank(self) -> int:
        """The largest rank of its pairs (most files have one rank)."""
        return max(self.ranks)

    @property
    def targets(self) -> dict[str, dict[str, int]]:
        """Per part, how many attention and other layers the LoRA changes, e.g. `{"unet": {"attention": 32, ...}}`."""
        return {part: {"attention": sum(_is_attention(m) for m in names),
                       "other": sum(not _is_attention(m) for m in names)}
                for part, names in self.modules.items()}


def _is_attention(module: str) -> bool:
    return re.search(r"(^|\.)(attn\d*|self_attn)(\.|$)", module) is not None


# --------------------------------------------------------------------------------------------------------- reading


def is_lora_file(path: str | os.PathLike) -> bool:
    """Whether a file holds LoRA-like weights (also the LyCORIS variants `load_lora` refuses) rather than a word.

    Reads only the key names of a .safetensors file; a .pt/.bin is read through the weights-only unpickler.
    """
    path = Path(path)
    if path.suffix.lower() not in LORA_SUFFIXES or not path.is_file():
        return False
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                keys = list(handle.keys())
        except (SafetensorError, OSError, ValueError):
            return False  # the embedding reader gives the one-line reason
    else:
        data, _ = read_container(path, LORA_SUFFIXES, LoraError, "LoRA files")
        keys = list(data) if isinstance(data, dict) else []
    return any(_looks_like_lora_key(str(k)) for k in keys)


def _looks_like_lora_key(key: str) -> bool:
    return (key.startswith(KOHYA_PREFIXES) or key.startswith(BUNDLE_PREFIX) or _DOWN_KEY.match(key) is not None
            or any(pattern.search(key) for pattern, _ in _REFUSED_VARIANTS))


def load_lora(path: str | os.PathLike, unet_config: object | None = None) -> LoraFile:
    """Read a LoRA file (.safetensors; .pt/.bin as weights-only tensors) in diffusers/peft or kohya/A1111 form.

    `unet_config` (a UNet's `.config`) places the blocks of an SDXL kohya file written with sgm names
    (`input_blocks_4_1_…`); without it, SDXL base's layout is assumed. Raises `LoraError` for a LyCORIS variant the
    studio does not apply and for a file that holds no LoRA weights; `ConceptError` for a bad bundled word.
    """
    path = Path(path)

    # 1. Raw tensors from the container (the embedding reader's rules: safetensors, or weights-only pickles).
    data, metadata = read_container(path, LORA_SUFFIXES, LoraError, "LoRA files")
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise LoraError(f"{path.name}: not a LoRA file (expected a flat dict of tensors)")

    # 2. Refuse what is not a plain down/up pair, by name, before any conversion drops or mangles it.
    for key in data:
        for pattern, variant in _REFUSED_VARIANTS:
            if pattern.search(key):
                raise LoraError(f"{path.name}: a {variant} file (key {key!r}); {_WHAT_TO_DO}")

    # 3. Bundled words apart from the weights.
    bundle = {k: v for k, v in data.items() if k.startswith(BUNDLE_PREFIX)}
    weights = {k: v for k, v in data.items() if not k.startswith(BUNDLE_PREFIX)}
    words = _bundled_words(bundle, path) or _pivotal_words(path)

    # 4. Kohya/A1111 names -> diffusers names, by diffusers' converter.
    source_format = "diffusers"
    if weights and all(k.startswith(KOHYA_PREFIXES) for k in weights):
        source_format = "kohya"
        weights = _from_kohya(weights, path, unet_config)
    modules, ranks, shapes = _pairs(weights)
    if not modules:
        listed = ", ".join(sorted(data)[:6])
        raise LoraError(f"{path.name}: neither a LoRA nor an embedding file (no LoRA down/up pairs; keys: {listed}); "
                        "LoRA files hold unet.…lora_A/lora_B (diffusers) or lora_unet_….lora_down/lora_up (kohya)")

    return LoraFile(path=path, state_dict=weights, source_format=source_format, ranks=tuple(sorted(ranks)),
                    modules=modules, families=_families(shapes), size_bytes=path.stat().st_size, words=words,
                    adapter_metadata=_adapter_metadata(metadata, path), mtime_ns=path.stat().st_mtime_ns,
                    phrase=str((metadata or {}).get(PHRASE_KEY, "")))


def _from_kohya(weights: dict[str, torch.Tensor], path: Path, unet_config: object | None) -> dict[str, torch.Tensor]:
    """Kohya's keys converted by diffusers, with each `.alpha` folded into its up matrix.

    Kohya scales a pair by alpha / rank; peft (what `load_lora_weights` builds) by lora_alpha / r, which is 1 when a
    state dict carries no alphas. Folding alpha / rank into `lora_up` keeps the state dict complete on its own.
    """
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    folded = {}
    for key, tensor in weights.items():
        if key.endswith(".alpha"):
            continue
        if key.endswith(".lora_up.weight"):
            name = key.removesuffix(".lora_up.weight")
            down, alpha = weights.get(f"{name}.lora_down.weight"), weights.get(f"{name}.alpha")
            if down is None:
                raise LoraError(f"{path.name}: {key!r} has no matching lora_down; the file is incomplete, re-export it")
            if alpha is not None:
                tensor = tensor * (float(alpha) / down.shape[0])
        folded[key] = tensor
    if unet_config is None and any("input_blocks" in k or "output_blocks" in k for k in folded):
        unet_config = SimpleNamespace(layers_per_block=2)  # SDXL base: the one UNet kohya names in sgm blocks
    try:
        state_dict, _alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(folded), unet_config=unet_config)
    except ValueError as exc:
        first = (str(exc).strip().splitlines() or [""])[-1][:200]
        raise LoraError(f"{path.name}: kohya LoRA keys diffusers cannot place ({first}); {_WHAT_TO_DO}") from None
    return state_dict


def _adapter_metadata(metadata: dict[str, str], path: Path) -> dict[str, object]:
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    stored = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if stored is None:
        return {}
    try:
        found = json.loads(stored)
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise LoraError(f"{path.name}: its {LORA_ADAPTER_METADATA_KEY!r} is not a JSON object; re-save the LoRA")
    return found


def _pairs(weights: dict[str, torch.Tensor]) -> tuple[dict[str, list[str]], set[int], dict[str, tuple[int, ...]]]:
    """(part -> module names, the ranks, module -> down-matrix shape) of the down/up pairs in diffusers keys."""
    modules: dict[str, list[str]] = {}
    ranks: set[int] = set()
    shapes: dict[str, tuple[int, ...]] = {}
    for key, tensor in weights.items():
        found = _DOWN_KEY.match(key)
        if found is None:
            continue
        module = found["module"]
        part, _, _ = module.partition(".")
        if part not in PARTS:  # an unprefixed UNet file (diffusers' older attention-processor form)
            part, module = "unet", f"unet.{module}"
        modules.setdefault(part, []).append(module.removeprefix(f"{part}."))
        ranks.add(int(tensor.shape[0]))
        shapes[module] = tuple(tensor.shape)
    return {part: sorted(modules[part]) for part in PARTS if part in modules}, ranks, shapes


def _families(shapes: dict[str, tuple[int, ...]]) -> tuple[str, ...]:
    """Families from the UNet's cross-attention key/value input width, else from the text encoders' widths."""
    cross = {shape[-1] for module, shape in shapes.items()
             if module.startswith("unet.") and _CROSS_KEY_VALUE.search(module)}
    if cross:
        return tuple(sorted(_FAMILY_BY_CROSS_WIDTH[w] for w in cross if w in _FAMILY_BY_CROSS_WIDTH))
    dims = {}
    for part in ("text_encoder", "text_encoder_2"):
        widths = {shape[-1] for module, shape in shapes.items()
                  if module.startswith(f"{part}.") and _ENCODER_QUERY.search(module)}
        if len(widths) == 1:
            dims[part] = widths.pop()
    if "text_encoder" not in dims:
        return ()
    family = family_of(dims)[0]
    return () if family == "unknown" else (family,)


def _bundled_words(bundle: dict[str, torch.Tensor], path: Path) -> list[Concept]:
    """A1111's `bundle_emb.<word>.string_to_param.*` (one encoder) or `.clip_l` + `.clip_g` (SDXL) as concepts."""
    by_word: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in bundle.items():
        word, _, rest = key.removeprefix(BUNDLE_PREFIX).partition(".")
        if rest.startswith("string_to_param"):
            by_word.setdefault(word, {})["text_encoder"] = tensor
        elif rest in _SDXL_KEYS:
            by_word.setdefault(word, {})[_SDXL_KEYS[rest]] = tensor
        elif rest != "string_to_token":  # A1111 stores the token id too; nobody reads it back
            raise LoraError(f"{path.name}: bundled embedding key {key!r} is none of string_to_param.*, clip_l, "
                            "clip_g; re-export the bundle")
    words = []
    for word, vectors in sorted(by_word.items()):
        concept = Concept(token=word, vectors=vectors, meta={"source_format": "a1111-bundle", "source_path": str(path)})
        concept.meta["family"] = concept.family  # as `load_concept` records it
        words.append(concept)
    return words


def pivotal_embeddings(path: Path) -> Path | None:
    """The words file diffusers' advanced (pivotal tuning) script writes beside its LoRA file, if there is one:
    `<stem>_emb.safetensors`, or `<folder>_emb.safetensors` beside `pytorch_lora_weights.safetensors`."""
    for name in (f"{path.stem}_emb.safetensors", f"{path.parent.name}_emb.safetensors"):
        candidate = path.with_name(name)
        if candidate.is_file() and candidate != path:
            return candidate
    return None


def _pivotal_words(path: Path) -> list[Concept]:
    """A diffusers pivotal pair's words as one concept. The script learns one token per vector ("<s0>", "<s1>", ...)
    and its model card prompts them together, so the word is "<s0><s1>": written so, a prompt means the same in
    diffusers and here. A words file the studio wrote names its word in its metadata (`WORD_KEY`): that word."""
    from studio.engine.concepts import load_concept
    from studio.engine.names import check_word

    embeddings = pivotal_embeddings(path)
    if embeddings is None:
        return []
    read = load_concept(embeddings)
    with safe_open(str(embeddings), "pt") as f:
        named = (f.metadata() or {}).get(WORD_KEY)
    token = "".join(f"<s{k}>" for k in range(read.n_vectors))
    if named:
        check_word(named, f"the word in {embeddings.name}")
        token = named
    concept = Concept(token=token, vectors=read.vectors,
                      meta={"source_format": "diffusers-pivotal", "source_path": str(embeddings)})
    concept.meta["family"] = concept.family
    return [concept]


# -------------------------------------------------------------------------------------------------------- applying


def lora_family(encoder_dims: dict[str, int]) -> str:
    """The family a LoRA must be made for to fit a model whose text encoders have these widths
    (`LoadedModel.encoder_dims`): named by the widths, the rule `LoraFile.families` follows. Not
    `LoadedModel.family`, which names the architecture: the demo model is SD 1.x's architecture with a 128-wide
    encoder, and an SD 1.5 LoRA does not fit it."""
    return family_of(encoder_dims)[0]


def check_loras_fit(loras: list[tuple[LoraFile, float]], encoder_dims: dict[str, int], model_name: str) -> None:
    """Refuse, before any work, a LoRA made for another model family than the one a model with `encoder_dims` takes
    (`lora_family`), and one with no UNet part (text-encoder parts are not applied yet: see `LoraCache._load`).

    The one rule of whether a LoRA fits: requests (`generate`, `loras_applied`) and the library's listing (its fits
    column, the concept pickers) all ask it with the model's encoder widths, so they cannot disagree."""
    family = lora_family(encoder_dims)
    for lora, _weight in loras:
        if "unet" not in lora.modules:
            raise LoraError(f"{lora.path.name}: a text-encoder-only LoRA; the studio applies the UNet part of a LoRA "
                            "only, so it would change nothing")
        if family not in lora.families:
            made_for = "/".join(lora.families) or "an unknown family"
            raise LoraError(f"{lora.path.name}: a LoRA for {made_for}, but the model {model_name} is {family}; "
                            f"load a {made_for} model or pick a {family} LoRA")


def adapter_name(lora: LoraFile) -> str:
    """The peft adapter name of a LoRA file in a UNet: its resolved path's digest and its mtime, so a file changed on
    disk loads as a new adapter (peft names may not hold dots, hence the digest)."""
    return f"{_path_digest(lora.path)}_{lora.mtime_ns}"


def _path_digest(path: Path) -> str:
    return "studio_lora_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]


def _unet_part(lora: LoraFile) -> dict[str, torch.Tensor]:
    """The UNet keys of its state dict, all prefixed `unet.` (an older unprefixed file is UNet-only)."""
    return {(key if key.startswith("unet.") else f"unet.{key}"): tensor for key, tensor in lora.state_dict.items()
            if not key.startswith(("text_encoder.", "text_encoder_2."))}


# What a LoRA cache may hold by default: 512 MiB of adapter tensors, a tenth of SDXL's fp16 UNet (5.1 GB) and a
# third of SD 1.5's (1.7 GB), so the cache never rivals the model it serves. An SD 1.5 LoRA on the attention
# projections has rank x 199,296 parameters (3.0 MiB at rank 4 in fp32; benchmarks/lora_swap.py prints the size measured), so the
# budget holds about 170 of rank 4, or 5 of rank 128 in fp32 (10 in fp16).
DEFAULT_LORA_CACHE_BYTES = 512 * 2**20


@dataclass
class LoraCache:
    """The LoRA adapters loaded in one model's UNet, least recently used first, bounded by their tensors' bytes.

    One per loaded model (`LoadedModel.lora_cache`), used under the model's lock only. An adapter is loaded once and
    kept (a swap then costs a few flag changes, not a load); when the adapters pass `budget_bytes`, the least recently
    used ones that the request at hand does not need are deleted from the UNet (`unet.delete_adapters`) before it
    runs. An adapter the request needs is never evicted, so one request whose LoRAs alone pass the budget still runs;
    the next request evicts them first.
    """

    budget_bytes: int = DEFAULT_LORA_CACHE_BYTES
    sizes: OrderedDict[str, int] = field(default_factory=OrderedDict)  # adapter name -> bytes, least recent first
    # The UNet's peft layers, found once after each load or delete: a whole-UNet walk costs more than a swap may.
    _layers: list | None = None

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    def use(self, pipe, loras: list[LoraFile]) -> list[str]:
        """The adapter names of `loras` in `pipe.unet`, each loaded if it is not cached, marked most recently used,
        then the least recently used others evicted until the cache fits its budget."""
        names = []
        for lora in loras:
            name = self._load(pipe, lora)
            self.sizes.move_to_end(name)
            names.append(name)
        self.evict(pipe.unet, keep=set(names))
        return names

    def evict(self, unet, keep: set[str] = frozenset()) -> list[str]:
        """Delete least recently used adapters, never one in `keep`, until the cache fits `budget_bytes`; the names
        deleted. Call it between requests (under the model's lock), when no adapter is in use."""
        evicted = []
        for name in list(self.sizes):
            if self.total_bytes <= self.budget_bytes:
                break
            if name not in keep:
                self._delete(unet, [name])
                evicted.append(name)
        return evicted

    def layers(self, unet) -> list:
        """The UNet's peft layers (`BaseTunerLayer`), the ones a swap switches."""
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._layers = [module for module in unet.modules() if isinstance(module, BaseTunerLayer)]
        return self._layers

    def _load(self, pipe, lora: LoraFile) -> str:
        """Load `lora`'s UNet part into `pipe.unet` as a peft adapter, unless it is there; a stale adapter of the
        same path (the file changed on disk since) is deleted first."""
        unet, name = pipe.unet, adapter_name(lora)
        loaded = set(getattr(unet, "peft_config", None) or {})
        if name in loaded:
            if name not in self.sizes:  # loaded by other code than the cache's: counted from now on
                self.sizes[name] = _adapter_bytes(self.layers(unet), name)
            return name
        stale = [other for other in loaded if other.startswith(_path_digest(lora.path) + "_") and other != name]
        if stale:
            self._delete(unet, stale)
        skipped = sorted({part for part in lora.modules if part != "unet"})
        if skipped:
            # diffusers loads text-encoder LoRAs through transformers' `load_adapter`, which needs a newer peft than
            # the one installed; the UNet part is most of a LoRA's effect, so the file is used rather than refused.
            warnings.warn(f"{lora.path.name}: its {' and '.join(skipped)} part is skipped; the studio applies the "
                          "UNet part of a LoRA only", stacklevel=5)
        self._layers = None
        with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the cache's design
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            unet.load_lora_adapter(_unet_part(lora), prefix="unet", adapter_name=name,
                                   metadata=lora.adapter_metadata or None, _pipeline=pipe)  # the pipeline: offload hooks
        self.sizes[name] = _adapter_bytes(self.layers(unet), name)
        return name

    def _delete(self, unet, names: list[str]) -> None:
        self._layers = None
        with warnings.catch_warnings():  # peft: "was active which is now deleted"; all are disabled between requests
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            unet.delete_adapters(names)
        for name in names:
            self.sizes.pop(name, None)


def _adapter_bytes(layers: list, name: str) -> int:
    """The bytes of adapter `name`'s tensors in the UNet (lora_A, lora_B, ... of every peft layer), in the dtype
    and on the device the UNet holds them: what evicting it frees."""
    total = 0
    for layer in layers:
        for attribute in layer.adapter_layer_names:
            per_adapter = getattr(layer, attribute)
            if name in per_adapter:
                held = per_adapter[name]
                tensors = [held] if isinstance(held, torch.Tensor) else list(held.parameters())
                total += sum(t.numel() * t.element_size() for t in tensors)
    return total


@contextlib.contextmanager
def loras_applied(model, loras: list[tuple[LoraFile, float]]):
    """Apply `loras` (file, weight) to `model`'s shared UNet for the `with` block; turn every adapter off in `finally`.

    Call it under `model.lock`: the UNet is shared by every request. An adapter once loaded stays in the UNet
    (`model.lora_cache`, keyed by path and mtime, bounded by memory) but is disabled outside the block, where the UNet
    computes exactly what it computed before any LoRA was loaded (tests/engine/test_lora_runtime.py checks the
    pictures bit for bit). With no LoRA nothing is touched.
    """
    if not loras:
        yield
        return
    check_loras_fit(loras, model.encoder_dims, model.name)
    unet, cache = model.pipe.unet, model.lora_cache
    # ---- shared state changed from here: the UNet's adapters (loaded, evicted) and which are active ----
    try:
        names = cache.use(model.pipe, [lora for lora, _weight in loras])
        weights: dict[str, float] = {}  # the same file named twice adds its weights, one adapter
        for name, (_lora, weight) in zip(names, loras):
            weights[name] = weights.get(name, 0.0) + float(weight)
        # What `unet.set_adapters(names, weights)` + `unet.enable_lora()` do, on the cached list of peft layers:
        # each of those calls walks all of the UNet's modules to find them (benchmarks/lora_swap.py times both).
        for layer in cache.layers(unet):
            layer.set_adapter(list(weights))
            for name, weight in weights.items():
                layer.set_scale(name, weight)
            layer.enable_adapters(True)
        yield
    finally:
        for layer in cache.layers(unet):  # `unet.disable_lora()`, on the same list
            layer.enable_adapters(False)
    # ---- end of shared state change ----
