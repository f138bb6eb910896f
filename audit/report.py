"""The run's outputs: ``results.json``, ``maps.npz`` and the HTML bias report.

:func:`write_report` is what a run calls once its statistics are done; it
writes the three files into the run folder, each one atomically (a temporary
file renamed into place), so a reader or a killed job never sees half a file.
:func:`render_html` returns the report as a string.

The report is one self-contained HTML file: pictures are inline ``data:``
URIs, the style sheet is inline, there are no scripts, and a
Content-Security-Policy forbids loading anything else, so it opens offline or
from a mail attachment. All text that comes from the data (slice names, class
names, file ids, config values) goes through Jinja2's autoescaping.

The report draws aggregated maps only. To keep a large audit's report small
(a 10,000-image MNIST audit with 40 slices is well under 1 MB), maps of slices
too small to judge are not drawn, at most ``MAX_MAP_SLICES`` slices get maps,
at most ``MAX_EXAMPLES_PER_KIND`` examples of each kind are shown per slice,
and maps larger than ``MAX_MAP_SIDE`` (``MAX_CLASS_MAP_SIDE`` in the slice x
class grid) are block-averaged. The report says what it left out; the full
arrays are in ``maps.npz``.

Arrays given to :func:`write_report` and :func:`render_html`::

    overall_map       (H, W)        mean normalised attribution over all images
    slice_maps        (S, H, W)     per slice, in the order of results["slices"]
    rest_maps         (S, H, W)     mean over the images outside each slice
    slice_class_maps  (S, C, H, W)  NaN where a slice has no image of a class
    examples          list of dicts: slice (name), kind ("most_fragile",
                      "misclassified" or "typical"), image (H, W, C) float in
                      [0, 1], map (H, W), label, pred, confidence, id
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import jinja2
import numpy as np

from . import figures
from .checkpoint import atomic_write_bytes, atomic_write_text
from .datasets import WRITER_GROUP_COLUMN
from .slices import SliceSettings

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
MAPS_FILE = "maps.npz"
REPORT_FILE = "report.html"
TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "reports" / "templates"

MAX_MAP_SLICES = 60
MAX_EXAMPLES_PER_KIND = 2
MAX_MAP_SIDE = 64
MAX_CLASS_MAP_SIDE = 32

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)
ATTRIBUTION_LABEL = (
    "mean normalised attribution (red: occluding the region lowers the target "
    "output; blue: raises it)"
)
EXAMPLE_KINDS = {
    "most_fragile": "Most fragile",
    "misclassified": "Misclassified",
    "typical": "Typical",
}
SEVERITIES = ("high", "medium", "low")

BAD_ARRAY = (
    "arrays[{key!r}] has shape {shape}, expected {expected}; the report draws one "
    "map per slice of results['slices'] ({n_slices} slices) at the image size"
)


@dataclass(frozen=True)
class Metric:
    """How one metric of ``results.json`` is named and printed."""

    key: str
    label: str
    percent: bool
    help: str


METRICS = {
    m.key: m
    for m in [
        Metric("accuracy", "Accuracy", True, "share of images classified correctly"),
        Metric(
            "mean_confidence",
            "Confidence",
            True,
            "mean probability of the predicted class",
        ),
        Metric(
            "ece",
            "ECE",
            False,
            "expected calibration error: mean gap between confidence and accuracy",
        ),
        Metric(
            "max_drop",
            "Max drop",
            False,
            "fragility: mean largest fall of the predicted class's probability "
            "when one window is occluded",
        ),
        Metric(
            "flip_rate",
            "Flip rate",
            True,
            "share of images whose prediction changes when one window is occluded",
        ),
        Metric(
            "concentration",
            "Concentration",
            False,
            "how much of the attribution falls in the strongest windows",
        ),
        Metric(
            "deletion_auc",
            "Deletion AUC",
            False,
            "area under the deletion curve (lower: maps more faithful)",
        ),
        Metric(
            "insertion_auc",
            "Insertion AUC",
            False,
            "area under the insertion curve (higher: maps more faithful)",
        ),
        Metric(
            "map_distance",
            "Map distance",
            False,
            "distance between the slice's mean map and the rest's",
        ),
    ]
}
TABLE_METRICS = [
    "accuracy",
    "mean_confidence",
    "ece",
    "max_drop",
    "flip_rate",
    "concentration",
]
CHART_GROUPS = [
    ("Performance by slice", ["accuracy", "mean_confidence", "ece"]),
    ("Attribution by slice", ["max_drop", "flip_rate", "concentration"]),
]
WRITER_METRICS = ["accuracy", "ece", "max_drop", "flip_rate"]


def write_report(run_dir: Path, results: dict, arrays: dict) -> Path:
    """Write results.json, maps.npz and report.html into ``run_dir``; return the
    report's path.

    Everything is rendered in memory first, so invalid input raises before any
    file is touched. ``results.json`` is strict JSON (NaN and infinities become
    null) and gains a ``report`` block with the numbers only the report adds:
    the colour scale, the examples shown and what was left out.
    """
    run_dir = Path(run_dir)
    view = _View(results, arrays)
    html = view.render()
    document = to_json_safe({**results, "report": view.report_block()})
    text = json.dumps(document, indent=2, allow_nan=False, ensure_ascii=False)
    maps = _maps_npz(results, view.arrays)

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / MAPS_FILE, maps)
    atomic_write_text(run_dir / RESULTS_FILE, text + "\n")
    report_path = run_dir / REPORT_FILE
    atomic_write_text(report_path, html)
    logger.info(
        "report %s written (%.0f kB)", report_path, report_path.stat().st_size / 1024
    )
    return report_path


def render_html(results: dict, arrays: dict) -> str:
    """The HTML bias report for ``results`` and ``arrays``, as one string."""
    return _View(results, arrays).render()


def to_json_safe(value):
    """``value`` with NumPy types made plain and NaN/infinity replaced by None."""
    if isinstance(value, Mapping):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return to_json_safe(value.tolist())
    if isinstance(value, list | tuple | set | frozenset):
        return [to_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return to_json_safe(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def template_environment() -> jinja2.Environment:
    """The Jinja2 environment of every page: autoescaped, strict about names."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.globals["content_security_policy"] = CONTENT_SECURITY_POLICY
    return env


