"""The BentoML service: ``bentoml serve bento_service.service:MnistClassifier``.

The classifier and its model card are loaded from the BentoML model store once
per worker. The APIs are thin: requests are checked by the plain functions of
:mod:`bento_service.validation`, refusals are answered 4xx with the message
those functions wrote, and ``explain`` runs the audit's own occlusion engine.

``POST /predict_binary`` is a small Starlette app mounted into the service
(``bentoml.asgi_app``): it takes the raw ``.npy`` request body and answers the
probabilities as ``.npy``, skipping BentoML's multipart parsing, temporary
file and JSON encoding. It runs behind the same middleware (concurrency cap,
timeout, body-size limit, error shape) and uses the same instance, model lock
and validation as the BentoML APIs. Wire formats, limits and error codes are
in ``docs/SERVICE.md``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from http import HTTPStatus
from pathlib import Path

import anyio.to_thread
import bentoml
import numpy as np
from _bentoml_impl import serde as bentoml_serde
from bentoml.exceptions import BadInput, BentoMLException, InvalidArgument
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from audit.backends import load_backend
from audit.occlusion import OcclusionSettings
from audit.occlusion import explain as occlusion_explain

from .model_store import MODEL_FILE, MODEL_NAME
from .validation import (
    BodySizeLimit,
    ExplainSettings,
    InputSpec,
    Limits,
    RequestError,
    check_body_size,
    check_content_length,
    check_explain_settings,
    decode_images,
    decode_npy,
    read_body,
)

logger = logging.getLogger(__name__)

MODEL_TAG_ENV = "AUDIT_MODEL_TAG"
MODEL_TAG = os.environ.get(MODEL_TAG_ENV) or f"{MODEL_NAME}:latest"
SERVER_LIMITS = Limits.from_env()
EXPLAIN_MAX_BATCH = 1024
"""Perturbed copies sent through the model in one call by ``explain``."""
BINARY_PATH = "/predict_binary"
NPY_MEDIA_TYPE = "application/octet-stream"
BAD_MEDIA_TYPE = (
    "{path} takes the bytes of a .npy file as the whole body with Content-Type "
    f"{NPY_MEDIA_TYPE}; got Content-Type {{got!r}} (multipart uploads go to "
    "/predict_npy)"
)

MODEL_MISSING = (
    "model {tag} is not in the BentoML model store at {home}; train one with "
    "`python -m bento_service.train`, or set {var} to a stored tag, or point "
    "BENTOML_HOME at the store that holds it"
)
NO_DOWNLOADS = (
    "{field} must be uploaded as a file; this server does not download URLs or "
    "read text fields in place of files"
)


@contextmanager
def _refuse_downloads():
    """Stands in for BentoML's URL fetch of file fields given as text.

    BentoML 1.4 downloads a URL sent in a multipart file field instead of a
    file (and without ``uvloop`` its address guard fails with a 500). The
    service never opens outbound connections for request data: such a field
    is answered 400.
    """
    raise BadInput(NO_DOWNLOADS.format(field="images"))
    yield


bentoml_serde.make_safe_connect = _refuse_downloads


class RequestRefused(InvalidArgument):
    """A request refused by validation; ``error_code`` is its 4xx status."""


@contextmanager
def _refusing():
    """Turn a :class:`RequestError` into the BentoML exception that answers it."""
    try:
        yield
    except RequestError as e:
        raise RequestRefused(e.message, error_code=HTTPStatus(e.status)) from e


class ErrorObjectBody:
    """ASGI middleware answering every 4xx JSON error as ``{"error": ...}``.

    BentoML 1.4 writes the message of a 4xx ``BentoMLException`` as a
    one-element list ``[{"error": ...}]``, unlike its other error bodies; this
    unwraps it so clients see one error shape. Other responses pass untouched.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        held = {}
        chunks = []

        async def unwrap(message):
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                is_json = headers.get(b"content-type", b"").startswith(
                    b"application/json"
                )
                if 400 <= message["status"] < 500 and is_json:
                    held["start"] = message
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = _error_object(b"".join(chunks))
                start = held.pop("start")
                headers = [
                    (k, v) for k, v in start["headers"] if k != b"content-length"
                ]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, unwrap)


def _error_object(body: bytes) -> bytes:
    try:
        parsed = json.loads(body)
    except ValueError:
        return body
    if isinstance(parsed, list) and len(parsed) == 1 and isinstance(parsed[0], dict):
        return json.dumps(parsed[0]).encode()
    return body


