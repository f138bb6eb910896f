"""The audit on Dask: chunk order, bounded window, equality, a lost worker."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from audit.config import load_config
from audit.distributed import (
    QUIET_SCHEDULER,
    AuditJob,
    ModelSource,
    SharedBackend,
    execute_on_dask,
    in_chunk_order,
    installed_job,
    pin_model,
    worker_environment,
    worker_models,
)
from audit.runner import run_audit

EVERY = 16  # 625 of the 10,000 MNIST test images, both writer groups
N_IMAGES = 625
CHUNK_SIZE = 50
N_CHUNKS = math.ceil(N_IMAGES / CHUNK_SIZE)
RELATIVE_TOLERANCE = 1e-9


@pytest.fixture(scope="module")
def model_file(small_model, tmp_path_factory):
    """The small model as a .keras file that worker processes can open."""
    path = tmp_path_factory.mktemp("model") / "small.keras"
    small_model.save(path)
    return path


def _config(model_file, output, run_id, dask=None):
    return load_config(
        overrides={
            "model": str(model_file),
            "dataset": {"every": EVERY},
            "chunk_size": CHUNK_SIZE,
            "checkpoint_seconds": 0,
            "output": str(output),
            "run_id": run_id,
            "fail_on": "never",
            "dask": dask,
        }
    )


@pytest.fixture(scope="module")
def local_results(model_file, tmp_path_factory):
    """results.json of the same audit run in process, the reference."""
    output = tmp_path_factory.mktemp("local")
    return run_audit(_config(model_file, output, "local"), quiet=True).results


def _comparable(results: dict) -> dict:
    """Results without what legitimately differs: timing, run id, dask, output."""
    kept = {k: v for k, v in results.items() if k not in ("run", "config")}
    config = {
        k: v
        for k, v in results["config"].items()
        if k not in ("run_id", "dask", "output")
    }
    return {**kept, "config": config}


def _assert_same(found, expected, where="results"):
    """Equal structure; equal ints, strings and flags; floats within tolerance."""
    if isinstance(expected, dict):
        assert isinstance(found, dict), where
        assert sorted(found) == sorted(expected), where
        for key in expected:
            _assert_same(found[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(found, list) and len(found) == len(expected), where
        for i, (a, b) in enumerate(zip(found, expected, strict=True)):
            _assert_same(a, b, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(found, bool):
        assert math.isclose(
            found, expected, rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-12
        ), f"{where}: {found} != {expected}"
    else:
        assert found == expected, f"{where}: {found!r} != {expected!r}"
        assert type(found) is type(expected), where


def _assert_every_image_counted_once(results):
    assert results["dataset"]["n_images"] == N_IMAGES
    assert results["dataset"]["n_audited"] == N_IMAGES
    assert results["overall"]["n"] == N_IMAGES
    groups = [s for s in results["slices"] if s["columns"] == ["writer_group"]]
    assert sum(s["n"] for s in groups) == N_IMAGES
    assert results["method"]["forward_passes_total"] > 0


# ------------------------------------------------- ordering and the window

_started: list[tuple[int, int]] = []
_handed_back = [0]


def _slow_first_chunk(chunk_id, rows):
    """Stand-in task: early chunks take longest, so they finish out of order."""
    _started.append((chunk_id, _handed_back[0]))
    time.sleep(0.05 * (chunk_id % 4 == 0))
    return SimpleNamespace(chunk_id=chunk_id, rows=list(rows))


@pytest.mark.dask
def test_results_come_back_in_chunk_order_within_the_window():
    from distributed import Client, LocalCluster

    todo = [(chunk_id, np.arange(chunk_id, chunk_id + 2)) for chunk_id in range(20)]
    window = 3
    _started.clear()
    _handed_back[0] = 0
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=3,
            processes=False,
            dashboard_address=None,
            scheduler_kwargs=QUIET_SCHEDULER,
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        order = []
        for outcome in in_chunk_order(client, todo, _slow_first_chunk, window=window):
            order.append(outcome.chunk_id)
            assert outcome.rows == [outcome.chunk_id, outcome.chunk_id + 1]
            _handed_back[0] += 1
        deadline = time.monotonic() + 5
        while client.futures and time.monotonic() < deadline:
            time.sleep(0.01)  # releases reach the scheduler asynchronously
        assert not client.futures

    assert order == list(range(20))
    assert sorted(chunk for chunk, _ in _started) == list(range(20))
    for chunk_id, handed_back in _started:
        assert chunk_id < handed_back + window, (chunk_id, handed_back)


def _fails_at_chunk_3(chunk_id, rows):
    """Stand-in task: chunk 3 fails at once, while the chunks before it still run."""
    if chunk_id == 3:
        raise ValueError("model output has NaN in chunk 3")
    time.sleep(0.2)
    return SimpleNamespace(chunk_id=chunk_id)


@pytest.mark.dask
def test_a_failing_chunk_stops_the_run_after_the_chunks_before_it():
    from distributed import Client, LocalCluster

    todo = [(chunk_id, np.arange(1)) for chunk_id in range(8)]
    handed_back = []
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=4,
            processes=False,
            dashboard_address=None,
            scheduler_kwargs=QUIET_SCHEDULER,
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        with pytest.raises(ValueError, match="NaN in chunk 3"):
            for outcome in in_chunk_order(client, todo, _fails_at_chunk_3, window=4):
                handed_back.append(outcome.chunk_id)
        deadline = time.monotonic() + 5
        while client.futures and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not client.futures

    assert handed_back == [0, 1, 2]


def _eventually(condition, seconds=10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


@pytest.mark.dask
def test_a_runs_job_leaves_the_workers_whether_its_client_ends_or_dies():
    from distributed import Client, LocalCluster

    source = ModelSource("unused")
    with LocalCluster(
        n_workers=2,
        processes=False,
        dashboard_address=None,
        scheduler_kwargs=QUIET_SCHEDULER,
    ) as cluster:
        scheduler, workers = cluster.scheduler, list(cluster.workers.values())

        def everywhere(name):
            return name in scheduler.worker_plugins or any(
                name in w.plugins for w in workers
            )

        with Client(cluster, set_as_default=False) as client:
            job = AuditJob("audit-job-ends", None, source, plan=None)
            with installed_job(client, job):
                assert all(job.name in w.plugins for w in workers)
                assert f"{job.name}-watch" in scheduler.plugins
            assert not everywhere(job.name)
            assert f"{job.name}-watch" not in scheduler.plugins

        dying = Client(cluster, set_as_default=False)
        job = AuditJob("audit-job-dies", None, source, plan=None)
        never_left = installed_job(dying, job)
        never_left.__enter__()  # the client dies inside the block
        assert all(job.name in w.plugins for w in workers)
        dying.close()
        assert _eventually(lambda: not everywhere(job.name))
        assert f"{job.name}-watch" not in scheduler.plugins
        del never_left


# ----------------------------------------------------- model on the workers


@pytest.mark.dask
def test_store_tag_is_pinned_to_its_exact_version(stored_model, model_file, tmp_path):
    name = stored_model.split(":")[0]
    config = _config(model_file, tmp_path, "pin").model_copy(
        update={"model": f"{name}:latest"}
    )
    pinned, source = pin_model(config)
    assert pinned.model == stored_model == source.key
    assert source.sha256 is None


@pytest.mark.dask
def test_worker_refuses_a_model_file_that_differs_from_the_clients(
    model_file, tmp_path
):
    copy = tmp_path / "copy.keras"
    copy.write_bytes(model_file.read_bytes())
    config = _config(copy, tmp_path, "pin")
    pinned, source = pin_model(config)
    assert pinned.model == str(copy.resolve())
    assert isinstance(source, ModelSource) and len(source.sha256) == 64

    copy.write_bytes(copy.read_bytes() + b"changed")
    job = AuditJob("audit-job-test", pinned, source, plan=None)
    job.setup(SimpleNamespace(address="tcp://worker:1"))
    with pytest.raises(RuntimeError, match="different model file"):
        job.backend()


@pytest.mark.dask
def test_an_unreachable_scheduler_is_a_clear_error(model_file, tmp_path):
    import dask

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = _config(model_file, tmp_path, "x", dask=f"tcp://127.0.0.1:{port}")
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "1s"}),
        pytest.raises(RuntimeError, match="cannot reach a Dask scheduler"),
    ):
        next(execute_on_dask(config, None, [(0, np.arange(2))]))


@pytest.mark.dask
def test_a_scheduler_without_workers_is_a_clear_error(
    model_file, tmp_path, monkeypatch
):
    from distributed import LocalCluster

    import audit.distributed

    monkeypatch.setattr(audit.distributed, "WORKER_WAIT_SECONDS", 0.5)
    with LocalCluster(
        n_workers=0,
        processes=False,
        dashboard_address=None,
        scheduler_kwargs=QUIET_SCHEDULER,
    ) as cluster:
        config = _config(model_file, tmp_path, "x", dask=cluster.scheduler_address)
        with pytest.raises(RuntimeError, match="no Dask worker joined"):
            next(execute_on_dask(config, None, [(0, np.arange(2))]))


@pytest.mark.dask
def test_a_worker_opens_each_model_once_and_keeps_the_last_one(monkeypatch):
    import audit.runner
    from audit.distributed import _BackendCache

    opened, closed = [], []

    class Model:
        def __init__(self, name):
            self.name = name

        def close(self):
            closed.append(self.name)

    def open_backend(config):
        opened.append(config.model)
        return Model(config.model)

    monkeypatch.setattr(audit.runner, "open_backend", open_backend)
    cache = _BackendCache(keep_idle=1)
    first, second = ModelSource("first"), ModelSource("second")
    config_of = {
        source: SimpleNamespace(model=source.key) for source in (first, second)
    }

    a = cache.acquire(first, config_of[first])
    b = cache.acquire(first, config_of[first])  # a second run, same model
    assert a is b and opened == ["first"]
    cache.release(first)
    cache.release(first)
    assert closed == []  # idle, kept for the next run

    cache.acquire(second, config_of[second])
    cache.release(second)
    assert closed == ["first"]  # only the most recently used idle model stays
    cache.acquire(second, config_of[second])
    assert opened == ["first", "second"]
    assert cache.report() == {
        "first": {"open": False, "runs": 0, "opened": 1},
        "second": {"open": True, "runs": 1, "opened": 1},
    }


@pytest.mark.dask
def test_shared_backend_keeps_to_the_backends_own_limit():
    calls = {"now": 0, "most": 0}
    lock = threading.Lock()

    class OneAtATime:
        max_in_flight = 1
        class_names = ["0", "1"]

        def predict(self, x):
            with lock:
                calls["now"] += 1
                calls["most"] = max(calls["most"], calls["now"])
            time.sleep(0.01)
            with lock:
                calls["now"] -= 1
            return x

    shared = SharedBackend(OneAtATime())
    threads = [
        threading.Thread(target=lambda: [shared.predict(1) for _ in range(5)])
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls["most"] == 1
    assert shared.class_names == ["0", "1"]


# ------------------------------------------------------ end to end on Dask


@pytest.mark.dask
@pytest.mark.slow
def test_dask_local_run_equals_the_local_run(model_file, local_results, tmp_path):
    outcome = run_audit(_config(model_file, tmp_path, "dask", dask="local"), quiet=True)

    _assert_every_image_counted_once(outcome.results)
    _assert_same(_comparable(outcome.results), _comparable(local_results))
    assert outcome.results["config"]["dask"] == "local"


@pytest.mark.dask
@pytest.mark.slow
def test_lost_worker_is_recomputed_and_no_image_counted_twice(
    model_file, local_results, tmp_path
):
    from distributed import Client, LocalCluster

    progress = tmp_path / "lost" / "checkpoint" / "progress.json"
    killed: dict = {}
    stop = threading.Event()

    def kill_a_busy_worker(client, pids):
        """After the first chunk is merged, kill a worker that holds a chunk."""
        while not stop.is_set():
            done = json.loads(progress.read_text())["done"] if progress.exists() else []
            busy = [w for w, keys in client.processing().items() if keys]
            if done and busy:
                os.kill(pids[busy[0]], signal.SIGKILL)
                killed.update(pid=pids[busy[0]], chunks_done=len(done))
                return
            time.sleep(0.01)

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            scheduler_kwargs=QUIET_SCHEDULER,
            env=worker_environment(1),
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        pids = client.run(os.getpid)
        killer = threading.Thread(target=kill_a_busy_worker, args=(client, pids))
        killer.start()
        try:
            config = _config(model_file, tmp_path, "lost", cluster.scheduler_address)
            outcome = run_audit(config, quiet=True)
        finally:
            stop.set()
            killer.join()
        client.wait_for_workers(2, timeout=60)
        pids_after = set(client.run(os.getpid).values())
        models = client.run(worker_models)

    assert killed, "the run finished before a worker could be killed"
    assert 1 <= killed["chunks_done"] < N_CHUNKS
    assert killed["pid"] not in pids_after
    assert any(models.values())
    for per_worker in models.values():  # the restarted worker may have had none
        for model in per_worker.values():
            assert model == {"open": True, "runs": 0, "opened": 1}
    _assert_every_image_counted_once(outcome.results)
    _assert_same(_comparable(outcome.results), _comparable(local_results))
