"""The occlusion engine: window grid, hand-computed cases, baselines, targets,
streaming, validation, and agreement with a one-window-at-a-time reference."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage
from tiny_models import mean_backend, mean_model

from audit.backends import ModelOutputError, load_backend
from audit.occlusion import (
    LOG_FLOOR,
    OcclusionError,
    OcclusionSettings,
    WindowGrid,
    explain,
    stream_batches,
    warm_up,
)

BATCH_SIZES = (1, 2, 7, 4096)
PROPERTY = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ------------------------------------------------------------ the reference


def reference_starts(length: int, size: int, step: int) -> list[int]:
    """Every multiple of ``step`` that fits, plus the window flush with the end."""
    return sorted(
        {s for s in range(0, length - size + 1) if s % step == 0} | {length - size}
    )


def reference_baseline(image, settings, value_range, dataset_mean=None):
    low, high = value_range
    if settings.baseline == "constant":
        return np.full(image.shape, min(max(settings.baseline_value, low), high))
    if settings.baseline == "image_mean":
        return np.broadcast_to(image.mean(axis=(0, 1)), image.shape)
    if settings.baseline == "blur":
        channels = [
            ndimage.gaussian_filter(image[..., c], settings.blur_sigma, mode="nearest")
            for c in range(image.shape[-1])
        ]
        return np.clip(np.stack(channels, axis=-1), low, high)
    return np.broadcast_to(dataset_mean, image.shape)


def reference_space(values, output):
    if output == "log_probability":
        return np.log(np.maximum(values, LOG_FLOOR))
    return values


def naive_explain(backend, images, labels, settings, dataset_mean=None):
    """Occlusion one image and one window at a time, straight from the definition."""
    images = np.asarray(images, np.float32)
    n, height, width, _ = images.shape
    logits = settings.output == "logit"
    call = backend.predict_logits if logits else backend.predict
    ys = reference_starts(height, settings.window[0], settings.stride[0])
    xs = reference_starts(width, settings.window[1], settings.stride[1])
    boxes = [
        (y, y + settings.window[0], x, x + settings.window[1]) for y in ys for x in xs
    ]
    scores, maps, drops, flips, targets = [], [], [], [], []
    for i in range(n):
        image = images[i]
        base = reference_baseline(image, settings, backend.value_range, dataset_mean)
        original = call(image[None])[0]
        probs = backend.predict(image[None])[0] if logits else original
        predicted = int(np.argmax(probs))
        target = int(labels[i]) if settings.target == "label" else predicted
        occluded_out, occluded_probs = [], []
        for y0, y1, x0, x1 in boxes:
            copy = image.copy()
            copy[y0:y1, x0:x1] = base[y0:y1, x0:x1]
            occluded_out.append(call(copy[None])[0])
            occluded_probs.append(
                backend.predict(copy[None])[0] if logits else occluded_out[-1]
            )
        orig_space = reference_space(original, settings.output)
        occ_space = reference_space(np.array(occluded_out), settings.output)
        if settings.target == "all":
            row = orig_space[None, :] - occ_space
        else:
            row = orig_space[target] - occ_space[:, target]
        pixel_map = np.zeros((height, width, *row.shape[1:]))
        for y in range(height):
            for x in range(width):
                covering = [
                    k
                    for k, (y0, y1, x0, x1) in enumerate(boxes)
                    if y0 <= y < y1 and x0 <= x < x1
                ]
                if covering:  # a stride wider than the window leaves gaps
                    pixel_map[y, x] = np.mean(row[covering], axis=0)
        occluded_probs = np.array(occluded_probs)
        scores.append(row)
        maps.append(pixel_map)
        drops.append(probs[predicted] - occluded_probs[:, predicted].min())
        flips.append(bool((occluded_probs.argmax(axis=1) != predicted).any()))
        targets.append(target if settings.target != "all" else predicted)
    return {
        "window_scores": np.array(scores),
        "maps": np.array(maps),
        "max_drop": np.array(drops),
        "flipped": np.array(flips),
        "targets": np.array(targets),
        "n_windows": len(boxes),
    }


def assert_matches_reference(result, expected, n_images):
    # Scores are differences of float32 outputs (log-probabilities and logits
    # reach tens), so the rounding allowed grows with their size.
    scale = 1.0 + float(np.abs(expected["window_scores"]).max(initial=0.0))
    np.testing.assert_array_equal(result.targets, expected["targets"])
    np.testing.assert_allclose(
        result.window_scores, expected["window_scores"], rtol=1e-4, atol=2e-6 * scale
    )
    np.testing.assert_allclose(
        result.maps, expected["maps"], rtol=1e-4, atol=2e-6 * scale
    )
    np.testing.assert_allclose(result.max_drop, expected["max_drop"], atol=2e-6)
    np.testing.assert_array_equal(result.flipped, expected["flipped"])
    assert result.forward_passes == n_images * (expected["n_windows"] + 1)
    assert result.window_scores.dtype == np.float32
    assert result.maps.dtype == np.float32


# ----------------------------------------------------------- tiny models


def sum_logits(x):
    """Two classes with logits (0, sum of pixels): p(class 1) = sigmoid(sum)."""
    s = x.sum(axis=(1, 2, 3), dtype=np.float64)
    return np.stack([np.zeros_like(s), s], axis=1)


def linear_model(shape, n_classes, seed, logits=False):
    """Logits are fixed random weights times the pixels; returns probabilities
    (their softmax) or, with ``logits``, the logits."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 3.0, (int(np.prod(shape)), n_classes)).astype(np.float32)

    def model(x):
        z = x.reshape(len(x), -1) @ weights
        if logits:
            return z
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    return model


