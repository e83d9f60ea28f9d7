"""A LoRA file as a learned thing, and LoRAs applied per request.

A `LoraFile` holds the weights of a file in the form diffusers' `load_lora_weights` takes (read by
`studio.engine.learned.lora_files`). `check_loras_fit` is the one rule of whether a LoRA fits a model;
`check_lora_layers` checks its pairs against the layers they are applied to.

`loras_applied(model, loras)` applies LoRA files to a loaded model's shared denoiser and text encoders for the length of a
`with` block (one request, under the model's lock, around the prompt's encoding and the denoising: what
`LoraFile.join` asks of a request's plan) and turns them off again in `finally`; the adapters stay loaded in the
model's `LoraCache` (least recently used out first, bounded by memory). See docs/architecture.md, "LoRA per request".
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from studio.engine.families import family_of
from studio.engine.learned.word import Concept
from studio.errors import LoraError


if TYPE_CHECKING:
    from peft import LoraConfig
# diffusers pipeline attribute names, as in the state dict keys: a denoiser (the UNet of SD 1.x/2.x/SDXL, the
# transformer of SD3/Flux: `ModelFamily.denoiser`) and the CLIP text encoders
PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
DENOISER_PARTS = ("unet", "transformer")


@dataclass
class LoraFile:
    """A LoRA file as read: weights in diffusers' form plus what they fit, and any words bundled with them."""

    path: Path
    state_dict: dict[str, torch.Tensor]  # diffusers/peft keys ("unet.…", "transformer.…", "text_encoder.…"); kohya
    # alphas folded in
    source_format: str  # "diffusers" or "kohya"
    ranks: tuple[int, ...]  # the distinct ranks of its pairs, smallest first
    modules: dict[str, list[str]]  # part (`PARTS`: "unet", "transformer", "text_encoder", ...) -> module names, sorted
    families: tuple[str, ...]  # "sd1", "sd2", "sdxl", "sd3", "flux" it fits; empty when its shapes name none
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

    def check_fit(self, encoder_dims: dict[str, int], model_name: str = "", where: str = "") -> None:
        """Raise `LoraError` unless its weights are made for a model with these text encoder widths
        (`check_loras_fit`), or `ConceptMismatchError` unless the words it carries are (`check_fits`). Its messages
        name the file by its name alone (`where` is not used)."""
        check_loras_fit([(self, 1.0)], encoder_dims, model_name or family_of(encoder_dims)[1])
        for word in self.words:
            word.check_fit(encoder_dims, where=f"{self.path.name}, bundled word {word.token!r}")

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


def _part_config(adapter_metadata: dict[str, object], part: str) -> dict[str, object]:
    """The LoraConfig fields of one part, as `load_lora_adapter(prefix=part)` takes them out of the metadata."""
    return {key.removeprefix(f"{part}."): value for key, value in adapter_metadata.items()
            if key.startswith(f"{part}.")}


def _part_of(key: str) -> str:
    """The part (`PARTS`) a diffusers key belongs to; an unprefixed key is the UNet's (diffusers' older
    attention-processor form), as in `_pairs`."""
    part = key.partition(".")[0]
    return part if part in PARTS else "unet"


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
        missing = sorted(part for part in lora.modules if part not in DENOISER_PARTS and part not in encoder_dims)
        if missing:
            raise LoraError(f"{lora.path.name}: it changes {' and '.join(missing)}, which the model {model_name} "
                            f"does not have; pick a LoRA made for {family}")


def check_lora_layers(lora: LoraFile, denoiser: torch.nn.Module, model_name: str,
                      text_encoders: dict[str, torch.nn.Module] | None = None) -> None:
    """Refuse, before it is loaded, a LoRA whose pairs do not fit the layers they name, in `denoiser` (a UNet or a
    transformer) and in
    `text_encoders` (part -> module, `lora_modules`): a layer the model does not have or that is neither linear nor a
    convolution, a pair of the other kind, or a down matrix whose input width (or kernel) or an up matrix whose output
    width is not the layer's. One line naming the file, the layer and both shapes; what peft would otherwise end in as
    a size-mismatch traceback, half loaded. The keys are read as they are loaded (`peft_parts`, and for a text encoder
    `text_encoder_weights`)."""
    parts = {part: (denoiser, tensors) for part, tensors in peft_parts(lora).items() if part in DENOISER_PARTS}
    for part, encoder in (text_encoders or {}).items():
        if part in lora.modules:
            parts[part] = (encoder, text_encoder_weights(lora, part, encoder))
    for part, (module, weights) in parts.items():
        where = model_name if part in DENOISER_PARTS else f"{model_name}'s {part}"
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
    """The peft adapter name of a LoRA file in the UNet and text encoders: its resolved path's digest and its mtime,
    so a file changed on disk loads as a new adapter (peft names may not hold dots, hence the digest)."""
    return f"{_path_digest(lora.path)}_{lora.mtime_ns}"