class ClientErrorLog(logging.Filter):
    """Log refused requests as one WARNING line instead of an ERROR traceback.

    BentoML logs every exception an API raises with its traceback, client
    mistakes included; a burst of bad requests would bury real faults. Records
    for 4xx answers keep their message and lose the traceback; 5xx records
    pass unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        status = _client_error_status(error)
        if status is None:
            return True
        request = record.getMessage().removeprefix("Exception on ")
        record.msg = f"refused {request} with {status}: {error}"
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.levelno = logging.WARNING
        record.levelname = logging.getLevelName(logging.WARNING)
        return True


def _client_error_status(error) -> int | None:
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return HTTPStatus.BAD_REQUEST.value
    if isinstance(error, BentoMLException) and 400 <= error.error_code.value < 500:
        return error.error_code.value
    return None


def prediction_response(probabilities: np.ndarray, class_names) -> dict:
    """The JSON body of ``predict``: probabilities, arg-max labels, class names."""
    return {
        "probabilities": probabilities.tolist(),
        "labels": np.argmax(probabilities, axis=1).tolist(),
        "class_names": list(class_names),
    }


def npy_bytes(array: np.ndarray) -> bytes:
    """What ``numpy.save`` writes for ``array`` (format 1.0), built with one copy."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, np.lib.format.header_data_from_array_1_0(array)
    )
    return b"".join([header.getvalue(), memoryview(array).cast("B")])


async def predict_binary(request: Request) -> Response:
    """``POST /predict_binary``: ``.npy`` body in, ``.npy`` probabilities out.

    The declared ``Content-Length`` is checked before any of the body is read,
    and the body is read with a running cap, so an oversized upload is refused
    413 as soon as it is known to be too large. Decoding, the model call and
    encoding run on a worker thread, leaving the event loop free to receive
    the next request's body meanwhile.
    """
    service = bentoml.get_current_service()
    try:
        media_type = request.headers.get("content-type", "")
        if media_type.split(";", 1)[0].strip().lower() != NPY_MEDIA_TYPE:
            raise RequestError(
                BAD_MEDIA_TYPE.format(path=BINARY_PATH, got=media_type),
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            )
        check_content_length(request.headers.get("content-length"), service.limits)
        body = await read_body(request.stream(), service.limits)
        answer = await anyio.to_thread.run_sync(service.predict_binary_body, body)
    except RequestError as e:
        logger.warning(
            "refused %s [POST] with %d: %s", BINARY_PATH, e.status, e.message
        )
        return JSONResponse(
            {"error": e.message},
            status_code=e.status,
            headers={"connection": "close"} if e.status == 413 else None,
        )
    return Response(answer, media_type=NPY_MEDIA_TYPE)


binary_app = Starlette(routes=[Route(BINARY_PATH, predict_binary, methods=["POST"])])


def explanation_response(result, settings: ExplainSettings, class_names) -> dict:
    """The JSON body of ``explain`` from an occlusion result of one image."""
    probabilities = result.probs[0]
    target = int(result.targets[0])
    rows, cols = result.grid.shape
    return {
        "target": target,
        "target_name": class_names[target],
        "predicted": int(np.argmax(probabilities)),
        "probabilities": probabilities.tolist(),
        "class_names": list(class_names),
        "window": list(settings.window),
        "stride": list(settings.stride),
        "baseline_value": settings.baseline_value,
        "grid_shape": [rows, cols],
        "window_scores": result.window_scores[0].reshape(rows, cols).tolist(),
        "map": result.maps[0].tolist(),
        "max_drop": float(result.max_drop[0]),
        "flipped": bool(result.flipped[0]),
        "forward_passes": int(result.forward_passes),
    }


