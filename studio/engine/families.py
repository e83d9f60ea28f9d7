"""Model families as data: what each architecture the studio runs is made of, in one record per family.

A `ModelFamily` says where a pipeline keeps its denoiser and text encoders, how wide those are, which diffusers
pipeline classes draw text-to-image, image-to-image and inpainting over the same modules, where its cross-attention
layers are, its native size, the prefixes of its LoRA keys in kohya's form, and what to load for it. The engine, the
trainer and the library ask the record (`family_of_pipe(pipe).denoiser_of(pipe)`, `FAMILIES[...]`) instead of naming
`pipe.unet` or comparing family strings, so a new family (SD3's transformer and T5, Flux) is a new record here.

The same width table names a concept file's likely family and a loaded model's (`family_of`), so a file and a
model are never told apart by two different rules.

    family = family_of_pipe(pipe)          # SD 1.x / 2.x / SDXL, by the pipeline's text encoders
    unet = family.denoiser_of(pipe)
    img2img = family.pipeline_class("img2img")
"""

from __future__ import annotations

from dataclasses import dataclass, field

ENCODER_KEYS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # diffusers pipeline attribute names, in order
UNKNOWN = ("unknown", "an unknown model")
# SDXL files name their encoders after the CLIP models (A1111, kohya).
SDXL_ENCODER_NAMES = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


@dataclass(frozen=True)
class ModelFamily:
    """One architecture. `id` is what files and logs say ("sd1"); `title` what messages say ("SD 1.x")."""

    id: str
    title: str
    encoder_widths: tuple[int, ...]  # input token embedding width of each text encoder, in ENCODER_KEYS order
    how_to_load: str  # the end of "to use it, ...": what loads a model of this family
    denoiser: str = "unet"  # the pipeline attribute of the denoising network
    # diffusers pipeline class names per mode; all share one set of modules (`studio.engine.models.pipeline_over`)
    pipelines: dict[str, str] = field(default_factory=lambda: {
        "txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
        "inpaint": "StableDiffusionInpaintPipeline"})
    cross_attention: str = "attn2"  # the name of the denoiser's cross-attention modules (to the prompt)
    native_size: int = 512  # pixels; a loaded model's own config may say otherwise (SD 2.x at 768)
    kohya_prefixes: tuple[str, ...] = ("lora_unet_", "lora_te_")  # kohya's LoRA key prefixes: denoiser, encoders
    # Linear latent -> RGB of the VAE the family's checkpoints ship with (rows: latent channels; columns R, G, B) and
    # a bias, as fitted by the ComfyUI / A1111 "latent preview" code; None: previews are decoded by the VAE.
    latent_rgb: tuple[tuple[tuple[float, ...], ...], tuple[float, ...]] | None = None
    # The denoiser's class name where it alone tells the family (SD3's and Flux's transformers); None: told by the
    # text encoders' widths (`family_of_pipe`).
    denoiser_class: str | None = None
    # What its word files call its encoders, in `encoder_keys` order (A1111, kohya, diffusers' advanced scripts).
    file_names: tuple[str, ...] = ()
    # "noise": DDPM noise (epsilon or v) prediction, any of the studio's schedulers; "flow": rectified flow
    # (SD3, Flux), drawn with the model's own flow-matching scheduler and trained on flow-matching targets.
    objective: str = "noise"
    # Encoders whose word vectors a word file may leave out (diffusers' advanced Flux script writes T5 vectors only
    # with --enable_t5_ti): the word is then plain text to that encoder, as it is in diffusers' pipeline.
    optional_words: tuple[str, ...] = ()
    t5_tokens: int = 0  # the T5 prompt length its pipelines pad to (diffusers' max_sequence_length default)
    # Encoders a pipeline of the family may be loaded without, as diffusers allows: StableDiffusion3Pipeline with
    # `text_encoder_3=None` draws with zero T5 embeddings (`_get_t5_prompt_embeds`: t5_tokens x the transformer's
    # joint_attention_dim); FluxPipeline has no such branch, so Flux needs its T5.
    droppable_encoders: tuple[str, ...] = ()
    # How its encoders' outputs make the pipeline's prompt arguments (`studio.engine.prompts.JOINS`): "features"
    # (SD 1.x/2.x/SDXL: widths side by side, pooled from the last encoder), "sd3" (both CLIPs side by side, padded
    # to T5's width, then T5's tokens after them; both CLIPs pooled), "flux" (T5's tokens; CLIP-L pooled).
    prompt_join: str = "features"
    clip_hidden: str = "last"  # the CLIP layer its pipelines take: "last" (normed) or "penultimate" (SDXL, SD3)
    guidance: str = "cfg"  # "cfg": classifier-free guidance with a negative prompt; "distilled": Flux's guidance input
    # A request's guidance when it sets none: diffusers' pipelines' defaults (StableDiffusionPipeline 7.5,
    # StableDiffusion3Pipeline 7.0, FluxPipeline 3.5: FLUX.1-dev's distilled guidance); SDXL keeps SD's 7.5, as A1111.
    default_guidance: float = 7.5
    # What a trained LoRA changes in the denoiser (peft `target_modules`): every attention projection (diffusers'
    # train_dreambooth_lora scripts: to_q/to_k/to_v/to_out.0; for SD3/Flux the transformer's `attn.`, which in Flux
    # are also the single-stream blocks' q/k/v), and the "lite" preset's keys and values that the prompt's tokens
    # make (a UNet's cross-attention; the text stream's add_k_proj/add_v_proj in an MMDiT's joint attention).
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    lora_prompt_kv: str = r".*attn2\.(to_k|to_v)$"

    @property
    def encoder_keys(self) -> tuple[str, ...]:
        """The pipeline attributes of its text encoders: ("text_encoder",) or both."""
        return ENCODER_KEYS[: len(self.encoder_widths)]

    def denoiser_of(self, pipe):
        """The pipeline's denoising network (its UNet for SD 1.x/2.x/SDXL)."""
        return getattr(pipe, self.denoiser)

    def pipeline_class(self, mode: str):
        """The diffusers pipeline class that draws `mode` ("txt2img", "img2img", "inpaint") for this family."""
        import diffusers

        return getattr(diffusers, self.pipelines[mode])


