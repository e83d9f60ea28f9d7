"""`studio` / `python -m studio`: one command with a sub-command per engine task.

Each sub-command lives in its own module exposing `register(subparsers)`, which adds its parser and sets
`func=run`; `run(args) -> int` returns the exit code. User errors (`studio.errors.UserError`: every engine error
whose message says what to do, such as `ConceptError`/`ModelError`) are printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from studio.errors import UserError

# Sub-command modules, in the order `--help` lists them. A module that is missing is skipped, so a partial install
# (or a part still being built) does not break the others.
SUBCOMMANDS = ("concepts", "generate", "train", "encode", "eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description="Concept Studio: Textual Inversion from the command line.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"studio.cli.{name}_cmd")
        except ModuleNotFoundError as exc:
            if exc.name == f"studio.cli.{name}_cmd":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("studio: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors only; anything else keeps its traceback
        if _is_user_error(exc):
            print(f"studio {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


def _is_user_error(exc: BaseException) -> bool:
    """Printed as one line, exit code 2: a UserError, a path that is not there, or a plain ValueError (the checks of
    the request dataclasses, such as TrainConfig's, that raise no UserError of their own)."""
    return isinstance(exc, (UserError, FileNotFoundError, ValueError))