def _path_digest(path: Path) -> str:
    return "studio_lora_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]


def _denoiser_part(lora: LoraFile, part: str) -> dict[str, torch.Tensor]:
    """The keys of its state dict for the denoiser `part` ("unet" or "transformer"), all prefixed with it (an older
    unprefixed file is UNet-only)."""
    return {(key if key.startswith(f"{part}.") else f"{part}.{key}"): tensor
            for key, tensor in lora.state_dict.items() if _part_of(key) == part}


def peft_parts(lora: LoraFile) -> dict[str, dict[str, torch.Tensor]]:
    """part -> its keys in peft form (`….lora_A.weight`), unprefixed, converted the way diffusers converts them when
    it loads each part (`load_lora_adapter` for the denoiser, `_load_lora_into_text_encoder` for the text
    encoders)."""
    from diffusers.utils.state_dict_utils import (StateDictType, convert_state_dict_to_diffusers,
                                                  convert_state_dict_to_peft, convert_unet_state_dict_to_peft)

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora.state_dict.items():
        part = _part_of(key)
        parts.setdefault(part, {})[key.removeprefix(f"{part}.")] = tensor.detach().to("cpu").contiguous()
    for part, tensors in parts.items():
        if all(".lora_A." in k or ".lora_B." in k for k in tensors):
            continue
        if part in DENOISER_PARTS:
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
# projections has rank x 199,296 parameters (3.0 MiB at rank 4 in fp32, 5.6 MiB with every linear layer of the text
# encoder too; benchmarks/lora_swap.py prints the sizes measured), so the budget holds about 170 of rank 4, or 5 of
# rank 128 in fp32 (10 in fp16).
DEFAULT_LORA_CACHE_BYTES = 512 * 2**20


def lora_modules(pipe) -> dict[str, torch.nn.Module]:
    """The modules of `pipe` a LoRA's parts change, by part (`PARTS`: the denoiser and the text encoders it has), as
    far as its diffusers pipeline loads LoRAs into them (`_lora_loadable_modules`: not Flux's T5, nor SD3's)."""
    loadable = getattr(pipe, "_lora_loadable_modules", PARTS)
    return {part: module for part in PARTS if part in loadable and (module := getattr(pipe, part, None)) is not None}


@dataclass
class LoraCache:
    """The LoRA adapters loaded in one model's denoiser and text encoders, least recently used first, bounded by their
    tensors' bytes.

    One per loaded model (`LoadedModel.lora_cache`), used under the model's lock only. An adapter is loaded once and
    kept (a swap then costs a few flag changes, not a load), each part of the file into its module under the same
    adapter name; when the adapters pass `budget_bytes`, the least recently used ones that the request at hand does
    not need are deleted from every module before it runs. An adapter the request needs is never evicted, so one
    request whose LoRAs alone pass the budget still runs; the next request evicts them first.

    Between requests every peft layer is off: enabled with no active adapter, so its forward is its base layer's
    alone (peft's layers add only their active adapters; `tests/engine/test_lora_*.py` check the pictures bit for
    bit). `switch_on` makes a request's adapters active on the layers that hold them (`holding`), `switch_off` takes
    them off again: one `set_adapter` each way, where disabling the layers instead would cost an `enable_adapters`
    more (each sets `requires_grad` on every adapter's tensors in the layer).
    """

    budget_bytes: int = DEFAULT_LORA_CACHE_BYTES
    sizes: OrderedDict[str, int] = field(default_factory=OrderedDict)  # adapter name -> bytes, least recent first
    # The peft layers of the UNet and the text encoders, and per adapter the ones that hold it, found once after each
    # load or delete (None: walk again): a walk of every module costs more than a swap may.
    _layers: list | None = None
    _holders: dict[str, list] = field(default_factory=dict)

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

    def holds(self, lora: LoraFile) -> bool:
        """Whether `lora` is loaded as the cache's adapter (its layers checked when it was loaded)."""
        return adapter_name(lora) in self.sizes

    def rescan(self) -> None:
        """Forget the list of peft layers: the next request walks the modules again and turns every layer off.
        For whoever adds or removes adapters outside the cache (the trainer's own LoRA)."""
        self._layers = None

    def layers(self, pipe) -> list:
        """The peft layers (`BaseTunerLayer`) of `pipe`'s UNet and text encoders; after a walk, each turned off (a
        load leaves its adapter active, the trainer's end leaves layers disabled)."""
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._layers = [layer for module in lora_modules(pipe).values() for layer in module.modules()
                            if isinstance(layer, BaseTunerLayer)]
            self._holders = {}
            for layer in self._layers:
                layer.set_adapter([])
                if layer.disable_adapters:
                    layer.enable_adapters(True)
                for name in _adapters_in(layer):
                    self._holders.setdefault(name, []).append(layer)
        return self._layers

    def holding(self, pipe, names) -> list:
        """The peft layers that hold one of the adapters `names` (each once), without a walk of the modules."""
        self.layers(pipe)
        return list(dict.fromkeys(layer for name in names for layer in self._holders.get(name, ())))

    @staticmethod
    def switch_on(layers: list, weights: dict[str, float]) -> None:
        """What `pipe.set_adapters(names, weights)` + `enable_lora()` do (one weight per adapter for the UNet and the
        text encoders alike), on `layers` only (`holding`): those calls walk every module to find them."""
        names = list(weights)
        for layer in layers:
            if layer.disable_adapters:  # turned off by other code (diffusers' `disable_lora`)
                layer.enable_adapters(True)
            layer.set_adapter(names)
            for name, weight in weights.items():
                layer.set_scale(name, weight)

    def switch_off(self, pipe, layers: list) -> None:
        """No adapter active on `layers` (`switch_on`'s): each computes its base layer alone again. Every layer when
        adapters were loaded or deleted since the last walk (a load that failed half-way leaves its adapter on)."""
        if self._layers is None:
            self.layers(pipe)
            return
        for layer in layers:
            layer.set_adapter([])

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
                    if part in DENOISER_PARTS:
                        _load_denoiser_part(pipe, module, lora, part, name)
                    else:
                        _load_text_encoder_part(module, lora, part, name)
        self.sizes[name] = _adapter_bytes(self.layers(pipe), name)
        return name

    def _delete(self, pipe, names: list[str]) -> None:
        from peft.functional import delete_adapter

        self._layers = None
        with warnings.catch_warnings():  # peft: "was active which is now deleted"; none is active between requests
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            for part, module in lora_modules(pipe).items():
                held = [name for name in names if name in (getattr(module, "peft_config", None) or {})]
                if held and part in DENOISER_PARTS:
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


