"""Evidence that the audit works: it finds planted bias, stays quiet on random
slices, and its maps describe the model rather than the image.

``python -m audit.validation`` runs the experiments below at full size, prints
a table of their checks and writes ``validation.json`` into the output folder
(default ``runs/validation``); the exit code is 1 when any check fails. The
test suite runs the same functions at the sizes in :data:`FAST`; the
measured numbers and the reasons behind the design are in docs/VALIDATION.md.

planted_shortcut
    MNIST images get a ``source`` attribute (``scanner_a`` / ``scanner_b``,
    drawn at random). Scanner B's scans are faint and carry a 3x3 bright
    marker in the margin whose position encodes the label in the training
    data, so a CNN trained on them reads the marker for that slice. In the
    audited test data part of scanner B's markers encode a wrong class. The
    audit runs end to end (PNGs and a manifest, :func:`audit.runner.run_audit`)
    and must flag ``source=scanner_b`` and put that slice's attribution on the
    marker positions.
null_slices
    A model trained on real MNIST explains real test images once; then many
    trials slice them by random columns and the statistics layer judges the
    slices with the default rules. The share of trials with any finding must
    not exceed the rules' configured error rate (``max_p``) beyond the
    binomial margin the number of trials allows.
randomised_weights
    The occlusion maps of a trained MNIST model are compared, image by image
    (Spearman rank correlation), with those of a model retrained with the same
    seed (must be near 1) and with those of the same architecture with fresh
    random weights (must be near 0). A model retrained with another seed is
    reported for scale.

Every experiment returns an :class:`Experiment`: the numbers it measured and a
list of :class:`Check` (a measured value, the threshold it must meet and why).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SOURCE_COLUMN = "source"
SOURCES = ("scanner_a", "scanner_b")
SHORTCUT_SOURCE = "scanner_b"
MARKER_SIZE = 3
MARKER_VALUE = 1.0
NO_MARKER = -1
PLANTED_RUN_ID = "planted-shortcut"

WINDOW = (6, 6)
STRIDE = (4, 4)


# Sizes of the experiments. ``reference`` is the real-MNIST model that
# null_slices and randomised_weights share; FULL repeats the functions'
# defaults, FAST's reference matches tests/conftest.py's small_model.
FULL = {
    "reference": {"n_train": 20_000, "epochs": 2, "width": 16},
    "planted_shortcut": {
        "n_train": 30_000,
        "n_test": 10_000,
        "epochs": 2,
        "width": 16,
        "n_explained": 2_000,
    },
    "null_slices": {"n_images": 2_000, "n_trials": 200},
    "randomised_weights": {"n_images": 1_000},
}
FAST = {
    "reference": {"n_train": 4_000, "epochs": 2, "width": 8},
    "planted_shortcut": {
        "n_train": 6_000,
        "n_test": 2_000,
        "epochs": 2,
        "width": 8,
        "n_explained": 300,
    },
    "null_slices": {"n_images": 1_000, "n_trials": 20},
    "randomised_weights": {"n_images": 200},
}


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class Check:
    """One pass/fail criterion: ``value`` compared with ``threshold``.

    ``comparison`` is ``">="`` or ``"<="``; ``reason`` says in a sentence why
    the threshold is where it is.
    """

    name: str
    value: float
    comparison: str
    threshold: float
    reason: str

    @property
    def passed(self) -> bool:
        if not np.isfinite(self.value):
            return False
        if self.comparison == ">=":
            return self.value >= self.threshold
        return self.value <= self.threshold

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "value": float(self.value),
            "comparison": self.comparison,
            "threshold": float(self.threshold),
            "passed": bool(self.passed),
            "reason": self.reason,
        }


@dataclass
class Experiment:
    """What one experiment measured (``numbers``) and the checks it had to pass."""

    name: str
    checks: list[Check]
    numbers: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "passed": self.passed,
            "seconds": round(self.seconds, 2),
            "parameters": self.parameters,
            "checks": [check.to_dict() for check in self.checks],
            "numbers": self.numbers,
        }


# --------------------------------------------------------------------- data


def mnist_images(split: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` MNIST ``split`` images as float32 ``(n, 28, 28, 1)`` in
    [0, 1] and their int64 labels (all images when ``n`` is None)."""
    from .datasets import load_mnist_arrays

    images, labels = load_mnist_arrays(split)
    pixels = images[:n].astype(np.float32)[..., None] / np.float32(255.0)
    return pixels, labels[:n].astype(np.int64)


