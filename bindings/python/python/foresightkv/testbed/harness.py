"""The quality harness: every policy at every budget on held-out traces, with the paper's metrics.

- Loss ratio (the paper's Table 2): mean cross-entropy under the simulator / mean cross-entropy of
  the full cache (the simulator's own full-cache run), pooled over the evaluated tokens of all
  sequences. Evaluated tokens: every token predicted from position ``budget`` on (``all``); the 20%
  of those with the lowest full-cache entropy (``low_entropy``); the model's answer tokens
  (``answer``).
- Task accuracy under the budget: generation with eviction through the serving step
  (``generate``), the whole prompt prefilled then compressed, graded exactly.
- Attention mass kept for future queries: the core's fidelity replay (``foresightkv.simulate``,
  Golden: ``golden_eviction``) on the sequence's recorded full-cache attention.

``run_eval`` returns a JSON-able dict; ``format_table`` and ``plot`` render it."""

import math
import platform
import time
from collections.abc import Sequence
from typing import Any, Dict, List, Optional, Tuple

import torch

from .._native import Policy, ScorerCheckpoint
from .._native import simulate as core_simulate
from .generate import GenSpec, generate_many, prefill
from .simulate import GoldenRun, SimRun, record_full_many, simulate_many
from .tasks import grade
from .traces import TraceSet, stop_token_ids

#: Default policy order of the tables.
DEFAULT_POLICIES = ("golden", "h2o", "snapkv", "tova", "rkv", "streaming", "random")

#: Fraction of evaluated tokens in the low-entropy subset.
LOW_ENTROPY_FRACTION = 0.2


def _core_policy(name: str, scorer: Any, seed: int) -> Optional[Policy]:
    """The core ``Policy`` of a simulator policy name for the fidelity replay (None: golden/full)."""
    if name == "h2o":
        return Policy.h2o()
    if name == "snapkv":
        return Policy.snapkv()
    if name == "tova":
        return Policy.tova()
    if name == "rkv":
        return Policy.rkv()
    if name == "streaming":
        return Policy.streaming_llm()
    if name == "random":
        return Policy.random(seed)
    if name == "foresight":
        ck = (
            scorer
            if isinstance(scorer, ScorerCheckpoint)
            else ScorerCheckpoint.load(str(scorer))
        )
        return Policy.foresight(ck, sample=False, seed=seed)
    return None


