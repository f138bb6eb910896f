"""Per-slice metrics, their intervals and tests, and the findings they give.

:func:`analyze` turns an :class:`~audit.accumulate.AuditAccumulator` and the
run's :class:`~audit.slices.SliceSet` into the ``overall``, ``slices``,
``findings``, ``verdict``, ``counts``, ``examples`` and ``statistics`` parts
of ``results.json`` (docs/RESULTS.md).

Metrics of a slice, each compared with the rest of the audited images:

=====================  ==========================================  ===============
metric                 per image, averaged over the slice          test
=====================  ==========================================  ===============
accuracy               prediction is right                         Fisher exact
recall.<c>             prediction is right, images of class c      Fisher exact
flip_rate              one occluded window changes the prediction  Fisher exact
mean_confidence        top probability                             permutation
ece                    expected calibration error, 15 bins         permutation
max_drop               largest fall from one occluded window       permutation
concentration          attribution share in the top 10% pixels     permutation
region_share.<r>       attribution share in region r               permutation
deletion_auc           area under the deletion curve               permutation
insertion_auc          area under the insertion curve              permutation
map_distance           L2 distance of mean window maps             permutation
=====================  ==========================================  ===============

Intervals are percentile bootstrap intervals (``scipy.stats.bootstrap``)
from resampling all audited images together, so the slice, the rest and
their gap come from the same resamples; a resample in which a slice has no
image of a class leaves that recall undefined and is not counted. The gap is
slice minus rest.

Permutation tests compare the slice with random sets of the same size drawn
from all audited images (two-sided on the mean gap or ECE gap, one-sided on
the map distance); p-values are ``(1 + #{null >= observed}) / (1 +
permutations)``. All slices share the same permutations, which the analysis
draws once per population: sums over the first ``n`` images of each random
permutation serve every slice of size ``n`` (and, through the total, of size
``N - n``), so the cost does not grow with the number of slices.

Multiple testing: p-values are corrected (Holm by default, or
Benjamini-Hochberg) across every judged slice and every metric that a finding
rule judges - the hypotheses that can become findings. The other metrics'
p-values are corrected as a second, descriptive family. A permutation
p-value is never below ``1 / (permutations + 1)``, so the number of
permutations is raised where needed until the smallest p-value could pass
the strictest rule after correction (``2 * family / max_p``, at most
:data:`MAX_PERMUTATIONS`).

Slices with fewer audited images than ``min_slice_size`` are ``too_few``:
their values are reported, without intervals or tests.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats
from statsmodels.stats.multitest import multipletests

from . import findings as findings_module

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MAX_PERMUTATIONS = 20000
_BATCH_ELEMENTS = 4_000_000
_OUTPUTS_PER_CALL = 1536
_TIE_TOLERANCE = 1e-5

FISHER_METRICS = ("accuracy", "flip_rate")


class StatisticsSettings(BaseModel):
    """How intervals and tests are computed.

    ``n_permutations`` is a minimum: it is raised when the family of tests is
    too large for its smallest p-value to pass a rule after correction.
    """

    model_config = ConfigDict(extra="forbid")

    confidence_level: float = Field(0.95, gt=0.5, lt=1.0)
    n_bootstrap: int = Field(2000, ge=100, le=100_000)
    n_permutations: int = Field(1000, ge=100, le=MAX_PERMUTATIONS)
    correction: Literal["holm", "fdr_bh"] = "holm"
    seed: int = 0


@dataclass
class _Data:
    """Audited images' scalars as the analysis uses them (float64 columns)."""

    rows: np.ndarray
    membership: np.ndarray  # (N, S) bool
    design: np.ndarray  # (N, m) columns summed for every mean-type metric
    design32: np.ndarray  # the same, float32, for the bootstrap
    columns: dict[str, int]
    grid: np.ndarray  # (N, K)
    values: dict[str, np.ndarray]  # per-image metric inputs, NaN = undefined
    n_classes: int
    region_names: tuple[str, ...]


