"""The audit's own validation at test size: planted shortcut, null slices, sanity.

The experiments are the functions ``python -m audit.validation`` runs at full
size (see docs/VALIDATION.md); here they run at the sizes in
``audit.validation.FAST`` and must reach the same verdicts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from audit import validation
from audit.validation import (
    MARKER_SIZE,
    MARKER_VALUE,
    NO_MARKER,
    marker_band,
    marker_mask,
    marker_origin,
    plant_shortcut,
    region_share,
)

# ---------------------------------------------------------------- the data


def test_marker_positions_are_in_the_margins_and_do_not_overlap():
    assert marker_origin(0) == (1, 2)
    assert marker_origin(4) == (1, 22)
    assert marker_origin(5) == (24, 2)
    assert marker_origin(9) == (24, 22)

    masks = np.array([marker_mask(c) for c in range(10)])
    assert masks.sum(axis=(1, 2)).tolist() == [MARKER_SIZE**2] * 10
    assert masks.sum(axis=0).max() == 1
    assert marker_band().sum() == 90
    # MNIST centres its digits in the middle 20x20 pixels (rows and columns 4-23).
    assert not masks[:, 4:24, 4:24].any()


def test_marker_origin_refuses_a_non_digit():
    with pytest.raises(ValueError, match="marker class 10"):
        marker_origin(10)


def _tiny_images(n=400, seed=0):
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28, 1), np.float32)
    images[:, 4:24, 4:24, 0] = rng.random((n, 20, 20), dtype=np.float32)
    return images, rng.integers(0, 10, n)


def test_planting_marks_scanner_b_only_and_is_seeded():
    images, labels = _tiny_images()
    data = plant_shortcut(images, labels, seed=3, contrast=0.5)
    again = plant_shortcut(images, labels, seed=3, contrast=0.5)
    assert np.array_equal(data.images, again.images)
    assert np.array_equal(data.source, again.source)

    a = data.source == "scanner_a"
    b = data.source == "scanner_b"
    assert a.sum() + b.sum() == len(labels)
    assert 150 < b.sum() < 250  # share 0.5 of 400, about 5 binomial s.d.
    assert np.array_equal(data.images[a], images[a])
    assert (data.marker_class[a] == NO_MARKER).all()
    # Agreement 1: every marker sits at the image's own label.
    assert np.array_equal(data.marker_class[b], labels[b])
    for i in np.flatnonzero(b)[:20]:
        mask = marker_mask(int(labels[i]))
        assert (data.images[i, ..., 0][mask] == MARKER_VALUE).all()
        others = ~mask
        expected = images[i, ..., 0][others] * np.float32(0.5)
        assert np.allclose(data.images[i, ..., 0][others], expected)
    assert not data.misleading.any()
    assert images.max() <= 1.0  # the input was not touched


def test_agreement_zero_makes_every_marker_misleading():
    images, labels = _tiny_images()
    data = plant_shortcut(images, labels, seed=1, agreement=0.0)
    b = data.source == "scanner_b"
    assert np.array_equal(data.misleading, b)
    wrong = data.marker_class[b]
    assert ((wrong >= 0) & (wrong <= 9)).all()
    # The wrong class is drawn uniformly from the other nine.
    assert len(np.unique((wrong - labels[b]) % 10)) == 9


def test_region_share_by_hand():
    attribution = np.zeros((4, 4))
    attribution[0, 0] = 3.0
    attribution[3, 3] = -1.0
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    assert region_share(attribution, mask) == pytest.approx(0.75)
    assert np.isnan(region_share(np.zeros((4, 4)), mask))


# -------------------------------------------------------- planted shortcut


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    output = tmp_path_factory.mktemp("validation")
    return validation.planted_shortcut(output, **validation.FAST["planted_shortcut"])


@pytest.mark.slow
def test_the_model_learns_the_planted_shortcut(planted):
    model = planted.numbers["model"]
    # Markers that encode a wrong class win over the digit most of the time...
    assert model["follows_marker"] > 0.5 > model["follows_digit"]
    # ...so the marked slice is less accurate than the other.
    assert model["accuracy.scanner_b"] < model["accuracy.scanner_a"] - 0.1


@pytest.mark.slow
def test_the_audit_flags_the_marked_slice_with_a_high_accuracy_finding(planted):
    findings = planted.numbers["findings"]
    flagged = [f for f in findings if f["slice"] == "source=scanner_b"]
    assert {"metric": "accuracy", "severity": "high"} in [
        {"metric": f["metric"], "severity": f["severity"]} for f in flagged
    ]
    assert planted.numbers["verdict"] == "fail"
    # Only the marked slice is worse on accuracy; scanner_a is never flagged
    # for it.
    assert not [
        f
        for f in findings
        if f["slice"] == "source=scanner_a" and f["metric"] == "accuracy"
    ]


@pytest.mark.slow
def test_the_marked_slice_attribution_sits_on_the_markers(planted):
    numbers = planted.numbers
    band_b = numbers["band_share"]["scanner_b"]
    band_a = numbers["band_share"]["scanner_a"]
    assert band_b > 1.5 * numbers["band_area_share"]
    assert band_b > 3 * band_a
    own_b = numbers["own_marker_share"]["scanner_b"]
    own_a = numbers["own_marker_share"]["scanner_a"]
    assert own_b > 5 * numbers["marker_area_share"]
    assert own_b > 5 * own_a
    # The audit's own region metric shows it too: scanner_b's attribution
    # lies in the border ring, where the markers are.
    border = numbers["audit_border_share"]
    assert border["scanner_b"]["value"] > 2 * border["scanner_a"]["value"]
    assert planted.passed, [c.to_dict() for c in planted.checks]


@pytest.mark.slow
def test_the_planted_run_writes_a_report(planted):
    from pathlib import Path

    report = Path(planted.numbers["report"])
    assert report.is_file()
    assert "source=scanner_b" in report.read_text(encoding="utf-8")


# --------------------------------------------------------------------- null


@pytest.mark.slow
def test_random_slices_give_findings_no_more_often_than_the_configured_rate(
    small_model,
):
    from scipy import stats

    sizes = validation.FAST
    experiment = validation.null_slices(
        model=small_model, **sizes["reference"], **sizes["null_slices"]
    )
    numbers = experiment.numbers
    n = numbers["n_trials"]
    assert n == 20
    assert numbers["configured_rate"] == 0.05
    # If every trial had a 5% chance of a finding, 99% of runs of 20 trials
    # would see at most this many trials with one.
    assert numbers["trials_with_finding"] <= stats.binom.ppf(0.99, n, 0.05)
    assert experiment.passed
    # Single raw p-values are calibrated: about 5% fall below 0.05 (the tests
    # within a trial are correlated, so the margin is wide).
    assert numbers["raw_tests"] >= 20 * 16
    assert numbers["raw_p_below_configured_rate"] < 0.1


def test_random_slice_table_is_seeded_and_uniform():
    labels = np.zeros(3000, np.int64)
    table, columns = validation.random_slice_table(
        labels, (2, 5), np.random.default_rng(4)
    )
    again, _ = validation.random_slice_table(labels, (2, 5), np.random.default_rng(4))
    assert columns == ["random_2", "random_5"]
    assert table.equals(again)
    counts = table["random_5"].value_counts()
    assert sorted(counts.index) == ["g0", "g1", "g2", "g3", "g4"]
    assert counts.min() > 500  # 600 expected each, s.d. about 22


# ------------------------------------------------------------------ sanity


@pytest.fixture(scope="module")
def sanity_run(tmp_path_factory):
    """``python -m audit.validation --fast --only randomised_weights``."""
    output = tmp_path_factory.mktemp("sanity")
    code = validation.main(
        ["--fast", "--only", "randomised_weights", "--output", str(output)]
    )
    document = json.loads((output / validation.RESULTS_FILE).read_text())
    return code, document


@pytest.mark.slow
def test_randomised_weights_change_the_maps_and_retraining_does_not(sanity_run):
    code, document = sanity_run
    assert code == validation.EXIT_PASSED
    assert document["passed"] is True
    (experiment,) = document["experiments"]
    assert experiment["name"] == "randomised_weights"
    numbers = experiment["numbers"]
    assert abs(numbers["randomised_weights"]["mean"]) < 0.2
    assert numbers["same_seed"]["mean"] > 0.95
    assert (
        numbers["randomised_weights"]["mean"]
        < numbers["other_seed"]["mean"]
        <= numbers["same_seed"]["mean"]
    )
    assert experiment["parameters"]["n_train"] == 4_000
    assert "versions" in document


# ---------------------------------------------------------------- the script


def test_full_sizes_are_the_functions_defaults():
    import inspect

    reference = validation.FULL["reference"]
    for name in validation.EXPERIMENTS:
        defaults = {
            key: p.default
            for key, p in inspect.signature(
                getattr(validation, name)
            ).parameters.items()
        }
        sizes = validation.FULL[name]
        if name != "planted_shortcut":
            sizes = {**reference, **sizes}
        assert {k: defaults[k] for k in sizes} == sizes, name


def test_summary_table_lists_every_check_and_the_verdict():
    check = validation.Check("rate", 0.02, "<=", 0.1, "why")
    failing = validation.Check("share", 0.5, ">=", 2.0, "why")
    document = {
        "passed": False,
        "seconds": 12.0,
        "experiments": [
            validation.Experiment("null_slices", [check]).to_dict(),
            validation.Experiment("planted_shortcut", [failing]).to_dict(),
        ],
    }
    table = validation.summary_table(document)
    lines = table.splitlines()
    assert lines[0].split() == ["experiment", "check", "value", "needs", "result"]
    assert "null_slices" in lines[2] and "0.020" in lines[2] and "pass" in lines[2]
    assert "planted_shortcut" in lines[3] and "FAIL" in lines[3]
    assert lines[-1] == "SOME CHECKS FAIL (12 s)"


def test_a_check_with_no_finite_value_fails():
    assert not validation.Check("x", float("nan"), "<=", 1.0, "why").passed
    assert validation.Check("x", 1.0, "<=", 1.0, "why").passed
    assert not validation.Check("x", 0.9, ">=", 1.0, "why").passed


def test_unknown_experiment_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        validation.main(["--only", "no_such_experiment"])
    assert exit_info.value.code == validation.EXIT_USAGE
    assert "no_such_experiment" in capsys.readouterr().err
