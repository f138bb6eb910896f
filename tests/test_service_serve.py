"""The service under a real ``bentoml serve`` on loopback, called over HTTP."""

from __future__ import annotations

import importlib.util
import io
import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

pytestmark = [pytest.mark.serve, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
MAX_REQUEST_BYTES = 2 * 2**20


def _load_test_module():
    """``benchmarks/load_test.py`` (a script, not a package) as a module."""
    name = "benchmarks_load_test"
    if name not in sys.modules:
        path = REPO / "benchmarks" / "load_test.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


load_test = _load_test_module()


@pytest.fixture(scope="session")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("serve") / "bentoml-serve.log"


@pytest.fixture(scope="session")
def server(stored_model, bentoml_home, server_log):
    """Base URL of ``bentoml serve`` running the test model from the private store.

    The request body limit is lowered to 2 MiB so the 413 path is cheap to
    reach. The server's process group is stopped when the session ends.
    """
    log = server_log
    env = dict(os.environ)
    env.update(
        BENTOML_HOME=str(bentoml_home),
        AUDIT_MODEL_TAG=stored_model,
        AUDIT_MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES),
    )
    with load_test.served(env, log=log) as url:
        yield url


@pytest.fixture(scope="session")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as session:
        yield session


@pytest.fixture(scope="module")
def digits():
    from audit.datasets import load_mnist_arrays

    images, labels = load_mnist_arrays("test")
    return images[:64].astype(np.float32)[..., None] / np.float32(255), labels[:64]


def npy_upload(array) -> dict:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return {"images": ("images.npy", buffer.getvalue(), "application/octet-stream")}


BINARY = "/predict_binary"
OCTET_STREAM = {"content-type": "application/octet-stream"}


def npy_body(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def post_binary(client, body: bytes, headers=None):
    return client.post(BINARY, content=body, headers=headers or OCTET_STREAM)


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict) and isinstance(body["error"], str), body
    return body["error"]


def test_readyz_and_metadata(client, stored_model):
    assert client.get("/readyz").status_code == 200
    card = client.post("/metadata", json={}).json()
    assert card["tag"] == stored_model
    assert card["metadata"]["input_shape"] == [28, 28, 1]
    assert card["limits"]["max_request_bytes"] == MAX_REQUEST_BYTES
    assert card["endpoints"] == {"predict_binary": BINARY}


def test_predict_json_and_npy_agree_with_the_model(client, small_model, digits):
    images = digits[0][:16]
    expected = small_model.predict_on_batch(images)
    by_json = client.post("/predict", json={"images": images.tolist()})
    by_npy = client.post("/predict_npy", files=npy_upload(images))
    for response in (by_json, by_npy):
        assert response.status_code == 200, response.text
        body = response.json()
        np.testing.assert_allclose(body["probabilities"], expected, atol=1e-5)
        assert body["labels"] == expected.argmax(axis=1).tolist()
        assert body["class_names"] == [str(d) for d in range(10)]


def test_predict_npy_uint8(client, digits):
    pixels = np.round(digits[0][:4] * 255).astype(np.uint8)
    scaled = pixels.astype(np.float32) / np.float32(255)
    by_uint8 = client.post("/predict_npy", files=npy_upload(pixels)).json()
    by_float = client.post("/predict_npy", files=npy_upload(scaled)).json()
    np.testing.assert_allclose(
        by_uint8["probabilities"], by_float["probabilities"], atol=1e-6
    )


def test_predict_binary_agrees_with_the_model(client, small_model, digits):
    images = digits[0][:16]
    response = post_binary(client, npy_body(images))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    probabilities = np.load(io.BytesIO(response.content), allow_pickle=False)
    assert probabilities.dtype == np.float32 and probabilities.shape == (16, 10)
    np.testing.assert_allclose(
        probabilities, small_model.predict_on_batch(images), atol=1e-5
    )
    by_npy = client.post("/predict_npy", files=npy_upload(images)).json()
    np.testing.assert_allclose(probabilities, by_npy["probabilities"], atol=1e-6)


def test_predict_binary_uint8_and_single_image(client, digits):
    pixels = np.round(digits[0][:4] * 255).astype(np.uint8)
    scaled = pixels.astype(np.float32) / np.float32(255)
    answers = [
        np.load(io.BytesIO(post_binary(client, npy_body(a)).content))
        for a in (pixels, scaled, scaled[0, ..., 0])
    ]
    np.testing.assert_allclose(answers[0], answers[1], atol=1e-6)
    np.testing.assert_allclose(answers[2], answers[1][:1], atol=1e-6)


def _npy_header_only(shape) -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    return header.getvalue()


def _with_nan() -> bytes:
    images = np.zeros((3, 28, 28, 1), np.float32)
    images[2, 7, 8, 0] = np.nan
    return npy_body(images)


