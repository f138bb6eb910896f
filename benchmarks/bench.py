"""Speed of the audit's hot path, measured against its bounds and its peers.

    .venv/bin/python benchmarks/bench.py            # or: make bench
    .venv/bin/python benchmarks/bench.py --skip peers,http --json out.json
    .venv/bin/python benchmarks/bench.py --only http --http-in-flight 2,1,3

Everything runs on the MNIST CNN in the BentoML store (``mnist_cnn:latest``,
trained first with ``python -m bento_service.train`` when missing) and the
MNIST test images, at window 6 and stride 4 (49 windows, 50 forward passes per
image). In one run it measures:

* ``forward`` - bare ``predict_on_batch`` over the very batches the engine
  sends (built beforehand), and ``engine`` - :func:`audit.occlusion.explain`
  on the same images; their ratio is ``engine_vs_forward``. The two are timed
  alternately, three times each, and medians are compared;
* ``http`` - the engine through :class:`audit.backends.HttpBackend` against a
  real ``bentoml serve`` started on loopback by this script (and stopped
  after), as a ratio to the in-process engine: ``http_vs_inprocess``. The
  backend uses the service's binary endpoint (``.npy`` in and out) when the
  service advertises it; ``--http-in-flight`` sets how many requests it keeps
  open (the first value gives the headline, further values are measured on
  the same server for comparison);
* ``audit`` - ``python -m audit run`` in a subprocess over the 10,000 test
  images and over the test set twice (20,000, via ``dataset.repeat``): wall
  time and the child's peak resident memory (``wait4``);
* ``peers`` - tf-explain's occlusion sensitivity (4-pixel patches: 49
  evaluations), SHAP's partition explainer (50 evaluations) and LIME (50
  samples) on the same model, as images per second; ``speedup_vs_*`` divide
  the engine's images per second by theirs. They are installed at run time
  into ``.venv/bench-peers`` (``pip --target``, versions constrained to what
  the project's environment already holds), never into the project's own
  packages;
* ``rise`` - deletion/insertion areas of RISE and occlusion maps at the same
  budget (49 masks vs 49 windows), and of RISE at 4x and 20x that budget.

A part that cannot run (no service, no network for the peers) is reported
with its error in the JSON rather than failing the whole run. The last line
printed is one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

logger = logging.getLogger("bench")

MODEL_TAG = "mnist_cnn:latest"
WINDOW, STRIDE = 6, 4
PEERS_DIR = REPO / ".venv" / "bench-peers"
PEER_REQUIREMENTS = [
    "tf-explain==0.3.1",
    "shap==0.51.0",
    "lime==0.2.0.1",
    "opencv-python-headless",
]
PART_NAMES = ("http", "audit", "peers", "rise")


def _round(value, digits=3):
    return None if value is None else round(float(value), digits)


# ------------------------------------------------------------------ set-up


def ensure_model(tag: str) -> None:
    """Train and store the CNN when the store has no ``tag``."""
    from bento_service.model_store import has_model

    if has_model(tag):
        return
    logger.info("%s is not in the BentoML store; training it (about a minute)", tag)
    subprocess.run(
        [sys.executable, "-m", "bento_service.train"],
        cwd=REPO,
        check=True,
        stdout=sys.stderr,
    )


def mnist_test(n: int) -> tuple[np.ndarray, np.ndarray]:
    from audit.datasets import load_mnist_arrays

    images, labels = load_mnist_arrays("test")
    x = images[:n].astype(np.float32)[..., None] / np.float32(255.0)
    return x, labels[:n].astype(np.int64)


def occlusion_settings():
    from audit.occlusion import OcclusionSettings

    return OcclusionSettings(window=WINDOW, stride=STRIDE, max_batch=1024)


# ------------------------------------------------------- forward vs engine


def measure_in_process(backend, images, labels, repeats: int = 7) -> dict:
    """Bare ``predict_on_batch`` on the engine's own batches vs the engine.

    The two are timed alternately ``repeats`` times. Other work on the machine
    slows single trials by up to half, so the headline ratio compares the best
    trial of each (the least disturbed); the median of the ratios of adjacent
    pairs is reported beside it.
    """
    from audit.occlusion import (
        Baseline,
        OccludedCopies,
        WindowGrid,
        explain,
        image_aligned_bounds,
        warm_up,
    )

    settings = occlusion_settings()
    grid = WindowGrid(backend.input_shape[:2], settings.window, settings.stride)
    per_image = len(grid) + 1
    baseline = Baseline(settings, backend.value_range, images.shape[1:])
    build = OccludedCopies(images, grid, baseline)
    bounds = image_aligned_bounds(len(images), per_image, settings.max_batch)
    batches = [build(start, end) for start, end in bounds]
    passes = len(images) * per_image
    model = backend.model

    warm_up(backend, settings)
    explain(backend, images[:64], labels[:64], settings)
    forward, engine, engine_cpu = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches:
            model.predict_on_batch(batch)
        forward.append(passes / (time.perf_counter() - started))

        cpu_before = time.process_time()
        started = time.perf_counter()
        explain(backend, images, labels, settings)
        engine.append(passes / (time.perf_counter() - started))
        engine_cpu.append((time.process_time() - cpu_before) * 1e6 / passes)
    forward_rate, engine_rate = max(forward), max(engine)
    paired = statistics.median(e / f for e, f in zip(engine, forward, strict=True))
    logger.info(
        "in process: forward %.0f passes/s, engine %.0f passes/s (%.3f, paired %.3f)",
        forward_rate,
        engine_rate,
        engine_rate / forward_rate,
        paired,
    )
    return {
        "images": len(images),
        "forward_passes": passes,
        "batch_size": bounds[0][1] - bounds[0][0],
        "forward_passes_per_second": round(forward_rate),
        "engine_passes_per_second": round(engine_rate),
        "engine_images_per_second": round(engine_rate / per_image, 1),
        "engine_vs_forward": _round(engine_rate / forward_rate),
        "engine_vs_forward_paired_median": _round(paired),
        "engine_cpu_ms_per_1000_passes": round(statistics.median(engine_cpu), 1),
        "forward_runs": [round(r) for r in forward],
        "engine_runs": [round(r) for r in engine],
    }


# -------------------------------------------------------------------- HTTP


@contextlib.contextmanager
def bentoml_serve(log_path: Path, timeout: float = 180.0):
    """``bentoml serve`` of the service on a free loopback port; yields
    ``(url, pid)`` of the serving process (see ``load_test.serving_process``).
    """
    from load_test import serving_process

    with serving_process(log=log_path, timeout=timeout) as (url, process):
        yield url, process.pid


def _tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def measure_http(
    local, images, labels, inprocess: dict, in_flight=(2,), repeats: int = 4
) -> dict:
    """The engine through a served Bento, as a ratio to the in-process engine.

    One server is started; the backend is measured with each number of
    requests in flight in ``in_flight``, the first giving the headline and
    the others reported under ``other_in_flight``.

    HTTP trials alternate with in-process trials on the ``local`` backend, so
    both sides see the same moments of the machine; the headline compares the
    best trial of each, and the median of adjacent pairs is reported beside it.

    Also counts CPU time per 1,000 forward passes in the client (this
    process) and in the server's process tree. On a machine whose cores are
    all busy, wall-clock throughput follows total CPU per pass, so
    ``cpu_bound_ratio`` (in-process CPU over client plus server CPU) is the
    best ``http_vs_inprocess`` this service and client can reach here.
    """
    if not (REPO / "bento_service" / "service.py").is_file():
        return {"error": "bento_service/service.py is missing; no service to serve"}
    measured = []
    with tempfile.TemporaryDirectory() as folder:
        log_path = Path(folder) / "serve.log"
        try:
            with bentoml_serve(log_path) as (url, pid):
                for n in in_flight:
                    measured.append(
                        _http_trials(url, pid, n, local, images, labels, repeats)
                    )
        except (RuntimeError, TimeoutError, OSError) as e:
            return {"error": f"{type(e).__name__}: {e}"}
    own = inprocess["engine_cpu_ms_per_1000_passes"]
    results = [_http_summary(trials, own, len(images)) for trials in measured]
    headline = results[0]
    if len(results) > 1:
        headline["other_in_flight"] = {
            str(result["max_in_flight"]): result for result in results[1:]
        }
    return headline


def _http_trials(url, pid, max_in_flight, local, images, labels, repeats) -> dict:
    """Alternating in-process and HTTP trials with ``max_in_flight`` requests
    open; rates and CPU per 1,000 passes of each trial."""
    from audit.backends import load_backend
    from audit.occlusion import explain

    settings = occlusion_settings()
    backend = load_backend(url, max_in_flight=max_in_flight)
    try:
        explain(backend, images[:100], labels[:100], settings)
        rates, local_rates, client_cpu, server_cpu = [], [], [], []
        for _ in range(repeats):
            started = time.perf_counter()
            result = explain(local, images, labels, settings)
            seconds = time.perf_counter() - started
            local_rates.append(result.forward_passes / seconds)

            server_before = _tree_cpu_seconds(pid)
            client_before = time.process_time()
            started = time.perf_counter()
            result = explain(backend, images, labels, settings)
            seconds = time.perf_counter() - started
            per_1000 = 1000 / result.forward_passes
            client_cpu.append((time.process_time() - client_before) * 1000 * per_1000)
            server_cpu.append(
                (_tree_cpu_seconds(pid) - server_before) * 1000 * per_1000
            )
            rates.append(result.forward_passes / seconds)
    finally:
        backend.close()
    return {
        "max_in_flight": max_in_flight,
        "endpoint": backend.predict_path,
        "rates": rates,
        "local_rates": local_rates,
        "client_cpu": client_cpu,
        "server_cpu": server_cpu,
    }


def _http_summary(trials: dict, own: float, n_images: int) -> dict:
    rates, local_rates = trials["rates"], trials["local_rates"]
    rate, inprocess_rate = max(rates), max(local_rates)
    paired = statistics.median(h / i for h, i in zip(rates, local_rates, strict=True))
    client = statistics.median(trials["client_cpu"])
    server = statistics.median(trials["server_cpu"])
    logger.info(
        "HTTP, %d in flight, %s: %.0f passes/s (%.3f of in process, paired %.3f)",
        trials["max_in_flight"],
        trials["endpoint"],
        rate,
        rate / inprocess_rate,
        paired,
    )
    return {
        "images": n_images,
        "max_in_flight": trials["max_in_flight"],
        "endpoint": trials["endpoint"],
        "passes_per_second": round(rate),
        "runs": [round(r) for r in rates],
        "in_process_runs": [round(r) for r in local_rates],
        "http_vs_inprocess": _round(rate / inprocess_rate),
        "http_vs_inprocess_paired_median": _round(paired),
        "cpu_ms_per_1000_passes": {
            "in_process_engine": own,
            "http_client": round(client, 1),
            "http_server": round(server, 1),
        },
        "cpu_bound_ratio": _round(own / (client + server)),
    }


# ------------------------------------------------------------ whole audit


class _AuditWatcher(threading.Thread):
    """Samples a running audit's memory and notes when its log reaches each phase.

    Phases, by the runner's INFO lines: start-up until ``auditing N images``,
    the explained chunks until ``audited N of N images``, then statistics and
    the report until the process ends.
    """

    def __init__(self, pid: int, log_path: Path, started: float):
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.log_path = log_path
        self.started = started
        self.marks: dict[str, float] = {}
        self.peak_during_chunks = 0
        self.stop = threading.Event()

    def _read_marks(self, text: str, now: float) -> None:
        if "work_started" not in self.marks and "audit.runner: auditing " in text:
            self.marks["work_started"] = now
        for line in text.splitlines():
            if "audited " in line and " of " in line and "images" in line:
                done, total = (
                    line.split("audited ", 1)[1].split(" images")[0].split(" of ")
                )
                if done == total and "chunks_done" not in self.marks:
                    self.marks["chunks_done"] = now

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            now = time.perf_counter() - self.started
            try:
                rss = self.process.memory_info().rss
                text = self.log_path.read_text(errors="replace")
            except (psutil.Error, OSError):
                return
            self._read_marks(text, now)
            if "chunks_done" not in self.marks:
                self.peak_during_chunks = max(self.peak_during_chunks, rss)
            self.stop.wait(0.2)


def run_audit(n_copies: int, output: Path) -> dict:
    """``python -m audit run`` over the test set ``n_copies`` times.

    Reports the wall time, the child's peak RSS (from ``wait4``, so only that
    process counts), the peak while chunks were being explained (sampled), and
    how the time splits into start-up, chunks, and statistics plus report.
    """
    run_id = f"bench-{n_copies}x"
    command = [
        sys.executable,
        "-m",
        "audit",
        "run",
        "--output",
        str(output),
        "--run-id",
        run_id,
        "--fail-on",
        "never",
        "--window",
        str(WINDOW),
        "--stride",
        str(STRIDE),
    ]
    if n_copies > 1:
        config = output / f"repeat-{n_copies}.yaml"
        config.write_text(f"dataset:\n  repeat: {n_copies}\n", encoding="utf-8")
        command += ["--config", str(config)]
    log_path = output / f"{run_id}.log"
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log)
    watcher = _AuditWatcher(process.pid, log_path, started)
    watcher.start()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    watcher.stop.set()
    watcher.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode not in (0, 1):
        tail = log_path.read_text(errors="replace")[-2000:]
        return {
            "error": f"python -m audit run exited {process.returncode}: {tail}",
            "seconds": round(seconds, 1),
        }
    results = json.loads((output / run_id / "results.json").read_text())
    audited = results["dataset"]["n_audited"]
    logger.info("audit of %d images: %.1f s end to end", audited, seconds)
    marks = watcher.marks
    phases = None
    if "work_started" in marks and "chunks_done" in marks:
        phases = {
            "start_up": round(marks["work_started"], 1),
            "chunks": round(marks["chunks_done"] - marks["work_started"], 1),
            "statistics_and_report": round(seconds - marks["chunks_done"], 1),
        }
    passes = results["method"]["forward_passes_total"]
    return {
        "images": audited,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "peak_rss_mb_while_explaining": round(watcher.peak_during_chunks / 2**20),
        "phase_seconds": phases,
        "forward_passes_total": passes,
        "forward_passes_per_second_in_chunks": round(passes / phases["chunks"])
        if phases
        else None,
        "verdict": results.get("verdict"),
    }


# ------------------------------------------------------------------- peers


def install_peers() -> Path:
    """tf-explain, SHAP and LIME in ``.venv/bench-peers``, resolved against the
    project's installed versions so nothing it already has is replaced."""
    marker = PEERS_DIR / ".installed"
    wanted = "\n".join(PEER_REQUIREMENTS)
    if marker.is_file() and marker.read_text() == wanted:
        return PEERS_DIR
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    frozen = subprocess.run(
        [*pip, "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    with tempfile.TemporaryDirectory() as folder:
        constraints = Path(folder) / "constraints.txt"
        constraints.write_text(
            "\n".join(line for line in frozen.splitlines() if "==" in line)
        )
        report = Path(folder) / "report.json"
        subprocess.run(
            [
                *pip,
                "install",
                "--quiet",
                "--dry-run",
                "--report",
                str(report),
                "-c",
                str(constraints),
                *PEER_REQUIREMENTS,
            ],
            check=True,
        )
        chosen = [
            f"{item['metadata']['name']}=={item['metadata']['version']}"
            for item in json.loads(report.read_text())["install"]
        ]
    logger.info("installing peers into %s: %s", PEERS_DIR, " ".join(chosen))
    subprocess.run(
        [*pip, "install", "--quiet", "--no-deps", "--target", str(PEERS_DIR), *chosen],
        check=True,
    )
    marker.write_text(wanted)
    return PEERS_DIR


def _timed(function, items) -> tuple[float, int]:
    started = time.perf_counter()
    for item in items:
        function(item)
    return time.perf_counter() - started, len(items)


def peer_tf_explain(model, images, predicted) -> dict:
    """tf-explain's occlusion sensitivity, one image at a time as it works.

    It assumes 0-255 pixels (its grey patch is 127.5), so it gets the images
    scaled up and a model that divides by 255 first; 4-pixel patches tile the
    28x28 image in 7x7 = 49 evaluations, the engine's budget.
    """
    import keras
    import tf_explain
    from tf_explain.core.occlusion_sensitivity import OcclusionSensitivity

    scaled = keras.Sequential(
        [keras.Input(images.shape[1:]), keras.layers.Rescaling(1 / 255.0), model]
    )
    explainer = OcclusionSensitivity()
    pairs = list(zip(images * 255.0, predicted, strict=True))
    explainer.get_sensitivity_map(scaled, pairs[0][0], int(pairs[0][1]), 4)
    seconds, n = _timed(
        lambda pair: explainer.get_sensitivity_map(scaled, pair[0], int(pair[1]), 4),
        pairs,
    )
    return {"version": tf_explain.__version__, "images": n, "seconds": seconds}


def peer_shap(model, images) -> dict:
    """SHAP's partition explainer, 50 evaluations, a function around
    ``predict_on_batch`` and a black (0) mask like the engine's baseline."""
    import shap

    def predict(x):
        return model.predict_on_batch(np.asarray(x, np.float32))

    masker = shap.maskers.Image(np.zeros(images.shape[1:], np.float32))
    explainer = shap.Explainer(predict, masker, algorithm="partition")
    top = shap.Explanation.argsort.flip[:1]
    explainer(images[:1], max_evals=50, batch_size=50, outputs=top, silent=True)
    seconds, n = _timed(
        lambda chunk: explainer(
            chunk, max_evals=50, batch_size=50, outputs=top, silent=True
        ),
        [images[i : i + 10] for i in range(0, len(images), 10)],
    )
    return {"version": shap.__version__, "images": len(images), "seconds": seconds}


def peer_lime(model, images) -> dict:
    """LIME's image explainer, 50 samples; it passes RGB copies, of which the
    model gets one channel."""
    import lime
    from lime import lime_image

    def classify(rgb):
        return model.predict_on_batch(np.asarray(rgb[..., :1], np.float32))

    explainer = lime_image.LimeImageExplainer(random_state=0)

    def explain_one(image):
        explainer.explain_instance(
            image[..., 0].astype(np.float64),
            classify,
            top_labels=1,
            hide_color=0,
            num_samples=50,
            batch_size=50,
            random_seed=0,
        )

    explain_one(images[0])
    seconds, n = _timed(explain_one, list(images))
    version = getattr(lime, "__version__", "0.2.0.1")
    return {"version": version, "images": n, "seconds": seconds}


def measure_peers(model, images, engine_images_per_second: float, sizes) -> dict:
    try:
        folder = install_peers()
    except (subprocess.CalledProcessError, OSError) as e:
        return {"error": f"could not install the peers: {e}"}
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    predicted = model.predict_on_batch(images[: sizes["tf_explain"]]).argmax(axis=1)
    runs = {
        "tf_explain": lambda: peer_tf_explain(
            model, images[: sizes["tf_explain"]], predicted
        ),
        "shap": lambda: peer_shap(model, images[: sizes["shap"]]),
        "lime": lambda: peer_lime(model, images[: sizes["lime"]]),
    }
    out = {}
    for name, run in runs.items():
        try:
            with contextlib.redirect_stdout(sys.stderr):
                measured = run()
        except Exception as e:  # noqa: BLE001 - a peer's failure is a finding
            logger.exception("peer %s failed", name)
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        rate = measured["images"] / measured["seconds"]
        measured["seconds"] = round(measured["seconds"], 2)
        measured["images_per_second"] = round(rate, 1)
        measured["speedup"] = round(engine_images_per_second / rate, 1)
        logger.info("peer %s: %.1f images/s", name, rate)
        out[name] = measured
    return out


# -------------------------------------------------------------------- RISE


def measure_rise(backend, images, larger_images) -> dict:
    from audit.rise import compare_with_occlusion

    settings = occlusion_settings()
    equal = compare_with_occlusion(backend, images, settings, steps=10, seed=0)
    larger = {}
    for factor in (4, 20):
        n_masks = 49 * factor
        summary = compare_with_occlusion(
            backend, larger_images, settings, n_masks=n_masks, steps=10, seed=0
        )
        larger[f"rise_{n_masks}_masks"] = summary
    logger.info(
        "RISE vs occlusion at 50 passes: insertion-deletion %.3f vs %.3f",
        equal["rise"]["insertion_minus_deletion"],
        equal["occlusion"]["insertion_minus_deletion"],
    )
    return {"equal_budget": equal, "larger_budgets": larger}


# -------------------------------------------------------------------- main


def machine() -> dict:
    import keras
    import tensorflow as tf

    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "load_average_at_start": load_average(),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work competing for the cores."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="benchmarks/bench.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--images", type=int, default=1000, help="in-process images")
    parser.add_argument("--http-images", type=int, default=1000)
    parser.add_argument("--rise-images", type=int, default=1000)
    parser.add_argument(
        "--skip", default="", help=f"comma-separated parts to skip: {PART_NAMES}"
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated parts to run (the in-process measure always runs); "
        "the others are skipped",
    )
    parser.add_argument(
        "--http-in-flight",
        default="2",
        help="comma-separated requests in flight for the HTTP part; the first "
        "gives http_vs_inprocess",
    )
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    return parser.parse_args(argv)


def summary(parts: dict) -> dict:
    """The headline numbers, ``None`` where a part did not run."""

    def pick(part, *keys):
        node = parts.get(part) or {}
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    rise = pick("rise", "equal_budget")
    return {
        "engine_vs_forward": pick("inprocess", "engine_vs_forward"),
        "http_vs_inprocess": pick("http", "http_vs_inprocess"),
        "speedup_vs_tf_explain": pick("peers", "tf_explain", "speedup"),
        "speedup_vs_shap": pick("peers", "shap", "speedup"),
        "speedup_vs_lime": pick("peers", "lime", "speedup"),
        "audit_10k_seconds": pick("audit_10k", "seconds"),
        "peak_rss_mb_10k": pick("audit_10k", "peak_rss_mb"),
        "audit_20k_seconds": pick("audit_20k", "seconds"),
        "peak_rss_mb_20k": pick("audit_20k", "peak_rss_mb"),
        "rise_vs_occlusion_equal_budget": None
        if rise is None
        else {
            "forward_passes_per_image": rise["occlusion"]["forward_passes_per_image"],
            "occlusion": {
                k: rise["occlusion"][k]
                for k in ("deletion_auc", "insertion_auc", "insertion_minus_deletion")
            },
            "rise": {
                k: rise["rise"][k]
                for k in ("deletion_auc", "insertion_auc", "insertion_minus_deletion")
            },
        },
    }


def _names(text: str, option: str) -> set[str]:
    names = {s.strip() for s in text.split(",") if s.strip()}
    unknown = names - set(PART_NAMES)
    if unknown:
        raise SystemExit(
            f"{option}: unknown part(s) {sorted(unknown)}; use {PART_NAMES}"
        )
    return names


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr
    )
    for noisy in ("httpx", "bentoml", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    skip = _names(args.skip, "--skip")
    only = _names(args.only, "--only")
    if only:
        skip |= set(PART_NAMES) - only
    try:
        in_flight = [int(n) for n in args.http_in_flight.split(",")]
    except ValueError:
        in_flight = []
    if not in_flight or min(in_flight) < 1:
        raise SystemExit(
            f"--http-in-flight {args.http_in_flight!r}: give whole numbers >= 1, "
            "comma-separated"
        )

    from audit.backends import load_backend

    ensure_model(MODEL_TAG)
    backend = load_backend(MODEL_TAG)
    images, labels = mnist_test(max(args.images, args.http_images, args.rise_images))
    parts: dict = {"machine": machine(), "model": backend.description.get("tag")}

    inprocess = measure_in_process(
        backend, images[: args.images], labels[: args.images]
    )
    parts["inprocess"] = inprocess
    if "http" not in skip:
        n = args.http_images
        parts["http"] = measure_http(
            backend, images[:n], labels[:n], inprocess, in_flight
        )
    if "audit" not in skip:
        with tempfile.TemporaryDirectory() as folder:
            parts["audit_10k"] = run_audit(1, Path(folder))
            parts["audit_20k"] = run_audit(2, Path(folder))
    if "peers" not in skip:
        os.environ["TQDM_DISABLE"] = "1"
        sizes = {"tf_explain": 60, "shap": 200, "lime": 200}
        parts["peers"] = measure_peers(
            backend.model, images, inprocess["engine_images_per_second"], sizes
        )
    if "rise" not in skip:
        n = args.rise_images
        parts["rise"] = measure_rise(backend, images[:n], images[: min(n, 200)])

    parts["machine"]["load_average_at_end"] = load_average()
    report = {**summary(parts), "details": parts}
    text = json.dumps(report, indent=None, sort_keys=False)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
