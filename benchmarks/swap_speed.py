"""Cost of switching the active concept between requests: the studio vs diffusers' load/unload.

`python benchmarks/swap_speed.py [--reps 5] [--library 1 1000 10000] [--spaced]`

On an SD 1.5-sized text encoder with random weights (49,408 x 768 table, 12 layers), in one run:
- studio, per request: `ConceptLibrary.resolve` of the prompt, which finds the concept in a library folder of N
  files, plus the concept's share of encoding the prompt: `PromptEncoder.input_embeddings` (tokenize, put the
  concept's vectors in its slots) minus the same step for a prompt without a concept. The transformer forward that
  follows is the same work with a concept or without (and in diffusers), so it is no part of a swap; concepts are
  per-request data, so there is nothing to load or unload either.
- `--spaced`: each timed request comes longer after the previous one than the library's `refresh_interval`, as in
  real use (a person types between generations), so that a library that rescans once its last scan is older than
  that pays for a rescan on every request. Without it, requests come back to back.
- the same, for the periodic scan the library falls back to where it gets no file-system events (`watch=False`),
  and for a request right after one file of the library changed (the watching library re-reads that file).
- diffusers: `load_textual_inversion(B)` + `unload_textual_inversion()` on the same pipeline.
Prints median milliseconds; the last line is `swap ms at 1/1000/10000 files: A / B / C; diffusers: D` (the sizes
given to `--library`), for the library as the studio makes it (watching where it can).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from transformers import CLIPTextModel

from architectures import _text_config, build_random_pipeline
from studio.demo.tokenizer import build_clip_tokenizer
from studio.engine.learned.word import Concept
from studio.engine.prompts import PromptEncoder
from studio.library import ConceptLibrary

PROMPT = "a photo of {} on the beach, detailed"
SD1 = {"text_encoder": 768}


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def resolve_ms(library: ConceptLibrary, reps: int, pause_s: float) -> float:
    """Median time of `library.resolve` of the prompt over `reps` requests (after one warm-up), each `pause_s` after
    the previous one: what the library costs a request, rescans included where it does them."""
    times = []
    for _ in range(reps + 1):
        time.sleep(pause_s)
        t = time.perf_counter()
        library.resolve(PROMPT.format("b"))
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times[1:])


def concept_slots_ms(studio: PromptEncoder, concept: Concept, reps: int) -> float:
    """The concept's share of encoding the prompt: median over `reps` pairs of `input_embeddings` with the concept
    minus the same step for a prompt without one, the two timed back to back in alternating order (so that the
    shared CPU's load and warm caches fall on both sides alike). It does not depend on the library."""
    def with_concept():
        studio.input_embeddings(0, [PROMPT.format("b")], [concept])

    def plain():
        studio.input_embeddings(0, [PROMPT.format("a toy")])

    return paired_delta_ms(with_concept, plain, reps)


def paired_delta_ms(with_concept, plain, reps: int) -> float:
    """Median over `reps` pairs of `with_concept()`'s milliseconds minus `plain()`'s, the two timed back to back in
    alternating order (the shared CPU's load and warm caches fall on both sides alike); the first pair left out."""
    deltas = []
    for k in range(reps + 1):
        took = {}
        for step in (with_concept, plain) if k % 2 else (plain, with_concept):
            t = time.perf_counter()
            step()
            took[step] = (time.perf_counter() - t) * 1000
        deltas.append(took[with_concept] - took[plain])
    return statistics.median(deltas[1:])


def make_library_folder(folder: Path, n: int, concept: Concept) -> None:
    """`n` one-vector kohya files `c0` ... (the token is the file name) and `concept` as `b.safetensors`."""
    folder.mkdir()
    filler = safetensors_bytes({"emb_params": torch.randn(1, 768)})  # the same bytes under n names: quick to write
    for k in range(n):
        (folder / f"c{k}.safetensors").write_bytes(filler)
    (folder / "b.safetensors").write_bytes(safetensors_bytes({"emb_params": concept.vectors["text_encoder"]}))


def after_one_change_ms(library: ConceptLibrary, folder: Path, reps: int) -> float:
    """Median time of the first request after one library file was rewritten (and its event recorded)."""
    times = []
    for _ in range(reps):
        seen = library.changes_seen
        (folder / "c0.safetensors").write_bytes(safetensors_bytes({"emb_params": torch.randn(1, 768)}))
        library.wait_for_change(seen, timeout=10.0)
        t = time.perf_counter()
        library.resolve(PROMPT.format("b"))
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--library", type=int, nargs="+", default=[1, 1000, 10000], metavar="N",
                        help="numbers of files in the library, one run each")
    parser.add_argument("--spaced", action="store_true",
                        help="space the timed requests further apart than the library's refresh_interval")
    args = parser.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="swap-bench-"))
    tokenizer = build_clip_tokenizer("a photo of on the beach detailed".split(), tmp / "tok")
    encoder = CLIPTextModel(_text_config(768, "full", 49408, tokenizer.eos_token_id, tokenizer.bos_token_id, 768)).eval()
    studio = PromptEncoder([tokenizer], [encoder], "sd1")
    b = Concept("b", {"text_encoder": torch.randn(1, 768) * 0.02}, {})

    rows, watching = {}, {}
    with torch.no_grad():
        plain_encode = median_ms(lambda: studio.encode([PROMPT.format("a toy")]), args.reps)
        slots = concept_slots_ms(studio, b, 200)
        for n in args.library:
            folder = tmp / f"lib{n}"
            make_library_folder(folder, n, b)
            row = {}
            for mode, watch in (("default", True), ("poll", False)):
                library = ConceptLibrary(folder, watch=watch)
                library.entries()  # the first scan, outside the timing (the studio does it at start-up)
                assert [c.token for c in library.resolve(PROMPT.format("b"))] == ["b"]
                pause = library.refresh_interval + 0.05 if args.spaced else 0.0
                row[mode] = resolve_ms(library, args.reps, pause)
                if watch:
                    watching[n] = library.watch_error or "watching"
                    if library.watching:
                        row["after one change"] = after_one_change_ms(library, folder, args.reps)
                library.close()
            rows[n] = row

        # A real pipeline around the same encoder and tokenizer (its tiny UNet/VAE play no part in a swap).
        pipe = build_random_pipeline("sd1", "tiny", tokenizer_dir=tmp / "tok-pipe")
        pipe.register_modules(text_encoder=encoder, tokenizer=tokenizer)

        def diffusers_swap():
            pipe.load_textual_inversion(b.vectors["text_encoder"][0], token="<b>")
            pipe.unload_textual_inversion("<b>")
        diffusers_ms = median_ms(diffusers_swap, args.reps)

    spacing = "spaced past refresh_interval" if args.spaced else "back to back"
    print(f"requests {spacing}; medians of {args.reps}; a whole plain encode (not part of a swap): "
          f"{plain_encode:.1f} ms; the concept's share of input_embeddings (median of 200 pairs): {slots:.3f} ms")
    for n, row in rows.items():
        for mode, label in (("default", f"studio ({watching[n]})"), ("poll", "periodic scan (watch=False)")):
            print(f"{n:>6} files, {label}: resolve {row[mode]:8.3f} ms + concept slots {slots:.3f} ms "
                  f"= {row[mode] + slots:8.3f} ms")
        if "after one change" in row:
            print(f"{n:>6} files, first resolve after one file changed: {row['after one change']:8.3f} ms")
    print(f"diffusers load_textual_inversion + unload: {diffusers_ms:.2f} ms")
    shutil.rmtree(tmp, ignore_errors=True)
    swaps = " / ".join(f"{rows[n]['default'] + slots:.3f}" for n in args.library)
    print(f"swap ms at {'/'.join(str(n) for n in args.library)} files: {swaps}; diffusers: {diffusers_ms:.2f}")


if __name__ == "__main__":
    main()
