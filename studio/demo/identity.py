"""The identity metric: a small image encoder that tells whether two demo-world pictures show the same individual.

This is the demo world's DINO / CLIP-I (DreamBench, Ruiz et al. 2023): the identity score of generated pictures is
their mean cosine similarity to the concept's training pictures, and the training pictures' cosine to each other is
the "real images" ceiling. The encoder is trained contrastively (NT-Xent / InfoNCE, SimCLR: Chen et al. 2020) on
world renders: two views of one individual (`world.individual`) under a different position, size, background and
style (flat, outline, mosaic, soft) are a positive pair; every other identity in the batch is a negative, and
batches are built from groups that share a main colour (half of them a texture kind too), so colour alone never
separates them. Named shapes take part too: the identity of a named object is its (shape, colour, pattern), so a
bundled "purple-star" set is scored the same way. Views carry what generated pictures have: reconstructions
through the demo model's VAE (`studio.demo.vae.vae_roundtrip`), tinted backgrounds, mild blur, colour shifts.

How it was measured (`identity.json` -> "quality", re-run with `python -m studio.demo.identity --measure`): on
individuals from `world.HELD_OUT_INDIVIDUALS` (never trained on), 4 fresh views each, the mean cosine of
same-individual pairs against different-individual pairs (and different individuals with the same main colour),
ROC AUC of same vs different, and top-1 retrieval among 100 individuals; once clean against clean, and once with
the queries replaced by their VAE reconstructions (what a generated picture looks like) against clean references.

    enc = IdentityEncoder.load()
    enc.similarity(generated_pictures, training_pictures)   # -> one score per generated picture, -1 .. 1
    enc.cross_similarity(training_pictures)                 # -> the ceiling: each reference against the others

Train it: `python -m studio.demo.identity --train` (seeded, one CPU thread, ~8 CPU-minutes; writes
assets/judge/identity.safetensors, fp16, 0.66 MB, and identity.json).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from studio.demo import world
from studio.demo.judge import JUDGE_DIR, RESOLUTION, fp16_round_trip, load_net, to_batch
from studio.demo.vae import vae_roundtrip
from studio.engine.files import atomic_write

IDENTITY_DIR = JUDGE_DIR  # shipped beside the attribute judge: the two together are the demo world's evaluator
TRAIN_COMMAND = "python -m studio.demo.identity --train"
TEMPERATURE = 0.1  # NT-Xent temperature; SimCLR's ablation favours 0.1 at large batches (Chen et al. 2020, Table 5)

Transform = Callable[[list[Image.Image]], list[Image.Image]]


class IdentityError(ValueError):
    """The identity encoder is missing or unusable, or was given nothing to compare; the message says what to do."""


class IdentityNet(nn.Module):
    """Five 3x3 conv blocks (64 -> 8 px), global mean and max pooling, and a two-layer head to a unit vector.

    Global pooling makes the embedding blind to where the object is, which identity must be; the last blocks see
    ~39 px, a big object's whole width, so the silhouette is read as one thing. The first block is strided: the
    finest texture (stripes on a small toy) has a period of ~3 px, which a strided 3x3 conv still resolves.
    """

    def __init__(self, width: int = 64, dim: int = 128):
        super().__init__()
        chans = [3, width // 2, width, width, 2 * width, 2 * width]
        strides = [2, 2, 1, 2, 1]
        layers: list[nn.Module] = []
        for cin, cout, stride in zip(chans[:-1], chans[1:], strides):
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(4 * width, 2 * width), nn.ReLU(), nn.Linear(2 * width, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return F.normalize(self.head(h), dim=-1)


# ---------------------------------------------------------------------------------------------- the encoder

class IdentityEncoder:
    """Embeds pictures so that cosine similarity says "same identity". Build with `IdentityEncoder.load()`."""

    def __init__(self, net: IdentityNet, info: dict):
        self.net = net.eval()
        self.info = info

    @classmethod
    def load(cls, folder: Path | str = IDENTITY_DIR) -> "IdentityEncoder":
        """Load the encoder written by `python -m studio.demo.identity --train` (identity.safetensors + .json)."""
        net, info = load_net(folder, "identity", "identity encoder", IdentityNet, IdentityError, TRAIN_COMMAND)
        return cls(net, info)

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Pictures (any size; resized to 64x64 RGB) -> [N, D] unit vectors."""
        batch = to_batch(images)
        if not len(batch):
            return torch.zeros(0, self.info["architecture"]["dim"])
        return torch.cat([self.net(batch[i:i + 256]) for i in range(0, len(batch), 256)])

    def similarity(self, generated: Sequence[Image.Image], references: Sequence[Image.Image]) -> list[float]:
        """Per generated picture: its mean cosine similarity to all references (DreamBench's DINO score)."""
        if not generated or not references:
            raise IdentityError(f"similarity needs generated pictures and references; got {len(generated)} and "
                                f"{len(references)}")
        return (self.embed(generated) @ self.embed(references).T).mean(dim=1).tolist()

    def cross_similarity(self, references: Sequence[Image.Image]) -> list[float]:
        """Per reference: its mean cosine to the OTHER references, the ceiling a generated picture is held to."""
        if len(references) < 2:
            raise IdentityError(f"cross_similarity needs at least 2 references; got {len(references)}")
        emb = self.embed(references)
        sims = emb @ emb.T
        n = len(references)
        return ((sims.sum(dim=1) - sims.diagonal()) / (n - 1)).tolist()


