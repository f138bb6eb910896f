"""One audit run, start to finish: chunks, checkpoints, statistics, report.

The dataset is cut into chunks of ``chunk_size`` rows. Each chunk is explained
by occlusion and folded into an :class:`AuditAccumulator`; the merged
statistics are checkpointed atomically (at most every ``checkpoint_seconds``),
so a killed run started again with the same run id continues where it
stopped. Chunks are merged in chunk order whatever order they finish in, so a
resumed or distributed run gives the same numbers as an uninterrupted local
one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from . import datasets
from .accumulate import AuditAccumulator, load_region_mask
from .analysis import analyze
from .backends import load_backend
from .checkpoint import Checkpoint, remove_stale_temp_files, run_lock
from .config import AuditConfig, config_dict
from .datasets import DatasetError
from .faithfulness import deletion_insertion
from .morphometry import SHAPE_ATTRIBUTES, measure_dataset
from .occlusion import OcclusionError, OcclusionSettings, WindowGrid, explain
from .slices import SliceSet, SliceSettings

logger = logging.getLogger(__name__)

MAX_LISTED_SKIPS = 200
MEAN_IMAGE_CHUNK = 4096
RESULTS_FILE = "results.json"


class AuditError(RuntimeError):
    """A run that cannot go on; the message says what was wrong."""


class SetupError(AuditError):
    """The run's inputs cannot be used (data, settings, run folder); nothing ran."""


SETUP_ERRORS = (DatasetError, OcclusionError, ValueError, FileNotFoundError)


@dataclass
class RunOutcome:
    """What a finished run produced."""

    run_dir: Path
    report_path: Path
    results: dict
    elapsed_seconds: float


@dataclass
class ChunkOutcome:
    """The statistics of one chunk and the rows it could not use."""

    chunk_id: int
    state: dict
    skipped: dict[int, str] = field(default_factory=dict)
    forward_passes: int = 0


# ------------------------------------------------------------------ set-up


def open_dataset(config: AuditConfig, class_names, image_shape) -> datasets.Dataset:
    """The dataset the config names, limited and repeated as configured."""
    spec = config.dataset
    if spec.kind == "mnist":
        dataset = datasets.mnist(spec.split)
    else:
        dataset = datasets.manifest_dataset(
            spec.manifest, spec.image_root, class_names, image_shape
        )
    rows = np.arange(0, len(dataset), spec.every)[: spec.limit]
    if len(rows) < len(dataset):
        dataset = dataset.subset(rows)
    if spec.repeat > 1:
        dataset = dataset.subset(np.tile(np.arange(len(dataset)), spec.repeat))
    return dataset


def open_backend(config: AuditConfig):
    """The model backend: the endpoint URL when set, else the ``model`` source."""
    endpoint = config.endpoint
    if endpoint.url:
        return load_backend(
            endpoint.url,
            max_in_flight=endpoint.max_in_flight,
            max_requests_per_second=endpoint.max_requests_per_second,
            timeout=endpoint.timeout_seconds,
            retries=endpoint.retries,
            auth_env=endpoint.auth_env,
        )
    return load_backend(config.model)


def occlusion_settings(config: AuditConfig) -> OcclusionSettings:
    occ = config.occlusion
    return OcclusionSettings(
        window=tuple(occ.window),
        stride=tuple(occ.stride),
        baseline=occ.baseline,
        baseline_value=occ.baseline_value,
        target=occ.target,
        output=occ.output,
        max_batch=occ.max_batch,
    )


def check_compatible(dataset: datasets.Dataset, backend) -> None:
    """Refuse a dataset whose images or labels the model cannot take."""
    if tuple(dataset.image_shape) != tuple(backend.input_shape):
        raise AuditError(
            f"dataset images are {dataset.image_shape} but the model expects "
            f"{tuple(backend.input_shape)}; resize the images or audit another model"
        )
    n_classes = len(backend.class_names)
    labels = dataset.labels
    bad = labels[(labels < 0) | (labels >= n_classes)]
    if len(bad):
        raise AuditError(
            f"dataset has label {int(bad[0])} but the model has {n_classes} classes "
            f"({backend.class_names})"
        )


