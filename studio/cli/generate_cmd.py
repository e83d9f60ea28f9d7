"""`studio generate --prompt P [--model M] [--concept FILE[:WEIGHT]]... [--memory MODE] [--out PNG]`:
text (or image) to picture.

A `--concept` file is a word (an embedding) or a LoRA (with any words it bundles); a LoRA is applied with its weight
(default 1.0; 0 gives the picture without it), and a `<lora:stem:w>` tag in the prompt names it by its stem and sets
its weight, as in A1111. `--lora FILE[:WEIGHT]` is the same as `--concept` for a LoRA file. A pivotal concept (`studio
train --method pivotal`) is one thing: its LoRA file, or the `<stem>_emb.safetensors` words file beside it, gives the
word and the LoRA learned with it, so `--prompt "<w> on a black background"` needs no tag."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from studio.engine.memory import MEMORY_MODES
from studio.errors import LoraError, UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate pictures from a prompt, with concept files")
    p.add_argument("--model", help="hub id, diffusers folder or .safetensors file (default: the built-in demo)")
    p.add_argument("--prompt", required=True, help="the prompt; write a concept's word to use it")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--concept", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="concept file: a word, or a LoRA with its weight (default 1.0) (repeatable)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="LoRA file, weight default 1.0 (repeatable); <lora:stem:w> in --prompt sets its weight")
    p.add_argument("--perfusion-beta", type=float, metavar="BETA",
                   help="Perfusion concepts' gate threshold: 0.6-0.75 locks a concept locally, 0.4-0.6 globally "
                        "(default: each file's, 0.7)")
    p.add_argument("--perfusion-tau", type=float, metavar="TAU", help="Perfusion concepts' gate softness (0.15)")
    p.add_argument("--seed", type=int, help="seed, 0 to 2**63 - 1 (default or -1: random, printed)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float,
                   help="guidance scale (default: the model's: Flux 3.5, its distilled guidance; SD3 7.0; else 7.5)")
    p.add_argument("--scheduler", default="euler_a", help="sampler (SD3 and Flux keep their flow-matching one)")
    p.add_argument("--width", type=int, help="a multiple of 8 within the model's sizes (studio.engine.pictures."
                                            "side_limits); default: the model's size, or --init-image's working size")
    p.add_argument("--height", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--init-image", type=Path, help="picture to start from (img2img)")
    p.add_argument("--strength", type=float, default=0.75)
    p.add_argument("--mask", type=Path, help="white = redraw (inpainting; needs --init-image)")
    p.add_argument("--memory", default="fast", choices=MEMORY_MODES,
                   help="memory mode (studio.engine.memory): fast (default), balanced, low-vram, or auto (by free "
                        "GPU memory)")
    add_weight_options(p)
    p.add_argument("--out", type=Path, default=Path("out.png"), help="output PNG (several: -1, -2 ... appended); "
                                                                     "an existing one is kept unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace existing output PNGs")
    p.set_defaults(func=run)


def add_weight_options(p: argparse.ArgumentParser) -> None:
    """`--dtype` and `--quantize`: how the base model's weights are held, and `--model-config`: the configs (and the
    missing parts' weights) of a single-file model (`studio.engine.models.LoadOptions`)."""
    from studio.engine.models import DTYPE_NAMES, QUANTIZE

    p.add_argument("--dtype", choices=DTYPE_NAMES,
                   help="base weights' precision (default: fp32 on CPU; on a GPU fp16, SD3/Flux on CUDA bf16)")
    p.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="SD3/Flux on CUDA: their transformer and T5 in 8 or 4 bits (bitsandbytes: pip install -e "
                        "'.[quantize]')")
    p.add_argument("--model-config", help="for a single-file --model: a local diffusers folder (or hub id) of the same "
                   "architecture whose configs describe the checkpoint; for an SD3 file, also the weights of the "
                   "parts it lacks (sd3_medium.safetensors: its text encoders)")


