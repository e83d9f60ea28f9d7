"""`studio eval [--model M] [--out results.json]`: the paper's scores on the demo world (studio/evaluation/runner.py,
given the demo's judge and world from studio/demo/evaluate.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from studio.evaluation.config import EvalConfig  # dataclasses only: `studio --help` stays cheap


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="score the base model and Textual Inversion on the demo world's "
                                           "concept sets")
    p.add_argument("--model", help="diffusers folder, .safetensors file or hub id (default: the built-in demo)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--prompts", type=int, default=EvalConfig.prompts, help="captions for base compliance")
    p.add_argument("--images", type=int, default=EvalConfig.images, help="pictures per concept prompt")
    p.add_argument("--steps", type=int, default=EvalConfig.steps, help="sampling steps")
    p.add_argument("--train-steps", type=int, help="Textual Inversion steps (default: TrainConfig's)")
    p.add_argument("--concepts", help="comma-separated concept sets (default: all in assets/concepts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-compliance", action="store_true", help="only the concept scores")
    p.add_argument("--skip-concepts", action="store_true", help="only base prompt compliance")
    p.add_argument("--work-dir", type=Path, help="keep the trained concept files here")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """EvalConfig from the parsed command line; bad counts are a clear error."""
    if args.prompts < 1 or args.images < 1:
        raise ValueError("--prompts and --images must be at least 1")
    names = [n.strip() for n in args.concepts.split(",") if n.strip()] if args.concepts else None
    return EvalConfig(prompts=args.prompts, images=args.images, steps=args.steps, train_steps=args.train_steps,
                      concepts=names, seed=args.seed, skip_compliance=args.skip_compliance,
                      skip_concepts=args.skip_concepts)


def run(args: argparse.Namespace) -> int:
    """Run on the demo world's judge and concept sets, print the tables, write --out."""
    from diffusers.utils import logging as diffusers_logging

    from studio.demo.evaluate import DemoJudge, DemoWorld
    from studio.evaluation.report import format_table, write_json
    from studio.evaluation.runner import run_evaluation

    cfg = config_from_args(args)
    diffusers_logging.set_verbosity_error()  # one safety-checker notice per generation would bury the table
    results = run_evaluation(args.model, DemoJudge(), DemoWorld(), cfg, args.work_dir,
                             progress=lambda m: print(m, flush=True))
    print(format_table(results))
    if args.out:
        print(f"wrote {write_json(results, args.out)}")
    return 0
