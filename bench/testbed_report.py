"""Merges and pools `python -m foresightkv eval` result files into one table and one loss-ratio plot:

    python bench/testbed_report.py --plot OUT.png A.json B.json ... [--part C.json D.json ...]

The files of one part measured the SAME held-out sequences (each a subset of the policies and
budgets; a cell comes from the first file that has it: `harness.merge_results`); the parts cover
DISJOINT sequences and are pooled (cross-entropy sums, accuracy counts: `harness.pool_results`), so a
long evaluation can run as several `eval --start` ranges. The printed header names, for each file,
its command, what it measured and its sequences.

    python bench/testbed_report.py --accuracy-min-tokens N --rows A.json B.json ...

prints the task accuracy recomputed from the per-sequence rows of the `--rows` files (and of any files
pooled in the same call; overlapping files allowed: each sequence, budget and policy counted once),
over the held-out traces of at least N tokens (`harness.accuracy_from_rows`)."""

import argparse
import json

from foresightkv.testbed.harness import (
    accuracy_from_rows,
    format_table,
    heldout_indices,
    merge_results,
    plot,
    pool_results,
)


def _ranges(idx):
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out, run = [], []
    for i in idx:
        if run and i != run[-1] + 1:
            out.append(run)
            run = []
        run.append(i)
    if run:
        out.append(run)
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in out) or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", help="result files of the first part")
    ap.add_argument("--part", nargs="+", action="append", default=[], help="result files of one more part")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--accuracy-min-tokens", type=int, default=None, help="also: accuracy over traces of >= N tokens")
    ap.add_argument("--rows", nargs="+", default=[], help="more result files for --accuracy-min-tokens only")
    a = ap.parse_args()
    parts, every = [], []
    for files in ([a.files] if a.files else []) + a.part:
        results = [json.load(open(f)) for f in files]
        for f, r in zip(files, results):
            print(f"- {f}: {r.get('command', '(written part way; command in the results header)')}")
            print(f"  held-out sequences {_ranges(heldout_indices(r))}; per budget {r['sequences_per_budget']}, "
                  f"accuracy {r['done'].get('accuracy')}, mass {r['done'].get('mass')}, seconds {r['seconds']}, "
                  f"stage seconds {r.get('stage_seconds')}")
        parts.append(merge_results(results))
        every += results
    if parts:
        m = parts[0] if len(parts) == 1 else pool_results(parts)
        print()
        print(f"held-out sequences: {len(m['heldout_indices'])} ({_ranges(m['heldout_indices'])})")
        print(format_table(m))
        if a.plot:
            plot(m, a.plot)
    if a.accuracy_min_tokens is not None:
        rows = [json.load(open(f)) for f in a.rows]
        for f, r in zip(a.rows, rows):
            print(f"- {f}: {r.get('command', '(written part way)')}")
        every += rows
        acc = accuracy_from_rows(every, a.accuracy_min_tokens)
        print(f"task accuracy over the held-out traces of >= {a.accuracy_min_tokens} tokens, from the per-sequence rows of "
              f"every file: {len(acc['sequences'])} traces ({_ranges(acc['sequences'])}); {acc['conflicts']} later rows "
              "disagreed with the first")
        table = {"policies": acc["policies"], "loss_ratio": {}, "tokens": {}, "accuracy": acc["accuracy"],
                 "accuracy_n": acc["accuracy_n"], "done": {}, "mass_kept": {}, "interval": None}
        print(format_table(table))


if __name__ == "__main__":
    main()