def format_value(value, percent: bool) -> str:
    """A metric value as printed: ``97.5%`` or ``0.123``; ``—`` when missing."""
    if not _finite(value):
        return "—"
    return f"{value * 100:.1f}%" if percent else f"{value:.3f}"


def format_interval(ci, percent: bool) -> str:
    """A confidence interval as printed: ``96.1–97.0%`` (``-0.2 to 0.1`` when it
    starts below zero); empty when missing."""
    if not ci or len(ci) != 2 or not all(_finite(v) for v in ci):
        return ""
    lo, hi = ci
    dash = "–" if lo >= 0 else " to "
    if percent:
        return f"{lo * 100:.1f}{dash}{hi * 100:.1f}%"
    return f"{lo:.3f}{dash}{hi:.3f}"


def format_gap(value, percent: bool) -> str:
    """A difference as printed: ``-1.2 pts`` for percentages, ``+0.012`` else."""
    if not _finite(value):
        return "—"
    return f"{value * 100:+.1f} pts" if percent else f"{value:+.3f}"


def format_gap_interval(ci, percent: bool) -> str:
    if not ci or len(ci) != 2 or not all(_finite(v) for v in ci):
        return ""
    lo, hi = ci
    if percent:
        return f"{lo * 100:+.1f} to {hi * 100:+.1f} pts"
    return f"{lo:+.3f} to {hi:+.3f}"


def format_p(p) -> str:
    """A p-value as printed: two significant digits, ``< 0.0001`` below that."""
    if not _finite(p):
        return "—"
    if p < 0.0001:
        return "< 0.0001"
    return f"{p:.2g}"


def p_clause(p) -> str:
    """``p = 0.012`` or ``p < 0.0001``; empty when there is no p-value."""
    if not _finite(p):
        return ""
    text = format_p(p)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def format_time(value) -> str:
    """An ISO-8601 time as ``2026-12-03 16:15:41 UTC``; other text unchanged."""
    if not value:
        return "—"
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if moment.tzinfo is None:
        return moment.strftime("%Y-%m-%d %H:%M:%S")
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def metric_info(key: str) -> Metric:
    """The printing rules of a metric key, including ``recall.<c>`` and
    ``region_share.<name>``."""
    if key in METRICS:
        return METRICS[key]
    if key.startswith("recall."):
        name = key.split(".", 1)[1]
        return Metric(key, f"Recall {name}", True, f"share of class {name} recognised")
    if key.startswith("region_share."):
        name = key.split(".", 1)[1]
        return Metric(
            key,
            f"{name.replace('_', ' ').capitalize()} share",
            False,
            f"share of the attribution that falls in the {name} region",
        )
    return Metric(key, key.replace("_", " ").capitalize(), False, key)


def find_setting(tree, key: str):
    """The first value stored under ``key`` anywhere in a nested config dict."""
    if isinstance(tree, Mapping):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = find_setting(value, key)
            if found is not None:
                return found
    return None


