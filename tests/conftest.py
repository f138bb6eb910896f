"""Shared fixtures: small real MNIST slices and a small model trained once."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def bentoml_home(tmp_path_factory):
    """A private BentoML home so tests never touch the user's model store."""
    home = tmp_path_factory.mktemp("bentoml_home")
    previous = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("BENTOML_HOME", None)
    else:
        os.environ["BENTOML_HOME"] = previous


@pytest.fixture(scope="session")
def mnist_train_small():
    """The first 4,000 MNIST training images, float32 (N, 28, 28, 1), and labels."""
    from audit.datasets import load_mnist_arrays

    images, labels = load_mnist_arrays("train")
    x = images[:4000].astype(np.float32)[..., None] / np.float32(255.0)
    return x, labels[:4000].astype(np.int64)


@pytest.fixture(scope="session")
def small_model(mnist_train_small):
    """A small CNN trained for one epoch on 4,000 images (about 90% accurate)."""
    from bento_service.train import fit

    x, y = mnist_train_small
    return fit(x, y, epochs=2, seed=0, width=8)


@pytest.fixture(scope="session")
def mnist_test_dataset():
    """The built-in MNIST test set as an audit Dataset."""
    from audit.datasets import mnist

    return mnist("test")


@pytest.fixture(scope="session")
def stored_model(small_model, bentoml_home):
    """The small model saved in the private BentoML store; yields its tag."""
    from bento_service.model_store import save_model
    from bento_service.train import model_card

    card = model_card(
        test_accuracy=0.0, train_fingerprint="test", seed=0, epochs=2, n_train=4000
    )
    return save_model(small_model, card)


@pytest.fixture(scope="session")
def test_data():
    """The tests' own data folder (see tests/data/README.md)."""
    from pathlib import Path

    return Path(__file__).resolve().parent / "data"
