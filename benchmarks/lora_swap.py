"""Cost of switching between two LoRA concepts between requests: the studio's adapter cache vs diffusers.

`python benchmarks/lora_swap.py [--size sd15|tiny] [--switches 21]`

On SD 1.5's shapes (`architectures._unet("sd1", "full")`: 860M parameters, and CLIP ViT-L's text encoder, 12 layers
of 768, 123M; `--size tiny`: the tests' UNet and one-layer text encoder), two pairs of rank-4 LoRAs, each made with
peft and saved by diffusers' `save_lora_weights` as in tests/engine/test_lora_text_encoder.py:
- "UNet": on the UNet's attention projections (to_q, to_k, to_v, to_out.0);
- "UNet + text encoder": the same plus every linear layer of the text encoder (q/k/v/out_proj, fc1, fc2: 72 layers,
  what kohya's scripts train with `--network_train_unet_only` off).
For each pair, in one run:
- studio: `loras_applied(model, [(A, 1.0)])` entered and left, then the same with B, and so on; both adapters are in
  the model's cache after their first use (timed apart), so a switch is what every later request pays. No denoising.
- diffusers, both loaded once under adapter names: `pipe.set_adapters([name], [1.0])` per switch.
- diffusers, one LoRA at a time: `pipe.load_lora_weights(B)` + `pipe.unload_lora_weights()` per switch (the file
  read included: that is how it is used).
- for the reading, the studio's switch done through `pipe.set_adapters` + `enable_lora` + `disable_lora`, each of
  which walks all of the modules of the UNet and text encoder (the studio keeps a list of its peft layers instead).
Each is the median of `--switches` switches, alternating A and B. The base weights are left uninitialised
(`to_empty`): a switch never reads them, and 3.9 GB of random numbers would only slow the build. Prints one block per
pair and the ratios; the last lines are `switch ms (PAIR): studio S; diffusers load+unload D (Dx); set_adapters C (Cx)`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig, inject_adapter_in_model
from transformers import CLIPTextModel
from transformers.utils import logging as transformers_logging

from architectures import _text_config, _unet, build_random_pipeline
from studio.engine.learned.lora import loras_applied
from studio.engine.learned.lora_files import load_lora
from studio.engine.models import LoadedModel

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # as in the tests
TEXT_LINEAR = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # as in the tests: kohya's targets
RANK = 4
TARGET_MS = 10.0  # issue 14, item 5; issue 30: the studio's switch <= diffusers' set_adapters, for both pairs
WEIGHTS = "pytorch_lora_weights.safetensors"  # the name `save_lora_weights` writes
PAIRS = {"UNet": False, "UNet + text encoder": True}  # pair -> whether its LoRAs have a text-encoder part


def build_unet(size: str):
    """The UNet of `size` ("sd15": SD 1.5's shapes; "tiny": the tests'), its weights allocated but not filled."""
    with torch.device("meta"):
        unet = _unet("sd1", "full" if size == "sd15" else "tiny", 768)
    return unet.to_empty(device="cpu").eval()


def build_text_encoder(tiny: CLIPTextModel) -> CLIPTextModel:
    """SD 1.5's text encoder (CLIP ViT-L/14's: 12 layers of 768, 49,408 tokens) with the tiny pipeline's token ids,
    its weights allocated but not filled."""
    config = tiny.config
    with torch.device("meta"):
        encoder = CLIPTextModel(_text_config(768, "full", 49408, config.eos_token_id, config.bos_token_id, 768))
    return encoder.to_empty(device="cpu").eval()


def random_lora(model: torch.nn.Module, targets: list[str], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA on `targets` of a meta copy of `model`: peft names and shapes it, the values are random and
    non-zero. Its peft state dict."""
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets), model)
    return {name.replace(".default", ""): torch.randn(param.shape, generator=generator) * 0.01
            for name, param in model.named_parameters() if "lora_" in name}


