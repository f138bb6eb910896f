"""Dask sharding of an audit's chunks across workers.

The runner cuts the dataset into chunks; here each chunk becomes one Dask task
that explains its rows on a worker and returns the chunk's
:class:`~audit.runner.ChunkOutcome` (a small accumulator state, never pixels
or per-image maps). Outcomes are handed back in chunk order whatever order the
tasks finish in, so the runner merges exactly what a local run merges and the
statistics are identical.

How the work reaches the workers:

* The :class:`~audit.runner.AuditPlan` (dataset, occlusion settings, slice
  membership, accumulator layout) and the model source travel once, inside a
  worker plugin registered for the run. Every worker, including one that
  joins or is restarted mid-run, receives it before it is given a task.
* Each worker process opens the model once, on its first chunk, and shares it
  between the runs that use the same source (store tag, ``.keras`` file or
  endpoint URL); the last model used stays open for the next run. A Keras
  model object never goes through the scheduler.
* At most ``window`` chunks are in flight or waiting to be handed back, so the
  client's memory stays bounded whatever the number of chunks.

A worker lost mid-run is handled by Dask: the scheduler recomputes the chunks
it held. Each chunk's outcome is handed back exactly once, keyed by its chunk
id, so no image is counted twice. A client that dies leaves no job behind:
the scheduler removes it from the workers.

Known limits: every machine needs this project installed; the workers must
see a manifest's images at the paths the client sees (shared storage; the
built-in MNIST pixels travel inside the plan); a store tag must name a model
in every worker's BentoML store. See ``docs/SCALING.md``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from distributed import Client, LocalCluster, as_completed, get_worker
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

logger = logging.getLogger(__name__)

LOCAL = "local"
KERAS_SUFFIX = ".keras"
TASK_PREFIX = "audit-chunk"
WORKER_WAIT_SECONDS = 60.0
WINDOW_REFRESH_SECONDS = 10.0
TASKS_PER_THREAD = 2
# Without a dashboard the scheduler still serves /health on a port, by default
# 8787; a free port chosen by the OS lets several local clusters coexist.
QUIET_SCHEDULER = {"dashboard_address": "127.0.0.1:0"}

NO_SCHEDULER = (
    "cannot reach a Dask scheduler at {address} ({error}); start one with "
    "`dask scheduler`, check the address and the firewall, or set dask: local"
)
NO_WORKERS = (
    "no Dask worker joined the scheduler at {address} within {seconds:.0f} s; "
    "start workers with `dask worker {address}` on machines that can import "
    "this project, or set dask: local"
)
NO_JOB = (
    "worker {worker} has no audit job {name!r}; the run that submitted this "
    "chunk has ended"
)
MODEL_CHANGED = (
    "worker {worker} sees a different model file at {path} (sha256 {found}) "
    "than the client (sha256 {expected}); put one copy on shared storage"
)
WRONG_CHUNK = "Dask returned chunk {found} for chunk {expected}"


# ------------------------------------------------------------- model source


@dataclass(frozen=True)
class ModelSource:
    """The model a run's workers open, pinned on the client.

    ``key`` names the model for the per-worker cache: the resolved store tag,
    the absolute path of a ``.keras`` file with its content hash (a file
    replaced between runs is a new model), or the endpoint URL with its
    limits. ``sha256`` is the content hash of a ``.keras`` file, checked by
    every worker so that all of them explain with the same weights.
    """

    key: str
    sha256: str | None = None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pin_model(config):
    """``(config for the workers, ModelSource)`` with the model pinned.

    A store tag such as ``mnist_cnn:latest`` is resolved here to its exact
    version, so a worker whose store has a newer "latest" still opens the
    model the client audits. A ``.keras`` path becomes absolute and is hashed.
    """
    endpoint = config.endpoint
    if endpoint.url:
        limits = sorted(endpoint.model_dump(mode="json").items())
        return config, ModelSource(f"{endpoint.url} {limits}")

    if config.model.endswith(KERAS_SUFFIX):
        path = Path(config.model).expanduser().resolve()
        pinned = config.model_copy(update={"model": str(path)})
        sha256 = _file_sha256(path)
        return pinned, ModelSource(f"{path} sha256:{sha256[:16]}", sha256)

    import bentoml

    tag = str(bentoml.models.get(config.model).tag)
    return config.model_copy(update={"model": tag}), ModelSource(tag)


class SharedBackend:
    """A backend shared by a worker's threads, called as its contract allows.

    A backend declares ``max_in_flight``, how many ``predict`` calls it takes
    at once (a Keras model in process: one). A worker running several chunks
    at a time shares one backend between them; this wrapper holds the other
    callers back so the backend never sees more calls than it declared.
    Everything else is the wrapped backend's own.
    """

    def __init__(self, backend):
        self._backend = backend
        self._slots = threading.BoundedSemaphore(
            max(1, int(getattr(backend, "max_in_flight", 1)))
        )

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def predict(self, x):
        with self._slots:
            return self._backend.predict(x)

    def predict_logits(self, x):
        with self._slots:
            return self._backend.predict_logits(x)


class _BackendCache:
    """Model backends of one worker process, keyed by model source.

    A backend is opened by the first chunk that needs it and shared by every
    run using the same source. When no run holds it any more it stays open
    for the next run, up to ``keep_idle`` idle models; the least recently
    used beyond that are closed.
    """

    def __init__(self, keep_idle: int = 1):
        self.keep_idle = keep_idle
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, list] = OrderedDict()  # [backend, holders]
        self._opened: dict[str, int] = {}

    def acquire(self, source: ModelSource, config):
        with self._lock:
            entry = self._entries.get(source.key)
            if entry is None:
                from .runner import open_backend

                started = time.perf_counter()
                entry = [SharedBackend(open_backend(config)), 0]
                self._entries[source.key] = entry
                self._opened[source.key] = self._opened.get(source.key, 0) + 1
                logger.info(
                    "opened model %s in %.1f s",
                    source.key,
                    time.perf_counter() - started,
                )
            entry[1] += 1
            self._entries.move_to_end(source.key)
            return entry[0]

    def release(self, source: ModelSource) -> None:
        with self._lock:
            entry = self._entries.get(source.key)
            if entry is None:
                return
            entry[1] -= 1
            self._entries.move_to_end(source.key)
            idle = [key for key, (_, holders) in self._entries.items() if holders <= 0]
            for key in idle[: max(0, len(idle) - self.keep_idle)]:
                backend, _ = self._entries.pop(key)
                backend.close()
                logger.info("closed model %s", key)

    def report(self) -> dict[str, dict]:
        """Per model source: ``open`` now, ``runs`` holding it, times ``opened``."""
        with self._lock:
            return {
                key: {
                    "open": key in self._entries,
                    "runs": self._entries[key][1] if key in self._entries else 0,
                    "opened": opened,
                }
                for key, opened in self._opened.items()
            }


_BACKENDS = _BackendCache()


def worker_models() -> dict[str, dict]:
    """The models of this worker process (run it with ``client.run``).

    ``{model source: {"open": bool, "runs": holding it now, "opened": times}}``
    """
    return _BACKENDS.report()


# ------------------------------------------------------------ worker side


class AuditJob(WorkerPlugin):
    """One run's plan and model source, installed on every worker of the run.

    Registered under a name unique to the run; removed (and its model
    released) when the run ends.
    """

    def __init__(self, name: str, config, source: ModelSource, plan):
        self.name = name
        self.config = config
        self.source = source
        self.plan = plan
        self._backend = None
        self._lock = None
        self._worker = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_backend"] = None
        state["_lock"] = None
        return state

    def setup(self, worker) -> None:
        self._lock = threading.Lock()
        self._worker = worker.address

    def backend(self):
        """This worker's backend for the run, opened on first use."""
        with self._lock:
            if self._backend is None:
                if self.source.sha256 is not None:
                    found = _file_sha256(Path(self.config.model))
                    if found != self.source.sha256:
                        raise RuntimeError(
                            MODEL_CHANGED.format(
                                worker=self._worker,
                                path=self.config.model,
                                found=found[:12],
                                expected=self.source.sha256[:12],
                            )
                        )
                self._backend = _BACKENDS.acquire(self.source, self.config)
            return self._backend

    def teardown(self, worker) -> None:
        if self._backend is not None:
            self._backend = None
            _BACKENDS.release(self.source)