class _View:
    """Everything the report template shows, computed once from the inputs."""

    def __init__(self, results: dict, arrays: dict):
        self.results = results
        self.slices = list(results.get("slices", []))
        self.class_names = [
            str(c) for c in results.get("dataset", {}).get("class_names", [])
        ]
        self.arrays = _checked_arrays(arrays, len(self.slices))
        self.findings = list(results.get("findings", []))
        self.flagged = {(f.get("slice"), f.get("metric")) for f in self.findings}
        self.index = {s["name"]: i for i, s in enumerate(self.slices)}
        self.tested_metrics = _tested_metrics(results)
        self.map_slices, self.omitted_too_few, self.omitted_over_limit = (
            self._choose_map_slices()
        )
        self.examples, self.examples_omitted = self._choose_examples()
        self.scale = self._colour_scale()
        shape = self.arrays["overall_map"].shape
        self.map_factor = figures.downsample_factor(shape, MAX_MAP_SIDE)
        self.class_factor = figures.downsample_factor(shape, MAX_CLASS_MAP_SIDE)

    def render(self) -> str:
        template = template_environment().get_template("report.html.j2")
        return template.render(**self._context())

    def report_block(self) -> dict:
        return {
            "colour_scale": {
                "colormap": self.scale.colormap,
                "min": -self.scale.limit,
                "max": self.scale.limit,
                "percentile": figures.SCALE_PERCENTILE,
            },
            "map_slices": [self.slices[i]["name"] for i in self.map_slices],
            "maps_omitted": {
                "too_few": [self.slices[i]["name"] for i in self.omitted_too_few],
                "over_limit": [self.slices[i]["name"] for i in self.omitted_over_limit],
            },
            "map_downsample_factor": self.map_factor,
            "class_map_downsample_factor": self.class_factor,
            "examples": [
                {
                    "slice": e["slice"],
                    "kind": e["kind"],
                    "id": str(e["id"]),
                    "label": int(e["label"]),
                    "pred": int(e["pred"]),
                    "confidence": float(e["confidence"]),
                }
                for e in self.examples
            ],
            "examples_omitted": self.examples_omitted,
        }

    def _choose_map_slices(self) -> tuple[list[int], list[int], list[int]]:
        """Slices that get maps, in results order; the rest split by reason."""
        judged = [i for i, s in enumerate(self.slices) if s.get("status") == "judged"]
        too_few = [i for i, s in enumerate(self.slices) if s.get("status") != "judged"]
        if len(judged) <= MAX_MAP_SLICES:
            return judged, too_few, []
        with_findings = {f.get("slice") for f in self.findings}

        def priority(i):
            s = self.slices[i]
            return (s["name"] not in with_findings, -int(s.get("n", 0)), i)

        chosen = sorted(sorted(judged, key=priority)[:MAX_MAP_SLICES])
        over = [i for i in judged if i not in set(chosen)]
        return chosen, too_few, over

    def _choose_examples(self) -> tuple[list[dict], int]:
        shown_names = {self.slices[i]["name"] for i in self.map_slices}
        taken: dict[tuple[str, str], int] = {}
        chosen = []
        for example in self.arrays["examples"]:
            key = (example["slice"], example["kind"])
            if example["slice"] not in shown_names:
                continue
            if taken.get(key, 0) >= MAX_EXAMPLES_PER_KIND:
                continue
            taken[key] = taken.get(key, 0) + 1
            chosen.append(example)
        return chosen, len(self.arrays["examples"]) - len(chosen)

    def _colour_scale(self) -> figures.ColourScale:
        """The shared scale, fitted to the mean maps drawn.

        Single-image example maps are drawn on it too but do not set it: they
        are far larger than means and would wash the mean maps out.
        """
        a = self.arrays
        shown = self.map_slices
        maps = [a["overall_map"]]
        if shown:
            maps += [
                a["slice_maps"][shown],
                a["rest_maps"][shown],
                a["slice_maps"][shown] - a["rest_maps"][shown],
                a["slice_class_maps"][shown],
            ]
        return figures.ColourScale.from_maps(maps)

    def _context(self) -> dict:
        r = self.results
        dataset = r.get("dataset", {})
        model = r.get("model", {})
        run = r.get("run", {})
        return {
            "title": f"Bias audit: {dataset.get('name', 'dataset')}",
            "subtitle": (
                f"model {model.get('tag') or model.get('source') or '—'} · "
                f"run {run.get('id', '—')} · "
                f"finished {format_time(run.get('finished_at'))}"
            ),
            "verdict": self._verdict(),
            "facts": self._facts(),
            "findings": self._findings(),
            "writer_groups": self._writer_groups(),
            "table": self._slice_table(),
            "details_table": self._details_table(),
            "charts": self._charts(),
            "maps": self._maps(),
            "examples": self._example_groups(),
            "method": self._method(),
            "limitations": self._limitations(),
            "skips": self._skips(),
            "reproducibility": self._reproducibility(),
        }

    def _verdict(self) -> dict:
        verdict = str(self.results.get("verdict", "")).lower()
        counts = self.results.get("counts", {})
        explanation = {
            "fail": "At least one finding of high severity.",
            "warn": "At least one finding of medium severity, none high.",
            "pass": "No finding of medium or high severity.",
        }.get(verdict, "The run recorded no verdict.")
        return {
            "level": verdict if verdict in ("pass", "warn", "fail") else "unknown",
            "label": verdict.upper() or "UNKNOWN",
            "explanation": explanation,
            "counts": [
                {"severity": s, "count": int(counts.get(s, 0) or 0)} for s in SEVERITIES
            ],
            "judged": counts.get("judged", 0),
            "too_few": counts.get("too_few", 0),
            "coverage": _coverage_sentence(
                counts.get("judged", 0), counts.get("too_few", 0)
            ),
            "min_slice_size": _count(min_slice_size(self.results)),
        }

    def _facts(self) -> list[tuple[str, str]]:
        dataset = self.results.get("dataset", {})
        run = self.results.get("run", {})
        method = self.results.get("method", {})
        facts = [
            ("Images audited", _count(dataset.get("n_audited"))),
            ("Skipped", _count(dataset.get("n_skipped"))),
            ("Slices", _count(len(self.slices))),
            ("Forward passes", _count(method.get("forward_passes_total"))),
            ("Run", str(run.get("id", "—"))),
            ("Finished", format_time(run.get("finished_at"))),
        ]
        duration = run.get("duration_seconds")
        if _finite(duration):
            facts.append(("Duration", f"{duration:.1f} s"))
        return facts

    def _findings(self) -> list[dict]:
        items = []
        order = {s: i for i, s in enumerate(SEVERITIES)}
        ranked = sorted(
            enumerate(self.findings),
            key=lambda p: (order.get(p[1].get("severity"), 9), p[0]),
        )
        for position, finding in ranked:
            info = metric_info(str(finding.get("metric", "")))
            slice_index = self.index.get(finding.get("slice"))
            n = self.slices[slice_index].get("n") if slice_index is not None else None
            items.append(
                {
                    "anchor": f"finding-{position + 1}",
                    "id": str(finding.get("id", "")),
                    "severity": str(finding.get("severity", "")),
                    "statement": str(finding.get("statement", "")),
                    "slice": str(finding.get("slice", "")),
                    "numbers": [
                        ("Metric", info.label),
                        ("Slice", format_value(finding.get("value"), info.percent)),
                        ("Rest", format_value(finding.get("reference"), info.percent)),
                        ("Gap", _gap_of(finding, info.percent)),
                        (
                            "95% CI",
                            format_gap_interval(finding.get("ci"), info.percent),
                        ),
                        (
                            "Corrected p" + self._descriptive_suffix(finding),
                            format_p(finding.get("p_value")),
                        ),
                        ("n", _count(n)),
                        ("Rule", str(finding.get("rule", ""))),
                    ],
                    "table_anchor": _slice_anchor(slice_index),
                    "maps_anchor": (
                        f"maps-{slice_index}"
                        if slice_index in self.map_slices
                        else None
                    ),
                }
            )
        return items

    def _writer_groups(self) -> dict | None:
        rows = [
            i
            for i, s in enumerate(self.slices)
            if list(s.get("columns", [])) == [WRITER_GROUP_COLUMN]
        ]
        if not rows:
            return None
        columns = [metric_info(k) for k in WRITER_METRICS]
        out = []
        for i in rows:
            s = self.slices[i]
            metrics = s.get("metrics", {})
            cells = []
            for info in columns:
                stats = metrics.get(info.key, {})
                cells.append(
                    {
                        "value": format_value(stats.get("value"), info.percent),
                        "ci": format_interval(stats.get("ci"), info.percent),
                        "gap": format_gap(stats.get("gap"), info.percent),
                        "gap_ci": format_gap_interval(
                            stats.get("gap_ci"), info.percent
                        ),
                        "p": self._p_clause(info.key, stats),
                        "flagged": (s["name"], info.key) in self.flagged,
                    }
                )
            out.append(
                {
                    "name": s["name"],
                    "value": ", ".join(str(v) for v in s.get("values", [])),
                    "anchor": _slice_anchor(i),
                    "n": _count(s.get("n")),
                    "too_few": s.get("status") != "judged",
                    "cells": cells,
                }
            )
        return {
            "columns": columns,
            "rows": out,
            "descriptive": [
                info.label for info in columns if not self._in_family(info.key)
            ],
        }

    def _region_keys(self) -> list[str]:
        keys: list[str] = []
        for s in self.slices:
            for key in s.get("metrics", {}):
                if key.startswith("region_share.") and key not in keys:
                    keys.append(key)
        return keys

    def _slice_table(self) -> dict:
        columns = [metric_info(k) for k in TABLE_METRICS + self._region_keys()]
        rows = []
        for i, s in enumerate(self.slices):
            metrics = s.get("metrics", {})
            judged = s.get("status") == "judged"
            accuracy = metrics.get("accuracy", {})
            cells = []
            for info in columns:
                stats = metrics.get(info.key, {})
                cells.append(
                    {
                        "value": format_value(stats.get("value"), info.percent),
                        "ci": format_interval(stats.get("ci"), info.percent),
                        "flagged": (s["name"], info.key) in self.flagged,
                    }
                )
            distance = metrics.get("map_distance", {})
            rows.append(
                {
                    "name": s["name"],
                    "anchor": _slice_anchor(i),
                    "maps_anchor": f"maps-{i}" if i in self.map_slices else None,
                    "n": _count(s.get("n")),
                    "judged": judged,
                    "flagged": any(name == s["name"] for name, _ in self.flagged),
                    "gap": format_gap(accuracy.get("gap"), True),
                    "gap_ci": format_gap_interval(accuracy.get("gap_ci"), True),
                    "gap_p": self._p_clause("accuracy", accuracy),
                    "distance": format_value(distance.get("value"), False),
                    "distance_p": self._p_clause("map_distance", distance),
                    "cells": cells,
                }
            )
        return {"columns": columns, "rows": rows, "span": len(columns) + 3}

    def _details_table(self) -> dict:
        keys: list[str] = []
        for s in self.slices:
            for key in s.get("metrics", {}):
                wanted = key in ("deletion_auc", "insertion_auc") or key.startswith(
                    "recall."
                )
                if wanted and key not in keys:
                    keys.append(key)
        columns = []
        for key in keys:
            info = metric_info(key)
            if key.startswith("recall."):
                c = key.split(".", 1)[1]
                name = self.class_names[int(c)] if _is_index(c, self.class_names) else c
                info = Metric(key, f"Recall {name}", True, info.help)
            columns.append(info)
        rows = []
        for s in self.slices:
            metrics = s.get("metrics", {})
            rows.append(
                {
                    "name": s["name"],
                    "n": _count(s.get("n")),
                    "judged": s.get("status") == "judged",
                    "cells": [
                        {
                            "value": format_value(
                                metrics.get(info.key, {}).get("value"), info.percent
                            ),
                            "ci": format_interval(
                                metrics.get(info.key, {}).get("ci"), info.percent
                            ),
                            "flagged": (s["name"], info.key) in self.flagged,
                        }
                        for info in columns
                    ],
                }
            )
        return {"columns": columns, "rows": rows}

    def _charts(self) -> list[dict]:
        judged = [s for s in self.slices if s.get("status") == "judged"]
        if not judged:
            return []
        overall = self.results.get("overall", {}).get("metrics", {})
        charts = []
        for title, keys in CHART_GROUPS:
            panels = []
            percent = []
            for key in keys:
                info = metric_info(key)
                rows = []
                for s in judged:
                    stats = s.get("metrics", {}).get(key, {})
                    ci = stats.get("ci") or [None, None]
                    rows.append(
                        figures.Interval(
                            label=s["name"],
                            value=_float(stats.get("value")),
                            low=_float(ci[0]) if _finite(ci[0]) else None,
                            high=_float(ci[1]) if _finite(ci[1]) else None,
                            highlighted=(s["name"], key) in self.flagged,
                        )
                    )
                reference = overall.get(key, {}).get("value")
                panels.append((info.label, rows, _float(reference)))
                percent.append(info.percent)
            labels = ", ".join(metric_info(k).label.lower() for k in keys)
            charts.append(
                {
                    "title": title,
                    "uri": figures.interval_chart_uri(panels, percent),
                    "alt": (
                        f"Dot-and-whisker chart of {labels} for the {len(judged)} "
                        "judged slices, each with its 95% confidence interval; a "
                        "dashed line marks the whole data set and red marks a "
                        "finding. The slice table below has the same numbers."
                    ),
                }
            )
        return charts

    def _maps(self) -> dict:
        a = self.arrays
        scale = self.scale
        cards = []
        for i in self.map_slices:
            s = self.slices[i]
            name = s["name"]
            slice_map = self._down(a["slice_maps"][i], self.map_factor)
            rest_map = self._down(a["rest_maps"][i], self.map_factor)
            cards.append(
                {
                    "anchor": f"maps-{i}",
                    "table_anchor": _slice_anchor(i),
                    "name": name,
                    "n": _count(s.get("n")),
                    "flagged": any(sl == name for sl, _ in self.flagged),
                    "panels": [
                        (
                            "Slice",
                            figures.heatmap_uri(slice_map, scale),
                            f"Mean attribution map of slice {name}",
                        ),
                        (
                            "Rest",
                            figures.heatmap_uri(rest_map, scale),
                            f"Mean attribution map of the images outside {name}",
                        ),
                        (
                            "Slice − rest",
                            figures.heatmap_uri(slice_map - rest_map, scale),
                            f"Difference map, slice {name} minus the rest",
                        ),
                    ],
                }
            )
        class_rows = []
        for i in self.map_slices:
            name = self.slices[i]["name"]
            cells = []
            for c, class_map in enumerate(a["slice_class_maps"][i]):
                class_name = (
                    self.class_names[c] if c < len(self.class_names) else str(c)
                )
                if not np.isfinite(class_map).any():
                    cells.append({"uri": None, "alt": ""})
                    continue
                cells.append(
                    {
                        "uri": figures.heatmap_uri(
                            self._down(class_map, self.class_factor), scale
                        ),
                        "alt": (
                            f"Mean attribution of slice {name}, "
                            f"predicted class {class_name}"
                        ),
                    }
                )
            class_rows.append({"name": name, "anchor": f"maps-{i}", "cells": cells})
        n_classes = a["slice_class_maps"].shape[1]
        class_names = [
            self.class_names[c] if c < len(self.class_names) else str(c)
            for c in range(n_classes)
        ]
        shape = a["overall_map"].shape
        return {
            "colourbar": figures.colourbar_uri(scale, ATTRIBUTION_LABEL),
            "colourbar_alt": (
                f"Colour scale shared by every map: blue {-scale.limit:.3g} through "
                f"white 0 to red {scale.limit:.3g}; values beyond are drawn in the "
                "end colours"
            ),
            "limit": f"{scale.limit:.3g}",
            "overall": figures.heatmap_uri(
                self._down(a["overall_map"], self.map_factor), scale
            ),
            "cards": cards,
            "class_names": class_names,
            "class_rows": class_rows,
            "omitted_too_few": [self.slices[i]["name"] for i in self.omitted_too_few],
            "omitted_over_limit": [
                self.slices[i]["name"] for i in self.omitted_over_limit
            ],
            "max_map_slices": MAX_MAP_SLICES,
            "resolution": f"{shape[0]}×{shape[1]}",
            "map_factor": self.map_factor,
            "class_factor": self.class_factor,
            "map_resolution": _resolution(shape, self.map_factor),
            "class_resolution": _resolution(shape, self.class_factor),
        }

    def _example_groups(self) -> dict:
        kinds = [k for k in EXAMPLE_KINDS if any(e["kind"] == k for e in self.examples)]
        kinds += sorted({str(e["kind"]) for e in self.examples} - set(kinds))
        cells: dict[str, dict[str, list[dict]]] = {}
        for example in self.examples:
            by_kind = cells.setdefault(example["slice"], {})
            by_kind.setdefault(str(example["kind"]), []).append(self._example(example))
        rows = []
        for i in self.map_slices:
            name = self.slices[i]["name"]
            if name in cells:
                rows.append(
                    {
                        "name": name,
                        "anchor": f"examples-{i}",
                        "maps_anchor": f"maps-{i}",
                        "cells": [cells[name].get(k, []) for k in kinds],
                    }
                )
        return {
            "kinds": [EXAMPLE_KINDS.get(k, k) for k in kinds],
            "rows": rows,
            "omitted": self.examples_omitted,
            "per_kind": MAX_EXAMPLES_PER_KIND,
        }

    def _example(self, example: dict) -> dict:
        name = example["slice"]
        label = self._class_name(example["label"])
        pred = self._class_name(example["pred"])
        kind = EXAMPLE_KINDS.get(example["kind"], str(example["kind"]))
        image = example["image"]
        values = example["map"]
        factor = figures.downsample_factor(values.shape, MAX_MAP_SIDE)
        if factor > 1:
            image = _downsample_image(image, factor)
            values = figures.block_downsample(values, MAX_MAP_SIDE)
        return {
            "id": str(example["id"]),
            "label": label,
            "pred": pred,
            "correct": int(example["label"]) == int(example["pred"]),
            "confidence": format_value(float(example["confidence"]), True),
            "image": figures.image_uri(image),
            "overlay": figures.overlay_uri(image, values, self.scale),
            "image_alt": f"{kind} example {example['id']} of slice {name}: "
            f"label {label}, predicted {pred}",
            "overlay_alt": f"Attribution map over example {example['id']}",
        }

    def _method(self) -> list[tuple[str, str]]:
        m = self.results.get("method", {})
        rows = [
            ("Window", _pair(m.get("window"))),
            ("Stride", _pair(m.get("stride"))),
            ("Baseline", _baseline(m)),
            ("Target", str(m.get("target", "—"))),
            ("Output space", str(m.get("output", "—"))),
            ("Window grid", _pair(m.get("grid_shape"))),
            ("Windows per image", _count(m.get("n_windows"))),
            *self._passes(),
            ("Largest batch", _count(m.get("max_batch"))),
        ]
        known = {
            "window",
            "stride",
            "baseline",
            "baseline_value",
            "target",
            "output",
            "grid_shape",
            "n_windows",
            "forward_passes_per_image",
            "forward_passes_total",
            "max_batch",
            "faithfulness_steps",
            "faithfulness_every",
        }
        for key, value in m.items():
            if key not in known:
                rows.append((key.replace("_", " ").capitalize(), _plain(value)))
        return rows

    def _limitations(self) -> dict:
        m = self.results.get("method", {})
        config = self.results.get("config", {})
        statistics = self.results.get("statistics", {}) or {}
        corrected = [
            key
            for s in self.slices
            for key, stats in s.get("metrics", {}).items()
            if isinstance(stats, Mapping) and _finite(stats.get("p_adjusted"))
        ]
        in_family = sum(self._in_family(key) for key in corrected)
        family_size = statistics.get("family_size")
        if not _finite(family_size):
            family_size = in_family
        tested = sorted(self.tested_metrics or ())
        return {
            "window": _pair(m.get("window")),
            "stride": _pair(m.get("stride")),
            "baseline": _baseline(m),
            "target": str(m.get("target", "the predicted class")),
            "output": str(m.get("output", "probability")),
            "min_slice_size": _count(min_slice_size(self.results)),
            "correction": _plain(
                statistics.get("correction") or find_setting(config, "correction")
            ),
            "tests": _count(family_size),
            "tests_plural": "test was" if family_size == 1 else "tests were",
            "tested_metrics": ", ".join(metric_info(k).label for k in tested),
            "descriptive": _count(len(corrected) - in_family),
            "too_few": _count(sum(s.get("status") != "judged" for s in self.slices)),
        }

    def _in_family(self, metric: str) -> bool:
        """Whether a metric's p-values belong to the family of tests the rules
        judge; the others are corrected in a separate, descriptive family."""
        return self.tested_metrics is None or metric in self.tested_metrics

    def _descriptive_suffix(self, finding: dict) -> str:
        return (
            "" if self._in_family(str(finding.get("metric", ""))) else " (descriptive)"
        )

    def _p_clause(self, metric: str, stats: dict) -> str:
        """``p = 0.012`` for a test of the judged family, ``p (descriptive)
        0.62`` for a metric no rule judges."""
        p = stats.get("p_adjusted")
        if self._in_family(metric) or not _finite(p):
            return p_clause(p)
        return f"p (descriptive) {format_p(p)}"

    def _passes(self) -> list[tuple[str, str]]:
        """Forward passes per image and in all, split into the occlusion
        passes (one per window plus the unoccluded image) and the passes of the
        deletion and insertion curves (``steps + 1`` points each)."""
        m = self.results.get("method", {})
        per_image = m.get("forward_passes_per_image")
        total = m.get("forward_passes_total")
        steps, every = m.get("faithfulness_steps"), m.get("faithfulness_every")
        occlusion_text = _count(per_image)
        if _finite(per_image) and _finite(m.get("n_windows")):
            occlusion_text += (
                f" ({int(m['n_windows']):,} windows and the unoccluded image)"
            )
        rows = [("Occlusion passes per image", occlusion_text)]
        if _finite(steps) and steps > 0:
            per_curve_image = 2 * (int(steps) + 1)
            which = "every image"
            if _finite(every) and every > 1:
                which = f"one image in {int(every):,}"
            rows.append(
                (
                    "Faithfulness passes per curve image",
                    f"{per_curve_image:,} (deletion and insertion curves, "
                    f"{int(steps) + 1} points each, on {which})",
                )
            )
            n = self.results.get("dataset", {}).get("n_audited")
            if _finite(n) and _finite(per_image) and _finite(total):
                occlusion = int(n) * int(per_image)
                curves = int(total) - occlusion
                if curves >= 0 and curves % per_curve_image == 0:
                    rows.append(
                        (
                            "Forward passes by part",
                            f"occlusion {occlusion:,} ({int(n):,} images × "
                            f"{int(per_image):,}); faithfulness curves "
                            f"{curves:,} ({curves // per_curve_image:,} images × "
                            f"{per_curve_image:,})",
                        )
                    )
        rows.append(("Forward passes in all", _count(total)))
        return rows

    def _skips(self) -> dict:
        dataset = self.results.get("dataset", {})
        reasons = dataset.get("skip_reasons", {}) or {}
        listed = dataset.get("skips", []) or []
        return {
            "n": _count(dataset.get("n_skipped", 0)),
            "reasons": [(str(k), _count(v)) for k, v in reasons.items()],
            "listed": [
                (str(s.get("id", "")), str(s.get("reason", ""))) for s in listed
            ],
        }

    def _reproducibility(self) -> dict:
        r = self.results
        model = r.get("model", {})
        dataset = r.get("dataset", {})
        run = r.get("run", {})
        return {
            "model": [
                ("Source", _plain(model.get("source"))),
                ("Tag", _plain(model.get("tag"))),
            ]
            + [
                (str(k), _plain(v))
                for k, v in model.items()
                if k not in ("source", "tag", "metadata")
            ],
            "model_metadata": [
                (str(k), _plain(v)) for k, v in (model.get("metadata") or {}).items()
            ],
            "dataset": [
                ("Name", _plain(dataset.get("name"))),
                ("Fingerprint", _plain(dataset.get("fingerprint"))),
                ("Images", _count(dataset.get("n_images"))),
                ("Image shape", _plain(dataset.get("image_shape"))),
                ("Classes", ", ".join(self.class_names) or "—"),
            ],
            "run": [
                ("Run id", _plain(run.get("id"))),
                ("Started", format_time(run.get("started_at"))),
                ("Finished", format_time(run.get("finished_at"))),
                ("Duration", _seconds(run.get("duration_seconds"))),
                ("Seed", _plain(run.get("seed"))),
                ("Resumed from a checkpoint", "yes" if run.get("resumed") else "no"),
                ("Schema version", _plain(r.get("schema_version"))),
            ],
            "versions": [
                (str(k), _plain(v)) for k, v in run.get("versions", {}).items()
            ],
            "config": json.dumps(
                to_json_safe(r.get("config", {})), indent=2, ensure_ascii=False
            ),
        }

    def _class_name(self, c) -> str:
        c = int(c)
        return self.class_names[c] if 0 <= c < len(self.class_names) else str(c)

    @staticmethod
    def _down(values: np.ndarray, factor: int) -> np.ndarray:
        if factor <= 1:
            return np.asarray(values, np.float64)
        side = int(np.ceil(max(values.shape[-2:]) / factor))
        return figures.block_downsample(values, side)