def run(args: argparse.Namespace) -> int:
    from studio.engine.files import check_new_output
    from studio.engine.generate import GenerateRequest, check_seed, check_size, generate, save_png
    from studio.engine.memory import apply_preset, memory_settings, preset
    from studio.engine.learned.perfusion import with_gate
    from studio.engine.models import ModelManager
    from studio.engine.pictures import open_picture

    # 1. What can be checked without a model, before one is loaded: sizes no model draws at, seeds, the pictures,
    #    outputs that would replace a file.
    check_size(args.width, args.height)
    check_seed(args.seed, args.batch)
    init_image = open_picture(args.init_image, what=f"--init-image {args.init_image}") if args.init_image else None
    mask = open_picture(args.mask, what=f"--mask {args.mask}") if args.mask else None
    concepts, loras = concept_uses(args.prompt, args.concept, args.lora)
    concepts = with_gate(concepts, args.perfusion_beta, args.perfusion_tau)
    for out in out_paths(args.out, args.batch):
        check_new_output(out, overwrite=args.overwrite)
    # 2. The model.
    mode = preset(args.memory)  # `auto` resolves to one of the named modes here, once
    options = replace(apply_preset(mode.name), dtype=args.dtype, quantize=args.quantize, config=args.model_config)
    model = ModelManager(options).load(args.model)
    print(f"memory mode: {mode.name}{' (auto)' if args.memory == 'auto' else ''}: {mode.explain(model.device)}")
    settings = memory_settings(model.pipe)
    print("memory settings on", model.device.type + ":", ", ".join(f"{k.replace('_', ' ')} {'on' if v else 'off'}"
                                                                    for k, v in settings.items()))
    # 3. Generate: the request is checked against this model (its sizes) before any memory is taken.
    req = GenerateRequest(args.prompt, args.negative, [*concepts, *loras], seed=args.seed, steps=args.steps,
                          guidance=args.guidance, scheduler=args.scheduler, width=args.width, height=args.height,
                          batch=args.batch, init_image=init_image, strength=args.strength, mask=mask, preview_every=0)
    with tqdm(total=args.steps, desc="generating") as bar:  # generate() itself turns an OOM into advice
        def on_step(step: int, total: int, _preview) -> None:
            bar.total = total  # img2img/inpaint run only `strength` of the steps
            bar.update(1)

        result = generate(model, req, on_step=on_step)
    for out, image, seed in zip(out_paths(args.out, len(result.images)), result.images, result.seeds):
        save_png(image, out)
        print(f"{out} (seed {seed})")
    return 0


def out_paths(out: Path, count: int) -> list[Path]:
    """Where `count` pictures go: `out` itself for one, else `out` with -1, -2 ... appended to its stem."""
    return [out] if count == 1 else [out.with_name(f"{out.stem}-{k + 1}{out.suffix}") for k in range(count)]


def _file_and_weight(spec: str, flag: str) -> tuple[Path, float | None]:
    """`FILE` or `FILE:WEIGHT` (None: no weight written); a path that exists as written wins over the split."""
    path = Path(spec)
    head, colon, tail = spec.rpartition(":")
    if not colon or not head or path.exists():
        return path, None
    try:
        return Path(head), float(tail)
    except ValueError:
        raise UserError(f"{flag} {spec}: {tail!r} is not a weight; write {flag} FILE or {flag} FILE:0.8") from None


def concept_uses(prompt: str, concept_specs: list[str], lora_specs: list[str]) -> tuple[list, list]:
    """The words and the (LoraFile, weight) pairs that `--concept` and `--lora` name; a `<lora:stem:w>` tag in
    `prompt` must name one of the LoRAs (the engine, `studio.engine.learned.plan.plan_request`, gives the tag's weight to
    that file).

    A tag naming no LoRA, a weight that is not a number or is given to a word, or a `--lora` file that is not a LoRA
    is a `UserError`."""
    from studio.engine.containers import failing_closed
    from studio.engine.learned.image_prompt_files import is_image_concept_file, read_image_concept
    from studio.engine.learned.lora_files import is_lora_file, load_lora
    from studio.engine.learned.registry import load_concept
    from studio.engine.prompts import split_lora_tags

    words, loras = [], {}
    for flag, specs in (("--concept", concept_specs), ("--lora", lora_specs)):
        for spec in specs:
            with failing_closed(spec, UserError, f"{flag} file"):  # whatever reading a file raises: one line
                path, weight = _file_and_weight(spec, flag)
                path = _pivotal_lora_beside(path) or path  # a pivotal pair's words file stands for the pair
                if flag == "--concept" and is_image_concept_file(path):  # a word in the prompt, with a weight
                    image = read_image_concept(path)
                    words.append(image if weight is None else (image, weight))
                    continue
                if flag == "--concept" and not is_lora_file(path):
                    word = load_concept(path)
                    if weight not in (None, 1.0) and word.kind != "perfusion":
                        raise UserError(f"--concept {spec}: {path.name} is a word, and a weight applies to a LoRA "
                                        "or a Perfusion concept only; leave the weight out")
                    words.append(word if weight is None else (word, weight))
                    continue
                lora = load_lora(path)
            if lora.name in loras:
                raise LoraError(f"{flag} {spec}: a second file named {lora.name!r}; <lora:{lora.name}> would be "
                                "ambiguous")
            loras[lora.name] = (lora, 1.0 if weight is None else weight)
    for name, _weight in split_lora_tags(prompt)[1]:
        if name not in loras:
            raise LoraError(f"<lora:{name}> in --prompt names no LoRA file; add --concept {name}.safetensors")
    return words, list(loras.values())


def _pivotal_lora_beside(words_file: Path) -> Path | None:
    """`x.safetensors` when `words_file` is `x_emb.safetensors`, the words file of the diffusers pivotal pair x
    (`studio.engine.learned.lora_files.pivotal_embeddings`): its word was learned with that LoRA and comes with it; else None."""
    from studio.engine.learned.lora_files import is_lora_file, pivotal_embeddings

    if not words_file.stem.endswith("_emb"):
        return None
    lora_path = words_file.with_name(words_file.stem.removesuffix("_emb") + words_file.suffix)
    return lora_path if is_lora_file(lora_path) and pivotal_embeddings(lora_path) == words_file else None