def analyze(acc, slice_set, settings: StatisticsSettings, rules: Iterable) -> dict:
    """Statistics, findings and verdict of an audit.

    Parameters
    ----------
    acc:
        The merged :class:`~audit.accumulate.AuditAccumulator` of the run.
    slice_set:
        The run's :class:`~audit.slices.SliceSet` (row ``i`` of its membership
        is dataset row ``i``).
    settings:
        Interval and test settings.
    rules:
        :class:`~audit.findings.FindingRule` objects.

    Returns
    -------
    dict
        ``schema_version``, ``overall``, ``slices``, ``findings``,
        ``verdict``, ``counts``, ``examples`` (``slice``, ``kind``, ``row``
        for the report's example images) and ``statistics`` (how the numbers
        were computed).
    """
    started = time.perf_counter()
    rules = list(rules)
    data = _prepare(acc, slice_set)
    n_images = len(data.rows)
    sizes = data.membership.sum(axis=0)
    judged = sizes >= slice_set.min_slice_size
    judged_index = np.flatnonzero(judged)

    sums = data.membership.T.astype(np.float64) @ data.design
    total = data.design.sum(axis=0)
    values = _metric_values(sums, total[None, :], data)
    overall_values = _metric_values(total[None, :], np.zeros((1, len(total))), data)
    distance = _map_distances(data, sizes)

    overall_ci, slice_ci = _bootstrap(data, judged_index, settings)
    tested_metrics = {rule.metric for rule in rules}
    family_size = _family_size(values, distance, judged, tested_metrics)
    alpha = min((rule.max_p for rule in rules), default=0.05)
    n_permutations = _permutations_needed(settings.n_permutations, family_size, alpha)
    p_values = _fisher_tests(data, judged_index)
    undecided_below = 2.0 * max((rule.max_p for rule in rules), default=0.05)
    p_values |= _permutation_tests(
        data, judged_index, settings, n_permutations, tested_metrics, undecided_below
    )

    adjusted, tests = _correct(p_values, tested_metrics, settings.correction)
    slices = []
    for j, described in enumerate(slice_set.slices):
        entry = {
            "name": described.name,
            "columns": list(described.columns),
            "values": list(described.values),
            "n": int(sizes[j]),
            "status": "judged" if judged[j] else "too_few",
            "metrics": {},
        }
        for metric, (value, reference) in values.items():
            if not math.isfinite(value[j]):
                continue
            stats_entry = {"value": _num(value[j])}
            if judged[j]:
                low, high, gap_low, gap_high = slice_ci.get((j, metric), (None,) * 4)
                stats_entry |= {
                    "ci": _pair(low, high),
                    "reference": _num(reference[j]),
                    "gap": _num(value[j] - reference[j]),
                    "gap_ci": _pair(gap_low, gap_high),
                }
                stats_entry |= _test_entry(j, metric, p_values, adjusted, tests)
            entry["metrics"][metric] = stats_entry
        if math.isfinite(distance[j]):
            stats_entry = {"value": _num(distance[j])}
            if judged[j]:
                stats_entry |= _test_entry(j, "map_distance", p_values, adjusted, tests)
            entry["metrics"]["map_distance"] = stats_entry
        slices.append(entry)

    found = findings_module.evaluate(slices, rules, settings.confidence_level)
    counts = {s: sum(f["severity"] == s for f in found) for s in ("high", "medium")}
    counts["low"] = sum(f["severity"] == "low" for f in found)
    counts["too_few"] = int((~judged).sum())
    counts["judged"] = int(judged.sum())
    overall = {
        "n": n_images,
        "metrics": {
            metric: {
                "value": _num(value[0]),
                "ci": _pair(*overall_ci.get(metric, (None, None))),
            }
            for metric, (value, _) in overall_values.items()
            if math.isfinite(value[0])
        },
    }
    elapsed = time.perf_counter() - started
    logger.info(
        "analysed %d images in %d slices (%d judged): %d findings in %.1f s",
        n_images,
        len(slices),
        counts["judged"],
        len(found),
        elapsed,
    )
    return {
        "schema_version": SCHEMA_VERSION,
        "verdict": findings_module.verdict(found),
        "counts": counts,
        "overall": overall,
        "slices": slices,
        "findings": found,
        "examples": _examples(data, slice_set, judged_index),
        "statistics": {
            "confidence_level": settings.confidence_level,
            "interval": "percentile bootstrap over all audited images",
            "n_bootstrap": settings.n_bootstrap,
            "n_permutations": n_permutations,
            "correction": settings.correction,
            "family": "judged slices x metrics judged by a rule",
            "family_size": family_size,
            "tested_metrics": sorted(tested_metrics),
            "seed": settings.seed,
        },
    }