def _checked_arrays(arrays: dict, n_slices: int) -> dict:
    overall = np.asarray(arrays["overall_map"], np.float64)
    if overall.ndim != 2:
        raise ValueError(
            f"arrays['overall_map'] has shape {overall.shape}, expected (H, W)"
        )
    height, width = overall.shape
    checked = {"overall_map": overall}
    expected = {
        "slice_maps": (n_slices, height, width),
        "rest_maps": (n_slices, height, width),
    }
    for key, shape in expected.items():
        value = np.asarray(arrays[key], np.float64)
        if value.shape != shape:
            raise ValueError(
                BAD_ARRAY.format(
                    key=key, shape=value.shape, expected=shape, n_slices=n_slices
                )
            )
        checked[key] = value
    class_maps = np.asarray(arrays["slice_class_maps"], np.float64)
    if class_maps.ndim != 4 or class_maps.shape[:1] + class_maps.shape[2:] != (
        n_slices,
        height,
        width,
    ):
        raise ValueError(
            BAD_ARRAY.format(
                key="slice_class_maps",
                shape=class_maps.shape,
                expected=(n_slices, "C", height, width),
                n_slices=n_slices,
            )
        )
    checked["slice_class_maps"] = class_maps
    examples = []
    for position, example in enumerate(arrays.get("examples", []) or []):
        missing = {"slice", "kind", "image", "map", "label", "pred", "confidence", "id"}
        missing -= set(example)
        if missing:
            raise ValueError(
                f"arrays['examples'][{position}] lacks {sorted(missing)}; each "
                "example needs slice, kind, image, map, label, pred, confidence, id"
            )
        image = np.asarray(example["image"], np.float64)
        values = np.asarray(example["map"], np.float64)
        if image.ndim != 3 or image.shape[-1] not in (1, 3):
            raise ValueError(
                f"arrays['examples'][{position}]['image'] has shape {image.shape}, "
                "expected (H, W, C) with C 1 or 3"
            )
        if values.shape != image.shape[:2]:
            raise ValueError(
                f"arrays['examples'][{position}]['map'] has shape {values.shape}, "
                f"expected the image's {image.shape[:2]}"
            )
        examples.append({**example, "image": image, "map": values})
    checked["examples"] = examples
    return checked


