"""Slices: names, bins, intersections, missing values, untrusted text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from audit.slices import MISSING, NumericBinning, SliceSet, SliceSettings

WRITERS = Path(__file__).resolve().parent / "data" / "mnist_test_writers.csv"


def table(**columns) -> pd.DataFrame:
    n = len(next(iter(columns.values())))
    frame = pd.DataFrame({"id": [f"img-{i}" for i in range(n)], "label": [0] * n})
    for name, values in columns.items():
        frame[name] = values
    return frame


def members(slice_set: SliceSet, name: str) -> list[int]:
    return np.flatnonzero(slice_set.membership[:, slice_set.names.index(name)]).tolist()


def test_categorical_slices_with_missing_values_kept():
    data = table(group=["a", "b", None, "a", np.nan])

    got = SliceSet.build(data, SliceSettings(columns=["group"]))

    assert got.names == ["group=a", "group=b", f"group={MISSING}"]
    assert [s.n for s in got.slices] == [2, 1, 2]
    assert members(got, f"group={MISSING}") == [2, 4]
    assert got.slices[0].columns == ("group",) and got.slices[0].values == ("a",)
    assert got.membership.shape == (5, 3)
    assert (got.membership.sum(axis=1) == 1).all()


def test_numbers_as_categories_sort_numerically():
    got = SliceSet.build(table(size=[10, 9, 100, 9]), SliceSettings(columns=["size"]))

    assert got.names == ["size=9", "size=10", "size=100"]


def test_quantile_bins_by_hand():
    data = table(x=[1.0, 2, 3, 4, 5, 6, 7, 8])
    settings = SliceSettings(numeric=[NumericBinning(column="x", bins=4)])

    got = SliceSet.build(data, settings)

    # np.quantile edges of 1..8: 1, 2.75, 4.5, 6.25, 8; the last bin is closed.
    assert got.names == [
        "x=q1 [1, 2.75)",
        "x=q2 [2.75, 4.5)",
        "x=q3 [4.5, 6.25)",
        "x=q4 [6.25, 8]",
    ]
    assert [members(got, n) for n in got.names] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_ties_merge_quantile_bins_and_nan_gets_its_own_slice():
    data = table(x=[0.0, 0, 0, 0, 0, 1, np.nan])
    settings = SliceSettings(numeric=[NumericBinning(column="x", bins=4)])

    got = SliceSet.build(data, settings)

    assert got.names == ["x=q1 [0, 1]", f"x={MISSING}"]
    assert [s.n for s in got.slices] == [6, 1]


def test_given_edges_with_values_outside():
    data = table(age=[5, 20, 25, 30, 40, 41])
    settings = SliceSettings(numeric=[NumericBinning(column="age", edges=[20, 30, 40])])

    got = SliceSet.build(data, settings)

    assert got.names == ["age=< 20", "age=[20, 30)", "age=[30, 40]", "age=> 40"]
    assert [members(got, n) for n in got.names] == [[0], [1, 2], [3, 4], [5]]


def test_derived_attributes_are_binned_and_required():
    values = {"thickness": np.array([1.0, 2, 3, 4, np.nan, 6])}
    settings = SliceSettings(derived=["thickness"], derived_bins=2)

    got = SliceSet.build(table(g=list("aabbcc")), settings, values)

    assert got.names == [
        "thickness=q1 [1, 3)",
        "thickness=q2 [3, 6]",
        "thickness=<missing>",
    ]
    with pytest.raises(ValueError, match="not measured"):
        SliceSet.build(table(g=list("aabbcc")), settings)


def test_intersections_name_and_membership():
    data = table(g=["a", "a", "b", "b", "b"], h=["x", "y", "x", "x", None])
    settings = SliceSettings(columns=["g", "h"], intersections=[["g", "h"]])

    got = SliceSet.build(data, settings)

    crossed = [s for s in got.slices if len(s.columns) == 2]
    assert [s.name for s in crossed] == [
        "g=a & h=x",
        "g=a & h=y",
        "g=b & h=x",
        f"g=b & h={MISSING}",
    ]
    assert [s.n for s in crossed] == [1, 1, 2, 1]
    assert crossed[2].values == ("b", "x") and crossed[2].family == "g & h"
    expected = (
        got.membership[:, got.names.index("g=b")]
        & got.membership[:, got.names.index("h=x")]
    )
    assert members(got, "g=b & h=x") == np.flatnonzero(expected).tolist()


def test_untrusted_values_are_kept_as_plain_text():
    hostile = ["{0.__class__}", "<script>alert(1)</script>", "a & b=c", "%s%n"]
    data = table(source=hostile)

    got = SliceSet.build(data, SliceSettings(columns=["source"]))

    assert sorted(s.values[0] for s in got.slices) == sorted(hostile)
    assert "source={0.__class__}" in got.names
    assert "source=<script>alert(1)</script>" in got.names


def test_a_literal_missing_marker_next_to_missing_values_is_refused():
    with pytest.raises(ValueError, match="rename that value"):
        SliceSet.build(table(g=[MISSING, None]), SliceSettings(columns=["g"]))


def test_configuration_errors_name_the_problem():
    with pytest.raises(ValueError, match="not in the dataset"):
        SliceSet.build(table(g=["a"]), SliceSettings(columns=["nope"]))
    with pytest.raises(ValueError, match="not a number"):
        SliceSet.build(
            table(g=["a", "b"]), SliceSettings(numeric=[NumericBinning(column="g")])
        )
    with pytest.raises(ValidationError, match="not slice columns"):
        SliceSettings(columns=["g"], intersections=[["g", "h"]])
    with pytest.raises(ValidationError, match="more than once"):
        SliceSettings(columns=["g"], numeric=[NumericBinning(column="g")])
    with pytest.raises(ValidationError, match="increase"):
        NumericBinning(column="x", edges=[2, 1])
    with pytest.raises(ValidationError):
        SliceSettings(derived=["roundness"])


def test_every_family_partitions_the_rows():
    rng = np.random.default_rng(0)
    data = table(
        g=rng.choice(["a", "b", None], 200),
        x=np.where(rng.random(200) < 0.1, np.nan, rng.normal(size=200)),
    )
    settings = SliceSettings(
        columns=["g"], numeric=[NumericBinning(column="x")], intersections=[["g", "x"]]
    )

    got = SliceSet.build(data, settings)

    for family in {s.family for s in got.slices}:
        index = [i for i, s in enumerate(got.slices) if s.family == family]
        assert (got.membership[:, index].sum(axis=1) == 1).all()
    assert got.rows_membership([3, 1]).tolist() == got.membership[[3, 1]].tolist()
    assert got.describe()[0] == {
        "name": got.slices[0].name,
        "columns": ["g"],
        "values": [got.slices[0].values[0]],
        "n": got.slices[0].n,
    }


def test_writer_manifest_gives_many_small_slices():
    writers = pd.read_csv(WRITERS, comment="#")
    data = table(writer=writers["writer_id"].to_numpy())

    got = SliceSet.build(data, SliceSettings(columns=["writer"]))

    assert len(got) == 297
    assert sum(s.n for s in got.slices) == 10000
    small = sum(s.n < got.min_slice_size for s in got.slices)
    assert small > len(got) / 2