def _load_denoiser_part(pipe, denoiser: torch.nn.Module, lora: LoraFile, part: str, name: str) -> None:
    """The denoiser's part (a UNet's, a transformer's) by diffusers' own loader (`load_lora_adapter`, what
    `load_lora_weights` calls)."""
    # Metadata only when it has the part's config: load_lora_adapter would build a default one from the rest.
    metadata = lora.adapter_metadata if _part_config(lora.adapter_metadata, part) else None
    denoiser.load_lora_adapter(_denoiser_part(lora, part), prefix=part, adapter_name=name, metadata=metadata,
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


def _adapters_in(layer) -> set[str]:
    """The adapters a peft layer holds (the keys of its `lora_A`, `lora_B`, ... per-adapter dicts)."""
    return {name for attribute in layer.adapter_layer_names for name in getattr(layer, attribute)}


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
    """Apply `loras` (file, weight) to `model`'s shared denoiser and text encoders for the `with` block; turn every
    adapter off in `finally`.

    Call it under `model.lock`, around the prompt's encoding and the denoising both: the modules are shared by every
    request, and a LoRA's text-encoder part changes the prompt embeddings. An adapter once loaded stays in its modules
    (`model.lora_cache`, keyed by path and mtime, bounded by memory) but is inactive outside the block, where they
    compute exactly what they computed before any LoRA was loaded (tests/engine/test_lora_runtime.py and
    test_lora_text_encoder.py check the pictures bit for bit). With no LoRA nothing is touched.
    """
    if not loras:
        yield
        return
    # 1. Check: the family, and the pairs of each LoRA not cached against the layers they name (a cached one was
    # checked before it was loaded; the check reads every key, which costs more than a switch).
    check_loras_fit(loras, model.encoder_dims, model.name)
    cache, modules = model.lora_cache, lora_modules(model.pipe)
    text_encoders = {part: module for part, module in modules.items() if part not in DENOISER_PARTS}
    for lora, _weight in loras:
        if not cache.holds(lora):
            check_lora_layers(lora, model.denoiser, model.name, text_encoders)
    # ---- shared state changed from here: the adapters of the denoiser and text encoders (loaded, evicted), which are
    # active ----
    switched: list = []
    try:
        # 2. The adapters, loaded unless cached; the same file named twice adds its weights, one adapter.
        names = cache.use(model.pipe, [lora for lora, _weight in loras])
        weights: dict[str, float] = {}
        for name, (_lora, weight) in zip(names, loras):
            weights[name] = weights.get(name, 0.0) + float(weight)
        # 3. On for the block, on the layers that hold them (benchmarks/lora_swap.py times it against diffusers').
        switched = cache.holding(model.pipe, weights)
        cache.switch_on(switched, weights)
        yield
    finally:
        cache.switch_off(model.pipe, switched)
