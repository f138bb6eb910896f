"""Request validation: decoding, limits and explain settings, without BentoML."""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from audit.occlusion import WindowGrid
from bento_service.validation import (
    BAD_REQUEST,
    TOO_LARGE,
    UNPROCESSABLE,
    BodySizeLimit,
    InputSpec,
    Limits,
    RequestError,
    check_body_size,
    check_content_length,
    check_explain_settings,
    decode_images,
    decode_npy,
    read_body,
    windows_along,
)

MNIST = InputSpec((28, 28, 1), (0.0, 1.0), tuple(str(d) for d in range(10)))
TINY = InputSpec((2, 3, 1), (0.0, 1.0), ("a", "b", "c"))
RGB = InputSpec((2, 2, 3), (-1.0, 1.0), ("x", "y"))
LIMITS = Limits()
FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def npy_bytes(array, **kwargs) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)
    return buffer.getvalue()


def refused(status: int, *words: str):
    """Context manager: a RequestError with ``status`` whose message has ``words``."""

    class Check:
        def __enter__(self):
            self.raises = pytest.raises(RequestError)
            self.info = self.raises.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.raises.__exit__(*exc)
            error = self.info.value
            assert error.status == status, error.message
            for word in words:
                assert word in error.message, (word, error.message)
            return handled

    return Check()


# -------------------------------------------------------------------- limits


def test_limits_default_without_env():
    assert Limits.from_env({}) == Limits(4096, 64 * 2**20, 1024, 32)


def test_limits_read_from_env():
    env = {
        "AUDIT_MAX_BATCH": "8",
        "AUDIT_MAX_REQUEST_BYTES": "1000",
        "AUDIT_MAX_EXPLAIN_WINDOWS": " 49 ",
        "AUDIT_MAX_CONCURRENCY": "2",
    }
    assert Limits.from_env(env) == Limits(8, 1000, 49, 2)


@pytest.mark.parametrize("raw", ["0", "-3", "lots", "1.5"])
def test_limits_refuse_bad_env_naming_the_variable(raw):
    with pytest.raises(ValueError, match=f"AUDIT_MAX_BATCH={raw!r}"):
        Limits.from_env({"AUDIT_MAX_BATCH": raw})


# ---------------------------------------------------------------- model card


def test_input_spec_from_model_card():
    card = {
        "input_shape": [28, 28, 1],
        "value_range": [0, 1],
        "class_names": list("ab"),
    }
    spec = InputSpec.from_model_card(card)
    assert spec == InputSpec((28, 28, 1), (0.0, 1.0), ("a", "b"))
    assert spec.range_text == "[0, 1]"


@pytest.mark.parametrize(
    "field, value",
    [
        ("input_shape", [28, 28]),
        ("input_shape", [28, 0, 1]),
        ("value_range", [1, 0]),
        ("value_range", [0, float("nan")]),
        ("class_names", ["only"]),
    ],
)
def test_input_spec_refuses_unusable_cards(field, value):
    card = {
        "input_shape": [28, 28, 1],
        "value_range": [0, 1],
        "class_names": ["a", "b"],
    }
    card[field] = value
    with pytest.raises(ValueError, match=f"model card {field}"):
        InputSpec.from_model_card(card)


# ------------------------------------------------------------ JSON images


def test_batch_passes_through_as_float32():
    images = [[[[0.0], [0.5], [1.0]], [[0.25], [0.75], [0.125]]]]
    out = decode_images(images, TINY, LIMITS)
    assert out.dtype == np.float32
    assert out.shape == (1, 2, 3, 1)
    assert out[0, :, :, 0].tolist() == [[0.0, 0.5, 1.0], [0.25, 0.75, 0.125]]


@pytest.mark.parametrize(
    "shape", [(2, 3, 1), (2, 3)], ids=["one image HWC", "one image HW"]
)
def test_single_image_becomes_batch_of_one(shape):
    out = decode_images(np.full(shape, 0.5), TINY, LIMITS)
    assert out.shape == (1, 2, 3, 1)
    assert np.all(out == 0.5)


def test_json_ints_are_values_in_range():
    out = decode_images([[0, 1, 0], [1, 0, 1]], TINY, LIMITS)
    assert out[0, :, :, 0].tolist() == [[0, 1, 0], [1, 0, 1]]


