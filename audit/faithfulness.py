"""How far an attribution map can be trusted: deletion/insertion and sanity.

Deletion and insertion curves (Petsiuk et al. 2018) test whether the pixels a
map ranks highest are the ones the model needs:

* deletion - starting from the image, replace the top-ranked pixels by the
  baseline, a growing fraction at a time, and follow the target class's
  probability; a faithful map makes it fall fast (small area under the curve);
* insertion - starting from the baseline, put the top-ranked pixels back; a
  faithful map makes the probability rise fast (large area).

The randomised-weights check (Adebayo et al. 2018) compares the maps of the
trained model with those of the same architecture with fresh random weights;
maps that barely change (high rank correlation) show the method describes the
image, not the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

from .occlusion import (
    Baseline,
    OcclusionError,
    OcclusionSettings,
    check_images,
    explain,
    image_aligned_bounds,
    stream_batches,
)

logger = logging.getLogger(__name__)


@dataclass
class FaithfulnessCurves:
    """Deletion and insertion curves of ``N`` images over ``steps + 1`` points.

    Attributes
    ----------
    fractions:
        ``(steps + 1,)`` float, share of pixels removed (deletion) or put back
        (insertion) at each point, from 0 to 1.
    deletion, insertion:
        ``(N, steps + 1)`` float32, the target class's probability at each
        point.
    deletion_auc, insertion_auc:
        ``(N,)`` float32, trapezoid areas under the curves over ``fractions``,
        so in [0, 1]. Lower deletion and higher insertion mean a more faithful
        map.
    forward_passes:
        Model evaluations of this call: ``N * 2 * (steps + 1)``.
    """

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    deletion_auc: np.ndarray
    insertion_auc: np.ndarray
    forward_passes: int


def pixel_order(maps: np.ndarray) -> np.ndarray:
    """Rank of every pixel by attribution: ``(N, H * W)`` ints, 0 = highest.

    Ties keep row-major pixel order, so the ranking is deterministic.
    """
    flat = np.asarray(maps, dtype=np.float32).reshape(len(maps), -1)
    order = np.argsort(-flat, axis=1, kind="stable")
    kind = np.int16 if flat.shape[1] <= np.iinfo(np.int16).max else np.int64
    ranks = np.empty(order.shape, dtype=kind)
    positions = np.arange(flat.shape[1], dtype=kind)[None, :]
    np.put_along_axis(ranks, order, positions, axis=1)
    return ranks


class _CurveImages:
    """Rows of the stream: image ``n``, curve (deletion, insertion), point ``s``.

    Image ``n``'s rows are ``n * 2 * S + s`` for deletion point ``s`` and
    ``n * 2 * S + S + s`` for insertion point ``s`` (``S = steps + 1``).
    """

    def __init__(self, images, ranks, counts, baseline: Baseline):
        self.images = images
        self.ranks = ranks
        self.counts = counts.astype(ranks.dtype)
        self.per_image = 2 * len(counts)
        self.baseline = baseline

    def __call__(self, start: int, end: int) -> np.ndarray:
        per = self.per_image
        first, last = start // per, (end - 1) // per + 1
        originals = self.images[first:last]
        base = np.broadcast_to(self.baseline.of(originals), originals.shape)
        chosen = self.ranks[first:last, None, :] < self.counts[None, :, None]
        replace = np.concatenate([chosen, ~chosen], axis=1)
        replace = replace.reshape(last - first, per, *originals.shape[1:3], 1)
        out = np.where(replace, base[:, None], originals[:, None])
        out = out.reshape(-1, *originals.shape[1:])
        return out[start - first * per : end - first * per]


def deletion_insertion(
    backend,
    images,
    maps,
    targets,
    settings: OcclusionSettings,
    *,
    steps: int = 10,
    dataset_mean=None,
) -> FaithfulnessCurves:
    """Deletion and insertion curves of ``maps`` for ``images`` under ``backend``.

    Parameters
    ----------
    backend:
        The model backend the maps were made with.
    images:
        ``(N, H, W, C)`` inside the backend's value range.
    maps:
        ``(N, H, W)`` attributions; higher means more important. Pixels are
        removed or added with all their channels at once.
    targets:
        ``(N,)`` class whose probability the curves follow.
    settings:
        Gives the baseline (kind, value, blur sigma) and ``max_batch``; the
        same baseline as the maps keeps the test consistent with them.
    steps:
        Points per curve after the first; step ``s`` changes
        ``round(s / steps * H * W)`` pixels.
    dataset_mean:
        Baseline image for baseline ``dataset_mean``.

    Known limits: the baseline pixels form shapes the model never saw in
    training, so the curves also measure the model's reaction to them; a map
    that is constant ranks pixels in row-major order.
    """
    if int(steps) < 1:
        raise OcclusionError(f"steps {steps} must be at least 1")
    steps = int(steps)
    images = check_images(images, backend)
    n, height, width, _ = images.shape
    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape != (n, height, width):
        raise OcclusionError(
            f"maps must be (N, H, W) = {(n, height, width)}; got {maps.shape} "
            "(for target 'all', pass the maps of one class)"
        )
    targets = np.asarray(targets, dtype=np.int64)
    if targets.shape != (n,):
        raise OcclusionError(f"targets must have shape ({n},); got {targets.shape}")
    n_classes = len(backend.class_names)
    if n and (targets.min() < 0 or targets.max() >= n_classes):
        raise OcclusionError(f"targets must be class indices 0..{n_classes - 1}")

    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = np.rint(fractions * height * width).astype(np.int64)
    baseline = Baseline(settings, backend.value_range, images.shape[1:], dataset_mean)
    build = _CurveImages(images, pixel_order(maps), counts, baseline)
    per_image = build.per_image
    probabilities = np.empty((n, per_image), dtype=np.float32)
    flat = probabilities.reshape(-1)
    row_target = np.repeat(targets, per_image)

    def consume(start, end, values):
        flat[start:end] = values[np.arange(end - start), row_target[start:end]]

    stream_batches(
        backend,
        n * per_image,
        build,
        consume,
        max_batch=settings.max_batch,
        bounds=image_aligned_bounds(n, per_image, settings.max_batch),
    )
    deletion = probabilities[:, : steps + 1]
    insertion = probabilities[:, steps + 1 :]
    return FaithfulnessCurves(
        fractions=fractions,
        deletion=deletion,
        insertion=insertion,
        deletion_auc=np.trapezoid(deletion, fractions, axis=1).astype(np.float32),
        insertion_auc=np.trapezoid(insertion, fractions, axis=1).astype(np.float32),
        forward_passes=n * per_image,
    )


# ------------------------------------------------------------------ sanity


@dataclass
class SanityResult:
    """The randomised-weights check of ``N`` images.

    Attributes
    ----------
    rank_correlation:
        ``(N,)`` float, Spearman correlation between the trained model's map
        and the randomised model's map of each image, in [-1, 1]; NaN where
        either map is constant (no ranking to compare).
    mean_correlation:
        Mean of the finite correlations (NaN if there are none).
    trained, randomised:
        ``(N, H, W)`` float32 maps of the two models, for the same targets
        (the trained model's).
    forward_passes:
        Model evaluations of both explanations together.
    """

    rank_correlation: np.ndarray
    mean_correlation: float
    trained: np.ndarray
    randomised: np.ndarray
    forward_passes: int


def rank_correlation(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per-image Spearman correlation of two ``(N, ...)`` map stacks; NaN if
    either map of an image is constant."""
    a = np.asarray(first, dtype=np.float64).reshape(len(first), -1)
    b = np.asarray(second, dtype=np.float64).reshape(len(second), -1)
    out = np.full(len(a), np.nan)
    for i in range(len(a)):
        if np.ptp(a[i]) > 0 and np.ptp(b[i]) > 0:
            out[i] = stats.spearmanr(a[i], b[i]).statistic
    return out


def randomised_weights_check(
    model,
    images,
    settings: OcclusionSettings,
    *,
    labels=None,
    seed: int = 0,
    dataset_mean=None,
    **backend_options,
) -> SanityResult:
    """Compare occlusion maps of ``model`` and of a freshly initialised copy.

    ``model`` is a ``keras.Model`` or a Keras backend (which has ``.model``).
    The copy comes from ``keras.models.clone_model`` (same architecture, new
    weights from the layers' initialisers, seeded by ``seed``). Both models
    explain the trained model's target class (for target ``all``, its
    predicted class; ``labels`` serve target ``label``), so the maps are
    comparable.
    ``backend_options`` (``input_shape``, ``value_range``, ...) describe the
    model when it is given bare. A low correlation is the expected outcome.
    """
    import keras

    from .backends import KerasBackend

    if isinstance(model, KerasBackend):
        backend_options = {
            "input_shape": model.input_shape,
            "class_names": model.class_names,
            "value_range": model.value_range,
            **backend_options,
        }
        model = model.model
    trained = KerasBackend(model, **backend_options)
    keras.utils.set_random_seed(seed)
    randomised = KerasBackend(keras.models.clone_model(model), **backend_options)

    if settings.target == "all":
        settings = replace(settings, target="predicted")
    first = explain(trained, images, labels, settings, dataset_mean=dataset_mean)
    second = explain(
        randomised,
        images,
        first.targets,
        replace(settings, target="label"),
        dataset_mean=dataset_mean,
    )
    correlation = rank_correlation(first.maps, second.maps)
    finite = correlation[np.isfinite(correlation)]
    mean = float(finite.mean()) if finite.size else float("nan")
    logger.info(
        "randomised-weights check on %d images: mean rank correlation %.3f",
        len(correlation),
        mean,
    )
    return SanityResult(
        rank_correlation=correlation,
        mean_correlation=mean,
        trained=first.maps,
        randomised=second.maps,
        forward_passes=first.forward_passes + second.forward_passes,
    )
