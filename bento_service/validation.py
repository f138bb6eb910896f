"""Request validation for the service: plain functions, no BentoML.

Every function here either returns a value the model can take or raises
:class:`RequestError` carrying the HTTP status to answer with and a message
that names the offending value and what is expected:

- 400 the request cannot be read (ragged lists, bytes that are not ``.npy``);
- 413 the request is too large (body bytes, images in one batch);
- 422 the request is readable but unusable (shape, dtype, value range,
  NaN or infinite values, explain settings out of bounds).

Images come out as ``float32`` arrays of shape ``(N, H, W, C)`` inside the
model card's ``value_range``. JSON numbers are taken as values in that range;
``uint8`` arrays are taken as 0-255 pixel values and scaled onto it.

:class:`BodySizeLimit` is a plain ASGI middleware that refuses bodies larger
than the limit before anything parses them.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

BAD_REQUEST = 400
TOO_LARGE = 413
UNPROCESSABLE = 422

MAX_BATCH_ENV = "AUDIT_MAX_BATCH"
MAX_REQUEST_BYTES_ENV = "AUDIT_MAX_REQUEST_BYTES"
MAX_EXPLAIN_WINDOWS_ENV = "AUDIT_MAX_EXPLAIN_WINDOWS"
MAX_CONCURRENCY_ENV = "AUDIT_MAX_CONCURRENCY"

RANGE_TOLERANCE = 1e-6
"""Values may leave ``value_range`` by this share of its width (rounding)."""

FLOAT_KINDS = "f"
JSON_NUMBER_KINDS = "fiu"
NPY_MAGIC = b"\x93NUMPY"

BAD_LIMIT = "{var}={value!r} is not a positive whole number; unset it or give one"
BAD_CARD = "model card {field} is {value!r}; expected {expected}"
UNREADABLE = (
    "{name} cannot be read as an array of numbers ({reason}); send nested lists "
    "of equal length holding numbers only"
)
BAD_DTYPE = (
    "{name} has dtype {dtype}; expected {accepted} values in {range} or uint8 "
    "pixel values 0-255"
)
BAD_SHAPE = "{name} has shape {shape}; expected {expected}"
EMPTY_BATCH = "{name} holds no images; send at least one"
BATCH_TOO_LARGE = (
    "{name} holds {n} images; at most {limit} are accepted in one request "
    f"({MAX_BATCH_ENV}); split the batch"
)
NOT_FINITE = (
    "{name} has {count} NaN or infinite value(s), the first in image {image} at "
    "(y, x, c) = {where}; every value must be a finite number in {range}"
)
OUT_OF_RANGE = (
    "{name} has values outside the model's value range {range}: min {low:.6g}, "
    "max {high:.6g}, the first bad one in image {image} at (y, x, c) = {where}; "
    "scale the pixels into {range} (0-255 values: divide by 255, or send uint8)"
)
HUGE_NUMBER = (
    "{name} holds a number too large for any float; values must lie in {range}"
)
NOT_NPY = (
    "{name} is not a .npy array ({reason}); write it with "
    "numpy.save(file, array, allow_pickle=False)"
)
NPY_OBJECTS = (
    "{name} holds Python objects (dtype {dtype}); pickled arrays are refused, "
    "send a plain numeric array"
)
NPY_LENGTH = (
    "{name} header says shape {shape} of {dtype} ({expected} bytes of data) but "
    "the file holds {actual} bytes of data; the upload is truncated or padded"
)
BODY_TOO_LARGE = (
    "request body is {size} bytes; at most {limit} bytes are accepted "
    f"({MAX_REQUEST_BYTES_ENV}); send fewer images per request"
)
BAD_PAIR = "{name} is {value!r}; expected a positive whole number or a pair [h, w]"
WINDOW_TOO_LARGE = "window {window} does not fit the {size} image; use at most {size}"
TOO_MANY_WINDOWS = (
    "window {window} with stride {stride} gives {rows} x {cols} = {count} windows "
    "over the {size} image; at most {limit} are allowed ({var}); use a larger "
    "window or stride"
)
BAD_TARGET = "target is {value!r}; expected null or a class index 0-{last} ({names})"
BAD_BASELINE = (
    "baseline_value is {value!r}; expected null or a finite number in {range}"
)


class RequestError(ValueError):
    """A request the service refuses; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = UNPROCESSABLE):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What requests may cost; read from the environment at start-up.

    ``max_batch`` images per predict request, ``max_request_bytes`` bytes of
    request body, ``max_explain_windows`` occlusion windows per explain
    request, ``max_concurrency`` requests in the server at once (more are
    answered 429).
    """

    max_batch: int = 4096
    max_request_bytes: int = 64 * 2**20
    max_explain_windows: int = 1024
    max_concurrency: int = 32

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Limits:
        """Limits from ``AUDIT_MAX_*`` variables; unset ones keep their defaults.

        Raises ``ValueError`` naming the variable when one is not a positive
        whole number, so a misconfigured server fails at start-up.
        """
        environ = os.environ if environ is None else environ
        defaults = cls()
        values = {}
        for field, var in (
            ("max_batch", MAX_BATCH_ENV),
            ("max_request_bytes", MAX_REQUEST_BYTES_ENV),
            ("max_explain_windows", MAX_EXPLAIN_WINDOWS_ENV),
            ("max_concurrency", MAX_CONCURRENCY_ENV),
        ):
            raw = environ.get(var)
            if raw is None or raw.strip() == "":
                values[field] = getattr(defaults, field)
                continue
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(BAD_LIMIT.format(var=var, value=raw)) from None
            if value < 1:
                raise ValueError(BAD_LIMIT.format(var=var, value=raw))
            values[field] = value
        return cls(**values)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class InputSpec:
    """What the model takes: ``input_shape`` (H, W, C), ``value_range``, classes."""

    input_shape: tuple[int, int, int]
    value_range: tuple[float, float]
    class_names: tuple[str, ...]

    @classmethod
    def from_model_card(cls, card: Mapping) -> InputSpec:
        """Read ``input_shape``, ``value_range`` and ``class_names`` of a model card.

        Raises ``ValueError`` naming the field when the card does not describe
        a usable image classifier.
        """
        shape = card.get("input_shape")
        if (
            not isinstance(shape, list | tuple)
            or len(shape) != 3
            or not all(isinstance(s, int) and s > 0 for s in shape)
        ):
            raise ValueError(
                BAD_CARD.format(field="input_shape", value=shape, expected="[H, W, C]")
            )
        value_range = card.get("value_range")
        if (
            not isinstance(value_range, list | tuple)
            or len(value_range) != 2
            or not all(isinstance(v, int | float) for v in value_range)
            or not np.isfinite(value_range).all()
            or not value_range[0] < value_range[1]
        ):
            raise ValueError(
                BAD_CARD.format(
                    field="value_range", value=value_range, expected="[low, high]"
                )
            )
        names = card.get("class_names")
        if not isinstance(names, list | tuple) or len(names) < 2:
            raise ValueError(
                BAD_CARD.format(
                    field="class_names", value=names, expected="two or more names"
                )
            )
        return cls(
            tuple(int(s) for s in shape),
            (float(value_range[0]), float(value_range[1])),
            tuple(str(n) for n in names),
        )

    @property
    def range_text(self) -> str:
        low, high = self.value_range
        return f"[{low:g}, {high:g}]"

    def expected_shapes(self, single: bool) -> str:
        h, w, c = self.input_shape
        forms = [f"({h}, {w}, {c})"]
        if c == 1:
            forms.append(f"({h}, {w})")
        if single:
            forms.append(f"(1, {h}, {w}, {c})")
            return "one image of shape " + " or ".join(forms)
        return f"(N, {h}, {w}, {c}) for a batch, or " + " or ".join(forms)


# -------------------------------------------------------------------- images


def as_batch(shape: tuple[int, ...], spec: InputSpec, name: str, single: bool):
    """The ``(N, H, W, C)`` shape for an array of ``shape``; 422 if it does not fit."""
    h, w, c = spec.input_shape
    if shape == (h, w, c):
        return (1, h, w, c)
    if c == 1 and shape == (h, w):
        return (1, h, w, c)
    if len(shape) == 4 and shape[1:] == (h, w, c) and (not single or shape[0] == 1):
        return shape
    raise RequestError(
        BAD_SHAPE.format(name=name, shape=shape, expected=spec.expected_shapes(single))
    )


def check_batch_size(n: int, limits: Limits, name: str) -> None:
    """422 for an empty batch, 413 for more than ``limits.max_batch`` images."""
    if n == 0:
        raise RequestError(EMPTY_BATCH.format(name=name))
    if n > limits.max_batch:
        raise RequestError(
            BATCH_TOO_LARGE.format(name=name, n=n, limit=limits.max_batch), TOO_LARGE
        )


def _first_position(mask: np.ndarray) -> tuple[int, tuple[int, ...]]:
    index = np.unravel_index(int(np.argmax(mask)), mask.shape)
    return int(index[0]), tuple(int(i) for i in index[1:])


def to_model_range(array: np.ndarray, spec: InputSpec, name: str) -> np.ndarray:
    """``float32`` copy of a numeric ``(N, H, W, C)`` array inside ``value_range``.

    ``uint8`` is scaled from 0-255 onto the range; other numbers are checked
    to be finite and inside the range (up to :data:`RANGE_TOLERANCE` of its
    width, then clipped).
    """
    low, high = spec.value_range
    if array.dtype == np.uint8:
        scale = np.float32((high - low) / 255.0)
        return array.astype(np.float32) * scale + np.float32(low)

    finite = np.isfinite(array)
    if not finite.all():
        image, where = _first_position(~finite)
        raise RequestError(
            NOT_FINITE.format(
                name=name,
                count=int((~finite).sum()),
                image=image,
                where=where,
                range=spec.range_text,
            )
        )
    slack = RANGE_TOLERANCE * (high - low)
    outside = (array < low - slack) | (array > high + slack)
    if outside.any():
        image, where = _first_position(outside)
        raise RequestError(
            OUT_OF_RANGE.format(
                name=name,
                range=spec.range_text,
                low=float(array.min()),
                high=float(array.max()),
                image=image,
                where=where,
            )
        )
    values = array.astype(np.float32)
    return np.clip(values, np.float32(low), np.float32(high), out=values)


def _check_dtype(dtype: np.dtype, kinds: str, spec: InputSpec, name: str) -> None:
    if dtype == np.uint8 or dtype.kind in kinds:
        return
    accepted = "numbers" if kinds == JSON_NUMBER_KINDS else "float16/32/64"
    raise RequestError(
        BAD_DTYPE.format(
            name=name, dtype=dtype, accepted=accepted, range=spec.range_text
        )
    )


def _numbers_only(array: np.ndarray, spec: InputSpec, name: str) -> np.ndarray:
    """float64 of an object array holding only numbers (JSON ints beyond int64)."""
    values = array.ravel().tolist()
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise RequestError(
            UNREADABLE.format(name=name, reason="values that are not numbers"),
            BAD_REQUEST,
        )
    try:
        return np.array(values, dtype=np.float64).reshape(array.shape)
    except OverflowError:
        raise RequestError(
            HUGE_NUMBER.format(name=name, range=spec.range_text)
        ) from None


def decode_images(
    value, spec: InputSpec, limits: Limits, *, name: str = "images", single=False
) -> np.ndarray:
    """Images sent as JSON (nested lists, or the array BentoML made of them).

    Parameters
    ----------
    value:
        Nested lists of numbers or an ndarray of shape ``(N, H, W, C)``, or one
        image ``(H, W, C)`` (``(H, W)`` when C is 1). Ints and floats are
        values in ``spec.value_range``; a ``uint8`` array holds 0-255 pixels.
    single:
        Accept exactly one image (also as ``(1, H, W, C)``).

    Returns
    -------
    ``float32`` array ``(N, H, W, C)`` inside ``spec.value_range``.
    """
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as e:
        raise RequestError(UNREADABLE.format(name=name, reason=e), BAD_REQUEST) from e
    if array.dtype == object:
        array = _numbers_only(array, spec, name)
    _check_dtype(array.dtype, JSON_NUMBER_KINDS, spec, name)
    shape = as_batch(array.shape, spec, name, single)
    check_batch_size(shape[0], limits, name)
    return to_model_range(array.reshape(shape), spec, name)


def _npy_header(data: bytes, name: str):
    if not data.startswith(NPY_MAGIC):
        reason = "empty upload" if not data else f"it starts with {data[:8]!r}"
        raise RequestError(NOT_NPY.format(name=name, reason=reason), BAD_REQUEST)
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"format version {version} is unknown")
    except Exception as e:  # numpy's header parser raises several kinds on junk
        raise RequestError(NOT_NPY.format(name=name, reason=e), BAD_REQUEST) from e
    if any(s < 0 for s in shape):
        reason = f"its header gives the negative shape {tuple(shape)}"
        raise RequestError(NOT_NPY.format(name=name, reason=reason), BAD_REQUEST)
    return tuple(shape), bool(fortran_order), dtype, fp.tell()


def decode_npy(
    data: bytes, spec: InputSpec, limits: Limits, *, name: str = "images"
) -> np.ndarray:
    """Images sent as the bytes of a ``.npy`` file.

    The header is checked (dtype, shape, batch size, data length) before any
    array is allocated, so a header claiming a huge shape costs nothing.
    Accepted dtypes: ``float16``, ``float32``, ``float64`` (values in
    ``spec.value_range``) and ``uint8`` (0-255 pixels); either byte order,
    C or Fortran layout. Pickled object arrays are refused.

    Returns a ``float32`` array ``(N, H, W, C)`` inside ``spec.value_range``.
    """
    if len(data) > limits.max_request_bytes:
        raise RequestError(
            BODY_TOO_LARGE.format(size=len(data), limit=limits.max_request_bytes),
            TOO_LARGE,
        )
    shape, fortran_order, dtype, offset = _npy_header(data, name)
    if dtype.hasobject:
        raise RequestError(NPY_OBJECTS.format(name=name, dtype=dtype), BAD_REQUEST)
    _check_dtype(dtype, FLOAT_KINDS, spec, name)
    batch_shape = as_batch(shape, spec, name, single=False)
    check_batch_size(batch_shape[0], limits, name)

    count = int(np.prod(shape, dtype=np.int64))
    expected = count * dtype.itemsize
    if len(data) - offset != expected:
        raise RequestError(
            NPY_LENGTH.format(
                name=name,
                shape=shape,
                dtype=dtype,
                expected=expected,
                actual=len(data) - offset,
            ),
            BAD_REQUEST,
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    array = flat.reshape(shape, order="F" if fortran_order else "C")
    return to_model_range(array.reshape(batch_shape), spec, name)


def check_body_size(size: int, limits: Limits) -> None:
    """413 when a body of ``size`` bytes exceeds ``limits.max_request_bytes``."""
    if size > limits.max_request_bytes:
        raise RequestError(
            BODY_TOO_LARGE.format(size=size, limit=limits.max_request_bytes), TOO_LARGE
        )


def check_content_length(value: str | None, limits: Limits) -> None:
    """A request's ``Content-Length`` header checked before its body is read:
    400 when it is not a whole number, 413 when it exceeds the limit."""
    if value is None:
        return
    try:
        size = int(value)
    except ValueError:
        raise RequestError(
            f"Content-Length {value!r} is not a number", BAD_REQUEST
        ) from None
    if size < 0:
        raise RequestError(f"Content-Length {value!r} is negative", BAD_REQUEST)
    check_body_size(size, limits)


async def read_body(chunks, limits: Limits) -> bytes:
    """The bytes of an async iterable of body chunks, refused with 413 as soon
    as they pass ``limits.max_request_bytes``, before the rest is read."""
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limits.max_request_bytes:
            limit = limits.max_request_bytes
            raise RequestError(
                BODY_TOO_LARGE.format(size=f"more than {limit}", limit=limit),
                TOO_LARGE,
            )
        parts.append(chunk)
    return b"".join(parts)


# ------------------------------------------------------------------- explain


@dataclass(frozen=True)
class ExplainSettings:
    """Validated explain parameters: window and stride ``(h, w)`` in pixels,
    the baseline value put into each window, the target class (None: the
    predicted class) and the ``(rows, cols)`` grid of windows."""

    window: tuple[int, int]
    stride: tuple[int, int]
    baseline_value: float
    target: int | None
    grid_shape: tuple[int, int]

    @property
    def n_windows(self) -> int:
        return self.grid_shape[0] * self.grid_shape[1]


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    items = value if isinstance(value, list | tuple) else [value, value]
    if len(items) != 2 or not all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1
        for v in items
    ):
        raise RequestError(BAD_PAIR.format(name=name, value=value))
    return int(items[0]), int(items[1])


def windows_along(size: int, window: int, stride: int) -> int:
    """Windows along an axis of ``size`` pixels: every ``stride`` from 0, plus
    one flush with the far edge when the strides do not end there."""
    last = size - window
    return last // stride + 1 + (1 if last % stride else 0)


def check_explain_settings(
    spec: InputSpec,
    limits: Limits,
    *,
    window=(6, 6),
    stride=(4, 4),
    baseline_value=None,
    target=None,
) -> ExplainSettings:
    """Validate explain parameters against the image size and the limits.

    ``window`` and ``stride`` are an int (square) or a pair ``(h, w)``; the
    window must fit the image, and the grid it makes may hold at most
    ``limits.max_explain_windows`` windows. ``baseline_value`` defaults to
    the low end of ``value_range`` and must lie inside it. ``target`` is
    None or a class index. Every failure is a 422.
    """
    h, w, _ = spec.input_shape
    window = _pair(window, "window")
    stride = _pair(stride, "stride")
    if window[0] > h or window[1] > w:
        raise RequestError(WINDOW_TOO_LARGE.format(window=list(window), size=(h, w)))
    rows = windows_along(h, window[0], stride[0])
    cols = windows_along(w, window[1], stride[1])
    if rows * cols > limits.max_explain_windows:
        raise RequestError(
            TOO_MANY_WINDOWS.format(
                window=list(window),
                stride=list(stride),
                rows=rows,
                cols=cols,
                count=rows * cols,
                size=(h, w),
                limit=limits.max_explain_windows,
                var=MAX_EXPLAIN_WINDOWS_ENV,
            )
        )

    low, high = spec.value_range
    if baseline_value is None:
        baseline = low
    elif (
        isinstance(baseline_value, int | float | np.number)
        and not isinstance(baseline_value, bool)
        and np.isfinite(baseline_value)
        and low <= baseline_value <= high
    ):
        baseline = float(baseline_value)
    else:
        raise RequestError(
            BAD_BASELINE.format(value=baseline_value, range=spec.range_text)
        )

    n_classes = len(spec.class_names)
    if target is not None and (
        not isinstance(target, int | np.integer)
        or isinstance(target, bool)
        or not 0 <= target < n_classes
    ):
        raise RequestError(
            BAD_TARGET.format(
                value=target, last=n_classes - 1, names=", ".join(spec.class_names)
            )
        )
    return ExplainSettings(
        window,
        stride,
        baseline,
        None if target is None else int(target),
        (rows, cols),
    )


# ---------------------------------------------------------------- body size


class BodySizeLimit:
    """ASGI middleware answering 413 to request bodies over ``max_bytes``.

    A declared ``Content-Length`` over the limit is refused before the body is
    read. A body without one (chunked) is read here up to the limit, then
    handed on; one byte over and it is refused. The answer is a JSON object
    ``{"error": message}``.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = None
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_error(
                        send, BAD_REQUEST, "Content-Length is not a number"
                    )
                    return
        if declared is not None:
            if declared > self.max_bytes:
                await self._refuse(send, declared)
                return
            await self.app(scope, receive, send)
            return

        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message]), send)
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(send, size, at_least=True)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replay = [
            {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        ]
        await self.app(scope, _replay(replay, receive), send)

    async def _refuse(self, send, size: int, at_least: bool = False):
        shown = f"more than {self.max_bytes}" if at_least else size
        message = BODY_TOO_LARGE.format(size=shown, limit=self.max_bytes)
        await _send_error(send, TOO_LARGE, message)


def _replay(messages, receive=None):
    pending = list(messages)

    async def replayed():
        if pending:
            return pending.pop(0)
        if receive is None:
            return {"type": "http.disconnect"}
        return await receive()

    return replayed


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