def test_uint8_is_scaled_onto_value_range():
    pixels = np.array([[[0, 0, 0], [255, 255, 255]], [[51, 102, 153]] * 2], np.uint8)
    out = decode_images(pixels, RGB, LIMITS)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], [-1, -1, -1])
    np.testing.assert_allclose(out[0, 0, 1], [1, 1, 1])
    np.testing.assert_allclose(out[0, 1, 0], [-0.6, -0.2, 0.2], atol=1e-6)


@pytest.mark.parametrize(
    "shape",
    [(5, 28, 28), (2, 28, 28, 3), (28, 28, 3), (1, 28, 27, 1), (28,), ()],
)
def test_wrong_shape_is_422_naming_shape_and_expected(shape):
    with refused(UNPROCESSABLE, f"shape {shape}", "(N, 28, 28, 1)", "(28, 28)"):
        decode_images(np.zeros(shape), MNIST, LIMITS)


def test_explain_accepts_exactly_one_image():
    assert decode_images(np.zeros((1, 2, 3, 1)), TINY, LIMITS, single=True).shape == (
        1,
        2,
        3,
        1,
    )
    with refused(UNPROCESSABLE, "shape (2, 2, 3, 1)", "one image"):
        decode_images(np.zeros((2, 2, 3, 1)), TINY, LIMITS, name="image", single=True)


@pytest.mark.parametrize(
    "value, dtype",
    [([[True, False, True]] * 2, "bool"), ([["a", "b", "c"]] * 2, "<U1")],
)
def test_non_numbers_are_422_naming_dtype(value, dtype):
    with refused(UNPROCESSABLE, f"dtype {dtype}", "uint8"):
        decode_images(value, TINY, LIMITS)


@pytest.mark.parametrize(
    "value", [[[0.0, None, 1.0]] * 2, [[0.0, 0.5, 1.0], [0.0, 0.5]], [[0, [1], 2]]]
)
def test_unreadable_lists_are_400(value):
    with refused(BAD_REQUEST, "cannot be read"):
        decode_images(value, TINY, LIMITS)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_is_422_naming_where(bad):
    images = np.zeros((3, 2, 3, 1))
    images[2, 1, 0, 0] = bad
    images[2, 1, 2, 0] = bad
    with refused(UNPROCESSABLE, "2 NaN or infinite", "image 2", "(1, 0, 0)"):
        decode_images(images, TINY, LIMITS)


def test_out_of_range_is_422_naming_min_max_and_where():
    images = np.zeros((2, 2, 3, 1))
    images[1, 0, 2, 0] = 255.0
    images[0, 1, 1, 0] = -0.5
    with refused(UNPROCESSABLE, "min -0.5", "max 255", "image 0", "(1, 1, 0)"):
        decode_images(images, TINY, LIMITS)


def test_rounding_outside_range_is_clipped():
    images = np.full((1, 2, 3, 1), 1.0 + 1e-7)
    images[0, 0, 0, 0] = -1e-7
    out = decode_images(images, TINY, LIMITS)
    assert out.min() == 0.0 and out.max() == 1.0


def test_empty_batch_is_422():
    with refused(UNPROCESSABLE, "no images"):
        decode_images(np.zeros((0, 2, 3, 1)), TINY, LIMITS)


def test_batch_over_limit_is_413_naming_limit():
    with refused(TOO_LARGE, "holds 5 images", "at most 4", "AUDIT_MAX_BATCH"):
        decode_images(np.zeros((5, 2, 3, 1)), TINY, Limits(max_batch=4))
    assert (
        decode_images(np.zeros((4, 2, 3, 1)), TINY, Limits(max_batch=4)).shape[0] == 4
    )


# ------------------------------------------------------------------- .npy


@pytest.mark.parametrize("dtype", ["<f2", "<f4", "<f8", ">f4", ">f8"])
def test_npy_float_dtypes_round_trip(dtype):
    images = np.random.default_rng(0).random((4, 2, 3, 1)).astype(dtype)
    out = decode_npy(npy_bytes(images), TINY, LIMITS)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, images.astype(np.float32))


def test_npy_fortran_order_and_version_2_read_the_same():
    images = np.random.default_rng(1).random((3, 2, 3, 1)).astype(np.float32)
    fortran = npy_bytes(np.asfortranarray(images))
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, images, version=(2, 0))
    for data in (fortran, buffer.getvalue()):
        np.testing.assert_array_equal(decode_npy(data, TINY, LIMITS), images)


def test_npy_uint8_is_scaled():
    out = decode_npy(npy_bytes(np.full((2, 2, 3, 1), 255, np.uint8)), TINY, LIMITS)
    assert np.all(out == 1.0)


