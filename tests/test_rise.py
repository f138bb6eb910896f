"""RISE masks, saliency against a mask-by-mask reference, and the comparison
with occlusion at an equal forward-pass budget."""

from __future__ import annotations

import numpy as np
import pytest

from audit.backends import load_backend
from audit.occlusion import OcclusionError, OcclusionSettings
from audit.rise import RiseSettings, compare_with_occlusion, explain, generate_masks

BATCH_SIZES = (1, 2, 7, 4096)


def corner_model(x):
    """p(class 1) is the mean of the top-left 2x2 pixels (all channels)."""
    m = x[:, :2, :2].mean(axis=(1, 2, 3), dtype=np.float64)
    return np.stack([1 - m, m], axis=1)


def backend_of(function, shape, n_classes=2):
    return load_backend(
        function,
        input_shape=shape,
        class_names=[str(i) for i in range(n_classes)],
        value_range=(0, 1),
    )


def test_masks_are_seeded_smooth_and_in_range():
    masks = generate_masks(400, (10, 13), cells=(3, 4), keep_probability=0.3, seed=5)
    assert masks.shape == (400, 10, 13)
    assert masks.dtype == np.float32
    assert masks.min() >= 0 and masks.max() <= 1
    assert masks.mean() == pytest.approx(0.3, abs=0.04)
    np.testing.assert_array_equal(masks, generate_masks(400, (10, 13), (3, 4), 0.3, 5))
    assert not np.array_equal(masks, generate_masks(400, (10, 13), (3, 4), 0.3, 6))
    # bilinear upsampling of a coarse grid: neighbours differ by less than a cell
    assert np.abs(np.diff(masks, axis=2)).max() < 0.5


def test_one_cell_grid_gives_constant_masks():
    masks = generate_masks(20, (4, 4), cells=1, keep_probability=0.5, seed=0)
    flat = masks.reshape(20, -1)
    assert np.allclose(flat, flat[:, :1])
    assert set(np.unique(flat)) <= {0.0, 1.0}


def reference_saliency(function, image, masks, target, keep, base=0.0):
    """Straight from the definition: one mask at a time."""
    total = np.zeros(image.shape[:2])
    for mask in masks:
        masked = image * mask[..., None] + base * (1 - mask[..., None])
        total += function(masked[None])[0, target] * mask
    return total / (len(masks) * keep)


@pytest.mark.parametrize("max_batch", BATCH_SIZES)
def test_saliency_equals_the_mask_by_mask_definition(max_batch):
    rng = np.random.default_rng(0)
    images = rng.random((3, 6, 5, 3), dtype=np.float32)
    settings = RiseSettings(n_masks=40, cells=(2, 3), max_batch=max_batch, seed=1)
    result = explain(backend_of(corner_model, (6, 5, 3)), images, None, settings)
    assert result.maps.shape == (3, 6, 5)
    assert result.forward_passes == 3 * 41
    for i in range(3):
        expected = reference_saliency(
            corner_model, images[i], result.masks, result.targets[i], 0.5
        )
        np.testing.assert_allclose(result.maps[i], expected, rtol=1e-5, atol=1e-6)


def test_saliency_finds_the_region_the_model_reads():
    image = np.full((1, 8, 8, 1), 0.9, np.float32)
    settings = RiseSettings(n_masks=500, cells=4, target="label", seed=0)
    result = explain(backend_of(corner_model, (8, 8, 1)), image, [1], settings)
    corner = result.maps[0, :2, :2].mean()
    far = result.maps[0, 5:, 5:].mean()
    assert corner > far + 0.05


def test_target_all_has_a_class_axis():
    images = np.random.default_rng(1).random((2, 4, 4, 1), dtype=np.float32)
    backend = backend_of(corner_model, (4, 4, 1))
    every = explain(backend, images, None, RiseSettings(n_masks=30, target="all"))
    assert every.maps.shape == (2, 4, 4, 2)
    one = explain(backend, images, [1, 1], RiseSettings(n_masks=30, target="label"))
    np.testing.assert_allclose(every.maps[..., 1], one.maps, atol=1e-6)
    # p0 + p1 = 1 for every masked image, so the two maps sum to the mean mask.
    total = every.maps.sum(axis=-1)
    expected = every.masks.mean(axis=0) / 0.5
    np.testing.assert_allclose(total, np.broadcast_to(expected, total.shape), 1e-5)


def test_masked_pixels_take_the_baseline():
    seen = []

    def record(x):
        seen.append(x.copy())
        return corner_model(x)

    image = np.full((1, 4, 4, 1), 0.8, np.float32)
    settings = RiseSettings(n_masks=5, cells=2, baseline_value=0.3, seed=2)
    result = explain(backend_of(record, (4, 4, 1)), image, None, settings)
    copies = np.concatenate(seen)[1:]
    expected = 0.8 * result.masks + 0.3 * (1 - result.masks)
    np.testing.assert_allclose(copies[..., 0], expected, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_masks": 0}, "n_masks 0"),
        ({"cells": 0}, r"cells \(0, 0\)"),
        ({"keep_probability": 1.0}, "keep_probability 1.0"),
        ({"baseline": "noise"}, "baseline 'noise' is unknown"),
        ({"target": "second"}, "target 'second' is unknown"),
        ({"max_batch": 0}, "max_batch 0"),
        ({"blur_sigma": -1.0}, "blur_sigma -1.0"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(OcclusionError, match=message):
        RiseSettings(**kwargs)


def test_comparison_spends_the_same_budget_on_both_methods():
    images = np.random.default_rng(3).random((4, 8, 8, 1), dtype=np.float32)
    backend = backend_of(corner_model, (8, 8, 1))
    summary = compare_with_occlusion(
        backend, images, OcclusionSettings(4, 2), steps=8, seed=0
    )
    occlusion, rise = summary["occlusion"], summary["rise"]
    assert occlusion["forward_passes_per_image"] == 10  # 3x3 windows + 1
    assert rise["forward_passes_per_image"] == 10
    for method in (occlusion, rise):
        assert 0 <= method["deletion_auc"] <= 1
        assert 0 <= method["insertion_auc"] <= 1
        assert method["insertion_minus_deletion"] == pytest.approx(
            method["insertion_auc"] - method["deletion_auc"], abs=2e-4
        )
    larger = compare_with_occlusion(
        backend, images, OcclusionSettings(4, 2), n_masks=50
    )
    assert larger["rise"]["forward_passes_per_image"] == 51


def test_rise_on_the_small_cnn_is_better_than_chance(small_model, mnist_train_small):
    images = mnist_train_small[0][:6]
    summary = compare_with_occlusion(
        load_backend(small_model), images, OcclusionSettings(6, 4), n_masks=300
    )
    assert summary["rise"]["insertion_minus_deletion"] > 0.1
    assert summary["occlusion"]["insertion_minus_deletion"] > 0.1
