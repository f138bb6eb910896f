"""The audit's own validation at test size: planted shortcut, null slices, sanity.

The experiments are the functions ``python -m audit.validation`` runs at full
size (see docs/VALIDATION.md); here they run at the sizes in
``audit.validation.FAST`` and must reach the same verdicts.
"""

from __future__ import annotations

import numpy as np
import pytest

from audit import validation
from audit.validation import (
    MARKER_SIZE,
    MARKER_VALUE,
    NO_MARKER,
    marker_band,
    marker_mask,
    marker_origin,
    plant_shortcut,
    region_share,
)

# ---------------------------------------------------------------- the data


def test_marker_positions_are_in_the_margins_and_do_not_overlap():
    assert marker_origin(0) == (1, 2)
    assert marker_origin(4) == (1, 22)
    assert marker_origin(5) == (24, 2)
    assert marker_origin(9) == (24, 22)

    masks = np.array([marker_mask(c) for c in range(10)])
    assert masks.sum(axis=(1, 2)).tolist() == [MARKER_SIZE**2] * 10
    assert masks.sum(axis=0).max() == 1
    assert marker_band().sum() == 90
    # MNIST centres its digits in the middle 20x20 pixels (rows and columns 4-23).
    assert not masks[:, 4:24, 4:24].any()


def test_marker_origin_refuses_a_non_digit():
    with pytest.raises(ValueError, match="marker class 10"):
        marker_origin(10)


def _tiny_images(n=400, seed=0):
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28, 1), np.float32)
    images[:, 4:24, 4:24, 0] = rng.random((n, 20, 20), dtype=np.float32)
    return images, rng.integers(0, 10, n)


def test_planting_marks_scanner_b_only_and_is_seeded():
    images, labels = _tiny_images()
    data = plant_shortcut(images, labels, seed=3, contrast=0.5)
    again = plant_shortcut(images, labels, seed=3, contrast=0.5)
    assert np.array_equal(data.images, again.images)
    assert np.array_equal(data.source, again.source)

    a = data.source == "scanner_a"
    b = data.source == "scanner_b"
    assert a.sum() + b.sum() == len(labels)
    assert 150 < b.sum() < 250  # share 0.5 of 400, about 5 binomial s.d.
    assert np.array_equal(data.images[a], images[a])
    assert (data.marker_class[a] == NO_MARKER).all()
    # Agreement 1: every marker sits at the image's own label.
    assert np.array_equal(data.marker_class[b], labels[b])
    for i in np.flatnonzero(b)[:20]:
        mask = marker_mask(int(labels[i]))
        assert (data.images[i, ..., 0][mask] == MARKER_VALUE).all()
        others = ~mask
        expected = images[i, ..., 0][others] * np.float32(0.5)
        assert np.allclose(data.images[i, ..., 0][others], expected)
    assert not data.misleading.any()
    assert images.max() <= 1.0  # the input was not touched


def test_agreement_zero_makes_every_marker_misleading():
    images, labels = _tiny_images()
    data = plant_shortcut(images, labels, seed=1, agreement=0.0)
    b = data.source == "scanner_b"
    assert np.array_equal(data.misleading, b)
    wrong = data.marker_class[b]
    assert ((wrong >= 0) & (wrong <= 9)).all()
    # The wrong class is drawn uniformly from the other nine.
    assert len(np.unique((wrong - labels[b]) % 10)) == 9


def test_region_share_by_hand():
    attribution = np.zeros((4, 4))
    attribution[0, 0] = 3.0
    attribution[3, 3] = -1.0
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    assert region_share(attribution, mask) == pytest.approx(0.75)
    assert np.isnan(region_share(np.zeros((4, 4)), mask))


# ------------------------------------------------------------------ sanity


@pytest.mark.slow
def test_randomised_weights_change_the_maps_and_retraining_does_not(small_model):
    # small_model is fit(first 4,000 training images, epochs=2, width=8, seed=0).
    experiment = validation.randomised_weights(
        **validation.FAST["randomised_weights"], model=small_model
    )
    numbers = experiment.numbers
    assert abs(numbers["randomised_weights"]["mean"]) < 0.2
    assert numbers["same_seed"]["mean"] > 0.95
    assert (
        numbers["randomised_weights"]["mean"]
        < numbers["other_seed"]["mean"]
        <= numbers["same_seed"]["mean"]
    )
    assert experiment.passed, [c.to_dict() for c in experiment.checks]
