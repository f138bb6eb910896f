"""Run history: the index of all runs under an output folder, and run comparison.

The output folder holds one folder per run, each with the ``results.json``
that :func:`audit.report.write_report` wrote. :func:`update_index` lists them
in ``index.html`` (newest first) with verdict, finding counts, key metrics and
their trend; runs still under way or killed before their results were written
are listed as incomplete. :func:`compare_runs` says what changed between two
runs: the verdict, the findings that appeared, were resolved or changed
severity, and the metrics that moved. A finding is the same finding in both
runs when it has the same slice and metric (finding ids are numbered per run).
A metric change is marked notable when both runs judged the slice and their
95% confidence intervals do not overlap; this is a reading aid, not a test.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from . import figures
from .checkpoint import atomic_write_text
from .report import (
    REPORT_FILE,
    RESULTS_FILE,
    SEVERITIES,
    TABLE_METRICS,
    format_gap,
    format_time,
    format_value,
    metric_info,
    template_environment,
)

logger = logging.getLogger(__name__)

INDEX_FILE = "index.html"
TREND_METRICS = ["accuracy", "ece", "max_drop", "flip_rate"]
MAX_TEXT_SLICE_CHANGES = 40
COUNT_KEYS = (*SEVERITIES, "judged", "too_few")
# Settings of how a run was executed, not of what it measured: runs that differ
# only in these are comparable.
RUN_ONLY_CONFIG_KEYS = frozenset(
    {"run_id", "output", "checkpoint_seconds", "chunk_size", "dask"}
)
# Counts that follow from the number of images, not from the occlusion settings.
RUN_ONLY_METHOD_KEYS = frozenset({"forward_passes_total"})


@dataclass(frozen=True)
class RunRecord:
    """One folder under the output root and what could be read from it."""

    folder: Path
    status: str  # "complete" | "incomplete" | "unreadable"
    results: dict | None
    started: datetime
    problem: str = ""

    @property
    def run_id(self) -> str:
        run = (self.results or {}).get("run", {})
        return str(run.get("id") or self.folder.name)


def list_runs(output_root: Path) -> list[RunRecord]:
    """Every run folder under ``output_root``, newest first.

    A run's time is its ``run.started_at``; a folder without readable results
    is placed by its modification time.
    """
    output_root = Path(output_root)
    if not output_root.is_dir():
        return []
    records = [
        _read_run(folder)
        for folder in output_root.iterdir()
        if folder.is_dir() and not folder.name.startswith(".")
    ]
    return sorted(records, key=lambda r: (r.started, r.folder.name), reverse=True)


def update_index(output_root: Path) -> Path:
    """Write ``output_root/index.html`` listing every run; return its path."""
    output_root = Path(output_root)
    output_root.mkdir(parents=True, exist_ok=True)
    runs = list_runs(output_root)
    context = {
        "title": "Bias audit runs",
        "subtitle": f"{plural(len(runs), 'run')} in {output_root.resolve().name}",
        "columns": [metric_info(k) for k in TREND_METRICS],
        "rows": _index_rows(runs),
        "trends": _trends(runs),
    }
    html = template_environment().get_template("index.html.j2").render(**context)
    path = output_root / INDEX_FILE
    atomic_write_text(path, html)
    logger.info("index of %d runs written to %s", len(runs), path)
    return path


def compare_runs(run_a: Path, run_b: Path) -> dict:
    """What changed from run A to run B, as a plain JSON-ready dict.

    ``run_a`` and ``run_b`` are run folders (or their ``results.json``).
    Raises ``FileNotFoundError`` naming the folder when a run has no results.
    """
    a, b = _load_results(run_a), _load_results(run_b)
    findings = _compare_findings(a.get("findings", []), b.get("findings", []))
    slices, added, removed = _compare_slices(a.get("slices", []), b.get("slices", []))
    verdict_a, verdict_b = a.get("verdict"), b.get("verdict")
    return {
        "a": _run_info(run_a, a),
        "b": _run_info(run_b, b),
        "verdict": {"a": verdict_a, "b": verdict_b, "changed": verdict_a != verdict_b},
        "counts": {
            key: {
                "a": _int(a.get("counts", {}).get(key)),
                "b": _int(b.get("counts", {}).get(key)),
                "change": _difference(
                    _int(b.get("counts", {}).get(key)),
                    _int(a.get("counts", {}).get(key)),
                ),
            }
            for key in COUNT_KEYS
        },
        "warnings": _comparability(a, b),
        "findings": findings,
        "overall": _compare_metrics(
            a.get("overall", {}).get("metrics", {}),
            b.get("overall", {}).get("metrics", {}),
            judged=True,
        ),
        "slices": slices,
        "slices_added": added,
        "slices_removed": removed,
    }


def render_compare_text(diff: dict) -> str:
    """The comparison as plain text for a terminal, most important first."""
    a, b = diff["a"], diff["b"]
    verdict = diff["verdict"]
    lines = [
        f"A: {a['id']}  started {format_time(a['started_at'])}  "
        f"verdict {str(verdict['a']).upper()}",
        f"B: {b['id']}  started {format_time(b['started_at'])}  "
        f"verdict {str(verdict['b']).upper()}",
        "",
        f"Verdict: {verdict['a']} -> {verdict['b']}"
        + (" (changed)" if verdict["changed"] else " (unchanged)"),
        "Findings by severity: "
        + ", ".join(
            f"{key} {diff['counts'][key]['a']} -> {diff['counts'][key]['b']}"
            for key in SEVERITIES
        ),
    ]
    for warning in diff["warnings"]:
        lines.append(f"Warning: {warning}")

    findings = diff["findings"]
    for title, key, mark in (
        ("appeared", "appeared", "+"),
        ("resolved", "resolved", "-"),
    ):
        items = findings[key]
        lines += ["", f"Findings {title} ({len(items)}):"]
        lines += [
            f"  {mark} [{f.get('severity')}] {f.get('slice')} {f.get('metric')}: "
            f"{f.get('statement', '')}"
            for f in items
        ] or ["  none"]
    changed = findings["changed"]
    lines += ["", f"Findings that changed severity ({len(changed)}):"]
    lines += [
        f"  ~ {c['slice']} {c['metric']}: {c['a']['severity']} -> {c['b']['severity']}"
        for c in changed
    ] or ["  none"]
    lines.append(f"Findings in both runs at the same severity: {findings['unchanged']}")

    lines += ["", "Whole data set:"]
    lines += [f"  {_change_text(m)}" for m in diff["overall"]] or ["  no metrics"]

    notable = [(s, None) for s in diff["slices"] if s["status_changed"]]
    notable += sorted(
        ((s, m) for s in diff["slices"] for m in s["metrics"] if m["notable"]),
        key=lambda pair: _metric_rank(pair[1]["metric"]),
    )
    lines += [
        "",
        f"Slice changes with non-overlapping 95% intervals or a new status "
        f"({len(notable)}, of {len(diff['slices'])} slices in both runs):",
    ]
    for s, metric in notable[:MAX_TEXT_SLICE_CHANGES]:
        if metric is None:
            lines.append(
                f"  {s['name']}: {_status_text(s['status_a'], s['n_a'])} -> "
                f"{_status_text(s['status_b'], s['n_b'])}"
            )
        else:
            lines.append(f"  {s['name']}  {_change_text(metric)}")
    if len(notable) > MAX_TEXT_SLICE_CHANGES:
        lines.append(
            f"  ... and {len(notable) - MAX_TEXT_SLICE_CHANGES} more "
            "(write the comparison as HTML to see all)"
        )
    if not notable:
        lines.append("  none")
    for title, names in (
        ("Slices only in A", diff["slices_removed"]),
        ("Slices only in B", diff["slices_added"]),
    ):
        if names:
            lines += ["", f"{title} ({len(names)}): " + ", ".join(names)]
    return "\n".join(lines) + "\n"


def write_compare_html(diff: dict, path: Path) -> Path:
    """Write the comparison as a self-contained HTML page; return its path."""
    path = Path(path)
    verdict = diff["verdict"]
    context = {
        "title": f"Comparison of {diff['a']['id']} and {diff['b']['id']}",
        "subtitle": f"verdict {verdict['a']} → {verdict['b']}",
        "diff": diff,
        "a_started": format_time(diff["a"]["started_at"]),
        "b_started": format_time(diff["b"]["started_at"]),
        "counts": [
            {
                "key": key.replace("_", " "),
                **diff["counts"][key],
                "change_text": _signed(diff["counts"][key]["change"]),
            }
            for key in COUNT_KEYS
        ],
        "overall": [_change_row(m) for m in diff["overall"]],
        "slices": [
            {
                "name": s["name"],
                "status": (
                    f"{_status_text(s['status_a'], s['n_a'])} → "
                    f"{_status_text(s['status_b'], s['n_b'])}"
                ),
                "status_changed": s["status_changed"],
                "metrics": [_change_row(m) for m in s["metrics"] if m["notable"]],
                "n_metrics": len(s["metrics"]),
            }
            for s in diff["slices"]
        ],
    }
    html = template_environment().get_template("compare.html.j2").render(**context)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, html)
    return path


def _read_run(folder: Path) -> RunRecord:
    results_path = folder / RESULTS_FILE
    modified = datetime.fromtimestamp(folder.stat().st_mtime, UTC)
    if not results_path.is_file():
        return RunRecord(folder, "incomplete", None, modified, "no results.json yet")
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
        if not isinstance(results, dict):
            raise ValueError("results.json does not hold an object")
    except (OSError, ValueError) as e:
        logger.warning("cannot read %s: %s", results_path, e)
        return RunRecord(folder, "unreadable", None, modified, str(e))
    started = _parse_time(results.get("run", {}).get("started_at")) or modified
    return RunRecord(folder, "complete", results, started)


def _parse_time(value) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _index_rows(runs: list[RunRecord]) -> list[dict]:
    older: dict[str, RunRecord] = {}
    rows = []
    for record in reversed(runs):
        results = record.results or {}
        dataset = str(results.get("dataset", {}).get("name", ""))
        previous = older.get(dataset)
        rows.append(_index_row(record, previous))
        if record.status == "complete":
            older[dataset] = record
    return rows[::-1]


def _index_row(record: RunRecord, previous: RunRecord | None) -> dict:
    results = record.results or {}
    counts = results.get("counts", {})
    report = record.folder / REPORT_FILE
    metrics = results.get("overall", {}).get("metrics", {})
    before = (
        (previous.results or {}).get("overall", {}).get("metrics", {})
        if previous
        else {}
    )
    cells = []
    for key in TREND_METRICS:
        info = metric_info(key)
        value = _value(metrics.get(key))
        change = _difference(value, _value(before.get(key)))
        cells.append(
            {
                "value": format_value(value, info.percent),
                "change": format_gap(change, info.percent)
                if change is not None
                else "",
                "direction": _direction(change),
            }
        )
    verdict = str(results.get("verdict", "")).lower()
    return {
        "id": record.run_id,
        "href": (
            urllib.parse.quote(f"{record.folder.name}/{REPORT_FILE}")
            if report.is_file()
            else None
        ),
        "status": record.status,
        "problem": record.problem,
        "started": format_time(results.get("run", {}).get("started_at"))
        if record.results
        else format_time(record.started.isoformat()),
        "dataset": str(results.get("dataset", {}).get("name", "—")),
        "model": str(
            results.get("model", {}).get("tag")
            or results.get("model", {}).get("source")
            or "—"
        ),
        "verdict": verdict if verdict in ("pass", "warn", "fail") else "unknown",
        "counts": [_int(counts.get(key)) for key in COUNT_KEYS],
        "cells": cells,
        "duration": _duration(results.get("run", {}).get("duration_seconds")),
    }


def _trends(runs: list[RunRecord]) -> list[dict]:
    """Per data set, a small chart of each key metric over its complete runs."""
    groups: dict[str, list[dict]] = {}
    for record in reversed(runs):
        if record.status == "complete":
            name = str(record.results.get("dataset", {}).get("name", "—"))
            groups.setdefault(name, []).append(record.results)
    trends = []
    for name, series in groups.items():
        charts = []
        findings = [
            sum(_int(r.get("counts", {}).get(s)) or 0 for s in SEVERITIES)
            for r in series
        ]
        charts.append(
            _trend_chart("Findings", findings, False, name, lambda v: f"{v:.0f}")
        )
        for key in TREND_METRICS:
            info = metric_info(key)
            values = [
                _value(r.get("overall", {}).get("metrics", {}).get(key)) for r in series
            ]
            charts.append(
                _trend_chart(
                    info.label,
                    values,
                    info.percent,
                    name,
                    lambda v, p=info.percent: format_value(v, p),
                )
            )
        trends.append(
            {
                "dataset": name,
                "runs": len(series),
                "runs_text": plural(len(series), "run"),
                "charts": charts,
            }
        )
    return trends


def _trend_chart(label, values, percent, dataset, fmt) -> dict:
    known = [v for v in values if v is not None]
    latest = fmt(known[-1]) if known else "—"
    first = fmt(known[0]) if known else "—"
    return {
        "label": label,
        "latest": latest,
        "uri": figures.sparkline_uri(values, percent=percent),
        "alt": (
            f"{label} of {dataset} over its last {len(values)} runs, oldest first: "
            f"from {first} to {latest}"
        ),
    }


def _load_results(run: Path) -> dict:
    run = Path(run)
    path = run if run.suffix == ".json" else run / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{run} has no {RESULTS_FILE}: give a run folder whose audit finished"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _run_info(path: Path, results: dict) -> dict:
    run = results.get("run", {})
    dataset = results.get("dataset", {})
    model = results.get("model", {})
    return {
        "id": str(run.get("id") or Path(path).name),
        "path": str(path),
        "started_at": run.get("started_at"),
        "verdict": results.get("verdict"),
        "dataset": dataset.get("name"),
        "fingerprint": dataset.get("fingerprint"),
        "model": model.get("tag") or model.get("source"),
    }


def _comparability(a: dict, b: dict) -> list[str]:
    warnings = []
    checks = [
        ("dataset fingerprint", ("dataset", "fingerprint")),
        ("model", ("model", "tag")),
        ("schema version", ("schema_version",)),
    ]
    for label, keys in checks:
        value_a, value_b = _get(a, keys), _get(b, keys)
        if value_a != value_b:
            warnings.append(
                f"the {label} differs ({value_a} vs {value_b}): changes may come "
                "from that, not from the model's behaviour"
            )
    method_a = _without(a.get("method"), RUN_ONLY_METHOD_KEYS)
    method_b = _without(b.get("method"), RUN_ONLY_METHOD_KEYS)
    if method_a != method_b:
        warnings.append(
            "the occlusion settings differ: attribution metrics are not comparable"
        )
    config_a = _without(a.get("config"), RUN_ONLY_CONFIG_KEYS)
    config_b = _without(b.get("config"), RUN_ONLY_CONFIG_KEYS)
    if config_a != config_b and method_a == method_b:
        warnings.append("the configurations differ (rules, slices or statistics)")
    return warnings


def plural(n: int, word: str) -> str:
    """``1 run``, ``2 runs``: a count with its noun in the right number."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _without(block, keys: frozenset) -> dict:
    """A results block without the keys that describe how a run was executed
    rather than what it measured."""
    if not isinstance(block, dict):
        return {}
    return {k: v for k, v in block.items() if k not in keys}


