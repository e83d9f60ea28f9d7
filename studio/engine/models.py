"""ModelManager: load a Stable Diffusion base model once and hand out pipelines that share its modules.

Sources: a local diffusers folder, a single `.safetensors`/`.ckpt` file (`from_single_file`, with the component
configs of `LoadOptions.config`; see `studio.engine.single_file`), or a hub id (`from_pretrained`).
`load(None)` loads the embedded demo model in `assets/demo-model/`.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.engine.lora import LoraCache
from studio.engine.model_facts import detect_family, encoder_dims, encoders_of
from studio.engine.prompts import PromptEncoder
from studio.errors import ModelError

DEMO_MODEL_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo-model"


@dataclass(frozen=True)
class LoadOptions:
    device: str | None = None  # None: cuda > mps > cpu
    dtype: str | None = None  # None: fp16 on GPU, fp32 on CPU
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


def pick_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if requested:
        if requested not in names:
            raise ModelError(f"dtype must be one of {', '.join(names)}, not {requested!r}")
        return names[requested]
    return torch.float32 if device.type == "cpu" else torch.float16


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
    lock: threading.RLock = field(default_factory=threading.RLock)
    lora_cache: LoraCache = field(default_factory=LoraCache)  # the LoRA adapters in `pipe.unet` (studio.engine.lora)
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
        """Encoder key -> width (`studio.engine.model_facts.encoder_dims`): what a concept's vectors must match."""
        return encoder_dims(self.pipe)

    def _view(self, kind: str):
        if kind not in self._views:
            from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                                   StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline)
            classes = {("sd", "img2img"): StableDiffusionImg2ImgPipeline, ("sd", "inpaint"): StableDiffusionInpaintPipeline,
                       ("sdxl", "img2img"): StableDiffusionXLImg2ImgPipeline,
                       ("sdxl", "inpaint"): StableDiffusionXLInpaintPipeline}
            cls = classes[("sdxl" if self.family == "sdxl" else "sd", kind)]
            # Built from the same component objects: no parameter is copied.
            self._views[kind] = cls.from_pipe(self.pipe)
        return self._views[kind]

    def img2img(self):
        return self._view("img2img")

    def inpaint(self):
        return self._view("inpaint")


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
        from diffusers import DiffusionPipeline

        device = pick_device(opts.device)
        dtype = pick_dtype(opts.dtype, device)
        path = Path(src)
        try:
            if is_demo and not (path / "model_index.json").is_file():
                raise ModelError(f"the built-in demo model is missing from {path}; build it with "
                                 "`python -m studio.demo.build` or pass --model (hub id, folder or .safetensors file)")
            if path.is_file():
                pipe = self._load_single_file(path, opts, dtype)
            elif path.is_dir():
                if not (path / "model_index.json").is_file():
                    raise ModelError(f"{path} is not a diffusers model folder (no model_index.json)")
                pipe = DiffusionPipeline.from_pretrained(src, torch_dtype=dtype)
            elif src.count("/") == 1 and not src.startswith((".", "/")):
                pipe = DiffusionPipeline.from_pretrained(src, torch_dtype=dtype)
            else:
                raise ModelError(f"no model at {src!r}: give a diffusers folder, a .safetensors/.ckpt file or a hub id")
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - library errors become one readable message
            hint = " (HF_HUB_OFFLINE is set: pass a local folder or file instead)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise ModelError(f"could not load {src!r}: {exc.__class__.__name__}: {str(exc)[:300]}{hint}") from exc
        if not encoders_of(pipe) or not hasattr(pipe, "unet"):
            raise ModelError(f"{src!r} is not a Stable Diffusion model (no text encoder / UNet)")
        if hasattr(pipe, "safety_checker"):
            pipe.safety_checker = None
        pipe.set_progress_bar_config(disable=True)
        attention = self._apply_options(pipe, opts, device)
        return LoadedModel(src, detect_family(pipe), device, dtype, pipe, attention, is_demo)

    @staticmethod
    def _load_single_file(path: Path, opts: LoadOptions, dtype: torch.dtype):
        """An original-layout checkpoint: identify its family from its keys, then build it from local configs."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        from studio.engine.single_file import (UnsafeCheckpointError, hub_offline, identify_checkpoint,
                                              read_checkpoint_shapes, resolve_config)

        # 1. Check the file: a known suffix, tensors only (pickles: weights_only), a complete SD txt2img model.
        #    .pt/.pth/.bin are read too, so that a concept embedding passed as a model is named as one.
        wrong_suffix = (f"{path.name}: a single-file model must be .safetensors or .ckpt, "
                        f"not {path.suffix or 'no suffix'}")
        if path.suffix not in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
            raise ModelError(wrong_suffix)
        try:
            info = identify_checkpoint(read_checkpoint_shapes(path))
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
        cls = StableDiffusionXLPipeline if info.family == "sdxl" else StableDiffusionPipeline
        try:
            return cls.from_single_file(str(path), config=config, torch_dtype=dtype,
                                        local_files_only=hub_offline() or Path(config).is_dir())
        except Exception as exc:  # noqa: BLE001 - library errors become one readable message
            # diffusers' shape-mismatch advice (ignore_mismatched_sizes) would load random weights: leave it out.
            detail = str(exc).split(" If you want to instead overwrite")[0][:300]
            raise ModelError(
                f"could not build {path.name} ({info.description}) with the configs of {config}: "
                f"{exc.__class__.__name__}: {detail}. The config must be a diffusers model of the same "
                "architecture (layer sizes) as the checkpoint") from exc

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


