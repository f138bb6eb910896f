"""Streaming statistics of an audit that merge exactly.

The occlusion engine produces, chunk by chunk, probabilities, attribution maps
and window scores for the images of the chunk. :class:`AuditAccumulator` folds
each chunk into

* sums per slice (and over all images): image counts, the sum of the
  L1-normalised attribution maps at full resolution, the same per predicted
  class, and calibration bin counts (15 equal-width confidence bins);
* a few scalars per image (label, prediction, confidence, fragility,
  concentration and region shares of the attribution, deletion and insertion
  areas) and the image's L1-normalised window-score vector, which the
  analysis needs for bootstrap intervals and permutation tests.

Per-image pixel maps are never kept: memory grows with the number of images
by ``8 * (11 + R) + 4 * K`` bytes (``R`` regions, ``K`` windows), not with
their pixels. Counts merge exactly; float sums are float64 and equal up to
rounding whatever the order of the chunks; per-image rows are sorted by row
number, so the merge order does not change them. :meth:`state` and
:meth:`from_state` round-trip through ``numpy.savez`` without pickle.

Slice rows are stored with one extra row at the end for all images together,
so ``map_sum[-1]`` is the overall sum.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

STATE_VERSION = 1
CALIBRATION_BINS = 15
TOP_SHARE = 0.1

SHAPE_MISMATCH = "{what} has shape {got}; expected {expected}"
INCOMPATIBLE = "cannot merge accumulators with different {what}: {mine} vs {theirs}"
DUPLICATE_ROWS = (
    "row {row} was added to the accumulator more than once; each image may be "
    "added in one chunk only"
)
BAD_MASK = "region mask {name!r} has shape {got}; the images are {expected}"

_CONFIG_KEYS = ("n_slices", "n_classes", "calibration_bins")
_SUM_KEYS = (
    "count",
    "map_count",
    "map_sum",
    "class_count",
    "class_map_count",
    "class_map_sum",
    "calibration_count",
    "calibration_confidence",
    "calibration_correct",
)
_IMAGE_KEYS = (
    "rows",
    "labels",
    "pred",
    "correct",
    "confidence",
    "max_drop",
    "flipped",
    "concentration",
    "region_shares",
    "deletion_auc",
    "insertion_auc",
    "grid",
)


def default_regions(height: int, width: int) -> dict[str, np.ndarray]:
    """Named ``(H, W)`` boolean masks: border ring, centre and four quadrants.

    The border ring is ``round(min(H, W) / 7)`` pixels wide (4 on MNIST, the
    padding around its 20x20 digit box); the centre is the middle half of
    each side; quadrants split at ``H // 2`` and ``W // 2``.
    """
    ring = max(1, round(min(height, width) / 7))
    border = np.ones((height, width), dtype=bool)
    border[ring : height - ring, ring : width - ring] = False
    centre = np.zeros((height, width), dtype=bool)
    centre[height // 4 : height - height // 4, width // 4 : width - width // 4] = True
    top = np.arange(height)[:, None] < height // 2
    left = np.arange(width)[None, :] < width // 2
    return {
        "border": border,
        "centre": centre,
        "top_left": top & left,
        "top_right": top & ~left,
        "bottom_left": ~top & left,
        "bottom_right": ~top & ~left,
    }


def load_region_mask(path: str | Path, image_shape) -> np.ndarray:
    """A region mask from a ``.npy`` array or an image file (nonzero = inside).

    ``image_shape`` is ``(H, W)`` or ``(H, W, C)``; the mask must be ``(H, W)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"region mask file {path} does not exist")
    if path.suffix.lower() == ".npy":
        mask = np.load(path, allow_pickle=False)
    else:
        with Image.open(path) as img:
            mask = np.asarray(img.convert("L"))
    mask = np.asarray(mask) != 0
    expected = tuple(image_shape[:2])
    if mask.shape != expected:
        raise ValueError(
            BAD_MASK.format(name=path.name, got=mask.shape, expected=expected)
        )
    return mask


