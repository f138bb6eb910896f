"""Streaming accumulator: hand-computed sums, exact merges, checkpoints."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from audit.accumulate import AuditAccumulator, default_regions, load_region_mask
from audit.occlusion import OcclusionResult


def result(probs, maps, scores, max_drop=None, flipped=None) -> OcclusionResult:
    probs = np.asarray(probs, np.float32)
    n = len(probs)
    return OcclusionResult(
        probs=probs,
        targets=probs.argmax(axis=1),
        window_scores=np.asarray(scores, np.float32),
        maps=np.asarray(maps, np.float32),
        max_drop=np.zeros(n, np.float32) if max_drop is None else np.asarray(max_drop),
        flipped=np.zeros(n, bool) if flipped is None else np.asarray(flipped),
        forward_passes=n * 5,
    )


def random_stream(n, rng, slices=3, classes=4, hw=(8, 8), grid=(2, 2)):
    """Per-image inputs of ``n`` synthetic images."""
    k = grid[0] * grid[1]
    logits = rng.normal(size=(n, classes))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    maps = rng.normal(size=(n, *hw)).astype(np.float32)
    maps[rng.random(n) < 0.05] = 0.0
    return {
        "rows": rng.permutation(n * 2)[:n],
        "labels": rng.integers(0, classes, n),
        "membership": rng.random((n, slices)) < 0.4,
        "probs": probs,
        "maps": maps,
        "scores": rng.normal(size=(n, k)),
        "max_drop": rng.random(n),
        "flipped": rng.random(n) < 0.2,
        "faith": {"deletion_auc": rng.random(n), "insertion_auc": rng.random(n)},
    }


def add_part(acc, stream, part):
    acc.add(
        stream["rows"][part],
        stream["labels"][part],
        stream["membership"][part],
        result(
            stream["probs"][part],
            stream["maps"][part],
            stream["scores"][part],
            stream["max_drop"][part],
            stream["flipped"][part],
        ),
        {k: v[part] for k, v in stream["faith"].items()},
    )


def fresh(slices=3, classes=4, hw=(8, 8), grid=(2, 2)):
    return AuditAccumulator(slices, classes, hw, grid)


def assert_same(a: AuditAccumulator, b: AuditAccumulator, exact_floats=False):
    for key in ("count", "map_count", "class_count", "class_map_count"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    np.testing.assert_array_equal(a.calibration_count, b.calibration_count)
    np.testing.assert_array_equal(a.calibration_correct, b.calibration_correct)
    for key in ("map_sum", "class_map_sum", "calibration_confidence"):
        if exact_floats:
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
        else:
            np.testing.assert_allclose(
                getattr(a, key), getattr(b, key), rtol=1e-12, atol=1e-12
            )
    images_a, images_b = a.images(), b.images()
    for key in images_a.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(images_a, key), getattr(images_b, key))


def test_two_images_by_hand():
    acc = AuditAccumulator(1, 2, (2, 2), (1, 2))
    maps = [[[1.0, -1.0], [2.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]
    probs = [[0.7, 0.3], [0.2, 0.8]]
    scores = [[3.0, -1.0], [0.0, 0.0]]

    acc.add([5, 2], [0, 0], [[True], [False]], result(probs, maps, scores))

    # Image 5: |map| sums to 4, so the normalised map is [[.25, -.25], [.5, 0]].
    np.testing.assert_allclose(acc.map_sum[0], [[0.25, -0.25], [0.5, 0.0]])
    np.testing.assert_allclose(acc.map_sum[-1], acc.map_sum[0])
    assert acc.count.tolist() == [1, 2] and acc.map_count.tolist() == [1, 1]
    assert acc.class_count.tolist() == [[1, 0], [1, 1]]
    # Confidence 0.7 falls in bin 10 of 15, 0.8 in bin 12.
    assert acc.calibration_count[-1].nonzero()[0].tolist() == [10, 12]
    assert acc.calibration_correct[-1, 10] == 1 and acc.calibration_correct[-1, 12] == 0
    assert acc.calibration_confidence[-1, 12] == pytest.approx(0.8)

    images = acc.images()
    assert images.rows.tolist() == [2, 5]
    assert images.correct.tolist() == [False, True]
    assert images.pred.tolist() == [1, 0]
    # On 2x2 images every region is one pixel or more; the top pixel is 10%.
    assert images.concentration[1] == pytest.approx(2.0 / 4.0)
    assert np.isnan(images.concentration[0])
    shares = dict(zip(images.region_names, images.region_shares[1], strict=True))
    assert shares["border"] == pytest.approx(1.0)
    assert shares["top_left"] == pytest.approx(0.25)
    assert shares["bottom_left"] == pytest.approx(0.5)
    np.testing.assert_allclose(images.grid, [[0.0, 0.0], [0.75, -0.25]])
    assert np.isnan(images.deletion_auc).all()


def test_regions_on_mnist_size():
    regions = default_regions(28, 28)

    assert regions["border"].sum() == 28 * 28 - 20 * 20
    assert regions["centre"].sum() == 14 * 14
    quadrants = sum(regions[q] for q in ("top_left", "top_right", "bottom_left"))
    assert (quadrants + regions["bottom_right"] == 1).all()


def test_merge_in_any_order_equals_one_pass():
    rng = np.random.default_rng(3)
    stream = random_stream(300, rng)
    whole = fresh()
    add_part(whole, stream, np.arange(300))

    cuts = np.sort(rng.choice(np.arange(1, 300), 6, replace=False))
    parts = np.split(np.arange(300), cuts)
    pieces = []
    for part in parts:
        piece = fresh()
        add_part(piece, stream, part)
        pieces.append(piece)
    merged = fresh()
    for i in rng.permutation(len(pieces)):
        merged = merged.merge(pieces[i])

    assert_same(whole, merged)


def test_state_round_trips_through_npz_without_pickle(tmp_path):
    rng = np.random.default_rng(4)
    stream = random_stream(50, rng)
    masks = {"marker": np.eye(8, dtype=bool)}
    acc = AuditAccumulator(3, 4, (8, 8), (2, 2), regions=masks)
    add_part(acc, stream, np.arange(50))

    path = tmp_path / "state.npz"
    np.savez(path, **acc.state())
    with np.load(path, allow_pickle=False) as stored:
        back = AuditAccumulator.from_state(stored)

    assert back.region_names == acc.region_names
    assert_same(acc, back, exact_floats=True)
    add_part(back, random_stream(5, rng), np.arange(5))
    assert back.n_images == 55


def test_empty_accumulator_round_trips():
    back = AuditAccumulator.from_state(fresh().state())

    assert back.n_images == 0 and len(back.images()) == 0


def test_faithfulness_for_part_of_a_chunk():
    acc = fresh(slices=1, classes=2, hw=(2, 2), grid=(1, 1))
    probs = [[0.6, 0.4]] * 3
    maps = np.ones((3, 2, 2))
    curves = type("Curves", (), {"deletion_auc": [0.1], "insertion_auc": [0.9]})()

    acc.add(
        [0, 1, 2],
        [0, 0, 0],
        np.ones((3, 1), bool),
        result(probs, maps, [[1]] * 3),
        ([1], curves),
    )

    images = acc.images()
    assert np.isnan(images.deletion_auc[[0, 2]]).all()
    assert images.deletion_auc[1] == pytest.approx(0.1)
    assert images.insertion_auc[1] == pytest.approx(0.9)


def test_mean_maps_and_rest_by_hand():
    acc = AuditAccumulator(2, 2, (1, 2), (1, 1))
    maps = [[[1.0, 0.0]], [[0.0, 1.0]], [[-1.0, 1.0]]]
    probs = [[0.9, 0.1], [0.9, 0.1], [0.1, 0.9]]
    membership = [[True, False], [True, False], [False, False]]

    acc.add([0, 1, 2], [0, 0, 1], membership, result(probs, maps, [[1.0]] * 3))
    got = acc.mean_maps()

    np.testing.assert_allclose(got["slice_maps"][0], [[0.5, 0.5]])
    np.testing.assert_allclose(got["rest_maps"][0], [[-0.5, 0.5]])
    np.testing.assert_allclose(got["overall_map"], [[1.0 / 6.0, 0.5]])
    assert np.isnan(got["slice_maps"][1]).all()
    assert np.isnan(got["slice_class_maps"][0, 1]).all()
    np.testing.assert_allclose(got["slice_class_maps"][0, 0], [[0.5, 0.5]])


def test_bad_chunks_are_refused():
    acc = fresh()
    rng = np.random.default_rng(5)
    stream = random_stream(4, rng)
    add_part(acc, stream, np.arange(4))

    with pytest.raises(ValueError, match="membership has shape"):
        acc.add(
            stream["rows"],
            stream["labels"],
            np.ones((4, 2), bool),
            result(stream["probs"], stream["maps"], stream["scores"]),
        )
    add_part(acc, stream, np.arange(2))
    with pytest.raises(ValueError, match="more than once"):
        acc.images()
    with pytest.raises(ValueError, match="n_classes"):
        fresh().merge(fresh(classes=5))


def test_region_masks_from_files(tmp_path):
    mask = np.zeros((8, 8), bool)
    mask[:2, :2] = True
    np.save(tmp_path / "m.npy", mask)
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")

    assert (load_region_mask(tmp_path / "m.npy", (8, 8, 1)) == mask).all()
    assert (load_region_mask(tmp_path / "m.png", (8, 8)) == mask).all()
    with pytest.raises(ValueError, match="shape"):
        load_region_mask(tmp_path / "m.png", (4, 4))
    with pytest.raises(FileNotFoundError):
        load_region_mask(tmp_path / "none.png", (8, 8))


def test_memory_does_not_hold_pixel_maps():
    rng = np.random.default_rng(6)
    n, hw, grid = 2000, (28, 28), (7, 7)
    acc = AuditAccumulator(4, 10, hw, grid)
    for start in range(0, n, 500):
        stream = random_stream(500, rng, slices=4, classes=10, hw=hw, grid=grid)
        stream["rows"] = np.arange(start, start + 500)
        add_part(acc, stream, np.arange(500))
    acc.images()

    fixed = 5 * 11 * hw[0] * hw[1] * 8 + 5 * 15 * 24 + 6 * hw[0] * hw[1]
    per_image = 8 * (11 + len(acc.region_names)) + 4 * 49
    assert acc.nbytes() <= fixed + n * per_image
    assert acc.nbytes() < n * hw[0] * hw[1] * 4 / 2


def test_state_is_plain_arrays():
    state = fresh().state()
    buffer = io.BytesIO()

    np.savez(buffer, **state)
    buffer.seek(0)

    with np.load(buffer, allow_pickle=False) as stored:
        assert set(stored.files) == set(state)
