"""Slices: named groups of images that the audit compares with the rest.

A slice is every image whose attribute takes one value: ``writer_group=census``
for a categorical column, ``thickness=q1 [1.8, 2.3)`` for a quantile bin of a
numeric or derived attribute, and ``writer_group=census & thickness=q1 [1.8,
2.3)`` for an intersection. The slices of one column (or of one intersection)
form a *family*: they never overlap and together they hold every image, since
missing values get a slice of their own (``column=<missing>``) instead of
being dropped. Empty intersections are left out.

Values are data, not code: they are compared and shown, never evaluated or
used as format strings. Escaping them for HTML is the report's job.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from audit.morphometry import DERIVED_ATTRIBUTES

logger = logging.getLogger(__name__)

MISSING = "<missing>"
INTERSECTION_JOIN = " & "

UNKNOWN_COLUMN = (
    "slice column {column!r} is not in the dataset; its columns are {available}"
)
MISSING_DERIVED = (
    "derived attributes {names} were asked for but not measured; pass their "
    "values (audit.morphometry.measure) to SliceSet.build"
)
MISSING_CLASH = (
    "column {column!r} holds the text {missing!r} and also has missing values; "
    "rename that value so the two slices can be told apart"
)

DerivedName = Literal[DERIVED_ATTRIBUTES]


class NumericBinning(BaseModel):
    """How one numeric column is cut into slices.

    ``bins`` quantile bins (equal counts, ties kept together, so fewer bins
    may result), or explicit ``edges``: bins ``[e0, e1)``, ..., ``[e(k-1),
    ek]``, plus ``< e0`` and ``> ek`` slices for values outside them.
    """

    model_config = ConfigDict(extra="forbid")

    column: str
    bins: int = Field(4, ge=1, le=100)
    edges: list[float] | None = None

    @field_validator("edges")
    @classmethod
    def _increasing(cls, edges):
        if edges is not None:
            if len(edges) < 2:
                raise ValueError(f"edges need at least two values; got {edges}")
            if any(b <= a for a, b in itertools.pairwise(edges)):
                raise ValueError(f"edges must increase strictly; got {edges}")
            if not all(np.isfinite(edges)):
                raise ValueError(f"edges must be finite numbers; got {edges}")
        return edges


class SliceSettings(BaseModel):
    """Which slices the audit compares.

    ``columns`` are categorical (one slice per distinct value), ``numeric``
    columns are binned, ``derived`` image attributes (see
    :mod:`audit.morphometry`) are measured and cut into ``derived_bins``
    quantile bins, and each entry of ``intersections`` (two or more of those
    column names) crosses their slices. Slices with fewer than
    ``min_slice_size`` audited images are reported as too few to judge.
    """

    model_config = ConfigDict(extra="forbid")

    columns: list[str] = Field(default_factory=list)
    numeric: list[NumericBinning] = Field(default_factory=list)
    derived: list[DerivedName] = Field(default_factory=list)
    derived_bins: int = Field(4, ge=1, le=100)
    intersections: list[list[str]] = Field(default_factory=list)
    min_slice_size: int = Field(30, ge=2)

    @model_validator(mode="after")
    def _consistent(self):
        named = self.column_names
        duplicated = {c for c in named if named.count(c) > 1}
        if duplicated:
            raise ValueError(
                f"slice columns {sorted(duplicated)} are listed more than once "
                "(columns, numeric and derived must not overlap)"
            )
        for combo in self.intersections:
            if len(combo) < 2 or len(set(combo)) != len(combo):
                raise ValueError(
                    f"an intersection needs two or more different columns; got {combo}"
                )
            unknown = [c for c in combo if c not in named]
            if unknown:
                raise ValueError(
                    f"intersection {combo} uses {unknown}, which are not slice "
                    f"columns; slice columns are {named}"
                )
        return self

    @property
    def column_names(self) -> list[str]:
        """Every single-column family, in slice order."""
        return (
            list(self.columns)
            + [b.column for b in self.numeric]
            + [str(d) for d in self.derived]
        )


@dataclass(frozen=True)
class Slice:
    """One slice: its name, the columns and values that define it, its size.

    ``n`` counts the rows of the dataset table; the analysis counts the
    audited images (skipped images are not in any result).
    """

    name: str
    columns: tuple[str, ...]
    values: tuple[str, ...]
    n: int

    @property
    def family(self) -> str:
        return INTERSECTION_JOIN.join(self.columns)


class SliceSet:
    """Slices of a dataset and which rows belong to each.

    ``membership`` is a boolean ``(N, S)`` matrix: row ``i`` of the dataset is
    in slice ``j`` when ``membership[i, j]``. ``attributes`` holds the value
    label of every row in every single-column family (a ``(N, F)`` table of
    strings), which the intersections were built from.
    """

    def __init__(self, slices, membership, min_slice_size, attributes):
        self.slices: list[Slice] = list(slices)
        self.membership = np.asarray(membership, dtype=bool)
        self.min_slice_size = int(min_slice_size)
        self.attributes: pd.DataFrame = attributes
        if self.membership.shape[1] != len(self.slices):
            raise ValueError(
                f"membership has {self.membership.shape[1]} columns for "
                f"{len(self.slices)} slices"
            )

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slices]

    @property
    def n_rows(self) -> int:
        return self.membership.shape[0]

    def rows_membership(self, rows) -> np.ndarray:
        """``(len(rows), S)`` membership of the given dataset rows."""
        return self.membership[np.asarray(rows, dtype=np.int64)]

    @classmethod
    def build(
        cls,
        table: pd.DataFrame,
        settings: SliceSettings,
        derived: pd.DataFrame | dict | None = None,
    ) -> SliceSet:
        """The slices of a dataset table.

        Parameters
        ----------
        table:
            One row per image (``id``, ``label`` and attribute columns); row
            ``i`` is image ``i``.
        settings:
            Which columns to slice and how.
        derived:
            Values of the derived attributes named in ``settings.derived``
            (name -> ``(N,)`` array, or a table), from
            :func:`audit.morphometry.measure`; NaN where an image could not be
            measured.
        """
        return _build(table, settings, derived)

    def describe(self) -> list[dict]:
        """JSON-ready list of the slices (name, columns, values, n)."""
        return [
            {
                "name": s.name,
                "columns": list(s.columns),
                "values": list(s.values),
                "n": s.n,
            }
            for s in self.slices
        ]


def _build(
    table: pd.DataFrame,
    settings: SliceSettings,
    derived: pd.DataFrame | dict | None = None,
) -> SliceSet:
    """The :class:`SliceSet` of a dataset table (see :meth:`SliceSet.build`)."""
    table = table.reset_index(drop=True)
    derived_table = pd.DataFrame(derived) if derived is not None else pd.DataFrame()
    missing = [d for d in settings.derived if d not in derived_table.columns]
    if missing:
        raise ValueError(MISSING_DERIVED.format(names=missing))
    if len(derived_table) and len(derived_table) != len(table):
        raise ValueError(
            f"derived attributes have {len(derived_table)} rows, the table {len(table)}"
        )
    for column in settings.columns + [b.column for b in settings.numeric]:
        if column not in table.columns:
            raise ValueError(
                UNKNOWN_COLUMN.format(column=column, available=list(table.columns))
            )

    labels: dict[str, pd.Categorical] = {}
    for column in settings.columns:
        labels[column] = _categorical(table[column], column)
    for binning in settings.numeric:
        labels[binning.column] = _binned(table[binning.column], binning)
    for name in settings.derived:
        labels[name] = _binned(
            derived_table[name].reset_index(drop=True),
            NumericBinning(column=name, bins=settings.derived_bins),
        )

    slices: list[Slice] = []
    columns: list[np.ndarray] = []
    for column, categories in labels.items():
        for value in categories.categories:
            member = np.asarray(categories == value)
            slices.append(
                Slice(f"{column}={value}", (column,), (value,), int(member.sum()))
            )
            columns.append(member)
    for combo in settings.intersections:
        for values, member in _crossed([labels[c] for c in combo]):
            name = INTERSECTION_JOIN.join(
                f"{c}={v}" for c, v in zip(combo, values, strict=True)
            )
            slices.append(Slice(name, tuple(combo), values, int(member.sum())))
            columns.append(member)

    membership = (
        np.stack(columns, axis=1) if columns else np.zeros((len(table), 0), dtype=bool)
    )
    attributes = pd.DataFrame(
        {c: np.asarray(v, dtype=object) for c, v in labels.items()}
    )
    small = sum(s.n < settings.min_slice_size for s in slices)
    logger.info(
        "%d slices over %d images (%d below the minimum size %d)",
        len(slices),
        len(table),
        small,
        settings.min_slice_size,
    )
    return SliceSet(slices, membership, settings.min_slice_size, attributes)


def _categorical(values: pd.Series, column: str) -> pd.Categorical:
    """Each value as text, missing values as :data:`MISSING`; sorted categories."""
    absent = values.isna().to_numpy()
    text = np.array(
        [MISSING if a else str(v) for v, a in zip(values, absent, strict=True)],
        dtype=object,
    )
    if absent.any() and (text[~absent] == MISSING).any():
        raise ValueError(MISSING_CLASH.format(column=column, missing=MISSING))
    present = sorted(set(text[~absent].tolist()), key=_natural_key)
    categories = present + ([MISSING] if absent.any() else [])
    return pd.Categorical(text, categories=categories)


def _natural_key(text: str):
    """Numbers in numeric order, then everything else in text order."""
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def _binned(values: pd.Series, binning: NumericBinning) -> pd.Categorical:
    """Bin labels of a numeric column; missing values get :data:`MISSING`."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    not_numeric = values.notna().to_numpy() & np.isnan(numbers)
    if not_numeric.any():
        example = values[not_numeric].iloc[0]
        raise ValueError(
            f"numeric slice column {binning.column!r} holds {example!r}, which is "
            "not a number; list the column under 'columns' to slice it by value"
        )
    absent = ~np.isfinite(numbers)
    present = numbers[~absent]

    if binning.edges is not None:
        names, codes = _edge_bins(present, np.asarray(binning.edges, dtype=np.float64))
    else:
        names, codes = _quantile_bins(present, binning.bins)

    text = np.full(len(numbers), MISSING, dtype=object)
    text[~absent] = np.asarray(names, dtype=object)[codes] if len(codes) else []
    used = [names[i] for i in np.unique(codes)]
    return pd.Categorical(text, categories=used + ([MISSING] if absent.any() else []))