def linear_softmax(shape, n_classes, seed, logits=False):
    """A callable backend of :func:`linear_model`."""
    return load_backend(
        linear_model(shape, n_classes, seed, logits),
        input_shape=shape,
        class_names=[f"c{i}" for i in range(n_classes)],
        value_range=(0, 1),
        outputs="logits" if logits else "probabilities",
    )


class Recorder:
    """A callable model that keeps every batch it was given."""

    def __init__(self, function):
        self.function = function
        self.batches = []
        self.lock = threading.Lock()

    def __call__(self, x):
        with self.lock:
            self.batches.append(x.copy())
        return self.function(x)


# --------------------------------------------------------------- the grid


def test_grid_divides_evenly():
    grid = WindowGrid((28, 28), (6, 6), (4, 4))
    assert grid.shape == (7, 7)
    assert len(grid) == 49
    assert grid.positions[:2].tolist() == [[0, 6, 0, 6], [0, 6, 4, 10]]
    assert grid.positions[-1].tolist() == [22, 28, 22, 28]


def test_grid_last_window_is_flush_with_the_edge():
    grid = WindowGrid((11, 5), (4, 2), (3, 2))
    rows = sorted({int(p[0]) for p in grid.positions})
    cols = sorted({int(p[2]) for p in grid.positions})
    assert rows == [0, 3, 6, 7]
    assert cols == [0, 2, 3]
    assert grid.shape == (4, 3)
    assert grid.positions[:, 1].max() == 11 and grid.positions[:, 3].max() == 5


def test_grid_coverage_by_hand():
    # 3x3 image, 2x2 windows at stride 2: starts 0 and (flush) 1 on each axis.
    grid = WindowGrid((3, 3), 2, 2)
    assert grid.coverage.tolist() == [[1, 2, 1], [2, 4, 2], [1, 2, 1]]


def test_stride_wider_than_the_window_leaves_uncovered_pixels_at_zero():
    grid = WindowGrid((1, 5), 1, 3)
    assert grid.coverage.tolist() == [[1, 0, 0, 1, 1]]
    maps = grid.to_pixels(np.array([[1.0, 2.0, 4.0]]))
    assert maps.tolist() == [[[1.0, 0.0, 0.0, 2.0, 4.0]]]


def test_window_as_large_as_the_image_is_one_window():
    grid = WindowGrid((5, 7), (5, 7), (1, 1))
    assert grid.shape == (1, 1)
    assert (grid.coverage == 1).all()


@pytest.mark.parametrize(
    ("window", "stride", "message"),
    [
        ((6, 4), (1, 1), r"window \(6, 4\) is larger than the image \(5, 5\)"),
        ((2, 2), (0, 1), r"stride \(0, 1\) must be at least 1"),
        ((0, 2), (1, 1), r"window \(0, 2\) must be at least 1"),
    ],
)
def test_grid_refuses_bad_sizes(window, stride, message):
    with pytest.raises(OcclusionError, match=message):
        WindowGrid((5, 5), window, stride)