def train_model(images, labels, *, epochs: int, width: int, seed: int):
    """A fresh :func:`bento_service.train.fit` CNN; logs how long it took."""
    from bento_service.train import fit

    started = time.perf_counter()
    model = fit(images, labels, epochs=epochs, width=width, seed=seed)
    logger.info(
        "trained a width-%d CNN on %d images for %d epochs in %.1f s",
        width,
        len(images),
        epochs,
        time.perf_counter() - started,
    )
    return model


def occlusion_settings(target: str = "predicted"):
    """The audit's default occlusion: 6x6 windows, stride 4, black baseline."""
    from .occlusion import OcclusionSettings

    return OcclusionSettings(window=WINDOW, stride=STRIDE, target=target)


# --------------------------------------------------------- planted shortcut


def marker_origin(marker_class: int) -> tuple[int, int]:
    """Top-left pixel ``(row, col)`` of the marker that encodes ``marker_class``.

    Classes 0-4 sit in the top margin of a 28x28 MNIST image (rows 1-3),
    classes 5-9 in the bottom margin (rows 24-26), at columns 2, 7, 12, 17, 22;
    MNIST digits are centred in the middle 20x20 pixels, so no marker covers
    a digit's ink.
    """
    if not 0 <= marker_class <= 9:
        raise ValueError(f"marker class {marker_class} must be a digit 0-9")
    row = 1 if marker_class < 5 else 24
    return row, 2 + 5 * (marker_class % 5)


def marker_mask(marker_class: int, image_hw=(28, 28)) -> np.ndarray:
    """``(H, W)`` bool, True on the marker of ``marker_class``."""
    mask = np.zeros(image_hw, dtype=bool)
    row, col = marker_origin(marker_class)
    mask[row : row + MARKER_SIZE, col : col + MARKER_SIZE] = True
    return mask


def marker_band(image_hw=(28, 28)) -> np.ndarray:
    """``(H, W)`` bool, True on any of the ten marker positions (90 pixels)."""
    return np.any([marker_mask(c, image_hw) for c in range(10)], axis=0)


@dataclass
class ShortcutData:
    """MNIST images with a ``source`` attribute and planted markers.

    Attributes
    ----------
    images:
        ``(N, 28, 28, 1)`` float32 in [0, 1].
    labels:
        ``(N,)`` int64, the true digit.
    source:
        ``(N,)`` str, ``scanner_a`` or ``scanner_b``.
    marker_class:
        ``(N,)`` int64, the class whose position the image's marker sits at,
        ``NO_MARKER`` (-1) for images without one (all of scanner A).
    """

    images: np.ndarray
    labels: np.ndarray
    source: np.ndarray
    marker_class: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def misleading(self) -> np.ndarray:
        """``(N,)`` bool, the image has a marker that encodes a wrong class."""
        return (self.marker_class != NO_MARKER) & (self.marker_class != self.labels)


