"""`studio eval [--model M] [--out results.json]`: the paper's and DreamBench's scores on the demo world
(studio/evaluation/runner.py, given the demo's judge, world and identity encoder from studio/demo/evaluate.py).

    studio eval --held-out                     # the full run: 12 unseen individuals x 9 prompts x 3 pictures, ~5 min
    studio eval --concepts purple-star,/my/set # bundled sets by name, concept-set folders from anywhere
    studio eval --skip-concepts --prompts 200 --seed 3 --out base.json
    studio eval --held-out 2 --quick           # the same in miniature (tests)
    studio eval --held-out --methods ti,pivotal,lora,dreambooth   # each method trained on every set, compared
"""

from __future__ import annotations

import argparse
from pathlib import Path

from studio.evaluation.config import ENCODER_METHODS, EvalConfig  # dataclasses only: `studio --help` stays cheap
from studio.training.config import METHODS

FULL_RUN_HELD_OUT = 12  # S of the full run: see EvalConfig's docstring for its time and interval

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="score the base model and Textual Inversion (with --methods, every "
                                           "training method) on the demo world's concept sets")
    p.add_argument("--model", help="diffusers folder, .safetensors file or hub id (default: the built-in demo)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--prompts", type=int, default=EvalConfig.prompts, help="captions for base compliance")
    p.add_argument("--images", type=int, default=EvalConfig.images, help="pictures per concept prompt")
    p.add_argument("--steps", type=int, default=EvalConfig.steps, help="sampling steps")
    p.add_argument("--train-steps", type=int, help="Textual Inversion steps (default: TrainConfig's)")
    p.add_argument("--train-vectors", type=int, help="Textual Inversion vectors per word (default: TrainConfig's, 1)")
    p.add_argument("--concepts", help="comma-separated concept sets: bundled names or folders holding pictures and a "
                                      "concept.json (default: all in assets/concepts, or none with --held-out)")
    p.add_argument("--held-out", type=int, nargs="?", const=FULL_RUN_HELD_OUT, default=0, metavar="N",
                   help=f"also evaluate N individuals no model has seen (default N: {FULL_RUN_HELD_OUT}, the full "
                        "run); their sets are written under --work-dir")
    p.add_argument("--quick", action="store_true", help="a miniature run for tests: 4 captions, 1 picture per "
                                                        "prompt at 4 steps, 2 prompts of each kind, 20 training "
                                                        "steps, at most 2 held-out subjects")
    p.add_argument("--methods", type=methods_list, default=(), metavar="M,M",
                   help=f"also train each of these methods ({', '.join(METHODS + ENCODER_METHODS)}) on every "
                        "concept set and compare identity, prompt fidelity, file size and training (or encoding) time "
                        "(--train-steps applies to each); encoder and encoder+ti use --adapter")
    p.add_argument("--adapter", default=EvalConfig.adapter,
                   help='the IP-Adapter of the encoder methods: "demo" (assets/demo-encoder, the default), a file or '
                        'a hub file "owner/repo/path"')
    p.add_argument("--variants", type=variants_list, default=(), metavar="V,V",
                   help="also train the paper's variants (ti, multi3, progressive, regularized, per-image, xti; or any "
                        "method) on every concept set and compare them like --methods")
    p.add_argument("--chart", type=Path, metavar="FILE.png",
                   help="with --methods or --variants: draw reconstruction (identity) against editability (prompt "
                        "fidelity), one point per method or variant with its interval, plain words and the real "
                        "pictures as references")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-compliance", action="store_true", help="only the concept scores")
    p.add_argument("--skip-concepts", action="store_true", help="only base prompt compliance")
    p.add_argument("--work-dir", type=Path, help="keep the trained concept files here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out or --chart file")
    p.set_defaults(func=run)


def names_list(text: str, known, what: str) -> tuple[str, ...]:
    """`ti,lora` as ("ti", "lora"); an unknown name is an argparse error naming the known ones."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or repr(text)}: give a comma-separated "
                                         f"list of {', '.join(known)}")
    return names


def methods_list(text: str) -> tuple[str, ...]:
    return names_list(text, METHODS + ENCODER_METHODS, "method")


def variants_list(text: str) -> tuple[str, ...]:
    from studio.evaluation.runner import VARIANTS

    return names_list(text, VARIANTS, "variant")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """EvalConfig from the parsed command line (`--quick` shrinks it); bad counts are a clear error."""
    if args.prompts < 1 or args.images < 1 or args.held_out < 0:
        raise ValueError("--prompts and --images must be at least 1, --held-out at least 0")
    if args.chart and not (args.variants or args.methods):
        raise ValueError("--chart draws the methods or variants: give --methods or --variants too")
    if (args.methods or args.variants) and args.skip_concepts:
        raise ValueError("--methods trains on the concept sets, which --skip-concepts leaves out: drop one of them")
    names = [n.strip() for n in args.concepts.split(",") if n.strip()] if args.concepts else None
    cfg = EvalConfig(prompts=args.prompts, images=args.images, steps=args.steps, train_steps=args.train_steps,
                     train_vectors=args.train_vectors,
                     concepts=names, held_out=args.held_out, seed=args.seed, skip_compliance=args.skip_compliance,
                     skip_concepts=args.skip_concepts, adapter=args.adapter)
    return cfg.quick() if args.quick else cfg


def run(args: argparse.Namespace) -> int:
    """Run on the demo world's judge and concept sets, print the tables, write --out."""
    from diffusers.utils import logging as diffusers_logging

    from studio.demo.evaluate import DemoJudge, DemoWorld
    from studio.engine.files import check_new_output
    from studio.evaluation.report import format_table, write_json
    from studio.evaluation.runner import run_evaluation

    cfg = config_from_args(args)
    for out in (args.out, args.chart):  # checked before the run's minutes, not after
        if out is not None:
            check_new_output(out, overwrite=args.overwrite, option="--out" if out is args.out else "--chart")
    diffusers_logging.set_verbosity_error()  # one safety-checker notice per generation would bury the table
    # The model's own world (a world v3 build's looks and fullest plain words; world v2 for the built-in demo).
    results = run_evaluation(args.model, DemoJudge(), DemoWorld.for_model(args.model), cfg, args.work_dir,
                             progress=lambda m: print(m, flush=True), methods=args.methods, variants=args.variants,
                             chart=args.chart)
    print(format_table(results))
    if args.out:
        print(f"wrote {write_json(results, args.out)}")
    return 0
