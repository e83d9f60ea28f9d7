"""Train the embedded demo model on the procedural world and save it as a Stable Diffusion 1.x folder.

`python -m studio.demo.build [--out assets/demo-model] [--minutes 88] [--vae-steps 4000] [--seed 0]
[--noise-offset 0.1] [--init-from DIR] [--vae DIR]`

Recipe (seeded; a wall-clock budget sets the number of steps, so a faster machine trains longer; `--unet-steps`
fixes the count instead for an exactly repeatable run):
1. Render the world: pictures with three captions each (`studio.demo.world`); a training step picks one, so the
   model sees the same picture described in different words. 10% of objects wear the unnamed "zigzag" pattern,
   which their captions never mention; 35% are individuals (world v2's toys), each drawn once. `--named-rate`
   draws a share of them from the first `--names` of `world.NAMED_INDIVIDUALS` instead, toys with a name of their
   own that captions say (not used by the shipped build; docs/demo-model.md, session 9). World v3's levers
   (`world.WorldOptions`, all off by default and in the shipped build): `--looks coarse` draws individuals whose
   identity a 64 px picture holds; `--look-words` lets a share of toy descriptions say part of the look in words;
   `--look-code` calls a share of toys by `world.LOOK_CODE_WORD`, whose input embedding step 5 replaces by the toy's
   look code (`studio.demo.look_code`).
2. Build the tokenizer over the demo vocabulary (`studio.demo.vocab`), with the levers' words when they are on;
   continuing an earlier build (`--init-from`), every token takes the earlier embedding row of the same string, and
   a word new to it the row `NEW_WORD_INIT` says.
3. Train a small AutoencoderKL (64x64 RGB -> 4x16x16 latents, no mid-block attention: it is 2x cheaper and the
   world has no long-range structure) with L1 + MSE reconstruction weighted towards object pixels, mostly on
   object-seeking crops (see `train_vae`).
4. Encode every picture once; set the VAE's scaling factor to 1/std of the latents, as SD does.
5. Train a small CLIP text encoder jointly with a small UNet on the cached latents: epsilon prediction, SD's
   scaled-linear betas, Min-SNR-5 loss weighting (Hang et al. 2023: faster convergence), 10% empty captions so
   classifier-free guidance works. `--schedule zero-snr` trains instead on the betas rescaled to zero terminal SNR
   with v-prediction and samples from the last timestep ("trailing"; Lin et al. 2024): SD's schedule leaves 7% of
   the picture in its noisiest training step, so the model reads background and layout off the noise and sampling
   from pure noise draws them at random; zero-snr fixes that but learnt colour and shape far slower here. AdamW
   with warm-up and cosine decay, an EMA of the weights that is what gets saved. `--noise-offset` adds a
   per-channel constant to the noise (offset noise), which fixed build 3's tinted backgrounds at no cost in
   colour or shape (docs/demo-model.md, build 5); `--pyramid-noise` adds coarser noise too (kohya's multi-resolution
   noise; tried for position, not shipped); `--init-from` continues an earlier build's text encoder and UNet;
   `--device cuda` trains this stage on a GPU. Cross-attention sits at the 8x8 and 4x4 levels only: 16x16
   self-attention would double the cost.
6. Save a standard diffusers StableDiffusionPipeline folder atomically (temp folder, then rename), with a
   snapshot every `--snapshot-minutes` so a cut-off build still leaves a usable model.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from studio.demo.look_code import LookCode, input_rows_replaced, word_spread
from studio.demo.tokenizer import build_clip_tokenizer
from studio.demo.vae import to_tensor as _to_tensor
from studio.demo.vae import vae_roundtrip
from studio.demo.vocab import demo_words
from studio.demo.world import (LOOK_CODE_WORD, LOOKS, NAMED_INDIVIDUALS, TOY, WORLD_V2, WorldOptions, coded_caption,
                               individual_look, render, sample_scene)

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "assets" / "demo-model"
RESOLUTION = 64
CAPTIONS_PER_PICTURE = 3
# Share of objects drawn with the pattern no caption names ("zigzag"): the model must be able to draw it for a
# learned word to reach it, as SD can draw many things no word reaches (the paper's premise).
UNNAMED_RATE = 0.1
# Share of objects that are individuals (world v2's toys, each seen once): enough that the model learns to draw
# *a* toy in any scene, so that a learned word has an individual to point at.
TOY_RATE = 0.35
OBJECT_WEIGHT = 9.0  # VAE loss weight of object pixels against background pixels
EDGE_WEIGHT = 2.0  # VAE loss weight of the neighbouring-pixel differences
# The UNet's noise schedule (training, and the sampler config saved with the model). "sd": SD 1.x's own, what the
# shipped build 3 used. "zero-snr": the same betas rescaled to zero terminal SNR, v-prediction, trailing timesteps
# (Lin et al. 2024): fixed build 3's backgrounds and positions, learnt colour and shape far slower (docs/demo-model.md).
_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
NOISE_SCHEDULES = {
    "sd": dict(_BETAS, prediction_type="epsilon", timestep_spacing="leading"),
    "zero-snr": dict(_BETAS, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
}
VAE_CROP, VAE_CROP_SHARE = 32, 0.8  # VAE: crop side, and the share of steps trained on crops
# Where the embedding row of a word new to a build continued from an earlier one (`warm_start`) starts: the row of
# the earlier word named (a near meaning), or for None the mean of the earlier build's words (a neutral word). The
# look code's word starts at "toy", the centre of the codes; its row is only ever read when a user types it.
NEW_WORD_INIT: dict[str, str | None] = {
    "stripes": "striped", "spots": "dotted", "spot": "dotted", "round": "circle", "long": None, "lumpy": None,
    "side": None, "band": None, "cap": None, "one": None, LOOK_CODE_WORD: TOY,
}


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4,
        norm_num_groups=8, sample_size=RESOLUTION, mid_block_add_attention=False,
    )


def make_text_encoder(tokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(48, 96, 96),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=16,
    )


def render_data(n: int, seed: int, toy_rate: float = TOY_RATE, named_rate: float = 0.0,
                names: int = len(NAMED_INDIVIDUALS), options: WorldOptions = WORLD_V2,
                ) -> tuple[torch.Tensor, list[list[str]], list[list[list[int]]]]:
    """`n` training pictures (as a [-1, 1] tensor) with CAPTIONS_PER_PICTURE captions each, and per caption the
    toys it calls by the look code, in order (`world.coded_caption`); deterministic. A share `named_rate` of the
    individuals are the first `names` named ones; `options` are world v3's levers (none by default)."""
    named = NAMED_INDIVIDUALS[:names]
    rng = random.Random(seed)
    images, captions, coded = [], [], []
    for _ in range(n):
        scene = sample_scene(rng, training=True, unnamed_rate=UNNAMED_RATE, toy_rate=toy_rate,
                             named_rate=named_rate, named=named, looks=options.looks)
        images.append(render(scene, RESOLUTION))
        said = [coded_caption(scene, rng, options) for _ in range(CAPTIONS_PER_PICTURE)]
        captions.append([text for text, _ in said])
        coded.append([toys for _, toys in said])
    return _to_tensor(images), captions, coded