def _maps_npz(results: dict, checked: dict) -> bytes:
    """The full-resolution maps and example arrays, as ``.npz`` bytes.

    ``checked`` is the output of :func:`_checked_arrays`. Examples are stacked
    in the order given; their metadata is in ``results.json``.
    """
    examples = checked["examples"]
    if examples:
        images = np.stack([e["image"] for e in examples])
        maps = np.stack([e["map"] for e in examples])
    else:
        height, width = checked["overall_map"].shape
        images = np.zeros((0, height, width, 1))
        maps = np.zeros((0, height, width))
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        overall_map=checked["overall_map"].astype(np.float32),
        slice_maps=checked["slice_maps"].astype(np.float32),
        rest_maps=checked["rest_maps"].astype(np.float32),
        slice_class_maps=checked["slice_class_maps"].astype(np.float32),
        slice_names=np.array([s["name"] for s in results.get("slices", [])], str),
        example_images=images.astype(np.float32),
        example_maps=maps.astype(np.float32),
        example_ids=np.array([str(e["id"]) for e in examples], str),
        example_slices=np.array([str(e["slice"]) for e in examples], str),
        example_kinds=np.array([str(e["kind"]) for e in examples], str),
    )
    return buffer.getvalue()


def _downsample_image(image: np.ndarray, factor: int) -> np.ndarray:
    side = int(np.ceil(max(image.shape[:2]) / factor))
    channels = np.moveaxis(np.asarray(image, np.float64), -1, 0)
    return np.moveaxis(figures.block_downsample(channels, side), 0, -1)