@dataclass(frozen=True)
class ImageTable:
    """Per-image scalars of every audited image, sorted by dataset row.

    All arrays have length ``N`` (images): ``rows`` (dataset row numbers),
    ``labels``, ``pred`` (predicted class), ``correct`` and ``flipped``
    (bool), ``confidence`` (top probability), ``max_drop`` (largest fall of
    the predicted class's probability from one occluded window),
    ``concentration`` (share of absolute attribution in the top 10% of
    pixels), ``region_shares`` ``(N, R)`` (share of absolute attribution in
    each region of ``region_names``), ``deletion_auc`` and ``insertion_auc``
    (NaN where not measured), ``grid`` ``(N, K)`` float32 window scores
    divided by their L1 norm. Images whose attribution is zero everywhere have
    NaN concentration and region shares and an all-zero ``grid``.
    """

    rows: np.ndarray
    labels: np.ndarray
    pred: np.ndarray
    correct: np.ndarray
    confidence: np.ndarray
    max_drop: np.ndarray
    flipped: np.ndarray
    concentration: np.ndarray
    region_shares: np.ndarray
    deletion_auc: np.ndarray
    insertion_auc: np.ndarray
    grid: np.ndarray
    region_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.rows)


class AuditAccumulator:
    """Per-slice sums and per-image scalars of an audit, built chunk by chunk.

    Parameters
    ----------
    n_slices:
        Number of slices ``S`` (columns of the membership matrix).
    n_classes:
        Number of classes ``C`` of the model.
    image_hw:
        ``(H, W)`` of the images.
    grid_shape:
        ``(rows, cols)`` of the occlusion window grid, ``K = rows * cols``.
    regions:
        Named ``(H, W)`` boolean masks added to :func:`default_regions`
        (for instance from :func:`load_region_mask`).
    calibration_bins:
        Equal-width confidence bins for calibration (ECE).
    """

    def __init__(
        self,
        n_slices: int,
        n_classes: int,
        image_hw: tuple[int, int],
        grid_shape: tuple[int, int],
        regions: dict[str, np.ndarray] | None = None,
        calibration_bins: int = CALIBRATION_BINS,
    ):
        height, width = (int(s) for s in tuple(image_hw)[:2])
        named = default_regions(height, width)
        for name, mask in (regions or {}).items():
            if name in named:
                raise ValueError(
                    f"region name {name!r} is built in; give the mask another name"
                )
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (height, width):
                raise ValueError(
                    BAD_MASK.format(name=name, got=mask.shape, expected=(height, width))
                )
            named[name] = mask

        self.n_slices = int(n_slices)
        self.n_classes = int(n_classes)
        self.image_shape = (height, width)
        self.grid_shape = tuple(int(g) for g in grid_shape)
        self.n_windows = int(np.prod(self.grid_shape))
        self.calibration_bins = int(calibration_bins)
        self.region_names = tuple(named)
        self.region_masks = np.stack([named[r] for r in self.region_names])

        rows = self.n_slices + 1
        pixels = (height, width)
        self.count = np.zeros(rows, np.int64)
        self.map_count = np.zeros(rows, np.int64)
        self.map_sum = np.zeros((rows, *pixels), np.float64)
        self.class_count = np.zeros((rows, self.n_classes), np.int64)
        self.class_map_count = np.zeros((rows, self.n_classes), np.int64)
        self.class_map_sum = np.zeros((rows, self.n_classes, *pixels), np.float64)
        self.calibration_count = np.zeros((rows, self.calibration_bins), np.int64)
        self.calibration_confidence = np.zeros(
            (rows, self.calibration_bins), np.float64
        )
        self.calibration_correct = np.zeros((rows, self.calibration_bins), np.int64)
        self._chunks: list[dict[str, np.ndarray]] = []

    # ------------------------------------------------------------------ adding

    def add(self, rows, labels, membership, result, faithfulness=None) -> None:
        """Fold one chunk of explained images in.

        Parameters
        ----------
        rows:
            ``(n,)`` dataset row numbers of the chunk's images.
        labels:
            ``(n,)`` true class indices.
        membership:
            ``(n, S)`` boolean slice membership of those rows.
        result:
            An occlusion result (``audit.occlusion.OcclusionResult`` or any
            object with ``probs`` ``(n, C)``, ``window_scores`` ``(n, K)``,
            ``maps`` ``(n, H, W)``, ``max_drop`` ``(n,)``, ``flipped`` ``(n,)``).
        faithfulness:
            Optional object or mapping with ``deletion_auc`` and
            ``insertion_auc`` arrays ``(n,)``; NaN marks images not measured.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = len(rows)
        height, width = self.image_shape
        labels = self._checked(labels, (n,), "labels").astype(np.int64)
        membership = self._checked(membership, (n, self.n_slices), "membership")
        probs = self._checked(result.probs, (n, self.n_classes), "probs")
        maps = self._checked(result.maps, (n, height, width), "maps")
        scores = self._checked(
            result.window_scores, (n, self.n_windows), "window_scores"
        )
        max_drop = self._checked(result.max_drop, (n,), "max_drop")
        flipped = self._checked(result.flipped, (n,), "flipped").astype(bool)
        if n == 0:
            return

        members = np.concatenate([membership.astype(bool), np.ones((n, 1), bool)], 1)
        weights = members.astype(np.float64)
        counts = members.astype(np.int64)
        pred = probs.argmax(axis=1)
        confidence = probs.max(axis=1).astype(np.float64)
        correct = pred == labels

        flat = maps.reshape(n, -1).astype(np.float64)
        magnitude = np.abs(flat)
        l1 = magnitude.sum(axis=1)
        valid = l1 > 0
        normalised = np.divide(
            flat, l1[:, None], out=np.zeros_like(flat), where=valid[:, None]
        )
        self.count += counts.sum(axis=0)
        self.map_count += counts[valid].sum(axis=0)
        self.map_sum += (weights.T @ normalised).reshape(self.map_sum.shape)
        for c in np.unique(pred):
            chosen = pred == c
            self.class_count[:, c] += counts[chosen].sum(axis=0)
            self.class_map_count[:, c] += counts[chosen & valid].sum(axis=0)
            self.class_map_sum[:, c] += (
                weights[chosen].T @ normalised[chosen]
            ).reshape(-1, height, width)

        bins = np.minimum(
            (confidence * self.calibration_bins).astype(np.int64),
            self.calibration_bins - 1,
        )
        onehot = bins[:, None] == np.arange(self.calibration_bins)[None, :]
        self.calibration_count += counts.T @ onehot.astype(np.int64)
        self.calibration_confidence += weights.T @ (onehot * confidence[:, None])
        self.calibration_correct += counts.T @ (onehot & correct[:, None]).astype(
            np.int64
        )

        top = math.ceil(TOP_SHARE * magnitude.shape[1])
        top_sum = np.partition(magnitude, magnitude.shape[1] - top, axis=1)[:, -top:]
        inside = magnitude @ self.region_masks.reshape(len(self.region_names), -1).T
        with np.errstate(divide="ignore", invalid="ignore"):
            concentration = np.where(valid, top_sum.sum(axis=1) / l1, np.nan)
            region_shares = np.where(valid[:, None], inside / l1[:, None], np.nan)

        window = scores.astype(np.float64)
        window_l1 = np.abs(window).sum(axis=1, keepdims=True)
        grid = np.divide(
            window, window_l1, out=np.zeros_like(window), where=window_l1 > 0
        ).astype(np.float32)

        deletion, insertion = self._faithfulness(faithfulness, n)
        self._chunks.append(
            {
                "rows": rows,
                "labels": labels,
                "pred": pred.astype(np.int64),
                "correct": correct,
                "confidence": confidence,
                "max_drop": max_drop.astype(np.float64),
                "flipped": flipped,
                "concentration": concentration,
                "region_shares": region_shares,
                "deletion_auc": deletion,
                "insertion_auc": insertion,
                "grid": grid,
            }
        )

    def merge(self, other: AuditAccumulator) -> AuditAccumulator:
        """Add ``other``'s images to this accumulator (in place); returns self."""
        for what in ("n_slices", "image_shape", "n_classes", "grid_shape"):
            mine, theirs = getattr(self, what), getattr(other, what)
            if mine != theirs:
                raise ValueError(
                    INCOMPATIBLE.format(what=what, mine=mine, theirs=theirs)
                )
        if self.calibration_bins != other.calibration_bins:
            raise ValueError(
                INCOMPATIBLE.format(
                    what="calibration_bins",
                    mine=self.calibration_bins,
                    theirs=other.calibration_bins,
                )
            )
        if self.region_names != other.region_names or not np.array_equal(
            self.region_masks, other.region_masks
        ):
            raise ValueError(
                INCOMPATIBLE.format(
                    what="regions", mine=self.region_names, theirs=other.region_names
                )
            )
        for key in _SUM_KEYS:
            getattr(self, key).__iadd__(getattr(other, key))
        self._chunks.extend(other._chunks)
        return self

    # ---------------------------------------------------------------- reading

    @property
    def n_images(self) -> int:
        return int(self.count[-1])

    def images(self) -> ImageTable:
        """The per-image scalars of every image added, sorted by row."""
        columns = self._consolidated()
        return ImageTable(**columns, region_names=self.region_names)

    def mean_maps(self) -> dict[str, np.ndarray]:
        """Mean L1-normalised attribution maps, the arrays the report draws.

        ``overall_map`` ``(H, W)``, ``slice_maps`` and ``rest_maps``
        ``(S, H, W)`` (the images outside each slice), ``slice_class_maps``
        ``(S, C, H, W)`` by predicted class. Images whose map is zero
        everywhere are left out of the means; a mean over no image is NaN.
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            overall = self.map_sum[-1] / self.map_count[-1]
            slices = self.map_sum[:-1] / self.map_count[:-1, None, None]
            rest_count = self.map_count[-1] - self.map_count[:-1]
            rest = (self.map_sum[-1] - self.map_sum[:-1]) / rest_count[:, None, None]
            classes = self.class_map_sum[:-1] / self.class_map_count[:-1, :, None, None]
        return {
            "overall_map": overall,
            "slice_maps": slices,
            "rest_maps": rest,
            "slice_class_maps": classes,
        }

    def nbytes(self) -> int:
        """Bytes held by the accumulator's arrays."""
        total = sum(getattr(self, k).nbytes for k in _SUM_KEYS)
        total += self.region_masks.nbytes
        return total + sum(a.nbytes for chunk in self._chunks for a in chunk.values())

    # ------------------------------------------------------------- checkpoints

    def state(self) -> dict[str, np.ndarray]:
        """Everything as named numpy arrays, for ``numpy.savez`` (no pickle)."""
        out = {
            "version": np.array(STATE_VERSION),
            "image_shape": np.array(self.image_shape, dtype=np.int64),
            "grid_shape": np.array(self.grid_shape, dtype=np.int64),
            "region_names": np.array(self.region_names, dtype=np.str_),
            "region_masks": self.region_masks,
        }
        out |= {key: np.array(getattr(self, key)) for key in _CONFIG_KEYS}
        out |= {key: getattr(self, key).copy() for key in _SUM_KEYS}
        out |= {f"image_{k}": v.copy() for k, v in self._consolidated().items()}
        return out

    @classmethod
    def from_state(cls, state) -> AuditAccumulator:
        """Rebuild an accumulator from :meth:`state` or its ``numpy.load`` file."""
        version = int(np.asarray(state["version"]))
        if version != STATE_VERSION:
            raise ValueError(
                f"accumulator state version {version} is not {STATE_VERSION}; "
                "the checkpoint was written by another version of the audit"
            )
        names = [str(n) for n in np.asarray(state["region_names"])]
        masks = np.asarray(state["region_masks"], dtype=bool)
        height, width = (int(s) for s in np.asarray(state["image_shape"]))
        builtin = default_regions(height, width)
        acc = cls(
            int(state["n_slices"]),
            int(state["n_classes"]),
            (height, width),
            tuple(int(g) for g in np.asarray(state["grid_shape"])),
            regions={
                n: m for n, m in zip(names, masks, strict=True) if n not in builtin
            },
            calibration_bins=int(state["calibration_bins"]),
        )
        if acc.region_names != tuple(names) or not np.array_equal(
            acc.region_masks, masks
        ):
            raise ValueError("accumulator state holds region masks that do not fit")
        for key in _SUM_KEYS:
            stored = np.asarray(state[key])
            expected = getattr(acc, key)
            if stored.shape != expected.shape:
                raise ValueError(
                    SHAPE_MISMATCH.format(
                        what=key, got=stored.shape, expected=expected.shape
                    )
                )
            setattr(acc, key, stored.astype(expected.dtype, copy=True))
        chunk = {k: np.array(state[f"image_{k}"]) for k in _IMAGE_KEYS}
        if len(chunk["rows"]):
            acc._chunks = [chunk]
        return acc

    # --------------------------------------------------------------- internals

    def _consolidated(self) -> dict[str, np.ndarray]:
        if not self._chunks:
            return self._empty_columns()
        if len(self._chunks) == 1:
            merged = self._chunks[0]
        else:
            merged = {
                k: np.concatenate([c[k] for c in self._chunks]) for k in _IMAGE_KEYS
            }
        if np.any(np.diff(merged["rows"]) <= 0):
            order = np.argsort(merged["rows"], kind="stable")
            merged = {k: v[order] for k, v in merged.items()}
            repeated = np.flatnonzero(np.diff(merged["rows"]) == 0)
            if len(repeated):
                row = int(merged["rows"][repeated[0]])
                raise ValueError(DUPLICATE_ROWS.format(row=row))
        self._chunks = [merged]
        return merged

    def _empty_columns(self) -> dict[str, np.ndarray]:
        empty = {key: np.zeros(0, np.float64) for key in _IMAGE_KEYS}
        for key in ("rows", "labels", "pred"):
            empty[key] = np.zeros(0, np.int64)
        for key in ("correct", "flipped"):
            empty[key] = np.zeros(0, bool)
        empty["region_shares"] = np.zeros((0, len(self.region_names)), np.float64)
        empty["grid"] = np.zeros((0, self.n_windows), np.float32)
        return empty

    @staticmethod
    def _checked(values, shape, what) -> np.ndarray:
        array = np.asarray(values)
        if array.shape != shape:
            raise ValueError(
                SHAPE_MISMATCH.format(what=what, got=array.shape, expected=shape)
            )
        return array

    def _faithfulness(self, faithfulness, n) -> tuple[np.ndarray, np.ndarray]:
        """Deletion and insertion areas ``(n,)``, NaN where not measured.

        ``faithfulness`` is None, an object or mapping with ``deletion_auc``
        and ``insertion_auc`` for all ``n`` images, or a pair ``(positions,
        curves)`` where the curves cover only the chunk positions given.
        """
        deletion, insertion = np.full(n, np.nan), np.full(n, np.nan)
        if faithfulness is None:
            return deletion, insertion
        positions = np.arange(n)
        if isinstance(faithfulness, tuple):
            positions, faithfulness = faithfulness
            positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        for key, out in (("deletion_auc", deletion), ("insertion_auc", insertion)):
            if isinstance(faithfulness, dict):
                values = faithfulness.get(key)
            else:
                values = getattr(faithfulness, key, None)
            if values is not None:
                out[positions] = self._checked(values, positions.shape, key)
        return deletion, insertion