# ------------------------------------------------------ hand-computed cases


HAND_IMAGE = np.array([[1.0, 0, 0], [0, 0, 0], [0, 0, 0.5]], np.float32)[
    None, ..., None
]


@pytest.mark.parametrize("max_batch", BATCH_SIZES)
def test_mean_model_by_hand(max_batch):
    # p(bright) = mean = 1.5 / 9. Windows 2x2 at (0,0), (0,1), (1,0), (1,1) hold
    # pixel sums 1, 0, 0, 0.5; a black window lowers the mean by sum / 9.
    settings = OcclusionSettings((2, 2), (2, 2), target="label", max_batch=max_batch)
    result = explain(mean_backend((3, 3, 1)), HAND_IMAGE, [1], settings)

    np.testing.assert_allclose(result.probs, [[5 / 6, 1 / 6]], rtol=1e-6)
    np.testing.assert_allclose(result.window_scores, [[1 / 9, 0, 0, 1 / 18]], atol=1e-7)
    expected_map = [
        [1 / 9, 1 / 18, 0],  # (0,1): windows (0,0),(0,1) -> (1/9 + 0) / 2
        [1 / 18, 1 / 24, 1 / 36],  # centre: all four -> (1/9 + 1/18) / 4
        [0, 1 / 36, 1 / 18],
    ]
    np.testing.assert_allclose(result.maps[0], expected_map, atol=1e-7)
    # The predicted class is "dark" (5/6); no window lowers it, none flips it.
    assert result.targets.tolist() == [1]
    assert result.max_drop.tolist() == pytest.approx([0.0], abs=1e-7)
    assert result.flipped.tolist() == [False]
    assert result.forward_passes == 5 and result.passes_per_image == 5


def test_predicted_target_gives_evidence_against_as_negative():
    settings = OcclusionSettings((2, 2), (2, 2))
    result = explain(mean_backend((3, 3, 1)), HAND_IMAGE, None, settings)
    assert result.targets.tolist() == [0]
    np.testing.assert_allclose(
        result.window_scores, [[-1 / 9, 0, 0, -1 / 18]], atol=1e-7
    )


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        # 2x2 image of 0.5s: sum 2; occluding one pixel leaves sum 1.5.
        ("probability", sigmoid(2) - sigmoid(1.5)),
        ("log_probability", math.log(sigmoid(2)) - math.log(sigmoid(1.5))),
        ("logit", 2 - 1.5),
    ],
)
@pytest.mark.parametrize("max_batch", BATCH_SIZES)
def test_output_spaces_by_hand(output, expected, max_batch):
    backend = load_backend(
        sum_logits,
        input_shape=(2, 2, 1),
        class_names=["a", "b"],
        value_range=(0, 1),
        outputs="logits",
    )
    image = np.full((1, 2, 2, 1), 0.5, np.float32)
    settings = OcclusionSettings(1, 1, output=output, max_batch=max_batch)
    result = explain(backend, image, None, settings)
    assert result.targets.tolist() == [1]
    np.testing.assert_allclose(result.window_scores, [[expected] * 4], rtol=1e-5)
    np.testing.assert_allclose(result.maps[0], np.full((2, 2), expected), rtol=1e-5)
    np.testing.assert_allclose(result.max_drop, [sigmoid(2) - sigmoid(1.5)], rtol=1e-5)


def test_flipped_and_max_drop_by_hand():
    # mean 0.55 -> "bright" (p 0.55); blacking the 0.9 pixel drops the mean to 0.325.
    image = np.array([[0.9, 0.5], [0.4, 0.4]], np.float32)[None, ..., None]
    settings = OcclusionSettings(1, 1)
    result = explain(mean_backend((2, 2, 1)), image, None, settings)
    assert result.targets.tolist() == [1]
    assert result.flipped.tolist() == [True]
    assert result.max_drop[0] == pytest.approx(0.9 / 4, abs=1e-6)


def test_constant_baseline_is_clipped_into_value_range():
    # baseline 5 is clipped to 1: a white 2x2 window raises the mean by 4/9.
    image = np.zeros((1, 3, 3, 1), np.float32)
    settings = OcclusionSettings(2, 2, baseline_value=5.0, target="label")
    result = explain(mean_backend((3, 3, 1)), image, [1], settings)
    np.testing.assert_allclose(result.window_scores, [[-4 / 9] * 4], atol=1e-7)