# ---------------------------------------------------------------------------------------------- views

def identity_key(obj: world.Obj) -> tuple:
    """What an identity is: an individual's seed, or a named object's (shape, colour, pattern)."""
    return ("toy", obj.individual) if obj.individual is not None else (obj.shape, obj.color, obj.pattern)


def named_identities() -> list[world.Obj]:
    """Every named-shape identity: shape x colour x pattern, the unnamed zigzag included."""
    return [world.Obj(s, c, p) for s in world.SHAPES for c in world.COLORS
            for p in world.PATTERNS + world.UNNAMED["pattern"]]


def render_view(obj: world.Obj, rng: random.Random, *, tint_rate: float = 0.0, pair_rate: float = 0.0,
                size: int = RESOLUTION) -> Image.Image:
    """`obj` at a random size and position on a random background in a random style.

    A share `tint_rate` of backgrounds are tinted off the world's four colours, as generated backgrounds are;
    a share `pair_rate` shows two small copies at left and right ("two S*").
    """
    if rng.random() < pair_rate:
        objects = [replace(obj, size="small", position=p) for p in ("left", "right")]
    else:
        objects = [replace(obj, size=rng.choice(world.SIZES), position=rng.choice(world.POSITIONS))]
    background, style = rng.choice(tuple(world.BACKGROUNDS)), rng.choice(world.STYLES)
    if rng.random() >= tint_rate:
        return world.render(world.Scene(objects, background, style), size)
    # Rendering is linear in the background colour (compositing, then resizes and blurs), so two renders give
    # how much background shows through each pixel, and any background can be composited from there.
    on_white = np.asarray(world.render(world.Scene(objects, "white", style), size), dtype=float)
    on_black = np.asarray(world.render(world.Scene(objects, "black", style), size), dtype=float)
    white, black = (np.array(world.BACKGROUNDS[b], dtype=float) for b in ("white", "black"))
    through = (on_white - on_black) / (white - black)
    tint = np.array(world.BACKGROUNDS[background], dtype=float) + np.array([rng.uniform(-45, 45) for _ in range(3)])
    return Image.fromarray(np.clip(on_white + through * (tint - white), 0, 255).astype(np.uint8))


def load_demo_vae_roundtrip() -> Transform:
    """The demo model's VAE as a picture -> reconstruction transform (what generated pictures look like)."""
    from diffusers import AutoencoderKL

    from studio.demo.build import DEFAULT_OUT

    vae_dir = DEFAULT_OUT / "vae"
    if not vae_dir.is_dir():
        raise IdentityError(f"no demo-model VAE in {vae_dir}: build the demo model with `python -m studio.demo.build`")
    return vae_roundtrip(AutoencoderKL.from_pretrained(vae_dir).eval())


# ---------------------------------------------------------------------------------------------- measuring

def _auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """ROC AUC: the chance that a random positive scores above a random negative (ties count half)."""
    negative = negative.sort().values
    below = torch.searchsorted(negative, positive, right=False).double()
    at_or_below = torch.searchsorted(negative, positive, right=True).double()
    return float(((below + at_or_below) / 2).mean() / len(negative))