def _finding_key(finding: dict) -> tuple[str, str]:
    return (str(finding.get("slice")), str(finding.get("metric")))


def _by_key(findings: list[dict]) -> dict[tuple[str, str], dict]:
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    keyed: dict[tuple[str, str], dict] = {}
    for finding in findings:
        key = _finding_key(finding)
        held = keyed.get(key)
        if held is None or rank.get(finding.get("severity"), 9) < rank.get(
            held.get("severity"), 9
        ):
            keyed[key] = finding
    return keyed


def _compare_findings(a: list[dict], b: list[dict]) -> dict:
    keyed_a, keyed_b = _by_key(a), _by_key(b)
    appeared = [keyed_b[k] for k in keyed_b if k not in keyed_a]
    resolved = [keyed_a[k] for k in keyed_a if k not in keyed_b]
    changed = []
    unchanged = 0
    for key in keyed_a.keys() & keyed_b.keys():
        fa, fb = keyed_a[key], keyed_b[key]
        if fa.get("severity") == fb.get("severity"):
            unchanged += 1
            continue
        changed.append(
            {
                "slice": key[0],
                "metric": key[1],
                "a": _finding_summary(fa),
                "b": _finding_summary(fb),
            }
        )
    changed.sort(key=lambda c: (c["slice"], c["metric"]))
    return {
        "appeared": appeared,
        "resolved": resolved,
        "changed": changed,
        "unchanged": unchanged,
    }


