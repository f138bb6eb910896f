"""Sliding-window occlusion: the attribution engine of the audit.

A window slides over each image; every position is replaced by a baseline and
the change of the model's target output is that window's attribution::

    window_score[n, k] = f_t(image n) - f_t(image n with window k occluded)

so a positive score means the window held evidence *for* the target class. The
per-pixel map is the mean score of the windows covering a pixel.

All the occluded copies of many images stream through the model backend in
batches of at most ``max_batch`` images. A background thread builds the next
batch while the model runs the current one (NumPy copies release the GIL), so
the model is rarely left waiting; the working set is a few batches, whatever
the number of images. Results are kept per image only: ``(N, K + 1, classes)``
model outputs while a call runs, then the arrays of :class:`OcclusionResult`.

Example
-------
>>> import numpy as np
>>> from audit.backends import load_backend
>>> def linear(x):  # p(class 1) = mean pixel value
...     m = x.mean(axis=(1, 2, 3))
...     return np.stack([1 - m, m], axis=1)
>>> backend = load_backend(
...     linear, input_shape=(4, 4, 1), class_names=["0", "1"], value_range=(0, 1)
... )
>>> settings = OcclusionSettings(window=(2, 2), stride=(2, 2), target="label")
>>> result = explain(backend, np.ones((1, 4, 4, 1), np.float32), [1], settings)
>>> result.window_scores.round(4).tolist()
[[0.25, 0.25, 0.25, 0.25]]
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

BASELINES = ("constant", "image_mean", "blur", "dataset_mean")
TARGETS = ("predicted", "label", "all")
OUTPUTS = ("probability", "log_probability", "logit")
LOG_FLOOR = np.float32(np.finfo(np.float32).tiny)

UNKNOWN_CHOICE = "{name} {value!r} is unknown; choose one of {choices}"
NEEDS_LOGITS = (
    "output 'logit' needs a backend that exposes logits (a Keras model whose "
    "last layer is a softmax, or a callable loaded with outputs='logits'); "
    "this backend ({kind}) gives probabilities only: use 'probability' or "
    "'log_probability'"
)


class OcclusionError(ValueError):
    """Images, labels or settings that the engine cannot use as given."""


def size_pair(value, name: str) -> tuple[int, int]:
    """``(h, w)`` from an int or a pair of ints; refuses anything else."""
    items = (value, value) if np.ndim(value) == 0 else tuple(value)
    if len(items) != 2:
        raise OcclusionError(f"{name} must be one int or (height, width); got {value}")
    pair = []
    for item in items:
        if isinstance(item, bool) or int(item) != item:
            raise OcclusionError(f"{name} must hold integers; got {value!r}")
        pair.append(int(item))
    return pair[0], pair[1]


@dataclass(frozen=True)
class OcclusionSettings:
    """How the windows slide and what they measure.

    Parameters
    ----------
    window:
        Window ``(height, width)`` in pixels, or one int for a square window.
        Each side must be at least 1 and at most the image's.
    stride:
        Step between window positions ``(down, across)`` in pixels, at least 1.
    baseline:
        What replaces the occluded window, always inside the model's
        ``value_range``:

        * ``constant`` - ``baseline_value``, clipped into the range;
        * ``image_mean`` - the image's own mean, per channel;
        * ``blur`` - the image blurred by a Gaussian of ``blur_sigma`` pixels;
        * ``dataset_mean`` - an array passed to :func:`explain`
          (``(H, W, C)``, ``(C,)`` or a scalar), e.g. the mean training image.
    baseline_value:
        Value of the ``constant`` baseline, in the model's input units.
    blur_sigma:
        Standard deviation of the ``blur`` baseline in pixels (> 0).
    target:
        Whose output is measured: ``predicted`` (arg-max class of the
        unoccluded image), ``label`` (the true label given to
        :func:`explain`) or ``all`` (every class; scores and maps then gain a
        last axis of length ``n_classes``).
    output:
        The model output the scores are differences of: ``probability`` (in
        [0, 1], so scores lie in [-1, 1]), ``log_probability`` (natural log,
        probabilities floored at the smallest normal float32 before the log)
        or ``logit`` (pre-softmax scores; only for backends that expose them).
    max_batch:
        Most images in one call to the model (>= 1).
    """

    window: tuple[int, int]
    stride: tuple[int, int]
    baseline: str = "constant"
    baseline_value: float = 0.0
    blur_sigma: float = 2.0
    target: str = "predicted"
    output: str = "probability"
    max_batch: int = 1024

    def __post_init__(self):
        window = size_pair(self.window, "window")
        stride = size_pair(self.stride, "stride")
        if min(window) < 1:
            raise OcclusionError(f"window {window} must be at least 1 pixel each side")
        if min(stride) < 1:
            raise OcclusionError(f"stride {stride} must be at least 1 each way")
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "stride", stride)
        for name, choices in (
            ("baseline", BASELINES),
            ("target", TARGETS),
            ("output", OUTPUTS),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise OcclusionError(
                    UNKNOWN_CHOICE.format(name=name, value=value, choices=choices)
                )
        if not np.isfinite(self.baseline_value):
            raise OcclusionError(
                f"baseline_value {self.baseline_value} must be a finite number"
            )
        if not self.blur_sigma > 0:
            raise OcclusionError(f"blur_sigma {self.blur_sigma} must be > 0 pixels")
        if isinstance(self.max_batch, bool) or int(self.max_batch) < 1:
            raise OcclusionError(f"max_batch {self.max_batch} must be at least 1")
        object.__setattr__(self, "max_batch", int(self.max_batch))


def _starts(length: int, size: int, step: int) -> np.ndarray:
    """Window starts along one axis; the last window is moved flush to the edge."""
    starts = list(range(0, length - size + 1, step))
    if starts[-1] + size < length:
        starts.append(length - size)
    return np.asarray(starts, dtype=np.int64)


class WindowGrid:
    """The window positions over an ``(H, W)`` image.

    Windows start at 0 and every ``stride`` pixels after. Where the stride
    does not divide ``H - window`` (or ``W - window``), one more row (column)
    of windows is placed flush with the bottom (right) edge, so no window is
    cut off; that last row overlaps its neighbour by more than the others do,
    and its pixels count more windows in :attr:`coverage`. A stride larger
    than the window leaves strips of pixels that no window covers: their
    coverage is 0 and their map value 0.

    Attributes
    ----------
    positions:
        ``(K, 4)`` int64, each row ``y0, y1, x0, x1`` (half-open pixel bounds),
        row-major over the grid.
    shape:
        ``(rows, cols)`` of windows; ``K = rows * cols``.
    coverage:
        ``(H, W)`` int64, the number of windows covering each pixel (>= 1
        unless the stride exceeds the window).
    """

    def __init__(self, image_hw, window, stride):
        height, width = size_pair(image_hw, "image_hw")
        window = size_pair(window, "window")
        stride = size_pair(stride, "stride")
        if min(window) < 1:
            raise OcclusionError(f"window {window} must be at least 1 pixel each side")
        if min(stride) < 1:
            raise OcclusionError(f"stride {stride} must be at least 1 each way")
        if window[0] > height or window[1] > width:
            raise OcclusionError(
                f"window {window} is larger than the image ({height}, {width}); "
                "use a window no larger than the image"
            )
        self.image_hw = (height, width)
        self.window = window
        self.stride = stride
        ys = _starts(height, window[0], stride[0])
        xs = _starts(width, window[1], stride[1])
        y0 = np.repeat(ys, len(xs))
        x0 = np.tile(xs, len(ys))
        self.positions = np.stack([y0, y0 + window[0], x0, x0 + window[1]], axis=1)
        self.shape = (len(ys), len(xs))
        self.coverage = self.masks().sum(axis=0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def masks(self) -> np.ndarray:
        """``(K, H, W)`` bool, True inside window ``k``."""
        masks = np.zeros((len(self.positions), *self.image_hw), dtype=bool)
        for k, (y0, y1, x0, x1) in enumerate(self.positions):
            masks[k, y0:y1, x0:x1] = True
        return masks

    def to_pixels(self, window_scores: np.ndarray) -> np.ndarray:
        """Per-pixel mean of window scores over the windows covering each pixel.

        ``window_scores`` is ``(N, K)`` or ``(N, K, C)``; the result is
        ``(N, H, W)`` or ``(N, H, W, C)`` float32. Pixels that no window
        covers get 0.
        """
        scores = np.asarray(window_scores, dtype=np.float32)
        flat_masks = self.masks().reshape(len(self), -1).astype(np.float32)
        per_pixel = np.tensordot(scores, flat_masks, axes=([1], [0]))
        if scores.ndim == 3:
            per_pixel = np.moveaxis(per_pixel, 1, 2)
        per_pixel = per_pixel.reshape(len(scores), *self.image_hw, *scores.shape[2:])
        cover = np.maximum(self.coverage, 1).astype(np.float32)
        if scores.ndim == 3:
            cover = cover[..., None]
        return per_pixel / cover


@dataclass
class OcclusionResult:
    """What :func:`explain` measured for ``N`` images, ``K`` windows, ``C`` classes.

    Attributes
    ----------
    probs:
        ``(N, C)`` float32, class probabilities of the unoccluded images.
    targets:
        ``(N,)`` int64, the class each image's scores are about (for target
        ``all``, the predicted class, so downstream code has one target).
    window_scores:
        ``(N, K)`` float32 (``(N, K, C)`` for target ``all``):
        output(original) - output(window k occluded) in the settings' output
        space. Positive: the window supported the target.
    maps:
        ``(N, H, W)`` float32 (``(N, H, W, C)`` for target ``all``), for each
        pixel the mean of the scores of the windows covering it.
    max_drop:
        ``(N,)`` float32, the largest fall of the predicted class's probability
        caused by one window, ``p(original) - min_k p(window k occluded)``;
        negative when every window raises that probability.
    flipped:
        ``(N,)`` bool, some single window changes the arg-max class.
    forward_passes:
        Model evaluations this call made in total, ``N * (K + 1)``.
    passes_per_image:
        ``K + 1``: one unoccluded pass and one per window.
    grid:
        The :class:`WindowGrid` the windows came from.
    """

    probs: np.ndarray
    targets: np.ndarray
    window_scores: np.ndarray
    maps: np.ndarray
    max_drop: np.ndarray
    flipped: np.ndarray
    forward_passes: int
    passes_per_image: int = 0
    grid: WindowGrid | None = field(default=None, repr=False)


# ------------------------------------------------------------------ inputs


def check_images(images, backend) -> np.ndarray:
    """``images`` as float32 ``(N, H, W, C)`` matching the backend, or an error.

    The shape must equal ``(N, *backend.input_shape)`` and every value must be
    finite and inside ``backend.value_range``.
    """
    array = np.asarray(images)
    if array.ndim != 4:
        raise OcclusionError(
            f"images must be a batch (N, H, W, C); got an array of shape "
            f"{array.shape} (ndim {array.ndim}); add a batch axis for one image"
        )
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise OcclusionError(f"images must be real numbers; got dtype {array.dtype}")
    expected = tuple(int(s) for s in backend.input_shape)
    if array.shape[3] != expected[2]:
        raise OcclusionError(
            f"images have {array.shape[3]} channel(s) but the model takes "
            f"{expected[2]} (input_shape {expected})"
        )
    if array.shape[1:] != expected:
        raise OcclusionError(
            f"images are {array.shape[1:]} (H, W, C) but the model takes {expected}"
        )
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.size == 0:
        return array
    if not np.isfinite(array).all():
        where = np.argwhere(~np.isfinite(array))[0]
        raise OcclusionError(
            f"image {where[0]} has a non-finite value {array[tuple(where)]} at "
            f"pixel {tuple(int(i) for i in where[1:])}"
        )
    low, high = backend.value_range
    lowest, highest = float(array.min()), float(array.max())
    if lowest < low or highest > high:
        raise OcclusionError(
            f"image values span [{lowest:g}, {highest:g}] but the model takes "
            f"[{low:g}, {high:g}] (value_range); rescale the images"
        )
    return array


def check_labels(labels, n: int, n_classes: int) -> np.ndarray:
    """``labels`` as int64 ``(n,)`` class indices below ``n_classes``, or an error."""
    if labels is None:
        raise OcclusionError("target 'label' needs labels: pass labels=(N,) ints")
    array = np.asarray(labels)
    if array.shape != (n,):
        raise OcclusionError(f"labels must have shape ({n},); got {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise OcclusionError(f"labels must be integers; got dtype {array.dtype}")
    bad = array[(array < 0) | (array >= n_classes)]
    if bad.size:
        raise OcclusionError(
            f"label {int(bad[0])} is not a class index of the model "
            f"(0..{n_classes - 1})"
        )
    return array.astype(np.int64)


class Baseline:
    """Builds the baseline images of a batch, always inside ``value_range``.

    ``of(images)`` maps ``(m, H, W, C)`` float32 images to their baselines,
    ``(m, H, W, C)`` or a shape broadcastable to it.
    """

    def __init__(self, settings, value_range, image_shape, dataset_mean=None):
        self.kind = settings.baseline
        self.sigma = float(settings.blur_sigma)
        self.low, self.high = (np.float32(v) for v in value_range)
        if self.kind == "constant":
            value = np.clip(np.float32(settings.baseline_value), self.low, self.high)
            if value != np.float32(settings.baseline_value):
                logger.debug(
                    "baseline_value %s clipped into value_range to %s",
                    settings.baseline_value,
                    value,
                )
            self.value = np.full((1, 1, 1, 1), value, dtype=np.float32)
        elif self.kind == "dataset_mean":
            self.value = self._dataset_mean(dataset_mean, image_shape)

    def _dataset_mean(self, mean, image_shape) -> np.ndarray:
        if mean is None:
            raise OcclusionError(
                "baseline 'dataset_mean' needs dataset_mean=: an (H, W, C) array "
                "(or (C,) or a scalar), e.g. the mean training image"
            )
        array = np.asarray(mean, dtype=np.float32)
        try:
            array = np.broadcast_to(array, image_shape)
        except ValueError:
            raise OcclusionError(
                f"dataset_mean has shape {array.shape}; it must broadcast to the "
                f"image shape {tuple(image_shape)}"
            ) from None
        if not np.isfinite(array).all():
            raise OcclusionError("dataset_mean has NaN or infinite values")
        if array.min() < self.low or array.max() > self.high:
            raise OcclusionError(
                f"dataset_mean spans [{array.min():g}, {array.max():g}], outside "
                f"the model's value_range [{self.low:g}, {self.high:g}]"
            )
        return np.ascontiguousarray(array)[None]

    def of(self, images: np.ndarray) -> np.ndarray:
        if self.kind in ("constant", "dataset_mean"):
            return self.value
        if self.kind == "image_mean":
            means = images.mean(axis=(1, 2), keepdims=True, dtype=np.float32)
        else:
            means = ndimage.gaussian_filter(
                images, sigma=(0, self.sigma, self.sigma, 0), mode="nearest"
            )
        return np.clip(means, self.low, self.high, out=means)


# --------------------------------------------------------------- streaming


@dataclass
class _Failure:
    error: BaseException


def stream_batches(
    backend,
    n_rows: int,
    build: Callable[[int, int], np.ndarray],
    consume: Callable[[int, int, np.ndarray], None],
    *,
    max_batch: int,
    logits: bool = False,
    bounds: list[tuple[int, int]] | None = None,
) -> None:
    """Push ``n_rows`` generated images through the model in bounded batches.

    ``build(start, stop)`` returns the images of rows ``start..stop-1``
    (float32 ``(stop - start, H, W, C)``) and runs on a background thread, one
    or two batches ahead of the model. ``consume(start, stop, outputs)``
    receives the model's ``(stop - start, n_classes)`` outputs (probabilities,
    or logits when ``logits``); calls are serialised but, for backends with
    ``max_in_flight > 1`` (HTTP), not necessarily in row order. ``bounds``
    overrides the default cut into consecutive ``max_batch`` rows.

    At most ``max_in_flight + 2`` batches exist at any time, so memory does not
    depend on ``n_rows``. The first error raised by ``build``, the model or
    ``consume`` is re-raised here after the worker threads stop.
    """
    if bounds is None:
        bounds = [(s, min(s + max_batch, n_rows)) for s in range(0, n_rows, max_batch)]
    if not bounds:
        return
    predict = backend.predict_logits if logits else backend.predict
    workers = max(1, int(getattr(backend, "max_in_flight", 1)))
    batches: queue.Queue = queue.Queue(maxsize=workers + 1)
    stop = threading.Event()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def fail(error: BaseException) -> None:
        with lock:
            errors.append(error)
        stop.set()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                batches.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for start, end in bounds:
                if not put((start, end, build(start, end))):
                    return
        except BaseException as error:  # noqa: BLE001 - re-raised by the caller
            fail(error)
            return
        for _ in range(workers):
            if not put(None):
                return

    def work() -> None:
        while not stop.is_set():
            try:
                item = batches.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is None:
                return
            start, end, batch = item
            try:
                outputs = predict(batch)
                with lock:
                    consume(start, end, outputs)
            except BaseException as error:  # noqa: BLE001 - re-raised by the caller
                fail(error)
                return

    producer = threading.Thread(target=produce, name="occlusion-batches", daemon=True)
    producer.start()
    try:
        if workers == 1:
            work()
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="occlusion") as pool:
                for future in [pool.submit(work) for _ in range(workers)]:
                    future.result()
    except BaseException as error:
        fail(error)
    finally:
        stop.set()
        producer.join()
    if errors:
        raise errors[0]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def _aligned_batch(per_image: int, max_batch: int) -> int:
    """Rows in a full batch: whole images when one fits, else ``max_batch``."""
    if per_image > max_batch:
        return max_batch
    return (max_batch // per_image) * per_image


def image_aligned_bounds(
    n_images: int, per_image: int, max_batch: int
) -> list[tuple[int, int]]:
    """Batches of whole images (``per_image`` rows each) of at most ``max_batch``.

    When one image has more rows than ``max_batch``, its rows are cut into
    ``max_batch`` pieces instead. Whole-image batches all have the same size
    (except the last), so the model sees few distinct batch shapes.
    """
    n_rows = n_images * per_image
    step = _aligned_batch(per_image, max_batch)
    return [(s, min(s + step, n_rows)) for s in range(0, n_rows, step)]


class OccludedCopies:
    """The occluded copies of ``images`` as rows of one long stream.

    Row ``n * (K + 1) + j`` is image ``n`` unoccluded for ``j == 0`` and with
    window ``j - 1`` replaced by the baseline otherwise. Calling it with
    ``(start, stop)`` returns those rows as float32 ``(stop - start, H, W, C)``;
    each window is copied with one strided assignment per batch, so building
    a batch costs about one copy of it.
    """

    def __init__(self, images, grid: WindowGrid, baseline: Baseline):
        self.images = images
        self.positions = grid.positions
        self.per_image = len(grid) + 1
        self.baseline = baseline

    def __call__(self, start: int, end: int) -> np.ndarray:
        per = self.per_image
        first, last = start // per, (end - 1) // per + 1
        originals = self.images[first:last]
        base = np.broadcast_to(self.baseline.of(originals), originals.shape)
        out = np.empty((end - start, *self.images.shape[1:]), dtype=np.float32)
        offset = first * per - start
        for j in range(per):
            row, skip = offset + j, 0
            if row < 0:
                row, skip = row + per, 1
            count = len(range(row, end - start, per))
            if count == 0:
                continue
            rows = slice(row, end - start, per)
            out[rows] = originals[skip : skip + count]
            if j:
                y0, y1, x0, x1 = self.positions[j - 1]
                out[rows, y0:y1, x0:x1] = base[skip : skip + count, y0:y1, x0:x1]
        return out


def _outputs_in_space(values: np.ndarray, output: str, logits: bool) -> np.ndarray:
    """Model outputs in the scoring space (``values`` are logits when ``logits``)."""
    if output == "logit":
        return values
    if output == "probability":
        return _softmax(values) if logits else values
    if logits:
        shifted = values - values.max(axis=-1, keepdims=True)
        log_sum = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        return (shifted - log_sum).astype(np.float32)
    return np.log(np.maximum(values, LOG_FLOOR))


def explain(
    backend,
    images,
    labels=None,
    settings: OcclusionSettings | None = None,
    *,
    dataset_mean=None,
) -> OcclusionResult:
    """Occlusion attribution of ``images`` under ``backend``.

    Parameters
    ----------
    backend:
        A :class:`audit.backends.ModelBackend`.
    images:
        ``(N, H, W, C)`` numbers inside ``backend.value_range`` with ``(H, W,
        C)`` equal to ``backend.input_shape``; converted to float32.
    labels:
        ``(N,)`` class indices; required for target ``label``, otherwise unused.
    settings:
        :class:`OcclusionSettings`; window 6 and stride 4 by default.
    dataset_mean:
        Baseline image for baseline ``dataset_mean``: ``(H, W, C)``, ``(C,)``
        or a scalar inside ``value_range``.

    Returns
    -------
    OcclusionResult
        One row per image; see its attributes for shapes and units.

    Notes
    -----
    The model sees ``N * (K + 1)`` images, in batches of at most
    ``settings.max_batch``, cut on whole images where ``K + 1 <= max_batch``.
    Known limits: a window reads the change caused by removing a whole patch,
    not by single pixels, so features smaller than the window are located only
    to the window's size; overlapping windows smooth the map; and what the
    model does with a baseline patch it never saw in training is part of the
    score (compare baselines when that matters).
    """
    settings = settings or OcclusionSettings(window=(6, 6), stride=(4, 4))
    images = check_images(images, backend)
    n, height, width, _ = images.shape
    n_classes = len(backend.class_names)
    grid = WindowGrid((height, width), settings.window, settings.stride)
    if settings.target == "label":
        labels = check_labels(labels, n, n_classes)
    logits = settings.output == "logit"
    if logits and not getattr(backend, "has_logits", False):
        raise OcclusionError(NEEDS_LOGITS.format(kind=type(backend).__name__))
    baseline = Baseline(settings, backend.value_range, images.shape[1:], dataset_mean)

    per_image = len(grid) + 1
    outputs = np.empty((n * per_image, n_classes), dtype=np.float32)

    def consume(start, end, values):
        outputs[start:end] = values

    started = time.perf_counter()
    stream_batches(
        backend,
        n * per_image,
        OccludedCopies(images, grid, baseline),
        consume,
        max_batch=settings.max_batch,
        logits=logits,
        bounds=image_aligned_bounds(n, per_image, settings.max_batch),
    )
    elapsed = time.perf_counter() - started
    logger.debug(
        "occlusion of %d images x %d passes in %.2f s (%.0f passes/s)",
        n,
        per_image,
        elapsed,
        n * per_image / max(elapsed, 1e-9),
    )
    return _score(outputs.reshape(n, per_image, n_classes), labels, settings, grid)


def _score(outputs, labels, settings, grid) -> OcclusionResult:
    """Window scores, maps and per-image scalars from ``(N, K + 1, C)`` outputs."""
    logits = settings.output == "logit"
    probs_all = _softmax(outputs) if logits else outputs
    probs = np.ascontiguousarray(probs_all[:, 0])
    n = len(outputs)
    predicted = probs.argmax(axis=1)
    rows = np.arange(n)

    space = _outputs_in_space(outputs, settings.output, logits)
    if settings.target == "all":
        targets = predicted
        scores = space[:, :1, :] - space[:, 1:, :]
    else:
        targets = labels if settings.target == "label" else predicted
        target_space = space[rows, :, targets]
        scores = target_space[:, :1] - target_space[:, 1:]
    scores = np.ascontiguousarray(scores, dtype=np.float32)

    predicted_prob = probs_all[rows, :, predicted]
    max_drop = predicted_prob[:, 0] - predicted_prob[:, 1:].min(axis=1, initial=np.inf)
    flipped = (probs_all[:, 1:].argmax(axis=2) != predicted[:, None]).any(axis=1)
    return OcclusionResult(
        probs=probs,
        targets=np.asarray(targets, dtype=np.int64),
        window_scores=scores,
        maps=grid.to_pixels(scores),
        max_drop=max_drop.astype(np.float32),
        flipped=flipped,
        forward_passes=n * (len(grid) + 1),
        passes_per_image=len(grid) + 1,
        grid=grid,
    )


def warm_up(backend, settings: OcclusionSettings | None = None, rounds: int = 2):
    """Run the batch shapes :func:`explain` will use once, so timings are steady.

    Keras traces a new graph for the first few batch shapes it sees (tens of
    milliseconds each); this sends the full batch size and two smaller ones
    ``rounds`` times. Returns the seconds spent.
    """
    settings = settings or OcclusionSettings(window=(6, 6), stride=(4, 4))
    started = time.perf_counter()
    height, width, channels = (int(s) for s in backend.input_shape)
    grid = WindowGrid((height, width), settings.window, settings.stride)
    per_image = len(grid) + 1
    full = _aligned_batch(per_image, settings.max_batch)
    sizes = {full, full // 2 + 1, 1}
    low = float(backend.value_range[0])
    for _ in range(rounds):
        for size in sorted(sizes, reverse=True):
            batch = np.full((size, height, width, channels), low, dtype=np.float32)
            backend.predict(batch)
    return time.perf_counter() - started