# ------------------------------------------------------------------ the data


def _prepare(acc, slice_set) -> _Data:
    """Per-image design matrix: one column per sum a metric needs."""
    images = acc.images()
    membership = slice_set.membership[images.rows]
    n = len(images)
    n_classes = acc.n_classes
    correct = images.correct.astype(np.float64)

    columns: dict[str, np.ndarray] = {
        "n": np.ones(n),
        "accuracy": correct,
        "flip_rate": images.flipped.astype(np.float64),
        "mean_confidence": images.confidence,
        "max_drop": images.max_drop,
    }
    map_ok = np.isfinite(images.concentration)
    columns["n_map"] = map_ok.astype(np.float64)
    columns["concentration"] = np.where(map_ok, images.concentration, 0.0)
    for r, name in enumerate(images.region_names):
        share = images.region_shares[:, r]
        columns[f"region_share.{name}"] = np.where(map_ok, share, 0.0)
    for key in ("deletion_auc", "insertion_auc"):
        measured = np.isfinite(getattr(images, key))
        columns[f"n_{key}"] = measured.astype(np.float64)
        columns[key] = np.where(measured, getattr(images, key), 0.0)
    for c in range(n_classes):
        of_class = images.labels == c
        columns[f"n_class.{c}"] = of_class.astype(np.float64)
        columns[f"recall.{c}"] = (of_class & images.correct).astype(np.float64)
    bins = acc.calibration_bins
    calibration_bin = np.minimum((images.confidence * bins).astype(np.int64), bins - 1)
    for b in range(bins):
        columns[f"ece.{b}"] = np.where(
            calibration_bin == b, images.confidence - correct, 0.0
        )

    names = list(columns)
    design = np.stack([columns[k] for k in names], axis=1) if n else np.zeros((0, 0))
    values = {
        "mean_confidence": images.confidence,
        "max_drop": images.max_drop,
        "concentration": np.where(map_ok, images.concentration, np.nan),
        "deletion_auc": images.deletion_auc,
        "insertion_auc": images.insertion_auc,
        "correct": images.correct,
        "flipped": images.flipped,
        "labels": images.labels,
        "pred": images.pred,
        "confidence": images.confidence,
        "calibration": images.confidence - correct,
        "calibration_bin": calibration_bin,
    }
    for r, name in enumerate(images.region_names):
        values[f"region_share.{name}"] = np.where(
            map_ok, images.region_shares[:, r], np.nan
        )
    return _Data(
        rows=images.rows,
        membership=membership,
        design=design.reshape(n, len(names)),
        design32=design.reshape(n, len(names)).astype(np.float32),
        columns={k: i for i, k in enumerate(names)},
        grid=images.grid.astype(np.float64),
        values=values,
        n_classes=n_classes,
        region_names=images.region_names,
    )


