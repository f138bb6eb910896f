"""Rules, findings, verdict and exit code."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from audit.findings import (
    FindingRule,
    default_rules,
    evaluate,
    exit_code,
    statement,
    verdict,
)


def entry(name, metrics, status="judged", n=500):
    return {"name": name, "n": n, "status": status, "metrics": metrics}


def accuracy(value, reference, p, ci=(-0.04, -0.02)):
    return {
        "value": value,
        "reference": reference,
        "gap": value - reference,
        "gap_ci": list(ci),
        "p_value": p / 2,
        "p_adjusted": p,
    }


def test_default_rules_by_severity():
    slices = [
        entry("a=1", {"accuracy": accuracy(0.95, 0.98, 0.001)}),
        entry("a=2", {"accuracy": accuracy(0.965, 0.98, 0.001)}),
        entry("a=3", {"accuracy": accuracy(0.95, 0.98, 0.2)}),
        entry("a=4", {"accuracy": accuracy(0.99, 0.97, 0.001)}),
        entry("a=5", {"accuracy": accuracy(0.9, 0.98, 0.001)}, status="too_few"),
    ]

    found = evaluate(slices, default_rules())

    assert [(f["slice"], f["severity"], f["rule"]) for f in found] == [
        ("a=1", "high", "accuracy_gap_high"),
        ("a=2", "medium", "accuracy_gap_medium"),
    ]
    assert [f["id"] for f in found] == ["F001", "F002"]
    assert found[0]["value"] == 0.95 and found[0]["reference"] == 0.98
    assert found[0]["ci"] == [-0.04, -0.02] and found[0]["p_value"] == 0.001


def test_map_distance_and_higher_metrics():
    slices = [
        entry(
            "b=x",
            {
                "map_distance": {"value": 0.2, "p_value": 0.001, "p_adjusted": 0.01},
                "ece": {
                    "value": 0.05,
                    "reference": 0.02,
                    "gap": 0.03,
                    "gap_ci": [0.01, 0.05],
                    "p_adjusted": 0.02,
                },
                "flip_rate": {
                    "value": 0.10,
                    "reference": 0.08,
                    "gap": 0.02,
                    "gap_ci": [0.0, 0.04],
                    "p_adjusted": 0.001,
                },
            },
        )
    ]

    found = evaluate(slices, default_rules())

    assert sorted(f["metric"] for f in found) == ["ece", "map_distance"]
    assert all(f["severity"] == "medium" for f in found)
    assert verdict(found) == "warn"


def test_direction_either_and_gap_threshold():
    rule = FindingRule(name="conf", metric="mean_confidence", min_gap=0.05)
    low = {"value": 0.8, "reference": 0.9, "gap": -0.1, "p_adjusted": 0.01}
    small = {"value": 0.88, "reference": 0.9, "gap": -0.02, "p_adjusted": 0.01}

    assert len(evaluate([entry("c", {"mean_confidence": low})], [rule])) == 1
    assert evaluate([entry("c", {"mean_confidence": small})], [rule]) == []
    with pytest.raises(ValidationError, match="never below 0"):
        FindingRule(name="d", metric="map_distance", direction="lower")


def test_statement_states_numbers_n_and_interval():
    text = statement(
        "writer_group=students",
        5000,
        "accuracy",
        accuracy(0.975, 0.985, 0.0003, (-0.014, -0.006)),
    )

    assert text == (
        "Accuracy on writer_group=students is 1.0 points lower than on the rest "
        "(97.5% vs 98.5%, 95% CI of the gap -1.4 to -0.6 points, corrected p = "
        "0.0003, n = 5000)."
    )
    ece = {"value": 0.05, "reference": 0.02, "gap": 0.03, "gap_ci": [0.01, 0.05]}
    ece["p_adjusted"] = 0.00001
    assert "0.030 higher" in statement("s", 40, "ece", ece, 0.9)
    assert "90% CI" in statement("s", 40, "ece", ece, 0.9)
    assert "p < 0.0001" in statement("s", 40, "ece", ece)
    assert "Recall of class 3" in statement(
        "s", 40, "recall.3", accuracy(0.9, 0.95, 0.01)
    )


def test_slice_names_are_used_as_text_only():
    name = "source={0.__class__} & x=<b>"

    (found,) = evaluate(
        [entry(name, {"accuracy": accuracy(0.9, 0.98, 0.001)})], default_rules()
    )

    assert found["slice"] == name
    assert name in found["statement"]


def test_verdict_and_exit_code():
    high = [{"severity": "high"}]
    medium = [{"severity": "medium"}]
    low = [{"severity": "low"}]

    assert [verdict(x) for x in (high, medium, low, [])] == [
        "fail",
        "warn",
        "pass",
        "pass",
    ]
    assert exit_code(high, "high") == 1 and exit_code(medium, "high") == 0
    assert exit_code(medium, "medium") == 1 and exit_code(low, "medium") == 0
    assert exit_code(low, "low") == 1 and exit_code([], "low") == 0
    assert exit_code(high, "never") == 0
    assert exit_code("fail", "high") == 1 and exit_code("warn", "high") == 0
    assert exit_code("warn", "medium") == 1 and exit_code("pass", "low") == 0
    with pytest.raises(ValueError, match="fail_on"):
        exit_code([], "critical")
    with pytest.raises(ValueError, match="verdict"):
        exit_code("unknown", "high")
