"""Deletion/insertion curves and the randomised-weights sanity check."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import mean_backend

from audit.backends import load_backend
from audit.faithfulness import (
    deletion_insertion,
    pixel_order,
    randomised_weights_check,
    rank_correlation,
)
from audit.occlusion import OcclusionError, OcclusionSettings, explain

BATCH_SIZES = (1, 2, 7, 4096)


# A 2x2 image whose map ranks its pixels by brightness: 1, 0.5, then the zeros
# (ties in row-major order).
IMAGE = np.array([[1.0, 0.0], [0.5, 0.0]], np.float32)[None, ..., None]
MAP = IMAGE[..., 0]


def test_pixel_order_ranks_highest_first_and_breaks_ties_in_reading_order():
    ranks = pixel_order(np.array([[[0.2, 0.9], [0.2, 0.5]]]))
    assert ranks.tolist() == [[2, 0, 3, 1]]


@pytest.mark.parametrize("max_batch", BATCH_SIZES)
def test_curves_of_the_mean_model_by_hand(max_batch):
    # p(bright) = mean of 4 pixels. Deletion blacks 1, then 0.5, then the zeros:
    #   1.5/4, 0.5/4, 0, 0, 0;  area = 0.25 * (0.25 + 0.0625) = 0.078125.
    # Insertion from black puts back 1, then 0.5:
    #   0, 1/4, 1.5/4, 1.5/4, 1.5/4;  area = 0.25 * (0.125 + 0.3125 + 0.75).
    settings = OcclusionSettings(1, 1, max_batch=max_batch)
    curves = deletion_insertion(
        mean_backend((2, 2, 1)), IMAGE, MAP, [1], settings, steps=4
    )
    np.testing.assert_allclose(curves.fractions, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(curves.deletion, [[0.375, 0.125, 0, 0, 0]], atol=1e-7)
    np.testing.assert_allclose(
        curves.insertion, [[0, 0.25, 0.375, 0.375, 0.375]], atol=1e-7
    )
    np.testing.assert_allclose(curves.deletion_auc, [0.078125], atol=1e-7)
    np.testing.assert_allclose(curves.insertion_auc, [0.296875], atol=1e-7)
    assert curves.forward_passes == 10


def test_curves_use_the_same_baseline_as_the_maps():
    # A grey (0.2) baseline: deletion ends, and insertion starts, at p = 0.2.
    settings = OcclusionSettings(1, 1, baseline_value=0.2)
    curves = deletion_insertion(
        mean_backend((2, 2, 1)), IMAGE, MAP, [1], settings, steps=2
    )
    assert curves.deletion[0, -1] == pytest.approx(0.2)
    assert curves.insertion[0, 0] == pytest.approx(0.2)
    assert curves.insertion[0, -1] == pytest.approx(1.5 / 4)


def test_coarse_steps_round_the_pixel_counts():
    # 3 steps over 4 pixels change round(4/3) = 1, round(8/3) = 3, then 4 pixels.
    settings = OcclusionSettings(1, 1)
    curves = deletion_insertion(
        mean_backend((2, 2, 1)), IMAGE, MAP, [1], settings, steps=3
    )
    np.testing.assert_allclose(curves.deletion, [[0.375, 0.125, 0, 0]], atol=1e-7)


def test_batch_sizes_agree_on_many_images():
    rng = np.random.default_rng(0)
    images = rng.random((7, 5, 6, 3), dtype=np.float32)
    maps = rng.random((7, 5, 6), dtype=np.float32)
    backend = mean_backend((5, 6, 3))
    results = [
        deletion_insertion(
            backend,
            images,
            maps,
            np.ones(7, int),
            OcclusionSettings(1, 1, baseline="blur", max_batch=b),
            steps=5,
        )
        for b in BATCH_SIZES
    ]
    for other in results[1:]:
        np.testing.assert_allclose(other.deletion, results[0].deletion, atol=1e-7)
        np.testing.assert_allclose(other.insertion, results[0].insertion, atol=1e-7)


def test_a_faithful_map_beats_its_reverse():
    rng = np.random.default_rng(1)
    images = rng.random((4, 6, 6, 1), dtype=np.float32)
    good = images[..., 0]
    backend = mean_backend((6, 6, 1))
    settings = OcclusionSettings(1, 1)
    right = deletion_insertion(backend, images, good, np.ones(4, int), settings)
    wrong = deletion_insertion(backend, images, -good, np.ones(4, int), settings)
    assert (right.deletion_auc < wrong.deletion_auc).all()
    assert (right.insertion_auc > wrong.insertion_auc).all()


@pytest.mark.parametrize(
    ("maps", "targets", "steps", "message"),
    [
        (np.zeros((1, 2, 3)), [1], 4, r"maps must be \(N, H, W\)"),
        (MAP, [1, 0], 4, r"targets must have shape \(1,\)"),
        (MAP, [2], 4, "class indices 0..1"),
        (MAP, [1], 0, "steps 0 must be at least 1"),
    ],
)
def test_inputs_are_checked(maps, targets, steps, message):
    with pytest.raises(OcclusionError, match=message):
        deletion_insertion(
            mean_backend((2, 2, 1)),
            IMAGE,
            maps,
            targets,
            OcclusionSettings(1, 1),
            steps=steps,
        )


def test_rank_correlation_is_nan_for_constant_maps_without_warnings():
    a = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    b = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    result = rank_correlation(a, b)
    assert result[0] == pytest.approx(-1.0)
    assert np.isnan(result[1])


def test_randomised_weights_change_the_maps(small_model, mnist_train_small):
    images = mnist_train_small[0][:12]
    settings = OcclusionSettings(6, 4)
    check = randomised_weights_check(small_model, images, settings, seed=0)
    assert check.trained.shape == check.randomised.shape == (12, 28, 28)
    assert check.forward_passes == 2 * 12 * 50
    # The trained model's maps agree with themselves perfectly; the random copy's
    # must be far from that.
    same = rank_correlation(check.trained, check.trained)
    assert np.allclose(same[np.isfinite(same)], 1.0)
    assert check.mean_correlation < 0.5


def test_sanity_check_accepts_a_backend_and_target_all(small_model, mnist_train_small):
    backend = load_backend(small_model)
    images = mnist_train_small[0][:3]
    check = randomised_weights_check(
        backend, images, OcclusionSettings(7, 7, target="all"), seed=1
    )
    direct = explain(backend, images, None, OcclusionSettings(7, 7))
    np.testing.assert_allclose(check.trained, direct.maps, atol=1e-6)
    assert check.rank_correlation.shape == (3,)