@pytest.mark.parametrize(
    "body, headers, status, words",
    [
        (npy_body(np.zeros((2, 28, 28, 3), np.float32)), None, 422, ["(2, 28, 28, 3)"]),
        (npy_body(np.zeros((1, 28, 28, 1), np.int16)), None, 422, ["dtype int16"]),
        (_with_nan(), None, 422, ["NaN", "image 2"]),
        (npy_body(np.full((1, 28, 28, 1), 7.0)), None, 422, ["max 7", "[0, 1]"]),
        (npy_body(np.zeros((0, 28, 28, 1), np.float32)), None, 422, ["no images"]),
        (_npy_header_only((5000, 28, 28, 1)), None, 413, ["5000 images"]),
        (_npy_header_only((2, 28, 28, 1)), None, 400, ["truncated"]),
        (b"GIF89a", None, 400, ["not a .npy"]),
        (
            npy_body(np.zeros((1, 28, 28, 1), np.float32)),
            {"content-type": "multipart/form-data; boundary=x"},
            415,
            ["application/octet-stream", "/predict_npy"],
        ),
    ],
)
def test_bad_binary_requests_get_4xx_with_a_message(
    client, body, headers, status, words
):
    message = error_of(post_binary(client, body, headers), status)
    for word in words:
        assert word in message, (word, message)


def test_pickled_binary_upload_is_400_and_never_unpickled(client):
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    message = error_of(post_binary(client, buffer.getvalue()), 400)
    assert "Python objects" in message


def test_oversize_binary_body_is_413_before_it_is_sent(server):
    """The server answers 413 on the declared Content-Length alone: only the
    request head is sent, and the answer comes without the body."""
    address = urlsplit(server)
    head = (
        f"POST {BINARY} HTTP/1.1\r\nHost: {address.netloc}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Length: {10 * MAX_REQUEST_BYTES}\r\n\r\n"
    ).encode()
    with socket.create_connection((address.hostname, address.port), timeout=10) as s:
        s.sendall(head)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 413 " in status_line, answer
    assert b"AUDIT_MAX_REQUEST_BYTES" in rest


def test_chunked_oversize_binary_body_is_413(client):
    def chunks():
        for _ in range(3):
            yield b" " * 2**20

    response = client.post(BINARY, content=chunks(), headers=OCTET_STREAM)
    assert "more than" in error_of(response, 413)


