"""Merges `python -m foresightkv eval` result files (each a subset of policies and budgets on the same
held-out sequences) into one table and one loss-ratio plot:

    python bench/testbed_report.py --plot OUT.png A.json B.json ...

Later files fill what earlier ones lack (a policy's number at a budget comes from the first file
that has it); the printed header names, for each file, its command and what it measured."""

import argparse
import json

from foresightkv.testbed.harness import format_table, plot


def merge(results):
    """One result dict (the harness's layout) holding every (subset, budget, policy) of ``results``."""
    out = {"interval": results[0]["interval"], "policies": [], "loss_ratio": {}, "tokens": {},
           "accuracy": {}, "accuracy_n": {}, "mass_kept": {}, "done": {"mass": 0}}
    for r in results:
        if r["interval"] != out["interval"]:
            raise SystemExit(f"interval {r['interval']} != {out['interval']}: not one table")
        for p in r["policies"]:
            if p not in out["policies"]:
                out["policies"].append(p)
        for split, bys in r["loss_ratio"].items():
            for b, byp in bys.items():
                row = out["loss_ratio"].setdefault(split, {}).setdefault(b, {})
                for p, v in byp.items():
                    row.setdefault(p, v)
                out["tokens"].setdefault(split, {}).setdefault(b, r["tokens"][split][b])
        for b, byp in r["accuracy"].items():
            for p, v in byp.items():
                n = r["accuracy_n"][b][p]
                if n and out["accuracy_n"].get(b, {}).get(p, 0) == 0:
                    out["accuracy"].setdefault(b, {})[p] = v
                    out["accuracy_n"].setdefault(b, {})[p] = n
        for b, byp in r["mass_kept"].items():
            for p, v in byp.items():
                if v is not None:
                    out["mass_kept"].setdefault(b, {}).setdefault(p, v)
        # a file written part way counts its mass sequences only at the end of its batch
        measured = any(v is not None for byp in r["mass_kept"].values() for v in byp.values())
        out["done"]["mass"] = max(out["done"]["mass"], r["done"].get("mass", 0), r["asked"]["mass"] if measured else 0)
    for split in out["loss_ratio"]:
        out["loss_ratio"][split] = dict(sorted(out["loss_ratio"][split].items(), key=lambda kv: int(kv[0])))
        out["tokens"][split] = dict(sorted(out["tokens"][split].items(), key=lambda kv: int(kv[0])))
    out["accuracy"] = dict(sorted(out["accuracy"].items(), key=lambda kv: int(kv[0])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--plot", default=None)
    a = ap.parse_args()
    results = [json.load(open(f)) for f in a.files]
    for f, r in zip(a.files, results):
        print(f"- {f}: {r.get('command', '(written part way; command in the results header)')}")
        print(f"  sequences per budget {r['sequences_per_budget']}, accuracy {r['done'].get('accuracy')}, "
              f"mass {r['done'].get('mass')}, seconds {r['seconds']}, stage seconds {r.get('stage_seconds')}")
    m = merge(results)
    print()
    print(format_table(m))
    if a.plot:
        plot(m, a.plot)


if __name__ == "__main__":
    main()
