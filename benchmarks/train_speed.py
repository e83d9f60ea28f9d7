"""Training speed and memory: the studio trainer vs a loop in the style of diffusers' textual_inversion example.

`python benchmarks/train_speed.py [--size tiny|demo|full] [--steps 40] [--batch 4]`

The reference loop does what diffusers' `examples/textual_inversion/textual_inversion.py` does, written out here
without accelerate: the new token is added to the tokenizer and the whole input-embedding table is trainable
(AdamW over every row, weight decay 1e-2), the other rows are copied back from a saved copy after every step, each
batch is loaded from disk, resized, flipped and tokenized by a Dataset, and every step encodes its pictures with
the VAE (no latent cache). The studio side is `studio.training.Trainer` with memory mode `fast` and no mixed
precision. Both train the same model (random weights, `--size tiny` or SD-1.5-sized `full`, whose tokenizer has SD 1.5's
49,408 entries so that the reference trains a table of that size; or `--size demo`: the embedded demo model in
assets/demo-model with the bundled concept set assets/concepts/zigzag-ring) on the same pictures
with the same steps, batch size, learning rate and seed; each runs in its own process so that one's memory
cannot be reused by the other; the sides alternate `--repeats` times and the best run of each is shown.

Measured from a loaded model and pictures on disk to the trained vectors: steps/s (setup included: the studio's
latent cache, the reference's token and table set-up) and the peak memory above the loaded model (CPU: peak RSS,
reset through /proc/self/clear_refs, or psutil sampling; CUDA: torch.cuda.max_memory_allocated).
Prints both and the ratios (targets: studio >= 3x the steps/s, <= 0.7x the memory).

A third process measures the floor: the UNet's forward and backward into the prompt embeddings alone (`run_floor`),
the work no Textual Inversion loop can drop. `diffusers / floor` is then the most any trainer could gain over the
reference on that model, and the benchmark prints how much of that possible gain the studio takes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TOKEN, LEARNING_RATE = "<bench>", 5e-3
INIT_WORD = "ring"  # one token in the demo model's vocabulary and in the 49,408-entry one of `--size full`
REPO = Path(__file__).resolve().parents[1]


# ---- memory ---------------------------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


@contextmanager
def peak_memory(device: torch.device):
    """Yield a dict that gets `peak_mib` (and `how`): the peak memory above the level at entry."""
    result: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result.update(peak_mib=(torch.cuda.max_memory_allocated() - base) / 2**20, how="torch.cuda.max_memory_allocated")
        return
    base = _rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        import psutil

        process, peak, stop = psutil.Process(), [base * 1024], threading.Event()

        def sample() -> None:
            while not stop.wait(0.005):
                peak[0] = max(peak[0], process.memory_info().rss)
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        yield result
        stop.set()
        thread.join()
        result.update(peak_mib=(peak[0] / 1024 - base) / 1024, how="psutil RSS sampled every 5 ms")
        return
    yield result
    result.update(peak_mib=(_rss_kib("VmHWM") - base) / 1024, how="peak RSS (VmHWM) after /proc/self/clear_refs")


def _device(args) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


# ---- the two loops --------------------------------------------------------------------------------------------
def run_studio(model_dir: Path, images: Path, args) -> dict:
    """The studio trainer, as `studio train` runs it."""
    from studio.engine.models import LoadOptions, ModelManager
    from studio.training import TrainConfig, Trainer

    model = ModelManager(LoadOptions(device=args.device, dtype="fp32")).load(model_dir)
    cfg = TrainConfig(TOKEN, init_text=INIT_WORD, steps=args.steps, batch_size=args.batch, learning_rate=LEARNING_RATE,
                      seed=args.seed, memory="fast", mixed_precision="no")
    out = Path(tempfile.mkdtemp(prefix="train-bench-studio-"))
    with peak_memory(model.device) as memory:
        started = time.perf_counter()
        concept = Trainer(model, cfg, images, out).run()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    assert torch.isfinite(concept.vectors["text_encoder"]).all()
    return {"steps_per_s": args.steps / elapsed, "seconds": elapsed, **memory}


def run_diffusers_style(model_dir: Path, images: Path, args) -> dict:
    """The loop of diffusers' textual_inversion example: whole table trainable, VAE encode every step."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from studio.training.templates import OBJECT_TEMPLATES

    device = _device(args)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, safety_checker=None)
    tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder.to(device), pipe.vae.to(device), pipe.unet.to(device)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    size = unet.config.sample_size * pipe.vae_scale_factor
    files = sorted(images.glob("*.png"))
    torch.manual_seed(args.seed)

    with peak_memory(device) as memory:
        started = time.perf_counter()
        # Token set-up: a new row in the tokenizer and the table, initialised from the init word.
        tokenizer.add_tokens([TOKEN])
        token_id = tokenizer.convert_tokens_to_ids(TOKEN)
        init_id = tokenizer.encode(INIT_WORD, add_special_tokens=False)[0]
        text_encoder.resize_token_embeddings(len(tokenizer))
        table = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[token_id] = table[init_id].clone()
        text_model = getattr(text_encoder, "text_model", text_encoder)
        vae.requires_grad_(False)
        unet.requires_grad_(False)
        text_model.encoder.requires_grad_(False)
        text_model.final_layer_norm.requires_grad_(False)
        text_model.embeddings.position_embedding.requires_grad_(False)
        optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=LEARNING_RATE,
                                      betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        original_rows = table.detach().clone()
        keep = torch.ones(len(tokenizer), dtype=torch.bool)
        keep[token_id] = False

        def item(k: int) -> tuple[torch.Tensor, torch.Tensor]:
            """One example as the example's Dataset builds it: read, resize, maybe flip, tokenize."""
            with Image.open(files[k % len(files)]) as raw:
                img = raw.convert("RGB").resize((size, size), Image.BICUBIC)
            if torch.rand(()) < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
            prompt = OBJECT_TEMPLATES[int(torch.randint(len(OBJECT_TEMPLATES), ()))].format(TOKEN)
            ids = tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                            return_tensors="pt").input_ids[0]
            return pixels, ids

        text_encoder.train()
        for _ in range(args.steps):
            batch = [item(int(k)) for k in torch.randint(len(files) * 100, (args.batch,))]  # shuffled repeats
            pixels = torch.stack([b[0] for b in batch]).to(device)
            input_ids = torch.stack([b[1] for b in batch]).to(device)
            latents = vae.encode(pixels).latent_dist.sample().detach() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(batch),), device=device)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            hidden = text_encoder(input_ids)[0]
            pred = unet(noisy, t, hidden).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():  # only the new row may change
                table[keep] = original_rows[keep]
            loss.item()  # the example logs the loss every step
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    assert torch.isfinite(table[token_id]).all()
    return {"steps_per_s": args.steps / elapsed, "seconds": elapsed, **memory}