def test_explain_over_http(client, digits):
    image = digits[0][0]
    response = client.post(
        "/explain", json={"image": image.tolist(), "window": [7, 7], "stride": 7}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["grid_shape"] == [4, 4] and body["forward_passes"] == 17
    assert np.asarray(body["map"]).shape == (28, 28)
    assert body["target"] == body["predicted"]

    targeted = client.post("/explain", json={"image": image.tolist(), "target": 3})
    assert targeted.status_code == 200 and targeted.json()["target"] == 3


def test_wrong_shape_is_422_with_the_shape_named(client):
    response = client.post(
        "/predict", json={"images": np.zeros((2, 28, 28, 3)).tolist()}
    )
    message = error_of(response, 422)
    assert "shape (2, 28, 28, 3)" in message and "(N, 28, 28, 1)" in message


@pytest.mark.parametrize(
    "path, kwargs, status, words",
    [
        ("/predict", {"json": {"images": [[0.0, 1.0], [0.0]]}}, 400, ["validation"]),
        ("/predict", {"json": {"imagez": []}}, 400, ["validation"]),
        (
            "/predict",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            ["validation"],
        ),
        (
            "/predict",
            {"json": {"images": np.full((1, 28, 28, 1), 7.0).tolist()}},
            422,
            ["max 7", "[0, 1]"],
        ),
        (
            "/predict",
            {"json": {"images": np.full((1, 28, 28, 1), True).tolist()}},
            422,
            ["dtype bool"],
        ),
        (
            "/predict_npy",
            {"files": {"images": ("x.npy", b"GIF89a", "image/gif")}},
            400,
            ["not a .npy"],
        ),
        (
            "/predict_npy",
            {"data": {"images": "http://127.0.0.1:1/x.npy"}},
            400,
            ["uploaded as a file"],
        ),
        (
            "/predict_npy",
            {"files": npy_upload(np.zeros((1, 28, 28, 1), np.int16))},
            422,
            ["dtype int16"],
        ),
        (
            "/explain",
            {"json": {"image": np.zeros((28, 28)).tolist(), "window": 0}},
            422,
            ["window is 0"],
        ),
        (
            "/explain",
            {"json": {"image": np.zeros((28, 28)).tolist(), "target": 12}},
            422,
            ["target is 12"],
        ),
    ],
)
def test_bad_requests_get_4xx_with_a_message(client, path, kwargs, status, words):
    response = client.post(path, **kwargs)
    message = error_of(response, status)
    for word in words:
        assert word in message, (word, message)


def test_nan_upload_is_422(client):
    images = np.zeros((3, 28, 28, 1), np.float32)
    images[2, 7, 8, 0] = np.nan
    message = error_of(client.post("/predict_npy", files=npy_upload(images)), 422)
    assert "NaN" in message and "image 2" in message


def test_oversize_body_is_413_before_parsing(client):
    images = np.zeros((700, 28, 28, 1), np.float32)
    message = error_of(client.post("/predict_npy", files=npy_upload(images)), 413)
    assert "AUDIT_MAX_REQUEST_BYTES" in message


def test_chunked_oversize_body_is_413(client):
    def chunks():
        for _ in range(3):
            yield b" " * 2**20

    response = client.post(
        "/predict", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "more than" in error_of(response, 413)


def test_server_stays_up_after_refusals(client, digits):
    assert client.get("/readyz").status_code == 200
    response = client.post("/predict_npy", files=npy_upload(digits[0][:2]))
    assert response.status_code == 200


def test_audit_http_backend_against_the_served_model(server, small_model, digits):
    """The audit's HTTP backend reads the card and gets the model's numbers,
    and the occlusion engine through it matches the engine in process."""
    from audit.backends import load_backend
    from audit.occlusion import OcclusionSettings, explain

    images = digits[0][:8]
    settings = OcclusionSettings(window=7, stride=7)
    with load_backend(server) as remote:
        assert remote.predict_path == BINARY
        assert remote.input_shape == (28, 28, 1)
        assert remote.value_range == (0.0, 1.0)
        np.testing.assert_allclose(
            remote.predict(images), small_model.predict_on_batch(images), atol=1e-5
        )
        over_http = explain(remote, images, settings=settings)
    local = load_backend(small_model, class_names=[str(d) for d in range(10)])
    in_process = explain(local, images, settings=settings)
    np.testing.assert_allclose(
        over_http.window_scores, in_process.window_scores, atol=1e-5
    )


def test_refusals_are_logged_without_tracebacks(client, server_log):
    client.post("/predict", json={"images": [[0.25, 0.5]]})
    post_binary(client, npy_body(np.zeros((3, 5), np.float32)))
    deadline = time.monotonic() + 10
    while "shape (3, 5)" not in server_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    text = server_log.read_text()
    assert "refused /predict [POST] with 422: images has shape (1, 2)" in text
    assert f"refused {BINARY} [POST] with 422: images has shape (3, 5)" in text
    assert "Traceback" not in text


def test_small_load_gets_no_5xx(server):
    images = load_test.mnist_images(256)
    report = load_test.run_load(
        server, images, clients=4, requests=80, duration=60, batch=64, json_batch=4
    )
    assert report["requests"] == 80
    assert report["5xx"] == 0, load_test.format_report(report)
    assert report["connection_errors"] == 0
    assert report["accepted_invalid"] == 0
    assert (
        report["by_kind"]["invalid"]["4xx"] == report["by_kind"]["invalid"]["requests"]
    )


def test_requests_over_the_concurrency_limit_get_429(stored_model, bentoml_home):
    """A server allowing one request at a time answers the rest 429, not 5xx."""
    from concurrent.futures import ThreadPoolExecutor

    env = dict(os.environ)
    env.update(
        BENTOML_HOME=str(bentoml_home),
        AUDIT_MODEL_TAG=stored_model,
        AUDIT_MAX_CONCURRENCY="1",
    )
    body = {"image": np.zeros((28, 28)).tolist(), "window": 1, "stride": 1}
    with (
        load_test.served(env) as url,
        httpx.Client(base_url=url, timeout=60) as session,
        ThreadPoolExecutor(8) as pool,
    ):
        responses = list(
            pool.map(lambda _: session.post("/explain", json=body), range(8))
        )
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes


def test_cli_audit_of_the_live_endpoint_matches_in_process(
    server, stored_model, tmp_path, monkeypatch
):
    """``python -m audit run --endpoint URL`` audits the served model and gets
    the numbers of the same audit run in process on the stored model."""
    import json

    from audit.cli import main

    monkeypatch.setenv("AUDIT_TEST_TOKEN", "secret-token")
    common = ["--every", "100", "--output", str(tmp_path), "--fail-on", "never", "-q"]
    remote = ["--endpoint", server, "--auth-env", "AUDIT_TEST_TOKEN"]
    assert main(["run", *remote, "--run-id", "remote", *common]) == 0
    assert main(["run", "--model", stored_model, "--run-id", "local", *common]) == 0

    remote_results = json.loads((tmp_path / "remote" / "results.json").read_text())
    local_results = json.loads((tmp_path / "local" / "results.json").read_text())
    assert remote_results["dataset"]["n_audited"] == 100
    assert "secret-token" not in (tmp_path / "remote" / "results.json").read_text()
    assert "secret-token" not in (tmp_path / "remote" / "report.html").read_text()
    for mine, theirs in zip(
        remote_results["slices"], local_results["slices"], strict=True
    ):
        assert mine["name"] == theirs["name"] and mine["n"] == theirs["n"]
        for metric in ("accuracy", "flip_rate"):
            assert (
                mine["metrics"][metric]["value"] == theirs["metrics"][metric]["value"]
            )
        assert mine["metrics"]["max_drop"]["value"] == pytest.approx(
            theirs["metrics"]["max_drop"]["value"], abs=1e-4
        )
