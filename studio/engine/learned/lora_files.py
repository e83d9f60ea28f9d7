"""Reading LoRA files: diffusers/peft and kohya/A1111 forms, with A1111's bundled embeddings.

`load_lora(path)` returns a `LoraFile`: the weights as a state dict in the form diffusers' `load_lora_weights` takes,
what they touch (UNet, text encoders; attention or other layers), their rank, the model families they fit, and any
words bundled in the file as `Concept`s. What a file may not be is refused first, each with one line naming the file
and the problem: a container over `MAX_LORA_BYTES` (checked before it is read, `studio.engine.containers`), a
non-finite weight, a down/up pair whose ranks disagree, a rank over `MAX_LORA_RANK`, adapter metadata that is not what
it claims; whatever a reader still raises becomes a `LoraError` (`failing_closed`). Key names are converted by
diffusers' own code (`StableDiffusionLoraLoaderMixin.lora_state_dict`, which calls `_maybe_map_sgm_blocks_to_diffusers`
and `_convert_non_diffusers_lora_to_diffusers`), so the studio reads exactly what diffusers loads. LyCORIS variants
that are not plain low-rank pairs (LoHa, LoKr, IA3, DoRA, full diffs) are refused with a `LoraError` naming the
variant.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from studio.engine.containers import MAX_LORA_BYTES, failing_closed, load_json, reason_of, safetensors_header
from studio.engine.families import FAMILIES, SDXL_ENCODER_NAMES, family_of
from studio.engine.learned.lora import PARTS, LoraFile, _part_config, _part_of
from studio.engine.learned.word import Concept
from studio.engine.learned.word_files import load_word, read_container
from studio.engine.names import check_word
from studio.errors import LoraError, UserError

if TYPE_CHECKING:
    from peft import LoraConfig

LORA_SUFFIXES = (".safetensors", ".pt", ".bin")
# kohya's key prefixes of every family (lora_unet_, lora_te_, lora_te1_, lora_te2_), from the family records
KOHYA_PREFIXES = tuple(dict.fromkeys(prefix for family in FAMILIES.values() for prefix in family.kohya_prefixes))
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
# kohya's Flux key prefixes (sd-scripts' double/single blocks, ai-toolkit's mixed lora_transformer_ names, BFL's
# names in lora_down form), all read by diffusers' Flux converter.
_FLUX_KOHYA_PREFIXES = ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_transformer_",
                        "diffusion_model.")
# Module names only one of the two transformer families has: Flux's single-stream blocks, its packed-latent input
# and its guidance embedder; SD3's patch embedding and SD3.5's second attention. A LoRA on the joint blocks alone
# fits either family by name; the layer check (`check_lora_layers`) then compares its shapes with the model's.
_FLUX_ONLY = re.compile(r"^transformer\.(single_transformer_blocks\.|x_embedder|time_text_embed\.guidance_embedder)")
_SD3_ONLY = re.compile(r"^transformer\.(pos_embed|transformer_blocks\.\d+\.attn2\.)")
_ENCODER_QUERY = re.compile(r"self_attn\.(q_proj|to_q)$")


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
    return (key.startswith(KOHYA_PREFIXES + _FLUX_KOHYA_PREFIXES) or key.startswith(BUNDLE_PREFIX)
            or _DOWN_KEY.match(key) is not None
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

    # 4. Kohya/A1111 names -> diffusers names, by diffusers' converters (Flux's own, else SD's).
    source_format = "diffusers"
    _refuse_unconverted_layouts(weights, path)
    if any(k.startswith(_FLUX_KOHYA_PREFIXES) for k in weights):
        source_format = "kohya"
        weights = _from_flux_kohya(weights, path)
    elif weights and all(k.startswith(KOHYA_PREFIXES) for k in weights):
        source_format = "kohya"
        weights = _from_kohya(weights, path, unet_config)
    elif any(k.endswith(".alpha") for k in weights):
        # diffusers' form with an alpha per pair (transformer., text_encoder., unet.): alpha / rank folded, as
        # diffusers 0.42.1's Flux loader reads them (network alphas). Its SD/SDXL/SD3 `load_lora_weights` refuses
        # such a file ("Invalid LoRA checkpoint"); folded, it draws what their network-alpha path draws.
        weights = _fold_alphas(weights, path, ".lora_A.weight", ".lora_B.weight")
    modules, ranks, shapes = _pairs(weights, path)
    if not modules:
        listed = ", ".join(sorted(data)[:6])
        raise LoraError(f"{path.name}: neither a LoRA nor an embedding file (no LoRA down/up pairs; keys: {listed}); "
                        "LoRA files hold unet.… or transformer.…lora_A/lora_B (diffusers) or "
                        "lora_unet_….lora_down/lora_up (kohya)")

    adapter_metadata = _adapter_metadata(metadata, weights, path)
    return LoraFile(path=path, state_dict=weights, source_format=source_format, ranks=tuple(sorted(ranks)),
                    modules=modules, families=_narrowed(_families(shapes), metadata, words),
                    size_bytes=path.stat().st_size, words=words,
                    adapter_metadata=adapter_metadata, mtime_ns=path.stat().st_mtime_ns,
                    phrase=str((metadata or {}).get(PHRASE_KEY, "")))


def _from_kohya(weights: dict[str, torch.Tensor], path: Path, unet_config: object | None) -> dict[str, torch.Tensor]:
    """Kohya's keys converted by diffusers, with each `.alpha` folded into its up matrix.

    Kohya scales a pair by alpha / rank; peft (what `load_lora_weights` builds) by lora_alpha / r, which is 1 when a
    state dict carries no alphas. Folding alpha / rank into `lora_up` keeps the state dict complete on its own.
    """
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    folded = _fold_alphas(weights, path, ".lora_down.weight", ".lora_up.weight")
    if unet_config is None and any("input_blocks" in k or "output_blocks" in k for k in folded):
        unet_config = SimpleNamespace(layers_per_block=2)  # SDXL base: the one UNet kohya names in sgm blocks
    try:
        state_dict, _alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(folded), unet_config=unet_config)
    except ValueError as exc:
        first = (str(exc).strip().splitlines() or [""])[-1][:200]
        raise LoraError(f"{path.name}: kohya LoRA keys diffusers cannot place ({first}); {_WHAT_TO_DO}") from None
    return state_dict


def _fold_alphas(weights: dict[str, torch.Tensor], path: Path, down_suffix: str,
                 up_suffix: str) -> dict[str, torch.Tensor]:
    """`weights` without their `.alpha` keys, each alpha / rank folded into its pair's up matrix (what kohya's and
    peft's scale alpha / rank computes, in a state dict complete on its own)."""
    folded = {}
    for key, tensor in weights.items():
        if key.endswith(".alpha"):
            continue
        if key.endswith(up_suffix):
            name = key.removesuffix(up_suffix)
            down, alpha = weights.get(f"{name}{down_suffix}"), weights.get(f"{name}.alpha")
            if down is None:
                raise LoraError(f"{path.name}: {key!r} has no matching down matrix; the file is incomplete, "
                                "re-export it")
            if alpha is not None and alpha.numel() != 1:
                raise LoraError(f"{path.name}: {name}.alpha holds {alpha.numel()} values, not one; re-export it")
            if alpha is not None and down.dim() >= 1 and down.shape[0] > 0:
                tensor = tensor * (float(alpha) / down.shape[0])
        folded[key] = tensor
    return folded


