"""Overhead of the Dask path against the in-process path, on this machine.

The same audit (same model, images, windows, chunks) runs in process and on a
LocalCluster of one worker process with two threads: the whole machine either
way. The ratio of the wall times is what running on Dask costs when there is
nothing to gain from more machines: shipping the plan, opening the model on
the worker, moving chunk outcomes back, scheduling.

    .venv/bin/python benchmarks/bench_dask.py [--images 5000] [--trials 3]
        [--chunk-size 500] [--model TAG|FILE]

The last line of standard output is one JSON object::

    {"dask_overhead_ratio": 1.07, "local_seconds": 14.0, "dask_seconds": 15.0, ...}

How it measures:

- Every run is end to end (report included), through ``run_audit``.
- Before timing, one small run on each side imports and warms up everything
  (TensorFlow, SciPy, the audit modules, the model) in this process and in
  the worker, which then keeps the model open between runs, as a worker of a
  standing cluster does. The time of that first Dask run, model opening
  included, is ``first_dask_run_seconds``.
- Local and Dask runs alternate; the ratio compares the best run of each side,
  since other work on a shared machine slows single runs. ``trials`` lists
  every run and ``paired_median_ratio`` is the median ratio of adjacent pairs.
- Starting the cluster is timed on its own (``cluster_start_seconds``): a
  production cluster is started once and serves many runs.
- ``worker_images_per_second`` is the Dask chunk phase of the best Dask run
  (first chunk submitted to last outcome merged);
  ``client_seconds_per_chunk`` is what the client spent merging and
  checkpointing each chunk within it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

N_TEST_IMAGES = 10_000
WORKER_THREADS = 2

logger = logging.getLogger("bench_dask")


class _DaskPhase(logging.Handler):
    """Keeps the timing ``audit.distributed`` logs when a run's chunks are done."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds: float | None = None
        self.client_seconds: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "dask_seconds"):
            self.seconds = record.dask_seconds
            self.client_seconds = record.client_seconds


def _import_everything() -> str:
    import tensorflow as tf

    import audit.runner  # noqa: F401

    return tf.__version__