def _cosine(step_frac: float, warm: float) -> float:
    """Warm-up then cosine decay to 5% of the peak."""
    if step_frac < warm:
        return step_frac / warm
    p = (step_frac - warm) / max(1e-8, 1 - warm)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _object_weight(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weight: 1 on the background (the picture's border colour), OBJECT_WEIGHT on everything else.
    Objects cover a few percent of a picture; unweighted, a VAE learns backgrounds and outlines long before it
    learns which colour or pattern an object wears (measured: colour read right on 9% of reconstructions)."""
    border = torch.cat([x[:, :, 0, :], x[:, :, -1, :], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]
    foreground = ((x - background).abs().amax(1, keepdim=True) > 0.15).float()
    return 1 + (OBJECT_WEIGHT - 1) * foreground


def _differences(x: torch.Tensor) -> torch.Tensor:
    """Neighbouring-pixel differences, down and across: their L1 loss keeps edges, stripes and dots sharp, which
    plain L1 + MSE blurs (a blurred world reads as the "soft" style)."""
    return torch.cat([(x[..., 1:, :] - x[..., :-1, :]).flatten(1), (x[..., :, 1:] - x[..., :, :-1]).flatten(1)], 1)


def _object_crops(x: torch.Tensor, gen: torch.Generator, side: int = VAE_CROP, tries: int = 4) -> torch.Tensor:
    """One `side` x `side` crop per picture: of `tries` random places, the one holding most object pixels."""
    weight = _object_weight(x)[:, 0]
    crops = []
    for picture, w in zip(x, weight):
        places = torch.randint(0, x.shape[-1] - side + 1, (tries, 2), generator=gen).tolist()
        i, j = max(places, key=lambda ij: float(w[ij[0]:ij[0] + side, ij[1]:ij[1] + side].sum()))
        crops.append(picture[:, i:i + side, j:j + side])
    return torch.stack(crops)


def train_vae(vae, pixels: torch.Tensor, steps: int, log: dict, gen: torch.Generator) -> None:
    """A fixed number of steps (not a time budget): a shared, busy machine must not starve the VAE, whose quality
    bounds everything after it (the UNet of build 2 read exactly as well as its VAE's reconstructions did).

    Object-weighted L1 + MSE plus an L1 loss on pixel differences; the first 80% of steps on object-seeking 32x32 crops (4x cheaper than whole
    pictures and mostly object, so colours and patterns come early), the rest on whole pictures, whose GroupNorm
    statistics are the ones generation sees."""
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    start = time.time()
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = 2e-3 * _cosine(step / steps, 0.03)
        if step <= VAE_CROP_SHARE * steps:
            x = _object_crops(pixels[torch.randint(0, len(pixels), (32,), generator=gen)], gen)
        else:
            x = pixels[torch.randint(0, len(pixels), (16,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        w = _object_weight(x)
        err = (rec - x).abs() + (rec - x) ** 2
        loss = (err * w).mean() / w.mean() + EDGE_WEIGHT * F.l1_loss(_differences(rec), _differences(x))
        loss = loss + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log["vae_loss"].append((step, round(loss.item(), 5)))
            print(f"vae step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    log["vae_steps"] = steps
    log["vae_seconds"] = round(time.time() - start, 1)


def vae_ceiling(vae, n: int = 500) -> dict[str, float] | None:
    """The judge's per-attribute accuracy on the VAE's reconstructions of fresh renders: an upper bound on the
    prompt compliance of any UNet decoding through this VAE (None when the judge is not there)."""
    from studio.demo.judge import Judge, JudgeError, measure_accuracy

    try:
        judge = Judge.load()
    except JudgeError:
        return None
    return measure_accuracy(judge, n=n, transform=vae_roundtrip(vae))


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet, log: dict, schedule: str = "sd") -> None:
    """Write the pipeline folder atomically: a temp folder beside `out`, then rename."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    scheduler = DDIMScheduler(**NOISE_SCHEDULES[schedule], clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp)
    (tmp / "training_log.json").write_text(json.dumps(log, indent=1))
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


class _EMA:
    """Exponential moving average of parameters with the usual warm-up (decay grows with the step count)."""

    def __init__(self, modules: list[torch.nn.Module], max_decay: float = 0.999):
        self.copies = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
        self.modules, self.max_decay, self.step = modules, max_decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.step += 1
        decay = min(self.max_decay, (1 + self.step) / (10 + self.step))
        for ema, live in zip(self.copies, self.modules):
            for e, p in zip(ema.parameters(), live.parameters()):
                e.lerp_(p, 1 - decay)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count is `n` inside the block and what it was after: the count is process-wide
    state, and it sets how float reductions are split, so a build that left it changed changed every later
    result of the process."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class _Captions:
    """The tokenizer built over the demo vocabulary and every caption as 77 token ids."""

    tokenizer: object
    folder: Path  # where the tokenizer was written; removed once the model is saved
    ids: torch.Tensor  # [pictures, CAPTIONS_PER_PICTURE, 77]
    empty_ids: torch.Tensor  # the empty caption, for classifier-free guidance


@dataclass
class _CodedCaptions:
    """World v3's lever 2c in training: which toy each look-code word of a caption stands for, and the code map."""

    code: LookCode
    word_id: int  # the look-code word's token id
    slots: torch.Tensor  # [pictures, CAPTIONS_PER_PICTURE, 2, F]: normalised features of the 1st and 2nd coded toy

    @classmethod
    def of(cls, code: LookCode, word_id: int, coded: list[list[list[int]]]) -> "_CodedCaptions":
        toys = sorted({s for caps in coded for toys in caps for s in toys})
        features = dict(zip(toys, code.normalised([individual_look(s, code.looks) for s in toys]))) if toys else {}
        slots = torch.zeros(len(coded), CAPTIONS_PER_PICTURE, 2, len(code.feature_mean))
        for p, caps in enumerate(coded):
            for c, said in enumerate(caps):
                for k, seed in enumerate(said):
                    slots[p, c, k] = features[seed]
        return cls(code, word_id, slots)

    def rows(self, tok: torch.Tensor, idx: torch.Tensor, which: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For a batch of captions (`tok` [B, 77], caption `which` of picture `idx`): where the look-code word
        stands and, in row-major order, the codes that replace it (the k-th in a caption is its k-th coded toy)."""
        where = tok == self.word_id
        batch = where.nonzero()[:, 0]
        slot = where.long().cumsum(1)[where] - 1
        return where, self.code.from_normalised(self.slots[idx[batch], which[batch], slot])


def _tokenize(out: Path, captions: list[list[str]], names: int = 0, options: WorldOptions = WORLD_V2) -> _Captions:
    """Step 2 of `build`: the tokenizer (with the first `names` named individuals' names and the words `options`
    put in captions), and the captions as ids padded to all 77 positions."""
    folder = out.with_name(out.name + ".tokenizer")
    tokenizer = build_clip_tokenizer(demo_words(names, options), folder)
    flat = [c for caps in captions for c in caps]
    ids = tokenizer(flat, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.view(len(captions), CAPTIONS_PER_PICTURE, -1)
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids[0]
    return _Captions(tokenizer, folder, ids, empty_ids)


def _vae_and_latents(out: Path, pixels: torch.Tensor, vae_dir: Path | None, vae_steps: int, ceiling_pictures: int,
                     log: dict, gen: torch.Generator, keep_scaling: bool = False) -> tuple[AutoencoderKL, torch.Tensor]:
    """Steps 3-4 of `build`: the VAE (trained, or an earlier build's), then every picture's latent, scaled."""
    if vae_dir is not None:  # a VAE an earlier build of the same recipe trained (its scaling is recomputed)
        vae = AutoencoderKL.from_pretrained(vae_dir)
        log["vae_from"] = str(vae_dir)
    else:
        vae = make_vae()
        train_vae(vae, pixels, vae_steps, log, gen)
        vae.save_pretrained(out.with_name(out.name + ".vae"))  # lets a later build skip this stage (--vae)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        moments = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
        check = vae.decode(moments[:256]).sample
        log["vae_reconstruction_l1"] = round(float((check - pixels[:256]).abs().mean()), 4)
    # Scaled to unit variance as SD does; a VAE reused to continue an earlier build keeps the scale its UNet learnt.
    scaling = vae.config.scaling_factor if keep_scaling else float(1.0 / moments.std())
    vae.register_to_config(scaling_factor=scaling)
    log["vae_scaling_factor"] = scaling
    log["vae_judge"] = vae_ceiling(vae, ceiling_pictures) if ceiling_pictures else None
    return vae, moments * scaling


def warm_start(folder: Path, tokenizer) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    """The text encoder and UNet of an earlier build (`folder`), for training to continue from them.

    The earlier build's tokenizer may differ (build 3's split "heart" in two; world v3's levers add words): every
    token of `tokenizer` takes the earlier embedding row of the same token string; a word of `NEW_WORD_INIT` the
    earlier build lacks takes the row that says, and any other token the mean of the rows the earlier tokenizer
    splits its string into. The embedding table is sized for `tokenizer`; everything else is copied as is."""
    from transformers import CLIPTokenizer

    old_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    old_tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = make_text_encoder(tokenizer)
    state = {k: v for k, v in old_encoder.state_dict().items() if "token_embedding" not in k}
    missing, unexpected = text_encoder.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "token_embedding" not in k]:
        raise ValueError(f"{folder} is not a build of this recipe's text encoder (differs in {missing + unexpected})")
    old_rows = old_encoder.get_input_embeddings().weight.detach()
    old_vocab = old_tokenizer.get_vocab()
    # The earlier build's words: BPE builds a word's merges from its left, so a token ending in "</w>" longer than
    # one byte is a whole word (a single byte with "</w>" is one of the 512 byte symbols).
    old_words = [i for token, i in old_vocab.items() if token.endswith("</w>") and len(token) > len("x</w>")]
    with torch.no_grad():
        new_rows = text_encoder.get_input_embeddings().weight
        for token, index in tokenizer.get_vocab().items():
            word = token.removesuffix("</w>")
            if token in old_vocab:
                new_rows[index] = old_rows[old_vocab[token]]
            elif token.endswith("</w>") and word in NEW_WORD_INIT:
                near = NEW_WORD_INIT[word]
                known = near is not None and f"{near}</w>" in old_vocab
                new_rows[index] = old_rows[old_vocab[f"{near}</w>"]] if known else old_rows[old_words].mean(0)
            else:
                pieces = old_tokenizer(tokenizer.convert_tokens_to_string([token]), add_special_tokens=False).input_ids
                if pieces:
                    new_rows[index] = old_rows[pieces].mean(0)
    return text_encoder, UNet2DConditionModel.from_pretrained(folder / "unet")


def pyramid_noise(noise: torch.Tensor, gen: torch.Generator, levels: int, discount: float) -> torch.Tensor:
    """`noise` plus coarser Gaussian noise at 1/2, 1/4, ... of its size (weight `discount` ** level, upsampled
    bilinearly), scaled back to unit variance per picture: multi-resolution ("pyramid") noise, kohya sd-scripts'
    `--multires_noise_iterations` / `--multires_noise_discount`. White noise averages out over large areas, so
    SD's noisiest step still shows where the picture's big shapes are (the 2x2 means of a 16x16 latent keep about
    half their signal-to-noise); with coarse noise added, layout has to come from the caption, as offset noise did
    for the picture's mean colour."""
    b, c, h, w = noise.shape
    for level in range(1, levels + 1):
        size = (max(1, h >> level), max(1, w >> level))
        coarse = torch.randn((b, c, *size), generator=gen)
        noise = noise + F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount ** level
        if size == (1, 1):
            break
    return noise / noise.flatten(1).std(dim=1).view(b, 1, 1, 1)


def min_snr_weights(noise_sched: DDPMScheduler) -> torch.Tensor:
    """Per-timestep loss weights of Min-SNR-5 (Hang et al. 2023) for the scheduler's prediction type."""
    snr = noise_sched.alphas_cumprod / (1 - noise_sched.alphas_cumprod)  # zero-snr: 0 at the last step
    if noise_sched.config.prediction_type == "v_prediction":  # floored at the x0 loss so the pure-noise step counts
        return torch.clamp(snr, min=1.0, max=5.0) / (snr + 1)
    return torch.clamp(snr, max=5.0) / snr


@dataclass
class _Batch:
    """One training batch of step 5: caption `which` of picture `idx` as token ids `tok` (a tenth of them emptied,
    for classifier-free guidance), the picture's latent `x0`, and the noise and timesteps that corrupt it."""

    idx: torch.Tensor
    which: torch.Tensor
    tok: torch.Tensor
    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor


def _draw_batch(latents: torch.Tensor, words: _Captions, gen: torch.Generator, batch: int, *, noise_offset: float,
                pyramid: tuple[int, float], device: torch.device) -> _Batch:
    """Draw a `_Batch` from `gen` on the CPU (see `_train_unet`), with offset and pyramid noise when they are on."""
    idx = torch.randint(0, len(latents), (batch,), generator=gen)
    which = torch.randint(0, CAPTIONS_PER_PICTURE, (batch,), generator=gen)
    tok = words.ids[idx, which].clone()
    tok[torch.rand(batch, generator=gen) < 0.1] = words.empty_ids
    x0 = latents[idx.to(latents.device)]
    noise = torch.randn(x0.shape, generator=gen)
    if pyramid[0]:
        noise = pyramid_noise(noise, gen, *pyramid)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((batch, x0.shape[1], 1, 1), generator=gen)
    noise, t = noise.to(device), torch.randint(0, 1000, (batch,), generator=gen).to(device)
    return _Batch(idx, which, tok, x0, noise, t)


def _per_sample_loss(text_encoder, unet, noise_sched: DDPMScheduler, b: _Batch, device: torch.device,
                     coded: _CodedCaptions | None) -> torch.Tensor:
    """Each sample's mean squared error of the UNet's prediction (noise, or velocity under v-prediction) given its
    caption; with `coded`, the look-code words' input embeddings are the toys' codes."""
    xt = noise_sched.add_noise(b.x0, b.noise, b.t)
    if coded is None:
        cond = text_encoder(b.tok.to(device)).last_hidden_state
    else:
        where, rows = coded.rows(b.tok, b.idx, b.which)
        with input_rows_replaced(text_encoder, where, rows):
            cond = text_encoder(b.tok.to(device)).last_hidden_state
    v_prediction = noise_sched.config.prediction_type == "v_prediction"
    target = noise_sched.get_velocity(b.x0, b.noise, b.t) if v_prediction else b.noise
    return F.mse_loss(unet(xt, b.t, cond).sample, target, reduction="none").mean(dim=(1, 2, 3))


def _train_unet(text_encoder, unet, ema: _EMA, latents: torch.Tensor, words: _Captions, log: dict,
                gen: torch.Generator, snapshot: Callable[[int], None], *, lr: float, batch: int, schedule: str,
                unet_steps: int | None, budget_left: Callable[[], float], snapshot_minutes: float, t0: float,
                noise_offset: float = 0.0, pyramid: tuple[int, float] = (0, 0.0),
                device: torch.device = torch.device("cpu"), coded: _CodedCaptions | None = None) -> int:
    """Step 5 of `build`: train the text encoder and UNet together for `unet_steps` (None: until the time
    `budget_left()` gives when the loop starts is spent); returns the number of steps done.

    `noise_offset` adds a per-picture, per-channel constant to the noise (Guttenberg 2023, diffusers'
    `--noise_offset`): SD's schedule leaves the picture's mean in its noisiest step, so without it the model reads
    the background off the noise; with it the mean is noise too and the caption must say it.

    With `coded`, the look-code word's input embedding in each caption is replaced by the code of the toy it
    stands for (`studio.demo.look_code`): fixed points the text encoder and UNet learn to read, never learn.

    Every random draw comes from `gen` on the CPU and only then moves to `device` (where the models and `latents`
    are), so a GPU build draws the same batches, noise and timesteps as a CPU build of the same seed."""
    noise_sched = DDPMScheduler(**NOISE_SCHEDULES[schedule])
    weights = min_snr_weights(noise_sched).to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    remaining = max(budget_left(), 1.0)  # a budget already spent on data and the VAE still trains for a second
    start, step, last_snap = time.time(), 0, time.time()
    while True:
        frac = step / unet_steps if unet_steps else (time.time() - start) / remaining
        if frac >= 1.0:
            return step
        for g in opt.param_groups:
            g["lr"] = lr * _cosine(frac, 0.02)
        b = _draw_batch(latents, words, gen, batch, noise_offset=noise_offset, pyramid=pyramid, device=device)
        per_sample = _per_sample_loss(text_encoder, unet, noise_sched, b, device, coded)
        loss = (per_sample * weights[b.t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        step += 1
        if step % 50 == 0:
            log["unet_loss"].append((step, round(per_sample.mean().item(), 5)))
            print(f"unet step {step} loss {per_sample.mean().item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)
        if snapshot_minutes and time.time() - last_snap > snapshot_minutes * 60:
            snapshot(step)
            last_snap = time.time()
            print(f"snapshot saved at step {step}", flush=True)


def _recipe_log(*, minutes: float, seed: int, n_images: int, vae_steps: int, batch: int, lr: float, schedule: str,
                noise_offset: float, init_from: Path | None, toy_rate: float, named_rate: float, names: int,
                pyramid: tuple[int, float], device: str, options: WorldOptions) -> dict:
    """training_log.json as a build starts: its settings and the machine; the stages add what they measure."""
    return {"recipe": 5, "world": 2 if options == WORLD_V2 else 3, "world_options": asdict(options),
            "toy_rate": toy_rate, "named_rate": named_rate,
            "names": names, "pyramid_noise": list(pyramid), "schedule": schedule,
            "noise_offset": noise_offset, "init_from": str(init_from) if init_from else None, "seed": seed,
            "minutes": minutes, "vae_steps": vae_steps,
            "n_images": n_images, "batch": batch, "lr": lr,
            "device": device,
            "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                        f"torch {torch.__version__}", "vae_loss": [], "unet_loss": []}


def _starting_models(init_from: Path | None, tokenizer) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    """Step 5's text encoder and UNet before training: an earlier build's (`warm_start`), or fresh ones."""
    if init_from is not None:
        return warm_start(init_from, tokenizer)
    return make_text_encoder(tokenizer), make_unet()


def _look_codes(text_encoder, words: _Captions, names: int, looks: str, coded_toys: list[list[list[int]]],
                log: dict) -> _CodedCaptions:
    """World v3's lever 2c in step 5: look codes around "toy", as spread as the words are, fixed from here on
    (the code map goes in the log), and which toy each look-code word of a caption stands for."""
    table, vocab = text_encoder.get_input_embeddings().weight, words.tokenizer.get_vocab()
    spread = word_spread(table, [vocab[f"{w}</w>"] for w in demo_words(names)])
    code = LookCode.fit(looks, table[vocab[f"{TOY}</w>"]], spread)
    coded = _CodedCaptions.of(code, vocab[f"{LOOK_CODE_WORD}</w>"], coded_toys)
    log["look_code"] = code.to_json()
    return coded


def _snapshotter(out: Path, vae, words: _Captions, ema: _EMA, coded: _CodedCaptions | None, log: dict,
                 schedule: str, t0: float) -> Callable[[int], None]:
    """Step 6 as a function of the step count, which step 5 also calls every `snapshot_minutes`: save the EMA
    weights as the pipeline folder `out`, with the log as it stands."""

    def snapshot(step: int) -> None:
        log["unet_steps"], log["seconds"] = step, round(time.time() - t0, 1)
        if coded is not None:  # typed in a prompt, the look-code word means the average toy: the codes' centre
            with torch.no_grad():
                table = ema.copies[0].get_input_embeddings().weight
                table[coded.word_id] = coded.code.center.to(table)
        save_pipeline(out, vae, ema.copies[0], words.tokenizer, ema.copies[1], log, schedule)
    return snapshot


def build(out: Path, minutes: float, seed: int, n_images: int, vae_steps: int = 4000,
          unet_steps: int | None = None, snapshot_minutes: float = 15.0, batch: int = 32, lr: float = 1e-3,
          vae_dir: Path | None = None, ceiling_pictures: int = 500, schedule: str = "sd",
          noise_offset: float = 0.0, init_from: Path | None = None, threads: int | None = None,
          toy_rate: float = TOY_RATE, named_rate: float = 0.0, names: int = len(NAMED_INDIVIDUALS),
          pyramid: tuple[int, float] = (0, 0.0), device: str = "cpu", options: WorldOptions = WORLD_V2) -> Path:
    """Run the recipe of this module's docstring and write the pipeline folder `out`; returns `out`. `options` are
    world v3's levers (`world.WorldOptions`; the default is world v2, the shipped build's).

    All the CPU's cores train (inside the build only: see `_torch_threads`); with `unet_steps` and the same
    machine, two builds of one seed are equal bit for bit."""
    if schedule not in NOISE_SCHEDULES:
        raise ValueError(f"unknown noise schedule {schedule!r}; choose one of: {', '.join(NOISE_SCHEDULES)}")
    t0 = time.time()
    names = names if named_rate else 0  # the named individuals a build draws (and whose names its tokenizer holds)
    with _torch_threads(threads or max(1, os.cpu_count() or 1)):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        log = _recipe_log(minutes=minutes, seed=seed, n_images=n_images, vae_steps=vae_steps, batch=batch, lr=lr,
                          schedule=schedule, noise_offset=noise_offset, init_from=init_from, toy_rate=toy_rate,
                          named_rate=named_rate, names=names, pyramid=pyramid, device=device, options=options)

        # 1-2. Data and tokenizer. Training uses all 77 positions, padding included: pipelines pad prompts to 77
        # and the UNet attends to every position, so a model that only ever saw the used prefix meets unfamiliar
        # keys at generation time.
        pixels, captions, coded_toys = render_data(n_images, seed, toy_rate, named_rate, names, options)
        words = _tokenize(out, captions, names=names, options=options)
        used = int((words.ids != words.tokenizer.pad_token_id).sum(-1).max()) + 1
        print(f"data: {n_images} pictures, vocabulary {len(words.tokenizer)} tokens, longest caption {used} tokens, "
              f"{time.time() - t0:.0f}s", flush=True)

        # 3-4. VAE, then the latent cache.
        vae, latents = _vae_and_latents(out, pixels, vae_dir, vae_steps, ceiling_pictures, log, gen,
                                        keep_scaling=init_from is not None and vae_dir is not None)
        del pixels
        print(f"latents cached {tuple(latents.shape)}, scaling {log['vae_scaling_factor']:.3f}, reconstruction L1 "
              f"{log['vae_reconstruction_l1']}, {time.time() - t0:.0f}s", flush=True)

        # 5. Text encoder + UNet, with a snapshot of the EMA weights every `snapshot_minutes`.
        text_encoder, unet = _starting_models(init_from, words.tokenizer)
        coded = _look_codes(text_encoder, words, names, options.looks, coded_toys, log) if options.look_code else None
        del coded_toys
        where = torch.device(device)  # the UNet stage only: the VAE is trained (or reused) and applied on the CPU
        text_encoder, unet, latents = text_encoder.to(where), unet.to(where), latents.to(where)
        ema = _EMA([text_encoder, unet])
        snapshot = _snapshotter(out, vae, words, ema, coded, log, schedule, t0)
        step = _train_unet(text_encoder, unet, ema, latents, words, log, gen, snapshot, lr=lr, batch=batch,
                           schedule=schedule, unet_steps=unet_steps, snapshot_minutes=snapshot_minutes, t0=t0,
                           noise_offset=noise_offset, pyramid=pyramid, device=where, coded=coded,
                           budget_left=lambda: minutes * 60 - (time.time() - t0) - 30)  # 30 s left to save

        # 6. Save (the EMA weights).
        snapshot(step)
    shutil.rmtree(words.folder, ignore_errors=True)
    print(f"saved {out} after {time.time() - t0:.0f}s ({step} UNet steps)", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: assets/demo-model)")
    parser.add_argument("--minutes", type=float, default=88.0, help="wall-clock budget for the whole build")
    parser.add_argument("--vae-steps", type=int, default=4000,
                        help="VAE training steps (batch 32 crops, the last 20%% batch 16 whole pictures)")
    parser.add_argument("--vae", type=Path, default=None,
                        help="reuse the VAE folder an earlier build saved beside its output (<out>.vae)")
    parser.add_argument("--unet-steps", type=int, default=None,
                        help="fixed number of UNet steps (exactly repeatable) instead of the wall-clock budget")
    parser.add_argument("--snapshot-minutes", type=float, default=15.0, help="save the model this often (0: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=24000, help="number of world pictures to train on")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--schedule", choices=sorted(NOISE_SCHEDULES), default="sd",
                        help="UNet noise schedule: sd (SD 1.x's; the shipped build) or zero-snr (v-prediction, "
                        "zero terminal SNR, trailing timesteps; see docs/demo-model.md)")
    parser.add_argument("--noise-offset", type=float, default=0.0,
                        help="per-channel constant added to the noise (diffusers' --noise_offset; 0.1 is common)")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continue from an earlier build's text encoder and UNet (its tokenizer may differ)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--toy-rate", type=float, default=TOY_RATE, help="share of objects that are individuals")
    parser.add_argument("--named-rate", type=float, default=0.0,
                        help="share of individuals drawn from the named ones (world.NAMED_INDIVIDUALS)")
    parser.add_argument("--names", type=int, default=len(NAMED_INDIVIDUALS),
                        help="how many of the named individuals those are drawn from (the first N)")
    parser.add_argument("--pyramid-noise", type=int, default=0, metavar="LEVELS",
                        help="add coarser noise at this many halvings of the latent (kohya's multires noise; 0: off)")
    parser.add_argument("--pyramid-discount", type=float, default=0.7,
                        help="weight of each coarser level relative to the one finer (kohya's discount)")
    parser.add_argument("--looks", choices=LOOKS, default="fine",
                        help="individuals' looks: fine (world v2, the shipped build's) or coarse (world v3 lever 1: "
                        "what a 64 px picture holds)")
    parser.add_argument("--look-words", type=float, default=0.0, metavar="SHARE",
                        help="share of toy descriptions that say part of the look in words (world v3 lever 2a)")
    parser.add_argument("--look-code", type=float, default=0.0, metavar="SHARE",
                        help=f"share of toy descriptions that call the toy '{LOOK_CODE_WORD}', read as its look code "
                        "(world v3 lever 2c)")
    parser.add_argument("--device", default="cpu",
                        help="where the text encoder and UNet train (cuda on a GPU machine; the VAE stays on the CPU)")
    args = parser.parse_args(argv)
    build(args.out, args.minutes, args.seed, args.images, args.vae_steps, args.unet_steps,
          args.snapshot_minutes, args.batch, args.lr, args.vae, schedule=args.schedule,
          noise_offset=args.noise_offset, init_from=args.init_from, threads=args.threads,
          toy_rate=args.toy_rate, named_rate=args.named_rate, names=args.names,
          pyramid=(args.pyramid_noise, args.pyramid_discount), device=args.device,
          options=WorldOptions(args.looks, args.look_words, args.look_code))


if __name__ == "__main__":
    main()
