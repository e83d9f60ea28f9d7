"""`studio concepts inspect FILE [--json]`, `studio concepts convert FILE --to FORMAT OUT [--overwrite]` and
`studio concepts export FILE --format diffusers|kohya --out OUT [--overwrite]`.

`inspect` reads embeddings (kind "word"), per-layer words (kind "xti", with their layer count), Perfusion concepts
(kind "perfusion": layers, class word, gate and size) and LoRA files (kind "lora", or "word+lora" with bundled words)
alike;
`convert` writes embeddings, `export` LoRA files (with their bundled words).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from studio.engine.families import family_of
from studio.engine.files import check_new_output, write_new_files
from studio.engine.learned.image_prompt_files import is_image_concept_file
from studio.engine.learned.layer_word import XtiConcept
from studio.engine.learned.lora import LoraFile
from studio.engine.learned.lora_export import EXPORT_FORMATS, export_lora
from studio.engine.learned.lora_files import is_lora_file, load_lora
from studio.engine.learned.perfusion import PerfusionConcept
from studio.engine.learned.registry import load_concept, save_concept
from studio.engine.learned.word_files import FORMATS
from studio.errors import LoraError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `concepts` with its `inspect`, `convert` and `export` actions to the dispatcher."""
    parser = subparsers.add_parser("concepts", help="inspect and convert textual-inversion files; inspect and "
                                                    "export LoRA files")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    inspect = actions.add_parser("inspect", help="show a concept file's kind, format, token, vectors, dims and "
                                                 "metadata (for a LoRA: rank, targets, families, size)")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--token", help="trigger word to use instead of the file name")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(func=run)

    convert = actions.add_parser("convert", help="write a concept file in another form (vectors kept bit for bit)")
    convert.add_argument("file", type=Path)
    convert.add_argument("--to", required=True, choices=FORMATS, dest="format")
    convert.add_argument("out", type=Path)
    convert.add_argument("--token", help="trigger word to use instead of the file name")
    convert.add_argument("--overwrite", action="store_true", help="replace OUT (and its pair file) if it exists")
    convert.set_defaults(func=run)

    export = actions.add_parser("export", help="write a LoRA file (and its bundled words) in diffusers' or kohya's "
                                               "form")
    export.add_argument("file", type=Path)
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                        help="diffusers: save_lora_weights' file (+ <stem>_emb.safetensors for words); kohya: "
                             "lora_unet_/lora_te_ names, words bundled as A1111's bundle_emb")
    export.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    export.add_argument("--overwrite", action="store_true", help="replace OUT (and its words file) if it exists")
    export.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run `inspect`, `convert` or `export`; errors (ConceptError, LoraError) are printed as one line by the
    dispatcher."""
    if args.action == "export":
        return run_export(args)
    if args.action == "inspect" and is_image_concept_file(args.file):
        from studio.cli.encode_cmd import inspect_image_concept

        return inspect_image_concept(args.file, as_json=args.json)
    if args.action == "inspect" and is_lora_file(args.file):
        return inspect_lora(load_lora(args.file), as_json=args.json)
    if args.action == "convert":
        check_new_output(args.out, overwrite=args.overwrite, option="OUT")  # before any reading
    concept = load_concept(args.file, token=args.token)
    if args.action == "convert":
        # The writer names some files itself (a suffix added, SDXL's `_2` pair): each is checked before it lands.
        written = write_new_files(args.out, lambda path: save_concept(concept, path, format=args.format),
                                  overwrite=args.overwrite, option="OUT")
        pair = args.format == "diffusers" and "text_encoder_2" in concept.vectors
        extra = f" (+ {written.stem}_2{written.suffix})" if pair else ""
        print(f"wrote {written}{extra}: {args.format} form of {concept.token!r}, {concept.n_vectors} vector(s)")
        return 0

    per_layer = isinstance(concept, (XtiConcept, PerfusionConcept))
    perfusion = {"class_word": concept.class_word, "beta": concept.beta, "tau": concept.tau,
                 "size_bytes": Path(args.file).stat().st_size} if isinstance(concept, PerfusionConcept) else {}
    info = {
        "file": str(args.file),
        "kind": concept.kind,
        "format": concept.meta.get("source_format", ""),
        "token": concept.token,
        **({"layers": len(concept.layers), "layer_names": concept.layers} if per_layer else {}),
        **perfusion,
        "vectors": concept.n_vectors,
        "dims": concept.dims,
        "family": family_of(concept.dims)[0],
        "likely_model": family_of(concept.dims)[1],
        "dtype": str(concept.vectors["text_encoder"].dtype).removeprefix("torch."),
        "metadata": {k: v for k, v in concept.meta.items() if k not in ("source_path", "source_format")},
    }
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    dims = " + ".join(f"{key} {dim}" for key, dim in concept.dims.items())
    print(f"file:    {info['file']}")
    print(f"kind:    {info['kind']}")
    print(f"format:  {info['format']}")
    print(f"token:   {concept.token}")
    per_layer_note = f" per layer, {info['layers']} cross-attention layers" if per_layer else ""
    print(f"vectors: {concept.n_vectors} x ({dims}), {info['dtype']}{per_layer_note}")
    print(f"family:  {info['likely_model']}")
    for key, value in sorted(info["metadata"].items()):
        print(f"  {key}: {value}")
    return 0


def inspect_lora(lora: LoraFile, as_json: bool) -> int:
    """Print what a LoRA file holds: kind, format, rank, targets, families, size and any bundled words."""
    info = {
        "file": str(lora.path),
        "kind": lora.kind,
        "format": lora.source_format,
        "rank": lora.rank,
        "ranks": list(lora.ranks),
        "targets": lora.targets,
        "families": list(lora.families),
        "size_bytes": lora.size_bytes,
        "words": [{"token": w.token, "vectors": w.n_vectors, "dims": w.dims} for w in lora.words],
    }
    if as_json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    print(f"file:     {info['file']}")
    print(f"kind:     {lora.kind}")
    print(f"format:   {lora.source_format}")
    print(f"rank:     {' / '.join(map(str, lora.ranks))}")
    for part, counts in lora.targets.items():
        print(f"targets:  {part}: {counts['attention']} attention, {counts['other']} other layer(s)")
    print(f"families: {', '.join(lora.families) or 'unknown'}")
    print(f"size:     {lora.size_bytes} bytes")
    for word in info["words"]:
        dims = " + ".join(f"{key} {dim}" for key, dim in word["dims"].items())
        print(f"word:     {word['token']}: {word['vectors']} vector(s) x ({dims})")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Write a LoRA file in another form, inside the folder of `--out`."""
    check_new_output(args.out, overwrite=args.overwrite)  # a folder is never replaced by a file, even so
    if args.file.is_file() and not is_lora_file(args.file):
        raise LoraError(f"{args.file.name}: not a LoRA file (no LoRA weights); `export` writes LoRA files, "
                        "`studio concepts convert FILE --to FORMAT OUT` writes embeddings")
    lora = load_lora(args.file)
    written = export_lora(lora, args.out.parent, args.out.name, args.format, overwrite=args.overwrite)
    extra = f" (+ words {written.words_path.name})" if written.words_path else ""
    words = ", ".join(w.token for w in lora.words) or "none"
    print(f"wrote {written.path}{extra}: {args.format} form of {lora.path.name}, rank {lora.rank}, words: {words}")
    return 0