def min_slice_size(results: dict) -> int:
    """The smallest slice the run judged: from the run's slice settings, else
    from its statistics block, else the default slicing's minimum (a run with
    ``"slices": null`` used the default settings)."""
    config = results.get("config", {}) or {}
    slices = config.get("slices") if isinstance(config, Mapping) else None
    for source in (slices, results.get("statistics"), config):
        value = find_setting(source, "min_slice_size")
        if _finite(value):
            return int(value)
    return int(SliceSettings.model_fields["min_slice_size"].default)


def _tested_metrics(results: dict) -> set[str] | None:
    """Metrics in the family of tests the rules judge: from the statistics
    block, else the metrics the configured rules name; ``None`` when neither is
    known (then every p-value is shown as a test)."""
    statistics = results.get("statistics", {}) or {}
    tested = statistics.get("tested_metrics")
    if isinstance(tested, list | tuple):
        return {str(m) for m in tested}
    rules = (results.get("config", {}) or {}).get("rules")
    if isinstance(rules, list) and rules:
        return {str(r.get("metric")) for r in rules if isinstance(r, Mapping)}
    return None


def _coverage_sentence(judged, too_few) -> str:
    judged, too_few = _int_or_zero(judged), _int_or_zero(too_few)
    verb = "slice was" if judged == 1 else "slices were"
    return f"{judged} {verb} judged; {too_few} had too few images to judge"