def _finding_summary(finding: dict) -> dict:
    return {
        key: finding.get(key)
        for key in ("id", "severity", "value", "reference", "p_value", "statement")
    }


def _compare_slices(a: list[dict], b: list[dict]) -> tuple[list[dict], list, list]:
    by_name_a = {s["name"]: s for s in a}
    by_name_b = {s["name"]: s for s in b}
    both = [s["name"] for s in b if s["name"] in by_name_a]
    slices = []
    for name in both:
        sa, sb = by_name_a[name], by_name_b[name]
        judged = sa.get("status") == "judged" and sb.get("status") == "judged"
        slices.append(
            {
                "name": name,
                "status_a": sa.get("status"),
                "status_b": sb.get("status"),
                "n_a": _int(sa.get("n")),
                "n_b": _int(sb.get("n")),
                "status_changed": sa.get("status") != sb.get("status"),
                "metrics": _compare_metrics(
                    sa.get("metrics", {}), sb.get("metrics", {}), judged
                ),
            }
        )
    added = [s["name"] for s in b if s["name"] not in by_name_a]
    removed = [s["name"] for s in a if s["name"] not in by_name_b]
    return slices, added, removed


def _compare_metrics(a: Mapping, b: Mapping, judged: bool) -> list[dict]:
    rows = []
    for key in [k for k in b if k in a]:
        stats_a, stats_b = a[key], b[key]
        if not (isinstance(stats_a, Mapping) and isinstance(stats_b, Mapping)):
            continue
        value_a, value_b = _value(stats_a), _value(stats_b)
        if value_a is None and value_b is None:
            continue
        ci_a, ci_b = _interval(stats_a.get("ci")), _interval(stats_b.get("ci"))
        separated = (
            judged
            and ci_a is not None
            and ci_b is not None
            and (ci_a[1] < ci_b[0] or ci_b[1] < ci_a[0])
        )
        rows.append(
            {
                "metric": key,
                "a": value_a,
                "b": value_b,
                "change": _difference(value_b, value_a),
                "ci_a": ci_a,
                "ci_b": ci_b,
                "notable": bool(separated),
            }
        )
    return rows