def default_slices(dataset: datasets.Dataset) -> SliceSettings:
    """Slices for a config that names none (see :class:`AuditConfig`)."""
    columns = dataset.attribute_columns
    derived = ["brightness", "contrast", "ink_area"]
    if dataset.image_shape[2] == 1:
        derived += list(SHAPE_ATTRIBUTES)
    crossing = "thickness" if "thickness" in derived else derived[0]
    return SliceSettings(
        columns=columns,
        derived=derived,
        intersections=[[column, crossing] for column in columns],
    )


def chunk_rows(n: int, chunk_size: int) -> list[np.ndarray]:
    """Row numbers ``0..n-1`` cut into consecutive chunks."""
    return [np.arange(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def run_fingerprint(config: AuditConfig, dataset, backend) -> str:
    """What must match for a checkpoint to be resumed from."""
    settings = config_dict(config)
    for key in ("output", "run_id", "dask", "endpoint", "checkpoint_seconds"):
        settings.pop(key, None)
    identity = {
        "config": settings,
        "dataset": dataset.fingerprint,
        "n": len(dataset),
        "model": backend.description.get("tag", str(backend.description)),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def versions() -> dict:
    import keras
    import pandas
    import scipy

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pandas": pandas.__version__,
        "scipy": scipy.__version__,
        "keras": keras.__version__,
    }


# --------------------------------------------------------------- the work


@dataclass
class AuditPlan:
    """Everything a chunk needs, picklable for Dask workers except the backend."""

    dataset: datasets.Dataset
    settings: OcclusionSettings
    membership: np.ndarray
    accumulator_spec: dict
    faithfulness_steps: int | None
    faithfulness_every: int
    dataset_mean: np.ndarray | None = None


def audit_chunk(
    plan: AuditPlan, backend, chunk_id: int, rows, loaded=None
) -> ChunkOutcome:
    """Explain one chunk of rows and fold it into a fresh accumulator.

    ``loaded`` is the chunk's already loaded images, when a prefetch read them.
    """
    if loaded is None:
        loaded = plan.dataset.load(rows)
    accumulator = AuditAccumulator(**plan.accumulator_spec)
    if len(loaded.rows) == 0:
        return ChunkOutcome(chunk_id, accumulator.state(), dict(loaded.skipped), 0)

    labels = plan.dataset.labels[loaded.rows]
    result = explain(
        backend,
        loaded.images,
        labels,
        plan.settings,
        dataset_mean=plan.dataset_mean,
    )
    passes = result.forward_passes

    faithfulness = None
    if plan.faithfulness_steps:
        chosen = np.flatnonzero(loaded.rows % plan.faithfulness_every == 0)
        if len(chosen):
            curves = deletion_insertion(
                backend,
                loaded.images[chosen],
                result.maps[chosen],
                result.targets[chosen],
                plan.settings,
                steps=plan.faithfulness_steps,
                dataset_mean=plan.dataset_mean,
            )
            faithfulness = (chosen, curves)
            passes += curves.forward_passes

    accumulator.add(
        loaded.rows, labels, plan.membership[loaded.rows], result, faithfulness
    )
    return ChunkOutcome(chunk_id, accumulator.state(), dict(loaded.skipped), passes)


class _Progress:
    """A tqdm bar on a terminal, INFO lines otherwise."""

    def __init__(self, total: int, done: int, quiet: bool):
        self.total, self.done, self.resumed = total, done, done
        self.bar = None
        self.started = time.perf_counter()
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="img", desc="audit")

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        else:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            rate = (self.done - self.resumed) / elapsed
            logger.info(
                "audited %d of %d images (%.0f img/s)", self.done, self.total, rate
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_audit(config: AuditConfig, *, quiet: bool = False) -> RunOutcome:
    """Run (or resume) the audit the config describes and write its report."""
    started_at = datetime.now(UTC)
    clock = time.perf_counter()

    backend = open_backend(config)
    try:
        try:
            dataset = open_dataset(config, backend.class_names, backend.input_shape)
            check_compatible(dataset, backend)
            prepared = _prepare(config, backend, dataset)
        except SetupError:
            raise
        except (AuditError, *SETUP_ERRORS) as e:
            raise SetupError(str(e)) from e
        run_id = config.run_id or (
            f"{started_at:%Y%m%d-%H%M%S}-{dataset.name.replace('[', '-').rstrip(']')}"
        )
        run_dir = Path(config.output) / run_id
        with run_lock(run_dir):
            remove_stale_temp_files(run_dir)
            checkpoint = Checkpoint(run_dir, run_fingerprint(config, dataset, backend))
            if (run_dir / RESULTS_FILE).is_file() and not checkpoint.exists():
                raise SetupError(
                    f"run folder {run_dir} holds a finished run; choose another "
                    "--run-id, or delete the folder to run it again"
                )
            return _run_locked(
                config, backend, prepared, checkpoint, started_at, clock, quiet
            )
    finally:
        backend.close()


@dataclass
class _Prepared:
    """What a run needs before its first chunk, checked before any file is written."""

    dataset: datasets.Dataset
    slicing: SliceSettings
    slice_set: SliceSet
    grid: WindowGrid
    plan: AuditPlan


def _prepare(config: AuditConfig, backend, dataset) -> _Prepared:
    settings = occlusion_settings(config)
    grid = WindowGrid(dataset.image_shape[:2], settings.window, settings.stride)
    slicing = config.slices or default_slices(dataset)
    derived = measure_dataset(dataset, slicing.derived) if slicing.derived else None
    slice_set = SliceSet.build(dataset.table, slicing, derived)
    regions = {
        name: load_region_mask(path, dataset.image_shape)
        for name, path in config.regions.items()
    }
    spec = {
        "regions": regions,
        "n_slices": len(slice_set),
        "n_classes": len(backend.class_names),
        "image_hw": tuple(dataset.image_shape[:2]),
        "grid_shape": grid.shape,
    }
    faithful = config.faithfulness
    plan = AuditPlan(
        dataset=dataset,
        settings=settings,
        membership=slice_set.membership,
        accumulator_spec=spec,
        faithfulness_steps=faithful.steps if faithful.enabled else None,
        faithfulness_every=faithful.every,
        dataset_mean=mean_image(dataset)
        if settings.baseline == "dataset_mean"
        else None,
    )
    return _Prepared(dataset, slicing, slice_set, grid, plan)


def mean_image(dataset: datasets.Dataset) -> np.ndarray:
    """The mean ``(H, W, C)`` image of the dataset's loadable images (float64 sum)."""
    total = np.zeros(dataset.image_shape, np.float64)
    count = 0
    for rows in chunk_rows(len(dataset), MEAN_IMAGE_CHUNK):
        images = dataset.load(rows).images
        total += images.sum(axis=0, dtype=np.float64)
        count += len(images)
    if count == 0:
        raise DatasetError(f"dataset {dataset.name} has no loadable image to average")
    return (total / count).astype(np.float32)


def _run_locked(config, backend, prepared, checkpoint, started_at, clock, quiet):
    dataset, plan = prepared.dataset, prepared.plan
    run_dir = checkpoint.folder.parent
    logger.info(
        "auditing %d images of %s with %s into %s",
        len(dataset),
        dataset.name,
        backend.description.get("tag", config.model),
        run_dir,
    )

    done, state, extra = checkpoint.load()
    spec = plan.accumulator_spec
    merged = AuditAccumulator.from_state(state) if state else AuditAccumulator(**spec)
    skipped = {int(k): v for k, v in extra.get("skipped", {}).items()}
    passes = int(extra.get("forward_passes", 0))
    if done:
        logger.info("resuming run %s: %d chunks already done", run_dir.name, len(done))

    chunks = chunk_rows(len(dataset), config.chunk_size)
    todo = [(i, rows) for i, rows in enumerate(chunks) if i not in done]
    progress = _Progress(len(dataset), sum(len(chunks[i]) for i in done), quiet)

    def save():
        extra = {
            "skipped": {str(k): v for k, v in skipped.items()},
            "forward_passes": passes,
        }
        checkpoint.save(done, merged.state(), extra)

    last_save, unsaved = time.monotonic(), False
    try:
        for outcome in _execute(config, plan, backend, todo):
            merged = merged.merge(AuditAccumulator.from_state(outcome.state))
            skipped.update(outcome.skipped)
            passes += outcome.forward_passes
            done.add(outcome.chunk_id)
            unsaved = True
            if time.monotonic() - last_save >= config.checkpoint_seconds:
                save()
                last_save, unsaved = time.monotonic(), False
            progress.update(len(chunks[outcome.chunk_id]))
    except BaseException:
        if unsaved:
            save()
        raise
    finally:
        progress.close()

    results, arrays = _assemble(config, backend, prepared, merged, skipped, passes)
    finished_at = datetime.now(UTC)
    results["run"] = {
        "id": run_dir.name,
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": finished_at.isoformat(timespec="seconds"),
        "duration_seconds": round(time.perf_counter() - clock, 3),
        "seed": config.statistics.seed,
        "versions": versions(),
        "resumed": bool(extra),
    }

    from .history import update_index
    from .report import write_report

    report_path = write_report(run_dir, results, arrays)
    update_index(Path(config.output))
    checkpoint.clear()
    elapsed = time.perf_counter() - clock
    logger.info("report written to %s in %.1f s", report_path, elapsed)
    return RunOutcome(run_dir, report_path, results, elapsed)


def _execute(config, plan, backend, todo) -> Iterator[ChunkOutcome]:
    """Chunk outcomes in chunk order, computed locally or on Dask."""
    if config.dask:
        from .distributed import execute_on_dask

        yield from execute_on_dask(config, plan, todo)
        return
    if not todo:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        pending = pool.submit(plan.dataset.load, todo[0][1])
        for position, (chunk_id, rows) in enumerate(todo):
            loaded = pending.result()
            if position + 1 < len(todo):
                pending = pool.submit(plan.dataset.load, todo[position + 1][1])
            yield audit_chunk(plan, backend, chunk_id, rows, loaded)


def _assemble(config, backend, prepared: _Prepared, merged, skipped, passes):
    """results.json body and the arrays the report draws."""
    dataset, grid = prepared.dataset, prepared.grid
    results = analyze(merged, prepared.slice_set, config.statistics, config.rules)
    n_windows = int(np.prod(grid.shape))
    occ = config.occlusion
    results["method"] = {
        "window": list(occ.window),
        "stride": list(occ.stride),
        "baseline": occ.baseline,
        "baseline_value": occ.baseline_value,
        "target": occ.target,
        "output": occ.output,
        "grid_shape": list(grid.shape),
        "n_windows": n_windows,
        "forward_passes_per_image": n_windows + 1,
        "forward_passes_total": passes,
        "max_batch": occ.max_batch,
        "faithfulness_steps": config.faithfulness.steps
        if config.faithfulness.enabled
        else None,
        "faithfulness_every": config.faithfulness.every,
    }
    results["model"] = {"source": config.model, **backend.description}
    ids = dataset.table["id"].astype(str).to_numpy()
    results["dataset"] = {
        "name": dataset.name,
        "n_images": len(dataset),
        "n_audited": len(dataset) - len(skipped),
        "n_skipped": len(skipped),
        "skips": [
            {"id": ids[r], "reason": why}
            for r, why in sorted(skipped.items())[:MAX_LISTED_SKIPS]
        ],
        "skip_reasons": dict(Counter(skipped.values())),
        "fingerprint": dataset.fingerprint,
        "class_names": list(backend.class_names),
        "image_shape": list(dataset.image_shape),
    }
    results["config"] = config_dict(config)
    results["config"]["slices"] = prepared.slicing.model_dump(mode="json")

    arrays = merged.mean_maps()
    arrays["examples"] = _examples(results, dataset, backend, prepared.plan)
    return results, arrays


def _examples(results, dataset, backend, plan) -> list[dict]:
    """Example images with their maps, for the report's overlays."""
    wanted = results.get("examples", [])
    if not wanted:
        return []
    rows = np.array(sorted({int(e["row"]) for e in wanted}), np.int64)
    loaded = dataset.load(rows)
    if len(loaded.rows) == 0:
        return []
    labels = dataset.labels[loaded.rows]
    result = explain(
        backend, loaded.images, labels, plan.settings, dataset_mean=plan.dataset_mean
    )
    where = {int(r): i for i, r in enumerate(loaded.rows)}
    ids = dataset.table["id"].astype(str).to_numpy()
    examples = []
    for e in wanted:
        i = where.get(int(e["row"]))
        if i is None:
            continue
        probs = result.probs[i]
        examples.append(
            {
                "slice": e["slice"],
                "kind": e["kind"],
                "image": loaded.images[i],
                "map": result.maps[i],
                "label": int(labels[i]),
                "pred": int(np.argmax(probs)),
                "confidence": float(np.max(probs)),
                "id": ids[int(e["row"])],
            }
        )
    return examples