def make_lora(folder: Path, pipe, size: str, seed: int, text_encoder: bool) -> Path:
    """A LoRA on the UNet's attention and, with `text_encoder`, on the text encoder's linear layers, saved by
    diffusers. Returns the folder (`load_lora_weights` takes it)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        unet, encoder = _unet("sd1", "full" if size == "sd15" else "tiny", 768), CLIPTextModel(pipe.text_encoder.config)
    layers = {"unet_lora_layers": random_lora(unet, UNET_ATTENTION, generator)}
    if text_encoder:
        layers["text_encoder_lora_layers"] = random_lora(encoder, TEXT_LINEAR, generator)
    StableDiffusionPipeline.save_lora_weights(folder, **layers)
    return folder


def median_ms(step, switches: int) -> float:
    """Median milliseconds of `step(k)` over `switches` calls, k = 0, 1, ...: k even uses A, odd B."""
    times = []
    for k in range(switches):
        start = time.perf_counter()
        step(k)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def switch_times(model: LoadedModel, folders: list[Path], switches: int) -> dict[str, float]:
    """The ways of switching between the LoRAs in `folders` (A, B), in ms per switch; the model is left without
    adapters."""
    pipe, loras = model.pipe, [load_lora(folder / WEIGHTS) for folder in folders]  # the library keeps files read
    times: dict[str, float] = {}

    # 1. Studio: the first use of each loads it into the cache; every later switch finds it there.
    def studio(k: int) -> None:
        with model.lock, loras_applied(model, [(loras[k % 2], 1.0)]):
            pass

    times["first use"] = median_ms(studio, 2)
    times["studio"] = median_ms(studio, switches)
    names = list(model.lora_cache.sizes)
    times["MiB"] = model.lora_cache.sizes[names[0]] / 2**20

    def pipeline_walks(k: int) -> None:  # the same switch through diffusers' pipeline calls, each a walk of modules
        pipe.set_adapters([names[k % 2]], [1.0])
        pipe.enable_lora()
        pipe.disable_lora()

    times["walks"] = median_ms(pipeline_walks, switches)
    budget, model.lora_cache.budget_bytes = model.lora_cache.budget_bytes, 0
    model.lora_cache.evict(pipe)  # empty the UNet and text encoder for diffusers' turn
    model.lora_cache.budget_bytes = budget

    # 2. diffusers, both adapters loaded once: `set_adapters` per switch.
    for name, folder in zip("ab", folders):
        pipe.load_lora_weights(folder, weight_name=WEIGHTS, adapter_name=name)
    times["set_adapters"] = median_ms(lambda k: pipe.set_adapters(["ab"[k % 2]], [1.0]), switches)
    pipe.unload_lora_weights()

    # 3. diffusers, one LoRA at a time: load it for the request, unload it after.
    def load_unload(k: int) -> None:
        pipe.load_lora_weights(folders[k % 2], weight_name=WEIGHTS)
        pipe.unload_lora_weights()

    times["load+unload"] = median_ms(load_unload, switches)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--switches", type=int, default=21, help="switches timed per way (median)")
    args = parser.parse_args()
    # Not results: transformers' "Loading weights" bar on each text-encoder load, diffusers' note that loading B
    # "led to missing keys" (A's, loaded beside it) and peft's that a second adapter joins the first.
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
    tmp = Path(tempfile.mkdtemp(prefix="lora-swap-"))

    # 1. A pipeline of the size's UNet and text encoder (a tiny VAE: no LoRA touches it) and the studio's model.
    start = time.perf_counter()
    pipe = build_random_pipeline("sd1", "tiny", tokenizer_dir=tmp / "tok")
    pipe.register_modules(unet=build_unet(args.size))
    if args.size == "sd15":
        pipe.register_modules(text_encoder=build_text_encoder(pipe.text_encoder))
    pipe.set_progress_bar_config(disable=True)
    model = LoadedModel(source=f"random-sd1-{args.size}", family="sd1", device=torch.device("cpu"),
                        dtype=torch.float32, pipe=pipe, attention="sdpa")
    parameters = {part: sum(p.numel() for p in getattr(pipe, part).parameters()) / 1e6
                  for part in ("unet", "text_encoder")}
    folders = {pair: [make_lora(tmp / f"{pair}-{name}", pipe, args.size, seed, with_text)
                      for seed, name in enumerate("ab", start=1)] for pair, with_text in PAIRS.items()}
    built_s = time.perf_counter() - start

    # 2. Each pair in turn, every way of switching.
    results = {pair: switch_times(model, pair_folders, args.switches) for pair, pair_folders in folders.items()}

    # 3. Report.
    print(f"{args.size}: UNet {parameters['unet']:.0f}M, text encoder {parameters['text_encoder']:.0f}M parameters, "
          f"fp32, CPU, {torch.get_num_threads()} thread(s); rank-{RANK} LoRAs; built in {built_s:.1f} s")
    print(f"medians of {args.switches} switches, A and B alternating:")
    for pair, t in results.items():
        studio = t["studio"]
        print(f" {pair} ({t['MiB']:.2f} MiB per LoRA):")
        print(f"  studio loras_applied enter+exit (cached): {studio:9.3f} ms   "
              f"(first use, loading: {t['first use']:.1f} ms, mean of A and B)")
        for way, label in (("walks", "the same through pipe.set_adapters + enable_lora + disable_lora"),
                           ("set_adapters", "diffusers set_adapters (both loaded)"),
                           ("load+unload", "diffusers load_lora_weights + unload")):
            print(f"  {label + ':':<42}{t[way]:9.3f} ms   ({t[way] / studio:.2f}x)")
        verdict = "met" if studio <= t["set_adapters"] else f"missed by {studio - t['set_adapters']:.2f} ms"
        print(f"  target: studio <= set_adapters: {verdict}; studio <= {TARGET_MS:.0f} ms on SD 1.5 shapes: "
              + ("not judged at this size" if args.size != "sd15" else "met" if studio <= TARGET_MS else "missed"))
    for pair, t in results.items():
        print(f"switch ms ({pair}): studio {t['studio']:.3f}; diffusers load+unload {t['load+unload']:.3f} "
              f"({t['load+unload'] / t['studio']:.1f}x); set_adapters {t['set_adapters']:.3f} "
              f"({t['set_adapters'] / t['studio']:.2f}x)")


if __name__ == "__main__":
    main()