def run_eval(
    model: Any,
    tokenizer: Any,
    traces: TraceSet,
    *,
    policies: Sequence[str],
    budgets: Sequence[int],
    interval: int,
    limit: Optional[int] = None,
    accuracy_limit: Optional[int] = None,
    mass_limit: int = 0,
    with_loss: bool = True,
    scorer: Any = None,
    seed: int = 0,
    max_new: int = 12,
    progress: bool = True,
    deadline: Optional[float] = None,
    text: Optional[TraceSet] = None,
    text_limit: int = 0,
    follow: Optional[Any] = None,
    on_sequence: Optional[Any] = None,
    batch: int = 4,
    start: int = 0,
    min_tokens: int = 0,
) -> Dict[str, Any]:
    """Evaluates ``policies`` x ``budgets`` on the first ``limit`` sequences of ``traces`` (loss
    ratio), the first ``accuracy_limit`` (accuracy) and the first ``mass_limit`` (attention mass);
    the first ``text_limit`` windows of ``text`` get the loss ratio too. Stops starting new
    sequences after ``deadline`` (a ``time.time()``), recording how many were done. ``follow``: a
    function reloading the held-out split, to evaluate a split that a trace run is still writing
    (up to ``limit`` sequences, or until the deadline). ``with_loss=False`` skips the loss ratio and the
    attention mass (accuracy only). ``on_sequence(result)`` gets the result so far after each
    batch and each budget (the CLI writes it, so a stopped run leaves its numbers). ``batch``
    sequences are evaluated together: every policy's run of each of them at one budget is one
    packed forward per step (``simulate_many``), and each sequence's generations at every budget
    and policy decode together (``generate_many``). ``start``: held-out sequences before this index are
    skipped, and ``min_tokens``: so are shorter ones; the limits then count the sequences evaluated
    (so disjoint runs over ``start`` ranges pool into one table: ``bench/testbed_report.py``)."""
    from tqdm import tqdm

    policies = [p for p in policies if p != "full"]
    if batch < 1:
        raise ValueError(f"batch {batch} must be at least 1")
    if start < 0 or min_tokens < 0:
        raise ValueError(f"start {start} and min_tokens {min_tokens} must not be negative")
    # one scorer object for every run (its engines then share one group per budget)
    scorer_obj = ScorerCheckpoint.load(str(scorer)) if scorer is not None and not isinstance(scorer, ScorerCheckpoint) else scorer
    if follow is None:
        n = len(traces) if limit is None else min(limit, len(traces))
        n = min(n, max(len(traces) - start, 0))
    else:
        n = limit if limit is not None else 1 << 30
    n_acc = n if accuracy_limit is None else min(accuracy_limit, n)
    stops = stop_token_ids(tokenizer)
    started = time.time()
    # per (split, budget, policy): pooled sums
    loss: Dict[str, Dict[int, Dict[str, Dict[str, float]]]] = {}
    acc: Dict[int, Dict[str, List[int]]] = {
        b: {p: [] for p in ["full"] + policies} for b in budgets
    }
    mass: Dict[int, Dict[str, List[float]]] = {
        b: {p: [] for p in policies} for b in budgets
    }
    done = {"heldout": 0, "text": 0, "accuracy": 0, "mass": 0}
    per_budget: Dict[str, int] = {}
    per_seq: List[Dict[str, Any]] = []
    stage_seconds = {"full": 0.0, "golden": 0.0, "loss": 0.0, "accuracy": 0.0, "mass": 0.0}
    def jobs():
        """``(split, traces, index, ordinal)``: ordinal counts the sequences evaluated (the limits'
        unit), index is the sequence's place in its split."""
        nonlocal traces
        i, taken = start, 0
        while taken < n:
            if i >= len(traces) and follow is not None:
                # a trace run still writing the split: wait for its next sequence
                while i >= len(traces) and (deadline is None or time.time() < deadline):
                    time.sleep(20)
                    traces = follow()
            if i >= len(traces):
                break
            if len(traces.sequence(i)) >= min_tokens:
                yield "heldout", traces, i, taken
                taken += 1
            i += 1
        if text is not None:
            for j in range(min(text_limit, len(text))):
                yield "text", text, j, j

    def summary() -> Dict[str, Any]:
        """The result so far (JSON-able)."""
        out = _summary(loss, acc, mass, done, per_budget, per_seq, policies, budgets, interval, n, n_acc,
                       mass_limit, text_limit if text is not None else 0, started)
        out["stage_seconds"] = {k: round(v, 1) for k, v in stage_seconds.items()}
        out["selection"] = {"start": start, "min_tokens": min_tokens}
        return out

    def batches():
        """The jobs in groups of ``batch`` sequences of one split (evaluated in packed forwards)."""
        group: List[Any] = []
        for job in jobs():
            if group and (len(group) == batch or group[0][0] != job[0]):
                yield group
                group = []
            group.append(job)
        if group:
            yield group

    def add_loss(split, b, p, res, subsets) -> None:
        for name, m in subsets.items():
            d = loss.setdefault(f"{split}/{name}", {}).setdefault(b, {}).setdefault(p, {"ce": 0.0, "n": 0})
            d["ce"] += float(res.ce[m].double().sum())
            d["n"] += int(m.sum())

    bar = tqdm(total=None if follow is not None else n + (min(text_limit, len(text)) if text is not None else 0),
               desc="eval", disable=not progress)
    for group in batches():
        if deadline is not None and time.time() > deadline:
            break
        split = group[0][0]
        seqs = [ts.sequence(i) for _, ts, i, _ in group]
        t_full = time.time()
        recorded = record_full_many(model, [seq.input_ids for seq in seqs])
        stage_seconds["full"] += time.time() - t_full
        rows: List[Dict[str, Any]] = []
        for (_, _, i, _), seq, (_, full) in zip(group, seqs, recorded):
            rows.append({
                "split": split,
                "index": i,
                "len": len(seq),
                "prompt_len": seq.prompt_len,
                "full_vs_stored_max_abs_ce": float((full.ce - seq.ce[1:]).abs().max()),
            })
        for b in budgets if with_loss else []:
            if deadline is not None and time.time() > deadline:
                break
            runs, where = [], []
            per_item = []
            for k, (seq, (trace, full)) in enumerate(zip(seqs, recorded)):
                sel = torch.arange(full.ce.numel()) >= b
                if not bool(sel.any()):
                    per_item.append(None)
                    continue
                per_budget[f"{split}/{b}"] = per_budget.get(f"{split}/{b}", 0) + 1
                t_gold = time.time()
                golden = GoldenRun(trace, b, interval) if "golden" in policies else None
                stage_seconds["golden"] += time.time() - t_gold
                ent = full.entropy[sel]
                kk = max(1, int(round(LOW_ENTROPY_FRACTION * ent.numel())))
                low = torch.zeros_like(sel)
                low[torch.nonzero(sel).flatten()[torch.argsort(ent)[:kk]]] = True
                ans = torch.arange(full.ce.numel()) >= max(seq.prompt_len - 1, b)
                subsets = {"all": sel, "low_entropy": low}
                if split == "heldout" and seq.prompt_len and bool(ans.any()):
                    subsets["answer"] = ans
                per_item.append((sel, subsets, golden))
                add_loss(split, b, "full", full, subsets)
                rows[k][f"ce_{b}_full"] = float(full.ce[sel].mean())
                for p in policies:
                    runs.append(SimRun(seq.input_ids, seq.prompt_len, p, b, interval, scorer=scorer_obj, seed=seed,
                                       golden=golden))
                    where.append((k, p))
            t_loss = time.time()
            results = simulate_many(model, runs)
            stage_seconds["loss"] += time.time() - t_loss
            for (k, p), res in zip(where, results):
                sel, subsets, _ = per_item[k]
                add_loss(split, b, p, res, subsets)
                rows[k][f"ce_{b}_{p}"] = float(res.ce[sel].mean())
            t_mass = time.time()
            for k, ((_, _, _, o), (trace, _)) in enumerate(zip(group, recorded)):
                if split == "heldout" and o < mass_limit and per_item[k] is not None:
                    golden = per_item[k][2]
                    for p in policies:
                        if p == "golden":
                            mass[b][p].append(float(golden.fidelity["mass"]))
                        else:
                            pol = _core_policy(p, scorer_obj, seed)
                            mass[b][p].append(float(core_simulate(trace, pol, b, interval)["fidelity"]["mass"]))
            stage_seconds["mass"] += time.time() - t_mass
            if on_sequence is not None:
                on_sequence(summary())  # after every budget too: a long batch leaves its numbers
        for k, ((_, _, _, o), seq, (trace, _)) in enumerate(zip(group, seqs, recorded)):
            if split == "heldout" and o < mass_limit:
                done["mass"] += 1
            in_time = deadline is None or time.time() < deadline
            if split == "heldout" and o < n_acc and seq.prompt_len and in_time:
                expected = seq.meta["expected"]
                pre = prefill(model, seq.input_ids[: seq.prompt_len])
                specs, keys = [GenSpec("full", budgets[0], interval)], [(None, "full")]
                for b in budgets:
                    t_gold = time.time()
                    g = GoldenRun(trace, b, interval, prompt_len=seq.prompt_len) if "golden" in policies else None
                    stage_seconds["golden"] += time.time() - t_gold
                    for p in policies:
                        specs.append(GenSpec(p, b, interval, scorer_obj, seed, g if p == "golden" else None))
                        keys.append((b, p))
                t_acc = time.time()
                answers = generate_many(model, pre, specs, max_new=max_new, stop_ids=stops)
                stage_seconds["accuracy"] += time.time() - t_acc
                for (b, p), out in zip(keys, answers):
                    ok = int(grade(expected, tokenizer.decode(out)))
                    for bb in budgets if b is None else [b]:
                        # the full cache does not depend on the budget
                        acc[bb][p].append(ok)
                        rows[k][f"acc_{bb}_{p}"] = ok
                done["accuracy"] += 1
            done[split] += 1
        per_seq.extend(rows)
        del recorded
        bar.update(len(group))
        if on_sequence is not None:
            on_sequence(summary())
    bar.close()
    return summary()