def _metric_values(inside: np.ndarray, total: np.ndarray, data: _Data) -> dict:
    """Each metric's ``(value, reference)`` from column sums.

    ``inside`` holds the sums over a slice ``(..., m)``, ``total`` the sums
    over all images (broadcastable); the reference is the rest, ``total -
    inside``. Ratios over nothing are NaN.
    """
    col = data.columns
    outside = total - inside

    def pair(numerator: str, denominator: str):
        return (
            _ratio(inside[..., col[numerator]], inside[..., col[denominator]]),
            _ratio(outside[..., col[numerator]], outside[..., col[denominator]]),
        )

    out = {
        "accuracy": pair("accuracy", "n"),
        "mean_confidence": pair("mean_confidence", "n"),
        "max_drop": pair("max_drop", "n"),
        "flip_rate": pair("flip_rate", "n"),
        "concentration": pair("concentration", "n_map"),
    }
    first, last = col["ece.0"], col["ece.0"] + _bins(col)
    out["ece"] = (
        _ratio(np.abs(inside[..., first:last]).sum(-1), inside[..., col["n"]]),
        _ratio(np.abs(outside[..., first:last]).sum(-1), outside[..., col["n"]]),
    )
    for name in data.region_names:
        out[f"region_share.{name}"] = pair(f"region_share.{name}", "n_map")
    for key in ("deletion_auc", "insertion_auc"):
        out[key] = pair(key, f"n_{key}")
    for c in range(data.n_classes):
        out[f"recall.{c}"] = pair(f"recall.{c}", f"n_class.{c}")
    return out


def _bins(columns: dict[str, int]) -> int:
    return sum(k.startswith("ece.") for k in columns)


def _ratio(numerator, denominator):
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    return np.divide(numerator, denominator, out=out, where=denominator > 0)


def _map_distances(data: _Data, sizes: np.ndarray) -> np.ndarray:
    """L2 distance between each slice's mean window map and the rest's."""
    sums = data.membership.T.astype(np.float64) @ data.grid
    total = data.grid.sum(axis=0)
    n = len(data.rows)
    inside = _ratio(sums, sizes[:, None])
    outside = _ratio(total[None, :] - sums, (n - sizes)[:, None])
    return np.sqrt(((inside - outside) ** 2).sum(axis=1))


# ----------------------------------------------------------------- intervals


