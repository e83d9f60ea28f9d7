"""Reading LoRA files: diffusers/peft and kohya/A1111 forms, with A1111's bundled embeddings.

`load_lora(path)` returns a `LoraFile`: the weights as a state dict in the form diffusers' `load_lora_weights` takes,
what they touch (UNet, text encoders; attention or other layers), their rank, the model families they fit, and any
words bundled in the file as `Concept`s. What a file may not be is refused first, each with one line naming the file
and the problem: a container over `MAX_LORA_BYTES` (checked before it is read, `studio.engine.containers`), a
non-finite weight, a down/up pair whose ranks disagree, a rank over `MAX_LORA_RANK`, adapter metadata that is not what
it claims; whatever a reader still raises becomes a `LoraError` (`failing_closed`). `check_lora_layers` checks the
pairs against the layers of the model they are applied to. Key names are converted by diffusers' own code
(`StableDiffusionLoraLoaderMixin.lora_state_dict`, which calls `_maybe_map_sgm_blocks_to_diffusers` and
`_convert_non_diffusers_lora_to_diffusers`), so the studio reads exactly what diffusers loads. LyCORIS variants that
are not plain low-rank pairs (LoHa, LoKr, IA3, DoRA, full diffs) are refused with a `LoraError` naming the variant.

`loras_applied(model, loras)` applies LoRA files to a loaded model's shared UNet and text encoders for the length of a
`with` block (one request, under the model's lock, around the prompt's encoding and the denoising) and turns them off
again in `finally`; the adapters stay loaded in the model's `LoraCache` (least recently used out first, bounded by
memory). See docs/architecture.md, "LoRA per request".
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from studio.engine.concepts import Concept, read_container
from studio.engine.containers import MAX_LORA_BYTES, failing_closed, load_json, reason_of, safetensors_header
from studio.engine.families import FAMILIES, SDXL_ENCODER_NAMES, family_of
from studio.errors import LoraError, UserError

if TYPE_CHECKING:
    from peft import LoraConfig

LORA_SUFFIXES = (".safetensors", ".pt", ".bin")
PARTS = ("unet", "text_encoder", "text_encoder_2")  # diffusers pipeline attribute names, as in the state dict keys
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
WORD_KEY = "studio_word"  # metadata of a pivotal words file the studio wrote: the word its prompts use
PHRASE_KEY = "studio_phrase"  # metadata of a LoRA the studio trained: the words it was trained on
BUNDLE_PREFIX = "bundle_emb."  # A1111 (PR #13568): bundle_emb.<word>.string_to_param.* or .clip_l / .clip_g

# The UNet's cross-attention key/value input width is the width of the prompt embeddings it was trained on: the text
# encoder's width (SD 1.x 768, SD 2.x 1024) or both encoders' joined (SDXL 768 + 1280 = 2048). Derived from the one
# table of encoder widths, so a LoRA and an embedding can never be given a family by two rules.
_FAMILY_BY_CROSS_WIDTH = {sum(f.encoder_widths): f.id for f in FAMILIES.values()}

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
# (`lora_A`), diffusers' attention-processor forms (`to_q_lora.down`, `.lora.down`, `lora_linear_layer.down`); the
# up matrix of each form (`_UP_OF`), the down marker swapped for its up marker.
_DOWN_KEY = re.compile(r"^(?P<module>.+?)(?P<marker>\.lora_A|\.lora\.down|_lora\.down|\.lora_linear_layer\.down)"
                       r"(?P<adapter>\.[A-Za-z0-9_]+)?\.weight$")
_UP_OF = {".lora_A": ".lora_B", ".lora.down": ".lora.up", "_lora.down": "_lora.up",
          ".lora_linear_layer.down": ".lora_linear_layer.up"}
_UP_KEY = re.compile(r"(\.lora_B|\.lora\.up|_lora\.up|\.lora_linear_layer\.up)(\.[A-Za-z0-9_]+)?\.weight$")
# The largest rank read. Trainers offer up to 1024 (kohya's network_dim, diffusers' --rank) and no shared LoRA we
# know passes 256; at a layer's own width a pair is no longer low-rank, and a larger one only costs memory.
MAX_LORA_RANK = 1024
# kohya's metadata that describes the network, by what each must parse as; A1111 and kohya's tools read them.
# Older kohya versions write "None" for an alpha or a dim they did not set.
_KOHYA_NETWORK_METADATA = {"ss_network_dim": ("an integer", int), "ss_network_alpha": ("a number", float),
                           "ss_network_args": ("a JSON object", None)}
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

    # ---- a learned thing (`studio.engine.learned.plan.Learned`) ----
    tag = "lora"  # `<lora:name:w>` in a prompt names it and sets its weight

    def check_fit(self, model) -> None:
        """Raise `LoraError` unless it is made for `model`'s family and text encoders (`check_loras_fit`)."""
        check_loras_fit([(self, 1.0)], model.encoder_dims, model.name)

    def join(self, plan, weight: float = 1.0) -> None:
        """Its adapters on the shared denoiser and text encoders at `weight` for the request (`loras_applied`), and
        the words it carries in the prompt's slots."""
        plan.patch(loras_applied, self, weight)
        for word in self.words:
            word.join(plan, 1.0)

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

    Reads only the header of a .safetensors file (`safetensors_header`; False when it is unreadable, and the
    embedding reader gives the one-line reason); a .pt/.bin is read through the weights-only unpickler, its size
    checked first, and a `LoraError` when it cannot be.
    """
    path = Path(path)
    with failing_closed(path, LoraError, "LoRA file"):
        if path.suffix.lower() not in LORA_SUFFIXES or not path.is_file():
            return False
        if path.suffix.lower() == ".safetensors":
            try:
                keys = list(safetensors_header(path, LoraError)[0])
            except UserError:
                return False
        else:
            data, _ = read_container(path, LORA_SUFFIXES, LoraError, "LoRA file", MAX_LORA_BYTES)
            keys = list(data) if isinstance(data, dict) else []
    return any(_looks_like_lora_key(str(k)) for k in keys)


def _looks_like_lora_key(key: str) -> bool:
    return (key.startswith(KOHYA_PREFIXES) or key.startswith(BUNDLE_PREFIX) or _DOWN_KEY.match(key) is not None
            or any(pattern.search(key) for pattern, _ in _REFUSED_VARIANTS))


def load_lora(path: str | os.PathLike, unet_config: object | None = None) -> LoraFile:
    """Read a LoRA file (.safetensors; .pt/.bin as weights-only tensors) in diffusers/peft or kohya/A1111 form.

    `unet_config` (a UNet's `.config`) places the blocks of an SDXL kohya file written with sgm names
    (`input_blocks_4_1_…`); without it, SDXL base's layout is assumed. Raises `LoraError` for a LyCORIS variant the
    studio does not apply, a file that holds no LoRA weights or fails a check (see the module's docstring), and any
    failure to read it; `ConceptError` for a bad bundled word.
    """
    path = Path(path)
    with failing_closed(path, LoraError, "LoRA file"):
        return _load_lora(path, unet_config)


def _load_lora(path: Path, unet_config: object | None) -> LoraFile:
    # 1. Raw tensors from the container (the embedding reader's rules: sizes first, safetensors, weights-only pickles).
    data, metadata = read_container(path, LORA_SUFFIXES, LoraError, "LoRA file", MAX_LORA_BYTES)
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise LoraError(f"{path.name}: not a LoRA file (expected a flat dict of tensors)")
    for key, tensor in data.items():  # a NaN or Inf weight draws a black picture (or one of noise)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LoraError(f"{path.name}: {key!r} holds NaN or infinite values (a training run that diverged); "
                            "use an earlier checkpoint of this LoRA")
    _check_kohya_metadata(metadata, path)

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
    modules, ranks, shapes = _pairs(weights, path)
    if not modules:
        listed = ", ".join(sorted(data)[:6])
        raise LoraError(f"{path.name}: neither a LoRA nor an embedding file (no LoRA down/up pairs; keys: {listed}); "
                        "LoRA files hold unet.…lora_A/lora_B (diffusers) or lora_unet_….lora_down/lora_up (kohya)")

    adapter_metadata = _adapter_metadata(metadata, weights, path)
    return LoraFile(path=path, state_dict=weights, source_format=source_format, ranks=tuple(sorted(ranks)),
                    modules=modules, families=_families(shapes), size_bytes=path.stat().st_size, words=words,
                    adapter_metadata=adapter_metadata, mtime_ns=path.stat().st_mtime_ns,
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
            if alpha is not None and alpha.numel() != 1:
                raise LoraError(f"{path.name}: {name}.alpha holds {alpha.numel()} values, not one; re-export it")
            if alpha is not None and down.dim() >= 1 and down.shape[0] > 0:
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


def _adapter_metadata(metadata: dict[str, str], weights: dict[str, torch.Tensor], path: Path) -> dict[str, object]:
    """diffusers' `lora_adapter_metadata`: a JSON object of peft LoraConfig fields per part ("unet.r", ...). What
    `load_lora_adapter` builds a LoraConfig from, so each part's is built here first, and checked against the ranks
    of `weights`: a field of the wrong type, one peft does not know or a rank the weights do not have is one line
    now rather than a traceback when the LoRA is applied."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    stored = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if stored is None:
        return {}
    where = f"its {LORA_ADAPTER_METADATA_KEY!r} metadata"
    found = load_json(stored, path, LoraError, where)
    if not isinstance(found, dict):
        raise LoraError(f"{path.name}: {where} is not a JSON object; re-save the LoRA")
    for part in PARTS:
        config = _part_config(found, part)
        if config:
            _check_ranks(_lora_config(config, part, path), part, weights, path)
    return found


def _part_config(adapter_metadata: dict[str, object], part: str) -> dict[str, object]:
    """The LoraConfig fields of one part, as `load_lora_adapter(prefix=part)` takes them out of the metadata."""
    return {key.removeprefix(f"{part}."): value for key, value in adapter_metadata.items()
            if key.startswith(f"{part}.")}


def _lora_config(config: dict[str, object], part: str, path: Path) -> LoraConfig:
    """peft's LoraConfig of one part's metadata, its numbers checked by type and range first (LoraConfig checks
    neither); LoraError naming the field."""
    from peft import LoraConfig

    def bad(field: str, wanted: str) -> LoraError:
        return LoraError(f"{path.name}: its adapter metadata's {part}.{field} is {config[field]!r:.60}, not "
                         f"{wanted}; re-save the LoRA")

    def is_number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if "r" in config and not (type(config["r"]) is int and 1 <= config["r"] <= MAX_LORA_RANK):
        raise bad("r", f"a rank from 1 to {MAX_LORA_RANK}")
    if "lora_alpha" in config and not is_number(config["lora_alpha"]):
        raise bad("lora_alpha", "a number")
    for field, check, wanted in (("rank_pattern", lambda v: type(v) is int and 1 <= v <= MAX_LORA_RANK,
                                  f"a map of ranks from 1 to {MAX_LORA_RANK}"),
                                 ("alpha_pattern", is_number, "a map of numbers")):
        value = config.get(field)
        if value is not None and not (isinstance(value, dict) and all(check(v) for v in value.values())):
            raise bad(field, wanted)
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise bad("target_modules", "a module name or a list of them")
    if config.get("use_dora"):
        raise LoraError(f"{path.name}: its adapter metadata says DoRA ({part}.use_dora); {_WHAT_TO_DO}")
    try:
        return LoraConfig(**config)
    except Exception as exc:  # noqa: BLE001 - LoraConfig's own checks raise TypeError, ValueError and others
        raise LoraError(f"{path.name}: its adapter metadata for {part} is no LoRA config peft accepts "
                        f"({reason_of(exc)}); re-save the LoRA") from None


def _check_ranks(config: LoraConfig, part: str, weights: dict[str, torch.Tensor], path: Path) -> None:
    """With metadata, peft builds each pair of `part` at the rank its LoraConfig names (`r`, or `rank_pattern`'s), not
    at the file's, so a rank of the weights that it does not name would fail as a size mismatch when applied."""
    named = {config.r, *(config.rank_pattern or {}).values()}
    ranks = {int(tensor.shape[0]) for key, tensor in weights.items()
             if _DOWN_KEY.match(key) and _part_of(key) == part}
    if not ranks <= named:
        raise LoraError(f"{path.name}: its adapter metadata gives {part} rank(s) {sorted(named)}, but its weights "
                        f"have rank(s) {sorted(ranks)}; re-save the LoRA")


def _part_of(key: str) -> str:
    """The part ("unet", "text_encoder", "text_encoder_2") a diffusers key belongs to; an unprefixed key is the
    UNet's (diffusers' older attention-processor form), as in `_pairs`."""
    part = key.partition(".")[0]
    return part if part in PARTS else "unet"


def _check_kohya_metadata(metadata: dict[str, str], path: Path) -> None:
    """kohya's `ss_network_*` metadata, where present, must be what it says (see `_KOHYA_NETWORK_METADATA`)."""
    for key, (wanted, parse) in _KOHYA_NETWORK_METADATA.items():
        value = metadata.get(key)
        if value is None or value == "None":
            continue
        try:
            ok = isinstance(load_json(value, path, LoraError, key), dict) if parse is None else (
                math.isfinite(parse(value)))
        except (LoraError, ValueError):
            ok = False
        if not ok:
            raise LoraError(f"{path.name}: its kohya metadata {key} is {value!r:.60}, not {wanted}; the file is "
                            "damaged, re-export it")


def _pairs(weights: dict[str, torch.Tensor],
           path: Path) -> tuple[dict[str, list[str]], set[int], dict[str, tuple[int, ...]]]:
    """(part -> module names, the ranks, module -> down-matrix shape) of the down/up pairs in diffusers keys, each
    pair checked on its own (no model needed): an up for every down and a down for every up, linear (2-D) or
    convolution (4-D, up 1x1) matrices, the down's rank the up's, and a rank from 1 to MAX_LORA_RANK."""
    modules: dict[str, list[str]] = {}
    ranks: set[int] = set()
    shapes: dict[str, tuple[int, ...]] = {}
    ups = set()
    for key, tensor in weights.items():
        found = _DOWN_KEY.match(key)
        if found is None:
            continue
        up_key = f"{found['module']}{_UP_OF[found['marker']]}{found['adapter'] or ''}.weight"
        _check_pair(key, tensor, up_key, weights.get(up_key), path)
        ups.add(up_key)
        module = found["module"]
        part, _, _ = module.partition(".")
        if part not in PARTS:  # an unprefixed UNet file (diffusers' older attention-processor form)
            part, module = "unet", f"unet.{module}"
        modules.setdefault(part, []).append(module.removeprefix(f"{part}."))
        ranks.add(int(tensor.shape[0]))
        shapes[module] = tuple(tensor.shape)
    orphan = next((key for key in weights if _UP_KEY.search(key) and key not in ups), None)
    if orphan is not None:
        raise LoraError(f"{path.name}: {orphan!r} has no down matrix to go with it; the file is incomplete, "
                        "re-export it")
    return {part: sorted(modules[part]) for part in PARTS if part in modules}, ranks, shapes


def _check_pair(down_key: str, down: torch.Tensor, up_key: str, up: torch.Tensor | None, path: Path) -> None:
    if up is None:
        raise LoraError(f"{path.name}: {down_key!r} has no up matrix ({up_key!r}); the file is incomplete, "
                        "re-export it")
    shapes = f"down {list(down.shape)}, up {list(up.shape)}"
    if down.dim() not in (2, 4) or up.dim() != down.dim() or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise LoraError(f"{path.name}: the pair {down_key!r} is neither a linear nor a convolution pair ({shapes}); "
                        "the file is damaged, re-export it")
    if down.shape[0] != up.shape[1]:
        raise LoraError(f"{path.name}: the pair {down_key!r} has mismatched ranks ({shapes}: the down's first size "
                        "must be the up's second); the file is damaged, re-export it")
    if not 1 <= down.shape[0] <= MAX_LORA_RANK:
        raise LoraError(f"{path.name}: the pair {down_key!r} has rank {down.shape[0]}; the studio reads ranks 1 to "
                        f"{MAX_LORA_RANK}")


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
        elif rest in SDXL_ENCODER_NAMES:
            by_word.setdefault(word, {})[SDXL_ENCODER_NAMES[rest]] = tensor
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
    named = safetensors_header(embeddings, LoraError)[1].get(WORD_KEY)
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
    (`lora_family`), and one with a part for a text encoder the model does not have.

    The one rule of whether a LoRA fits: requests (`generate`, `loras_applied`) and the library's listing (its fits
    column, the concept pickers) all ask it with the model's encoder widths, so they cannot disagree."""
    family = lora_family(encoder_dims)
    for lora, _weight in loras:
        if family not in lora.families:
            made_for = "/".join(lora.families) or "an unknown family"
            raise LoraError(f"{lora.path.name}: a LoRA for {made_for}, but the model {model_name} is {family}; "
                            f"load a {made_for} model or pick a {family} LoRA")
        missing = sorted(part for part in lora.modules if part != "unet" and part not in encoder_dims)
        if missing:
            raise LoraError(f"{lora.path.name}: it changes {' and '.join(missing)}, which the model {model_name} "
                            f"does not have; pick a LoRA made for {family}")


def check_lora_layers(lora: LoraFile, unet: torch.nn.Module, model_name: str,
                      text_encoders: dict[str, torch.nn.Module] | None = None) -> None:
    """Refuse, before it is loaded, a LoRA whose pairs do not fit the layers they name, in `unet` and in
    `text_encoders` (part -> module, `lora_modules`): a layer the model does not have or that is neither linear nor a
    convolution, a pair of the other kind, or a down matrix whose input width (or kernel) or an up matrix whose output
    width is not the layer's. One line naming the file, the layer and both shapes; what peft would otherwise end in as
    a size-mismatch traceback, half loaded. The keys are read as they are loaded (`peft_parts`, and for a text encoder
    `text_encoder_weights`)."""
    parts = {"unet": (unet, peft_parts(lora).get("unet", {}))}
    for part, encoder in (text_encoders or {}).items():
        if part in lora.modules:
            parts[part] = (encoder, text_encoder_weights(lora, part, encoder))
    for part, (module, weights) in parts.items():
        where = model_name if part == "unet" else f"{model_name}'s {part}"
        for key, down in weights.items():
            if key.endswith(".lora_A.weight"):
                name = key.removesuffix(".lora_A.weight")
                up = weights.get(f"{name}.lora_B.weight")
                if up is not None:  # none such after `_pairs`' checks on reading; peft would drop a lone half
                    _check_layer_pair(lora, _model_layer(module, name), name, down, up, where)


def _check_layer_pair(lora: LoraFile, layer: torch.nn.Module | None, name: str, down: torch.Tensor, up: torch.Tensor,
                      where: str) -> None:
    if layer is None:
        raise LoraError(f"{lora.path.name}: it changes layer {name}, which {where} does not have; the LoRA "
                        "was made for another model")
    if isinstance(layer, torch.nn.Linear):
        kind, sizes, kernel = "linear", (layer.in_features, layer.out_features), ()
    elif isinstance(layer, torch.nn.Conv2d):
        kind, sizes, kernel = "convolution", (layer.in_channels, layer.out_channels), tuple(layer.kernel_size)
    else:
        raise LoraError(f"{lora.path.name}: it changes layer {name} of {where}, a {type(layer).__name__}; a "
                        "LoRA changes linear and convolution layers only")
    fits = (down.dim() == up.dim() == (2 if kind == "linear" else 4) and down.shape[1] == sizes[0]
            and up.shape[0] == sizes[1] and tuple(down.shape[2:]) == kernel)
    if not fits:
        raise LoraError(f"{lora.path.name}: layer {name} of {where} is a {kind} layer from {sizes[0]} to "
                        f"{sizes[1]} features{f' (kernel {list(kernel)})' if kernel else ''}, but the LoRA's "
                        f"pair there is down {list(down.shape)}, up {list(up.shape)}; the LoRA was made for "
                        "another model, or is damaged")


def _model_layer(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    """`model`'s module `name` (the layer itself when peft wraps it); None when there is none. A name of diffusers'
    attention-processor form (`attn1.processor.to_q`) names the projection of that attention."""
    for candidate in (name, name.replace(".processor.", ".")):
        try:
            module = model.get_submodule(candidate)
        except AttributeError:
            continue
        return getattr(module, "base_layer", module)
    return None


def adapter_name(lora: LoraFile) -> str:
    """The peft adapter name of a LoRA file in a UNet: its resolved path's digest and its mtime, so a file changed on
    disk loads as a new adapter (peft names may not hold dots, hence the digest)."""
    return f"{_path_digest(lora.path)}_{lora.mtime_ns}"


def _path_digest(path: Path) -> str:
    return "studio_lora_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]


def _unet_part(lora: LoraFile) -> dict[str, torch.Tensor]:
    """The UNet keys of its state dict, all prefixed `unet.` (an older unprefixed file is UNet-only)."""
    return {(key if key.startswith("unet.") else f"unet.{key}"): tensor for key, tensor in lora.state_dict.items()
            if _part_of(key) == "unet"}


def peft_parts(lora: LoraFile) -> dict[str, dict[str, torch.Tensor]]:
    """part -> its keys in peft form (`….lora_A.weight`), unprefixed, converted the way diffusers converts them when
    it loads each part (`load_lora_adapter` for the UNet, `_load_lora_into_text_encoder` for the text encoders)."""
    from diffusers.utils.state_dict_utils import (StateDictType, convert_state_dict_to_diffusers,
                                                  convert_state_dict_to_peft, convert_unet_state_dict_to_peft)

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora.state_dict.items():
        part = _part_of(key)
        parts.setdefault(part, {})[key.removeprefix(f"{part}.")] = tensor.detach().to("cpu").contiguous()
    for part, tensors in parts.items():
        if all(".lora_A." in k or ".lora_B." in k for k in tensors):
            continue
        if part == "unet":
            parts[part] = convert_unet_state_dict_to_peft(tensors)
        else:
            # Named explicitly: diffusers guesses the old form (`to_q_lora.down`, what its kohya converter writes for
            # a text encoder) only from a `to_out_lora` key, so a text-encoder LoRA without out_proj would be refused
            # as "Could not automatically infer state dict type".
            old = any("_lora.down." in k or "_lora.up." in k for k in tensors)
            tensors = convert_state_dict_to_diffusers(tensors, StateDictType.DIFFUSERS_OLD if old else None)
            parts[part] = convert_state_dict_to_peft(tensors, StateDictType.DIFFUSERS)
    return {part: parts[part] for part in PARTS if part in parts}


def text_encoder_weights(lora: LoraFile, part: str, text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`lora`'s pairs for the text encoder `part`, in peft form, each module named as `text_encoder` names it.

    kohya, A1111 and older diffusers files name a CLIP text encoder's layers from `text_model.`
    (`text_model.encoder.layers.0.self_attn.q_proj`); transformers >= 5.6 made `CLIPTextModel` flat
    (`encoder.layers.0.…`), and `CLIPTextModelWithProjection` keeps `text_projection` beside them. Each module is
    looked up as written, without `text_model.` and with it; one found under none keeps its name, for
    `check_lora_layers` to refuse."""
    names = {name for name, _ in text_encoder.named_modules()}
    return {_module_named(key, names): tensor for key, tensor in peft_parts(lora).get(part, {}).items()}


def _module_named(key: str, names: set[str]) -> str:
    """`key` (`<module>.lora_A.weight`, or a bare module name) with its module named as in `names`."""
    module, marker, rest = key.partition(".lora_")
    for candidate in (module, module.removeprefix("text_model."), f"text_model.{module}"):
        if candidate in names:
            return f"{candidate}{marker}{rest}"
    return key


def _text_encoder_config(lora: LoraFile, part: str, weights: dict[str, torch.Tensor], names: set[str]) -> LoraConfig:
    """The peft LoraConfig of the text-encoder part `part`, as diffusers builds it (`_create_lora_config`): the part's
    saved config where the file has one, else each module's rank with lora_alpha = rank (scale 1: kohya's alpha / rank
    is folded into the weights on reading). Its targets are the modules of `weights` (`text_encoder_weights`) by their
    full names, and the pattern keys of a saved config are named as the text encoder `names` its modules."""
    from peft import LoraConfig

    ranks = {key.removesuffix(".lora_A.weight"): int(t.shape[0]) for key, t in weights.items()
             if key.endswith(".lora_A.weight")}
    saved = _part_config(lora.adapter_metadata, part)
    if saved:
        fields = dict(saved)
        for pattern in ("rank_pattern", "alpha_pattern"):
            fields[pattern] = {_module_named(k, names): v for k, v in (saved.get(pattern) or {}).items()}
    else:
        r = Counter(ranks.values()).most_common(1)[0][0]
        differ = {module: rank for module, rank in ranks.items() if rank != r}
        fields = dict(r=r, lora_alpha=r, rank_pattern=differ, alpha_pattern=differ)
    return LoraConfig(**dict(fields, target_modules=sorted(ranks), inference_mode=True))


# What a LoRA cache may hold by default: 512 MiB of adapter tensors, a tenth of SDXL's fp16 UNet (5.1 GB) and a
# third of SD 1.5's (1.7 GB), so the cache never rivals the model it serves. An SD 1.5 LoRA on the attention
# projections has rank x 199,296 parameters (3.0 MiB at rank 4 in fp32; benchmarks/lora_swap.py prints the size measured), so the
# budget holds about 170 of rank 4, or 5 of rank 128 in fp32 (10 in fp16).
DEFAULT_LORA_CACHE_BYTES = 512 * 2**20


def lora_modules(pipe) -> dict[str, torch.nn.Module]:
    """The modules of `pipe` a LoRA's parts change, by part (`PARTS`: the UNet and the text encoders it has)."""
    return {part: module for part in PARTS if (module := getattr(pipe, part, None)) is not None}


@dataclass
class LoraCache:
    """The LoRA adapters loaded in one model's UNet and text encoders, least recently used first, bounded by their
    tensors' bytes.

    One per loaded model (`LoadedModel.lora_cache`), used under the model's lock only. An adapter is loaded once and
    kept (a swap then costs a few flag changes, not a load), each part of the file into its module under the same
    adapter name; when the adapters pass `budget_bytes`, the least recently used ones that the request at hand does
    not need are deleted from every module before it runs. An adapter the request needs is never evicted, so one
    request whose LoRAs alone pass the budget still runs; the next request evicts them first.
    """

    budget_bytes: int = DEFAULT_LORA_CACHE_BYTES
    sizes: OrderedDict[str, int] = field(default_factory=OrderedDict)  # adapter name -> bytes, least recent first
    # The peft layers of the UNet and the text encoders, found once after each load or delete: a walk of every module
    # costs more than a swap may.
    _layers: list | None = None

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    def use(self, pipe, loras: list[LoraFile]) -> list[str]:
        """The adapter names of `loras` in `pipe`, each loaded if it is not cached, marked most recently used, then
        the least recently used others evicted until the cache fits its budget."""
        names = []
        for lora in loras:
            name = self._load(pipe, lora)
            self.sizes.move_to_end(name)
            names.append(name)
        self.evict(pipe, keep=set(names))
        return names

    def evict(self, pipe, keep: set[str] = frozenset()) -> list[str]:
        """Delete least recently used adapters, never one in `keep`, until the cache fits `budget_bytes`; the names
        deleted. Call it between requests (under the model's lock), when no adapter is in use."""
        evicted = []
        for name in list(self.sizes):
            if self.total_bytes <= self.budget_bytes:
                break
            if name not in keep:
                self._delete(pipe, [name])
                evicted.append(name)
        return evicted

    def layers(self, pipe) -> list:
        """The peft layers (`BaseTunerLayer`) of `pipe`'s UNet and text encoders, the ones a swap switches."""
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._layers = [layer for module in lora_modules(pipe).values() for layer in module.modules()
                            if isinstance(layer, BaseTunerLayer)]
        return self._layers

    def _load(self, pipe, lora: LoraFile) -> str:
        """Load each part of `lora` into its module of `pipe` as a peft adapter, unless it is there; a stale adapter
        of the same path (the file changed on disk since) is deleted first."""
        name, modules = adapter_name(lora), lora_modules(pipe)
        loaded = {adapter for module in modules.values() for adapter in (getattr(module, "peft_config", None) or {})}
        if name in loaded:
            if name not in self.sizes:  # loaded by other code than the cache's: counted from now on
                self.sizes[name] = _adapter_bytes(self.layers(pipe), name)
            return name
        stale = [other for other in loaded if other.startswith(_path_digest(lora.path) + "_") and other != name]
        if stale:
            self._delete(pipe, stale)
        self._layers = None
        with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the cache's design
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            for part, module in modules.items():
                if part not in lora.modules:
                    continue
                with _grad_flags_kept(module):  # peft marks the base weights frozen: they are shared, keep them
                    if part == "unet":
                        _load_unet_part(pipe, lora, name)
                    else:
                        _load_text_encoder_part(module, lora, part, name)
        self.sizes[name] = _adapter_bytes(self.layers(pipe), name)
        return name

    def _delete(self, pipe, names: list[str]) -> None:
        from peft.functional import delete_adapter

        self._layers = None
        with warnings.catch_warnings():  # peft: "was active which is now deleted"; all are disabled between requests
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            for part, module in lora_modules(pipe).items():
                held = [name for name in names if name in (getattr(module, "peft_config", None) or {})]
                if held and part == "unet":
                    module.delete_adapters(held)
                elif held:
                    # What diffusers' `delete_adapters` does for a transformers model (`delete_adapter_layers`), by
                    # peft's public function: transformers' own `delete_adapter` refuses peft < 0.22.
                    for name in held:
                        delete_adapter(module, name, prefix="lora_")
                        module.peft_config.pop(name)
                    if not module.peft_config:
                        del module.peft_config
        for name in names:
            self.sizes.pop(name, None)


def _load_unet_part(pipe, lora: LoraFile, name: str) -> None:
    """The UNet part by diffusers' own loader (`load_lora_adapter`, what `load_lora_weights` calls)."""
    # Metadata only when it has the UNet's config: load_lora_adapter would build a default one from the rest.
    metadata = lora.adapter_metadata if _part_config(lora.adapter_metadata, "unet") else None
    pipe.unet.load_lora_adapter(_unet_part(lora), prefix="unet", adapter_name=name, metadata=metadata,
                                _pipeline=pipe)  # the pipeline: its offload hooks


def _load_text_encoder_part(text_encoder: torch.nn.Module, lora: LoraFile, part: str, name: str) -> None:
    """A text-encoder part by peft's public functions (`peft.functional`: `inject_adapter_in_model`, then
    `set_peft_model_state_dict`), what transformers' `load_adapter` does inside diffusers' `load_lora_weights`, with
    the config diffusers builds (`_text_encoder_config`). Not through transformers' wrapper: its model-level adapter
    methods (`add_adapter`, `set_adapter`, `delete_adapter`) refuse peft < 0.22 with transformers 5, which diffusers'
    loading does not need; peft's functions work on any torch module."""
    from peft.functional import inject_adapter_in_model, set_peft_model_state_dict

    names = {module_name for module_name, _ in text_encoder.named_modules()}
    weights = text_encoder_weights(lora, part, text_encoder)
    inject_adapter_in_model(_text_encoder_config(lora, part, weights, names), text_encoder, adapter_name=name)
    result = set_peft_model_state_dict(text_encoder, weights, adapter_name=name)
    unexpected = [key for key in getattr(result, "unexpected_keys", ()) if ".lora_" in key]
    if unexpected:  # none after `check_lora_layers`; a half-loaded adapter must not stay
        raise LoraError(f"{lora.path.name}: {len(unexpected)} weights of its {part} part found no layer "
                        f"({unexpected[0]}); the LoRA was made for another model")


@contextlib.contextmanager
def _grad_flags_kept(module: torch.nn.Module):
    """Each existing parameter of `module` keeps its `requires_grad` across the block (new ones keep theirs)."""
    flags = [(param, param.requires_grad) for param in module.parameters()]
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def _adapter_bytes(layers: list, name: str) -> int:
    """The bytes of adapter `name`'s tensors in the UNet and text encoders (lora_A, lora_B, ... of every peft layer),
    in the dtype and on the device each module holds them: what evicting it frees."""
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
    """Apply `loras` (file, weight) to `model`'s shared UNet and text encoders for the `with` block; turn every
    adapter off in `finally`.

    Call it under `model.lock`, around the prompt's encoding and the denoising both: the modules are shared by every
    request, and a LoRA's text-encoder part changes the prompt embeddings. An adapter once loaded stays in its modules
    (`model.lora_cache`, keyed by path and mtime, bounded by memory) but is disabled outside the block, where they
    compute exactly what they computed before any LoRA was loaded (tests/engine/test_lora_runtime.py and
    test_lora_text_encoder.py check the pictures bit for bit). With no LoRA nothing is touched.
    """
    if not loras:
        yield
        return
    check_loras_fit(loras, model.encoder_dims, model.name)
    cache, modules = model.lora_cache, lora_modules(model.pipe)
    text_encoders = {part: module for part, module in modules.items() if part != "unet"}
    for lora, _weight in loras:
        check_lora_layers(lora, modules["unet"], model.name, text_encoders)
    # ---- shared state changed from here: the adapters of the UNet and text encoders (loaded, evicted), which are
    # active ----
    try:
        names = cache.use(model.pipe, [lora for lora, _weight in loras])
        weights: dict[str, float] = {}  # the same file named twice adds its weights, one adapter
        for name, (_lora, weight) in zip(names, loras):
            weights[name] = weights.get(name, 0.0) + float(weight)
        # What `pipe.set_adapters(names, weights)` + `enable_lora()` do (one weight per LoRA for the UNet and the text
        # encoders alike), on the cached list of peft layers: each of those calls walks all of the modules to find
        # them (benchmarks/lora_swap.py times both). A layer without one of the adapters skips it.
        for layer in cache.layers(model.pipe):
            layer.set_adapter(list(weights))
            for name, weight in weights.items():
                layer.set_scale(name, weight)
            layer.enable_adapters(True)
        yield
    finally:
        for layer in cache.layers(model.pipe):  # `pipe.disable_lora()`, on the same list
            layer.enable_adapters(False)
    # ---- end of shared state change ----