def run_floor(model_dir: Path, images: Path, args) -> dict:
    """What every Textual Inversion loop must do, and nothing else: the UNet's forward and its backward into the
    prompt embeddings (the gradient reaches the new word only through cross-attention), on latents and prompt
    embeddings made once. No loop can step faster than this or hold less above the model, so `reference / floor`
    is the most any trainer can gain over the reference on this model."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    device = _device(args)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, safety_checker=None)
    for module in (pipe.text_encoder, pipe.vae, pipe.unet):
        module.to(device).requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    side = pipe.unet.config.sample_size
    torch.manual_seed(args.seed)
    with torch.no_grad():
        ids = pipe.tokenizer([f"a photo of a {INIT_WORD}"] * args.batch, padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
        prompt = pipe.text_encoder(ids)[0]
    latents = torch.randn(args.batch, pipe.unet.config.in_channels, side, side, device=device)

    def step() -> None:
        embeds = prompt.detach().requires_grad_(True)
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch,), device=device)
        pred = pipe.unet(noise_scheduler.add_noise(latents, noise, t), t, embeds).sample
        torch.nn.functional.mse_loss(pred, noise).backward()
        assert embeds.grad is not None

    # Timed like the two loops, from the loaded model: first-use costs (kernel selection, allocator growth) are
    # paid by every loop in a fresh process, so they belong to the floor too.
    with peak_memory(device) as memory:
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    return {"steps_per_s": args.steps / elapsed, "seconds": elapsed, **memory}


# ---- the SD 1.5-sized vocabulary ------------------------------------------------------------------------------
def clip_sized_tokenizer(words: list[str], out_dir: Path, size: int):
    """A CLIP tokenizer of `size` entries built here, without the hub: `words` become one token each (as in
    `studio.demo.tokenizer`), then made-up words fill the vocabulary up to `size` (SD 1.5's has 49,408: 512 byte
    symbols, 48,894 merged tokens, <|startoftext|> and <|endoftext|>). Only the size matters to the benchmark: the
    reference adds its token to this vocabulary and then trains (AdamW) a table of that many rows."""
    import itertools
    import string

    from transformers import CLIPTokenizer

    from studio.demo.tokenizer import BOS, EOS, clip_vocab_and_merges

    # The made-up words ("zzaaaa", "zzaaab", ...) sort after the real ones, whose tokens therefore come first and are
    # kept when the vocabulary is cut at `size`; each adds one or two entries, so `size` of them are more than enough.
    filler = ("zz" + "".join(letters) for letters in itertools.product(string.ascii_lowercase, repeat=4))
    vocab, merges = clip_vocab_and_merges([*words, *itertools.islice(filler, size)])
    kept = [token for token in vocab if token not in (BOS, EOS)][: size - 2] + [BOS, EOS]
    if len(kept) != size:
        raise ValueError(f"the made-up words gave {len(kept)} tokens, not {size}")
    vocab = {token: i for i, token in enumerate(kept)}
    pairs = [(a, b) for a, b in (m.split(" ") for m in merges) if a in vocab and b in vocab and a + b in vocab]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=77)
    tokenizer.save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)


def use_clip_sized_tokenizer(pipe, out_dir: Path) -> None:
    """Give a `full` random pipeline a tokenizer as large as its table. `build_random_pipeline` keeps SD 1.5's
    49,408-row table but a tokenizer of a few hundred words, so the reference's `resize_token_embeddings(len(tokenizer))`
    would cut the table to that and its 49,408-row AdamW cost would never show."""
    from studio.training.templates import TEMPLATES

    # The words the pipeline's tokenizer holds whole (a token of 2+ characters ending a word), those of the prompt
    # templates both sides train with, and the init word.
    known = [token.removesuffix("</w>") for token in pipe.tokenizer.get_vocab() if token.endswith("</w>") and len(token) > 5]
    template_words = re.findall(r"[a-z]+", " ".join(t for lists in TEMPLATES.values() for t in lists).lower())
    tokenizer = clip_sized_tokenizer([*known, *template_words, INIT_WORD], out_dir, pipe.text_encoder.config.vocab_size)
    config = pipe.text_encoder.config  # the special ids move to the end of the vocabulary, as in CLIP's
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                                     tokenizer.pad_token_id)
    pipe.register_modules(tokenizer=tokenizer)


# ---- driver ---------------------------------------------------------------------------------------------------
def prepare(root: Path, size: str, n_images: int) -> tuple[Path, Path]:
    """A saved random pipeline of `size` and `n_images` seeded pictures of a square on noise; for `demo`, the
    embedded demo model and a bundled concept set (copied, so both sides read the same PNG files)."""
    from architectures import build_random_pipeline

    if size == "demo":
        folder = root / "pics"
        folder.mkdir()
        for k, src in enumerate(sorted((REPO / "assets" / "concepts" / "zigzag-ring").glob("*.png"))[:n_images]):
            (folder / f"{k}.png").write_bytes(src.read_bytes())
        return REPO / "assets" / "demo-model", folder

    pipe = build_random_pipeline("sd1", size, tokenizer_dir=root / "tok")
    if size == "full":
        use_clip_sized_tokenizer(pipe, root / "tok-clip")
    pipe.save_pretrained(root / "model")
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    rng = np.random.default_rng(0)
    folder = root / "pics"
    folder.mkdir()
    for k in range(n_images):
        arr = rng.integers(0, 40, (side, side, 3), dtype=np.uint8)
        arr[side // 4: 3 * side // 4, side // 4: 3 * side // 4] = (200, 60 + 30 * k, 40)
        Image.fromarray(arr).save(folder / f"{k}.png")
    return root / "model", folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["tiny", "demo", "full"], default="tiny",
                        help="tiny: the test model (CPU, < 2 min); demo: the embedded demo model (the CPU target's "
                        "model); full: SD-1.5-sized random weights (for a GPU)")
    parser.add_argument("--steps", type=int, default=None, help="steps per side (default: 40 tiny and demo, 20 full)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, interleaved; the best is shown")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when there is one)")
    parser.add_argument("--only", choices=["studio", "diffusers", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--images-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (20 if args.size == "full" else 40)

    if args.only:  # one side, in its own process
        side = {"studio": run_studio, "diffusers": run_diffusers_style, "floor": run_floor}[args.only]
        print(json.dumps(side(args.model_dir, args.images_dir, args)))
        return

    root = Path(tempfile.mkdtemp(prefix="train-bench-"))
    model_dir, images = prepare(root, args.size, args.images)
    results: dict[str, list[dict]] = {"diffusers": [], "studio": [], "floor": []}
    for _ in range(args.repeats):  # interleaved, so a burst of load from another job hits all sides alike
        for name in results:
            cmd = [sys.executable, __file__, "--only", name, "--model-dir", str(model_dir), "--images-dir",
                   str(images), "--steps", str(args.steps), "--batch", str(args.batch), "--seed", str(args.seed)]
            if args.device:
                cmd += ["--device", args.device]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if done.returncode != 0:
                sys.exit(f"the {name} side failed:\n{done.stderr[-3000:]}")
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))

    # The least disturbed run of each side: the fastest, and its memory is the smallest peak seen.
    ref, ours, floor = ({**max(runs, key=lambda r: r["steps_per_s"]), "peak_mib": min(r["peak_mib"] for r in runs)}
                        for runs in (results["diffusers"], results["studio"], results["floor"]))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"size={args.size} device={device} steps={args.steps} batch={args.batch} seed={args.seed} "
          f"threads={torch.get_num_threads()} repeats={args.repeats} (best of each) memory: {ours['how']}")
    print(f"{'':28}{'steps/s':>10}{'seconds':>10}{'peak MiB':>11}")
    for label, r in (("diffusers-example style", ref), ("studio Trainer", ours), ("floor: UNet fwd+bwd only", floor)):
        print(f"{label:28}{r['steps_per_s']:10.2f}{r['seconds']:10.1f}{r['peak_mib']:11.1f}")
    speed = ours["steps_per_s"] / ref["steps_per_s"]
    def of_ref(mib: float) -> float:
        return mib / ref["peak_mib"] if ref["peak_mib"] > 0 else float("nan")

    memory = of_ref(ours["peak_mib"])
    print(f"speed ratio studio/diffusers: {speed:.2f}x (target >= 3x)")
    print(f"memory ratio studio/diffusers: {memory:.2f}x (target <= 0.7x)")
    # The floor is the part no loop can drop; the reference's remaining time and memory is all a trainer can save.
    print(f"most any loop can reach on this model (floor vs diffusers): {floor['steps_per_s'] / ref['steps_per_s']:.2f}x "
          f"steps/s, {of_ref(floor['peak_mib']):.2f}x memory; "
          f"studio's share of the possible speed-up: "
          f"{_share(ref['steps_per_s'], ours['steps_per_s'], floor['steps_per_s'])}")


def _share(ref: float, ours: float, floor: float) -> str:
    """How much of the time the floor says can be saved the studio saves (100%: it runs at the floor)."""
    saveable = 1 / ref - 1 / floor
    return f"{100 * (1 / ref - 1 / ours) / saveable:.0f}%" if saveable > 0 else "n/a (the reference is at the floor)"


if __name__ == "__main__":
    main()
