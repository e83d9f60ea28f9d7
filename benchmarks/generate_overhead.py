"""What the studio adds to a txt2img call: its engine with one concept vs a plain diffusers pipeline.

`python benchmarks/generate_overhead.py [--size tiny|full] [--device cpu|cuda] [--steps 20] [--reps 7]`

One SD 1.x pipeline with random weights (`architectures.build_random_pipeline`) and an identical deep copy.
One concept (2 vectors) is written to a diffusers-format file; the same file is
- read by the studio (`load_concept`) and passed per request to `studio.engine.generate.generate`;
- loaded into the copy with diffusers' `load_textual_inversion`, which is then called as a plain pipeline.
Same prompt, seed, steps, guidance, size and scheduler (Euler). Each repeat runs both, alternating which goes
first, so drift on a shared machine hits both; medians of `--reps` repeats after one warm-up each.

Prints the txt2img times and their ratio (target <= 1.05x), the encode step alone (studio `pipeline_kwargs` vs
diffusers `encode_prompt`), the per-request concept slot substitution alone (target <= 5 ms) and the largest pixel
difference between the two pictures. `--size full` uses SD 1.5 shapes (512x512); meant for a GPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from architectures import build_random_pipeline
from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.registry import load_concept, save_concept
from studio.engine.learned.word import Concept
from studio.engine.models import LoadedModel

PROMPT = "a photo of <cat-toy> on the beach, detailed"
PLAIN_PROMPT = "a photo of a toy on the beach, detailed"
SEED = 1234
GUIDANCE = 7.5


def _timer(device: torch.device):
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()
    return now


def median_ms(fn, reps: int, now) -> float:
    """Median wall time of `fn` in milliseconds over `reps` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = now()
        fn()
        times.append((now() - start) * 1000)
    return statistics.median(times)


def paired_median_ms(a, b, reps: int, now) -> tuple[float, float, object, object]:
    """Medians of `a` and `b`, run in alternating order each repeat; also their last results."""
    results = [a(), b()]  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for rep in range(reps):
        order = (0, 1) if rep % 2 == 0 else (1, 0)
        for k in order:
            start = now()
            results[k] = (a, b)[k]()
            times[k].append((now() - start) * 1000)
    return statistics.median(times[0]), statistics.median(times[1]), results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    # generate() builds a pipeline object per request (its own scheduler); keep diffusers' per-build notices quiet.
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    now = _timer(device)
    tmp = Path(tempfile.mkdtemp(prefix="generate-bench-"))

    # 1. Two identical pipelines: one for the studio, one for diffusers' load_textual_inversion.
    pipe = build_random_pipeline("sd1", args.size, seed=0, tokenizer_dir=tmp / "tok")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    reference = copy.deepcopy(pipe)
    for p in (pipe, reference):
        p.to(device) if dtype == torch.float32 else p.to(device, dtype)
        p.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor

    # 2. One concept file, read by both.
    g = torch.Generator().manual_seed(0)
    concept_file = save_concept(Concept("<cat-toy>", {"text_encoder": torch.randn(2, 768, generator=g) * 0.02}, {}),
                                tmp / "cat-toy.safetensors", format="diffusers")
    concept = load_concept(concept_file, token="<cat-toy>")
    reference.load_textual_inversion(str(concept_file))

    model = LoadedModel(source=f"random-sd1-{args.size}", family="sd1", device=device, dtype=dtype, pipe=pipe,
                        attention="sdpa")
    request = GenerateRequest(PROMPT, concepts=[concept], seed=SEED, steps=args.steps, guidance=GUIDANCE,
                              scheduler="euler", width=size, height=size)

    def studio_txt2img():
        return generate(model, request).images[0]

    def diffusers_txt2img():
        generator = [torch.Generator(device="cpu").manual_seed(SEED)]
        with torch.inference_mode():
            return reference(PROMPT, negative_prompt="", num_inference_steps=args.steps, guidance_scale=GUIDANCE,
                             generator=generator, width=size, height=size).images[0]

    def studio_encode():
        return model.encoder.pipeline_kwargs(PROMPT, "", [concept], 1, GUIDANCE)

    def diffusers_encode():
        with torch.no_grad():
            return reference.encode_prompt(PROMPT, device, 1, True, negative_prompt="")

    # 3. Measure.
    studio_ms, diffusers_ms, studio_image, diffusers_image = paired_median_ms(
        studio_txt2img, diffusers_txt2img, args.reps, now)
    studio_enc_ms, diffusers_enc_ms, _, _ = paired_median_ms(studio_encode, diffusers_encode, args.reps * 3, now)
    with torch.no_grad():
        enc = model.encoder
        slots_ms = median_ms(lambda: enc.input_embeddings(0, [PROMPT], [concept]), args.reps * 3, now)
        plain_ms = median_ms(lambda: enc.input_embeddings(0, [PLAIN_PROMPT]), args.reps * 3, now)
    pixel_diff = int(np.abs(np.asarray(studio_image, np.int16) - np.asarray(diffusers_image, np.int16)).max())

    print(f"SD 1.x random weights, size={args.size} ({size}x{size}), {device.type} {str(dtype).removeprefix('torch.')}, "
          f"{args.steps} Euler steps, CFG {GUIDANCE}, medians of {args.reps} alternating repeats")
    print(f"txt2img  studio generate() with the concept:             {studio_ms:9.1f} ms")
    print(f"txt2img  diffusers pipeline after load_textual_inversion: {diffusers_ms:9.1f} ms")
    print(f"ratio studio / diffusers: {studio_ms / diffusers_ms:.3f}x (target <= 1.05x)")
    print(f"encode step alone (median of {args.reps * 3}): studio pipeline_kwargs {studio_enc_ms:.2f} ms, "
          f"diffusers encode_prompt {diffusers_enc_ms:.2f} ms")
    print(f"slot substitution alone (tokenize + concept slots, input_embeddings): {slots_ms:.3f} ms "
          f"(target <= 5 ms); same step for a prompt without a concept: {plain_ms:.3f} ms")
    print(f"largest pixel difference between the two pictures: {pixel_diff} (of 255)")


if __name__ == "__main__":
    main()