def _bootstrap(data: _Data, judged_index: np.ndarray, settings: StatisticsSettings):
    """Percentile intervals of the overall values and of each judged slice.

    Returns ``({metric: (low, high)}, {(slice, metric): (low, high, gap_low,
    gap_high)})``.
    """
    n = len(data.rows)
    if n < 2:
        return {}, {}
    metrics = list(_metric_values(np.zeros((1, data.design.shape[1])), 0.0, data))
    rows = [np.flatnonzero(data.membership[:, j]) for j in judged_index]
    per_call = max(1, _OUTPUTS_PER_CALL // (2 * len(metrics)))
    batch = max(1, min(settings.n_bootstrap, _BATCH_ELEMENTS // n))

    overall: dict[str, tuple] = {}
    by_slice: dict[tuple[int, str], tuple] = {}
    groups = [
        list(range(s, min(s + per_call, len(rows))))
        for s in range(0, len(rows), per_call)
    ]
    for call, group in enumerate(groups or [[]]):
        with_overall = call == 0

        def statistic(resampled, axis=-1, group=group, with_overall=with_overall):
            return _bootstrap_statistic(
                resampled, data, [rows[g] for g in group], with_overall
            )

        distribution = _resample(statistic, n, batch, settings)
        low, high = _percentile_interval(distribution, settings.confidence_level)
        position = 0
        if with_overall:
            for metric in metrics:
                overall[metric] = (low[position], high[position])
                position += 1
        for g in group:
            for metric in metrics:
                by_slice[(int(judged_index[g]), metric)] = (
                    low[position],
                    high[position],
                    low[position + 1],
                    high[position + 1],
                )
                position += 2
    return overall, by_slice


def _resample(
    statistic, n: int, batch: int, settings: StatisticsSettings
) -> np.ndarray:
    """``(outputs, n_bootstrap)`` bootstrap distribution of ``statistic``.

    ``scipy.stats.bootstrap`` draws the resamples (of the row positions) and
    evaluates the statistic batch by batch. Its own interval is not used:
    resamples that leave a ratio undefined are NaN, which it reports as a
    degenerate distribution, and :func:`_percentile_interval` drops them.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap(
            (np.arange(n),),
            statistic,
            n_resamples=settings.n_bootstrap,
            batch=batch,
            vectorized=True,
            method="percentile",
            confidence_level=settings.confidence_level,
            rng=np.random.default_rng(settings.seed),
        )
    return np.asarray(result.bootstrap_distribution).reshape(-1, settings.n_bootstrap)


def _bootstrap_statistic(
    resampled, data: _Data, slice_rows, with_overall
) -> np.ndarray:
    """Values (and slice gaps) of every metric in a batch of resamples.

    ``resampled`` is ``(B, N)`` row positions; the count of each position in
    a resample is its weight. Output rows: the overall values (if asked),
    then per slice, per metric, the value and the gap to the rest. Sums are
    float32 matrix products (about 1e-6 relative, far below the intervals'
    resolution).
    """
    resampled = np.atleast_2d(resampled)
    batch, n = resampled.shape
    offsets = (np.arange(batch) * n)[:, None]
    counts = np.bincount((resampled + offsets).ravel(), minlength=batch * n)
    weights = np.ascontiguousarray(counts.reshape(batch, n).T, dtype=np.float32)
    design = data.design32
    total = (design.T @ weights).T.astype(np.float64)

    outputs = []
    if with_overall:
        zero = np.zeros_like(total)
        for value, _ in _metric_values(total, zero, data).values():
            outputs.append(value)
    for rows in slice_rows:
        inside = (design[rows].T @ weights[rows]).T.astype(np.float64)
        for value, reference in _metric_values(inside, total, data).values():
            outputs.append(value)
            outputs.append(value - reference)
    return np.stack(outputs)


def _percentile_interval(distribution: np.ndarray, level: float):
    """Percentile interval per output row, ignoring undefined resamples.

    An output defined in fewer than half of the resamples has no interval.
    """
    alpha = (1.0 - level) / 2.0
    defined = np.isfinite(distribution)
    enough = defined.mean(axis=1) >= 0.5
    low = np.full(len(distribution), np.nan)
    high = np.full(len(distribution), np.nan)
    complete = enough & defined.all(axis=1)
    if complete.any():
        q = np.quantile(distribution[complete], [alpha, 1.0 - alpha], axis=1)
        low[complete], high[complete] = q
    for i in np.flatnonzero(enough & ~complete):
        low[i], high[i] = np.quantile(distribution[i, defined[i]], [alpha, 1.0 - alpha])
    return low, high


# --------------------------------------------------------------------- tests


def _fisher_tests(data: _Data, judged_index: np.ndarray) -> dict:
    """Fisher exact p-values of accuracy, flip rate and per-class recall."""
    p_values: dict[tuple[int, str], float] = {}
    outcomes = {
        "accuracy": (data.values["correct"], None),
        "flip_rate": (data.values["flipped"], None),
    }
    for c in range(data.n_classes):
        outcomes[f"recall.{c}"] = (data.values["correct"], data.values["labels"] == c)
    for metric, (outcome, among) in outcomes.items():
        outcome = np.asarray(outcome, dtype=bool)
        among = np.ones(len(outcome), bool) if among is None else among
        hits = data.membership[among].T.astype(np.int64) @ outcome[among]
        size = data.membership[among].sum(axis=0)
        total_hits, total = int(outcome[among].sum()), int(among.sum())
        for j in judged_index:
            inside, rest = int(size[j]), total - int(size[j])
            if inside == 0 or rest == 0:
                continue
            table = [
                [int(hits[j]), inside - int(hits[j])],
                [total_hits - int(hits[j]), rest - (total_hits - int(hits[j]))],
            ]
            p_values[(int(j), metric)] = float(stats.fisher_exact(table).pvalue)
    return p_values


def _permutation_tests(
    data: _Data,
    judged_index: np.ndarray,
    settings: StatisticsSettings,
    n_tested: int,
    tested_metrics: set,
    undecided_below: float,
) -> dict:
    """Permutation p-values of the mean-gap metrics, ECE and map distance.

    Every test gets ``settings.n_permutations`` permutations; tests of
    metrics that a rule judges whose p-value is still below
    ``undecided_below`` continue up to ``n_tested``.
    """
    rng = np.random.default_rng([settings.seed, 1])
    p_values: dict[tuple[int, str], float] = {}
    if len(judged_index) == 0:
        return p_values
    n = len(data.rows)
    calibration = np.zeros((n, _bins(data.columns)))
    calibration[np.arange(n), data.values["calibration_bin"]] = data.values[
        "calibration"
    ]
    blocks = {"ece": calibration, "map_distance": data.grid}
    regions = [f"region_share.{r}" for r in data.region_names]
    populations = [
        (np.ones(n, bool), ["mean_confidence", "max_drop", "ece", "map_distance"]),
        (np.isfinite(data.values["concentration"]), ["concentration", *regions]),
        (np.isfinite(data.values["deletion_auc"]), ["deletion_auc"]),
        (np.isfinite(data.values["insertion_auc"]), ["insertion_auc"]),
    ]
    for rows, metrics in populations:
        if rows.sum() < 2:
            continue
        for tested in (True, False):
            chosen = [m for m in metrics if (m in tested_metrics) == tested]
            if not chosen:
                continue
            columns = {
                m: blocks[m][rows] if m in blocks else data.values[m][rows][:, None]
                for m in chosen
            }
            p_values |= _permutation_population(
                data.membership[rows][:, judged_index],
                judged_index,
                columns,
                settings.n_permutations,
                n_tested if tested else settings.n_permutations,
                undecided_below,
                rng,
            )
    return p_values


def _permutation_population(
    membership, slice_ids, columns, n_first, n_total, undecided_below, rng
) -> dict:
    """p-values for one population: the images where these metrics are defined.

    ``membership`` ``(n, S)`` of the population's images in the judged
    slices ``slice_ids``; ``columns`` maps each metric to its per-image
    values ``(n, width)`` (width 1 for means, bins for ``ece``, windows for
    ``map_distance``).

    Every test gets ``n_first`` permutations. Tests whose p-value is then
    still below ``undecided_below`` get more, up to ``n_total``; the others
    stop, as no rule could judge them significant (their exact value above
    every rule's ``max_p`` changes no Holm or Benjamini-Hochberg decision).
    """
    layout, position = {}, 0
    for name, block in columns.items():
        layout[name] = slice(position, position + block.shape[1])
        position += block.shape[1]
    values = np.concatenate(list(columns.values()), axis=1)
    n = len(values)
    sizes = membership.sum(axis=0)
    testable = (sizes > 0) & (sizes < n)
    if not testable.any():
        return {}
    membership = membership[:, testable]
    sizes = sizes[testable]
    slice_ids = slice_ids[testable]
    observed = _permutation_statistics(
        membership.T.astype(np.float64) @ values, values.sum(axis=0), sizes, n, layout
    )

    exceed = _exceedances(values, sizes, observed, layout, n_first, rng)
    counts = {name: (exceed[name], np.full(len(sizes), n_first)) for name in layout}
    if n_total > n_first:
        open_tests = {
            name: (1.0 + exceed[name]) / (1.0 + n_first) < undecided_below
            for name in layout
        }
        chosen_slices = np.logical_or.reduce(list(open_tests.values()))
        chosen_metrics = [name for name in layout if open_tests[name].any()]
        if chosen_slices.any():
            sub_columns = {name: columns[name] for name in chosen_metrics}
            sub_layout, position = {}, 0
            for name, block in sub_columns.items():
                sub_layout[name] = slice(position, position + block.shape[1])
                position += block.shape[1]
            sub_observed = {
                name: observed[name][chosen_slices] for name in chosen_metrics
            }
            more = _exceedances(
                np.concatenate(list(sub_columns.values()), axis=1),
                sizes[chosen_slices],
                sub_observed,
                sub_layout,
                n_total - n_first,
                rng,
            )
            for name in chosen_metrics:
                extra = np.zeros(len(sizes), np.int64)
                extra[chosen_slices] = more[name]
                refined = open_tests[name]
                total_exceed, total_count = counts[name]
                counts[name] = (
                    np.where(refined, total_exceed + extra, total_exceed),
                    np.where(refined, n_total, total_count),
                )

    p_values = {}
    for name, (exceeded, performed) in counts.items():
        p = (1.0 + exceeded) / (1.0 + performed)
        for j, value in zip(slice_ids, p, strict=True):
            p_values[(int(j), name)] = float(value)
    return p_values


def _exceedances(values, sizes, observed, layout, n_perm, rng) -> dict:
    """How often a random set of each size reaches the observed statistics.

    ``values`` ``(n, m)`` per-image columns, ``sizes`` ``(S,)`` slice sizes,
    ``observed`` the statistics of the real slices. Sums are float32 for
    speed, so a permuted statistic within :data:`_TIE_TOLERANCE` times the
    metric's largest value of the observed one counts as reaching it.
    """
    n = len(values)
    total = values.sum(axis=0)
    prefix = np.minimum(sizes, n - sizes)
    complement = sizes > n - sizes
    distinct, which = np.unique(prefix, return_inverse=True)
    tolerance = {
        name: _TIE_TOLERANCE * float(np.abs(values[:, cols]).max(initial=0.0))
        for name, cols in layout.items()
    }
    exceed = {name: np.zeros(len(sizes), np.int64) for name in layout}

    transposed = np.ascontiguousarray(values.T, dtype=np.float32)
    longest = int(distinct[-1])
    starts = np.concatenate([[0], distinct[:-1]])
    batch = max(1, min(n_perm, _BATCH_ELEMENTS // max(1, longest * values.shape[1])))
    done = 0
    while done < n_perm:
        b = min(batch, n_perm - done)
        order = rng.permuted(np.tile(np.arange(n), (b, 1)), axis=1)[:, :longest]
        gathered = np.take(transposed, order.ravel(), axis=1)
        bounds = (starts[None, :] + longest * np.arange(b)[:, None]).ravel()
        segments = np.add.reduceat(gathered, bounds, axis=1)
        prefix_sums = np.cumsum(segments.reshape(-1, b, len(distinct)), axis=2)
        null_sums = prefix_sums[:, :, which].transpose(1, 2, 0)  # (b, slices, m)
        null_sums = np.where(complement[None, :, None], total - null_sums, null_sums)
        null = _permutation_statistics(null_sums, total, sizes, n, layout)
        for name, stat in null.items():
            threshold = observed[name] - tolerance[name]
            exceed[name] += (stat >= threshold[None, :]).sum(axis=0)
        done += b
    return exceed


def _permutation_statistics(inside, total, sizes, n, layout) -> dict[str, np.ndarray]:
    """Test statistic per metric from slice sums ``(..., slices, m)``.

    Mean metrics and ECE: absolute gap between slice and rest; map distance:
    L2 distance between their mean window maps.
    """
    outside = total - inside
    size = sizes.astype(np.float64)[:, None]
    rest = (n - sizes).astype(np.float64)[:, None]
    out = {}
    for name, cols in layout.items():
        a, b = inside[..., cols], outside[..., cols]
        if name == "ece":
            gap = np.abs(a).sum(-1) / size[:, 0] - np.abs(b).sum(-1) / rest[:, 0]
            out[name] = np.abs(gap)
        elif name == "map_distance":
            out[name] = np.sqrt(((a / size - b / rest) ** 2).sum(-1))
        else:
            out[name] = np.abs(a[..., 0] / size[:, 0] - b[..., 0] / rest[:, 0])
    return out


def _family_size(values, distance, judged, tested_metrics) -> int:
    """Number of tests in the rules' family (judged slices x tested metrics)."""
    count = 0
    for metric in tested_metrics:
        if metric == "map_distance":
            count += int((judged & np.isfinite(distance)).sum())
        elif metric in values:
            value, reference = values[metric]
            count += int((judged & np.isfinite(value) & np.isfinite(reference)).sum())
    return count


def _permutations_needed(minimum: int, family_size: int, alpha: float) -> int:
    """Permutations for the smallest p-value to pass ``alpha`` after correction."""
    needed = math.ceil(2.0 * family_size / alpha) - 1
    if needed > MAX_PERMUTATIONS:
        logger.warning(
            "%d tests in the family need %d permutations for a permutation test "
            "to pass p < %g after correction; using %d, so map and ECE findings "
            "can be missed. Judge fewer slices (min_slice_size) or fewer metrics.",
            family_size,
            needed,
            alpha,
            MAX_PERMUTATIONS,
        )
    chosen = int(min(max(minimum, needed), MAX_PERMUTATIONS))
    if chosen > minimum:
        logger.info(
            "using %d permutations (not %d) so that %d corrected tests can reach "
            "p < %g",
            chosen,
            minimum,
            family_size,
            alpha,
        )
    return chosen


def _correct(p_values: dict, tested_metrics: set, method: str):
    """Corrected p-values of both families and the test used per metric."""
    adjusted: dict[tuple[int, str], float] = {}
    for in_family in (True, False):
        keys = [
            k
            for k, p in p_values.items()
            if (k[1] in tested_metrics) == in_family and math.isfinite(p)
        ]
        if not keys:
            continue
        corrected = multipletests([p_values[k] for k in keys], method=method)[1]
        adjusted |= dict(zip(keys, (float(p) for p in corrected), strict=True))
    tests = {}
    for _, metric in p_values:
        fisher = metric in FISHER_METRICS or metric.startswith("recall.")
        tests[metric] = "fisher_exact" if fisher else "permutation"
    return adjusted, tests


def _test_entry(j, metric, p_values, adjusted, tests) -> dict:
    key = (int(j), metric)
    if key not in p_values:
        return {"p_value": None, "p_adjusted": None, "test": None}
    return {
        "p_value": _num(p_values[key]),
        "p_adjusted": _num(adjusted.get(key)),
        "test": tests[metric],
    }


# ------------------------------------------------------------------ examples


def _examples(data: _Data, slice_set, judged_index) -> list[dict]:
    """Example rows per judged slice: most fragile, misclassified, typical.

    Most fragile: the largest ``max_drop``; misclassified: the most confident
    wrong prediction; typical: the image whose window map is nearest to the
    slice's mean window map.
    """
    examples = []
    for j in judged_index:
        members = np.flatnonzero(data.membership[:, j])
        name = slice_set.slices[j].name
        drop = data.values["max_drop"][members]
        fragile = members[int(np.argmax(drop))]
        examples.append(
            {"slice": name, "kind": "most_fragile", "row": int(data.rows[fragile])}
        )
        wrong = members[~data.values["correct"][members]]
        if len(wrong):
            chosen = wrong[int(np.argmax(data.values["confidence"][wrong]))]
            examples.append(
                {"slice": name, "kind": "misclassified", "row": int(data.rows[chosen])}
            )
        grid = data.grid[members]
        nearest = members[int(np.argmin(((grid - grid.mean(axis=0)) ** 2).sum(axis=1)))]
        examples.append(
            {"slice": name, "kind": "typical", "row": int(data.rows[nearest])}
        )
    return examples


# ------------------------------------------------------------------- helpers


def _num(x) -> float | None:
    """A JSON number, or None for missing and non-finite values."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _pair(low, high) -> list | None:
    low, high = _num(low), _num(high)
    return None if low is None or high is None else [low, high]