def _audit_task(job_name: str, chunk_id: int, rows):
    """Dask task: audit one chunk with the worker's job plugin."""
    from .runner import audit_chunk

    worker = get_worker()
    job = worker.plugins.get(job_name)
    if not isinstance(job, AuditJob):
        raise RuntimeError(NO_JOB.format(worker=worker.address, name=job_name))
    return audit_chunk(job.plan, job.backend(), chunk_id, rows)


# ------------------------------------------------------------ client side


def local_cluster(n_workers: int = 1, threads_per_worker: int | None = None):
    """A LocalCluster of worker processes set up for TensorFlow.

    The default is one worker process with one thread per CPU core: the
    model is imported and opened once, TensorFlow spreads each batch over
    all cores, and while one chunk's batch runs the other threads load and
    fold the next chunks. Several workers on one machine each pay for a
    TensorFlow import and a copy of the model, which only pays off when the
    model is slow enough to keep them all busy. TensorFlow inside each worker
    uses ``cores // n_workers`` threads per operation, so the workers
    together do not oversubscribe the machine.
    """
    cores = os.cpu_count() or 1
    threads_per_worker = threads_per_worker or cores
    op_threads = max(1, cores // n_workers)
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        dashboard_address=None,
        scheduler_kwargs=QUIET_SCHEDULER,
        env=worker_environment(op_threads),
    )


