"""`studio eval [--model M] [--out results.json]`: the paper's scores on the demo world (studio/demo/evaluate.py)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from studio.demo.evaluate import add_arguments

    p = subparsers.add_parser("eval", help="score the base model and Textual Inversion on the demo world's concept sets")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from studio.demo.evaluate import run_from_args

    run_from_args(args)
    return 0
