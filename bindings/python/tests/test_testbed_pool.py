"""Pooling eval results over disjoint held-out ranges (``harness.pool_results``) against the loss ratio,
accuracy and mass computed from every sequence's raw numbers at once, and merging files of one range."""

import random

import pytest

from foresightkv.testbed.harness import merge_results, pool_results

POLICIES = ["full", "golden", "h2o"]


def fake_result(indices, rng, policies=POLICIES, budgets=("128", "256")):
    """A result dict as ``run_eval`` writes it, from random per-token CE of sequences ``indices``;
    also returns the raw numbers: ``{(budget, policy): [ce, ...]}``, accuracy and mass lists."""
    raw, acc, mass = {}, {}, {}
    for b in budgets:
        n_tok = [rng.randint(5, 40) for _ in indices]
        for p in policies:
            raw[(b, p)] = [rng.uniform(0.5, 3.0) for _ in range(sum(n_tok))]
            acc[(b, p)] = [rng.randint(0, 1) for _ in indices]
            mass[(b, p)] = [rng.uniform(0.3, 1.0) for _ in indices]
    tokens = {b: len(raw[(b, "full")]) for b in budgets}
    mean = {b: {p: sum(raw[(b, p)]) / tokens[b] for p in policies} for b in budgets}
    res = {
        "interval": 32,
        "policies": list(policies),
        "loss_ratio": {"heldout/all": {b: {p: mean[b][p] / mean[b]["full"] for p in policies} for b in budgets}},
        "mean_ce": {"heldout/all": mean},
        "tokens": {"heldout/all": tokens},
        "accuracy": {b: {p: sum(acc[(b, p)]) / len(indices) for p in policies} for b in budgets},
        "accuracy_n": {b: {p: len(indices) for p in policies} for b in budgets},
        "mass_kept": {b: {p: sum(mass[(b, p)]) / len(indices) for p in policies if p != "full"} for b in budgets},
        "done": {"mass": len(indices)},
        "asked": {"mass": len(indices)},
        "per_sequence": [{"split": "heldout", "index": i, "ce_128_full": 1.0, "acc_128_full": 1} for i in indices],
    }
    return res, raw, acc, mass


def test_pooled_ratio_equals_the_ratio_over_all_tokens():
    rng = random.Random(7)
    ranges = [range(0, 4), range(4, 11), range(11, 12)]
    parts, raws = [], []
    for r in ranges:
        res, raw, acc, mass = fake_result(list(r), rng)
        parts.append(merge_results([res]))
        raws.append((raw, acc, mass))
    out = pool_results(parts)
    assert out["heldout_indices"] == list(range(12))
    for b in ("128", "256"):
        full = [x for raw, _, _ in raws for x in raw[(b, "full")]]
        assert out["tokens"]["heldout/all"][b] == len(full)
        for p in POLICIES:
            ce = [x for raw, _, _ in raws for x in raw[(b, p)]]
            assert out["loss_ratio"]["heldout/all"][b][p] == pytest.approx(sum(ce) / sum(full), rel=1e-12)
            hits = [x for _, acc, _ in raws for x in acc[(b, p)]]
            assert out["accuracy"][b][p] == pytest.approx(sum(hits) / len(hits))
            assert out["accuracy_n"][b][p] == len(hits)
            if p != "full":
                ms = [x for _, _, mass in raws for x in mass[(b, p)]]
                assert out["mass_kept"][b][p] == pytest.approx(sum(ms) / len(ms))


def test_a_cell_missing_from_one_part_is_not_pooled():
    rng = random.Random(3)
    a = merge_results([fake_result([0, 1], rng)[0]])
    b = merge_results([fake_result([2], rng, policies=["full", "golden"])[0]])
    out = pool_results([a, b])
    assert "h2o" not in out["loss_ratio"]["heldout/all"]["128"]
    assert "golden" in out["loss_ratio"]["heldout/all"]["128"]


def test_overlapping_parts_are_refused():
    rng = random.Random(1)
    a = merge_results([fake_result([0, 1, 2], rng)[0]])
    b = merge_results([fake_result([2, 3], rng)[0]])
    with pytest.raises(ValueError, match="held-out sequence 2"):
        pool_results([a, b])


def test_a_row_stopped_before_any_measurement_does_not_overlap():
    """A run cut by ``--minutes`` writes a bookkeeping-only row for the sequence it did not measure; the
    run that measures it next pools with it, and a row that did measure still refuses the overlap."""
    rng = random.Random(2)
    a = fake_result([0, 1, 2], rng)[0]
    a["per_sequence"].append({"split": "heldout", "index": 3, "len": 1500, "prompt_len": 1400, "full_vs_stored_max_abs_ce": 0.0})
    b = fake_result([3, 4], rng)[0]
    pooled = pool_results([merge_results([a]), merge_results([b])])
    assert pooled["heldout_indices"] == [0, 1, 2, 3, 4]
    a["per_sequence"][-1]["acc_128_h2o"] = 0
    with pytest.raises(ValueError, match="held-out sequence 3"):
        pool_results([merge_results([a]), merge_results([b])])


def test_merge_takes_each_cell_from_the_first_file_that_has_it():
    rng = random.Random(5)
    first, _, _, _ = fake_result([0, 1], rng, policies=["full", "golden"], budgets=("128",))
    second, _, _, _ = fake_result([0, 1], rng, policies=["full", "golden", "h2o"], budgets=("128", "512"))
    m = merge_results([first, second])
    assert m["loss_ratio"]["heldout/all"]["128"]["golden"] == first["loss_ratio"]["heldout/all"]["128"]["golden"]
    assert m["loss_ratio"]["heldout/all"]["128"]["h2o"] == second["loss_ratio"]["heldout/all"]["128"]["h2o"]
    assert list(m["loss_ratio"]["heldout/all"]) == ["128", "512"]
    assert m["heldout_indices"] == [0, 1]


def test_accuracy_from_rows_counts_each_long_trace_once():
    """Accuracy recomputed from per-sequence rows over overlapping files equals the mean over the
    distinct long-enough traces, counted directly; a later file that disagrees is counted as a conflict
    and does not change the figure."""
    from foresightkv.testbed.harness import accuracy_from_rows

    rng = random.Random(3)
    truth = {}
    files = []
    for lo, hi in ((0, 6), (4, 10), (9, 12)):
        rows = []
        for i in range(lo, hi):
            length = 1400 + 30 * i
            row = {"split": "heldout", "index": i, "len": length}
            for b in ("128", "256"):
                for p in ("full", "h2o"):
                    v = truth.setdefault((i, b, p), rng.randint(0, 1))
                    row[f"acc_{b}_{p}"] = v
            rows.append(row)
        files.append({"per_sequence": rows})
    files[2]["per_sequence"][0]["acc_128_h2o"] ^= 1  # sequence 9 again, disagreeing
    got = accuracy_from_rows(files, min_tokens=1500)
    long_ = [i for i in range(12) if 1400 + 30 * i >= 1500]
    assert got["sequences"] == long_ and got["conflicts"] == 1
    for b in ("128", "256"):
        for p in ("full", "h2o"):
            want = sum(truth[(i, b, p)] for i in long_) / len(long_)
            assert got["accuracy"][b][p] == pytest.approx(want) and got["accuracy_n"][b][p] == len(long_)
    assert got["policies"][0] == "full"