_SD_LATENT_RGB = (((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
                   (-0.2120, -0.2616, -0.7177)), (0.0, 0.0, 0.0))
_SDXL_PIPELINES = {"txt2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
                   "inpaint": "StableDiffusionXLInpaintPipeline"}

SD1 = ModelFamily(
    "sd1", "SD 1.x", (768,), latent_rgb=_SD_LATENT_RGB,
    how_to_load="load an SD 1.x model in the Model tab (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5, a folder "
                "or a .safetensors file; CLI: --model)")
SD2 = ModelFamily(
    "sd2", "SD 2.x", (1024,), latent_rgb=_SD_LATENT_RGB, native_size=768,  # SD 2.x shares SD 1.x's VAE
    how_to_load="load an SD 2.x model in the Model tab (e.g. stabilityai/stable-diffusion-2-1; CLI: --model)")
SDXL = ModelFamily(
    "sdxl", "SDXL", (768, 1280), pipelines=_SDXL_PIPELINES, native_size=1024,
    kohya_prefixes=("lora_unet_", "lora_te1_", "lora_te2_"), clip_hidden="penultimate",
    latent_rgb=(((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
                 (-0.3165, -0.2492, -0.2188)), (0.1084, -0.0175, -0.0011)),
    how_to_load="load an SDXL model in the Model tab (e.g. stabilityai/stable-diffusion-xl-base-1.0; CLI: --model)")
# Rectified-flow transformers with a T5 encoder: pipelines, kohya prefixes and prompt lengths as in diffusers 0.42.
_MMDIT_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
_MMDIT_PROMPT_KV = r".*attn\.add_(k|v)_proj$"
SD3 = ModelFamily(
    "sd3", "SD3", (768, 1280, 4096), denoiser="transformer", denoiser_class="SD3Transformer2DModel",
    pipelines={"txt2img": "StableDiffusion3Pipeline", "img2img": "StableDiffusion3Img2ImgPipeline",
               "inpaint": "StableDiffusion3InpaintPipeline"},
    cross_attention="attn", native_size=1024, objective="flow", file_names=("clip_l", "clip_g", "t5"),
    optional_words=("text_encoder_3",), t5_tokens=256, prompt_join="sd3", clip_hidden="penultimate",
    droppable_encoders=("text_encoder_3",),
    default_guidance=7.0,
    lora_targets=_MMDIT_LORA_TARGETS, lora_prompt_kv=_MMDIT_PROMPT_KV,
    kohya_prefixes=("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_"),
    how_to_load="load an SD3 model in the Model tab (e.g. stabilityai/stable-diffusion-3.5-medium, a diffusers "
                "folder, or a .safetensors file with a diffusers SD3 folder as its config; CLI: --model)")
FLUX = ModelFamily(
    "flux", "Flux.1", (768, 4096), denoiser="transformer", denoiser_class="FluxTransformer2DModel",
    pipelines={"txt2img": "FluxPipeline", "img2img": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline"},
    cross_attention="attn", native_size=1024, objective="flow", file_names=("clip_l", "t5"),
    optional_words=("text_encoder_2",), t5_tokens=512, kohya_prefixes=("lora_unet_", "lora_te1_"),
    prompt_join="flux", guidance="distilled", default_guidance=3.5, lora_targets=_MMDIT_LORA_TARGETS,
    lora_prompt_kv=_MMDIT_PROMPT_KV,
    how_to_load="load a Flux.1 model in the Model tab (e.g. black-forest-labs/FLUX.1-dev or a diffusers folder; "
                "CLI: --model)")
# assets/demo-model: SD 1.x's architecture with a 128-wide encoder and a VAE of its own (no fitted latent colours).
DEMO = ModelFamily(
    "demo", "the built-in demo model", (128,), native_size=64,
    how_to_load="load the built-in demo model (Model tab: leave the box empty and press Load; CLI: no --model)")

FAMILIES: dict[str, ModelFamily] = {f.id: f for f in (SD1, SD2, SDXL, SD3, FLUX, DEMO)}
_BY_WIDTHS = {f.encoder_widths: f for f in FAMILIES.values()}


def family_of(encoder_dims: dict[str, int]) -> tuple[str, str]:
    """(family id, title) for a set of encoder widths (a concept's or a model's); ("unknown", "an unknown model")
    when unfamiliar."""
    found = _BY_WIDTHS.get(tuple(encoder_dims[k] for k in ENCODER_KEYS if k in encoder_dims))
    return (found.id, found.title) if found else UNKNOWN


def tokenizer_key(encoder_key: str) -> str:
    """The pipeline attribute of an encoder's tokenizer, by diffusers' naming: text_encoder_2 -> tokenizer_2."""
    return "tokenizer" + encoder_key.removeprefix("text_encoder")


def encoders_of(pipe) -> list[tuple[str, object, object]]:
    """(key, tokenizer, text encoder) for each text encoder of `pipe`, in `ENCODER_KEYS` order: one for SD 1.x/2.x,
    two for SDXL. The keys are those of a concept's vectors. A second encoder counts only after a first one."""
    found = []
    for key in ENCODER_KEYS:
        encoder = getattr(pipe, key, None)
        if encoder is None:
            break
        found.append((key, getattr(pipe, tokenizer_key(key)), encoder))
    return found


def encoder_width(text_encoder) -> int:
    """The width of a text encoder's input token embeddings: what a concept's vectors for it must have."""
    return int(text_encoder.get_input_embeddings().embedding_dim)


def encoder_dims(pipe) -> dict[str, int]:
    """Encoder key -> input embedding width, e.g. `{"text_encoder": 768}`; what `check_fits` compares concepts with.
    An encoder the pipeline was loaded without (`dropped_encoders`: SD3's T5) keeps its place, so the model is still
    told as its family by widths, and a word's vectors for it fit (and go unused, as in diffusers' pipeline)."""
    return {**_present_dims(pipe), **dropped_encoders(pipe)}


def _present_dims(pipe) -> dict[str, int]:
    return {key: encoder_width(encoder) for key, _, encoder in encoders_of(pipe)}


def dropped_encoders(pipe) -> dict[str, int]:
    """The encoders `pipe` was loaded without that its family may drop (`ModelFamily.droppable_encoders`: SD3's
    T5), each with the width of the zero embeddings that stand for it (the denoiser's `joint_attention_dim`, as in
    diffusers' StableDiffusion3Pipeline)."""
    family = family_of_pipe(pipe)
    present = {key for key, _, _ in encoders_of(pipe)}
    return {key: int(family.denoiser_of(pipe).config.joint_attention_dim)
            for key in family.droppable_encoders if key not in present}


def family_of_pipe(pipe) -> ModelFamily:
    """The architecture of `pipe`: a family its denoiser's class names (SD3, Flux), else SDXL with two text
    encoders, SD 2.x with SD 2.x's encoder width, else SD 1.x (SD 1.x's architecture, whatever its width: the demo
    model's 128-wide encoder is one)."""
    for family in FAMILIES.values():
        if family.denoiser_class and type(getattr(pipe, family.denoiser, None)).__name__ == family.denoiser_class:
            return family
    dims = _present_dims(pipe)
    if len(dims) == 2:
        return SDXL
    return SD2 if family_of(dims)[0] == "sd2" else SD1


def detect_family(pipe) -> str:
    """`family_of_pipe(pipe).id`: "sd1", "sd2", "sdxl", "sd3" or "flux"."""
    return family_of_pipe(pipe).id


def family_of_index(index: dict) -> ModelFamily | None:
    """The family a diffusers `model_index.json` names by its denoiser's class (SD3, Flux), before anything loads;
    None for a UNet (SD 1.x/2.x/SDXL are told apart by their encoders' widths, once loaded)."""
    for family in FAMILIES.values():
        entry = index.get(family.denoiser)
        if family.denoiser_class and isinstance(entry, list) and entry[-1:] == [family.denoiser_class]:
            return family
    return None


def t5_keys(family: ModelFamily) -> tuple[str, ...]:
    """The pipeline attributes of the family's T5 encoders (its word files' "t5"): ("text_encoder_2",) for Flux."""
    return tuple(key for key, name in zip(family.encoder_keys, family.file_names) if name == "t5")


def family_of_file_names(names) -> ModelFamily | None:
    """The family whose word files hold exactly these encoder names (`{"clip_l", "t5"}`: Flux), or None."""
    return next((f for f in FAMILIES.values() if f.file_names and set(f.file_names) == set(names)), None)