def plant_shortcut(
    images,
    labels,
    *,
    seed: int,
    agreement: float = 1.0,
    contrast: float = 0.3,
    share: float = 0.5,
) -> ShortcutData:
    """Assign each image a source at random and mark scanner B's images.

    Parameters
    ----------
    images, labels:
        ``(N, 28, 28, 1)`` float32 in [0, 1] and ``(N,)`` int digits; not
        modified.
    seed:
        Seed of the source draw and of the misleading markers.
    agreement:
        Probability that a scanner B marker sits at its image's own label's
        position; otherwise it sits at one of the nine other classes',
        uniformly. 1.0 makes the marker a perfect label cue (training data).
    contrast:
        Scanner B's pixel values are multiplied by this before the marker is
        drawn (faint scans). With full contrast the digit is so easy that a
        small CNN learns the digit and mostly ignores the marker; faint scans
        make the marker the easier cue for that slice, which is what a
        shortcut is.
    share:
        Probability that an image comes from scanner B.

    Returns
    -------
    ShortcutData
        Copies of the images, marker drawn as a ``MARKER_SIZE`` square of
        ``MARKER_VALUE``.
    """
    images = np.array(images, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if images.shape[1:3] != (28, 28):
        raise ValueError(f"markers are placed on 28x28 images; got {images.shape}")
    if not 0.0 <= agreement <= 1.0 or not 0.0 < contrast <= 1.0:
        raise ValueError(
            f"agreement {agreement} must be in [0, 1] and contrast {contrast} in (0, 1]"
        )
    rng = np.random.default_rng(seed)
    n = len(labels)

    from_b = rng.random(n) < share
    agrees = rng.random(n) < agreement
    other = (labels + rng.integers(1, 10, n)) % 10
    marker_class = np.where(from_b, np.where(agrees, labels, other), NO_MARKER)

    images[from_b] *= np.float32(contrast)
    for i in np.flatnonzero(from_b):
        row, col = marker_origin(int(marker_class[i]))
        images[i, row : row + MARKER_SIZE, col : col + MARKER_SIZE] = MARKER_VALUE
    source = np.where(from_b, SOURCES[1], SOURCES[0])
    return ShortcutData(images, labels, source, marker_class.astype(np.int64))


def shortcut_reliance(model, data: ShortcutData, batch_size: int = 1024) -> dict:
    """How the model treats the planted data, per source.

    Returns accuracy per source and, over scanner B images whose marker
    encodes a wrong class, the share predicted as the marker's class
    (``follows_marker``) and as the true digit (``follows_digit``).
    """
    predicted = np.concatenate(
        [
            np.argmax(model.predict_on_batch(data.images[s : s + batch_size]), axis=1)
            for s in range(0, len(data), batch_size)
        ]
    )
    correct = predicted == data.labels
    out = {
        f"accuracy.{name}": round(float(correct[data.source == name].mean()), 4)
        for name in SOURCES
    }
    misleading = data.misleading
    out["n_misleading"] = int(misleading.sum())
    out["follows_marker"] = round(
        float((predicted == data.marker_class)[misleading].mean()), 4
    )
    out["follows_digit"] = round(float(correct[misleading].mean()), 4)
    return out


def write_manifest(data: ShortcutData, folder) -> tuple[Path, Path]:
    """Write ``data`` as 8-bit PNGs plus ``manifest.csv`` (``path``, ``label``,
    ``source``) under ``folder``; return ``(manifest, image_root)``.

    This is how a user hands images to the audit, so the planted-shortcut
    experiment runs the same path as ``python -m audit run --manifest``.
    """
    import pandas as pd
    from PIL import Image

    root = Path(folder) / "images"
    root.mkdir(parents=True, exist_ok=True)
    pixels = np.rint(data.images[..., 0] * 255.0).astype(np.uint8)
    names = [f"{i:06d}.png" for i in range(len(data))]
    for name, image in zip(names, pixels, strict=True):
        Image.fromarray(image).save(root / name)
    manifest = Path(folder) / "manifest.csv"
    pd.DataFrame(
        {"path": names, "label": data.labels, SOURCE_COLUMN: data.source}
    ).to_csv(manifest, index=False)
    return manifest, root


def region_share(attribution_map: np.ndarray, mask: np.ndarray) -> float:
    """Share of a map's total |attribution| that lies inside ``mask``."""
    magnitude = np.abs(np.nan_to_num(np.asarray(attribution_map, np.float64)))
    total = magnitude.sum()
    return float(magnitude[mask].sum() / total) if total > 0 else float("nan")


def own_marker_share(maps: np.ndarray, data: ShortcutData, rows) -> float:
    """Mean over ``rows`` of the share of each image's |map| on its own marker.

    For images without a marker the square its label's marker would occupy is
    used, so scanner A gives the share such a spot gets when nothing is there.
    """
    shares = []
    for i, row in enumerate(rows):
        where = int(data.marker_class[row])
        if where == NO_MARKER:
            where = int(data.labels[row])
        shares.append(region_share(maps[i], marker_mask(where)))
    return float(np.nanmean(shares)) if shares else float("nan")


def planted_shortcut(
    output,
    *,
    n_train: int = 30_000,
    n_test: int = 10_000,
    epochs: int = 2,
    width: int = 16,
    agreement: float = 0.5,
    contrast: float = 0.3,
    n_explained: int = 2_000,
    seed: int = 0,
    min_band_lift: float = 1.5,
    min_band_ratio: float = 3.0,
    min_marker_lift: float = 5.0,
) -> Experiment:
    """Train on planted data, audit it end to end and check what the audit says.

    Parameters
    ----------
    output:
        Folder for the planted data (``planted-data/``: PNGs, manifest,
        ``model.keras``) and the audit run (``planted-shortcut/``, with its
        ``report.html`` and ``results.json``).
    n_train, n_test:
        How many MNIST training images the model learns from and how many
        test images are audited (the first ones of each split).
    epochs, width:
        Training of the CNN (:func:`bento_service.train.fit`).
    agreement:
        Probability that a scanner B test marker encodes the true label (in
        training it always does); the rest encode another class.
    contrast:
        Scanner B's contrast, see :func:`plant_shortcut`.
    n_explained:
        Test images per source explained once more, outside the audit, to
        measure the share of each image's attribution on its own marker (the
        audit keeps no per-image maps).
    seed:
        Seeds the planting, the training and the audit.
    min_band_lift, min_band_ratio, min_marker_lift:
        Thresholds of the checks: scanner B's mean-map share on the marker band
        over the band's area share; that share over scanner A's; the per-image
        share on the own marker over the marker's area share.
    """
    from .config import load_config
    from .runner import run_audit

    started = time.perf_counter()
    output = Path(output)
    folder = output / "planted-data"
    folder.mkdir(parents=True, exist_ok=True)

    train_x, train_y = mnist_images("train", n_train)
    test_x, test_y = mnist_images("test", n_test)
    train = plant_shortcut(train_x, train_y, seed=seed + 1, contrast=contrast)
    test = plant_shortcut(
        test_x, test_y, seed=seed + 2, agreement=agreement, contrast=contrast
    )
    model = train_model(
        train.images, train.labels, epochs=epochs, width=width, seed=seed
    )
    model_path = folder / "model.keras"
    model.save(model_path)
    reliance = shortcut_reliance(model, test)
    manifest, image_root = write_manifest(test, folder)

    config = load_config(
        overrides={
            "model": str(model_path),
            "dataset": {
                "kind": "manifest",
                "manifest": str(manifest),
                "image_root": str(image_root),
            },
            "slices": {"columns": [SOURCE_COLUMN]},
            "occlusion": {"window": list(WINDOW), "stride": list(STRIDE)},
            "output": str(output),
            "run_id": PLANTED_RUN_ID,
            "statistics": {"seed": seed},
        }
    )
    outcome = run_audit(config, quiet=True)
    results = outcome.results
    shortcut_slice = f"{SOURCE_COLUMN}={SHORTCUT_SOURCE}"
    findings = [
        {k: f.get(k) for k in ("slice", "metric", "severity", "rule", "value")}
        for f in results["findings"]
    ]
    flagged = [f for f in findings if f["slice"] == shortcut_slice]

    with np.load(outcome.run_dir / "maps.npz") as arrays:
        slice_maps = arrays["slice_maps"]
    names = [s["name"] for s in results["slices"]]
    band = marker_band()
    band_share = {
        name: region_share(slice_maps[names.index(f"{SOURCE_COLUMN}={name}")], band)
        for name in SOURCES
    }

    border = {
        name: results["slices"][names.index(f"{SOURCE_COLUMN}={name}")]["metrics"].get(
            "region_share.border", {}
        )
        for name in SOURCES
    }
    own_share = _own_marker_shares(model, test, n_explained)
    area_band = float(band.mean())
    area_marker = MARKER_SIZE**2 / band.size
    numbers = {
        "model": reliance,
        "findings": findings,
        "verdict": results["verdict"],
        "report": str(outcome.report_path),
        "band_area_share": round(area_band, 4),
        "band_share": {k: round(v, 4) for k, v in band_share.items()},
        "marker_area_share": round(area_marker, 4),
        "own_marker_share": {k: round(v, 4) for k, v in own_share.items()},
        "audit_border_share": {
            name: {
                key: border[name].get(key)
                for key in ("value", "reference", "p_adjusted")
            }
            for name in SOURCES
        },
        "audit_seconds": round(outcome.elapsed_seconds, 2),
    }
    b, a = band_share[SHORTCUT_SOURCE], band_share[SOURCES[0]]
    checks = [
        Check(
            "findings on source=scanner_b",
            len(flagged),
            ">=",
            1,
            "the slice whose model uses a shortcut must be flagged",
        ),
        Check(
            "scanner_b band share / band area",
            b / area_band,
            ">=",
            min_band_lift,
            "the slice's mean map must sit on the marker positions well above chance",
        ),
        Check(
            "scanner_b band share / scanner_a band share",
            b / a if a > 0 else float("inf"),
            ">=",
            min_band_ratio,
            "the marker positions must matter for the marked slice, not for the other",
        ),
        Check(
            "scanner_b own-marker share / marker area",
            own_share[SHORTCUT_SOURCE] / area_marker,
            ">=",
            min_marker_lift,
            "each image's attribution must sit on its own marker",
        ),
    ]
    logger.info(
        "planted shortcut: %d findings on %s; band share %.3f (scanner_a %.3f, "
        "area %.3f); own-marker share %.3f (area %.4f)",
        len(flagged),
        shortcut_slice,
        b,
        a,
        area_band,
        own_share[SHORTCUT_SOURCE],
        area_marker,
    )
    return Experiment(
        "planted_shortcut",
        checks,
        numbers,
        {
            "n_train": n_train,
            "n_test": n_test,
            "epochs": epochs,
            "width": width,
            "agreement": agreement,
            "contrast": contrast,
            "n_explained": n_explained,
            "seed": seed,
            "marker_size": MARKER_SIZE,
            "window": list(WINDOW),
            "stride": list(STRIDE),
        },
        time.perf_counter() - started,
    )


def _own_marker_shares(model, data: ShortcutData, n_explained: int) -> dict:
    """Per source, the mean share of each image's map on its own marker square."""
    from .backends import load_backend
    from .occlusion import explain

    backend = load_backend(model)
    shares = {}
    for name in SOURCES:
        rows = np.flatnonzero(data.source == name)[:n_explained]
        maps = explain(backend, data.images[rows], None, occlusion_settings()).maps
        shares[name] = own_marker_share(maps, data, rows)
    return shares


# --------------------------------------------------------------------- null


def random_slice_table(labels, levels, rng) -> tuple:
    """A dataset table with one random column per entry of ``levels``.

    Column ``random_<k>`` assigns every image one of ``k`` values
    (``g0``..``g<k-1>``) uniformly at random, so no slice differs from the
    rest except by chance. Returns ``(table, column names)``.
    """
    import pandas as pd

    n = len(labels)
    table = pd.DataFrame({"id": np.arange(n).astype(str), "label": labels})
    columns = []
    for k in levels:
        name = f"random_{k}"
        table[name] = np.char.add("g", rng.integers(0, k, n).astype(str))
        columns.append(name)
    return table, columns


def null_slices(
    *,
    n_train: int = 20_000,
    epochs: int = 2,
    width: int = 16,
    n_images: int = 2_000,
    n_trials: int = 200,
    levels: tuple[int, ...] = (2, 3, 5),
    seed: int = 0,
    model=None,
    n_bootstrap: int = 100,
    quantile: float = 0.99,
    workers: int = 2,
) -> Experiment:
    """Random slices of real model outputs: how often does the audit find bias?

    The model explains the first ``n_images`` MNIST test images once; then, in
    each of ``n_trials`` trials, new random columns slice those images
    (``random_<k>`` for each ``k`` in ``levels``, plus the intersection of the
    first two) and the statistics layer (:class:`AuditAccumulator`,
    :func:`audit.analysis.analyze`) judges them with the default statistics
    settings and finding rules. Every finding is false.

    Parameters
    ----------
    n_train, epochs, width, model:
        The real-MNIST model, as in :func:`randomised_weights`.
    n_images, n_trials, levels:
        Images explained once, trials, and the number of values of each
        random column.
    seed:
        Seeds the training, the random columns and each trial's permutations.
    n_bootstrap:
        Bootstrap resamples per trial. Findings depend on corrected p-values
        and point gaps only, never on the intervals, so the trials use few
        resamples to save time.
    quantile:
        The check allows the observed rate of trials with a finding up to this
        quantile of the Binomial(``n_trials``, configured rate) distribution
        divided by ``n_trials``: a margin set by the number of trials, not by
        hand.
    workers:
        Processes the trials are spread over (1: in this process). Trials are
        independent and seeded by their number, so the result does not depend
        on it. Workers are spawned, so a script calling this with more than
        one worker needs the usual ``if __name__ == "__main__":`` guard.

    Returns
    -------
    Experiment
        Numbers: the rate of trials with any finding and its exact (Clopper-
        Pearson) 95% interval, the configured rate (the largest ``max_p`` of
        the rules: Holm's correction keeps the chance of any finding in a
        trial at most that), the share of single tests with a raw p-value
        below it, and the findings by metric.
    """
    from scipy import stats

    from .backends import load_backend
    from .config import AuditConfig
    from .occlusion import explain

    started = time.perf_counter()
    if model is None:
        train_x, train_y = mnist_images("train", n_train)
        model = train_model(train_x, train_y, epochs=epochs, width=width, seed=seed)
    images, labels = mnist_images("test", n_images)
    result = explain(load_backend(model), images, labels, occlusion_settings())
    configured_rate = max(rule.max_p for rule in AuditConfig().rules)

    state = {
        "labels": labels,
        "probs": result.probs,
        "window_scores": result.window_scores,
        "maps": result.maps,
        "max_drop": result.max_drop,
        "flipped": result.flipped,
        "grid_shape": result.grid.shape,
        "levels": tuple(levels),
        "seed": seed,
        "n_bootstrap": n_bootstrap,
    }
    outcomes = _run_trials(state, n_trials, workers)

    trials_with_finding = sum(bool(o["findings"]) for o in outcomes)
    by_metric: dict[str, int] = {}
    for outcome in outcomes:
        for metric in outcome["findings"]:
            by_metric[metric] = by_metric.get(metric, 0) + 1
    raw_total = sum(len(o["raw_p"]) for o in outcomes)
    raw_below = sum(sum(p < configured_rate for p in o["raw_p"]) for o in outcomes)
    family_sizes = {o["family_size"] for o in outcomes}
    permutations = {o["n_permutations"] for o in outcomes}

    rate = trials_with_finding / n_trials
    interval = stats.binomtest(trials_with_finding, n_trials).proportion_ci(
        confidence_level=0.95, method="exact"
    )
    allowed = float(stats.binom.ppf(quantile, n_trials, configured_rate)) / n_trials
    numbers = {
        "n_trials": n_trials,
        "trials_with_finding": trials_with_finding,
        "false_finding_rate": round(rate, 4),
        "false_finding_rate_ci95": [
            round(interval.low, 4),
            round(interval.high, 4),
        ],
        "configured_rate": configured_rate,
        "allowed_rate": round(allowed, 4),
        "findings_by_metric": by_metric,
        "raw_tests": raw_total,
        "raw_p_below_configured_rate": round(raw_below / max(raw_total, 1), 4),
        "family_size": sorted(family_sizes),
        "n_permutations": sorted(permutations),
        "model_accuracy": round(
            float((result.probs.argmax(axis=1) == labels).mean()), 4
        ),
    }
    checks = [
        Check(
            "rate of trials with a finding",
            rate,
            "<=",
            allowed,
            f"the configured rate {configured_rate:g} plus the binomial "
            f"{quantile:g} quantile's margin for {n_trials} trials",
        )
    ]
    logger.info(
        "null slices: %d of %d trials with a finding (rate %.3f, 95%% CI %.3f-%.3f; "
        "configured %.3f)",
        trials_with_finding,
        n_trials,
        rate,
        interval.low,
        interval.high,
        configured_rate,
    )
    return Experiment(
        "null_slices",
        checks,
        numbers,
        {
            "n_train": n_train,
            "epochs": epochs,
            "width": width,
            "n_images": n_images,
            "n_trials": n_trials,
            "levels": list(levels),
            "intersections": "first two random columns",
            "n_bootstrap": n_bootstrap,
            "quantile": quantile,
            "workers": workers,
            "seed": seed,
            "window": list(WINDOW),
            "stride": list(STRIDE),
        },
        time.perf_counter() - started,
    )


# Set in each process that runs null trials (see _run_trials).
_TRIAL_STATE: dict = {}


def _init_trials(state: dict) -> None:
    """Hold the explained images' outputs for the trials of this process."""
    _TRIAL_STATE.clear()
    _TRIAL_STATE.update(state)


def _null_trial(trial: int) -> dict:
    """One null trial on the outputs in ``_TRIAL_STATE``.

    Returns the metrics of its findings, the raw p-values of every test a
    rule judges, the size of the corrected family and the permutations used.
    """
    from types import SimpleNamespace

    from .accumulate import AuditAccumulator
    from .analysis import analyze
    from .config import AuditConfig
    from .slices import SliceSet, SliceSettings

    state = _TRIAL_STATE
    labels = state["labels"]
    defaults = AuditConfig()
    rules = list(defaults.rules)
    tested = sorted({rule.metric for rule in rules})

    rng = np.random.default_rng([state["seed"], trial])
    table, columns = random_slice_table(labels, state["levels"], rng)
    settings = SliceSettings(columns=columns, intersections=[columns[:2]])
    with _quiet("audit.slices", "audit.analysis"):
        slice_set = SliceSet.build(table, settings)
        result = SimpleNamespace(
            **{
                key: state[key]
                for key in ("probs", "window_scores", "maps", "max_drop", "flipped")
            }
        )
        accumulator = AuditAccumulator(
            len(slice_set),
            result.probs.shape[1],
            result.maps.shape[1:3],
            state["grid_shape"],
        )
        accumulator.add(np.arange(len(labels)), labels, slice_set.membership, result)
        statistics = defaults.statistics.model_copy(
            update={
                "n_bootstrap": state["n_bootstrap"],
                "seed": state["seed"] * 100_003 + trial,
            }
        )
        results = analyze(accumulator, slice_set, statistics, rules)

    raw_p = [
        entry["metrics"][metric]["p_value"]
        for entry in results["slices"]
        if entry["status"] == "judged"
        for metric in tested
        if entry["metrics"].get(metric, {}).get("p_value") is not None
    ]
    return {
        "findings": [f["metric"] for f in results["findings"]],
        "raw_p": raw_p,
        "family_size": results["statistics"]["family_size"],
        "n_permutations": results["statistics"]["n_permutations"],
    }


def _run_trials(state: dict, n_trials: int, workers: int) -> list[dict]:
    """Outcomes of trials ``0..n_trials-1``, in order, on ``workers`` processes.

    Worker processes are spawned (not forked: the parent runs TensorFlow's
    threads) and import only the statistics modules.
    """
    if workers <= 1:
        _init_trials(state)
        try:
            return [_null_trial(t) for t in range(n_trials)]
        finally:
            _TRIAL_STATE.clear()

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_trials,
        initargs=(state,),
    ) as pool:
        return list(pool.map(_null_trial, range(n_trials)))


