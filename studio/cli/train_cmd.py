"""`studio train --images DIR --token T --init WORD [...]`: learn a concept file from a few pictures."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from studio.engine.memory import MEMORY_MODES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="learn a new word from 3-20 pictures (Textual Inversion)")
    p.add_argument("--model", help="hub id, diffusers folder or .safetensors file (default: the built-in demo)")
    p.add_argument("--images", required=True, type=Path, help="folder of PNG/JPEG/WebP pictures of the concept")
    p.add_argument("--token", required=True, help="the new word, e.g. '<my-cat>'")
    p.add_argument("--init", default="*", help="word(s) whose embeddings start the vectors, e.g. 'cat'")
    p.add_argument("--vectors", type=int, default=1, help="vectors per word (more: more detail, less editable)")
    p.add_argument("--steps", type=int, default=400, help="optimisation steps")
    p.add_argument("--lr", default="0.005", help="learning rate, or an A1111 schedule like '0.005:100, 1e-3'")
    p.add_argument("--batch", type=int, default=4, help="pictures per step")
    p.add_argument("--template", choices=["object", "style", "captions"], default="object",
                   help="prompt templates: the paper's object or style lists, or name.txt captions beside pictures")
    p.add_argument("--resolution", type=int, help="training size (default: the model's native size)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips (for text or asymmetric concepts)")
    p.add_argument("--save-every", type=int, default=0, help="also write <token>-stepN files every N steps (each one resumable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", metavar="PATH",
                   help="continue a run from a <token>-stepN.safetensors it wrote (or a folder: its newest one); "
                        "give the same options and a larger --steps")
    p.add_argument("--memory", choices=MEMORY_MODES, default="auto",
                   help="balanced: gradient checkpointing; low-vram: also attention slicing and the VAE off the GPU "
                        "once the pictures are encoded; auto: by free GPU memory (fast on CPU)")
    p.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                   help="autocast the frozen model (vectors stay fp32); auto: none on CPU, the model's dtype on GPU")
    p.add_argument("--out", type=Path, default=Path("."),
                   help="folder for the concept files, or the final file itself when it ends in .safetensors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from studio.engine.memory import preset
    from studio.engine.models import ModelManager
    from studio.training import TrainConfig, Trainer

    try:
        lr, schedule = float(args.lr), "constant"
    except ValueError:
        lr, schedule = 0.005, args.lr
    mode = preset(args.memory)  # `auto` resolves here, once, by free GPU memory
    print(f"memory mode: {mode.name}{' (auto)' if args.memory == 'auto' else ''}: {mode.explanation}")
    cfg = TrainConfig(args.token, init_text=args.init, n_vectors=args.vectors, steps=args.steps, learning_rate=lr,
                      lr_schedule=schedule, batch_size=args.batch, template=args.template,
                      resolution=args.resolution, flip=not args.no_flip, save_every=args.save_every, seed=args.seed,
                      resume=args.resume, memory=mode.name, mixed_precision=args.mixed_precision)
    model = ModelManager().load(args.model)

    def on_event(event) -> None:
        if event.kind == "step":
            bar.update(1)
            bar.set_postfix(loss=f"{event.loss:.4f}")
        elif event.kind == "started":
            bar.update(event.step)  # a resumed run starts past zero
            tqdm.write(f"started: {event.message}")
        elif event.kind in ("warning", "checkpoint", "finished", "failed", "cancelled"):
            tqdm.write(f"{event.kind}: {event.message or event.path}")

    # Out of memory ends the run with a `failed` line naming the mode to switch to (the last good vectors saved),
    # then the one-line error of `studio.cli.main`, exit code 2.
    with tqdm(total=cfg.steps, desc=f"training {cfg.token}") as bar:
        Trainer(model, cfg, args.images, args.out).run(on_event)
    return 0