def _refuse_unconverted_layouts(weights: dict[str, torch.Tensor], path: Path) -> None:
    """Layouts diffusers 0.42's loaders read as nothing (they load none of the keys, without an error): kohya's SD3
    names (`SD3LoraLoaderMixin.lora_state_dict` converts no kohya keys) and peft pairs under the original Flux names
    (`diffusion_model.double_blocks.…lora_A`; `FluxLoraLoaderMixin` converts that prefix only in kohya's
    lora_down/lora_up form)."""
    if any(k.startswith("lora_unet_joint_blocks_") for k in weights):
        raise LoraError(f"{path.name}: an SD3 LoRA in kohya's layout (lora_unet_joint_blocks_…), which diffusers "
                        "has no converter for; save it in diffusers' form (transformer.…lora_A/lora_B)")
    if any(k.startswith("diffusion_model.") and ".lora_A." in k for k in weights):
        raise LoraError(f"{path.name}: a LoRA under the original Flux names (diffusion_model.…lora_A), which "
                        "diffusers' Flux reader does not convert; save it in diffusers' form "
                        "(transformer.…lora_A/lora_B) or kohya's (lora_unet_double_blocks_…)")


def _from_flux_kohya(weights: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """kohya's (sd-scripts, FluxGym) and ai-toolkit's mixed Flux names converted by diffusers' Flux reader
    (`FluxLoraLoaderMixin.lora_state_dict` -> `_convert_kohya_flux_lora_to_diffusers`), which splits the fused
    qkv pairs into to_q/to_k/to_v and folds each alpha / rank into the weights itself."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    try:
        return dict(FluxLoraLoaderMixin.lora_state_dict(dict(weights)))
    except (ValueError, AssertionError, KeyError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[-1][:200]
        raise LoraError(f"{path.name}: kohya Flux LoRA keys diffusers cannot place ({first}); {_WHAT_TO_DO}") from None


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
    """Families from the UNet's cross-attention key/value input width, from a transformer's module names (SD3 or
    Flux), else from the text encoders' widths."""
    if any(module.startswith("transformer.") for module in shapes):
        flux, sd3 = (any(pattern.match(module) for module in shapes) for pattern in (_FLUX_ONLY, _SD3_ONLY))
        return ("flux",) if flux and not sd3 else ("sd3",) if sd3 and not flux else ("flux", "sd3")
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


def _narrowed(families: tuple[str, ...], metadata: dict[str, str], words: list[Concept]) -> tuple[str, ...]:
    """Of the families a LoRA's layer names fit (a transformer LoRA on the joint blocks alone: SD3 or Flux), the one
    the studio wrote in its metadata (`studio_family`), else the one its words are made for, when it is one of them."""
    for named in (metadata.get("studio_family"), *(word.family for word in words)):
        if named in families:
            return (named,)
    return families


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
    embeddings = pivotal_embeddings(path)
    if embeddings is None:
        return []
    read = load_word(embeddings)  # diffusers' pivotal words are plain words, never per-layer
    named = safetensors_header(embeddings, LoraError)[1].get(WORD_KEY)
    token = "".join(f"<s{k}>" for k in range(read.n_vectors))
    if named:
        check_word(named, f"the word in {embeddings.name}")
        token = named
    concept = Concept(token=token, vectors=read.vectors,
                      meta={"source_format": "diffusers-pivotal", "source_path": str(embeddings)})
    concept.meta["family"] = concept.family
    return [concept]