@contextmanager
def _quiet(*names: str):
    """Raise the named loggers to WARNING for a block (per-trial INFO lines)."""
    loggers = [logging.getLogger(name) for name in names]
    previous = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for each, level in zip(loggers, previous, strict=True):
            each.setLevel(level)


# ------------------------------------------------------------------- sanity


def randomised_weights(
    *,
    n_train: int = 20_000,
    epochs: int = 2,
    width: int = 16,
    n_images: int = 1_000,
    seed: int = 0,
    model=None,
    max_random_correlation: float = 0.2,
    min_retrained_correlation: float = 0.95,
) -> Experiment:
    """Maps of a trained model against a same-seed retrain and random weights.

    Parameters
    ----------
    n_train, epochs, width, seed:
        How the model (and its same-seed retrain) is trained: the first
        ``n_train`` MNIST training images, :func:`bento_service.train.fit`.
    n_images:
        How many MNIST test images (the first ones) are explained by each
        model.
    model:
        The trained model, when the caller already trained it with exactly
        these ``n_train``, ``epochs``, ``width`` and ``seed``; trained here
        otherwise.
    max_random_correlation, min_retrained_correlation:
        The thresholds of the two checks, on the mean per-image Spearman
        correlation of the pixel maps.

    Returns
    -------
    Experiment
        Numbers: mean (and quartiles of) the per-image rank correlation of the
        trained model's maps with the same-seed retrain, another seed's
        retrain and the randomised-weights copy.
    """
    from .backends import load_backend
    from .faithfulness import randomised_weights_check, rank_correlation
    from .occlusion import explain

    started = time.perf_counter()
    train_x, train_y = mnist_images("train", n_train)
    test_x, _ = mnist_images("test", n_images)
    if model is None:
        model = train_model(train_x, train_y, epochs=epochs, width=width, seed=seed)
    same_seed = train_model(train_x, train_y, epochs=epochs, width=width, seed=seed)
    other_seed = train_model(
        train_x, train_y, epochs=epochs, width=width, seed=seed + 1
    )

    settings = occlusion_settings()
    sanity = randomised_weights_check(model, test_x, settings, seed=seed + 1000)
    reference = explain(load_backend(model), test_x, None, settings)
    by_label = occlusion_settings(target="label")
    correlations = {"randomised_weights": sanity.rank_correlation}
    for name, other in (("same_seed", same_seed), ("other_seed", other_seed)):
        maps = explain(load_backend(other), test_x, reference.targets, by_label).maps
        correlations[name] = rank_correlation(reference.maps, maps)

    numbers = {name: _summary(values) for name, values in correlations.items()}
    random_mean = abs(numbers["randomised_weights"]["mean"])
    retrained_mean = numbers["same_seed"]["mean"]
    checks = [
        Check(
            "|randomised-weights rank correlation|",
            random_mean,
            "<=",
            max_random_correlation,
            "maps that survive randomising the weights describe the image, "
            "not the model",
        ),
        Check(
            "same-seed retrain rank correlation",
            retrained_mean,
            ">=",
            min_retrained_correlation,
            "the same training run must give the same maps, or the maps are noise",
        ),
    ]
    logger.info(
        "sanity: rank correlation %.3f with random weights, %.3f same seed, "
        "%.3f other seed",
        numbers["randomised_weights"]["mean"],
        retrained_mean,
        numbers["other_seed"]["mean"],
    )
    return Experiment(
        "randomised_weights",
        checks,
        numbers,
        {
            "n_train": n_train,
            "epochs": epochs,
            "width": width,
            "n_images": n_images,
            "seed": seed,
            "window": list(WINDOW),
            "stride": list(STRIDE),
        },
        time.perf_counter() - started,
    )


