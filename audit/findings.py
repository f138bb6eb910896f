"""Rules turn slice statistics into findings; findings give the verdict.

A :class:`FindingRule` names a metric, which direction of the slice's gap to
the rest is bad, how large the gap must be and how small its corrected
p-value. Every judged slice whose metric meets a rule becomes a finding with
that rule's severity (when several rules of one metric match, the most severe
one wins). ``map_distance`` has no gap: its rules compare the distance itself
with ``min_gap``.

The verdict is ``fail`` when any finding is high, ``warn`` when any is medium,
``pass`` otherwise; :func:`exit_code` turns findings into the CLI's exit code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Severity = Literal["high", "medium", "low"]
SEVERITIES: tuple[str, ...] = ("high", "medium", "low")
FAIL_ON = ("high", "medium", "low", "never")
_RANK = {"high": 0, "medium": 1, "low": 2}

PERCENT_METRICS = ("accuracy", "flip_rate")
METRIC_NAMES = {
    "accuracy": "Accuracy",
    "flip_rate": "The flip rate (share of predictions one occluded window changes)",
    "mean_confidence": "Mean confidence",
    "ece": "Expected calibration error",
    "max_drop": "The mean largest probability drop from one occluded window",
    "concentration": "Attribution concentration (share in the top 10% of pixels)",
    "deletion_auc": "The deletion area",
    "insertion_auc": "The insertion area",
}


class FindingRule(BaseModel):
    """When a slice's metric becomes a finding.

    ``direction`` says which gap (slice minus rest) is bad: ``lower``,
    ``higher`` or ``either``. The gap's size must be at least ``min_gap``
    (metric units: 0.02 is 2 points of accuracy) and the corrected p-value
    below ``max_p``.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    metric: str = Field(min_length=1)
    direction: Literal["lower", "higher", "either"] = "either"
    min_gap: float = Field(0.0, ge=0.0)
    max_p: float = Field(0.05, gt=0.0, le=1.0)
    severity: Severity = "medium"

    @model_validator(mode="after")
    def _distance_direction(self):
        if self.metric == "map_distance" and self.direction == "lower":
            raise ValueError(
                f"rule {self.name!r}: a map distance is never below 0; use "
                "direction 'higher' (or 'either') for map_distance"
            )
        return self


def default_rules() -> list[FindingRule]:
    """The rules a run uses unless its config gives others."""
    return [
        FindingRule(
            name="accuracy_gap_high",
            metric="accuracy",
            direction="lower",
            min_gap=0.02,
            severity="high",
        ),
        FindingRule(
            name="accuracy_gap_medium",
            metric="accuracy",
            direction="lower",
            min_gap=0.01,
            severity="medium",
        ),
        # With thousands of images every map difference is significant; only
        # a distance of 0.15 (L1-normalised window maps) or more is worth a look.
        # On MNIST the writer groups differ by 0.07 and brightness quartiles by
        # up to 0.27: faint digits are read from other places than bold ones.
        FindingRule(
            name="map_distance",
            metric="map_distance",
            direction="higher",
            min_gap=0.15,
            severity="medium",
        ),
        FindingRule(name="ece_gap", metric="ece", direction="higher", min_gap=0.02),
        FindingRule(
            name="flip_rate_gap",
            metric="flip_rate",
            direction="higher",
            min_gap=0.05,
        ),
    ]


def evaluate(
    slices: list[dict], rules: Iterable[FindingRule], confidence_level: float = 0.95
) -> list[dict]:
    """Findings for the slice entries of ``results.json`` (see docs/RESULTS.md).

    Only judged slices are considered; ``confidence_level`` is the level of
    the gap intervals, for the statements. Findings come ordered by severity, then
    by slice order, then by metric; ids are ``F001``, ``F002``, ...
    """
    rules = list(rules)
    matched = []
    for position, entry in enumerate(slices):
        if entry.get("status") != "judged":
            continue
        for metric, stats in entry.get("metrics", {}).items():
            met = [r for r in rules if r.metric == metric and _meets(r, metric, stats)]
            if met:
                best = min(met, key=lambda r: _RANK[r.severity])
                matched.append((_RANK[best.severity], position, metric, entry, best))

    matched.sort(key=lambda m: m[:3])
    findings = []
    for number, (_, _, metric, entry, rule) in enumerate(matched, start=1):
        stats = entry["metrics"][metric]
        findings.append(
            {
                "id": f"F{number:03d}",
                "severity": rule.severity,
                "slice": entry["name"],
                "metric": metric,
                "value": stats.get("value"),
                "reference": stats.get("reference"),
                "ci": stats.get("gap_ci"),
                "p_value": stats.get("p_adjusted"),
                "rule": rule.name,
                "statement": statement(
                    entry["name"], entry["n"], metric, stats, confidence_level
                ),
            }
        )
    return findings