def worker_environment(op_threads: int) -> dict[str, str]:
    """Environment for a worker process that runs TensorFlow.

    TensorFlow reads these when it is first imported, which on a worker is
    the first chunk it audits.
    """
    return {
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        "TF_NUM_INTRAOP_THREADS": str(op_threads),
        "TF_NUM_INTEROP_THREADS": "1",
    }


@contextmanager
def _dask_logs_as_details():
    """Show Dask's own INFO lines only when the audit logs at DEBUG.

    Importing ``distributed`` sets its loggers to INFO, overriding what the
    caller configured before the import; scheduler and worker start-up lines
    are details of a run, not what a scheduled job's log should hold.
    """
    if logging.getLogger("audit").isEnabledFor(logging.DEBUG):
        yield
        return
    dask_logger = logging.getLogger("distributed")
    saved = dask_logger.level
    dask_logger.setLevel(max(saved, logging.WARNING))
    try:
        yield
    finally:
        dask_logger.setLevel(saved)


def _connect(address: str, stack: ExitStack) -> Client:
    if address == LOCAL:
        cluster = stack.enter_context(local_cluster())
        client = stack.enter_context(Client(cluster, set_as_default=False))
        logger.info("started a local Dask cluster at %s", cluster.scheduler_address)
        return client
    try:
        client = stack.enter_context(Client(address, set_as_default=False))
    except OSError as e:
        raise RuntimeError(NO_SCHEDULER.format(address=address, error=e)) from e
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_SECONDS)
    except TimeoutError as e:
        raise RuntimeError(
            NO_WORKERS.format(address=address, seconds=WORKER_WAIT_SECONDS)
        ) from e
    return client


def _window(client: Client) -> int:
    threads = sum(client.nthreads().values())
    return max(2, TASKS_PER_THREAD * threads)


def execute_on_dask(config, plan, todo) -> Iterator:
    """Audit the chunks ``todo`` on Dask; yield their outcomes in chunk order.

    Parameters
    ----------
    config:
        The run's ``AuditConfig``; ``config.dask`` is ``"local"`` (start a
        :func:`local_cluster` for this run and close it at the end) or a
        scheduler address such as ``tcp://10.0.0.5:8786``.
    plan:
        The run's ``AuditPlan``, sent once to every worker.
    todo:
        ``[(chunk_id, rows), ...]`` in the order the outcomes must come back;
        ``rows`` is an int array of dataset row numbers.

    Yields
    ------
    ChunkOutcome
        One per entry of ``todo``, in the same order, each exactly once, even
        when a worker is lost and its chunks are recomputed.

    Raises
    ------
    Exception
        A chunk's own error (a bad model output, an unreadable model file),
        after the outcomes of every chunk before it have been yielded.
    RuntimeError
        The scheduler cannot be reached, or no worker joins it within
        ``WORKER_WAIT_SECONDS``.
    """
    if not todo:
        return
    worker_config, source = pin_model(config)
    with ExitStack() as stack:
        stack.enter_context(_dask_logs_as_details())
        client = _connect(config.dask, stack)
        name = f"audit-job-{uuid.uuid4().hex[:12]}"
        workers = client.nthreads()
        logger.info(
            "auditing %d chunks with %s on %d Dask workers (%d threads)",
            len(todo),
            source.key,
            len(workers),
            sum(workers.values()),
        )
        started = time.perf_counter()
        stack.enter_context(
            installed_job(client, AuditJob(name, worker_config, source, plan))
        )
        consumer_seconds = 0.0
        for outcome in in_chunk_order(client, todo, _audit_task, name):
            handed_back = time.perf_counter()
            yield outcome
            consumer_seconds += time.perf_counter() - handed_back
        elapsed = time.perf_counter() - started
        logger.info(
            "Dask audited %d chunks in %.1f s; merging and checkpointing %.1f s of it",
            len(todo),
            elapsed,
            consumer_seconds,
            extra={"dask_seconds": elapsed, "client_seconds": consumer_seconds},
        )


_REMOVALS: set = set()