def _int_or_zero(value) -> int:
    return int(value) if _finite(value) else 0


def _slice_anchor(index: int | None) -> str | None:
    return None if index is None else f"slice-{index}"


def _gap_of(finding: dict, percent: bool) -> str:
    value, reference = finding.get("value"), finding.get("reference")
    if not (_finite(value) and _finite(reference)):
        return "—"
    return format_gap(value - reference, percent)


def _finite(value) -> bool:
    return isinstance(value, int | float | np.number) and math.isfinite(float(value))


def _float(value) -> float:
    return float(value) if _finite(value) else float("nan")


def _count(value) -> str:
    if not _finite(value):
        return "—"
    return f"{int(value):,}"


def _seconds(value) -> str:
    return f"{value:.1f} s" if _finite(value) else "—"


def _pair(value) -> str:
    if isinstance(value, list | tuple) and len(value) == 2:
        return f"{value[0]}×{value[1]}"
    return _plain(value)


def _baseline(method: dict) -> str:
    baseline = method.get("baseline")
    if baseline is None:
        return "—"
    if baseline == "constant" and _finite(method.get("baseline_value")):
        return f"constant {method['baseline_value']:g}"
    return str(baseline)


def _plain(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else "—"
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(to_json_safe(value), ensure_ascii=False)
    return str(value)


def _resolution(shape, factor: int) -> str:
    height, width = shape
    return f"{-(-height // factor)}×{-(-width // factor)}"


def _is_index(text: str, names: list[str]) -> bool:
    return text.isdigit() and int(text) < len(names)