def test_npy_single_image_is_a_batch_of_one():
    out = decode_npy(npy_bytes(np.zeros((2, 3), np.float32)), TINY, LIMITS)
    assert out.shape == (1, 2, 3, 1)


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool", "complex64", "U3"])
def test_npy_other_dtypes_are_422(dtype):
    with refused(UNPROCESSABLE, "dtype", "float16/32/64", "uint8"):
        decode_npy(npy_bytes(np.zeros((1, 2, 3, 1), dtype)), TINY, LIMITS)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", ["empty upload"]),
        (b"PK\x03\x04 a zip file", ["not a .npy", "numpy.save"]),
        (b"\x93NUMPY\x01\x00\x10\x00{'descr'", ["not a .npy"]),
        (b"\x93NUMPY\x09\x00", ["not a .npy"]),
    ],
)
def test_npy_unreadable_bytes_are_400(data, words):
    with refused(BAD_REQUEST, *words):
        decode_npy(data, TINY, LIMITS)


def test_npy_pickled_objects_are_400():
    objects = np.empty((1, 2, 3, 1), dtype=object)
    with refused(BAD_REQUEST, "Python objects"):
        decode_npy(npy_bytes(objects, allow_pickle=True), TINY, LIMITS)


@pytest.mark.parametrize("change", [-4, 8])
def test_npy_truncated_or_padded_is_400(change):
    data = npy_bytes(np.zeros((2, 2, 3, 1), np.float32))
    data = data[:change] if change < 0 else data + b"\0" * change
    with refused(BAD_REQUEST, "truncated or padded", "48 bytes"):
        decode_npy(data, TINY, LIMITS)


def _header_only(shape) -> bytes:
    buffer = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def test_npy_header_claiming_a_huge_batch_is_413_before_allocating():
    with refused(TOO_LARGE, "holds 1000000000000 images"):
        decode_npy(_header_only((10**12, 2, 3, 1)), TINY, LIMITS)


def test_npy_negative_shape_is_400():
    with refused(BAD_REQUEST, "negative shape"):
        decode_npy(_header_only((-1, 2, 3, 1)), TINY, LIMITS)


def test_npy_body_over_limit_is_413():
    data = npy_bytes(np.zeros((4, 2, 3, 1), np.float32))
    with refused(TOO_LARGE, f"{len(data)} bytes", "AUDIT_MAX_REQUEST_BYTES"):
        decode_npy(data, TINY, Limits(max_request_bytes=len(data) - 1))
    with refused(TOO_LARGE, "at most 10 bytes"):
        check_body_size(11, Limits(max_request_bytes=10))
    check_body_size(10, Limits(max_request_bytes=10))


# ---------------------------------------------------------- explain settings


def test_explain_defaults():
    got = check_explain_settings(MNIST, LIMITS)
    assert (got.window, got.stride, got.grid_shape) == ((6, 6), (4, 4), (7, 7))
    assert got.n_windows == 49
    assert got.baseline_value == 0.0
    assert got.target is None


def test_explain_square_window_from_int_and_explicit_values():
    got = check_explain_settings(
        MNIST, LIMITS, window=7, stride=[7, 3], baseline_value=0.5, target=3
    )
    assert got.window == (7, 7) and got.stride == (7, 3)
    assert got.grid_shape == (4, 8)
    assert got.baseline_value == 0.5 and got.target == 3


@pytest.mark.parametrize(
    "size, window, stride, expected",
    [(28, 6, 4, 7), (28, 28, 1, 1), (5, 2, 2, 3), (5, 5, 3, 1), (4, 2, 2, 2)],
)
def test_windows_along_by_hand(size, window, stride, expected):
    assert windows_along(size, window, stride) == expected