def identity_quality(enc: IdentityEncoder, objects: Sequence[world.Obj], *, views: int = 4, seed: int = 4242,
                     transform: Transform | None = None, retrieval_among: int = 100) -> dict[str, float]:
    """Same-identity vs different-identity cosine over `views` fresh views of each of `objects`.

    Queries are the views (or what `transform` makes of them, e.g. VAE reconstructions), references the clean
    views; a query is compared only with references of another view index (never with its own rendering).
    `same_color_cosine` / `auc_same_color` use only different identities with the same main colour ("a red toy"
    against this red toy). Retrieval: each query of views 1.. against view 0 of the first `retrieval_among`.
    """
    rng = random.Random(seed)
    pictures = [render_view(o, rng) for o in objects for _ in range(views)]
    refs = enc.embed(pictures).view(len(objects), views, -1)
    queries = enc.embed(transform(pictures)).view(len(objects), views, -1) if transform else refs
    sims = torch.einsum("iad,jbd->iajb", queries, refs)  # [N, V, N, V]
    n = len(objects)
    other_view = ~torch.eye(views, dtype=torch.bool)[None, :, None, :].expand(n, views, n, views)
    same = torch.eye(n, dtype=torch.bool)[:, None, :, None].expand(n, views, n, views)
    colors = [o.color for o in objects]
    color_eq = torch.tensor([[a == b for b in colors] for a in colors])[:, None, :, None].expand(n, views, n, views)
    pos, neg = sims[same & other_view], sims[~same & other_view]
    neg_color = sims[~same & color_eq & other_view]
    k = min(retrieval_among, n)
    gallery = refs[:k, 0]  # [k, D]
    hits = (torch.einsum("iad,jd->iaj", queries[:k, 1:], gallery).argmax(-1) == torch.arange(k)[:, None])
    return {
        "same_cosine": round(float(pos.mean()), 4), "different_cosine": round(float(neg.mean()), 4),
        "same_color_cosine": round(float(neg_color.mean()), 4) if len(neg_color) else None,
        "auc": round(_auc(pos, neg), 4), "auc_same_color": round(_auc(pos, neg_color), 4) if len(neg_color) else None,
        f"top1_among_{k}": round(float(hits.float().mean()), 4), "identities": n, "views": views,
    }


def measure(enc: IdentityEncoder, *, n_individuals: int = 200, seed: int = 4242,
            vae: Transform | None = None, looks: str = "fine") -> dict[str, dict]:
    """identity.json's "quality": held-out individuals (clean, and VAE-reconstructed queries when `vae` is given)
    and named-shape identities (every (shape, colour, pattern); all seen in training, the renders are fresh).
    `looks` is the individuals' kind of look (`world.LOOKS`): whether the encoder holds for a world v3 build."""
    rng = random.Random(seed)
    seeds = rng.sample(world.HELD_OUT_INDIVIDUALS, n_individuals)
    held_out = [world.individual(s, looks=looks) for s in seeds]
    named = rng.sample(named_identities(), 100)
    quality = {"held_out_individuals": {"clean": identity_quality(enc, held_out, seed=seed)},
               "named_shapes": {"clean": identity_quality(enc, named, seed=seed)}}
    if vae is not None:
        quality["held_out_individuals"]["vae"] = identity_quality(enc, held_out, seed=seed, transform=vae)
        quality["named_shapes"]["vae"] = identity_quality(enc, named, seed=seed, transform=vae)
    return quality


# ---------------------------------------------------------------------------------------------- training

