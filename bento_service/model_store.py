"""Save and load the served Keras model in the BentoML model store.

The model is stored the way BentoML 1.4 recommends: a store entry created with
``bentoml.models.create`` holding ``model.keras`` and a metadata dict (the
model card) that the service and the audit both read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import bentoml

logger = logging.getLogger(__name__)

MODEL_NAME = "mnist_cnn"
MODEL_FILE = "model.keras"


def save_model(model, metadata: dict, name: str = MODEL_NAME) -> str:
    """Save a Keras model and its model card; return the new store tag."""
    with bentoml.models.create(name, metadata=metadata) as entry:
        model.save(Path(entry.path) / MODEL_FILE)
    logger.info("saved model %s to the BentoML store", entry.tag)
    return str(entry.tag)


def model_path(tag: str = f"{MODEL_NAME}:latest") -> tuple[Path, dict]:
    """``(path of model.keras, metadata)`` of a store entry.

    Raises ``bentoml.exceptions.NotFound`` with the store's own message when the
    tag is not in the store.
    """
    entry = bentoml.models.get(tag)
    return Path(entry.path_of(MODEL_FILE)), dict(entry.info.metadata)


def has_model(tag: str = f"{MODEL_NAME}:latest") -> bool:
    """Whether ``tag`` is in the local model store."""
    try:
        bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        return False
    return True
