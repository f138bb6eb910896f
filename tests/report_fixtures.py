"""A realistic synthetic audit: a results dict and the arrays the report draws.

It mirrors an MNIST test-set audit of 10,000 images: two writer groups, five
quantile bins of five derived image attributes, writer group x thickness
intersections and a few single writers too small to judge (about 40 slices),
10 classes, 28x28 maps. Images are seven-segment digits with a little blur and
jitter, and each class's attribution sits on its digit's segments, so the
pictures look like what a real audit produces. Everything is drawn from a
seeded generator: the same arguments give the same dict and arrays.

``hostile_results`` puts markup where untrusted text can reach the report
(slice values, class names, dataset name, file ids, config values).
"""

from __future__ import annotations

import copy
import math

import numpy as np

HOSTILE = "<script>alert(1)</script>"
HOSTILE_CLASS = '<img src=x onerror="alert(2)">'

# Segments of a seven-segment digit as (y0, y1, x0, x1) on a 28x28 canvas.
_SEGMENTS = {
    "a": (4, 6, 9, 19),
    "b": (5, 14, 18, 20),
    "c": (14, 23, 18, 20),
    "d": (22, 24, 9, 19),
    "e": (14, 23, 8, 10),
    "f": (5, 14, 8, 10),
    "g": (13, 15, 9, 19),
}
_DIGITS = [
    "abcdef",
    "bc",
    "abged",
    "abgcd",
    "fgbc",
    "afgcd",
    "afgedc",
    "abc",
    "abcdefg",
    "abcdfg",
]
_ATTRIBUTES = ["thickness", "slant", "brightness", "contrast", "ink_area"]
_MIN_SLICE_SIZE = 50
_OVERALL_ACCURACY = 0.975
_SHORTCUT = (slice(1, 7), slice(1, 7))
_METRIC_NAMES = [
    "accuracy",
    "mean_confidence",
    "ece",
    "max_drop",
    "flip_rate",
    "concentration",
    "region_share.border",
    "region_share.centre",
    "deletion_auc",
    "insertion_auc",
]


