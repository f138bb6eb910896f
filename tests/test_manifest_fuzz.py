"""Property-based fuzzing of the manifest reader: any bytes give a dataset or a
DatasetError, never another exception, and accepted paths stay in the root."""

from __future__ import annotations

import string

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit.datasets import DatasetError, manifest_dataset

CLASSES = [str(d) for d in range(10)]
path_text = st.text(alphabet=string.ascii_letters + "./\\_-~ \x00é", max_size=20)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes_are_a_dataset_or_a_clear_error(tmp_path, raw):
    manifest = tmp_path / "fuzz.csv"
    manifest.write_bytes(raw)
    try:
        dataset = manifest_dataset(manifest, tmp_path, CLASSES, (28, 28, 1))
    except DatasetError as e:
        assert str(e)
        return
    loaded = dataset.load(np.arange(len(dataset)))
    assert len(loaded.rows) + len(loaded.skipped) == len(dataset)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    paths=st.lists(path_text, min_size=1, max_size=5, unique=True),
    labels=st.lists(
        st.sampled_from([*CLASSES, "x", "-1", "", "10"]), min_size=5, max_size=5
    ),
)
def test_accepted_paths_never_leave_the_root(tmp_path, paths, labels):
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    manifest = tmp_path / "fuzz.csv"
    pd.DataFrame({"path": paths, "label": labels[: len(paths)]}).to_csv(
        manifest, index=False
    )
    try:
        dataset = manifest_dataset(manifest, root, CLASSES, (28, 28, 1))
    except DatasetError as e:
        assert str(e)
        return
    assert set(dataset.labels) <= set(range(10))
    loaded = dataset.load(np.arange(len(dataset)))
    assert len(loaded.rows) == 0
    assert len(loaded.skipped) == len(dataset)
