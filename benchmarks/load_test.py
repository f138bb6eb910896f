"""Load test of the served model: concurrent clients against ``bentoml serve``.

    python benchmarks/load_test.py                      # starts and stops a server
    python benchmarks/load_test.py --url http://127.0.0.1:3000   # an existing one

Without ``--url`` the script starts ``bentoml serve
bento_service.service:MnistClassifier`` on a free loopback port (with the
current ``BENTOML_HOME`` and ``AUDIT_*`` variables), waits for ``/readyz``,
runs the load, and stops the server's whole process group.

The load is bounded twice: at most ``--requests`` requests and at most
``--duration`` seconds. Clients share one request counter; request ``i`` is
of the kind the mix gives it (by default mostly ``.npy`` batches, some JSON
batches, some explain calls and some invalid requests, which must be refused
with a 4xx). The report gives, per kind, the status counts and the p50 / p99
latency, and the overall throughput; the exit code is 1 when any request got
a 5xx, failed to connect, or an invalid request was accepted.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SERVICE = "bento_service.service:MnistClassifier"
HOST = "127.0.0.1"
DEFAULT_MIX = "predict_npy=6,predict=2,explain=1,invalid=1"
KINDS = ("predict_npy", "predict", "explain", "invalid")


# ------------------------------------------------------------------ server


def free_port(host: str = HOST) -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def bentoml_command() -> str:
    """The ``bentoml`` executable beside this Python, else the one on PATH."""
    beside = Path(sys.executable).with_name("bentoml")
    if beside.exists():
        return str(beside)
    found = shutil.which("bentoml")
    if found is None:
        raise RuntimeError("the bentoml command is not installed beside this Python")
    return found


def wait_ready(url: str, process: subprocess.Popen, timeout: float, log: Path | None):
    """Wait until ``GET url/readyz`` answers 200; raise if the server dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(
                f"bentoml serve exited with code {process.returncode} before it was "
                f"ready; its log ends:\n{tail}"
            )
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url}/readyz did not answer 200 within {timeout:.0f} s")