def verdict(findings: Iterable[Mapping]) -> str:
    """``fail`` with a high finding, ``warn`` with a medium one, else ``pass``."""
    severities = {f["severity"] for f in findings}
    if "high" in severities:
        return "fail"
    if "medium" in severities:
        return "warn"
    return "pass"


def exit_code(verdict_or_findings, fail_on: str = "high") -> int:
    """1 if a finding is at or above ``fail_on`` severity, else 0.

    ``verdict_or_findings`` is the list of findings, or a verdict string
    (``pass``/``warn``/``fail``); a verdict cannot tell whether there are low
    findings, so with ``fail_on="low"`` pass the findings. ``fail_on`` is
    ``high``, ``medium``, ``low`` or ``never`` (always 0).
    """
    if fail_on not in FAIL_ON:
        raise ValueError(f"fail_on {fail_on!r} is not one of {', '.join(FAIL_ON)}")
    if fail_on == "never":
        return 0
    if isinstance(verdict_or_findings, str):
        worst = {"fail": "high", "warn": "medium", "pass": None}
        if verdict_or_findings not in worst:
            raise ValueError(
                f"verdict {verdict_or_findings!r} is not one of pass, warn, fail"
            )
        severities = {worst[verdict_or_findings]} - {None}
    else:
        severities = {f["severity"] for f in verdict_or_findings}
    threshold = _RANK[fail_on]
    return int(any(_RANK[s] <= threshold for s in severities))


def _meets(rule: FindingRule, metric: str, stats: Mapping) -> bool:
    p = stats.get("p_adjusted")
    if not _finite(p) or p >= rule.max_p:
        return False
    gap = stats.get("value") if metric == "map_distance" else stats.get("gap")
    if not _finite(gap):
        return False
    if rule.direction == "lower":
        return -gap >= rule.min_gap and gap < 0
    if rule.direction == "higher":
        return gap >= rule.min_gap and gap > 0
    return abs(gap) >= rule.min_gap and gap != 0


def statement(
    name: str, n: int, metric: str, stats: Mapping, confidence_level: float = 0.95
) -> str:
    """One plain sentence with the numbers behind a finding."""
    level = f"{confidence_level * 100:g}%"
    p = _p_text(stats.get("p_adjusted"))
    if metric == "map_distance":
        return (
            f"The mean attribution map on {name} differs from the rest's "
            f"(L2 distance {stats['value']:.3f} between the normalised window maps, "
            f"permutation test, corrected p {p}, n = {n})."
        )
    value, reference, gap = stats["value"], stats["reference"], stats["gap"]
    low, high = stats.get("gap_ci") or (math.nan, math.nan)
    side = "lower" if gap < 0 else "higher"
    if metric in PERCENT_METRICS or metric.startswith("recall."):
        what = (
            f"Recall of class {metric.split('.', 1)[1]}"
            if metric.startswith("recall.")
            else METRIC_NAMES[metric]
        )
        return (
            f"{what} on {name} is {abs(gap) * 100:.1f} points {side} than on the "
            f"rest ({value * 100:.1f}% vs {reference * 100:.1f}%, "
            f"{level} CI of the gap {low * 100:.1f} to {high * 100:.1f} "
            f"points, corrected p {p}, n = {n})."
        )
    what = METRIC_NAMES.get(metric)
    if what is None:
        region = metric.split(".", 1)[1] if metric.startswith("region_share.") else ""
        what = (
            f"The share of attribution in the {region} region"
            if region
            else f"The metric {metric}"
        )
    return (
        f"{what} on {name} is {abs(gap):.3f} {side} than on the rest "
        f"({value:.3f} vs {reference:.3f}, {level} CI of the gap "
        f"{low:.3f} to {high:.3f}, corrected p {p}, n = {n})."
    )


def _p_text(p) -> str:
    if not _finite(p):
        return "= n/a"
    if p < 0.0001:
        return "< 0.0001"
    return f"= {p:.2g}"


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