@bentoml.asgi_app(binary_app, path="/", name="predict_binary")
@bentoml.service(
    name="mnist_classifier",
    workers=1,
    traffic={"timeout": 60, "max_concurrency": SERVER_LIMITS.max_concurrency},
)
class MnistClassifier:
    """Serves the stored classifier: predict, predict_npy, predict_binary (the
    mounted app), explain, metadata."""

    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        import keras

        started = time.perf_counter()
        reference = type(self).model_ref
        if reference.stored is None:
            home = os.environ.get("BENTOML_HOME", "~/bentoml")
            raise RuntimeError(
                MODEL_MISSING.format(tag=reference.tag, home=home, var=MODEL_TAG_ENV)
            )
        stored = self.model_ref
        self.tag = str(stored.tag)
        self.card = dict(stored.info.metadata)
        self.spec = InputSpec.from_model_card(self.card)
        self.limits = Limits.from_env()
        self.model = keras.saving.load_model(stored.path_of(MODEL_FILE), compile=False)
        self._lock = threading.Lock()
        self._backend = load_backend(
            self.model,
            input_shape=self.spec.input_shape,
            class_names=list(self.spec.class_names),
            value_range=self.spec.value_range,
            description={"source": self.tag, "tag": self.tag, "metadata": self.card},
        )
        self._warm_up()
        logger.info(
            "loaded %s (input %s, %d classes) in %.1f s; limits %s",
            self.tag,
            self.spec.input_shape,
            len(self.spec.class_names),
            time.perf_counter() - started,
            self.limits.as_dict(),
        )

    def _warm_up(self) -> None:
        """Trace the model's predict function for a few batch shapes now,
        so the first requests do not pay for it."""
        for n in (1, 2, 64):
            self._predict(np.zeros((n, *self.spec.input_shape), np.float32))

    def _predict(self, images: np.ndarray) -> np.ndarray:
        with self._lock:
            return np.asarray(self.model.predict_on_batch(images), np.float32)

    @bentoml.api
    def predict(self, images: np.ndarray) -> dict:
        """Class probabilities of a batch sent as JSON nested lists.

        ``images``: ``(N, H, W, C)``, or one image ``(H, W, C)`` / ``(H, W)``,
        numbers in the model card's ``value_range``.
        """
        with _refusing():
            batch = decode_images(images, self.spec, self.limits)
        return prediction_response(self._predict(batch), self.spec.class_names)

    @bentoml.api
    def predict_npy(self, images: Path) -> dict:
        """Class probabilities of a batch uploaded as a ``.npy`` file.

        ``images``: multipart file field holding ``numpy.save`` bytes of an
        ``(N, H, W, C)`` float16/32/64 (values in ``value_range``) or uint8
        (0-255) array.
        """
        with _refusing():
            check_body_size(images.stat().st_size, self.limits)
            batch = decode_npy(images.read_bytes(), self.spec, self.limits)
        return prediction_response(self._predict(batch), self.spec.class_names)

    def predict_binary_body(self, body: bytes) -> bytes:
        """The ``predict_binary`` answer to a request body: the ``.npy`` bytes
        of the float32 ``(N, n_classes)`` probabilities.

        ``body`` must be the bytes of a ``.npy`` file, checked by the same
        :func:`decode_npy` as ``predict_npy``; refusals raise
        :class:`RequestError`.
        """
        check_body_size(len(body), self.limits)
        batch = decode_npy(body, self.spec, self.limits)
        return npy_bytes(self._predict(batch))

    @bentoml.api
    def explain(
        self,
        image: np.ndarray,
        target: int | None = None,
        window: int | tuple[int, int] = (6, 6),
        stride: int | tuple[int, int] = (4, 4),
        baseline_value: float | None = None,
    ) -> dict:
        """Occlusion map of one image for its predicted class or ``target``.

        Windows of ``window`` pixels, every ``stride`` pixels (the last row
        and column flush with the border), are set to ``baseline_value``
        (default: the low end of ``value_range``) one at a time; each
        window's score is the fall of the target class probability.
        """
        with _refusing():
            batch = decode_images(
                image, self.spec, self.limits, name="image", single=True
            )
            settings = check_explain_settings(
                self.spec,
                self.limits,
                window=window,
                stride=stride,
                baseline_value=baseline_value,
                target=target,
            )
        occlusion = OcclusionSettings(
            window=settings.window,
            stride=settings.stride,
            baseline="constant",
            baseline_value=settings.baseline_value,
            target="predicted" if settings.target is None else "label",
            output="probability",
            max_batch=EXPLAIN_MAX_BATCH,
        )
        labels = None if settings.target is None else np.array([settings.target])
        with self._lock:
            result = occlusion_explain(self._backend, batch, labels, occlusion)
        return explanation_response(result, settings, self.spec.class_names)

    @bentoml.api
    def metadata(self) -> dict:
        """The model card, the store tag, the limits this server enforces, and
        the paths of endpoints beyond BentoML's APIs (``predict_binary``)."""
        return {
            "tag": self.tag,
            "metadata": self.card,
            "limits": self.limits.as_dict(),
            "endpoints": {"predict_binary": BINARY_PATH},
        }


MnistClassifier.add_asgi_middleware(
    BodySizeLimit, max_bytes=SERVER_LIMITS.max_request_bytes
)
MnistClassifier.add_asgi_middleware(ErrorObjectBody)
logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorLog())