def stop(process: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop the server's process group: SIGTERM, then SIGKILL after ``grace`` s."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def serving_process(
    env: Mapping[str, str] | None = None,
    *,
    port: int | None = None,
    log: Path | None = None,
    timeout: float = 120.0,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``bentoml serve`` on loopback for the ``with`` block.

    Yields ``(url, process)``; the process is the root of the server's own
    process group (for CPU accounting), which is stopped on exit however the
    block ends. ``env`` is the server's whole environment (default: this
    process's); output goes to ``log`` (default: discarded).
    """
    port = port or free_port()
    url = f"http://{HOST}:{port}"
    command = [bentoml_command(), "serve", SERVICE, "--host", HOST, "--port", str(port)]
    environment = dict(os.environ if env is None else env)
    environment.setdefault("BENTOML_DO_NOT_TRACK", "true")
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with open(log or os.devnull, "wb") as out:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_ready(url, process, timeout, log)
            yield url, process
        finally:
            stop(process)


@contextmanager
def served(
    env: Mapping[str, str] | None = None,
    *,
    port: int | None = None,
    log: Path | None = None,
    timeout: float = 120.0,
) -> Iterator[str]:
    """:func:`serving_process` yielding only the server's URL."""
    with serving_process(env, port=port, log=log, timeout=timeout) as (url, _):
        yield url


# -------------------------------------------------------------------- load


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@dataclass(frozen=True)
class Call:
    """One prepared request: endpoint path, httpx keyword arguments, images."""

    kind: str
    path: str
    kwargs: dict
    images: int


def prepare_calls(images: np.ndarray, batch: int, json_batch: int) -> dict:
    """A few ready-made requests of each kind, so clients spend no time encoding.

    ``images`` is float32 ``(N, 28, 28, 1)`` in [0, 1].
    """
    json_headers = {"content-type": "application/json"}
    calls: dict[str, list[Call]] = {kind: [] for kind in KINDS}
    for start in range(0, len(images) - batch + 1, batch)[:4]:
        chunk = images[start : start + batch]
        files = {"images": ("images.npy", npy_bytes(chunk), "application/octet-stream")}
        calls["predict_npy"].append(
            Call("predict_npy", "/predict_npy", {"files": files}, batch)
        )
    for start in range(0, 4 * json_batch, json_batch):
        body = json.dumps({"images": images[start : start + json_batch].tolist()})
        calls["predict"].append(
            Call(
                "predict",
                "/predict",
                {"content": body, "headers": json_headers},
                json_batch,
            )
        )
    for i in range(4):
        body = json.dumps({"image": images[i].tolist()})
        calls["explain"].append(
            Call("explain", "/explain", {"content": body, "headers": json_headers}, 1)
        )
    nan_batch = images[:2].copy()
    nan_batch[1, 5, 5, 0] = np.nan
    invalid = [
        ("/predict", {"json": {"images": [[0.5, 0.5], [0.5, 0.5]]}}),
        ("/predict", {"json": {"images": (images[:2] * 255).tolist()}}),
        (
            "/predict_npy",
            {
                "files": {
                    "images": (
                        "a.npy",
                        npy_bytes(nan_batch),
                        "application/octet-stream",
                    )
                }
            },
        ),
        ("/predict_npy", {"files": {"images": ("a.npy", b"not npy", "text/plain")}}),
        ("/explain", {"json": {"image": images[0].tolist(), "window": 40}}),
    ]
    calls["invalid"] = [Call("invalid", path, kwargs, 0) for path, kwargs in invalid]
    return calls


def parse_mix(text: str) -> list[str]:
    """``"predict_npy=6,explain=1"`` -> the repeating sequence of request kinds."""
    plan = []
    for part in text.split(","):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in KINDS or not weight.strip().isdigit():
            raise ValueError(
                f"mix entry {part!r} is not kind=weight with kind in {KINDS}"
            )
        plan += [name] * int(weight)
    if not plan:
        raise ValueError(f"mix {text!r} has no requests")
    return plan


def run_load(
    url: str,
    images: np.ndarray,
    *,
    clients: int = 8,
    requests: int = 2000,
    duration: float = 60.0,
    batch: int = 256,
    json_batch: int = 16,
    mix: str = DEFAULT_MIX,
    timeout: float = 60.0,
) -> dict:
    """Send at most ``requests`` requests for at most ``duration`` seconds from
    ``clients`` concurrent clients; return the report (see :func:`summarise`)."""
    calls = prepare_calls(images, batch, json_batch)
    plan = parse_mix(mix)
    counter = itertools.count()
    lock = threading.Lock()
    outcomes: list[tuple[str, int, float, int]] = []
    deadline = time.monotonic() + duration

    def client() -> None:
        with httpx.Client(base_url=url, timeout=timeout) as session:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter)
                if i >= requests:
                    return
                kind = plan[i % len(plan)]
                options = calls[kind]
                call = options[(i // len(plan)) % len(options)]
                started = time.perf_counter()
                try:
                    status = session.post(call.path, **call.kwargs).status_code
                except httpx.TransportError:
                    status = 0
                seconds = time.perf_counter() - started
                with lock:
                    outcomes.append((kind, status, seconds, call.images))

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return summarise(
        outcomes, wall, clients=clients, batch=batch, json_batch=json_batch
    )


def summarise(outcomes, wall: float, **settings) -> dict:
    """Per kind and overall: counts by status class (429, the server's answer
    when it holds ``AUDIT_MAX_CONCURRENCY`` requests, counted apart too),
    latency p50 / p99 in ms, requests/s and images/s; ``failures`` counts
    5xx, connection errors and invalid requests that were accepted."""
    kinds = {}
    for kind in KINDS:
        rows = [o for o in outcomes if o[0] == kind]
        if not rows:
            continue
        statuses = np.array([r[1] for r in rows])
        latency = np.array([r[2] for r in rows]) * 1000
        ok = statuses[(statuses >= 200) & (statuses < 300)]
        kinds[kind] = {
            "requests": len(rows),
            "2xx": int(len(ok)),
            "4xx": int(((statuses >= 400) & (statuses < 500)).sum()),
            "429": int((statuses == 429).sum()),
            "5xx": int((statuses >= 500).sum()),
            "connection_errors": int((statuses == 0).sum()),
            "p50_ms": round(float(np.percentile(latency, 50)), 1),
            "p99_ms": round(float(np.percentile(latency, 99)), 1),
            "requests_per_s": round(len(rows) / wall, 1),
            "images_per_s": round(
                sum(r[3] for r in rows if 200 <= r[1] < 300) / wall, 1
            ),
        }
    statuses = np.array([o[1] for o in outcomes]) if outcomes else np.zeros(0)
    latency = np.array([o[2] for o in outcomes]) * 1000 if outcomes else np.zeros(1)
    accepted_invalid = kinds.get("invalid", {}).get("2xx", 0)
    n5xx = int((statuses >= 500).sum())
    errors = int((statuses == 0).sum())
    return {
        "settings": settings,
        "throttled_429": int((statuses == 429).sum()),
        "wall_seconds": round(wall, 2),
        "requests": len(outcomes),
        "requests_per_s": round(len(outcomes) / wall, 1),
        "p50_ms": round(float(np.percentile(latency, 50)), 1),
        "p99_ms": round(float(np.percentile(latency, 99)), 1),
        "5xx": n5xx,
        "connection_errors": errors,
        "accepted_invalid": accepted_invalid,
        "failures": n5xx + errors + accepted_invalid,
        "by_kind": kinds,
    }


def format_report(report: dict) -> str:
    header = (
        f"{'kind':<12}{'requests':>9}{'2xx':>6}{'4xx':>6}{'429':>6}{'5xx':>6}{'conn':>6}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}{'img/s':>9}"
    )
    lines = [header]
    for kind, row in report["by_kind"].items():
        lines.append(
            f"{kind:<12}{row['requests']:>9}{row['2xx']:>6}{row['4xx']:>6}"
            f"{row['429']:>6}{row['5xx']:>6}{row['connection_errors']:>6}{row['p50_ms']:>9}"
            f"{row['p99_ms']:>9}{row['requests_per_s']:>8}{row['images_per_s']:>9}"
        )
    lines.append(
        f"{'all':<12}{report['requests']:>9}{'':>6}{'':>6}"
        f"{report['throttled_429']:>6}{report['5xx']:>6}"
        f"{report['connection_errors']:>6}{report['p50_ms']:>9}{report['p99_ms']:>9}"
        f"{report['requests_per_s']:>8}"
    )
    lines.append(
        f"{report['requests']} requests in {report['wall_seconds']} s with "
        f"{report['settings']['clients']} clients; 5xx: {report['5xx']}, connection "
        f"errors: {report['connection_errors']}, invalid requests accepted: "
        f"{report['accepted_invalid']}"
    )
    return "\n".join(lines)


def mnist_images(n: int) -> np.ndarray:
    """The first ``n`` MNIST test images, float32 (n, 28, 28, 1) in [0, 1]."""
    sys.path.insert(0, str(REPO))
    from audit.datasets import load_mnist_arrays

    images, _ = load_mnist_arrays("test")
    return images[:n].astype(np.float32)[..., None] / np.float32(255)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running Bento; default: start one here")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000, help="at most this many")
    parser.add_argument("--duration", type=float, default=60.0, help="at most seconds")
    parser.add_argument(
        "--batch", type=int, default=256, help="images per .npy request"
    )
    parser.add_argument("--json-batch", type=int, default=16, help="per JSON request")
    parser.add_argument("--mix", default=DEFAULT_MIX, help="kind=weight,...")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--log", type=Path, help="server log (when started here)")
    args = parser.parse_args(argv)

    images = mnist_images(max(4 * args.batch, 4 * args.json_batch, 8))
    options = dict(
        clients=args.clients,
        requests=args.requests,
        duration=args.duration,
        batch=args.batch,
        json_batch=args.json_batch,
        mix=args.mix,
    )
    if args.url:
        report = run_load(args.url.rstrip("/"), images, **options)
    else:
        with served(log=args.log) as url:
            report = run_load(url, images, **options)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