@pytest.mark.parametrize("height, width", [(28, 28), (7, 5), (1, 9)])
def test_window_count_matches_the_occlusion_engine(height, width):
    for wh in range(1, height + 1):
        for ww in range(1, width + 1, 2):
            for stride in ((1, 1), (2, 3), (4, 4), (wh, ww)):
                grid = WindowGrid((height, width), (wh, ww), stride)
                rows = windows_along(height, wh, stride[0])
                cols = windows_along(width, ww, stride[1])
                assert grid.shape == (rows, cols)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"window": 29}, ["window [29, 29]", "(28, 28)"]),
        ({"window": [6, 30]}, ["window [6, 30]"]),
        ({"window": 0}, ["window is 0"]),
        ({"window": True}, ["window is True"]),
        ({"window": 2.5}, ["window is 2.5"]),
        ({"window": [2, 2, 2]}, ["window is [2, 2, 2]"]),
        ({"stride": 0}, ["stride is 0"]),
        ({"stride": [-1, 2]}, ["stride is [-1, 2]"]),
        ({"window": 1, "stride": 1}, ["784 windows", "AUDIT_MAX_EXPLAIN_WINDOWS"]),
        ({"baseline_value": 2.0}, ["baseline_value is 2.0", "[0, 1]"]),
        ({"baseline_value": float("nan")}, ["baseline_value is nan"]),
        ({"target": 10}, ["target is 10", "0-9"]),
        ({"target": -1}, ["target is -1"]),
        ({"target": False}, ["target is False"]),
    ],
)
def test_explain_settings_out_of_bounds_are_422(kwargs, words):
    with refused(UNPROCESSABLE, *words):
        check_explain_settings(MNIST, Limits(max_explain_windows=700), **kwargs)


# ------------------------------------------------------------------- fuzzing

json_numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 0.5, 0.0, 1.0]),
)
json_leaves = st.one_of(json_numbers, st.booleans(), st.none(), st.text(max_size=3))
json_values = st.recursive(
    json_leaves, lambda inner: st.lists(inner, max_size=4), max_leaves=40
)


def _valid_output(out, spec, limits):
    assert out.dtype == np.float32
    assert out.ndim == 4 and out.shape[1:] == spec.input_shape
    assert 1 <= len(out) <= limits.max_batch
    low, high = spec.value_range
    assert np.isfinite(out).all() and out.min() >= low and out.max() <= high


@FUZZ
@given(json_values)
def test_fuzz_json_decoding_answers_or_refuses(value):
    spec = InputSpec((2, 2, 1), (0.0, 1.0), ("a", "b"))
    limits = Limits(max_batch=3)
    try:
        out = decode_images(value, spec, limits)
    except RequestError as e:
        assert e.status in (BAD_REQUEST, TOO_LARGE, UNPROCESSABLE)
        assert e.message
    else:
        _valid_output(out, spec, limits)


@FUZZ
@given(
    st.lists(
        st.lists(
            st.lists(
                st.lists(json_numbers, min_size=1, max_size=1), min_size=2, max_size=2
            ),
            min_size=2,
            max_size=2,
        ),
        max_size=4,
    )
)
def test_fuzz_well_shaped_json_batches(value):
    spec = InputSpec((2, 2, 1), (0.0, 1.0), ("a", "b"))
    limits = Limits(max_batch=3)
    try:
        out = decode_images(value, spec, limits)
    except RequestError as e:
        assert e.status in (TOO_LARGE, UNPROCESSABLE), e.message
    else:
        _valid_output(out, spec, limits)
        expected = np.clip(np.asarray(value, dtype=np.float32), 0, 1)
        assert np.array_equal(out, expected)


@FUZZ
@given(
    hnp.arrays(
        dtype=st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes()),
        shape=hnp.array_shapes(min_dims=0, max_dims=5, max_side=3),
    )
)
def test_fuzz_arrays_of_any_dtype_and_shape(array):
    spec = InputSpec((2, 2, 1), (0.0, 1.0), ("a", "b"))
    for decode in (
        lambda: decode_images(array, spec, LIMITS),
        lambda: decode_npy(npy_bytes(array), spec, LIMITS),
    ):
        try:
            out = decode()
        except RequestError as e:
            assert e.status in (BAD_REQUEST, TOO_LARGE, UNPROCESSABLE)
        else:
            _valid_output(out, spec, LIMITS)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes_are_never_a_crash(data):
    try:
        out = decode_npy(data, TINY, LIMITS)
    except RequestError as e:
        assert e.status in (BAD_REQUEST, TOO_LARGE, UNPROCESSABLE)
    else:
        _valid_output(out, TINY, LIMITS)


@FUZZ
@given(
    hnp.arrays(np.float32, (2, 2, 3, 1), elements=st.floats(0, 1, width=32)),
    st.data(),
)
def test_fuzz_mutated_npy_files(images, data):
    raw = bytearray(npy_bytes(images))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        out = decode_npy(bytes(raw[:cut]), TINY, LIMITS)
    except RequestError as e:
        assert e.status in (BAD_REQUEST, TOO_LARGE, UNPROCESSABLE)
    else:
        _valid_output(out, TINY, LIMITS)


