"""Statistics per slice: hand-computed values, tests, correction, null rate."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from audit.accumulate import AuditAccumulator
from audit.analysis import StatisticsSettings, _correct, analyze
from audit.findings import default_rules
from audit.occlusion import OcclusionResult
from audit.slices import Slice, SliceSet, SliceSettings

WRITERS = Path(__file__).resolve().parent / "data" / "mnist_test_writers.csv"
FAST = StatisticsSettings(n_bootstrap=200, n_permutations=200, seed=1)


def slice_set(membership, names=None, min_size=3) -> SliceSet:
    membership = np.asarray(membership, bool)
    names = names or [f"s={j}" for j in range(membership.shape[1])]
    slices = [
        Slice(name, ("s",), (name.split("=", 1)[1],), int(membership[:, j].sum()))
        for j, name in enumerate(names)
    ]
    return SliceSet(slices, membership, min_size, pd.DataFrame())


def accumulate(
    labels, probs, scores, membership, chunks=1, max_drop=None, flipped=None
):
    labels, probs = np.asarray(labels), np.asarray(probs, np.float32)
    scores = np.asarray(scores, np.float32)
    membership = np.asarray(membership, bool)
    n, k = scores.shape
    maps = np.repeat(scores[:, None, :], 2, axis=1)  # (n, 2, K) maps
    max_drop = np.linspace(0, 1, n) if max_drop is None else np.asarray(max_drop)
    flipped = np.zeros(n, bool) if flipped is None else np.asarray(flipped)
    acc = AuditAccumulator(membership.shape[1], probs.shape[1], (2, k), (1, k))
    for part in np.array_split(np.arange(n), chunks):
        acc.add(
            part,
            labels[part],
            membership[part],
            OcclusionResult(
                probs=probs[part],
                targets=probs[part].argmax(axis=1),
                window_scores=scores[part],
                maps=maps[part],
                max_drop=max_drop[part],
                flipped=flipped[part],
                forward_passes=0,
            ),
        )
    return acc


def hand_case(chunks=1):
    # Slice 0: rows 0-4, two of them wrong; slice 1: rows 5-9, all right at
    # confidence 0.9; slice 2: rows 0-1 only (too few to judge).
    confidence = [0.9, 0.8, 0.7, 0.9, 0.9] + [0.9] * 5
    predicted = [0, 1, 1, 0, 0] + [0] * 5
    probs = np.zeros((10, 2))
    probs[np.arange(10), predicted] = confidence
    probs[np.arange(10), 1 - np.array(predicted)] = 1 - np.array(confidence)
    scores = np.array([[1.0, 0.0]] * 5 + [[0.0, 2.0]] * 5)
    membership = np.zeros((10, 3), bool)
    membership[:5, 0] = membership[5:, 1] = membership[:2, 2] = True
    acc = accumulate([0] * 10, probs, scores, membership, chunks=chunks)
    return acc, slice_set(membership)


def test_values_gaps_and_tests_by_hand():
    acc, slices = hand_case()

    got = analyze(acc, slices, FAST, default_rules())

    first, second, small = got["slices"]
    accuracy = first["metrics"]["accuracy"]
    assert accuracy["value"] == pytest.approx(0.6)
    assert accuracy["reference"] == pytest.approx(1.0)
    assert accuracy["gap"] == pytest.approx(-0.4)
    fisher = stats.fisher_exact([[3, 2], [5, 0]]).pvalue
    assert accuracy["p_value"] == pytest.approx(fisher)
    assert accuracy["test"] == "fisher_exact"
    # ECE, 15 bins: slice 0 has |3*0.9 - 3| + |0.8 - 0| + |0.7 - 0| over 5.
    assert first["metrics"]["ece"]["value"] == pytest.approx(1.8 / 5)
    assert first["metrics"]["ece"]["reference"] == pytest.approx(0.1)
    assert first["metrics"]["max_drop"]["value"] == pytest.approx(
        np.mean(np.linspace(0, 1, 10)[:5])
    )
    assert first["metrics"]["map_distance"]["value"] == pytest.approx(math.sqrt(2))
    assert first["metrics"]["recall.0"]["value"] == pytest.approx(0.6)
    assert "recall.1" not in first["metrics"]
    assert second["metrics"]["accuracy"]["value"] == 1.0
    assert got["overall"]["n"] == 10
    assert got["overall"]["metrics"]["accuracy"]["value"] == pytest.approx(0.8)

    assert small["status"] == "too_few" and small["n"] == 2
    assert small["metrics"]["accuracy"] == {"value": 0.5}
    assert got["counts"]["too_few"] == 1 and got["counts"]["judged"] == 2


def test_intervals_contain_the_values():
    acc, slices = hand_case()

    got = analyze(acc, slices, FAST, default_rules())

    for entry in got["slices"][:2]:
        for metric, values in entry["metrics"].items():
            if "ci" in values and values["ci"] is not None:
                low, high = values["ci"]
                assert (
                    low <= values["value"] + 1e-9 and values["value"] <= high + 1e-9
                ), metric
    low, high = got["overall"]["metrics"]["accuracy"]["ci"]
    assert low <= 0.8 <= high


def test_same_result_whatever_the_chunks_and_on_a_rerun():
    first = analyze(hand_case(chunks=1)[0], hand_case()[1], FAST, default_rules())
    again = analyze(hand_case(chunks=4)[0], hand_case()[1], FAST, default_rules())

    assert first == again


def test_degenerate_samples_give_intervals_without_warnings():
    n = 60
    probs = np.tile([[0.8, 0.2]], (n, 1))
    scores = np.ones((n, 2))
    membership = np.zeros((n, 2), bool)
    membership[:30, 0] = membership[30:, 1] = True
    acc = accumulate([0] * n, probs, scores, membership, max_drop=np.zeros(n))

    got = analyze(acc, slice_set(membership), FAST, default_rules())

    accuracy = got["slices"][0]["metrics"]["accuracy"]
    assert accuracy["ci"] == [1.0, 1.0] and accuracy["gap_ci"] == [0.0, 0.0]
    assert accuracy["p_value"] == 1.0
    assert got["slices"][0]["metrics"]["map_distance"]["p_value"] == 1.0
    assert got["verdict"] == "pass"


def test_holm_by_hand():
    p_values = {(0, "accuracy"): 0.01, (1, "accuracy"): 0.04, (2, "ece"): 0.03}
    p_values[(3, "ece")] = 0.005
    p_values[(0, "max_drop")] = 0.02

    adjusted, tests = _correct(p_values, {"accuracy", "ece"}, "holm")

    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1, kept monotone.
    assert adjusted[(3, "ece")] == pytest.approx(0.02)
    assert adjusted[(0, "accuracy")] == pytest.approx(0.03)
    assert adjusted[(2, "ece")] == pytest.approx(0.06)
    assert adjusted[(1, "accuracy")] == pytest.approx(0.06)
    # A metric no rule judges is its own family.
    assert adjusted[(0, "max_drop")] == pytest.approx(0.02)
    assert tests == {
        "accuracy": "fisher_exact",
        "ece": "permutation",
        "max_drop": "permutation",
    }

    bh, _ = _correct(p_values, {"accuracy", "ece"}, "fdr_bh")
    assert bh[(3, "ece")] == pytest.approx(0.02)
    assert bh[(1, "accuracy")] == pytest.approx(0.04)


def synthetic(n, rng, membership, wrong=None, shifted=None):
    """Predictions about 90% right; ``wrong`` rows forced wrong, ``shifted``
    rows put their attribution on another window."""
    labels = rng.integers(0, 3, n)
    right = rng.random(n) < 0.9
    if wrong is not None:
        right &= ~wrong
    predicted = np.where(right, labels, (labels + 1) % 3)
    confidence = rng.uniform(0.5, 1.0, n)
    probs = np.full((n, 3), 0.0)
    probs[np.arange(n), predicted] = confidence
    probs[np.arange(n), (predicted + 1) % 3] = 1 - confidence
    scores = np.abs(rng.normal(size=(n, 4))) * [1.0, 0.2, 0.2, 0.2]
    if shifted is not None:
        scores[shifted] = scores[shifted][:, ::-1]
    return accumulate(labels, probs, scores, membership, chunks=3)


def test_planted_bias_is_found_and_only_there():
    rng = np.random.default_rng(0)
    n = 1200
    group = rng.integers(0, 4, n)
    membership = group[:, None] == np.arange(4)[None, :]
    planted = group == 2
    wrong = planted & (rng.random(n) < 0.25)
    acc = synthetic(n, rng, membership, wrong=wrong, shifted=planted)

    got = analyze(acc, slice_set(membership, min_size=30), FAST, default_rules())

    flagged = {(f["slice"], f["metric"], f["severity"]) for f in got["findings"]}
    assert ("s=2", "accuracy", "high") in flagged
    assert ("s=2", "map_distance", "medium") in flagged
    assert {f["slice"] for f in got["findings"] if f["metric"] == "accuracy"} == {"s=2"}
    # The other slices' rest holds the planted one, so their maps may differ
    # from their rest too, but less.
    distances = [s["metrics"]["map_distance"]["value"] for s in got["slices"]]
    assert int(np.argmax(distances)) == 2
    assert got["verdict"] == "fail"
    assert got["statistics"]["n_permutations"] >= math.ceil(2 * 16 / 0.05) - 1


@pytest.mark.parametrize("correction", ["holm", "fdr_bh"])
def test_random_slices_give_findings_at_most_at_the_error_rate(correction):
    runs, with_findings = 15, 0
    for seed in range(runs):
        rng = np.random.default_rng(100 + seed)
        n = 300
        group = rng.integers(0, 3, n)
        membership = group[:, None] == np.arange(3)[None, :]
        acc = synthetic(n, rng, membership)
        settings = StatisticsSettings(
            n_bootstrap=100, n_permutations=200, correction=correction, seed=seed
        )
        got = analyze(
            acc, slice_set(membership, min_size=30), settings, default_rules()
        )
        with_findings += bool(got["findings"])

    # With no real difference both corrections keep the chance of any finding
    # in a run at or below 0.05 (Benjamini-Hochberg too, as every hypothesis
    # is true); four or more of 15 runs would happen with probability 0.005.
    assert with_findings <= 3


def test_examples_per_judged_slice():
    acc, slices = hand_case()

    got = analyze(acc, slices, FAST, default_rules())

    kinds = {(e["slice"], e["kind"]): e["row"] for e in got["examples"]}
    assert kinds[("s=0", "most_fragile")] == 4
    assert kinds[("s=0", "misclassified")] == 1
    assert ("s=1", "misclassified") not in kinds
    assert ("s=2", "typical") not in kinds
    assert kinds[("s=1", "typical")] in range(5, 10)


def test_writer_manifest_many_small_slices():
    writers = pd.read_csv(WRITERS, comment="#")
    table = pd.DataFrame(
        {"id": writers["index"].astype(str), "label": writers["label"]}
    )
    table["writer"] = writers["writer_id"]
    slices = SliceSet.build(table, SliceSettings(columns=["writer"]))
    rng = np.random.default_rng(7)
    acc = synthetic(len(table), rng, slices.membership)

    started = time.perf_counter()
    got = analyze(acc, slices, FAST, default_rules())
    elapsed = time.perf_counter() - started

    judged = [s for s in got["slices"] if s["status"] == "judged"]
    too_few = [s for s in got["slices"] if s["status"] == "too_few"]
    assert len(too_few) > len(judged) > 20
    assert len(judged) == sum(s.n >= 30 for s in slices.slices)
    for entry in judged:
        assert entry["metrics"]["accuracy"]["p_adjusted"] is not None
        assert entry["metrics"]["map_distance"]["p_adjusted"] is not None
    for entry in too_few:
        assert all(set(v) == {"value"} for v in entry["metrics"].values())
    assert got["statistics"]["family_size"] == 4 * len(judged)
    assert elapsed < 120
