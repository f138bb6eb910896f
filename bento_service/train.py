"""Train the small MNIST CNN that the service serves and the audit examines.

``python -m bento_service.train`` trains on the 60,000 MNIST training images,
evaluates on the 10,000 test images and saves the model with its model card in
the BentoML store. Training is seeded; on 2 CPU cores it takes about a minute.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import platform
import time

import numpy as np

logger = logging.getLogger(__name__)

VALUE_RANGE = (0.0, 1.0)
PREPROCESSING = "grayscale, 28x28, pixel value / 255 -> float32 in [0, 1], NHWC"


def build_model(input_shape=(28, 28, 1), n_classes=10, width=16):
    """A two-convolution CNN with a softmax head; ``width`` filters in the first."""
    import keras

    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            keras.layers.Conv2D(width, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(2 * width, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(n_classes, activation="softmax"),
        ]
    )


def fit(images, labels, *, epochs=2, batch_size=128, seed=0, width=16, n_classes=10):
    """Train a fresh :func:`build_model` on ``images`` (N, H, W, C) in [0, 1]."""
    import keras

    keras.utils.set_random_seed(seed)
    model = build_model(images.shape[1:], n_classes, width)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(images, labels, epochs=epochs, batch_size=batch_size, verbose=0)
    return model


def accuracy(model, images, labels, batch_size=1024) -> float:
    """Share of ``images`` whose arg-max class equals ``labels``."""
    hits = 0
    for start in range(0, len(images), batch_size):
        probs = model.predict_on_batch(images[start : start + batch_size])
        hits += int((np.argmax(probs, 1) == labels[start : start + batch_size]).sum())
    return hits / len(images)


def versions() -> dict:
    """Versions of the libraries that shape the model's numbers."""
    import bentoml
    import keras
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "bentoml": bentoml.__version__,
    }


def model_card(*, test_accuracy, train_fingerprint, seed, epochs, n_train) -> dict:
    """The metadata stored with the model and served by ``metadata``."""
    from audit.datasets import MNIST_CLASS_NAMES

    return {
        "task": "MNIST handwritten digit classification",
        "class_names": MNIST_CLASS_NAMES,
        "input_shape": [28, 28, 1],
        "value_range": list(VALUE_RANGE),
        "preprocessing": PREPROCESSING,
        "output": "probability",
        "train_fingerprint": train_fingerprint,
        "n_train": int(n_train),
        "epochs": int(epochs),
        "test_accuracy": round(float(test_accuracy), 6),
        "seed": int(seed),
        "versions": versions(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bento_service.train",
        description="Train the MNIST CNN and save it in the BentoML model store.",
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="store name (default mnist_cnn)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from audit.datasets import load_mnist_arrays

    from .model_store import MODEL_NAME, save_model

    train_x, train_y = load_mnist_arrays("train")
    test_x, test_y = load_mnist_arrays("test")
    fingerprint = hashlib.sha256(train_x.tobytes() + train_y.tobytes()).hexdigest()
    x = train_x.astype(np.float32)[..., None] / 255.0
    xt = test_x.astype(np.float32)[..., None] / 255.0

    started = time.perf_counter()
    model = fit(x, train_y.astype(np.int64), epochs=args.epochs, seed=args.seed)
    test_accuracy = accuracy(model, xt, test_y.astype(np.int64))
    logger.info(
        "trained %d epochs in %.0f s; test accuracy %.4f",
        args.epochs,
        time.perf_counter() - started,
        test_accuracy,
    )
    card = model_card(
        test_accuracy=test_accuracy,
        train_fingerprint=fingerprint[:16],
        seed=args.seed,
        epochs=args.epochs,
        n_train=len(x),
    )
    tag = save_model(model, card, args.name or MODEL_NAME)
    print(tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