def _quantile_bins(values: np.ndarray, bins: int) -> tuple[list[str], np.ndarray]:
    if len(values) == 0:
        return [], np.zeros(0, dtype=np.int64)
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)))
    if len(edges) == 1:
        edges = np.array([edges[0], edges[0]])
    codes = np.searchsorted(edges[1:-1], values, side="right")
    names = []
    for i, (low, high) in enumerate(itertools.pairwise(edges)):
        closing = "]" if i == len(edges) - 2 else ")"
        names.append(f"q{i + 1} [{_number(low)}, {_number(high)}{closing}")
    return names, codes


def _edge_bins(values: np.ndarray, edges: np.ndarray) -> tuple[list[str], np.ndarray]:
    inner = [
        f"[{_number(low, 6)}, {_number(high, 6)}{']' if i == len(edges) - 2 else ')'}"
        for i, (low, high) in enumerate(itertools.pairwise(edges))
    ]
    names = [f"< {_number(edges[0], 6)}", *inner, f"> {_number(edges[-1], 6)}"]
    codes = np.searchsorted(edges, values, side="right")
    codes[values == edges[-1]] = len(edges) - 1
    return names, codes


def _number(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}"


def _crossed(families: list[pd.Categorical]):
    """Non-empty combinations of the families' values with their membership."""
    codes = np.stack([f.codes for f in families], axis=1)
    combos, inverse = np.unique(codes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    for k, combo in enumerate(combos):
        values = tuple(
            str(f.categories[c]) for f, c in zip(families, combo, strict=True)
        )
        yield values, inverse == k
