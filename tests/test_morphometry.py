"""Derived image attributes: hand-computed values on drawn shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from audit.morphometry import DERIVED_ATTRIBUTES, measure


def bar(width: int, shear: float = 0.0, size: int = 28) -> np.ndarray:
    """A vertical stroke ``width`` pixels wide from row 4 to 23, leaning by
    ``shear`` columns per row (positive: the top to the right)."""
    image = np.zeros((size, size), np.float32)
    for y in range(4, 24):
        left = round(size / 2 - width / 2 - shear * (y - 13.5))
        image[y, left : left + width] = 1.0
    return image


def batch(*images) -> np.ndarray:
    return np.stack(images)[..., None]


def test_intensity_attributes_by_hand():
    image = np.array([[0.0, 1.0], [0.5, 0.5]], np.float32)

    got = measure(batch(image), ["brightness", "contrast", "ink_area"])

    assert got["brightness"][0] == pytest.approx(0.5)
    assert got["contrast"][0] == pytest.approx(math.sqrt(0.125))
    assert got["ink_area"][0] == pytest.approx(0.25)


@pytest.mark.parametrize("width", [2, 3, 4])
def test_thickness_of_a_bar_is_its_width(width):
    # A 20-pixel stroke: the skeleton's retracted ends cost under 20%.
    got = measure(batch(bar(width)), ["thickness"])["thickness"][0]

    assert got == pytest.approx(width, rel=0.2)


def test_thicker_strokes_measure_thicker():
    got = measure(batch(bar(2), bar(4), bar(6)), ["thickness"])["thickness"]

    assert got[0] < got[1] < got[2]


@pytest.mark.parametrize("shear", [-0.5, 0.0, 0.3])
def test_slant_is_the_shear_angle(shear):
    got = measure(batch(bar(3, shear)), ["slant"])["slant"][0]

    assert got == pytest.approx(math.degrees(math.atan(shear)), abs=2.5)


def test_blank_image_has_no_shape():
    got = measure(batch(np.zeros((28, 28), np.float32)))

    assert np.isnan(got["thickness"][0]) and np.isnan(got["slant"][0])
    assert got["brightness"][0] == 0.0 and got["ink_area"][0] == 0.0


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_batch_gives_the_same_as_one_at_a_time(scale):
    rng = np.random.default_rng(0)
    images = [
        bar(int(w), s) for w, s in zip([2, 3, 4, 5], [0.2, -0.3, 0.0, 0.4], strict=True)
    ]
    images.append(rng.random((28, 28)).astype(np.float32))

    together = measure(batch(*images), scale=scale)
    alone = [measure(batch(image), scale=scale) for image in images]

    for name in DERIVED_ATTRIBUTES:
        expected = np.array([a[name][0] for a in alone])
        np.testing.assert_array_equal(together[name], expected)


def test_colour_images_are_measured_on_their_grey_mean():
    grey = bar(3, 0.2)
    colour = np.repeat(grey[None, ..., None], 3, axis=-1)

    got_colour = measure(colour)
    got_grey = measure(batch(grey))

    for name in DERIVED_ATTRIBUTES:
        assert got_colour[name][0] == pytest.approx(got_grey[name][0])


def test_only_requested_attributes_in_order():
    got = measure(batch(bar(3)), ["slant", "brightness"])

    assert list(got) == ["slant", "brightness"]


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="unknown"):
        measure(batch(bar(3)), ["roundness"])
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        measure(np.zeros((2, 28, 28), np.float32))


def test_real_digits_have_plausible_values(mnist_test_dataset):
    images = mnist_test_dataset.load(np.arange(200)).images

    got = measure(images)

    assert np.isfinite(got["thickness"]).all()
    assert 1.5 < np.median(got["thickness"]) < 4.0
    assert -45 < np.median(got["slant"]) < 45
    assert 0.05 < np.median(got["ink_area"]) < 0.3
