"""Cost of switching to an image concept (IP-Adapter) between requests, with the library on disk (issue 26's target:
<= 1 ms at 10,000 library files, like a word).

`PYTHONPATH=. python benchmarks/image_swap.py [--size sd15|tiny] [--library 10000] [--reps 21]`

On SD 1.5's UNet shapes (`lora_swap.build_unet`: 860M parameters left uninitialised, which no swap reads; `--size
tiny`: the tests' UNet) and a plain IP-Adapter in diffusers' layout with random weights (4 image tokens from a
1024-wide CLIP-H embedding, as h94's ip-adapter_sd15), an image concept of 3 pictures saved as `b.safetensors` in a
library folder of N files (swap_speed's one-vector filler words), per request:
- resolve: `ConceptLibrary.resolve` of "a photo of b ..." finding the image concept (swap_speed.resolve_ms);
- patch: what the concept adds to a request beyond a prompt without it: its plan (`plan_request`: the word replaced
  in the prompt and the negative prompt), the adapter's processors, projection and config put on the shared UNet
  and back (`image_prompts_applied` in an ExitStack, as `generate` enters it) and its `ip_adapter_image_embeds`,
  minus the plan of the same prompt without a concept. The adapter is converted once per model and its processors
  slotted once per order of adapters, on their first use, timed apart ("first use"): every later request pays the
  patch only (the kept processors set on the cross-attention layers, their scales, and back). No denoising: the extra attention of the
  image tokens is per step of any request that uses the concept, not a swap.
Prints medians; the last line is `image concept swap ms at N files: resolve R + patch P = T; first use F`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import save_file

from architectures import build_random_pipeline
from lora_swap import build_unet
from studio.engine.learned.image_prompt import ImageConcept
from studio.engine.learned.image_prompt_files import save_image_concept
from studio.engine.learned.ip_adapter import read_adapter
from studio.engine.learned.plan import Use, plan_request
from studio.engine.learned.word import Concept
from studio.engine.models import LoadedModel
from studio.library import ConceptLibrary
from swap_speed import PROMPT, make_library_folder, paired_delta_ms, resolve_ms

IMAGE_EMBED = 1024  # CLIP ViT-H/14's projection width: h94's ip-adapter_sd15 reads it
TOKENS = 4  # a plain IP-Adapter's image tokens


def random_adapter(unet, path: Path, generator: torch.Generator) -> Path:
    """A plain IP-Adapter for `unet` in diffusers' file layout (`image_proj.*`, `ip_adapter.<n>.to_k_ip/to_v_ip`)."""
    cross = unet.config.cross_attention_dim
    tensors = {"image_proj.proj.weight": torch.randn(TOKENS * cross, IMAGE_EMBED, generator=generator) * 0.02,
               "image_proj.proj.bias": torch.zeros(TOKENS * cross), "image_proj.norm.weight": torch.ones(cross),
               "image_proj.norm.bias": torch.zeros(cross)}
    # diffusers numbers the cross-attention layers 1, 3, 5, ... in `unet.attn_processors` order (down, up, mid
    # blocks: registration order), not in forward order (`cross_attention_layers`)
    cross_keys = [key.removesuffix(".processor") for key in unet.attn_processors if key.endswith("attn2.processor")]
    for n, key in enumerate(cross_keys):
        hidden = unet.get_submodule(key).to_k.out_features
        for part in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{2 * n + 1}.{part}.weight"] = torch.randn(hidden, cross, generator=generator) * 0.02
    save_file(tensors, str(path))
    return path


def concept_patch_ms(model: LoadedModel, concept: ImageConcept, reps: int) -> float:
    """The image concept's share of a request (module docstring): `paired_delta_ms` over `reps` pairs."""
    prompt = PROMPT.format("b")

    def with_concept():
        plan = plan_request(prompt, "blurry, b", [Use(concept, 1.0)])
        with ExitStack() as stack:
            plan.enter_patches(model, stack)
            for make in plan.arguments.values():
                make(model, 7.5)

    def plain():
        plan_request(PROMPT.format("a toy"), "blurry", [])

    return paired_delta_ms(with_concept, plain, reps)


def build(size: str, tmp: Path) -> tuple[LoadedModel, Path]:
    """The studio's model around a UNet of `size` (a tiny text encoder and VAE: no swap touches them) and a random
    adapter for it."""
    pipe = build_random_pipeline("sd1", "tiny", tokenizer_dir=tmp / "tok")
    pipe.register_modules(unet=build_unet(size))
    model = LoadedModel(source=f"random-sd1-{size}", family="sd1", device=torch.device("cpu"), dtype=torch.float32,
                        pipe=pipe, attention="sdpa")
    return model, random_adapter(model.denoiser, tmp / "ip-adapter.safetensors", torch.Generator().manual_seed(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--library", type=int, default=10_000, metavar="N", help="files in the library folder")
    parser.add_argument("--reps", type=int, default=21, help="requests timed per measure (median)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="image-swap-"))

    # 1. The model, the adapter, and a library of N files holding the image concept `b`.
    model, adapter = build(args.size, tmp)
    folder = tmp / "library"
    make_library_folder(folder, args.library, Concept("b", {"text_encoder": torch.zeros(1, 768)}, {}))
    embeds = torch.randn(3, IMAGE_EMBED, generator=torch.Generator().manual_seed(1))
    save_image_concept(ImageConcept("b", embeds, torch.zeros_like(embeds), str(adapter), read_adapter(adapter)[1],
                                    dict(model.encoder_dims), "toy"), folder / "b.safetensors")
    library = ConceptLibrary(folder)
    library.entries()  # the first scan, outside the timing (the studio does it at start-up)
    (concept,) = library.resolve(PROMPT.format("b"))
    assert concept.kind == "image", concept

    # 2. First use (the adapter converted for the model), then every later request's costs.
    processors = dict(model.denoiser.attn_processors)
    start = time.perf_counter()
    model.image_adapters.slotted(model.denoiser, [concept])
    first_ms = (time.perf_counter() - start) * 1000
    with torch.no_grad():
        resolve = resolve_ms(library, args.reps, 0.0)
        patch = concept_patch_ms(model, concept, args.reps)
    assert model.denoiser.attn_processors == processors and model.denoiser.encoder_hid_proj is None  # put back
    watching = library.watch_error or "watching"
    library.close()

    # 3. Report.
    unet_m = sum(p.numel() for p in model.denoiser.parameters()) / 1e6
    print(f"{args.size}: UNet {unet_m:.0f}M parameters, {len(processors)} attention processors, CPU, "
          f"{torch.get_num_threads()} thread(s); library {args.library} files ({watching})")
    print(f"medians of {args.reps} requests: resolve {resolve:.3f} ms, patch {patch:.3f} ms; first use "
          f"(adapter converted, processors slotted) {first_ms:.1f} ms")
    print(f"image concept swap ms at {args.library} files: resolve {resolve:.3f} + patch {patch:.3f} = "
          f"{resolve + patch:.3f}; first use {first_ms:.1f}")


if __name__ == "__main__":
    main()