def test_image_mean_baseline_is_per_channel_by_hand():
    # channel 0 = [[1, 0], [0, 0]] (mean 0.25), channels 1 and 2 zero.
    # 1x1 windows: pixel (0,0) falls by 1 - 0.25, the others rise by 0.25,
    # out of 12 values in the mean.
    image = np.zeros((1, 2, 2, 3), np.float32)
    image[0, 0, 0, 0] = 1.0
    settings = OcclusionSettings(1, 1, baseline="image_mean", target="label")
    result = explain(mean_backend((2, 2, 3)), image, [1], settings)
    np.testing.assert_allclose(
        result.window_scores, [[1 / 16, -1 / 48, -1 / 48, -1 / 48]], atol=1e-7
    )


def test_dataset_mean_and_blur_baselines_fill_the_window():
    record = Recorder(mean_model)
    backend = load_backend(
        record, input_shape=(4, 5, 1), class_names=["a", "b"], value_range=(0, 1)
    )
    rng = np.random.default_rng(0)
    image = rng.random((1, 4, 5, 1), dtype=np.float32)
    mean_image = np.full((4, 5, 1), 0.25, np.float32)
    settings = OcclusionSettings((2, 3), (2, 2), baseline="dataset_mean")
    explain(backend, image, None, settings, dataset_mean=mean_image)
    copies = np.concatenate(record.batches)
    np.testing.assert_array_equal(copies[0], image[0])
    assert np.all(copies[1, 0:2, 0:3] == 0.25)
    np.testing.assert_array_equal(copies[1, 2:], image[0, 2:])

    record.batches.clear()
    settings = OcclusionSettings((2, 3), (2, 2), baseline="blur", blur_sigma=1.0)
    explain(backend, image, None, settings)
    copies = np.concatenate(record.batches)
    blurred = ndimage.gaussian_filter(image[0, ..., 0], 1.0, mode="nearest")
    np.testing.assert_allclose(copies[-1, 2:4, 2:5, 0], blurred[2:4, 2:5], rtol=1e-6)


@pytest.mark.parametrize("max_batch", BATCH_SIZES)
def test_target_all_has_a_class_axis_matching_each_label(max_batch):
    backend = linear_softmax((5, 4, 3), 4, seed=1)
    images = np.random.default_rng(2).random((3, 5, 4, 3), dtype=np.float32)
    every = explain(
        backend, images, None, OcclusionSettings(2, 2, target="all", max_batch=7)
    )
    assert every.window_scores.shape == (3, 6, 4)  # rows 0, 2, 3; cols 0, 2
    assert every.maps.shape == (3, 5, 4, 4)
    for c in range(4):
        one = explain(
            backend,
            images,
            np.full(3, c),
            OcclusionSettings(2, 2, target="label", max_batch=max_batch),
        )
        # float32 matrix products round differently for different batch sizes
        np.testing.assert_allclose(
            every.window_scores[..., c], one.window_scores, atol=1e-6
        )
        np.testing.assert_allclose(every.maps[..., c], one.maps, atol=1e-6)


# --------------------------------------------------------------- streaming


@pytest.mark.parametrize("max_batch", [1, 7, 50, 51, 120])
def test_batches_never_exceed_max_batch_and_cover_every_copy(max_batch):
    record = Recorder(mean_model)
    backend = load_backend(
        record, input_shape=(6, 6, 1), class_names=["a", "b"], value_range=(0, 1)
    )
    images = np.random.default_rng(3).random((9, 6, 6, 1), dtype=np.float32)
    settings = OcclusionSettings(3, 3, max_batch=max_batch)
    result = explain(backend, images, None, settings)
    sizes = [len(b) for b in record.batches]
    assert max(sizes) <= max_batch
    assert sum(sizes) == result.forward_passes == 9 * 5
    if max_batch >= 5:
        # batches hold whole images (5 passes each) except the last
        assert all(size % 5 == 0 for size in sizes)


