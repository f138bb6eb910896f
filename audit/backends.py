"""Model backends: one interface over every way the audit can reach a model.

A backend takes a float32 batch ``(N, H, W, C)`` and returns class
probabilities ``(N, n_classes)`` float32. :func:`load_backend` picks the kind
from the source:

===============================  =============================================
source                           backend
===============================  =============================================
a ``keras.Model``                :class:`KerasBackend` (``predict_on_batch``)
a path ending in ``.keras``      :class:`KerasBackend` of the loaded file
``http://`` or ``https://`` URL  :class:`HttpBackend` of a running Bento
any other string                 :class:`KerasBackend` of a BentoML store tag
a Python callable                :class:`CallableBackend`
===============================  =============================================

Every backend checks what the model returns: NaN or infinite values, rows
that do not sum to one (tolerance ``1e-3``) or a wrong shape raise
:class:`ModelOutputError` naming the batch and the offending value.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

logger = logging.getLogger(__name__)

SUM_TOLERANCE = 1e-3
DEFAULT_VALUE_RANGE = (0.0, 1.0)
KERAS_SUFFIX = ".keras"
STORE_NOT_FOUND = (
    "model {tag!r} is not in the BentoML model store at {home}; train and store "
    "it with `python -m bento_service.train`, set BENTOML_HOME to the store that "
    "holds it, or pass a .keras file"
)
UNREACHABLE = (
    "cannot reach the Bento at {url}: {error}. Is `bentoml serve` running there, "
    "and is the URL right?"
)


class ModelOutputError(ValueError):
    """The model returned something that is not a batch of probabilities."""


class BackendError(RuntimeError):
    """A model that cannot be loaded or reached; the message says which and why."""


@runtime_checkable
class ModelBackend(Protocol):
    """What the audit needs of a model.

    ``input_shape`` is ``(H, W, C)``; ``value_range`` the ``(low, high)`` of
    valid pixel values; ``class_names`` names class ``i`` of the outputs;
    ``description`` is the model card (``source``, ``tag`` where known,
    ``metadata``). ``predict`` maps float32 ``(N, H, W, C)`` to float32
    probabilities ``(N, len(class_names))``.

    Two optional members are used when present: ``max_in_flight`` (int,
    default 1), how many ``predict`` calls the engine may have running at once,
    and ``has_logits`` with ``predict_logits(x)``, the pre-softmax scores that
    output space ``logit`` needs.
    """

    input_shape: tuple[int, int, int]
    value_range: tuple[float, float]
    class_names: list[str]
    description: dict

    def predict(self, x: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------ checks


def check_probabilities(values, n_images: int, n_classes: int, batch: int):
    """``values`` as float32 ``(n_images, n_classes)`` probabilities, or an error.

    ``batch`` is the number of the call on this backend (from 1), for the
    message.
    """
    out = np.asarray(values, dtype=np.float32)
    if out.shape != (n_images, n_classes):
        raise ModelOutputError(
            f"batch {batch}: the model returned shape {out.shape} for {n_images} "
            f"images; expected ({n_images}, {n_classes}) class probabilities"
        )
    finite = np.isfinite(out)
    if not finite.all():
        row, column = np.argwhere(~finite)[0]
        raise ModelOutputError(
            f"batch {batch}: the model returned {out[row, column]} for image {row}, "
            f"class {column}; outputs must be finite probabilities"
        )
    sums = out.sum(axis=1, dtype=np.float64)
    off = np.abs(sums - 1.0) > SUM_TOLERANCE
    if off.any():
        row = int(np.argmax(off))
        raise ModelOutputError(
            f"batch {batch}: the model's outputs for image {row} sum to "
            f"{sums[row]:.6g}, not 1 (tolerance {SUM_TOLERANCE}); the audit needs "
            "probabilities (end the model with a softmax, or load a callable "
            "that returns logits with outputs='logits')"
        )
    if (out < -SUM_TOLERANCE).any():
        row = int(np.argmax((out < -SUM_TOLERANCE).any(axis=1)))
        raise ModelOutputError(
            f"batch {batch}: the model returned negative probability "
            f"{out[row].min():.6g} for image {row}"
        )
    return out


def _check_logits(values, n_images: int, n_classes: int, batch: int) -> np.ndarray:
    out = np.asarray(values, dtype=np.float32)
    if out.shape != (n_images, n_classes):
        raise ModelOutputError(
            f"batch {batch}: the model returned logits of shape {out.shape} for "
            f"{n_images} images; expected ({n_images}, {n_classes})"
        )
    if not np.isfinite(out).all():
        row, column = np.argwhere(~np.isfinite(out))[0]
        raise ModelOutputError(
            f"batch {batch}: the model returned logit {out[row, column]} for image "
            f"{row}, class {column}; logits must be finite"
        )
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def _shape3(value, what: str) -> tuple[int, int, int]:
    shape = tuple(value)
    if len(shape) != 3 or any(s is None or int(s) < 1 for s in shape):
        raise BackendError(f"{what} must be (H, W, C) positive ints; got {value}")
    return tuple(int(s) for s in shape)


def _value_range(value) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not low < high:
        raise BackendError(f"value_range {value} must be (low, high) with low < high")
    return low, high


class _BatchCounter:
    """Numbers the calls of a backend so errors can name the batch."""

    def __init__(self):
        self._count = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._count += 1
            return self._count


def _check_input(x, input_shape) -> np.ndarray:
    batch = np.asarray(x, dtype=np.float32)
    if batch.ndim != 4 or batch.shape[1:] != tuple(input_shape):
        raise ValueError(
            f"batch has shape {batch.shape}; the model takes (N, *{input_shape})"
        )
    return batch


# ------------------------------------------------------------------- Keras


def _is_softmax(activation) -> bool:
    return getattr(activation, "__name__", "") == "softmax"


class KerasBackend:
    """A Keras model in this process, called through ``predict_on_batch``.

    ``predict_on_batch`` runs one compiled step without ``predict``'s
    per-call set-up, which is many times faster for the repeated large batches
    the audit sends. The first two or three new batch sizes are traced (tens
    of milliseconds each); :func:`audit.occlusion.warm_up` pays that up front.

    Parameters
    ----------
    model:
        A built ``keras.Model`` ending in class probabilities.
    input_shape:
        ``(H, W, C)``; required when the model accepts variable sizes,
        otherwise checked against the model's own.
    class_names:
        Names of the output classes (default ``"0"``, ``"1"``, ...).
    value_range:
        Valid pixel values (default ``(0.0, 1.0)``).
    description:
        Model card to report (``source``, ``tag``, ``metadata``).

    When the last layer is a softmax (a ``Dense`` with softmax activation, a
    ``Softmax`` or ``Activation('softmax')`` layer), :meth:`predict_logits`
    returns the pre-softmax scores and ``has_logits`` is True.
    """

    max_in_flight = 1

    def __init__(
        self,
        model,
        *,
        input_shape=None,
        class_names=None,
        value_range=DEFAULT_VALUE_RANGE,
        description=None,
    ):
        self.model = model
        declared = tuple(model.input_shape[1:])
        if input_shape is None:
            if len(declared) != 3 or None in declared:
                raise BackendError(
                    f"the model accepts inputs of shape {declared}; pass "
                    "input_shape=(H, W, C) to say which size the audit uses"
                )
            input_shape = declared
        self.input_shape = _shape3(input_shape, "input_shape")
        for given, own in zip(self.input_shape, declared, strict=False):
            if own is not None and own != given:
                raise BackendError(
                    f"input_shape {self.input_shape} does not fit the model, "
                    f"which takes {declared}"
                )
        n_classes = int(model.output_shape[-1])
        names = [str(i) for i in range(n_classes)] if class_names is None else None
        self.class_names = names or [str(c) for c in class_names]
        if len(self.class_names) != n_classes:
            raise BackendError(
                f"{len(self.class_names)} class_names given but the model has "
                f"{n_classes} outputs"
            )
        self.value_range = _value_range(value_range)
        self.description = dict(description or {"source": "keras.Model"})
        self._batches = _BatchCounter()
        self._logit_model = None
        self._logit_lock = threading.Lock()
        self.has_logits = self._softmax_head() is not None

    def _softmax_head(self):
        last = self.model.layers[-1] if self.model.layers else None
        if last is None:
            return None
        kind = type(last).__name__
        if kind == "Softmax" or (
            kind == "Activation" and _is_softmax(getattr(last, "activation", None))
        ):
            return last
        if kind == "Dense" and _is_softmax(getattr(last, "activation", None)):
            return last
        return None

    def _logits_model(self):
        with self._logit_lock:
            if self._logit_model is None:
                import keras

                last = self._softmax_head()
                if type(last).__name__ == "Dense":
                    linear = keras.layers.Dense(last.units, activation=None)
                    head = linear(last.input)
                    linear.set_weights(last.get_weights())
                else:
                    head = last.input
                self._logit_model = keras.Model(self.model.inputs, head)
            return self._logit_model

    def predict(self, x: np.ndarray) -> np.ndarray:
        batch = _check_input(x, self.input_shape)
        number = self._batches.next()
        values = self.model.predict_on_batch(batch)
        return check_probabilities(values, len(batch), len(self.class_names), number)

    def predict_logits(self, x: np.ndarray) -> np.ndarray:
        """Pre-softmax scores ``(N, n_classes)`` float32 (needs ``has_logits``)."""
        if not self.has_logits:
            raise BackendError("this Keras model does not end in a softmax layer")
        batch = _check_input(x, self.input_shape)
        number = self._batches.next()
        values = self._logits_model().predict_on_batch(batch)
        return _check_logits(values, len(batch), len(self.class_names), number)

    def close(self) -> None:
        self._logit_model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _load_keras_file(path: Path):
    import keras

    if not path.is_file():
        raise BackendError(f"model file {path} does not exist")
    try:
        return keras.models.load_model(path)
    except (ValueError, OSError) as e:
        raise BackendError(f"model file {path} cannot be loaded by Keras: {e}") from e


def _from_store(tag: str, **options) -> KerasBackend:
    import bentoml

    from bento_service.model_store import model_path

    try:
        path, metadata = model_path(tag)
    except bentoml.exceptions.NotFound as e:
        home = os.environ.get("BENTOML_HOME", "~/bentoml")
        raise BackendError(STORE_NOT_FOUND.format(tag=tag, home=home)) from e
    exact = f"{tag.split(':')[0]}:{path.parent.name}"
    missing = [k for k in ("input_shape", "class_names") if k not in metadata]
    if missing:
        raise BackendError(
            f"model card of {exact} lacks {missing}; store the model with "
            "bento_service.model_store.save_model and a full model card"
        )
    settings = {
        "input_shape": metadata["input_shape"],
        "class_names": metadata["class_names"],
        "value_range": metadata.get("value_range", DEFAULT_VALUE_RANGE),
        "description": {"source": tag, "tag": exact, "metadata": metadata},
    }
    settings.update(options)
    return KerasBackend(_load_keras_file(path), **settings)


# ---------------------------------------------------------------- callable


class CallableBackend:
    """A Python function ``f(x (N, H, W, C) float32) -> (N, n_classes)``.

    ``outputs='probabilities'`` (default) means ``f`` returns probabilities;
    ``outputs='logits'`` means it returns pre-softmax scores, which
    :meth:`predict` turns into probabilities and :meth:`predict_logits`
    returns as they are. ``max_in_flight`` above 1 lets the engine call ``f``
    from that many threads at once (only for thread-safe functions).
    """

    def __init__(
        self,
        function: Callable[[np.ndarray], np.ndarray],
        *,
        input_shape,
        class_names,
        value_range,
        outputs: str = "probabilities",
        max_in_flight: int = 1,
        description=None,
    ):
        if outputs not in ("probabilities", "logits"):
            raise BackendError(
                f"outputs {outputs!r} is unknown; use 'probabilities' or 'logits'"
            )
        self.function = function
        self.input_shape = _shape3(input_shape, "input_shape")
        self.class_names = [str(c) for c in class_names]
        if not self.class_names:
            raise BackendError("class_names must name at least one class")
        self.value_range = _value_range(value_range)
        self.has_logits = outputs == "logits"
        self.max_in_flight = int(max_in_flight)
        name = getattr(function, "__qualname__", type(function).__name__)
        self.description = dict(description or {"source": f"callable {name}"})
        self._batches = _BatchCounter()

    def predict(self, x: np.ndarray) -> np.ndarray:
        batch = _check_input(x, self.input_shape)
        number = self._batches.next()
        values = self.function(batch)
        n_classes = len(self.class_names)
        if self.has_logits:
            values = _softmax(_check_logits(values, len(batch), n_classes, number))
        return check_probabilities(values, len(batch), n_classes, number)

    def predict_logits(self, x: np.ndarray) -> np.ndarray:
        """The function's logits (only for ``outputs='logits'``)."""
        if not self.has_logits:
            raise BackendError("this callable was loaded with outputs='probabilities'")
        batch = _check_input(x, self.input_shape)
        number = self._batches.next()
        values = self.function(batch)
        return _check_logits(values, len(batch), len(self.class_names), number)

    def close(self) -> None:
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -------------------------------------------------------------------- HTTP