def make_audit(
    n_slices_hint: int = 40,
    n_classes: int = 10,
    shape: tuple[int, int] = (28, 28),
    channels: int = 1,
    examples_per_kind: int = 1,
    writers_judged: bool = False,
    attributes: int = 5,
    intersections: bool = True,
    seed: int = 0,
) -> tuple[dict, dict]:
    """``(results, arrays)`` of a realistic audit; see the module docstring.

    ``n_slices_hint`` above 40 adds more single-writer slices, too few to judge
    unless ``writers_judged``; ``shape`` other than 28x28 rescales the digits.
    ``attributes`` (0 to 5) and ``intersections`` make a smaller audit (down to
    5 slices) for tests that need no realistic size.
    """
    rng = np.random.default_rng(seed)
    specs = _slice_specs(n_slices_hint, writers_judged, attributes, intersections)
    class_names = [str(c) for c in range(n_classes)]
    patterns = np.stack([_digit(c % 10, shape) for c in range(n_classes)])

    slices = []
    for columns, values, n, accuracy in specs:
        slices.append(_slice(columns, values, n, accuracy, n_classes, rng))
    findings = _findings(slices)
    overall = {
        "n": 10000,
        "metrics": {
            name: _overall(_base_value(name, _OVERALL_ACCURACY), name)
            for name in _METRIC_NAMES
        },
    }
    severities = [f["severity"] for f in findings]
    judged = sum(s["status"] == "judged" for s in slices)
    results = {
        "schema_version": 1,
        "verdict": "fail" if "high" in severities else "warn",
        "counts": {
            "high": severities.count("high"),
            "medium": severities.count("medium"),
            "low": severities.count("low"),
            "too_few": len(slices) - judged,
            "judged": judged,
        },
        "run": {
            "id": "20261203-161500-mnist-test",
            "started_at": "2026-12-03T16:15:00+00:00",
            "finished_at": "2026-12-03T16:15:41+00:00",
            "duration_seconds": 41.2,
            "seed": 0,
            "versions": {
                "python": "3.11.7",
                "numpy": "2.4.1",
                "tensorflow": "2.21.0",
                "keras": "3.15.1",
                "bentoml": "1.4.40",
                "cnn-bias-audit": "0.1.0",
            },
            "resumed": False,
        },
        "model": {
            "source": "mnist_cnn:latest",
            "tag": "mnist_cnn:q3n4yhbn7kxq2aav",
            "metadata": {"test_accuracy": 0.9912, "epochs": 3, "seed": 0},
        },
        "dataset": {
            "name": "mnist-test",
            "n_images": 10000,
            "n_audited": 9998,
            "n_skipped": 2,
            "skips": [
                {"id": "img-00017.png", "reason": "image file is missing"},
                {"id": "img-04242.png", "reason": "NaN pixels"},
            ],
            "skip_reasons": {"image file is missing": 1, "NaN pixels": 1},
            "fingerprint": "sha256:5f1c0e4a9b7d2c3e",
            "class_names": class_names,
            "image_shape": [shape[0], shape[1], channels],
        },
        "config": {
            "model": "mnist_cnn:latest",
            "dataset": {"name": "mnist", "split": "test"},
            "slices": {
                "columns": ["writer_group"],
                "derived": _ATTRIBUTES,
                "quantiles": 5,
                "intersections": [["writer_group", "thickness"]],
            },
            "occlusion": {"window": [6, 6], "stride": [4, 4], "baseline": "constant"},
            "statistics": {
                "min_slice_size": _MIN_SLICE_SIZE,
                "bootstrap": 1000,
                "permutations": 1000,
                "alpha": 0.05,
                "correction": "holm",
            },
            "seed": 0,
        },
        "method": {
            "window": [6, 6],
            "stride": [4, 4],
            "baseline": "constant",
            "baseline_value": 0.0,
            "target": "predicted",
            "output": "probability",
            "grid_shape": [7, 7],
            "n_windows": 49,
            "forward_passes_per_image": 50,
            # 9,998 images x (49 windows + 1) occlusion passes, and on each
            # image deletion and insertion curves of 10 steps (11 points each).
            "forward_passes_total": 9998 * (50 + 2 * 11),
            "max_batch": 1024,
            "faithfulness_steps": 10,
            "faithfulness_every": 1,
        },
        "overall": overall,
        "slices": slices,
        "findings": findings,
    }
    arrays = _arrays(results, patterns, channels, examples_per_kind, rng)
    return results, arrays


def hostile_results(results: dict, arrays: dict) -> tuple[dict, dict]:
    """Copies with markup in every place untrusted text can reach the report."""
    results = copy.deepcopy(results)
    arrays = dict(arrays)
    first = results["slices"][0]
    old_name = first["name"]
    first["values"] = [HOSTILE]
    first["name"] = f"{first['columns'][0]}={HOSTILE}"
    for finding in results["findings"]:
        if finding["slice"] == old_name:
            finding["slice"] = first["name"]
            finding["statement"] = finding["statement"].replace(old_name, first["name"])
    results["dataset"]["class_names"][3] = HOSTILE_CLASS
    results["dataset"]["name"] = HOSTILE
    results["dataset"]["skips"][0]["id"] = HOSTILE
    results["config"]["dataset"]["name"] = HOSTILE
    results["model"]["metadata"]["note"] = HOSTILE
    examples = []
    for example in arrays["examples"]:
        example = dict(example)
        if example["slice"] == old_name:
            example["slice"] = first["name"]
            example["id"] = HOSTILE
        examples.append(example)
    arrays["examples"] = examples
    return results, arrays