def _summary(loss, acc, mass, done, per_budget, per_seq, policies, budgets, interval, n, n_acc, mass_limit,
             text_limit, started) -> Dict[str, Any]:
    """Assembles the result dict of ``run_eval`` from its running sums."""
    return {
        "metric": "loss ratio = pooled mean CE under eviction / pooled mean CE with the full cache",
        "interval": interval,
        "budgets": list(budgets),
        "policies": ["full"] + policies,
        "done": done,
        "sequences_per_budget": per_budget,
        "asked": {
            "heldout": n,
            "accuracy": n_acc,
            "mass": mass_limit,
            "text": text_limit,
        },
        "seconds": round(time.time() - started, 1),
        "loss_ratio": {
            split: {
                str(b): {
                    p: (v["ce"] / v["n"]) / (byb["full"]["ce"] / byb["full"]["n"])
                    if v["n"]
                    else None
                    for p, v in byb.items()
                }
                for b, byb in bys.items()
            }
            for split, bys in loss.items()
        },
        "mean_ce": {
            split: {
                str(b): {
                    p: v["ce"] / v["n"] if v["n"] else None for p, v in byb.items()
                }
                for b, byb in bys.items()
            }
            for split, bys in loss.items()
        },
        "tokens": {
            split: {str(b): byb["full"]["n"] for b, byb in bys.items()}
            for split, bys in loss.items()
        },
        "accuracy": {
            str(b): {p: (sum(v) / len(v) if v else None) for p, v in byp.items()}
            for b, byp in acc.items()
        },
        "accuracy_n": {
            str(b): {p: len(v) for p, v in byp.items()} for b, byp in acc.items()
        },
        "mass_kept": {
            str(b): {p: (sum(v) / len(v) if v else None) for p, v in byp.items()}
            for b, byp in mass.items()
        },
        "per_sequence": per_seq,
        "machine": {
            "platform": platform.platform(),
            "cpus": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }


def heldout_indices(result: Dict[str, Any]) -> List[int]:
    """The held-out sequence indices a result file measured: its per-sequence rows that carry a loss
    (``ce_*``) or accuracy (``acc_*``) figure. A row a time limit (``--minutes``) stopped before any
    measurement holds only bookkeeping and does not count, so the next run may measure it."""
    return sorted(
        {
            int(r["index"])
            for r in result.get("per_sequence", [])
            if r.get("split") == "heldout" and any(k.startswith(("ce_", "acc_")) for k in r)
        }
    )


def accuracy_from_rows(results: Sequence[Dict[str, Any]], min_tokens: int = 0) -> Dict[str, Any]:
    """Task accuracy per budget and policy recomputed from the per-sequence rows (``acc_{B}_{policy}``)
    of ``results`` (any files, overlapping or not), over the held-out sequences of at least
    ``min_tokens`` tokens: each (sequence, budget, policy) counted once, from the first file that has
    it; ``conflicts`` counts later files that disagree with it. Returns ``{"policies", "accuracy",
    "accuracy_n", "sequences", "conflicts"}``."""
    seen: Dict[Tuple[int, str, str], int] = {}
    conflicts = 0
    for r in results:
        for row in r.get("per_sequence", []):
            if row.get("split") != "heldout" or int(row.get("len", 0)) < min_tokens:
                continue
            for k, v in row.items():
                if not k.startswith("acc_"):
                    continue
                b, p = k[len("acc_"):].split("_", 1)
                key = (int(row["index"]), b, p)
                if key not in seen:
                    seen[key] = int(v)
                elif seen[key] != int(v):
                    conflicts += 1
    policies: List[str] = []
    for _, _, p in seen:
        if p not in policies:
            policies.append(p)
    policies.sort(key=lambda p: (p != "full", p))
    acc: Dict[str, Dict[str, float]] = {}
    n: Dict[str, Dict[str, int]] = {}
    for (_, b, p), v in seen.items():
        acc.setdefault(b, {}).setdefault(p, 0.0)
        acc[b][p] += v
        n.setdefault(b, {}).setdefault(p, 0)
        n[b][p] += 1
    for b in acc:
        for p in acc[b]:
            acc[b][p] /= n[b][p]
    order = sorted(acc, key=int)
    return {
        "policies": policies,
        "accuracy": {b: acc[b] for b in order},
        "accuracy_n": {b: n[b] for b in order},
        "sequences": sorted({i for i, _, _ in seen}),
        "conflicts": conflicts,
    }


def merge_results(results: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One result holding every (subset, budget, policy) of ``results``, each a subset of the policies
    and budgets measured on the SAME sequences: a cell comes from the first result that has it."""
    out: Dict[str, Any] = {"interval": results[0]["interval"], "policies": [], "loss_ratio": {}, "mean_ce": {},
                           "tokens": {}, "accuracy": {}, "accuracy_n": {}, "mass_kept": {}, "done": {"mass": 0}}
    seqs: set = set()
    for r in results:
        if r["interval"] != out["interval"]:
            raise ValueError(f"interval {r['interval']} != {out['interval']}: not one table")
        seqs.update(heldout_indices(r))
        for p in r["policies"]:
            if p not in out["policies"]:
                out["policies"].append(p)
        for split, bys in r["loss_ratio"].items():
            for b, byp in bys.items():
                row = out["loss_ratio"].setdefault(split, {}).setdefault(b, {})
                ce = out["mean_ce"].setdefault(split, {}).setdefault(b, {})
                for p, v in byp.items():
                    if p not in row:
                        row[p] = v
                        ce[p] = r["mean_ce"][split][b][p]
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
    out["heldout_indices"] = sorted(seqs)
    return _sorted_budgets(out)


def pool_results(parts: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One result over the union of DISJOINT sequence sets (each part a ``merge_results`` of one set):
    the loss ratio of the pooled cross-entropy sums (mean CE x tokens of every part, a cell only where
    every part that measured the budget has it), accuracy pooled by counts, attention mass weighted
    by each part's sequence count. Refuses parts that share a held-out sequence."""
    seen: Dict[int, int] = {}
    for k, part in enumerate(parts):
        for i in part.get("heldout_indices", []):
            if i in seen:
                raise ValueError(f"held-out sequence {i} is in parts {seen[i]} and {k}: pooling needs disjoint sets")
            seen[i] = k
    out: Dict[str, Any] = {"interval": parts[0]["interval"], "policies": [], "loss_ratio": {}, "mean_ce": {},
                           "tokens": {}, "accuracy": {}, "accuracy_n": {}, "mass_kept": {}, "done": {"mass": 0},
                           "heldout_indices": sorted(seen)}
    for part in parts:
        if part["interval"] != out["interval"]:
            raise ValueError(f"interval {part['interval']} != {out['interval']}: not one table")
        out["policies"] += [p for p in part["policies"] if p not in out["policies"]]
    for split in sorted({s for part in parts for s in part["loss_ratio"]}):
        for b in sorted({b for part in parts for b in part["loss_ratio"].get(split, {})}, key=int):
            have = [part for part in parts if b in part["loss_ratio"].get(split, {})]
            n = sum(part["tokens"][split][b] for part in have)
            sums = {}
            for p in out["policies"]:
                vals = [part["mean_ce"][split][b].get(p) for part in have]
                if all(v is not None for v in vals):
                    sums[p] = sum(v * part["tokens"][split][b] for v, part in zip(vals, have))
            out["tokens"].setdefault(split, {})[b] = n
            out["mean_ce"].setdefault(split, {})[b] = {p: v / n for p, v in sums.items()}
            full = sums.get("full")
            out["loss_ratio"].setdefault(split, {})[b] = {
                p: (v / full if full else None) for p, v in sums.items()
            }
    for b in sorted({b for part in parts for b in part["accuracy"]}, key=int):
        for p in out["policies"]:
            got = [(part["accuracy"][b][p], part["accuracy_n"][b][p]) for part in parts
                   if part["accuracy_n"].get(b, {}).get(p)]
            n = sum(c for _, c in got)
            if n:
                out["accuracy"].setdefault(b, {})[p] = sum(v * c for v, c in got) / n
                out["accuracy_n"].setdefault(b, {})[p] = n
    out["done"]["mass"] = sum(part["done"].get("mass", 0) for part in parts)
    for b in sorted({b for part in parts for b in part["mass_kept"]}, key=int):
        for p in out["policies"]:
            got = [(part["mass_kept"][b][p], part["done"].get("mass", 0)) for part in parts
                   if part["mass_kept"].get(b, {}).get(p) is not None and part["done"].get("mass", 0)]
            n = sum(c for _, c in got)
            if n:
                out["mass_kept"].setdefault(b, {})[p] = sum(v * c for v, c in got) / n
    return _sorted_budgets(out)


def _sorted_budgets(out: Dict[str, Any]) -> Dict[str, Any]:
    """``out`` with every per-budget table in ascending budget order (for the tables and plot)."""
    for key in ("loss_ratio", "tokens", "mean_ce"):
        for split in out[key]:
            out[key][split] = dict(sorted(out[key][split].items(), key=lambda kv: int(kv[0])))
    for key in ("accuracy", "accuracy_n", "mass_kept"):
        out[key] = dict(sorted(out[key].items(), key=lambda kv: int(kv[0])))
    return out


def _fmt(x: Optional[float], digits: int = 3) -> str:
    """A number for the table ('-' when missing)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def format_table(result: Dict[str, Any]) -> str:
    """Markdown tables: loss ratio (each token subset), accuracy and attention mass kept."""
    pols = result["policies"]
    out = []
    for split, bys in result["loss_ratio"].items():
        out.append(
            f"loss ratio, {split} (L = {result['interval']}; tokens per budget: "
            f"{', '.join(f'{b}: {n}' for b, n in result['tokens'][split].items())})"
        )
        out.append("| budget | " + " | ".join(pols) + " |")
        out.append("| --- " * (len(pols) + 1) + "|")
        for b, byp in bys.items():
            out.append(f"| {b} | " + " | ".join(_fmt(byp.get(p)) for p in pols) + " |")
        out.append("")
    if any(v for byp in result["accuracy_n"].values() for v in byp.values()):
        out.append(
            "task accuracy under the budget (generation through the serving step)"
        )
        out.append("| budget | " + " | ".join(pols) + " |")
        out.append("| --- " * (len(pols) + 1) + "|")
        for b, byp in result["accuracy"].items():
            nn = result["accuracy_n"][b]
            out.append(
                f"| {b} | "
                + " | ".join(f"{_fmt(byp.get(p), 2)} ({nn.get(p, 0)})" for p in pols)
                + " |"
            )
        out.append("")
    mp = [p for p in pols if p != "full"]
    if result["done"].get("mass"):
        out.append(
            f"attention mass kept for future queries ({result['done']['mass']} sequences)"
        )
        out.append("| budget | " + " | ".join(mp) + " |")
        out.append("| --- " * (len(mp) + 1) + "|")
        for b, byp in result["mass_kept"].items():
            out.append(f"| {b} | " + " | ".join(_fmt(byp.get(p)) for p in mp) + " |")
        out.append("")
    return "\n".join(out)


def plot(result: Dict[str, Any], path: str) -> None:
    """PNG: loss ratio against budget, one line per policy, one panel per token subset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(result["loss_ratio"].items())
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5 * len(panels), 4), squeeze=False
    )
    for ax, (split, bys) in zip(axes[0], panels):
        budgets = sorted(int(b) for b in bys)
        for p in result["policies"]:
            if p == "full":
                continue
            ys = [bys[str(b)].get(p) for b in budgets]
            ax.plot(
                budgets,
                [y if y is not None else float("nan") for y in ys],
                marker="o",
                label=p,
            )
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget B (entries per layer and KV head)")
        ax.set_ylabel("loss ratio (CE / full-cache CE)")
        ax.set_title(split)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"loss ratio vs budget, L = {result['interval']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