def _augment(x: torch.Tensor, gen: torch.Generator, blur_rate: float = 0.3) -> torch.Tensor:
    """Per picture: brightness and per-channel colour shifts (~±10 levels), mild blur for a share, light noise,
    a 0-2 px shift; what generated pictures differ by beyond the VAE."""
    n = len(x)
    x = x * (1 + 0.16 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)) \
        + 0.16 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)
    blurred = torch.rand(n, generator=gen) < blur_rate
    if blurred.any():
        sigma = 0.5 + 0.5 * float(torch.rand(1, generator=gen))
        g = torch.exp(-torch.arange(-1, 2, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
        kernel = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, 3, 3)
        x[blurred] = F.conv2d(F.pad(x[blurred], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = x + torch.randn(x.shape, generator=gen) * 0.03 * torch.rand(n, 1, 1, 1, generator=gen)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3)).clamp(-1, 1)


def nt_xent(z: torch.Tensor, keys: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """NT-Xent over 2B unit vectors (view a of item i at i, view b at i + B); entries of the same identity other
    than the partner (an identity drawn twice into one batch) are left out of the denominator, not pushed away."""
    b = len(z) // 2
    logits = z @ z.T / temperature
    keys2 = torch.cat([keys, keys])
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    excluded = keys2[:, None] == keys2[None, :]
    excluded[torch.arange(2 * b), partner] = False
    logits = logits.masked_fill(excluded, float("-inf"))  # also the diagonal
    return F.cross_entropy(logits, partner)


@dataclass
class _Identities:
    """Step 1 of `train`: the identities to train on, their buckets of shared main colour (`by_color`) and of shared
    main colour and texture kind (`by_kind`), as indices into `objects`, and each one's identity key as a number."""

    objects: list[world.Obj]
    by_color: dict[str, list[int]]
    by_kind: dict[tuple[str, str], list[int]]
    keys: torch.Tensor


def _training_identities(rng: random.Random, n_individuals: int) -> _Identities:
    """`n_individuals` training individuals and every named shape, bucketed (see `_Identities`)."""
    identities = [world.individual(s) for s in rng.sample(world.TRAINING_INDIVIDUALS, n_individuals)]
    identities += named_identities()
    by_color, by_kind = defaultdict(list), defaultdict(list)
    for i, obj in enumerate(identities):
        kind = world.individual_look(obj.individual).texture if obj.individual is not None else "named"
        by_color[obj.color].append(i)
        by_kind[(obj.color, kind)].append(i)
    key_index = {k: n for n, k in enumerate(dict.fromkeys(identity_key(o) for o in identities))}
    keys = torch.tensor([key_index[identity_key(o)] for o in identities])
    return _Identities(identities, by_color, by_kind, keys)


def _render_views(identities: _Identities, views: int, rng: random.Random, *, tint_rate: float,
                  pair_rate: float, t0: float) -> np.ndarray:
    """Step 2 of `train`, first part: `views` views per identity, uint8 [identities, views, H, W, 3]."""
    n = len(identities.objects)
    pool = np.stack([np.asarray(render_view(o, rng, tint_rate=tint_rate, pair_rate=pair_rate))
                     for o in identities.objects for _ in range(views)]).reshape(n, views, RESOLUTION, RESOLUTION, 3)
    print(f"rendered {pool.shape[0] * views} views in {time.time() - t0:.0f}s", flush=True)
    return pool


def _reconstruct_last_views(pool: np.ndarray, vae: Transform, rng: random.Random, vae_rate: float,
                            t0: float) -> None:
    """Step 2 of `train`, second part: replace the last view of a share `vae_rate` of the identities in `pool` by
    its reconstruction through `vae`."""
    last = pool.shape[1] - 1
    through_vae = [i for i in range(len(pool)) if rng.random() < vae_rate]
    for start in range(0, len(through_vae), 256):
        chunk = through_vae[start:start + 256]
        recon = vae([Image.fromarray(pool[i, last]) for i in chunk])
        pool[chunk, last] = np.stack([np.asarray(r) for r in recon])
    print(f"{len(through_vae)} views through the VAE, {time.time() - t0:.0f}s", flush=True)


def _group_batch(identities: _Identities, pool: torch.Tensor, rng: random.Random, gen: torch.Generator, *,
                 groups: int, group_size: int) -> tuple[list[int], torch.Tensor]:
    """One batch of step 3: `groups` groups of up to `group_size` identities that share a main colour (every other
    group: also a texture kind); returns the identities' indices and two augmented views of each, the first views
    of all of them, then the second ([-1, 1] NCHW)."""
    idx = []
    for g in range(groups):
        if g % 2 == 0:
            bucket = identities.by_color[rng.choice(list(identities.by_color))]
        else:
            bucket = identities.by_kind[rng.choice(list(identities.by_kind))]
        idx += rng.sample(bucket, min(group_size, len(bucket)))
    pairs = [rng.sample(range(pool.shape[1]), 2) for _ in idx]
    x = torch.cat([pool[idx, [p[0] for p in pairs]], pool[idx, [p[1] for p in pairs]]])
    return idx, _augment(x.permute(0, 3, 1, 2).float() / 127.5 - 1.0, gen)


def train(out_dir: Path = IDENTITY_DIR, *, n_individuals: int = 10000, views: int = 3, steps: int = 700,
          groups: int = 8, group_size: int = 16, vae_rate: float = 0.5, tint_rate: float = 0.3,
          pair_rate: float = 0.08, seed: int = 0, threads: int = 1, log_every: int = 50) -> dict:
    """Train the encoder on a pool of views, measure it on held-out individuals, write identity.* atomically."""
    from safetensors.torch import save_file

    t0, cpu0 = time.time(), time.process_time()
    torch.set_num_threads(threads)  # the CPU is shared; one thread keeps the machine usable for others
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)

    # 1. The identities: training individuals and every named shape; buckets of shared main colour (and kind).
    identities = _training_identities(rng, n_individuals)

    # 2. Render the pool: `views` views per identity; the last view of a share `vae_rate` through the demo VAE.
    pool = _render_views(identities, views, rng, tint_rate=tint_rate, pair_rate=pair_rate, t0=t0)
    vae = load_demo_vae_roundtrip()
    _reconstruct_last_views(pool, vae, rng, vae_rate, t0)
    pool_t = torch.from_numpy(pool)

    # 3. Train: batches of groups sharing a main colour (half: also a texture kind), two views each; AdamW.
    net = IdentityNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    net.train()
    for step in range(1, steps + 1):
        idx, x = _group_batch(identities, pool_t, rng, gen, groups=groups, group_size=group_size)
        loss = nt_xent(net(x), identities.keys[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0:
            print(f"step {step}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    train_seconds, train_cpu_seconds = time.time() - t0, time.process_time() - cpu0

    # 4. Measure the fp16 round trip (the shipped encoder) on held-out individuals, then save.
    state = fp16_round_trip(net)
    info = {
        "architecture": {"width": 64, "dim": 128}, "resolution": RESOLUTION, "temperature": TEMPERATURE,
        "training": {"seed": seed, "individuals": n_individuals, "named_identities": len(named_identities()),
                     "views": views, "steps": steps, "batch": f"{groups} groups x {group_size}, 2 views each",
                     "vae_rate": vae_rate, "tint_rate": tint_rate, "pair_rate": pair_rate, "threads": threads,
                     "seconds": round(train_seconds, 1), "cpu_seconds": round(train_cpu_seconds, 1),
                     "torch": torch.__version__},
    }
    enc = IdentityEncoder(net, info)
    info["quality"] = measure(enc, vae=vae)
    info["quality_measured_on"] = ("200 individuals from world.HELD_OUT_INDIVIDUALS and 100 named identities, 4 fresh "
                                   "views each (seed 4242); 'vae': queries are the demo VAE's reconstructions, "
                                   "references clean; `python -m studio.demo.identity --measure`")
    info["seconds_total"] = round(time.time() - t0, 1)  # wall time: longer than CPU time on a busy machine
    info["cpu_seconds_total"] = round(time.process_time() - cpu0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "identity.safetensors", lambda p: save_file(state, p))
    atomic_write(out_dir / "identity.json", (json.dumps(info, indent=1) + "\n").encode())
    print(json.dumps(info["quality"], indent=1), flush=True)
    return info


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train or measure the demo world's identity encoder.")
    parser.add_argument("--train", action="store_true", help="train and write assets/judge/identity.*")
    parser.add_argument("--measure", action="store_true", help="measure the saved encoder on held-out individuals")
    parser.add_argument("--out", type=Path, default=IDENTITY_DIR)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--individuals", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--looks", choices=world.LOOKS, default="fine",
                        help="--measure: the held-out individuals' kind of look (coarse: world v3's)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.train:
        train(args.out, n_individuals=args.individuals, steps=args.steps, threads=args.threads, seed=args.seed)
    elif args.measure:
        torch.set_num_threads(args.threads)
        quality = measure(IdentityEncoder.load(args.out), vae=load_demo_vae_roundtrip(), looks=args.looks)
        print(json.dumps(quality, indent=1))
    else:
        parser.error("give --train or --measure")


if __name__ == "__main__":
    main()
