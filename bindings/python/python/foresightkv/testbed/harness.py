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
from typing import Any, Dict, List, Optional

import torch

from .._native import Policy, ScorerCheckpoint
from .._native import simulate as core_simulate
from .generate import generate, prefill
from .simulate import GoldenRun, record_full, simulate
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
    scorer: Any = None,
    seed: int = 0,
    max_new: int = 12,
    progress: bool = True,
    deadline: Optional[float] = None,
    text: Optional[TraceSet] = None,
    text_limit: int = 0,
) -> Dict[str, Any]:
    """Evaluates ``policies`` x ``budgets`` on the first ``limit`` sequences of ``traces`` (loss
    ratio), the first ``accuracy_limit`` (accuracy) and the first ``mass_limit`` (attention mass);
    the first ``text_limit`` windows of ``text`` get the loss ratio too. Stops starting new
    sequences after ``deadline`` (a ``time.time()``), recording how many were done."""
    from tqdm import tqdm

    policies = [p for p in policies if p != "full"]
    n = len(traces) if limit is None else min(limit, len(traces))
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
    per_seq: List[Dict[str, Any]] = []
    jobs = [("heldout", traces, i) for i in range(n)]
    if text is not None:
        jobs += [("text", text, i) for i in range(min(text_limit, len(text)))]
    bar = tqdm(jobs, desc="eval", disable=not progress)
    for split, ts, i in bar:
        if deadline is not None and time.time() > deadline:
            break
        seq = ts.sequence(i)
        ids = seq.input_ids
        trace, full = record_full(model, ids)
        row: Dict[str, Any] = {
            "split": split,
            "index": i,
            "len": len(seq),
            "prompt_len": seq.prompt_len,
        }
        row["full_vs_stored_max_abs_ce"] = float((full.ce - seq.ce[1:]).abs().max())
        for b in budgets:
            golden = GoldenRun(trace, b, interval) if "golden" in policies else None
            sel = torch.arange(full.ce.numel()) >= b
            if not bool(sel.any()):
                continue
            ent = full.entropy[sel]
            k = max(1, int(round(LOW_ENTROPY_FRACTION * ent.numel())))
            low = torch.zeros_like(sel)
            low[torch.nonzero(sel).flatten()[torch.argsort(ent)[:k]]] = True
            ans = torch.arange(full.ce.numel()) >= max(seq.prompt_len - 1, b)
            subsets = {"all": sel, "low_entropy": low}
            if split == "heldout" and seq.prompt_len and bool(ans.any()):
                subsets["answer"] = ans
            for p in ["full"] + policies:
                res = (
                    full
                    if p == "full"
                    else simulate(
                        model,
                        ids,
                        prompt_len=seq.prompt_len,
                        policy=p,
                        budget=b,
                        interval=interval,
                        scorer=scorer,
                        seed=seed,
                        golden=golden,
                    )
                )
                for name, m in subsets.items():
                    d = (
                        loss.setdefault(f"{split}/{name}", {})
                        .setdefault(b, {})
                        .setdefault(p, {"ce": 0.0, "n": 0})
                    )
                    d["ce"] += float(res.ce[m].double().sum())
                    d["n"] += int(m.sum())
                row[f"ce_{b}_{p}"] = float(res.ce[sel].mean())
            if split == "heldout" and i < mass_limit:
                for p in policies:
                    if p == "golden":
                        mass[b][p].append(float(golden.fidelity["mass"]))
                    else:
                        pol = _core_policy(p, scorer, seed)
                        mass[b][p].append(
                            float(
                                core_simulate(trace, pol, b, interval)["fidelity"][
                                    "mass"
                                ]
                            )
                        )
        if split == "heldout" and i < mass_limit:
            done["mass"] += 1
        if split == "heldout" and i < n_acc and seq.prompt_len:
            expected = seq.meta["expected"]
            pre = prefill(model, ids[: seq.prompt_len])
            for b in budgets:
                g = (
                    GoldenRun(trace, b, interval, prompt_len=seq.prompt_len)
                    if "golden" in policies
                    else None
                )
                for p in ["full"] + policies:
                    out = generate(
                        model,
                        pre,
                        policy=p,
                        budget=b,
                        interval=interval,
                        max_new=max_new,
                        stop_ids=stops,
                        scorer=scorer,
                        seed=seed,
                        golden=g,
                    )
                    ok = grade(expected, tokenizer.decode(out))
                    acc[b][p].append(int(ok))
                    row[f"acc_{b}_{p}"] = int(ok)
            done["accuracy"] += 1
        done[split] += 1
        per_seq.append(row)
        del trace
    return {
        "metric": "loss ratio = pooled mean CE under eviction / pooled mean CE with the full cache",
        "interval": interval,
        "budgets": list(budgets),
        "policies": ["full"] + policies,
        "done": done,
        "asked": {
            "heldout": n,
            "accuracy": n_acc,
            "mass": mass_limit,
            "text": text_limit if text is not None else 0,
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
        budgets = [int(b) for b in bys]
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
