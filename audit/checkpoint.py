"""Run folders: atomic writes, the one-writer lock, and resumable checkpoints.

A run folder holds ``checkpoint/`` while the run is under way: the merged
statistics of every chunk finished so far plus the list of those chunks.
Each checkpoint is written to a temporary file and renamed into place, so a
run killed at any instant leaves either the previous checkpoint or the new
one, never half of one. The lock is an OS file lock (``flock``): the kernel
releases it when the holding process dies, so a lock left by a killed job is
recovered by the next job without any clean-up.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
CHECKPOINT_DIR = "checkpoint"
PROGRESS_FILE = "progress.json"
TEMP_SUFFIX = ".partial"


class RunLockedError(RuntimeError):
    """Another live process is writing the same run folder."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent
    )
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def remove_stale_temp_files(run_dir: Path) -> int:
    """Delete temporary files a killed writer left in ``run_dir``; return how many.

    Call only while holding the run lock: a live writer's temp files would go.
    """
    stale = list(Path(run_dir).rglob(f".*{TEMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info("removed %d partial files left by an earlier run", len(stale))
    return len(stale)


@contextmanager
def run_lock(run_dir: Path):
    """Hold the run folder's lock; raise RunLockedError if a live job holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout as e:
        raise RunLockedError(
            f"run folder {run_dir} is being written by another audit job; "
            "wait for it to finish or choose another --run-id"
        ) from e
    try:
        yield
    finally:
        lock.release()


class Checkpoint:
    """The resumable state of one run: finished chunks and merged statistics.

    ``fingerprint`` identifies what the chunks mean (config, dataset, model);
    a checkpoint written under another fingerprint is not resumed from, since
    merging its statistics would mix two different audits.
    """

    def __init__(self, run_dir: Path, fingerprint: str):
        self.folder = Path(run_dir) / CHECKPOINT_DIR
        self.fingerprint = fingerprint

    def exists(self) -> bool:
        """Whether a resumable checkpoint is there."""
        return (self.folder / PROGRESS_FILE).is_file()

    def load(self) -> tuple[set[int], dict | None, dict]:
        """``(finished chunk ids, accumulator state or None, extra)``."""
        progress_path = self.folder / PROGRESS_FILE
        if not progress_path.is_file():
            return set(), None, {}
        progress = json.loads(progress_path.read_text())
        if progress.get("fingerprint") != self.fingerprint:
            raise RuntimeError(
                f"checkpoint in {self.folder} belongs to a different configuration, "
                "dataset or model; start a new run id, or delete that folder to restart"
            )
        state_path = self.folder / progress["state"]
        with np.load(state_path, allow_pickle=False) as npz:
            state = {k: npz[k] for k in npz.files}
        return set(progress["done"]), state, progress.get("extra", {})

    def save(self, done: set[int], state: dict, extra: dict) -> None:
        """Write a new state file, then the progress file that names it.

        Until the progress file is replaced it still names the previous state
        file, which is only deleted afterwards: a kill at any point leaves a
        consistent pair.
        """
        step = len(done)
        state_name = f"state-{step:06d}.npz"
        buffer = io.BytesIO()
        np.savez(buffer, **state)
        atomic_write_bytes(self.folder / state_name, buffer.getvalue())
        atomic_write_json(
            self.folder / PROGRESS_FILE,
            {
                "fingerprint": self.fingerprint,
                "state": state_name,
                "done": sorted(done),
                "extra": extra,
            },
        )
        for old in self.folder.glob("state-*.npz"):
            if old.name != state_name:
                old.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove the checkpoint once the run's results are written."""
        if self.folder.is_dir():
            shutil.rmtree(self.folder)
