"""The BentoML service class called directly: every API and every refusal."""

from __future__ import annotations

import asyncio
import importlib
import io
import json
import os
import sys
from http import HTTPStatus

import numpy as np
import pytest
from bentoml.exceptions import BadInput, InvalidArgument

from audit.backends import load_backend
from audit.occlusion import OcclusionSettings
from audit.occlusion import explain as occlusion_explain
from bento_service.validation import Limits, RequestError

TAG_ENV = "AUDIT_MODEL_TAG"


@pytest.fixture(scope="module")
def service_module(stored_model):
    """``bento_service.service`` imported with the test model's tag."""
    previous = os.environ.get(TAG_ENV)
    os.environ[TAG_ENV] = stored_model
    module = sys.modules.get("bento_service.service")
    module = (
        importlib.reload(module)
        if module
        else importlib.import_module("bento_service.service")
    )
    yield module
    if previous is None:
        os.environ.pop(TAG_ENV, None)
    else:
        os.environ[TAG_ENV] = previous


@pytest.fixture(scope="module")
def svc(service_module):
    """One instance of the service, its model loaded from the private store."""
    return service_module.MnistClassifier()


@pytest.fixture(scope="module")
def digits():
    """32 MNIST test images, float32 (32, 28, 28, 1) in [0, 1], and labels."""
    from audit.datasets import load_mnist_arrays

    images, labels = load_mnist_arrays("test")
    return images[:32].astype(np.float32)[..., None] / np.float32(255), labels[:32]


def npy_file(tmp_path, array, name="images.npy"):
    path = tmp_path / name
    np.save(path, array, allow_pickle=False)
    return path


def refused(status: HTTPStatus, *words: str):
    """pytest.raises for a refusal answered with ``status``, message holding words."""

    class Check:
        def __enter__(self):
            self.raises = pytest.raises(InvalidArgument)
            self.info = self.raises.__enter__()

        def __exit__(self, *exc):
            handled = self.raises.__exit__(*exc)
            error = self.info.value
            assert error.error_code == status, (error.error_code, error.message)
            for word in words:
                assert word in error.message, (word, error.message)
            return handled

    return Check()


# ---------------------------------------------------------------- metadata


def test_metadata_is_the_stored_model_card(svc, stored_model):
    got = svc.metadata()
    assert got["tag"] == stored_model
    card = got["metadata"]
    assert card["input_shape"] == [28, 28, 1]
    assert card["value_range"] == [0.0, 1.0]
    assert card["class_names"] == [str(d) for d in range(10)]
    assert got["limits"] == Limits.from_env().as_dict()
    json.dumps(got)


# ----------------------------------------------------------------- predict


def test_predict_matches_the_model(svc, small_model, digits):
    images, labels = digits
    got = svc.predict(images=images)
    expected = small_model.predict_on_batch(images)
    probabilities = np.asarray(got["probabilities"])
    assert probabilities.shape == (32, 10)
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert got["labels"] == expected.argmax(axis=1).tolist()
    assert got["class_names"] == [str(d) for d in range(10)]
    assert np.mean(np.asarray(got["labels"]) == labels) > 0.7
    json.dumps(got)


@pytest.mark.parametrize("batch", [1, 3, 32])
def test_predict_same_answer_for_any_batch_size(svc, digits, batch):
    images = digits[0]
    whole = np.asarray(svc.predict(images=images)["probabilities"])
    parts = [
        svc.predict(images=images[s : s + batch])["probabilities"]
        for s in range(0, len(images), batch)
    ]
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-6)


def test_predict_single_image_forms_and_nested_lists(svc, digits):
    image = digits[0][0]
    expected = svc.predict(images=image[None])["probabilities"]
    for form in (image, image[..., 0], image.tolist(), image[..., 0].tolist()):
        got = svc.predict(images=form)["probabilities"]
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_predict_uint8_is_read_as_pixels(svc, digits):
    pixels = np.round(digits[0][:4] * 255).astype(np.uint8)
    as_float = pixels.astype(np.float32) / 255
    np.testing.assert_allclose(
        svc.predict(images=pixels)["probabilities"],
        svc.predict(images=as_float)["probabilities"],
        atol=1e-6,
    )


# ------------------------------------------------------------- predict_npy


@pytest.mark.parametrize("dtype", ["float32", "float64", "uint8"])
def test_predict_npy_matches_predict(svc, digits, tmp_path, dtype):
    images = digits[0][:8]
    if dtype == "uint8":
        sent = np.round(images * 255).astype(np.uint8)
        images = sent.astype(np.float32) / np.float32(255)
    else:
        sent = images.astype(dtype)
    expected = svc.predict(images=images)
    got = svc.predict_npy(images=npy_file(tmp_path, sent))
    np.testing.assert_allclose(
        got["probabilities"], expected["probabilities"], atol=1e-5
    )
    assert got["labels"] == expected["labels"]


# ---------------------------------------------------------- predict_binary


