"""Cost of switching between two LoRA concepts between requests: the studio's adapter cache vs diffusers.

`python benchmarks/lora_swap.py [--size sd15|tiny] [--switches 21]`

On an SD 1.5-shaped UNet (`architectures._unet("sd1", "full")`: 860M parameters; `--size tiny`: the tests' UNet)
with two LoRAs of rank 4 on the attention projections (to_q, to_k, to_v, to_out.0), made with peft and saved by
diffusers' `save_lora_weights` as in tests/engine/test_lora_runtime.py, in one run:
- studio: `loras_applied(model, [(A, 1.0)])` entered and left, then the same with B, and so on; both adapters are in
  the model's cache after their first use (timed apart), so a switch is what every later request pays. No denoising.
- diffusers, one LoRA at a time: `pipe.load_lora_weights(B)` + `pipe.unload_lora_weights()` per switch (the file
  read included: that is how it is used).
- diffusers, both loaded once under adapter names: `pipe.set_adapters([name], [1.0])` per switch.
- for the reading, the studio's switch done through `unet.set_adapters` + `enable_lora` + `disable_lora`, each of
  which walks all of the UNet's modules (the studio keeps a list of its peft layers instead).
Each is the median of `--switches` switches, alternating A and B. The UNet's base weights are left uninitialised
(`to_empty`): a switch never reads them, and 3.4 GB of random numbers would only slow the build. Prints one row per
way and the ratios; the last line is `switch ms: studio S; diffusers load+unload D (Dx); set_adapters C (Cx)`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model

from architectures import _unet, build_random_pipeline
from studio.engine.learned.lora import loras_applied
from studio.engine.learned.lora_files import load_lora
from studio.engine.models import LoadedModel

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # as in the tests
RANK = 4
TARGET_MS = 10.0  # issue 14, item 5
WEIGHTS = "pytorch_lora_weights.safetensors"  # the name `save_lora_weights` writes


def build_unet(size: str):
    """The UNet of `size` ("sd15": SD 1.5's shapes; "tiny": the tests'), its weights allocated but not filled."""
    with torch.device("meta"):
        unet = _unet("sd1", "full" if size == "sd15" else "tiny", 768)
    return unet.to_empty(device="cpu").eval()


def make_lora(folder: Path, size: str, seed: int) -> Path:
    """A rank-4 LoRA on the UNet's attention: peft names and shapes it (on a meta copy of the UNet), the values
    are random and non-zero, diffusers saves it. Returns the folder (`load_lora_weights` takes it)."""
    with torch.device("meta"):
        shapes = _unet("sd1", "full" if size == "sd15" else "tiny", 768)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=UNET_ATTENTION), shapes)
    generator = torch.Generator().manual_seed(seed)
    layers = {name.replace(".default", ""): torch.randn(param.shape, generator=generator) * 0.01
              for name, param in shapes.named_parameters() if "lora_" in name}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers)
    return folder


def median_ms(step, switches: int) -> float:
    """Median milliseconds of `step(k)` over `switches` calls, k = 0, 1, ...: k even uses A, odd B."""
    times = []
    for k in range(switches):
        start = time.perf_counter()
        step(k)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--switches", type=int, default=21, help="switches timed per way (median)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lora-swap-"))

    # 1. A pipeline around the UNet (tiny text encoder and VAE: no LoRA touches them here) and the studio's model.
    start = time.perf_counter()
    pipe = build_random_pipeline("sd1", "tiny", tokenizer_dir=tmp / "tok")
    pipe.register_modules(unet=build_unet(args.size))
    pipe.set_progress_bar_config(disable=True)
    model = LoadedModel(source=f"random-sd1-{args.size}", family="sd1", device=torch.device("cpu"),
                        dtype=torch.float32, pipe=pipe, attention="sdpa")
    parameters = sum(p.numel() for p in pipe.unet.parameters())
    folders = [make_lora(tmp / name, args.size, seed) for seed, name in enumerate("ab", start=1)]
    loras = [load_lora(folder / WEIGHTS) for folder in folders]  # read once: the library keeps files it has read
    built_s = time.perf_counter() - start

    # 2. Studio: the first use of each loads it into the cache; every later switch finds it there.
    def studio(k: int) -> None:
        with model.lock, loras_applied(model, [(loras[k % 2], 1.0)]):
            pass

    first_use_ms = median_ms(studio, 2)
    studio_ms = median_ms(studio, args.switches)
    names = list(model.lora_cache.sizes)

    def whole_unet_walks(k: int) -> None:  # the same switch through diffusers' UNet calls, each a walk of its modules
        pipe.unet.set_adapters([names[k % 2]], [1.0])
        pipe.unet.enable_lora()
        pipe.unet.disable_lora()

    walks_ms = median_ms(whole_unet_walks, args.switches)
    adapter_mib = [size / 2**20 for size in model.lora_cache.sizes.values()]
    model.lora_cache.budget_bytes = 0
    model.lora_cache.evict(pipe)  # empty the UNet (and text encoders) for diffusers' turn

    # 3. diffusers, both adapters loaded once: `set_adapters` per switch.
    for name, folder in zip("ab", folders):
        pipe.load_lora_weights(folder, weight_name=WEIGHTS, adapter_name=name)
    set_adapters_ms = median_ms(lambda k: pipe.set_adapters(["ab"[k % 2]], [1.0]), args.switches)
    pipe.unload_lora_weights()

    # 4. diffusers, one LoRA at a time: load it for the request, unload it after.
    def load_unload(k: int) -> None:
        pipe.load_lora_weights(folders[k % 2], weight_name=WEIGHTS)
        pipe.unload_lora_weights()

    load_unload_ms = median_ms(load_unload, args.switches)

    # 5. Report.
    print(f"UNet: {args.size} ({parameters / 1e6:.0f}M parameters), fp32, CPU, {torch.get_num_threads()} thread(s); "
          f"two rank-{RANK} LoRAs on {', '.join(UNET_ATTENTION)}, {adapter_mib[0]:.2f} MiB each in the UNet; "
          f"built in {built_s:.1f} s")
    print(f"medians of {args.switches} switches, A and B alternating:")
    print(f"  studio loras_applied enter+exit (cached): {studio_ms:9.3f} ms   (first use, loading: {first_use_ms:.1f} ms, mean of A and B)")
    print(f"  the same through unet.set_adapters + enable_lora + disable_lora: {walks_ms:.3f} ms "
          f"({walks_ms / studio_ms:.1f}x)")
    print(f"  diffusers set_adapters (both loaded):     {set_adapters_ms:9.3f} ms   ({set_adapters_ms / studio_ms:.1f}x)")
    print(f"  diffusers load_lora_weights + unload:     {load_unload_ms:9.3f} ms   ({load_unload_ms / studio_ms:.1f}x)")
    verdict = "met" if studio_ms <= TARGET_MS else f"missed by {studio_ms - TARGET_MS:.1f} ms"
    print(f"  target: studio <= {TARGET_MS:.0f} ms per switch on SD 1.5 shapes: {verdict}"
          + ("" if args.size == "sd15" else " (not judged at this size)"))
    print(f"switch ms: studio {studio_ms:.3f}; diffusers load+unload {load_unload_ms:.3f} "
          f"({load_unload_ms / studio_ms:.1f}x); set_adapters {set_adapters_ms:.3f} ({set_adapters_ms / studio_ms:.1f}x)")


if __name__ == "__main__":
    main()
