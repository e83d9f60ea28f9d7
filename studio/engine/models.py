"""ModelManager: load a Stable Diffusion base model once and hand out pipelines that share its modules.

Sources: a local diffusers folder, a single `.safetensors`/`.ckpt` file (`from_single_file`, with the component
configs of `LoadOptions.config`; see `studio.engine.single_file`), or a hub id (`from_pretrained`).
`load(None)` loads the embedded demo model in `assets/demo-model/`.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.engine.families import (FAMILIES, ModelFamily, detect_family, encoder_dims, encoders_of, family_of_index,
                                    family_of_pipe, t5_keys, tokenizer_key)
from studio.engine.learned.ip_adapter import ImageAdapterCache
from studio.engine.learned.lora import LoraCache
from studio.engine.prompts import PromptEncoder
from studio.errors import ModelError

DEMO_MODEL_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo-model"
# The studio runs no safety checker: the demo model has none, and on SD 1.x/2.x it is a 1.2 GB classifier that would
# black out pictures. Saying both at load keeps diffusers from printing its paragraph-long warning for each pipeline.
NO_SAFETY_CHECKER = {"safety_checker": None, "requires_safety_checker": False}


@dataclass(frozen=True)
class LoadOptions:
    device: str | None = None  # None: cuda > mps > cpu
    dtype: str | None = None  # "fp32" | "fp16" | "bf16"; None: fp32 on CPU, else fp16 (SD3/Flux on CUDA: bf16)
    # "none" | "8bit" | "4bit": SD3's and Flux's transformer and T5 quantized by bitsandbytes as they load (diffusers'
    # PipelineQuantizationConfig; CUDA only)
    quantize: str = "none"
    attention: str = "auto"  # "auto" (xformers on CUDA when installed, else SDPA) | "sdpa" | "xformers"
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    offload: str = "none"  # "none" | "model" | "sequential"
    # Single-file checkpoints only: a diffusers model folder (or hub id) of the same architecture whose component
    # configs (only its .json/tokenizer files) describe the checkpoint. None: diffusers' default repo for the
    # family, which must be in the Hugging Face cache when HF_HUB_OFFLINE is set.
    config: str | None = None


def pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = ("fp32", "fp16", "bf16")  # what --dtype offers (DTYPES also takes torch's names)
QUANTIZE = ("none", "8bit", "4bit")  # base weights as loaded: as stored, or bitsandbytes' int8 / NF4


def pick_dtype(requested: str | None, device: torch.device, family: ModelFamily | None = None,
               bf16_supported: bool | None = None) -> torch.dtype:
    """The dtype of the base weights: `requested`, else fp32 on the CPU, bf16 for SD3/Flux on a CUDA GPU that has it
    (diffusers' documentation loads both with torch.bfloat16: Flux was trained in bf16; `bf16_supported` None: ask
    torch), else fp16."""
    if requested:
        if requested not in DTYPES:
            raise ModelError(f"dtype must be one of {', '.join(DTYPES)}, not {requested!r}")
        return DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    if family is not None and family.objective == "flow" and device.type == "cuda":
        if torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported:
            return torch.bfloat16
    return torch.float16


def check_quantize(quantize: str, device: torch.device) -> None:
    """Refuse, before anything loads, 8-bit/4-bit weights where bitsandbytes cannot run them: on a device that is
    not CUDA (diffusers' bitsandbytes quantizer also takes XPU/MPS, which the studio does not test), or without the
    package."""
    if quantize not in QUANTIZE:
        raise ModelError(f"quantize must be one of {', '.join(QUANTIZE)}, not {quantize!r}")
    if quantize == "none":
        return
    if device.type != "cuda":
        raise ModelError(f"--quantize {quantize} needs a CUDA GPU (bitsandbytes), and this model loads on "
                         f"{device.type}; leave --quantize out (on a GPU, --dtype bf16 halves the weights too)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"--quantize {quantize} needs bitsandbytes: pip install -e '.[quantize]' "
                         "(or pip install bitsandbytes), or leave --quantize out")


def quantization_config(quantize: str, family: ModelFamily | None, compute_dtype: torch.dtype):
    """diffusers' `PipelineQuantizationConfig` that loads `family`'s denoiser and T5 encoders in 8 or 4 bits
    (bitsandbytes; 4-bit as NF4 computing in `compute_dtype`, as diffusers' Flux quantization docs do); None for
    "none". The CLIP encoders, the VAE and the input embeddings stay as they are (the words are vectors there).
    Offered for SD3 and Flux, whose transformer and T5 are most of their weights; SD 1.x/2.x/SDXL are refused."""
    if quantize == "none":
        return None
    if family is None or family.objective != "flow":
        what = family.title if family else "this model"
        raise ModelError(f"--quantize {quantize} is offered for SD3 and Flux (their transformer and T5); "
                         f"{what} is not one: leave --quantize out and use --dtype fp16")
    from diffusers import PipelineQuantizationConfig

    kwargs = ({"load_in_8bit": True} if quantize == "8bit" else
              {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": compute_dtype})
    return PipelineQuantizationConfig(quant_backend=f"bitsandbytes_{quantize}", quant_kwargs=kwargs,
                                      components_to_quantize=[family.denoiser, *t5_keys(family)])


@dataclass
class LoadedModel:
    """A loaded base model. `pipe` is txt2img; `img2img()` and `inpaint()` share its modules."""

    source: str
    family: str
    device: torch.device
    dtype: torch.dtype
    pipe: object
    attention: str
    is_demo: bool = False
    quantize: str = "none"  # LoadOptions.quantize: "8bit"/"4bit" when the denoiser and T5 hold bitsandbytes weights
    lock: threading.RLock = field(default_factory=threading.RLock)
    lora_cache: LoraCache = field(default_factory=LoraCache)  # LoRA adapters in the denoiser and text encoders (learned.lora)
    image_adapters: ImageAdapterCache = field(default_factory=ImageAdapterCache)  # IP-Adapters (learned.ip_adapter)
    _views: dict = field(default_factory=dict)
    _encoder: PromptEncoder | None = None

    @property
    def name(self) -> str:
        return "demo" if self.is_demo else Path(self.source).name or self.source

    @property
    def encoder(self) -> PromptEncoder:
        if self._encoder is None:
            self._encoder = PromptEncoder.from_pipeline(self.pipe)
        return self._encoder

    @property
    def encoder_dims(self) -> dict[str, int]:
        """Encoder key -> width (`studio.engine.families.encoder_dims`): what a concept's vectors must match."""
        return encoder_dims(self.pipe)

    @property
    def spec(self) -> ModelFamily:
        """The record of this model's architecture (`studio.engine.families`): its denoiser, encoders, pipelines."""
        return FAMILIES[self.family]

    @property
    def denoiser(self):
        """The shared denoising network (the UNet of SD 1.x/2.x/SDXL)."""
        return self.spec.denoiser_of(self.pipe)

    def _view(self, kind: str):
        if kind not in self._views:
            self._views[kind] = pipeline_over(self.pipe, self.spec.pipeline_class(kind))
        return self._views[kind]

    def img2img(self):
        return self._view("img2img")

    def inpaint(self):
        return self._view("inpaint")


def pipeline_over(pipe, cls=None, **replace):
    """A pipeline of class `cls` (default: `pipe`'s own) over `pipe`'s modules, with the modules in `replace` swapped
    in. No weight is copied or cast (diffusers' `from_pipe` casts every module to float32 unless given a dtype), and
    the constructor flags that `pipe.components` leaves out (`requires_safety_checker`,
    `force_zeros_for_empty_prompt`) come from `pipe.config`, so the new pipeline behaves as `pipe` does."""
    cls = cls or type(pipe)
    takes = inspect.signature(cls.__init__).parameters
    modules = {name: module for name, module in pipe.components.items() if name in takes}
    flags = {name: value for name, value in pipe.config.items()
             if name in takes and name not in modules and not name.startswith("_")}
    return cls(**{**modules, **flags, **replace})


def _from_pretrained(src: str, opts: LoadOptions, device: torch.device):
    """A diffusers folder or hub id in the dtype (and quantization) `opts` give for its family, without its safety
    checker (`NO_SAFETY_CHECKER`) where the pipeline has one; (pipeline, dtype)."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import hf_hub_download

    index_file = Path(src) / "model_index.json"  # the pipeline's components
    if not index_file.is_file():
        index_file = Path(hf_hub_download(src, "model_index.json"))
    index = json.loads(index_file.read_text())
    family = family_of_index(index)
    dtype = pick_dtype(opts.dtype, device, family)
    extra = NO_SAFETY_CHECKER if "safety_checker" in index else {}
    quantization = quantization_config(opts.quantize, family, dtype)
    if quantization is not None:
        extra["quantization_config"] = quantization
    # An encoder the family may drop, written null (what save_pretrained writes for an SD3 loaded without T5), is
    # passed as None with its tokenizer: diffusers' from_pretrained refuses such a folder without them.
    for key in family.droppable_encoders if family else ():
        if index.get(key) == [None, None]:
            extra.update({key: None, tokenizer_key(key): None})
    return DiffusionPipeline.from_pretrained(src, dtype=dtype, **extra), dtype


def whole_sentences(text: str, limit: int = 300) -> str:
    """`text` on one line, cut after the last sentence that ends within `limit` characters (its first sentence
    whole when that one is longer): library messages run to paragraphs, and a message cut mid-word reads as broken."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    ends = [match.end() for match in re.finditer(r"[.!?](?=\s)", text)]
    within = [end for end in ends if end <= limit]
    return text[:within[-1]] if within else text[:ends[0]] if ends else text


def _hub_unreachable(exc: BaseException) -> bool:
    """True when `exc` came from a file that is not in the Hugging Face cache while the hub could not be reached
    (HF_HUB_OFFLINE, or no network): diffusers falls back to the cache, so the model is not (fully) cached."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (LocalEntryNotFoundError, ConnectionError, socket.gaierror)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _load_failure(src: str, exc: Exception) -> str:
    """One whole message for a model that did not load: what to do for a hub id that could not be fetched, else the
    library's own words, cut at a sentence end."""
    from studio.engine.single_file import hub_offline

    if not Path(src).exists() and _hub_unreachable(exc):
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "the hub cannot be reached"
        return (f"could not load {src!r}: it is not in the local Hugging Face cache and {why}. Download it once with "
                f"the network on (`hf download {src}`), or pass a local diffusers folder or .safetensors/.ckpt file")
    return f"could not load {src!r}: {exc.__class__.__name__}: {whole_sentences(str(exc))}"


class ModelManager:
    """Loads base models once and keeps the `cache_size` most recently used ones."""

    def __init__(self, options: LoadOptions | None = None, cache_size: int = 1):
        self.options = options or LoadOptions()
        self.cache_size = max(1, cache_size)
        self._cache: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self.current: LoadedModel | None = None

    def load(self, source: str | os.PathLike | None = None, options: LoadOptions | None = None) -> LoadedModel:
        """Load `source` (None: the demo model), or return it from the cache."""
        opts = options or self.options
        src = str(source) if source else str(DEMO_MODEL_DIR)
        key = (src, opts)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.current = self._cache[key]
                return self.current
            model = self._load(src, opts, is_demo=source is None or Path(src).resolve() == DEMO_MODEL_DIR.resolve())
            self._cache[key] = model
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            self.current = model
            return model

    def _load(self, src: str, opts: LoadOptions, is_demo: bool) -> LoadedModel:
        device = pick_device(opts.device)
        check_quantize(opts.quantize, device)
        path = Path(src)
        try:
            if is_demo and not (path / "model_index.json").is_file():
                raise ModelError(f"the built-in demo model is missing from {path}; build it with "
                                 "`python -m studio.demo.build` or pass --model (hub id, folder or .safetensors file)")
            if path.is_file():
                if opts.quantize != "none":
                    raise ModelError(f"--quantize {opts.quantize} loads diffusers folders and hub ids; {path.name} "
                                     "is a single file: convert it to a folder first, or leave --quantize out")
                pipe, dtype = self._load_single_file(path, opts, device)
            elif path.is_dir():
                if not (path / "model_index.json").is_file():
                    raise ModelError(f"{path} is not a diffusers model folder (no model_index.json)")
                pipe, dtype = _from_pretrained(src, opts, device)
            elif src.count("/") == 1 and not src.startswith((".", "/")):
                pipe, dtype = _from_pretrained(src, opts, device)
            else:
                raise ModelError(f"no model at {src!r}: give a diffusers folder, a .safetensors/.ckpt file or a hub id")
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - library errors become one readable message
            raise ModelError(_load_failure(src, exc)) from exc
        if not encoders_of(pipe) or getattr(pipe, family_of_pipe(pipe).denoiser, None) is None:
            raise ModelError(f"{src!r} is not a Stable Diffusion model (no text encoder / UNet)")
        pipe.set_progress_bar_config(disable=True)
        attention = self._apply_options(pipe, opts, device)
        return LoadedModel(src, detect_family(pipe), device, dtype, pipe, attention, is_demo, quantize=opts.quantize)

    @staticmethod
    def _load_single_file(path: Path, opts: LoadOptions, device: torch.device):
        """An original-layout checkpoint: identify its family from its keys, then build it from local configs (and,
        for an SD3 file without its encoders or VAE, those parts from the config folder's weights), in the dtype
        `opts` give for its family; (pipeline, dtype)."""
        from studio.engine.single_file import (UnsafeCheckpointError, check_weights_set, hub_offline,
                                              identify_checkpoint, parts_from_config, read_checkpoint_shapes,
                                              resolve_config)

        # 1. Check the file: a known suffix, tensors only (pickles: weights_only), a txt2img model the studio loads.
        #    .pt/.pth/.bin are read too, so that a concept embedding passed as a model is named as one.
        wrong_suffix = (f"{path.name}: a single-file model must be .safetensors or .ckpt, "
                        f"not {path.suffix or 'no suffix'}")
        if path.suffix not in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
            raise ModelError(wrong_suffix)
        try:
            shapes = read_checkpoint_shapes(path)
            info = identify_checkpoint(shapes)
        except UnsafeCheckpointError:
            raise
        except ModelError as exc:
            if path.suffix in (".safetensors", ".ckpt"):
                raise
            raise ModelError(wrong_suffix) from exc
        if info.family is None:
            raise ModelError(f"{path.name} is {info.description}")
        # 2. Find the component configs (a local folder, or the hub cache) before diffusers tries the network.
        config = resolve_config(info, opts.config, path.name)
        # 3. Build the pipeline class of that family; diffusers opens .ckpt files with weights_only=True too.
        family = FAMILIES[info.family]
        dtype = pick_dtype(opts.dtype, device, family)
        cls = family.pipeline_class("txt2img")
        extra = NO_SAFETY_CHECKER if "safety_checker" in inspect.signature(cls.__init__).parameters else {}
        try:
            if info.family == "sd3":
                extra.update(parts_from_config(shapes, config, path.name, dtype))
            pipe = cls.from_single_file(str(path), config=config, torch_dtype=dtype,
                                        local_files_only=hub_offline() or Path(config).is_dir(), **extra)
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - library errors become one readable message
            # diffusers' shape-mismatch advice (ignore_mismatched_sizes) would load random weights: leave it out.
            detail = whole_sentences(str(exc).split(" If you want to instead overwrite")[0]).rstrip(".")
            raise ModelError(
                f"could not build {path.name} ({info.description}) with the configs of {config}: "
                f"{exc.__class__.__name__}: {detail}. The config must be a diffusers model of the same "
                "architecture (layer sizes) as the checkpoint") from exc
        check_weights_set(pipe, path.name)
        return pipe, dtype

    @staticmethod
    def _apply_options(pipe, opts: LoadOptions, device: torch.device) -> str:
        attention = "sdpa"  # diffusers' default processor (AttnProcessor2_0) uses torch SDPA
        want_xformers = opts.attention == "xformers" or (opts.attention == "auto" and device.type == "cuda")
        if want_xformers:
            try:
                import xformers  # noqa: F401
                pipe.enable_xformers_memory_efficient_attention()
                attention = "xformers"
            except ImportError:
                if opts.attention == "xformers":
                    raise ModelError("attention='xformers' but xformers is not installed: pip install -e '.[xformers]'")
        if opts.attention_slicing:
            pipe.enable_attention_slicing()
        if opts.vae_slicing:
            pipe.vae.enable_slicing()
        if opts.vae_tiling:
            pipe.vae.enable_tiling()
        if opts.offload == "model" and device.type == "cuda":
            pipe.enable_model_cpu_offload()
        elif opts.offload == "sequential" and device.type == "cuda":
            pipe.enable_sequential_cpu_offload()
        else:
            pipe.to(device)
        return attention