def npy_body(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize("dtype", ["float32", "float64", "uint8"])
def test_predict_binary_body_matches_predict(svc, digits, dtype):
    images = digits[0][:8]
    if dtype == "uint8":
        sent = np.round(images * 255).astype(np.uint8)
        images = sent.astype(np.float32) / np.float32(255)
    else:
        sent = images.astype(dtype)
    answer = svc.predict_binary_body(npy_body(sent))
    probabilities = np.load(io.BytesIO(answer), allow_pickle=False)
    assert probabilities.dtype == np.float32 and probabilities.shape == (8, 10)
    expected = svc.predict(images=images)["probabilities"]
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def test_predict_binary_body_refusals_carry_their_status(svc, monkeypatch):
    wrong = npy_body(np.zeros((2, 28, 28, 3), np.float32))
    with pytest.raises(RequestError, match=r"shape \(2, 28, 28, 3\)") as info:
        svc.predict_binary_body(wrong)
    assert info.value.status == HTTPStatus.UNPROCESSABLE_ENTITY
    monkeypatch.setattr(svc, "limits", Limits(max_request_bytes=1000))
    with pytest.raises(RequestError, match="AUDIT_MAX_REQUEST_BYTES") as info:
        svc.predict_binary_body(npy_body(np.zeros((4, 28, 28, 1), np.float32)))
    assert info.value.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE


def test_metadata_advertises_the_binary_endpoint(svc, service_module):
    path = svc.metadata()["endpoints"]["predict_binary"]
    assert path == service_module.BINARY_PATH == "/predict_binary"


# ----------------------------------------------------------------- explain


def test_explain_runs_the_audit_engine(svc, small_model, digits):
    image = digits[0][0]
    got = svc.explain(image=image)
    assert got["window"] == [6, 6] and got["stride"] == [4, 4]
    assert got["grid_shape"] == [7, 7]
    assert got["forward_passes"] == 50
    assert np.asarray(got["window_scores"]).shape == (7, 7)
    assert np.asarray(got["map"]).shape == (28, 28)
    assert got["target"] == got["predicted"] == int(np.argmax(got["probabilities"]))
    assert got["target_name"] == str(got["target"])
    assert got["baseline_value"] == 0.0

    backend = load_backend(small_model, class_names=[str(d) for d in range(10)])
    direct = occlusion_explain(
        backend, image[None], settings=OcclusionSettings(window=6, stride=4)
    )
    np.testing.assert_allclose(
        np.asarray(got["window_scores"]).ravel(), direct.window_scores[0], atol=1e-6
    )
    np.testing.assert_allclose(got["map"], direct.maps[0], atol=1e-6)
    assert got["max_drop"] == pytest.approx(float(direct.max_drop[0]), abs=1e-6)
    assert got["flipped"] == bool(direct.flipped[0])
    json.dumps(got)


def test_explain_whole_image_window_by_hand(svc, small_model, digits):
    """One window covering the image: its score is p(target | image) minus
    p(target | image filled with the baseline)."""
    image = digits[0][1]
    got = svc.explain(image=image, target=4, window=28, stride=1, baseline_value=0.25)
    assert got["target"] == 4 and got["grid_shape"] == [1, 1]
    assert got["forward_passes"] == 2
    p_image = small_model.predict_on_batch(image[None])[0, 4]
    p_flat = small_model.predict_on_batch(np.full((1, 28, 28, 1), 0.25, np.float32))
    expected = p_image - p_flat[0, 4]
    assert got["window_scores"] == [[pytest.approx(float(expected), abs=1e-6)]]
    np.testing.assert_allclose(got["map"], np.full((28, 28), expected), atol=1e-6)


def test_explain_non_square_window_and_stride(svc, digits):
    got = svc.explain(image=digits[0][2], window=(7, 5), stride=(7, 3))
    assert got["grid_shape"] == [4, 9]
    assert got["forward_passes"] == 37


# ------------------------------------------------------------------ errors


def test_wrong_shape_is_422(svc):
    with refused(
        HTTPStatus.UNPROCESSABLE_ENTITY, "shape (2, 28, 28, 3)", "(N, 28, 28, 1)"
    ):
        svc.predict(images=np.zeros((2, 28, 28, 3), np.float32))


def test_wrong_dtype_is_422(svc, tmp_path):
    with refused(HTTPStatus.UNPROCESSABLE_ENTITY, "dtype bool"):
        svc.predict(images=np.zeros((1, 28, 28, 1), bool))
    with refused(HTTPStatus.UNPROCESSABLE_ENTITY, "dtype int64", "uint8"):
        svc.predict_npy(images=npy_file(tmp_path, np.zeros((1, 28, 28, 1), np.int64)))


def test_values_outside_range_are_422(svc):
    images = np.zeros((2, 28, 28, 1), np.float32)
    images[1, 3, 4, 0] = 255
    with refused(HTTPStatus.UNPROCESSABLE_ENTITY, "max 255", "image 1", "(3, 4, 0)"):
        svc.predict(images=images)


def test_nan_is_422(svc, tmp_path):
    images = np.zeros((2, 28, 28, 1), np.float32)
    images[0, 0, 5, 0] = np.nan
    with refused(HTTPStatus.UNPROCESSABLE_ENTITY, "1 NaN or infinite", "image 0"):
        svc.predict(images=images)
    with refused(HTTPStatus.UNPROCESSABLE_ENTITY, "NaN"):
        svc.predict_npy(images=npy_file(tmp_path, images))


def test_oversize_batch_is_413(svc):
    images = np.zeros((svc.limits.max_batch + 1, 28, 28, 1), np.uint8)
    with refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "AUDIT_MAX_BATCH"):
        svc.predict(images=images)