def _config(model: str, n_images: int, chunk_size: int, output: Path, run_id: str):
    from audit.config import load_config

    every = max(1, N_TEST_IMAGES // n_images)
    return load_config(
        overrides={
            "model": model,
            "dataset": {"every": every, "limit": n_images},
            "chunk_size": chunk_size,
            "output": str(output),
            "run_id": run_id,
            "fail_on": "never",
        }
    )


def _timed_run(config) -> tuple[float, dict]:
    from audit.runner import run_audit

    started = time.perf_counter()
    outcome = run_audit(config, quiet=True)
    return time.perf_counter() - started, outcome.results


def dask_overhead(
    model: str = "mnist_cnn:latest",
    n_images: int = 5000,
    chunk_size: int = 500,
    trials: int = 3,
) -> dict:
    """Time the same audit in process and on a one-worker LocalCluster.

    Returns ``dask_overhead_ratio`` (best Dask seconds / best local seconds),
    both best end-to-end times, every trial, the cluster's start-up time, and
    the Dask chunk phase of the best Dask run: the worker's rate in images and
    forward passes per second and the client's merging time per chunk.
    """
    from distributed import Client

    from audit.distributed import local_cluster

    phase = _DaskPhase()
    phase_logger = logging.getLogger("audit.distributed")
    saved_level = phase_logger.level
    phase_logger.addHandler(phase)
    phase_logger.setLevel(logging.INFO)
    local_runs, dask_runs = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-dask-") as folder:
            output = Path(folder)
            local = _config(model, n_images, chunk_size, output, "local")
            warm_up = _config(model, chunk_size, chunk_size, output, "warm-up")
            _timed_run(warm_up)

            started = time.perf_counter()
            with (
                local_cluster(1, WORKER_THREADS) as cluster,
                Client(cluster, set_as_default=False) as client,
            ):
                client.run(_import_everything)
                cluster_start_seconds = time.perf_counter() - started
                address = cluster.scheduler_address
                first_dask_run_seconds, _ = _timed_run(
                    warm_up.model_copy(update={"dask": address})
                )

                for trial in range(trials):
                    seconds, results = _timed_run(
                        local.model_copy(update={"run_id": f"local-{trial}"})
                    )
                    local_runs.append({"seconds": seconds, "results": results})
                    seconds, results = _timed_run(
                        local.model_copy(
                            update={"run_id": f"dask-{trial}", "dask": address}
                        )
                    )
                    dask_runs.append(
                        {
                            "seconds": seconds,
                            "results": results,
                            "phase_seconds": phase.seconds,
                            "client_seconds": phase.client_seconds,
                        }
                    )
                    logger.info(
                        "trial %d: local %.1f s, dask %.1f s",
                        trial,
                        local_runs[-1]["seconds"],
                        seconds,
                    )
    finally:
        phase_logger.removeHandler(phase)
        phase_logger.setLevel(saved_level)

    summary = _summary(local_runs, dask_runs, chunk_size)
    summary["cluster_start_seconds"] = round(cluster_start_seconds, 2)
    summary["first_dask_run_seconds"] = round(first_dask_run_seconds, 2)
    summary["first_dask_run_images"] = chunk_size
    return summary


def _summary(local_runs, dask_runs, chunk_size) -> dict:
    audited = {r["results"]["dataset"]["n_audited"] for r in local_runs + dask_runs}
    if len(audited) != 1:
        raise RuntimeError(f"the runs audited different numbers of images: {audited}")
    n_images = audited.pop()
    best_local = min(local_runs, key=lambda r: r["seconds"])
    best_dask = min(dask_runs, key=lambda r: r["seconds"])
    passes = best_dask["results"]["method"]["forward_passes_total"]
    phase_seconds = best_dask["phase_seconds"]
    n_chunks = -(-n_images // chunk_size)
    pairs = [
        d["seconds"] / c["seconds"] for c, d in zip(local_runs, dask_runs, strict=True)
    ]
    return {
        "dask_overhead_ratio": round(best_dask["seconds"] / best_local["seconds"], 3),
        "local_seconds": round(best_local["seconds"], 2),
        "dask_seconds": round(best_dask["seconds"], 2),
        "paired_median_ratio": round(statistics.median(pairs), 3),
        "trials": {
            "local_seconds": [round(r["seconds"], 2) for r in local_runs],
            "dask_seconds": [round(r["seconds"], 2) for r in dask_runs],
        },
        "n_images": n_images,
        "chunk_size": chunk_size,
        "dask_workers": 1,
        "dask_threads_per_worker": WORKER_THREADS,
        "cpu_cores": os.cpu_count(),
        "local_images_per_second": round(n_images / best_local["seconds"], 1),
        "dask_chunk_phase_seconds": round(phase_seconds, 2),
        "worker_images_per_second": round(n_images / phase_seconds, 1),
        "worker_forward_passes_per_second": round(passes / phase_seconds),
        "client_seconds_per_chunk": round(best_dask["client_seconds"] / n_chunks, 4),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="mnist_cnn:latest",
        help="store tag or .keras file (default mnist_cnn:latest)",
    )
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--chunk-size", type=int, default=500)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logger.setLevel(logging.INFO)
    import distributed  # noqa: F401  (creates its loggers, which dask sets to INFO)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("distributed"):
            logging.getLogger(name).setLevel(logging.WARNING)

    if not args.model.endswith(".keras"):
        from bento_service.model_store import has_model

        if not has_model(args.model):
            parser.error(
                f"{args.model} is not in the BentoML store; train it with "
                "`python -m bento_service.train` or pass --model FILE.keras"
            )

    result = dask_overhead(args.model, args.images, args.chunk_size, args.trials)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