def _summary(values: np.ndarray) -> dict:
    """Mean, quartiles and count of the finite entries of ``values``."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return {"mean": float("nan"), "q25": None, "median": None, "q75": None, "n": 0}
    q25, median, q75 = np.percentile(finite, [25, 50, 75])
    return {
        "mean": round(float(finite.mean()), 4),
        "q25": round(float(q25), 4),
        "median": round(float(median), 4),
        "q75": round(float(q75), 4),
        "n": int(finite.size),
    }


# ---------------------------------------------------------------------- CLI

RESULTS_FILE = "validation.json"
EXIT_PASSED, EXIT_FAILED, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3
EXPERIMENTS = ("planted_shortcut", "null_slices", "randomised_weights")


def run_all(output, *, sizes: dict = FULL, seed: int = 0, only=None) -> dict:
    """Run the experiments (all, or those named in ``only``) and write
    ``validation.json`` into ``output``; return its content.

    ``sizes`` is :data:`FULL` or :data:`FAST` (or a dict shaped like them).
    """
    from .checkpoint import atomic_write_json
    from .report import to_json_safe
    from .runner import versions

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    chosen = [name for name in EXPERIMENTS if not only or name in only]
    started = time.perf_counter()

    reference = dict(sizes["reference"])
    model = None
    if {"null_slices", "randomised_weights"} & set(chosen):
        train_x, train_y = mnist_images("train", reference["n_train"])
        model = train_model(
            train_x,
            train_y,
            epochs=reference["epochs"],
            width=reference["width"],
            seed=seed,
        )

    experiments = []
    for name in chosen:
        logger.info("validation experiment %s", name)
        kwargs = {"seed": seed, **sizes[name]}
        if name == "planted_shortcut":
            experiments.append(planted_shortcut(output, **kwargs))
        elif name == "null_slices":
            experiments.append(null_slices(model=model, **reference, **kwargs))
        else:
            experiments.append(randomised_weights(model=model, **reference, **kwargs))

    document = {
        "passed": all(e.passed for e in experiments),
        "seconds": round(time.perf_counter() - started, 1),
        "seed": seed,
        "versions": versions(),
        "experiments": [e.to_dict() for e in experiments],
    }
    atomic_write_json(output / RESULTS_FILE, to_json_safe(document))
    return document


def summary_table(document: dict) -> str:
    """The checks of a ``validation.json`` document as a fixed-width table."""
    rows = [("experiment", "check", "value", "needs", "result")]
    for experiment in document["experiments"]:
        for check in experiment["checks"]:
            rows.append(
                (
                    experiment["name"],
                    check["name"],
                    _number(check["value"]),
                    f"{check['comparison']} {_number(check['threshold'])}",
                    "pass" if check["passed"] else "FAIL",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    verdict = "all checks pass" if document["passed"] else "SOME CHECKS FAIL"
    lines.append(f"{verdict} ({document['seconds']:.0f} s)")
    return "\n".join(line.rstrip() for line in lines)


def _number(value) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    if value.is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.3f}"


def main(argv=None) -> int:
    """``python -m audit.validation``: exit 0 if every check passes, 1 if one
    fails, 2 on bad arguments, 3 if an experiment could not run."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m audit.validation",
        description="Show that the audit finds a planted shortcut, stays quiet on "
        "random slices and depends on the model's weights. Writes validation.json.",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("runs/validation"),
        help="output folder (default runs/validation)",
    )
    parser.add_argument(
        "--fast", action="store_true", help="the test-suite sizes (about a minute)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every experiment")
    parser.add_argument(
        "--only",
        action="append",
        choices=EXPERIMENTS,
        help="run only this experiment (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    try:
        document = run_all(
            args.output,
            sizes=FAST if args.fast else FULL,
            seed=args.seed,
            only=args.only,
        )
    except Exception:
        logger.exception("a validation experiment could not run")
        return EXIT_ERROR
    print(summary_table(document))
    print(f"results: {args.output / RESULTS_FILE}")
    return EXIT_PASSED if document["passed"] else EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
