"""Model backends: loading each kind, output checks, the HTTP client's limits,
retries and auth, and the occlusion engine agreeing with the one-window-at-a-
time reference through every kind of backend."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_occlusion import (
    assert_matches_reference,
    case_inputs,
    linear_model,
    naive_explain,
    occlusion_cases,
)
from tiny_models import mean_model

from audit.backends import (
    BackendError,
    CallableBackend,
    HttpBackend,
    KerasBackend,
    ModelBackend,
    ModelOutputError,
    load_backend,
    npy_bytes,
    npy_upload,
)
from audit.occlusion import OcclusionSettings, explain

BATCH_SIZES = (1, 2, 7, 4096)
BINARY_PATH = "/predict_binary"
BACKEND_PROPERTY = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# --------------------------------------------------------- a local Bento


class ModelServer:
    """A threaded HTTP server speaking the Bento's ``/metadata`` and
    ``/predict_npy`` protocol over a numpy function, with failures to order.

    ``binary=True`` in :meth:`serve` also advertises and answers the binary
    endpoint ``/predict_binary`` (``.npy`` body in, ``.npy`` body out), as the
    current service does; without it the server is an older one.
    """

    def __init__(self):
        self.function = None
        self.card = {}
        self.paths: list[str] = []
        self.binary_answer = None
        self.failures: list[tuple[int, dict]] = []
        self.token = None
        self.delay = 0.0
        self.active = 0
        self.peak = 0
        self.starts: list[float] = []
        self.sizes: list[int] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no delayed-ACK stall per reply

            def log_message(self, *args):
                return None

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.handle(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.02,), daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def serve(self, function, shape, class_names, value_range=(0.0, 1.0), binary=False):
        self.function = function
        self.card = {
            "tag": "served:test",
            "metadata": {
                "class_names": list(class_names),
                "input_shape": list(shape),
                "value_range": list(value_range),
            },
            "limits": {"max_batch": 4096},
        }
        if binary:
            self.card["endpoints"] = {"predict_binary": BINARY_PATH}

    def handle(self, handler, body: bytes) -> None:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.starts.append(time.monotonic())
            self.paths.append(handler.path)
            failure = self.failures.pop(0) if self.failures else None
        try:
            if self.delay:
                time.sleep(self.delay)
            expected = f"Bearer {self.token}"
            if self.token and handler.headers.get("Authorization") != expected:
                self.reply(handler, 401, {"error": "missing or wrong token"})
            elif failure is not None:
                status, headers = failure
                self.reply(handler, status, {"error": "busy"}, headers)
            elif handler.path == "/metadata":
                self.reply(handler, 200, self.card)
            elif handler.path == "/predict_npy":
                images = self.read_npy(handler.headers["Content-Type"], body)
                with self.lock:
                    self.sizes.append(len(images))
                probabilities = np.asarray(self.function(images))
                self.reply(
                    handler,
                    200,
                    {
                        "probabilities": probabilities.tolist(),
                        "labels": probabilities.argmax(axis=1).tolist(),
                    },
                )
            elif handler.path == BINARY_PATH and "endpoints" in self.card:
                content_type = handler.headers["Content-Type"]
                assert content_type == "application/octet-stream", content_type
                images = np.load(io.BytesIO(body), allow_pickle=False)
                with self.lock:
                    self.sizes.append(len(images))
                probabilities = np.asarray(self.function(images), np.float32)
                self.reply_bytes(
                    handler,
                    "application/octet-stream",
                    self.binary_answer or npy_bytes(probabilities),
                )
            else:
                self.reply(handler, 404, {"error": f"no route {handler.path}"})
        finally:
            with self.lock:
                self.active -= 1

    @staticmethod
    def read_npy(content_type: str, body: bytes) -> np.ndarray:
        head = f"Content-Type: {content_type}\r\n\r\n".encode()
        message = BytesParser(policy=HTTP).parsebytes(head + body)
        for part in message.iter_parts():
            if part.get_param("name", header="content-disposition") == "images":
                payload = part.get_payload(decode=True)
                return np.load(io.BytesIO(payload), allow_pickle=False)
        raise ValueError("no 'images' field in the upload")

    @staticmethod
    def reply_bytes(handler, content_type: str, data: bytes) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    @staticmethod
    def reply(handler, status: int, body, headers=None) -> None:
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(data)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    running = ModelServer()
    yield running
    running.close()


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ------------------------------------------------------------ tiny Keras


def variable_size_model(channels: int, n_classes: int = 3):
    """A small convolutional model that takes images of any height and width."""
    import keras

    init = keras.initializers.RandomNormal
    inputs = keras.Input((None, None, channels))
    features = keras.layers.Conv2D(
        4, 2, padding="same", activation="tanh", kernel_initializer=init(0, 2.0, 1)
    )(inputs)
    pooled = keras.layers.Concatenate()(
        [
            keras.layers.GlobalAveragePooling2D()(features),
            keras.layers.GlobalMaxPooling2D()(features),
        ]
    )
    outputs = keras.layers.Dense(
        n_classes, activation="softmax", kernel_initializer=init(0, 3.0, 2)
    )(pooled)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def keras_models():
    return {c: variable_size_model(c) for c in (1, 3)}


@pytest.fixture(scope="module")
def keras_files(keras_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("keras_files")
    paths = {}
    for channels, model in keras_models.items():
        paths[channels] = folder / f"model_{channels}.keras"
        model.save(paths[channels])
    return paths


# ------------------------------------------------------------ loading


def test_each_source_kind_gives_its_backend(
    small_model, stored_model, keras_files, server
):
    server.serve(mean_model, (28, 28, 1), ["a", "b"])
    kinds = {
        KerasBackend: [small_model, str(keras_files[1]), keras_files[1], stored_model],
        HttpBackend: [server.url],
        CallableBackend: [mean_model],
    }
    options = {
        str(keras_files[1]): {"input_shape": (5, 5, 1)},
        keras_files[1]: {"input_shape": (5, 5, 1)},
        mean_model: {
            "input_shape": (3, 3, 1),
            "class_names": ["a", "b"],
            "value_range": (0, 1),
        },
    }
    for kind, sources in kinds.items():
        for source in sources:
            backend = load_backend(source, **options.get(source, {}))
            assert isinstance(backend, kind)
            assert isinstance(backend, ModelBackend)
            backend.close()


def test_store_tag_reads_the_model_card(stored_model):
    backend = load_backend(stored_model)
    assert backend.input_shape == (28, 28, 1)
    assert backend.class_names == [str(d) for d in range(10)]
    assert backend.value_range == (0.0, 1.0)
    assert backend.description["tag"] == stored_model
    assert backend.description["metadata"]["n_train"] == 4000


def test_latest_tag_resolves_to_the_exact_version(stored_model):
    backend = load_backend("mnist_cnn:latest")
    assert backend.description["tag"].startswith("mnist_cnn:")
    assert not backend.description["tag"].endswith(":latest")


def test_missing_store_tag_says_how_to_get_one(bentoml_home):
    with pytest.raises(BackendError, match="'no_such_model:latest'.*bento_service"):
        load_backend("no_such_model:latest")


def test_missing_keras_file_is_named(tmp_path):
    missing = tmp_path / "gone.keras"
    with pytest.raises(BackendError, match="gone.keras does not exist"):
        load_backend(str(missing))


def test_callable_needs_its_description():
    with pytest.raises(BackendError, match=r"\['class_names', 'value_range'\]"):
        load_backend(mean_model, input_shape=(2, 2, 1))


def test_unknown_source_type_is_refused():
    with pytest.raises(BackendError, match="from int"):
        load_backend(42)


def test_variable_size_keras_model_needs_input_shape(keras_models):
    with pytest.raises(BackendError, match=r"pass input_shape=\(H, W, C\)"):
        load_backend(keras_models[1])
    with pytest.raises(BackendError, match="does not fit the model"):
        load_backend(keras_models[1], input_shape=(5, 5, 3))


def test_class_names_must_match_the_outputs(small_model):
    with pytest.raises(BackendError, match="3 class_names given but the model has 10"):
        load_backend(small_model, class_names=["a", "b", "c"])


# ---------------------------------------------------------- Keras calls


def test_keras_backend_calls_predict_on_batch_not_predict(small_model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("model.predict is too slow for the audit")

    monkeypatch.setattr(small_model, "predict", refuse)
    backend = load_backend(small_model)
    probabilities = backend.predict(np.zeros((3, 28, 28, 1), np.float32))
    assert probabilities.shape == (3, 10)
    assert probabilities.dtype == np.float32


def test_keras_logits_are_the_softmax_inputs(small_model, mnist_train_small):
    backend = load_backend(small_model)
    assert backend.has_logits
    images = mnist_train_small[0][:5]
    logits = backend.predict_logits(images)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    softmax = shifted / shifted.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(softmax, backend.predict(images), atol=1e-6)


def tiny_dense(activation):
    import keras

    return keras.Sequential(
        [
            keras.Input((2, 2, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(2, activation=activation),
        ]
    )


def test_keras_output_with_nan_names_the_batch():
    model = tiny_dense("softmax")
    kernel, bias = model.get_weights()
    model.set_weights([np.full_like(kernel, np.nan), bias])
    backend = load_backend(model)
    with pytest.raises(ModelOutputError, match="batch 1: the model returned nan"):
        backend.predict(np.zeros((4, 2, 2, 1), np.float32))


def test_outputs_that_are_not_probabilities_are_refused():
    backend = load_backend(tiny_dense(None))
    assert not backend.has_logits
    images = np.ones((3, 2, 2, 1), np.float32)
    with pytest.raises(ModelOutputError, match="batch 1.*sum to .*not 1"):
        backend.predict(images)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (np.array([[0.5, 0.5], [0.2, 0.7]]), r"image 1 sum to 0\.9"),
        (np.array([[0.5, 0.5]]), r"shape \(1, 2\) for 2 images"),
        (np.array([[np.inf, 0.0], [0.5, 0.5]]), "returned inf for image 0"),
        (np.array([[1.5, -0.5], [0.5, 0.5]]), "negative probability -0.5"),
    ],
)
def test_callable_output_checks(output, message):
    backend = load_backend(
        lambda x: output, input_shape=(1, 1, 1), class_names="ab", value_range=(0, 1)
    )
    with pytest.raises(ModelOutputError, match=message):
        backend.predict(np.zeros((2, 1, 1, 1), np.float32))


def test_rows_within_the_tolerance_pass():
    output = np.array([[0.5, 0.5009]])
    backend = load_backend(
        lambda x: output, input_shape=(1, 1, 1), class_names="ab", value_range=(0, 1)
    )
    assert backend.predict(np.zeros((1, 1, 1, 1))).shape == (1, 2)


# ----------------------------------------------------------------- HTTP


def test_http_backend_reads_the_card_and_predicts(server):
    server.serve(mean_model, (3, 4, 1), ["dark", "bright"], (0.0, 1.0))
    with load_backend(server.url) as backend:
        assert backend.input_shape == (3, 4, 1)
        assert backend.class_names == ["dark", "bright"]
        assert backend.description["tag"] == "served:test"
        images = np.random.default_rng(0).random((5, 3, 4, 1), dtype=np.float32)
        np.testing.assert_allclose(backend.predict(images), mean_model(images))


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float32).reshape(2, 3, 4, 1),
        np.arange(24, dtype=np.float32).reshape(2, 4, 3, 1).transpose(0, 2, 1, 3),
        np.zeros((0, 3, 4, 1), np.float32),
    ],
)
def test_npy_upload_is_a_multipart_npy_file(array):
    body, content_type = npy_upload(array)
    np.testing.assert_array_equal(ModelServer.read_npy(content_type, body), array)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float32).reshape(2, 3, 4, 1),
        np.arange(24, dtype=np.float32).reshape(2, 4, 3, 1).transpose(0, 2, 1, 3),
        np.zeros((0, 3, 4, 1), np.float32),
    ],
)
def test_npy_bytes_are_what_numpy_save_writes(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    assert npy_bytes(array) == buffer.getvalue()


def test_binary_endpoint_is_used_when_the_card_advertises_it(server):
    server.serve(mean_model, (3, 4, 1), ["dark", "bright"], binary=True)
    images = np.random.default_rng(1).random((5, 3, 4, 1), dtype=np.float32)
    with load_backend(server.url) as backend:
        assert backend.predict_path == BINARY_PATH
        got = backend.predict(images)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, mean_model(images), rtol=1e-6)
    assert server.paths == ["/metadata", BINARY_PATH]


def test_older_server_without_the_binary_endpoint_gets_multipart(server):
    server.serve(mean_model, (3, 4, 1), ["dark", "bright"], binary=False)
    images = np.random.default_rng(2).random((5, 3, 4, 1), dtype=np.float32)
    with load_backend(server.url) as backend:
        assert backend.predict_path == "/predict_npy"
        np.testing.assert_allclose(backend.predict(images), mean_model(images))
    assert server.paths == ["/metadata", "/predict_npy"]


@pytest.mark.parametrize("endpoints", [[], {"predict_binary": 3}, {"other": "/x"}])
def test_unusable_endpoint_entries_fall_back_to_multipart(server, endpoints):
    server.serve(mean_model, (2, 2, 1), ["a", "b"])
    server.card["endpoints"] = endpoints
    with load_backend(server.url) as backend:
        assert backend.predict_path == "/predict_npy"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"GIF89a", "not .npy"),
        (npy_bytes(np.zeros((2, 2), np.float32))[:-4], "holds 12 bytes"),
        (npy_bytes(np.full((1, 2), 0.5, np.float32)), r"shape \(1, 2\) for 2"),
    ],
)
def test_binary_answers_that_are_not_probabilities_are_refused(server, answer, message):
    server.serve(mean_model, (2, 2, 1), ["a", "b"], binary=True)
    server.binary_answer = answer
    with (
        load_backend(server.url) as backend,
        pytest.raises(ModelOutputError, match=message),
    ):
        backend.predict(np.ones((2, 2, 2, 1), np.float32))


def test_empty_batch_sends_no_request(server):
    server.serve(mean_model, (2, 2, 1), ["a", "b"])
    with load_backend(server.url) as backend:
        assert backend.predict(np.zeros((0, 2, 2, 1))).shape == (0, 2)
    assert server.sizes == []


def test_http_backend_accepts_a_flat_card(server):
    server.serve(mean_model, (2, 2, 1), ["a", "b"])
    server.card = server.card["metadata"]
    with load_backend(server.url) as backend:
        assert backend.input_shape == (2, 2, 1)


def test_requests_fit_the_servers_byte_limit(server):
    # 2x2x1 float32 images are 16 bytes; 4096 bytes go to headers and framing.
    server.serve(mean_model, (2, 2, 1), ["a", "b"])
    server.card["limits"]["max_request_bytes"] = 4096 + 16 * 5
    with load_backend(server.url) as backend:
        assert backend.request_batch == 5
        backend.predict(np.zeros((12, 2, 2, 1), np.float32))
    assert sorted(server.sizes) == [2, 5, 5]

    server.card["limits"]["max_request_bytes"] = 4000
    with pytest.raises(BackendError, match="raise the server's AUDIT_MAX_REQUEST"):
        load_backend(server.url)


def test_http_card_without_input_shape_is_refused(server):
    server.serve(mean_model, (2, 2, 1), ["a", "b"])
    server.card = {"tag": "x"}
    with pytest.raises(BackendError, match="did not return a model card"):
        load_backend(server.url)


def test_requests_in_flight_are_capped(server):
    server.serve(mean_model, (2, 2, 1), ["a", "b"])
    with load_backend(server.url, max_in_flight=2, request_batch=4) as backend:
        server.delay = 0.05
        backend.predict(np.zeros((32, 2, 2, 1), np.float32))
    assert server.sizes == [4] * 8
    assert server.peak == 2


def test_request_rate_is_capped(server):
    server.serve(mean_model, (2, 2, 1), ["a", "b"])
    with load_backend(
        server.url, max_in_flight=4, request_batch=1, max_requests_per_second=25
    ) as backend:
        server.starts.clear()
        started = time.monotonic()
        backend.predict(np.zeros((6, 2, 2, 1), np.float32))
        elapsed = time.monotonic() - started
    assert len(server.starts) == 6
    assert elapsed >= 5 / 25  # six starts, 1/25 s apart, despite 4 allowed at once


def test_server_errors_and_429_are_retried_with_backoff(server):
    server.serve(mean_model, (2, 2, 1), ["a", "b"])
    with load_backend(server.url, retries=3, backoff=0.01) as backend:
        server.failures = [(503, {}), (429, {"Retry-After": "0.2"})]
        started = time.monotonic()
        probabilities = backend.predict(np.ones((2, 2, 2, 1), np.float32))
        elapsed = time.monotonic() - started
    np.testing.assert_allclose(probabilities, [[0, 1], [0, 1]])
    assert elapsed >= 0.2  # honoured Retry-After
    assert server.sizes == [2]


def test_retries_give_up_with_the_url(server):
    server.serve(mean_model, (2, 2, 1), ["a", "b"])
    with load_backend(server.url, retries=2, backoff=0.01) as backend:
        server.failures = [(500, {})] * 3
        with pytest.raises(
            BackendError, match=rf"{server.url}/predict_npy.*3 attempts"
        ):
            backend.predict(np.ones((1, 2, 2, 1), np.float32))


def test_client_errors_are_not_retried(server):
    server.serve(mean_model, (2, 2, 1), ["a", "b"])
    with load_backend(server.url, retries=3, backoff=0.01) as backend:
        server.failures = [(422, {})]
        with pytest.raises(BackendError, match="HTTP 422: busy"):
            backend.predict(np.ones((1, 2, 2, 1), np.float32))
    assert not server.failures


def test_unreachable_bento_is_named_quickly():
    url = closed_port_url()
    started = time.monotonic()
    with pytest.raises(BackendError, match=rf"cannot reach the Bento at {url}"):
        load_backend(url, retries=1, backoff=0.01)
    assert time.monotonic() - started < 5


def test_read_timeouts_are_retried_then_reported(server):
    server.serve(mean_model, (2, 2, 1), ["a", "b"])
    with load_backend(server.url, timeout=0.1, retries=1, backoff=0.01) as backend:
        server.delay = 0.5
        with pytest.raises(BackendError, match="ReadTimeout"):
            backend.predict(np.ones((1, 2, 2, 1), np.float32))


def test_token_from_the_named_environment_variable(server, monkeypatch):
    server.serve(mean_model, (2, 2, 1), ["a", "b"])
    server.token = "s3cret"
    monkeypatch.setenv("AUDIT_TEST_TOKEN", "s3cret")
    with load_backend(server.url, auth_env="AUDIT_TEST_TOKEN") as backend:
        assert backend.predict(np.ones((1, 2, 2, 1))).shape == (1, 2)

    monkeypatch.setenv("AUDIT_TEST_TOKEN", "wrong")
    with pytest.raises(BackendError, match="HTTP 401: missing or wrong token"):
        load_backend(server.url, auth_env="AUDIT_TEST_TOKEN")

    monkeypatch.delenv("AUDIT_TEST_TOKEN")
    with pytest.raises(BackendError, match="AUDIT_TEST_TOKEN.*not set"):
        load_backend(server.url, auth_env="AUDIT_TEST_TOKEN")


def test_served_nan_is_a_model_output_error(server):
    server.serve(lambda x: np.full((len(x), 2), np.nan), (2, 2, 1), ["a", "b"])
    with (
        load_backend(server.url) as backend,
        pytest.raises(ModelOutputError, match="batch 1.*nan"),
    ):
        backend.predict(np.ones((1, 2, 2, 1)))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_in_flight": 0}, "max_in_flight 0"),
        ({"max_requests_per_second": 0}, "max_requests_per_second 0"),
        ({"retries": -1}, "retries -1"),
    ],
)
def test_http_options_are_checked(options, message):
    with pytest.raises(BackendError, match=message):
        HttpBackend("http://127.0.0.1:9", **options)


# ------------------------------------- the engine through every backend


def check_against_reference(backend, case):
    images, labels, dataset_mean = case_inputs(case)
    expected = naive_explain(
        backend, images, labels, OcclusionSettings(**case["settings"]), dataset_mean
    )
    for max_batch in BATCH_SIZES:
        settings = OcclusionSettings(**case["settings"], max_batch=max_batch)
        result = explain(backend, images, labels, settings, dataset_mean=dataset_mean)
        assert_matches_reference(result, expected, case["n"])


def with_classes(case, n_classes):
    return {**case, "n_classes": n_classes}


@BACKEND_PROPERTY
@given(case=occlusion_cases(max_n=2))
def test_keras_model_matches_reference(case, keras_models):
    case = with_classes(case, 3)
    model = keras_models[case["shape"][2]]
    check_against_reference(load_backend(model, input_shape=case["shape"]), case)


@BACKEND_PROPERTY
@given(case=occlusion_cases(max_n=2))
def test_keras_file_matches_reference(case, keras_files):
    case = with_classes(case, 3)
    path = str(keras_files[case["shape"][2]])
    check_against_reference(load_backend(path, input_shape=case["shape"]), case)


@BACKEND_PROPERTY
@given(case=occlusion_cases(outputs=("probability", "log_probability")))
def test_callable_matches_reference(case):
    backend = load_backend(
        linear_model(case["shape"], case["n_classes"], case["seed"]),
        input_shape=case["shape"],
        class_names=[str(i) for i in range(case["n_classes"])],
        value_range=(0, 1),
    )
    check_against_reference(backend, case)


@BACKEND_PROPERTY
@given(case=occlusion_cases(shape=(28, 28, 1), min_window=5, max_n=2))
def test_store_tag_matches_reference(case, stored_model):
    check_against_reference(load_backend(stored_model), with_classes(case, 10))


@BACKEND_PROPERTY
@given(
    case=occlusion_cases(outputs=("probability", "log_probability"), max_side=6),
    in_flight=st.sampled_from([1, 2, 3]),
    binary=st.booleans(),
)
def test_http_matches_reference(case, in_flight, binary, server):
    names = [str(i) for i in range(case["n_classes"])]
    server.serve(
        linear_model(case["shape"], case["n_classes"], case["seed"]),
        case["shape"],
        names,
        binary=binary,
    )
    with load_backend(server.url, max_in_flight=in_flight) as backend:
        check_against_reference(backend, case)
