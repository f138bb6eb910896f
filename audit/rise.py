"""RISE: attribution from random masks (Petsiuk, Das and Saenko, 2018).

Each of ``n_masks`` masks keeps a random subset of a coarse grid of cells
(each cell kept with ``keep_probability``), smoothly upsampled and shifted by
a random sub-cell offset; the masked image blends the image with the baseline
(``mask * image + (1 - mask) * baseline``). A pixel's saliency is the
mask-weighted mean of the target probability::

    saliency[n, y, x] = sum_m p_t(masked image n, m) * mask[m, y, x]
                        / (n_masks * keep_probability)

Unlike sliding windows, the cost per image is set by ``n_masks`` freely rather
than by the image and window sizes, and every pass informs every pixel.
The masks are shared by all images and fixed by ``seed``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from . import occlusion
from .faithfulness import deletion_insertion
from .occlusion import (
    BASELINES,
    UNKNOWN_CHOICE,
    Baseline,
    OcclusionError,
    OcclusionSettings,
    check_images,
    stream_batches,
)

logger = logging.getLogger(__name__)

RISE_TARGETS = ("predicted", "label", "all")


@dataclass(frozen=True)
class RiseSettings:
    """How many masks, how coarse, and what the masked pixels become.

    Parameters
    ----------
    n_masks:
        Masks per image (>= 1); each image costs ``n_masks + 1`` passes.
    cells:
        ``(rows, cols)`` of the coarse random grid (or one int). Fewer cells
        make larger blobs.
    keep_probability:
        Chance that a cell is kept (shows the image), in (0, 1).
    baseline, baseline_value, blur_sigma:
        As in :class:`audit.occlusion.OcclusionSettings`.
    target:
        ``predicted``, ``label`` or ``all`` (maps gain a class axis).
    max_batch:
        Most images in one call to the model.
    seed:
        Seed of the masks.
    """

    n_masks: int = 1000
    cells: tuple[int, int] = (7, 7)
    keep_probability: float = 0.5
    baseline: str = "constant"
    baseline_value: float = 0.0
    blur_sigma: float = 2.0
    target: str = "predicted"
    max_batch: int = 1024
    seed: int = 0

    def __post_init__(self):
        cells = occlusion.size_pair(self.cells, "cells")
        if min(cells) < 1:
            raise OcclusionError(f"cells {cells} must be at least 1 each way")
        object.__setattr__(self, "cells", cells)
        if int(self.n_masks) < 1:
            raise OcclusionError(f"n_masks {self.n_masks} must be at least 1")
        if not 0 < self.keep_probability < 1:
            raise OcclusionError(
                f"keep_probability {self.keep_probability} must lie in (0, 1)"
            )
        for name, choices in (("baseline", BASELINES), ("target", RISE_TARGETS)):
            value = getattr(self, name)
            if value not in choices:
                raise OcclusionError(
                    UNKNOWN_CHOICE.format(name=name, value=value, choices=choices)
                )
        if int(self.max_batch) < 1:
            raise OcclusionError(f"max_batch {self.max_batch} must be at least 1")
        if not self.blur_sigma > 0:
            raise OcclusionError(f"blur_sigma {self.blur_sigma} must be > 0 pixels")


@dataclass
class RiseResult:
    """RISE saliency of ``N`` images.

    Attributes
    ----------
    probs:
        ``(N, C)`` float32 probabilities of the unmasked images.
    targets:
        ``(N,)`` int64 class of each map (predicted class for target ``all``).
    maps:
        ``(N, H, W)`` float32 saliency (``(N, H, W, C)`` for target ``all``),
        in probability units: about the target's mean probability when the
        pixel is shown.
    forward_passes:
        Model evaluations of the call, ``N * (n_masks + 1)``.
    passes_per_image:
        ``n_masks + 1``.
    masks:
        ``(n_masks, H, W)`` float32 masks in [0, 1] that were used.
    """

    probs: np.ndarray
    targets: np.ndarray
    maps: np.ndarray
    forward_passes: int
    passes_per_image: int
    masks: np.ndarray = field(repr=False)


def _upsampling(size: int, cells: int) -> np.ndarray:
    """``(size, cells)`` bilinear interpolation matrix, pixel centres aligned."""
    source = (np.arange(size) + 0.5) * cells / size - 0.5
    source = np.clip(source, 0, cells - 1)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, cells - 1)
    weight = source - low
    matrix = np.zeros((size, cells))
    matrix[np.arange(size), low] += 1 - weight
    matrix[np.arange(size), high] += weight
    return matrix


def generate_masks(
    n_masks: int,
    image_hw: tuple[int, int],
    cells: tuple[int, int] = (7, 7),
    keep_probability: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """``(n_masks, H, W)`` float32 RISE masks in [0, 1].

    A ``cells`` grid of Bernoulli(``keep_probability``) values is upsampled
    bilinearly to ``(cells + 1) * cell_size`` pixels (``cell_size =
    ceil(H / rows)``, likewise across) and cropped to ``(H, W)`` at a random
    offset below one cell, so cell edges fall anywhere in the image.
    """
    height, width = image_hw
    rows, cols = occlusion.size_pair(cells, "cells")
    rng = np.random.default_rng(seed)
    cell_h, cell_w = math.ceil(height / rows), math.ceil(width / cols)
    up_h, up_w = (rows + 1) * cell_h, (cols + 1) * cell_w
    grid = (rng.random((n_masks, rows, cols)) < keep_probability).astype(np.float64)
    tall = _upsampling(up_h, rows)
    wide = _upsampling(up_w, cols)
    shift_y = rng.integers(0, cell_h, n_masks)
    shift_x = rng.integers(0, cell_w, n_masks)
    masks = np.empty((n_masks, height, width), dtype=np.float32)
    for m in range(n_masks):
        rows_y = tall[shift_y[m] : shift_y[m] + height]
        rows_x = wide[shift_x[m] : shift_x[m] + width]
        masks[m] = rows_y @ grid[m] @ rows_x.T
    return np.clip(masks, 0.0, 1.0, out=masks)


class _MaskedCopies:
    """Rows of the stream: image ``n`` blended with the baseline by mask ``m``."""

    def __init__(self, images, masks, baseline: Baseline, value_range):
        self.images = images
        self.masks = masks[..., None]
        self.n_masks = len(masks)
        self.baseline = baseline
        self.low, self.high = (np.float32(v) for v in value_range)

    def __call__(self, start: int, end: int) -> np.ndarray:
        rows = np.arange(start, end)
        image = rows // self.n_masks
        first = image[0]
        originals = self.images[first : image[-1] + 1]
        base = np.broadcast_to(self.baseline.of(originals), originals.shape)
        local = image - first
        keep = self.masks[rows % self.n_masks]
        out = originals[local] * keep + base[local] * (1 - keep)
        return np.clip(out, self.low, self.high, out=out)


def _probabilities(backend, images, max_batch: int) -> np.ndarray:
    out = np.empty((len(images), len(backend.class_names)), dtype=np.float32)

    def consume(start, end, values):
        out[start:end] = values

    stream_batches(
        backend,
        len(images),
        lambda s, e: images[s:e],
        consume,
        max_batch=max_batch,
    )
    return out


def explain(
    backend,
    images,
    labels=None,
    settings: RiseSettings | None = None,
    *,
    dataset_mean=None,
) -> RiseResult:
    """RISE saliency of ``images`` under ``backend``.

    ``images`` are ``(N, H, W, C)`` in the backend's value range; ``labels``
    ``(N,)`` are needed for target ``label``. The model sees ``N * (n_masks +
    1)`` images in batches of at most ``settings.max_batch``.

    Known limits: the maps are Monte Carlo estimates whose noise falls as
    ``1 / sqrt(n_masks)``; at a few dozen masks they are coarse, and
    ``cells`` bounds the detail they can show.
    """
    settings = settings or RiseSettings()
    images = check_images(images, backend)
    n, height, width, _ = images.shape
    n_classes = len(backend.class_names)
    baseline = Baseline(settings, backend.value_range, images.shape[1:], dataset_mean)
    masks = generate_masks(
        settings.n_masks,
        (height, width),
        settings.cells,
        settings.keep_probability,
        settings.seed,
    )
    started = time.perf_counter()

    probs = _probabilities(backend, images, settings.max_batch)
    if settings.target == "label":
        targets = occlusion.check_labels(labels, n, n_classes)
    else:
        targets = probs.argmax(axis=1).astype(np.int64)

    every_class = settings.target == "all"
    width_out = n_classes if every_class else 1
    saliency = np.zeros((n, height * width, width_out), dtype=np.float64)
    flat_masks = masks.reshape(len(masks), -1)
    n_masks = len(masks)

    def consume(start, end, values):
        rows = np.arange(start, end)
        image = rows // n_masks
        for i in np.unique(image):
            part = image == i
            weights = values[part] if every_class else values[part, targets[i]][:, None]
            saliency[i] += flat_masks[rows[part] % n_masks].T @ weights

    stream_batches(
        backend,
        n * n_masks,
        _MaskedCopies(images, masks, baseline, backend.value_range),
        consume,
        max_batch=settings.max_batch,
    )
    saliency /= n_masks * settings.keep_probability
    maps = saliency.reshape(n, height, width, width_out).astype(np.float32)
    if not every_class:
        maps = maps[..., 0]
    logger.debug(
        "RISE of %d images x %d masks in %.2f s",
        n,
        n_masks,
        time.perf_counter() - started,
    )
    return RiseResult(
        probs=probs,
        targets=targets,
        maps=maps,
        forward_passes=n * (n_masks + 1),
        passes_per_image=n_masks + 1,
        masks=masks,
    )


def compare_with_occlusion(
    backend,
    images,
    settings: OcclusionSettings,
    *,
    n_masks: int | None = None,
    cells=(7, 7),
    steps: int = 10,
    seed: int = 0,
    dataset_mean=None,
) -> dict:
    """Faithfulness of RISE and sliding-window occlusion at one pass budget.

    Occlusion with ``settings`` costs ``K + 1`` passes per image; RISE gets
    ``n_masks`` masks (default ``K``, the same budget). Both explain the
    predicted class, with the same baseline, and both maps are scored by the
    same deletion/insertion curves (``steps`` points after the first).

    Returns a JSON-able dict: ``forward_passes_per_image`` of each method,
    and per method the mean ``deletion_auc`` (lower is better),
    ``insertion_auc`` (higher is better), their difference
    ``insertion_minus_deletion`` and the seconds the explanation took.
    """
    images = check_images(images, backend)
    started = time.perf_counter()
    occluded = occlusion.explain(
        backend,
        images,
        None,
        replace(settings, target="predicted"),
        dataset_mean=dataset_mean,
    )
    occlusion_seconds = time.perf_counter() - started
    budget = occluded.passes_per_image - 1 if n_masks is None else int(n_masks)

    rise_settings = RiseSettings(
        n_masks=budget,
        cells=cells,
        baseline=settings.baseline,
        baseline_value=settings.baseline_value,
        blur_sigma=settings.blur_sigma,
        target="label",
        max_batch=settings.max_batch,
        seed=seed,
    )
    started = time.perf_counter()
    rise = explain(
        backend, images, occluded.targets, rise_settings, dataset_mean=dataset_mean
    )
    rise_seconds = time.perf_counter() - started

    summary = {"n_images": len(images), "steps": int(steps)}
    for name, maps, passes, seconds in (
        ("occlusion", occluded.maps, occluded.passes_per_image, occlusion_seconds),
        ("rise", rise.maps, rise.passes_per_image, rise_seconds),
    ):
        curves = deletion_insertion(
            backend,
            images,
            maps,
            occluded.targets,
            settings,
            steps=steps,
            dataset_mean=dataset_mean,
        )
        deletion = float(curves.deletion_auc.mean())
        insertion = float(curves.insertion_auc.mean())
        summary[name] = {
            "forward_passes_per_image": int(passes),
            "deletion_auc": round(deletion, 4),
            "insertion_auc": round(insertion, 4),
            "insertion_minus_deletion": round(insertion - deletion, 4),
            "seconds": round(seconds, 3),
        }
    return summary