def _slice_specs(
    n_slices_hint: int, writers_judged: bool, attributes: int, intersections: bool
) -> list[tuple[list[str], list[str], int, float]]:
    specs = [
        (["writer_group"], ["students"], 5000, 0.962),
        (["writer_group"], ["census"], 5000, 0.988),
    ]
    for attribute in _ATTRIBUTES[:attributes]:
        for q in range(1, 6):
            accuracy = 0.975
            if attribute == "thickness" and q == 1:
                accuracy = 0.955
            if attribute == "slant" and q == 5:
                accuracy = 0.962
            specs.append(([attribute], [f"q{q}"], 2000, accuracy))
    for group, base in (("students", 0.962), ("census", 0.988)) * intersections:
        for q in range(1, 6):
            accuracy = base - (0.02 if q == 1 else 0.0)
            specs.append(
                (["writer_group", "thickness"], [group, f"q{q}"], 1000, accuracy)
            )
    n_writers = max(3, n_slices_hint - len(specs))
    for w in range(n_writers):
        n = 24 + (w * 7) % 25 + (_MIN_SLICE_SIZE if writers_judged else 0)
        specs.append((["writer"], [f"f{w:04d}"], n, 0.96))
    return specs


def _slice(columns, values, n, accuracy, n_classes, rng) -> dict:
    name = " & ".join(f"{c}={v}" for c, v in zip(columns, values, strict=True))
    judged = n >= _MIN_SLICE_SIZE
    metrics = {}
    for metric in _METRIC_NAMES:
        centre = _base_value(metric, accuracy)
        rest = _base_value(metric, _OVERALL_ACCURACY)
        if judged:
            metrics[metric] = _interval(centre, n, rng, metric, rest)
        else:
            metrics[metric] = {"value": _jitter(centre, n, rng, metric)}
    for c in range(n_classes):
        recall = min(0.999, accuracy + rng.normal(0, 0.01))
        if judged:
            metrics[f"recall.{c}"] = _interval(
                recall, max(n // n_classes, 1), rng, "recall", _OVERALL_ACCURACY
            )
        else:
            metrics[f"recall.{c}"] = {"value": None if c % 4 == 3 else recall}
    if judged:
        distance = abs(rng.normal(0.05, 0.02)) + (0.1 if accuracy < 0.96 else 0.0)
        p = float(min(1.0, np.exp(-distance * 40)))
        metrics["map_distance"] = {
            "value": round(distance, 4),
            "p_value": p,
            "p_adjusted": min(1.0, p * 30),
            "test": "permutation",
        }
    return {
        "name": name,
        "columns": list(columns),
        "values": list(values),
        "n": int(n),
        "status": "judged" if judged else "too_few",
        "metrics": metrics,
    }


def _base_value(metric: str, accuracy: float) -> float:
    shortfall = 0.975 - accuracy
    return {
        "accuracy": accuracy,
        "mean_confidence": 0.962 - shortfall * 0.5,
        "ece": 0.012 + shortfall * 0.8,
        "max_drop": 0.21 + shortfall * 1.5,
        "flip_rate": 0.06 + shortfall * 2.0,
        "concentration": 0.31 + shortfall,
        "region_share.border": 0.08 + shortfall * 0.5,
        "region_share.centre": 0.52 - shortfall,
        "deletion_auc": 0.34 + shortfall,
        "insertion_auc": 0.71 - shortfall,
    }[metric]


def _interval(centre: float, n: int, rng, metric: str, rest: float) -> dict:
    """A judged metric: value with its interval, and its gap to the rest's."""
    value = _jitter(centre, n, rng, metric)
    se = np.sqrt(max(value * (1 - value), 0.0025) / n) * _spread(metric)
    reference = _jitter(rest, 10000 - n, rng, metric)
    se_rest = np.sqrt(max(reference * (1 - reference), 0.0025) / (10000 - n))
    se_gap = np.hypot(se, se_rest * _spread(metric))
    gap = value - reference
    p = float(math.erfc(abs(gap) / se_gap / math.sqrt(2)))
    return {
        "value": value,
        "ci": [value - 1.96 * se, value + 1.96 * se],
        "reference": reference,
        "gap": gap,
        "gap_ci": [gap - 1.96 * se_gap, gap + 1.96 * se_gap],
        "p_value": p,
        "p_adjusted": min(1.0, p * 40),
        "test": "fisher_exact" if metric == "accuracy" else "bootstrap",
    }


def _spread(metric: str) -> float:
    """Interval width of a metric relative to a proportion's."""
    if metric in ("accuracy", "flip_rate", "mean_confidence", "recall"):
        return 1.0
    return 0.35


def _overall(value: float, metric: str) -> dict:
    se = np.sqrt(max(value * (1 - value), 0.0025) / 10000) * _spread(metric)
    return {"value": value, "ci": [value - 1.96 * se, value + 1.96 * se]}


def _jitter(centre: float, n: int, rng, metric: str) -> float:
    spread = np.sqrt(max(centre * (1 - centre), 0.0025) / n) * 0.5 * _spread(metric)
    return float(np.clip(centre + rng.normal(0, spread), 0.0, 1.0))


def _findings(slices: list[dict]) -> list[dict]:
    chosen = [
        ("writer_group=students", "accuracy", "high", "accuracy_gap_high"),
        ("thickness=q1", "accuracy", "medium", "accuracy_gap_medium"),
        ("thickness=q1", "max_drop", "medium", "fragility_gap"),
        ("writer_group=students & thickness=q1", "flip_rate", "low", "flip_rate_gap"),
        ("slant=q5", "ece", "low", "calibration_gap"),
    ]
    labels = {
        "accuracy": "Accuracy",
        "max_drop": "Fragility (mean max drop)",
        "flip_rate": "Flip rate",
        "ece": "Calibration error (ECE)",
    }
    by_name = {s["name"]: s for s in slices}
    chosen = [c for c in chosen if c[0] in by_name]
    findings = []
    for i, (name, metric, severity, rule) in enumerate(chosen, start=1):
        stats = by_name[name]["metrics"][metric]
        gap, (lo, hi) = stats["gap"], stats["gap_ci"]
        if metric in ("accuracy", "flip_rate"):
            size = f"{abs(gap) * 100:.1f} points"
            numbers = (
                f"{stats['value'] * 100:.1f}% vs {stats['reference'] * 100:.1f}%, "
                f"95% CI of the gap {lo * 100:.1f} to {hi * 100:.1f} points"
            )
        else:
            size = f"{abs(gap):.3f}"
            numbers = (
                f"{stats['value']:.3f} vs {stats['reference']:.3f}, "
                f"95% CI of the gap {lo:.3f} to {hi:.3f}"
            )
        direction = "lower" if gap < 0 else "higher"
        p = stats["p_adjusted"]
        findings.append(
            {
                "id": f"F{i:03d}",
                "severity": severity,
                "slice": name,
                "metric": metric,
                "value": stats["value"],
                "reference": stats["reference"],
                "ci": [lo, hi],
                "p_value": p,
                "rule": rule,
                "statement": (
                    f"{labels[metric]} on {name} is {size} {direction} than on "
                    f"the rest ({numbers}, corrected p = {p:.2g}, "
                    f"n = {by_name[name]['n']})."
                ),
            }
        )
    return findings


def _digit(digit: int, shape: tuple[int, int]) -> np.ndarray:
    canvas = np.zeros((28, 28), np.float64)
    for segment in _DIGITS[digit]:
        y0, y1, x0, x1 = _SEGMENTS[segment]
        canvas[y0:y1, x0:x1] = 1.0
    canvas = _blur(canvas)
    if shape != (28, 28):
        rows = np.linspace(0, 27, shape[0]).round().astype(int)
        cols = np.linspace(0, 27, shape[1]).round().astype(int)
        canvas = canvas[np.ix_(rows, cols)]
    return canvas / canvas.max()


def _blur(image: np.ndarray) -> np.ndarray:
    kernel = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    padded = np.pad(image, 2, mode="constant")
    rows = sum(k * padded[:, i : i + image.shape[1]] for i, k in enumerate(kernel))
    return sum(k * rows[i : i + image.shape[0], :] for i, k in enumerate(kernel))


def _normalise(values: np.ndarray) -> np.ndarray:
    return values / np.abs(values).sum(axis=(-2, -1), keepdims=True)


def _attribution(patterns: np.ndarray, rng, shortcut: float) -> np.ndarray:
    """Per-class maps: positive on the digit's strokes, a negative rim, smooth
    noise (occlusion maps are means over windows, so neighbours agree), and
    ``shortcut`` times a blob on the top-left marker position."""
    rim = np.stack([_blur(_blur(p)) - p for p in patterns])
    noise = np.stack([_blur(n) for n in rng.normal(0, 0.08, patterns.shape)])
    maps = patterns - 0.35 * rim + noise
    if shortcut:
        marker = np.zeros(patterns.shape[1:])
        marker[_SHORTCUT] = 1.0
        maps = maps + shortcut * _blur(marker)
    return _normalise(maps)


_SHORTCUT_STRENGTH = {
    "thickness=q1": 0.8,
    "writer_group=students & thickness=q1": 1.6,
    "writer_group=students": 0.3,
}


def _arrays(results, patterns, channels, examples_per_kind, rng) -> dict:
    n_classes, height, width = patterns.shape
    slices = results["slices"]
    class_maps = []
    for s in slices:
        maps = _attribution(patterns, rng, _SHORTCUT_STRENGTH.get(s["name"], 0.0))
        if s["status"] == "too_few":
            maps[np.arange(n_classes) % 4 == 3] = np.nan
        class_maps.append(maps)
    slice_class_maps = np.stack(class_maps)
    slice_maps = np.nanmean(slice_class_maps, axis=1)
    partition = [i for i, s in enumerate(slices) if s["columns"] == ["writer_group"]]
    sizes = np.array([slices[i]["n"] for i in partition], np.float64)
    total = sizes.sum()
    overall_map = np.tensordot(sizes, slice_maps[partition], axes=1) / total
    rest_maps = np.stack(
        [
            (overall_map * total - m * s["n"]) / (total - s["n"])
            for m, s in zip(slice_maps, slices, strict=True)
        ]
    )
    examples = []
    for s in slices:
        if s["status"] != "judged":
            continue
        strength = _SHORTCUT_STRENGTH.get(s["name"], 0.0)
        for kind in ("most_fragile", "misclassified", "typical"):
            for _ in range(examples_per_kind):
                label = int(rng.integers(n_classes))
                pred = label if kind != "misclassified" else (label + 5) % n_classes
                noise = rng.normal(0, 0.03, (height, width))
                image = patterns[label] * rng.uniform(0.8, 1.0) + noise
                if strength:
                    image[_SHORTCUT] = 0.9
                image = np.repeat(np.clip(image, 0, 1)[..., None], channels, axis=-1)
                gain = 3.0 if kind == "most_fragile" else 1.5
                values = _attribution(patterns[[pred]], rng, strength * 2)[0] * gain
                confidence = (
                    rng.uniform(0.95, 1.0)
                    if kind == "typical"
                    else rng.uniform(0.4, 0.7)
                )
                examples.append(
                    {
                        "slice": s["name"],
                        "kind": kind,
                        "image": image.astype(np.float32),
                        "map": values.astype(np.float32),
                        "label": label,
                        "pred": pred,
                        "confidence": float(confidence),
                        "id": f"t10k-{int(rng.integers(10000)):05d}.png",
                    }
                )
    return {
        "overall_map": overall_map.astype(np.float32),
        "slice_maps": slice_maps.astype(np.float32),
        "rest_maps": rest_maps.astype(np.float32),
        "slice_class_maps": slice_class_maps.astype(np.float32),
        "examples": examples,
    }
