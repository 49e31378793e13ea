"""The Python command line, ``python -m foresightkv <command>``:

- ``traces``: builds a trace set (held-out, train and natural-text splits) with a model;
- ``eval``: the quality harness (loss ratio, accuracy, attention mass) of every policy and budget;
- ``train``: a ForesightKV scorer from traces (``foresightkv.train``).

Each command is ``add_<name>(subparsers)`` (its arguments) plus ``cmd_<name>(args)`` (its work);
other modules add commands the same way through ``COMMANDS``."""

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple


def _model_command(sub, name: str, help: str):
    """The parser of a command that loads a model (``load_model``), with its ``--model`` and ``--threads``."""
    p = sub.add_parser(name, help=help)
    p.add_argument(
        "--model",
        default=None,
        help="HF model directory (default: $FORESIGHTKV_MODEL or the setup cache)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None, help="torch device of the model and its paged caches (cpu, cuda; default cpu)")
    return p


def add_traces(sub) -> None:
    """Arguments of ``traces``."""
    p = _model_command(sub, "traces", "build a trace set: the model's own full-cache answers to seeded long prompts")
    p.add_argument(
        "--out",
        required=True,
        help="output directory (one <split>.safetensors per split)",
    )
    p.add_argument(
        "--heldout",
        type=int,
        default=50,
        help="held-out task sequences (seeds 1000000 + i)",
    )
    p.add_argument(
        "--train", type=int, default=0, help="train task sequences (seeds 0 + i)"
    )
    p.add_argument(
        "--text",
        type=int,
        default=0,
        help="natural-text windows (teacher-forced evaluation)",
    )
    p.add_argument("--tokens", type=int, default=1536, help="prompt length in tokens")
    p.add_argument(
        "--tasks",
        default="needle",
        help="comma-separated task names (kv_retrieval, needle, var_track; default: the one the 135M model solves)",
    )
    p.add_argument("--max-new", type=int, default=12, help="answer tokens at most")


def cmd_traces(args) -> int:
    """Builds and writes the splits; prints the full-cache accuracy of each."""
    from .testbed.model import default_model_dir, load_model
    from .testbed.traces import write_traces

    model_dir = args.model or default_model_dir()
    model, tok = load_model(model_dir, threads=args.threads, device=args.device)
    t0 = time.time()
    acc = write_traces(
        model,
        tok,
        model_dir,
        args.out,
        train=args.train,
        heldout=args.heldout,
        text=args.text,
        tokens=args.tokens,
        tasks=[t for t in args.tasks.split(",") if t],
        max_new=args.max_new,
    )
    for split, a in acc.items():
        print(
            f"{split}: written to {os.path.join(args.out, split + '.safetensors')}"
            + ("" if a is None else f", full-cache accuracy {a:.3f}")
        )
    print(f"took {time.time() - t0:.0f} s")
    return 0


def add_eval(sub) -> None:
    """Arguments of ``eval``."""
    p = _model_command(sub, "eval", "loss ratio, accuracy and attention mass of every policy at every budget")
    p.add_argument(
        "--traces",
        required=True,
        help="trace directory (reads heldout.safetensors, text.safetensors)",
    )
    p.add_argument(
        "--policies",
        default="golden,h2o,snapkv,tova,rkv,streaming,random",
        help="comma-separated (full is always the reference); add foresight with --scorer",
    )
    p.add_argument("--budgets", default="128,256,512", help="comma-separated budgets B")
    p.add_argument("--interval", type=int, default=32, help="eviction interval L")
    p.add_argument(
        "--limit", type=int, default=None, help="held-out sequences for the loss ratio"
    )
    p.add_argument("--start", type=int, default=0, help="first held-out sequence index (earlier ones skipped)")
    p.add_argument(
        "--min-tokens", type=int, default=0, help="skip held-out sequences shorter than this many tokens"
    )
    p.add_argument(
        "--accuracy-limit",
        type=int,
        default=None,
        help="held-out sequences for accuracy",
    )
    p.add_argument(
        "--mass-limit",
        type=int,
        default=2,
        help="held-out sequences for the attention mass",
    )
    p.add_argument(
        "--text-limit",
        type=int,
        default=0,
        help="natural-text windows for the loss ratio",
    )
    p.add_argument(
        "--scorer",
        default=None,
        help="ForesightKV scorer checkpoint directory (adds policy foresight)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new", type=int, default=12)
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="stop starting new sequences after this long",
    )
    p.add_argument("--json", default=None, help="write the raw result here")
    p.add_argument("--plot", default=None, help="write the loss-ratio PNG here")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few short sequences, one budget (the test command)",
    )
    p.add_argument("--no-loss", action="store_true", help="accuracy only (no loss ratio, no attention mass)")
    p.add_argument("--batch", type=int, default=4, help="held-out sequences evaluated in one packed forward")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="model weights and KV cache dtype (bfloat16: ~2x faster on CPUs with AMX/AVX512-BF16)",
    )
    p.add_argument("--follow", action="store_true", help="keep evaluating what a running `traces` adds (until --minutes)")


