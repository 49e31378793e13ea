"""The train command's closing check, through the testbed's harness (``testbed.harness.run_eval``,
the same numbers ``foresightkv eval`` prints): the loss ratio of each trained scorer (and of
baselines) on held-out sequences at every budget."""

from typing import Any, Dict, Mapping, Optional, Sequence


def loss_ratios(
    model: Any,
    tokenizer: Any,
    heldout: Any,
    scorers: Mapping[str, Any],
    budgets: Sequence[int],
    interval: int,
    *,
    limit: Optional[int] = None,
    baselines: Sequence[str] = ("h2o",),
    progress: bool = True,
    batch: int = 4,
) -> Dict[str, Any]:
    """``{"loss_ratio": {subset: {budget: {row: ratio}}}, "runs": {row: harness result}}``; one
    harness run per scorer (policy ``foresight``; the first run adds ``baselines``), rows named by
    the keys of ``scorers``. Accuracy and attention mass are left to ``foresightkv eval``."""
    from ..testbed.harness import run_eval

    merged: Dict[str, Dict[str, Dict[str, float]]] = {}
    runs = {}
    for k, (name, path) in enumerate(scorers.items()):
        policies = ["foresight"] + (list(baselines) if k == 0 else [])
        res = run_eval(
            model, tokenizer, heldout, policies=policies, budgets=budgets, interval=interval, limit=limit,
            accuracy_limit=0, mass_limit=0, scorer=str(path), progress=progress, batch=batch,
        )
        res.pop("per_sequence", None)
        runs[name] = res
        for subset, byb in res["loss_ratio"].items():
            for b, byp in byb.items():
                row = merged.setdefault(subset, {}).setdefault(b, {})
                for p, v in byp.items():
                    row[name if p == "foresight" else p] = v
    return {"loss_ratio": merged, "runs": runs}
