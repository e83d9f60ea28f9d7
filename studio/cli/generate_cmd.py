"""`studio generate --prompt P [--model M] [--concept FILE]... [--out PNG]`: text (or image) to picture."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate pictures from a prompt, with concept files")
    p.add_argument("--model", help="hub id, diffusers folder or .safetensors file (default: the built-in demo)")
    p.add_argument("--prompt", required=True, help="the prompt; write a concept's word to use it")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--concept", action="append", default=[], type=Path, help="concept file (repeatable)")
    p.add_argument("--seed", type=int, help="seed (default: random, printed)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default="euler_a")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--init-image", type=Path, help="picture to start from (img2img)")
    p.add_argument("--strength", type=float, default=0.75)
    p.add_argument("--mask", type=Path, help="white = redraw (inpainting; needs --init-image)")
    p.add_argument("--out", type=Path, default=Path("out.png"), help="output PNG (several: -1, -2 ... appended)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from studio.engine.concepts import load_concept
    from studio.engine.generate import GenerateRequest, generate, save_png
    from studio.engine.models import ModelManager

    concepts = [load_concept(path) for path in args.concept]
    model = ModelManager().load(args.model)
    req = GenerateRequest(args.prompt, args.negative, concepts, args.seed, args.steps, args.guidance, args.scheduler,
                          args.width, args.height, args.batch,
                          Image.open(args.init_image) if args.init_image else None, args.strength,
                          Image.open(args.mask) if args.mask else None)
    with tqdm(total=args.steps, desc="generating") as bar:
        result = generate(model, req, on_step=lambda step, total, _p: bar.update(1))
    for k, (image, seed) in enumerate(zip(result.images, result.seeds)):
        out = args.out if len(result.images) == 1 else args.out.with_name(f"{args.out.stem}-{k + 1}{args.out.suffix}")
        save_png(image, out)
        print(f"{out} (seed {seed})")
    return 0