def cmd_eval(args) -> int:
    """Runs the harness and prints the tables (and writes JSON / PNG when asked)."""
    from .testbed.harness import format_table, plot, run_eval
    from .testbed.model import default_model_dir, load_model
    from .testbed.traces import load_split

    import torch

    model_dir = args.model or default_model_dir()
    model, tok = load_model(model_dir, threads=args.threads, dtype=getattr(torch, args.dtype), device=args.device)
    held = load_split(os.path.join(args.traces, "heldout.safetensors"))
    text_path = os.path.join(args.traces, "text.safetensors")
    text = (
        load_split(text_path) if os.path.isfile(text_path) and args.text_limit else None
    )
    policies = [p for p in args.policies.split(",") if p]
    if args.scorer and "foresight" not in policies:
        policies.append("foresight")
    budgets = [int(b) for b in args.budgets.split(",") if b]
    limit, acc_limit, mass_limit = args.limit, args.accuracy_limit, args.mass_limit
    if args.quick:
        budgets = budgets[:1]
        limit = min(limit or 2, 2)
        acc_limit = min(acc_limit if acc_limit is not None else 2, 2)
        mass_limit = min(mass_limit, 1)
    deadline = time.time() + 60 * args.minutes if args.minutes else None
    res = run_eval(
        model,
        tok,
        held,
        policies=policies,
        budgets=budgets,
        interval=args.interval,
        limit=limit,
        accuracy_limit=acc_limit,
        mass_limit=mass_limit,
        scorer=args.scorer,
        seed=args.seed,
        max_new=args.max_new,
        deadline=deadline,
        text=text,
        text_limit=args.text_limit,
        with_loss=not args.no_loss,
        batch=args.batch,
        start=args.start,
        min_tokens=args.min_tokens,
        on_sequence=(lambda r: _write_json(args.json, r)) if args.json else None,
        follow=(lambda: load_split(os.path.join(args.traces, "heldout.safetensors"))) if args.follow else None,
    )
    res["command"] = "python -m foresightkv " + " ".join(sys.argv[1:])
    res["model"] = model_dir
    res["traces"] = args.traces
    res["full_cache_trace_accuracy"] = held.accuracy()
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(format_table(res))
    print(f"done: {res['done']} of asked {res['asked']} in {res['seconds']} s")
    if args.json:
        _write_json(args.json, res)
    if args.plot:
        plot(res, args.plot)
    return 0


def _write_json(path: str, res) -> None:
    """Writes ``res`` to ``path`` atomically (directories created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".partial", "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".partial", path)


def add_train(sub) -> None:
    """Arguments of ``train`` (``foresightkv.train.cli``)."""
    from .train.cli import add_train as add

    add(sub)


def cmd_train(args) -> int:
    """Traces -> Golden labels -> supervised -> GRPO -> scorer checkpoint -> eval (``foresightkv.train``)."""
    from .train.cli import cmd_train as run

    return run(args)


#: Subcommands: name -> (add arguments, run). Other modules append theirs (e.g. ``train``).
COMMANDS: Dict[str, Tuple[Callable, Callable]] = {
    "traces": (add_traces, cmd_traces),
    "eval": (add_eval, cmd_eval),
    "train": (add_train, cmd_train),
}


def main(argv: Optional[List[str]] = None) -> int:
    """Parses ``argv`` (default ``sys.argv[1:]``) and runs the subcommand; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m foresightkv", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    from .errors import Error

    try:
        return COMMANDS[args.command][1](args)
    except Error as e:
        # Bad input (files, configs, shapes, sizes): the typed error and its message, not a traceback.
        print(f"foresightkv {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