def test_working_set_stays_bounded_whatever_the_number_of_rows():
    backend = mean_backend((2, 2, 1))
    live, peak, lock = [0], [0], threading.Lock()

    def build(start, end):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        return np.zeros((end - start, 2, 2, 1), np.float32)

    def consume(start, end, values):
        with lock:
            live[0] -= 1

    stream_batches(backend, 5000, build, consume, max_batch=10)
    assert peak[0] <= 4  # one in the model, two queued, one being built


def test_concurrent_backend_gives_the_same_result():
    images = np.random.default_rng(4).random((6, 5, 5, 1), dtype=np.float32)
    settings = OcclusionSettings(2, 1, max_batch=4)
    serial = explain(linear_softmax((5, 5, 1), 3, seed=5), images, None, settings)
    parallel_backend = linear_softmax((5, 5, 1), 3, seed=5)
    parallel_backend.max_in_flight = 3
    parallel = explain(parallel_backend, images, None, settings)
    np.testing.assert_array_equal(serial.window_scores, parallel.window_scores)


def test_model_errors_stop_the_stream_and_name_the_batch():
    calls = [0]

    def breaks_on_third_call(x):
        calls[0] += 1
        out = mean_model(x)
        if calls[0] == 3:
            out[0, 0] = np.nan
        return out

    backend = load_backend(
        breaks_on_third_call,
        input_shape=(4, 4, 1),
        class_names=["a", "b"],
        value_range=(0, 1),
    )
    images = np.zeros((20, 4, 4, 1), np.float32)
    with pytest.raises(ModelOutputError, match="batch 3.*nan"):
        explain(backend, images, None, OcclusionSettings(2, 2, max_batch=10))
    assert calls[0] == 3


def test_errors_while_building_batches_reach_the_caller():
    def build(start, end):
        if start >= 20:
            raise RuntimeError("disk on fire")
        return np.zeros((end - start, 2, 2, 1), np.float32)

    with pytest.raises(RuntimeError, match="disk on fire"):
        stream_batches(
            mean_backend((2, 2, 1)), 100, build, lambda *a: None, max_batch=10
        )


def test_empty_batch_of_images_gives_empty_results():
    images = np.zeros((0, 4, 4, 1), np.float32)
    result = explain(mean_backend((4, 4, 1)), images, None, OcclusionSettings(2, 2))
    assert result.window_scores.shape == (0, 4)
    assert result.maps.shape == (0, 4, 4)
    assert result.forward_passes == 0


def test_warm_up_sends_the_full_batch_and_smaller_ones():
    record = Recorder(mean_model)
    backend = load_backend(
        record, input_shape=(28, 28, 1), class_names=["a", "b"], value_range=(0, 1)
    )
    warm_up(backend, OcclusionSettings(6, 4, max_batch=1024), rounds=1)
    assert sorted(len(b) for b in record.batches) == [1, 501, 1000]


# -------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((4, 4, 1), np.float32), r"\(N, H, W, C\).*shape \(4, 4, 1\)"),
        (np.zeros((1, 4, 4, 3), np.float32), "3 channel.*takes 1"),
        (np.zeros((1, 5, 4, 1), np.float32), r"\(5, 4, 1\).*\(4, 4, 1\)"),
        (np.full((1, 4, 4, 1), 1.5, np.float32), r"\[1\.5, 1\.5\].*\[0, 1\]"),
        (np.full((1, 4, 4, 1), np.nan, np.float32), "non-finite value nan"),
        (np.full((1, 4, 4, 1), "a"), "real numbers"),
    ],
)
def test_bad_images_are_refused_with_the_value(images, message):
    with pytest.raises(OcclusionError, match=message):
        explain(mean_backend((4, 4, 1)), images, None, OcclusionSettings(2, 2))


def test_window_larger_than_the_image_is_refused():
    with pytest.raises(OcclusionError, match="larger than the image"):
        explain(
            mean_backend((4, 4, 1)),
            np.zeros((1, 4, 4, 1)),
            None,
            OcclusionSettings((5, 2), 1),
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stride": 0}, r"stride \(0, 0\)"),
        ({"baseline": "noise"}, "baseline 'noise' is unknown"),
        ({"target": "runner_up"}, "target 'runner_up' is unknown"),
        ({"output": "odds"}, "output 'odds' is unknown"),
        ({"max_batch": 0}, "max_batch 0"),
        ({"blur_sigma": 0.0}, "blur_sigma 0.0"),
        ({"window": (2, 2, 2)}, "one int or"),
        ({"window": 2.5}, "integers"),
        ({"baseline_value": float("nan")}, "finite"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    arguments = {"window": 2, "stride": 1, **kwargs}
    with pytest.raises(OcclusionError, match=message):
        OcclusionSettings(**arguments)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (None, "needs labels"),
        ([0, 1], r"shape \(1,\)"),
        ([2], "label 2 is not a class"),
        ([0.5], "integers"),
    ],
)
def test_label_target_checks_labels(labels, message):
    with pytest.raises(OcclusionError, match=message):
        explain(
            mean_backend((2, 2, 1)),
            np.zeros((1, 2, 2, 1)),
            labels,
            OcclusionSettings(1, 1, target="label"),
        )


