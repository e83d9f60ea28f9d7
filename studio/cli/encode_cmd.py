"""`studio encode --images DIR --token T --out FILE.safetensors [--model M] [--adapter A] [--image-encoder DIR]`:
a concept from pictures in one pass of an image encoder, no training (an IP-Adapter image concept).

    python -m studio encode --images pics/ --token "<my-toy>" --out my-toy.safetensors
    python -m studio generate --prompt "<my-toy> on a black background" --concept my-toy.safetensors --out toy.png

`--adapter` is an IP-Adapter file in diffusers' layout (h94/IP-Adapter's `models/ip-adapter_sd15.safetensors`, a
local path or a hub file "owner/repo/path"), its CLIP vision model the `image_encoder` folder beside it unless
`--image-encoder` names one; the default, "demo", is the demo model's own (assets/demo-encoder). `--class-word`
is what stands in the prompt where the word is written (e.g. "toy"); by default the word is taken out.
An existing `--out` stops the command before any work unless `--overwrite`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from studio.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("encode", help="make an image concept from pictures in a second (IP-Adapter, no "
                                             "training)")
    p.add_argument("--images", required=True, help="folder with 1-16 pictures of the concept")
    p.add_argument("--token", required=True, help='the word that names it in prompts, e.g. "<my-toy>"')
    p.add_argument("--out", required=True, help="the image concept file to write (.safetensors)")
    p.add_argument("--model", help="hub id, diffusers folder or .safetensors file (default: the built-in demo)")
    p.add_argument("--adapter", default="demo",
                   help='IP-Adapter file (diffusers layout), a hub file "owner/repo/path", or "demo" (default)')
    p.add_argument("--image-encoder", help="the adapter's CLIP vision model folder (default: image_encoder beside "
                                           "the adapter)")
    p.add_argument("--class-word", default="", help="what stands where the word is written in a prompt (default: "
                                                    "nothing)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from studio.engine.files import check_new_output
    from studio.engine.learned.image_encoding import encode_pictures
    from studio.engine.learned.image_prompt_files import save_image_concept
    from studio.engine.learned.ip_adapter import adapter_file_shapes, image_encoder_folder, resolve_adapter
    from studio.engine.learned.ip_adapter_fit import check_before_loading
    from studio.engine.models import DEMO_MODEL_DIR, ModelManager
    from studio.engine.names import WordError, check_word
    from studio.engine.pictures import open_picture
    from studio.training.data import IMAGE_SUFFIXES

    # 1. What can be checked without a model: the word, the output, the pictures, the adapter's files and
    #    that they fit the model's (from its files: unet/config.json, model_index.json).
    try:
        check_word(args.token, "--token")
    except WordError as exc:
        raise UserError(str(exc)) from None
    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise UserError(f"--out {out}: an image concept is a .safetensors file; give a name that ends in .safetensors")
    check_new_output(out, overwrite=args.overwrite)
    folder = Path(args.images)
    if not folder.is_dir():
        raise UserError(f"--images {folder} is not a folder: give the folder that holds the concept's pictures")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--images {folder} holds no pictures ({', '.join(sorted(IMAGE_SUFFIXES))}); add 1-16 "
                        "pictures of the concept")
    pictures = [open_picture(path) for path in files]
    adapter = resolve_adapter(args.adapter, who="--adapter")
    check_before_loading(adapter_file_shapes(adapter), image_encoder_folder(adapter, args.image_encoder),
                         args.model or str(DEMO_MODEL_DIR), f"--adapter {adapter.name}")
    # 2. The model, then one pass of the image encoder.
    model = ModelManager().load(args.model)
    started = time.perf_counter()
    concept = encode_pictures(model, pictures, args.token, args.adapter, image_encoder=args.image_encoder,
                              prompt_text=args.class_word)
    seconds = time.perf_counter() - started
    written = save_image_concept(concept, out)
    print(f"wrote {written}: image concept {concept.token!r} from {len(pictures)} picture(s) in {seconds:.2f} s "
          f"({'Plus' if concept.plus else 'plain'} IP-Adapter {concept.adapter})")
    return 0


def inspect_image_concept(path: str | Path, as_json: bool) -> int:
    """Print what an image concept file holds (`studio concepts inspect`): kind, token, pictures, embeddings, the
    adapter it needs and the model it was encoded for."""
    from studio.engine.learned.image_prompt_files import read_image_concept

    concept = read_image_concept(path)
    info = {"file": str(path), "kind": concept.kind, "token": concept.token, "pictures": concept.pictures,
            "embeddings": list(concept.embeds.shape), "adapter": concept.adapter,
            "adapter_kind": "plus" if concept.plus else "plain", "encoder_dims": concept.encoder_dims,
            "prompt_text": concept.prompt_text, "size_bytes": Path(path).stat().st_size, "metadata": concept.meta}
    if as_json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    for key in ("file", "kind", "token", "pictures", "embeddings", "adapter", "adapter_kind", "prompt_text"):
        print(f"{key + ':':14}{info[key]}")
    for key, value in sorted(concept.meta.items()):
        print(f"  {key}: {value}")
    return 0
