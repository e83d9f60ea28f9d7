"""The demo world's captions beside a demo model (`<folder>/captions.txt`): the caption set Perfusion measures the
model's text encodings on (`studio.training.captions.captions_for` finds the file there).

    python -m studio.demo.captions [FOLDER]     # default: assets/demo-model

The captions are drawn as the build draws its training captions (`studio.demo.build.render_data`: the same toy share
and world options, read from the folder's training_log.json) from a seed of their own, without rendering pictures.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from studio.demo import world
from studio.demo.build import TOY_RATE, UNNAMED_RATE
from studio.engine.files import atomic_write

DEMO_MODEL = Path(__file__).resolve().parents[2] / "assets" / "demo-model"
CAPTIONS = 2000  # ~75,000 token encodings: a stable covariance of the demo's 128-wide encoder
SEED = 7919  # not the build's seed stream


def world_captions(n: int, seed: int, toy_rate: float, options: world.WorldOptions = world.WORLD_V2) -> list[str]:
    """`n` captions of training scenes of the world `options` describes, deterministic for `seed`."""
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        scene = world.sample_scene(rng, training=True, unnamed_rate=UNNAMED_RATE, toy_rate=toy_rate,
                                   looks=options.looks)
        captions.append(world.caption(scene, rng, options))
    return captions


def captions_of(folder: Path) -> list[str]:
    """The captions of the world the demo model in `folder` was built in (its training_log.json)."""
    log_path = Path(folder) / "training_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    saved = log.get("world_options")
    options = world.WorldOptions(**saved) if saved else world.WORLD_V2
    return world_captions(CAPTIONS, SEED, float(log.get("toy_rate", TOY_RATE)), options)


def write_captions(folder: Path) -> Path:
    """Write `<folder>/captions.txt` (one caption a line); returns its path."""
    path = Path(folder) / "captions.txt"
    atomic_write(path, ("\n".join(captions_of(folder)) + "\n").encode())
    return path


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    print(write_captions(Path(args[0]) if args else DEMO_MODEL))


if __name__ == "__main__":
    main()
