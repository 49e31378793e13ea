"""The ``train`` subcommand: ``add_train(subparsers)`` (its arguments) and ``cmd_train(args)`` (its
work), the pair ``foresightkv.cli.COMMANDS`` holds; ``register(subparsers)`` for any other
``argparse`` command line; ``python -m foresightkv.train`` runs it alone."""

import argparse
from typing import Any, List, Optional

from .pipeline import add_arguments, main


def add_train(subparsers: Any) -> Any:
    """Adds ``train`` to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "train",
        help="train a ForesightKV scorer: traces -> Golden labels -> supervised -> GRPO -> checkpoint -> eval",
        description=(
            "Train a ForesightKV scorer for MODEL and write it to OUT (config.json + scorer.safetensors). "
            "Stages are cached in the work directory; a rerun skips the finished ones."
        ),
    )
    add_arguments(p)
    return p


def cmd_train(args: Any) -> int:
    """Runs the pipeline; returns the exit status."""
    return main(args)


def register(subparsers: Any) -> Any:
    """``add_train`` with ``func`` set to ``cmd_train`` (for command lines that dispatch on it)."""
    p = add_train(subparsers)
    p.set_defaults(func=cmd_train)
    return p


def run(argv: Optional[List[str]] = None) -> int:
    """``foresightkv train ARGS`` as a standalone program."""
    parser = argparse.ArgumentParser(prog="foresightkv")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)
