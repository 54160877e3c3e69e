"""Edge sketches: where Canny puts edges, how thick, which survive hysteresis, and how labels and sizes work."""

import numpy as np
import pytest

from hagan.errors import HaganError
from hagan.models.patch.sketch import canny_edges, overlay_labels, resize, resize_labels, sketch


def ball(size: int, radius: float) -> np.ndarray:
    """A smooth-edged ball in [-1, 1], so its surface sits at ``radius`` to sub-voxel accuracy."""
    grid = np.indices((size,) * 3, dtype=np.float32) - (size - 1) / 2
    distance = np.sqrt((grid**2).sum(axis=0))
    return np.clip(radius - distance, -1, 1).astype(np.float32)


def test_step_edge_is_one_voxel_thick_plane():
    volume = np.full((24, 24, 24), -1.0, np.float32)
    volume[:, :, 12:] = 1.0
    edges = canny_edges(volume)
    assert edges.sum() == 24 * 24
    assert set(np.nonzero(edges)[2]) == {11}


def test_ball_edges_lie_on_its_surface():
    size, radius = 40, 12.0
    edges = canny_edges(ball(size, radius))
    grid = np.indices((size,) * 3) - (size - 1) / 2
    distance = np.sqrt((grid**2).sum(axis=0))[edges]
    assert np.abs(distance - radius).max() <= 1.0
    area = 4 * np.pi * radius**2
    assert 0.8 * area < edges.sum() < 1.6 * area  # a thin shell, not a thick band


def test_hysteresis_keeps_weak_edges_only_when_they_reach_a_strong_one():
    weak = 0.19  # relative to the strongest gradient (a corner of the strong step), between 0.1 and 0.2
    isolated = np.zeros((32, 32, 32), np.float32)
    isolated[:, :, 6:] = 1.0
    isolated[12:20, 12:20, 20:28] += weak
    edges = canny_edges(isolated)
    assert edges[:, :, :15].sum() == 32 * 32 and edges[:, :, 15:].sum() == 0
    assert canny_edges(isolated, low=0.05, high=0.1)[:, :, 15:].sum() > 0
    joined = np.zeros((32, 32, 32), np.float32)
    joined[:, :16, 6:] = 1.0
    joined[:, 16:, 6:] = weak  # the same plane, continuing at the weak contrast
    assert canny_edges(joined)[:, 20:, :].sum() == 32 * 12


def test_sketch_weights_edges_by_gradient_and_leaves_background_at_minus_one():
    volume = np.zeros((32, 32, 32), np.float32)
    volume[:, :, 8:] = 1.0
    volume[:, :, 20:] = 1.5  # a step half as strong
    drawing = sketch(volume)
    assert drawing.dtype == np.float32 and drawing.min() == -1.0 and drawing.max() == pytest.approx(1.0)
    strong, weak = drawing[:, :, 6:9].max(), drawing[:, :, 18:22].max()
    assert strong == pytest.approx(1.0) and weak == pytest.approx(0.0, abs=0.05)  # 0.5 of the range -> 0
    assert (drawing[:, :, 11:17] == -1).all()


def test_sketch_follows_a_shifted_volume():
    volume = np.full((32, 32, 32), -1.0, np.float32)
    volume[6:20, 8:18, 5:22] = 0.5
    shifted = np.roll(volume, (3, -2, 4), axis=(0, 1, 2))
    assert np.array_equal(np.roll(sketch(volume), (3, -2, 4), axis=(0, 1, 2)), sketch(shifted))


def test_labels_are_drawn_as_flat_levels_over_the_edges():
    volume = ball(24, 8.0)
    labels = np.zeros((24, 24, 24), np.int16)
    labels[10:14, 10:14, 10:14] = 2
    labels[2:4, 2:4, 2:4] = 9  # above the levels: drawn at the top level
    drawing = sketch(volume, labels=labels)
    assert (drawing[10:14, 10:14, 10:14] == 0.0).all()  # 2 / 4 of [0, 1] -> 0 in [-1, 1]
    assert (drawing[2:4, 2:4, 2:4] == 1.0).all()
    assert np.array_equal(drawing[labels == 0], sketch(volume)[labels == 0])
    with pytest.raises(HaganError, match="label map shape"):
        overlay_labels(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))


def test_bad_volumes_and_thresholds_raise_one_line_errors():
    with pytest.raises(HaganError, match="3D volume"):
        sketch(np.zeros((8, 8)))
    with pytest.raises(HaganError, match="NaN"):
        sketch(np.full((8, 8, 8), np.nan, np.float32))
    with pytest.raises(HaganError, match="thresholds"):
        canny_edges(np.zeros((8, 8, 8)), low=0.3, high=0.2)
    assert not canny_edges(np.zeros((8, 8, 8), np.float32)).any()


def test_resize_averages_blocks_and_interpolates_up():
    volume = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    half = resize(volume, 8)
    assert half.shape == (8, 8, 8)
    assert half[0, 0, 0] == pytest.approx(volume[:2, :2, :2].mean(), abs=1e-6)
    assert resize(volume, (32, 32, 32)).shape == (32, 32, 32)
    assert np.array_equal(resize(volume, 16), volume)
    labels = np.random.default_rng(1).integers(0, 5, (16, 16, 16))
    for size in (8, 32):
        resized = resize_labels(labels, size)
        assert resized.shape == (size,) * 3 and set(np.unique(resized)) <= set(range(5))