def _change_text(row: dict) -> str:
    info = metric_info(row["metric"])
    change = (
        format_gap(row["change"], info.percent) if row["change"] is not None else ""
    )
    return (
        f"{info.label}: {format_value(row['a'], info.percent)} -> "
        f"{format_value(row['b'], info.percent)}" + (f" ({change})" if change else "")
    )


def _change_row(row: dict) -> dict:
    info = metric_info(row["metric"])
    return {
        "label": info.label,
        "a": format_value(row["a"], info.percent),
        "b": format_value(row["b"], info.percent),
        "change": format_gap(row["change"], info.percent)
        if row["change"] is not None
        else "—",
        "direction": _direction(row["change"]),
        "notable": row["notable"],
    }


def _metric_rank(key: str) -> int:
    """Order of metrics in a list of changes: the report's main metrics first."""
    return TABLE_METRICS.index(key) if key in TABLE_METRICS else len(TABLE_METRICS)


def _status_text(status, n) -> str:
    size = f"n = {n:,}" if n is not None else "n unknown"
    return f"judged, {size}" if status == "judged" else f"too few to judge, {size}"


def _value(stats) -> float | None:
    if not isinstance(stats, Mapping):
        return None
    value = stats.get("value")
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _interval(ci) -> tuple[float, float] | None:
    if not (isinstance(ci, list | tuple) and len(ci) == 2):
        return None
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in ci):
        return None
    return (float(ci[0]), float(ci[1]))


def _int(value) -> int | None:
    if isinstance(value, int | float) and math.isfinite(value):
        return int(value)
    return None


def _difference(new, old):
    if new is None or old is None:
        return None
    return new - old


def _direction(change) -> str:
    if change is None or change == 0:
        return "flat"
    return "up" if change > 0 else "down"


def _signed(change) -> str:
    if change is None:
        return "—"
    return f"{change:+d}" if change else "0"


def _duration(seconds) -> str:
    if isinstance(seconds, int | float) and math.isfinite(seconds):
        return f"{seconds:.1f} s"
    return "—"


def _get(tree: dict, keys: tuple[str, ...]):
    for key in keys:
        if not isinstance(tree, Mapping):
            return None
        tree = tree.get(key)
    return tree
