"""The ``train`` subcommand: ``register(subparsers)`` adds it to a command line (``foresightkv``'s
``cli.py``); ``python -m foresightkv.train`` runs it alone."""

import argparse
from typing import Any, List, Optional

from .pipeline import add_arguments, main


def register(subparsers: Any) -> Any:
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
    p.set_defaults(func=main)
    return p


def run(argv: Optional[List[str]] = None) -> int:
    """``foresightkv train ARGS`` as a standalone program."""
    parser = argparse.ArgumentParser(prog="foresightkv")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)