NPY_REQUEST_OVERHEAD = 4096
NPY_MEDIA_TYPE = "application/octet-stream"
BINARY_ENDPOINT = "predict_binary"
"""Key of the binary endpoint's path in the ``endpoints`` of a server's card."""
MULTIPART_PATH = "/predict_npy"


class HttpBackend:
    """A running Bento reached over HTTP, with binary ``.npy`` payloads.

    The service must answer ``POST /metadata`` with its model card (either
    flat or as ``{"tag", "metadata": {...}, "limits": {...}}``). When the card
    names a binary endpoint (``"endpoints": {"predict_binary": path}``), each
    batch is posted there as the raw bytes of a float32 ``.npy`` file
    (``application/octet-stream``) and the answer is read as a ``.npy`` array
    of probabilities; otherwise it goes to ``POST /predict_npy`` as a
    multipart file field ``images`` and the answer is read from JSON
    ``{"probabilities": [[...]], ...}``. ``predict_path`` says which is used.

    Parameters
    ----------
    url:
        Base URL of the Bento, e.g. ``http://127.0.0.1:3000``.
    max_in_flight:
        Most requests open at once, across all threads (>= 1). Two keeps a
        one-worker Bento busy while the client encodes the next batch.
    max_requests_per_second:
        Optional cap on the rate of requests started (a spacing between
        starts, not a burst budget), to audit a live service gently.
    timeout:
        Seconds allowed for connecting and for each read and write.
    retries:
        Further attempts after a connection error, a timeout, a 5xx or a 429;
        the ``i``-th retry waits ``backoff * 2 ** i`` seconds (or the
        server's ``Retry-After``, when larger).
    auth_env:
        Name of an environment variable holding a token sent as
        ``{auth_header}: {auth_scheme} {token}``; read once, at load.
    request_batch:
        Most images in one request (default: the server's ``max_batch``
        limit when it states one, else 1024).
    """

    def __init__(
        self,
        url: str,
        *,
        max_in_flight: int = 2,
        max_requests_per_second: float | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.25,
        auth_env: str | None = None,
        auth_header: str = "Authorization",
        auth_scheme: str = "Bearer",
        request_batch: int | None = None,
    ):
        import httpx

        if int(max_in_flight) < 1:
            raise BackendError(f"max_in_flight {max_in_flight} must be at least 1")
        if max_requests_per_second is not None and not max_requests_per_second > 0:
            raise BackendError(
                f"max_requests_per_second {max_requests_per_second} must be > 0"
            )
        if int(retries) < 0:
            raise BackendError(f"retries {retries} must be 0 or more")
        self.url = url.rstrip("/")
        self.max_in_flight = int(max_in_flight)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self._interval = 1.0 / max_requests_per_second if max_requests_per_second else 0
        self._next_start = 0.0
        self._rate_lock = threading.Lock()
        headers = {}
        if auth_env:
            token = os.environ.get(auth_env)
            if not token:
                raise BackendError(
                    f"environment variable {auth_env} (the endpoint's token) is "
                    "not set or empty"
                )
            headers[auth_header] = f"{auth_scheme} {token}".strip()
        self._client = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(
                max_connections=self.max_in_flight,
                max_keepalive_connections=self.max_in_flight,
            ),
        )
        self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="http")
        self._batches = _BatchCounter()
        try:
            card = self._post("/metadata", json={}).json()
        except BaseException:
            self.close()
            raise
        self._read_card(card, request_batch)

    def _read_card(self, card: dict, request_batch) -> None:
        metadata = card.get("metadata", card) if isinstance(card, dict) else None
        if not isinstance(metadata, dict) or "input_shape" not in metadata:
            self.close()
            raise BackendError(
                f"{self.url}/metadata did not return a model card with input_shape "
                f"and class_names; got {str(card)[:200]}"
            )
        self.input_shape = _shape3(metadata["input_shape"], "served input_shape")
        self.class_names = [str(c) for c in metadata["class_names"]]
        self.value_range = _value_range(
            metadata.get("value_range", DEFAULT_VALUE_RANGE)
        )
        limits = card.get("limits", {}) if isinstance(card, dict) else {}
        self.request_batch = int(request_batch or limits.get("max_batch", 1024))
        max_bytes = limits.get("max_request_bytes")
        if max_bytes:
            # float32 pixels plus room for the .npy header and multipart framing.
            image_bytes = 4 * int(np.prod(self.input_shape))
            fits = (int(max_bytes) - NPY_REQUEST_OVERHEAD) // image_bytes
            if fits < 1:
                self.close()
                raise BackendError(
                    f"{self.url} accepts at most {max_bytes} bytes a request, less "
                    f"than one {self.input_shape} float32 image; raise the server's "
                    "AUDIT_MAX_REQUEST_BYTES"
                )
            self.request_batch = min(self.request_batch, fits)
        endpoints = card.get("endpoints") if isinstance(card, dict) else None
        binary = endpoints.get(BINARY_ENDPOINT) if isinstance(endpoints, dict) else None
        self._binary = isinstance(binary, str) and binary.startswith("/")
        self.predict_path = binary if self._binary else MULTIPART_PATH
        self.description = {
            "source": self.url,
            "url": self.url,
            "tag": card.get("tag", self.url),
            "metadata": metadata,
        }

    def _wait_for_rate(self) -> None:
        if not self._interval:
            return
        with self._rate_lock:
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + self._interval
        if start > now:
            time.sleep(start - now)

    def _post(self, path: str, **kwargs):
        import httpx

        last_problem, retry_after = "", 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(max(self.backoff * 2 ** (attempt - 1), retry_after))
                logger.debug(
                    "retry %d of %s%s: %s", attempt, self.url, path, last_problem
                )
            retry_after = 0.0
            self._wait_for_rate()
            try:
                response = self._client.post(path, **kwargs)
            except httpx.TransportError as e:
                last_problem = f"{type(e).__name__}: {e}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last_problem = f"HTTP {response.status_code}: {response.text[:200]}"
                retry_after = _retry_after_seconds(response)
                continue
            if response.status_code >= 400:
                raise BackendError(
                    f"{self.url}{path} refused the request with HTTP "
                    f"{response.status_code}: {_error_text(response)}"
                )
            return response
        raise BackendError(
            UNREACHABLE.format(
                url=f"{self.url}{path}",
                error=f"{last_problem} (after {self.retries + 1} attempts)",
            )
        )

    def _request(self, batch: np.ndarray) -> np.ndarray:
        if self._binary:
            body, content_type = npy_bytes(batch), NPY_MEDIA_TYPE
        else:
            body, content_type = npy_upload(batch)
        number = self._batches.next()
        response = self._post(
            self.predict_path, content=body, headers={"Content-Type": content_type}
        )
        where = f"batch {number}: {self.url}{self.predict_path}"
        if self._binary:
            values = read_npy_answer(response, where)
        else:
            try:
                values = response.json()["probabilities"]
            except (ValueError, KeyError, TypeError) as e:
                raise ModelOutputError(
                    f"{where} answered without a 'probabilities' list: "
                    f"{response.text[:200]}"
                ) from e
        return check_probabilities(values, len(batch), len(self.class_names), number)

    def predict(self, x: np.ndarray) -> np.ndarray:
        batch = _check_input(x, self.input_shape)
        if len(batch) == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        step = self.request_batch
        pieces = [batch[s : s + step] for s in range(0, len(batch), step)]
        if len(pieces) == 1:
            return self._request(pieces[0])
        return np.concatenate(list(self._pool.map(self._request, pieces)))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _npy_parts(array: np.ndarray) -> tuple[bytes, memoryview | bytes]:
    """The ``.npy`` format 1.0 header of ``array`` and its C-ordered data."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, np.lib.format.header_data_from_array_1_0(array)
    )
    return header.getvalue(), memoryview(array).cast("B") if array.size else b""


def npy_bytes(array: np.ndarray) -> bytes:
    """What ``numpy.save`` writes for ``array`` (format 1.0), built with one copy."""
    return b"".join(_npy_parts(array))


def npy_upload(array: np.ndarray, field: str = "images") -> tuple[bytes, str]:
    """A ``multipart/form-data`` body holding ``array`` as one ``.npy`` file.

    Returns ``(body, content_type)``. The body is assembled with one copy of
    the array (``numpy.save`` into a buffer and a generic multipart encoder
    cost several); the file is what ``numpy.save`` writes, format 1.0.
    """
    header, payload = _npy_parts(array)
    boundary = secrets.token_hex(16)
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{field}"; filename="{field}.npy"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    body = b"".join([head, header, payload, tail])
    return body, f"multipart/form-data; boundary={boundary}"


def read_npy_answer(response, where: str) -> np.ndarray:
    """The array in a ``.npy`` response body, or :class:`ModelOutputError`.

    The body must be ``application/octet-stream`` holding a plain numeric
    ``.npy`` array whose data length matches its header; it is never
    unpickled. ``where`` names the request in the message.
    """
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith(NPY_MEDIA_TYPE):
        raise ModelOutputError(
            f"{where} answered {content_type or 'no content type'}, not a "
            f".npy array ({NPY_MEDIA_TYPE}): {response.text[:200]}"
        )
    data = response.content
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        if dtype.hasobject:
            raise ValueError(f"it holds Python objects (dtype {dtype})")
        count = int(np.prod(shape, dtype=np.int64))
        if len(data) - stream.tell() != count * dtype.itemsize:
            raise ValueError(
                f"its header says {shape} of {dtype} but it holds "
                f"{len(data) - stream.tell()} bytes of data"
            )
        flat = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    except ValueError as e:
        raise ModelOutputError(f"{where} answered a body that is not .npy: {e}") from e
    return flat.reshape(shape, order="F" if fortran else "C")


def _retry_after_seconds(response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", 0)))
    except ValueError:
        return 0.0


def _error_text(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return str(body)[:300]


# ----------------------------------------------------------------- loading


def load_backend(source, **options) -> ModelBackend:
    """The backend for ``source``; ``options`` go to that backend's constructor.

    * ``keras.Model`` (anything with ``predict_on_batch``) -> :class:`KerasBackend`
      (options ``input_shape``, ``class_names``, ``value_range``);
    * a path ending in ``.keras`` -> :class:`KerasBackend` of that file;
    * ``http(s)://...`` -> :class:`HttpBackend` (options ``max_in_flight``,
      ``max_requests_per_second``, ``timeout``, ``retries``, ``auth_env``, ...);
    * another string, e.g. ``mnist_cnn:latest`` -> the BentoML store entry,
      with input shape, classes and value range from its model card;
    * a callable -> :class:`CallableBackend` (options ``input_shape``,
      ``class_names`` and ``value_range`` are required).
    """
    if hasattr(source, "predict_on_batch"):
        return KerasBackend(source, **options)
    if isinstance(source, str | os.PathLike):
        text = os.fspath(source)
        if text.startswith(("http://", "https://")):
            return HttpBackend(text, **options)
        if text.endswith(KERAS_SUFFIX) or isinstance(source, os.PathLike):
            path = Path(text)
            options.setdefault("description", {"source": str(path)})
            return KerasBackend(_load_keras_file(path), **options)
        return _from_store(text, **options)
    if callable(source):
        missing = [
            k for k in ("input_shape", "class_names", "value_range") if k not in options
        ]
        if missing:
            raise BackendError(
                f"a callable model needs the options {missing} "
                "(input_shape=(H, W, C), class_names=[...], value_range=(low, high))"
            )
        return CallableBackend(source, **options)
    raise BackendError(
        f"cannot make a model backend from {type(source).__name__}; pass a "
        "keras.Model, a .keras path, a store tag, an http(s) URL or a callable"
    )