@FUZZ
@given(hnp.arrays(np.float32, (3, 2, 3, 1), elements=st.floats(0, 1, width=32)))
def test_fuzz_valid_npy_round_trips(images):
    np.testing.assert_array_equal(decode_npy(npy_bytes(images), TINY, LIMITS), images)


@FUZZ
@given(
    window=st.one_of(st.integers(-3, 40), st.lists(st.integers(-3, 40), max_size=3)),
    stride=st.one_of(st.integers(-3, 40), st.lists(st.integers(-3, 40), max_size=3)),
    baseline=st.one_of(st.none(), st.floats()),
    target=st.one_of(st.none(), st.integers(-5, 15)),
)
def test_fuzz_explain_settings_stay_bounded(window, stride, baseline, target):
    limits = Limits(max_explain_windows=100)
    try:
        got = check_explain_settings(
            MNIST,
            limits,
            window=window,
            stride=stride,
            baseline_value=baseline,
            target=target,
        )
    except RequestError as e:
        assert e.status == UNPROCESSABLE
    else:
        assert 1 <= got.n_windows <= 100
        grid = WindowGrid((28, 28), got.window, got.stride)
        assert grid.shape == got.grid_shape
        assert 0.0 <= got.baseline_value <= 1.0


# -------------------------------------------------------- body size middleware


def _run_middleware(limit, headers, chunks):
    """Send a request through BodySizeLimit; return (app got body, status, body)."""
    seen = {}

    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        seen["body"] = body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    incoming = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    sent = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers}
    asyncio.run(BodySizeLimit(app, max_bytes=limit)(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return seen.get("body"), sent[0]["status"], body


def test_declared_length_over_limit_is_413_without_calling_the_app():
    got, status, body = _run_middleware(10, [(b"content-length", b"11")], [b"x" * 11])
    assert got is None and status == 413
    assert "11 bytes" in json.loads(body)["error"]


def test_declared_length_within_limit_passes():
    got, status, _ = _run_middleware(10, [(b"content-length", b"10")], [b"x" * 10])
    assert got == b"x" * 10 and status == 200


def test_chunked_body_over_limit_is_413():
    got, status, body = _run_middleware(10, [], [b"x" * 6, b"x" * 6])
    assert got is None and status == 413
    assert "more than 10 bytes" in json.loads(body)["error"]


def test_chunked_body_within_limit_reaches_the_app_whole():
    got, status, _ = _run_middleware(10, [], [b"ab", b"cd", b"ef"])
    assert got == b"abcdef" and status == 200


def test_unreadable_content_length_is_400():
    _, status, body = _run_middleware(10, [(b"content-length", b"ten")], [b""])
    assert status == 400 and "Content-Length" in json.loads(body)["error"]


def test_non_http_scopes_pass_untouched():
    called = []

    async def app(scope, receive, send):
        called.append(scope["type"])

    asyncio.run(BodySizeLimit(app, max_bytes=1)({"type": "lifespan"}, None, None))
    assert called == ["lifespan"]


# ------------------------------------------------ streamed body and its length


def test_content_length_is_checked_before_the_body():
    limits = Limits(max_request_bytes=10)
    check_content_length(None, limits)
    check_content_length("10", limits)
    with pytest.raises(RequestError, match="11 bytes; at most 10") as info:
        check_content_length("11", limits)
    assert info.value.status == TOO_LARGE
    for bad in ("ten", "-1"):
        with pytest.raises(RequestError, match="Content-Length") as info:
            check_content_length(bad, limits)
        assert info.value.status == BAD_REQUEST


def _stream(chunks, consumed):
    async def generate():
        for chunk in chunks:
            consumed.append(chunk)
            yield chunk

    return generate()


def test_read_body_joins_chunks_up_to_the_limit():
    consumed = []
    body = asyncio.run(
        read_body(
            _stream([b"abc", b"", b"defg"], consumed), Limits(max_request_bytes=7)
        )
    )
    assert body == b"abcdefg"


def test_read_body_stops_at_the_first_chunk_over_the_limit():
    consumed = []
    chunks = [b"x" * 6, b"x" * 6, b"x" * 6]
    with pytest.raises(RequestError, match="more than 10 bytes") as info:
        asyncio.run(read_body(_stream(chunks, consumed), Limits(max_request_bytes=10)))
    assert info.value.status == TOO_LARGE
    assert len(consumed) == 2  # the third chunk is never read
