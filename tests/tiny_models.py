"""Models whose output is a known function of the pixels, for hand-worked tests."""

from __future__ import annotations

import numpy as np

from audit.backends import load_backend


def mean_model(x):
    """Two classes; p(class 1) is the mean pixel value (so inputs in [0, 1])."""
    m = x.mean(axis=(1, 2, 3), dtype=np.float64)
    return np.stack([1 - m, m], axis=1)


def mean_backend(shape):
    """:func:`mean_model` behind the callable backend, for images of ``shape``."""
    return load_backend(
        mean_model,
        input_shape=shape,
        class_names=["dark", "bright"],
        value_range=(0, 1),
    )