class ForgetJobWithClient(SchedulerPlugin):
    """On the scheduler: remove a run's job from the workers when its client leaves.

    A client that ends normally removes its job itself; one that is killed
    cannot, and without this its plan and open model would stay on every
    worker of a long-lived cluster.
    """

    def __init__(self, client_id: str, job_name: str):
        self.client_id = client_id
        self.job_name = job_name

    @property
    def name(self) -> str:
        return f"{self.job_name}-watch"

    def remove_client(self, scheduler, client: str) -> None:
        if client != self.client_id:
            return
        scheduler.remove_plugin(name=self.name)
        if self.job_name in scheduler.worker_plugins:
            logger.info("client of %s left; removing it from workers", self.job_name)
            removal = asyncio.ensure_future(
                scheduler.unregister_worker_plugin(comm=None, name=self.job_name)
            )
            _REMOVALS.add(removal)  # the event loop holds tasks weakly
            removal.add_done_callback(_REMOVALS.discard)


@contextmanager
def installed_job(client: Client, job: AuditJob):
    """Install ``job`` on every worker for the duration of the block.

    Also asks the scheduler to remove it should this client die first. That
    needs the scheduler to import this package; where it cannot, the run goes
    on and a killed client's job stays on the workers until they restart.
    """
    client.register_plugin(job, name=job.name)
    watch = ForgetJobWithClient(client.id, job.name)
    try:
        client.register_plugin(watch, name=watch.name)
    except Exception as e:  # the scheduler's own environment decides
        logger.warning(
            "the Dask scheduler cannot hold the clean-up for %s (%s); install "
            "this project where the scheduler runs",
            job.name,
            e,
        )
        watch = None
    try:
        yield job
    finally:
        if client.status == "running":
            _remove(client.unregister_worker_plugin, job.name)
            if watch is not None:
                _remove(client.unregister_scheduler_plugin, watch.name)


def _remove(unregister, name: str) -> None:
    try:
        unregister(name)
    except (OSError, RuntimeError, ValueError) as e:
        logger.warning("could not remove %s from the Dask cluster: %s", name, e)


def in_chunk_order(
    client: Client, todo, task, *args, window: int | None = None
) -> Iterator:
    """Run ``task(*args, chunk_id, rows)`` per chunk; yield results in ``todo`` order.

    Every result must carry the ``chunk_id`` it was given. A chunk at position
    ``p`` is submitted only when ``p < next + window``, where ``next`` is the
    first position not yet handed back, so tasks in flight plus finished
    results waiting for an earlier chunk never exceed ``window``, whatever
    order the chunks finish in. ``window`` defaults to two tasks per worker
    thread (at least 2) and follows the cluster as workers come and go.

    When a chunk's task raises, the chunks before it are still handed back
    (so a checkpoint keeps them), the chunks after it are cancelled, and the
    task's exception is raised in its place.
    """
    fixed = window is not None
    window = window if fixed else _window(client)
    window_checked = time.monotonic()
    positions: dict = {}  # future key -> position in todo
    ready: dict[int, object] = {}
    failed: dict[int, object] = {}  # position -> the future that raised
    stop = len(todo)  # submit nothing at or after the first failed position
    queue = as_completed(loop=client.loop)
    submitted = handed_back = 0
    token = uuid.uuid4().hex[:8]
    futures: dict = {}  # position -> future not yet handed back

    def submit_more():
        nonlocal submitted
        while submitted < stop and submitted < handed_back + window:
            chunk_id, rows = todo[submitted]
            future = client.submit(
                task,
                *args,
                chunk_id,
                rows,
                key=f"{TASK_PREFIX}-{token}-{chunk_id}",
                priority=-submitted,
                pure=False,
            )
            positions[future.key] = submitted
            futures[submitted] = future
            queue.add(future)
            submitted += 1

    try:
        submit_more()
        for future in queue:
            position = positions.pop(future.key)
            if future.status == "error":
                failed[position] = future
                if position < stop:
                    stop = position
                    later = [f for p, f in futures.items() if p > position]
                    client.cancel(later)
            elif position < stop:
                outcome = future.result()
                expected = todo[position][0]
                if outcome.chunk_id != expected:
                    raise RuntimeError(
                        WRONG_CHUNK.format(found=outcome.chunk_id, expected=expected)
                    )
                ready[position] = outcome
                del futures[position]
                future.release()
            while handed_back in ready:
                yield ready.pop(handed_back)
                handed_back += 1
            if handed_back == stop < len(todo):
                failed[stop].result()
            if not fixed and time.monotonic() - window_checked > WINDOW_REFRESH_SECONDS:
                window, window_checked = _window(client), time.monotonic()
            submit_more()
    finally:
        if futures and client.status == "running":
            client.cancel(list(futures.values()))