def test_logit_output_needs_a_backend_with_logits():
    with pytest.raises(OcclusionError, match="exposes logits"):
        explain(
            mean_backend((2, 2, 1)),
            np.zeros((1, 2, 2, 1)),
            None,
            OcclusionSettings(1, 1, output="logit"),
        )


@pytest.mark.parametrize(
    ("mean", "message"),
    [
        (None, "needs dataset_mean"),
        (np.zeros((3, 3, 1)), "must broadcast"),
        (np.full((2, 2, 1), 2.0), "outside the model's value_range"),
    ],
)
def test_dataset_mean_is_checked(mean, message):
    with pytest.raises(OcclusionError, match=message):
        explain(
            mean_backend((2, 2, 1)),
            np.zeros((1, 2, 2, 1)),
            None,
            OcclusionSettings(1, 1, baseline="dataset_mean"),
            dataset_mean=mean,
        )


# ------------------------------------------------- agreement with reference


ALL_OUTPUTS = ("probability", "log_probability", "logit")


@st.composite
def occlusion_cases(
    draw, shape=None, outputs=ALL_OUTPUTS, min_window=1, max_n=3, max_side=9
):
    """A random small occlusion problem: image shape, count, classes, seed and
    settings; ``shape`` fixes the image shape, ``outputs`` the output spaces."""
    if shape is None:
        shape = (
            draw(st.integers(2, max_side)),
            draw(st.integers(2, max_side)),
            draw(st.sampled_from([1, 3])),
        )
    height, width, _ = shape
    window = (
        draw(st.integers(min(min_window, height), height)),
        draw(st.integers(min(min_window, width), width)),
    )
    stride = (
        draw(st.integers(max(1, window[0] // 2), height + 1)),
        draw(st.integers(max(1, window[1] // 2), width + 1)),
    )
    baseline = draw(st.sampled_from(["constant", "image_mean", "blur", "dataset_mean"]))
    target = draw(st.sampled_from(["predicted", "label", "all"]))
    output = draw(st.sampled_from(outputs))
    return {
        "shape": tuple(shape),
        "n": draw(st.integers(1, max_n)),
        "n_classes": draw(st.integers(2, 4)),
        "seed": draw(st.integers(0, 2**16)),
        "settings": {
            "window": window,
            "stride": stride,
            "baseline": baseline,
            "baseline_value": draw(st.sampled_from([0.0, 0.3, 1.0, -2.0])),
            "blur_sigma": draw(st.sampled_from([0.7, 1.5])),
            "target": target,
            "output": output,
        },
    }


def case_inputs(case):
    rng = np.random.default_rng(case["seed"])
    images = rng.random((case["n"], *case["shape"]), dtype=np.float32)
    labels = rng.integers(0, case["n_classes"], case["n"])
    dataset_mean = rng.random(case["shape"], dtype=np.float32)
    return images, labels, dataset_mean


@PROPERTY
@given(case=occlusion_cases())
def test_engine_equals_one_window_at_a_time_for_every_batch_size(case):
    backend = linear_softmax(
        case["shape"], case["n_classes"], case["seed"], logits=True
    )
    images, labels, dataset_mean = case_inputs(case)
    reference_settings = OcclusionSettings(**case["settings"])
    expected = naive_explain(backend, images, labels, reference_settings, dataset_mean)
    for max_batch in BATCH_SIZES:
        settings = OcclusionSettings(**case["settings"], max_batch=max_batch)
        result = explain(backend, images, labels, settings, dataset_mean=dataset_mean)
        assert_matches_reference(result, expected, case["n"])
