"""Cost of switching the active concept between requests: the studio vs diffusers' load/unload.

`python benchmarks/swap_speed.py [--reps 5] [--library 1000]`

On an SD 1.5-sized text encoder with random weights (49,408 x 768 table, 12 layers), in one run:
- studio: encode a prompt with concept A, then with concept B; the swap overhead is that time minus a plain
  encode of the same prompt (concepts are per-request data, so there is nothing to load or unload). Measured with
  a library folder holding 1 and N concept files (the concept is looked up in the library each request).
- diffusers: `load_textual_inversion(B)` + `unload_textual_inversion()` on the same pipeline.
Prints median milliseconds and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPTextModel

from studio.architectures import _text_config, build_random_pipeline
from studio.demo.tokenizer import build_clip_tokenizer
from studio.engine.concepts import Concept, save_concept
from studio.engine.prompts import PromptEncoder
from studio.library import ConceptLibrary

PROMPT = "a photo of {} on the beach, detailed"


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--library", type=int, default=1000)
    args = parser.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="swap-bench-"))
    tokenizer = build_clip_tokenizer("a photo of on the beach detailed".split(), tmp / "tok")
    encoder = CLIPTextModel(_text_config(768, "full", 49408, tokenizer.eos_token_id, tokenizer.bos_token_id, 768)).eval()
    studio = PromptEncoder([tokenizer], [encoder], "sd1")
    a = Concept("<a>", {"text_encoder": torch.randn(1, 768) * 0.02}, {})
    b = Concept("<b>", {"text_encoder": torch.randn(1, 768) * 0.02}, {})

    results = {}
    with torch.no_grad():
        plain = median_ms(lambda: studio.encode([PROMPT.format("a toy")]), args.reps)
        for n in (1, args.library):
            folder = tmp / f"lib{n}"
            folder.mkdir()
            for k in range(n):
                save_concept(Concept(f"<c{k}>", {"text_encoder": torch.randn(1, 768)}, {}), folder / f"c{k}.safetensors")
            save_concept(b, folder / "b.safetensors")
            library = ConceptLibrary(folder)
            library.entries()  # first scan, outside the timing (the studio does it at start-up)

            lookup = median_ms(lambda: library.resolve(PROMPT.format("<b>"), {"text_encoder": 768}), args.reps)
            with_concept = median_ms(lambda: studio.encode([PROMPT.format("<b>")], [b]), args.reps)
            results[n] = (lookup, with_concept - plain)

        # A real pipeline around the same encoder and tokenizer (its tiny UNet/VAE play no part in a swap).
        pipe = build_random_pipeline("sd1", "tiny", tokenizer_dir=tmp / "tok-pipe")
        pipe.register_modules(text_encoder=encoder, tokenizer=tokenizer)

        def diffusers_swap():
            pipe.load_textual_inversion(b.vectors["text_encoder"][0], token="<b>")
            pipe.unload_textual_inversion("<b>")
        diffusers_ms = median_ms(diffusers_swap, args.reps)

    print(f"plain encode (not counted as swap): {plain:.1f} ms")
    for n, (lookup, extra) in results.items():
        swap = lookup + max(extra, 0.0)
        print(f"studio swap, library of {n:>5} files: lookup {lookup:7.2f} ms + encode overhead {extra:7.2f} ms "
              f"(negative = within noise) -> {swap:7.2f} ms; diffusers / studio = {diffusers_ms / max(swap, 1e-3):.0f}x")
    print(f"diffusers load_textual_inversion + unload:  {diffusers_ms:8.2f} ms")


if __name__ == "__main__":
    main()