def test_oversize_upload_is_413(svc, tmp_path, monkeypatch):
    path = npy_file(tmp_path, np.zeros((4, 28, 28, 1), np.float32))
    monkeypatch.setattr(svc, "limits", Limits(max_request_bytes=1000))
    with refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "AUDIT_MAX_REQUEST_BYTES"):
        svc.predict_npy(images=path)


def test_upload_that_is_not_npy_is_400(svc, tmp_path):
    path = tmp_path / "images.npy"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not an array")
    with refused(HTTPStatus.BAD_REQUEST, "not a .npy array", "numpy.save"):
        svc.predict_npy(images=path)


def test_ragged_lists_are_400(svc):
    with refused(HTTPStatus.BAD_REQUEST, "cannot be read"):
        svc.predict(images=[[0.0] * 28] * 27 + [[0.0] * 27])


def test_explain_refuses_bad_settings(svc, digits, monkeypatch):
    image = digits[0][0]
    with refused(HTTPStatus.UNPROCESSABLE_ENTITY, "window [29, 29]"):
        svc.explain(image=image, window=29)
    with refused(HTTPStatus.UNPROCESSABLE_ENTITY, "target is 10"):
        svc.explain(image=image, target=10)
    with refused(HTTPStatus.UNPROCESSABLE_ENTITY, "baseline_value is 2.0"):
        svc.explain(image=image, baseline_value=2.0)
    with refused(HTTPStatus.UNPROCESSABLE_ENTITY, "one image"):
        svc.explain(image=digits[0][:2])
    monkeypatch.setattr(svc, "limits", Limits(max_explain_windows=100))
    with refused(HTTPStatus.UNPROCESSABLE_ENTITY, "784 windows", "at most 100"):
        svc.explain(image=image, window=1, stride=1)


def test_missing_model_names_the_tag_and_the_fix(service_module, monkeypatch):
    import bentoml

    inner = service_module.MnistClassifier.inner
    monkeypatch.setattr(inner, "model_ref", bentoml.models.BentoModel("absent:v1"))
    with pytest.raises(RuntimeError, match="absent:v1.*bento_service.train"):
        inner()


def test_url_in_place_of_a_file_is_refused(service_module):
    from _bentoml_impl import serde

    with pytest.raises(BadInput, match="uploaded as a file"), serde.make_safe_connect():
        pass


# ------------------------------------------------------- error body middleware


def _through_error_object(status, content_type, body):
    from bento_service.service import ErrorObjectBody

    async def app(scope, receive, send):
        headers = [
            (b"content-type", content_type),
            (b"content-length", b"%d" % len(body)),
        ]
        await send(
            {"type": "http.response.start", "status": status, "headers": headers}
        )
        await send({"type": "http.response.body", "body": body[:3], "more_body": True})
        await send({"type": "http.response.body", "body": body[3:]})

    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(ErrorObjectBody(app)({"type": "http"}, None, send))
    headers = dict(sent[0]["headers"])
    body = b"".join(m.get("body", b"") for m in sent[1:])
    assert int(headers[b"content-length"]) == len(body)
    return sent[0]["status"], body


def test_4xx_list_body_becomes_an_object():
    status, body = _through_error_object(422, b"application/json", b'[{"error": "x"}]')
    assert status == 422 and json.loads(body) == {"error": "x"}


@pytest.mark.parametrize(
    "status, content_type, body",
    [
        (200, b"application/json", b"[[0.5, 0.5]]"),
        (400, b"application/json", b'{"error": "y", "detail": []}'),
        (404, b"text/plain", b"not found"),
    ],
)
def test_other_responses_pass_untouched(status, content_type, body):
    assert _through_error_object(status, content_type, body) == (status, body)


# ------------------------------------------------------------ refusal logging


def _record_for(error: BaseException):
    import logging

    try:
        raise error
    except BaseException:
        exc_info = sys.exc_info()
    return logging.LogRecord(
        "bentoml._internal.server.http_app",
        logging.ERROR,
        __file__,
        1,
        "Exception on %s [%s]",
        ("/predict", "POST"),
        exc_info,
    )


def test_refusals_are_logged_as_one_warning_line(service_module):
    import logging

    error = service_module.RequestRefused(
        "images has shape (2, 2)", error_code=HTTPStatus.UNPROCESSABLE_ENTITY
    )
    record = _record_for(error)
    assert service_module.ClientErrorLog().filter(record)
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage() == (
        "refused /predict [POST] with 422: images has shape (2, 2)"
    )


def test_server_faults_keep_their_traceback(service_module):
    import logging

    record = _record_for(RuntimeError("model exploded"))
    assert service_module.ClientErrorLog().filter(record)
    assert record.levelno == logging.ERROR and record.exc_info is not None
