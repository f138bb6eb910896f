"""Atomic writes, the run-folder lock and checkpoint round trips."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from audit.checkpoint import (
    Checkpoint,
    RunLockedError,
    atomic_write_text,
    remove_stale_temp_files,
    run_lock,
)


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "report.html"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_checkpoint_round_trip_and_old_state_removed(tmp_path):
    cp = Checkpoint(tmp_path, "fp1")
    assert cp.load() == (set(), None, {})
    cp.save({0}, {"a": np.arange(3)}, {"skipped": {}})
    cp.save({0, 1}, {"a": np.arange(4)}, {"skipped": {"7": "missing"}})
    done, state, extra = cp.load()
    assert done == {0, 1}
    np.testing.assert_array_equal(state["a"], np.arange(4))
    assert extra == {"skipped": {"7": "missing"}}
    assert sorted(p.name for p in cp.folder.iterdir()) == [
        "progress.json",
        "state-000002.npz",
    ]
    cp.clear()
    assert not cp.folder.exists()


def test_checkpoint_of_another_configuration_is_not_resumed(tmp_path):
    Checkpoint(tmp_path, "fp1").save({0}, {"a": np.zeros(1)}, {})
    with pytest.raises(RuntimeError, match="different configuration"):
        Checkpoint(tmp_path, "fp2").load()


def test_stale_partial_files_are_removed(tmp_path):
    (tmp_path / ".report.html.abc.partial").write_text("half")
    (tmp_path / "keep.txt").write_text("x")
    assert remove_stale_temp_files(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def _hold_lock(folder, ready):
    with run_lock(folder):
        ready.set()
        time.sleep(60)


def test_second_job_is_refused_and_dead_holder_lock_recovered(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, ready))
    holder.start()
    try:
        assert ready.wait(30)
        with (
            pytest.raises(RunLockedError, match="another audit job"),
            run_lock(tmp_path),
        ):
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
    # The kernel released the dead holder's lock: the next job gets it.
    with run_lock(tmp_path):
        assert (tmp_path / ".lock").exists()


def test_atomic_writes_are_readable_by_others(tmp_path):
    target = tmp_path / "report.html"
    atomic_write_text(target, "shared")
    assert target.stat().st_mode & 0o044 == 0o044
