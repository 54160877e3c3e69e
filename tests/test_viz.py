import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from hagan.viz import montage_grid, montage_tensor, plot_curves, three_plane_montage


def ball(shape=(20, 24, 22), value: float = 0.5) -> np.ndarray:
    """A ball with a bright block in the superior (high axis 0) half, to tell up from down."""
    d, h, w = np.meshgrid(*(np.arange(n) - n / 2 for n in shape), indexing="ij")
    volume = np.where(d**2 + h**2 + w**2 < (min(shape) / 3) ** 2, value, -1.0).astype(np.float32)
    volume[-4:, shape[1] // 2 - 2 : shape[1] // 2 + 2, shape[2] // 2 - 2 : shape[2] // 2 + 2] = 1.0
    return volume


def read_png(path) -> np.ndarray:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image


def test_three_plane_montage_writes_a_png_that_depends_on_the_volumes(tmp_path):
    path = three_plane_montage([ball(), ball()], tmp_path / "a.png", titles=["real", "fake"])
    other = three_plane_montage([ball(), ball(value=-0.5)], tmp_path / "b.png")
    assert path == tmp_path / "a.png"
    first, second = read_png(path), read_png(other)
    assert first.shape[0] > 100 and first.shape[1] > first.shape[0]  # two rows of three panels
    assert first.shape == second.shape and not np.array_equal(first, second)


def test_three_plane_montage_compact_layout_for_many_volumes(tmp_path):
    one_per_row = read_png(three_plane_montage([ball()] * 4, tmp_path / "four.png"))
    grid = read_png(three_plane_montage([ball()] * 16, tmp_path / "sixteen.png"))
    assert one_per_row.shape[0] > one_per_row.shape[1]
    assert grid.shape[1] > grid.shape[0]  # 4 rows of 4 volumes x 3 panels
    with pytest.raises(ValueError, match="1 to 16"):
        three_plane_montage([ball()] * 17, tmp_path / "too_many.png")


def test_three_plane_montage_rejects_mismatched_titles_and_non_3d(tmp_path):
    with pytest.raises(ValueError, match="titles"):
        three_plane_montage([ball()], tmp_path / "x.png", titles=["a", "b"])
    with pytest.raises(ValueError, match="3D"):
        three_plane_montage([np.zeros((4, 4))], tmp_path / "x.png")


def test_writes_are_atomic_and_overwrite(tmp_path):
    out = tmp_path / "figures"
    three_plane_montage([ball()], out / "montage.png")
    wide = read_png(out / "montage.png").shape
    montage_grid([ball()] * 4, out / "montage.png")
    plot_curves({"loss/D": [(0, 1.0), (1, 0.5)]}, out / "curves.png")
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "montage.png"]
    assert read_png(out / "montage.png").shape != wide


def test_failed_write_leaves_neither_temp_nor_final_file(tmp_path, monkeypatch):
    def fail_midway(self, fname, **kwargs):
        open(fname, "wb").write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        montage_grid([ball()], tmp_path / "grid.png")
    assert list(tmp_path.iterdir()) == []


def test_montage_grid_accepts_sample_tensors(tmp_path):
    samples = [torch.from_numpy(ball(value=v))[None] for v in (-0.5, 0.0, 0.5, 0.9)]
    image = read_png(montage_grid(samples, tmp_path / "grid.png", titles=list("abcd")))
    assert image[..., :3].std() > 0.05


def test_plot_curves_groups_by_prefix_and_smooths(tmp_path):
    rng = np.random.default_rng(0)
    scalars = {
        "loss/D": [(i, float(v)) for i, v in enumerate(rng.normal(size=200))],
        "loss/G": [(i, float(v)) for i, v in enumerate(rng.normal(size=200))],
        "aug/p": [(i, i / 400) for i in range(200)],
    }
    raw = read_png(plot_curves(scalars, tmp_path / "raw.png", title="run"))
    smooth = read_png(plot_curves(scalars, tmp_path / "smooth.png", smoothing=0.9))
    single = read_png(plot_curves({"loss/D": scalars["loss/D"]}, tmp_path / "one.png"))
    assert raw.shape[0] > 1.5 * single.shape[0]  # two subplots: "loss" and "aug"
    assert raw.shape == smooth.shape and not np.array_equal(raw, smooth)
    with pytest.raises(ValueError, match="smoothing"):
        plot_curves(scalars, tmp_path / "bad.png", smoothing=1.0)


def test_montage_tensor_shape_range_and_orientation():
    volumes = torch.from_numpy(np.stack([ball()] * 5))[:, None]  # (5, 1, D=20, H=24, W=22)
    image = montage_tensor(volumes)
    assert image.shape == (3, 4 * 24, 3 * 24)  # four volumes; tiles fit the largest plane
    assert image.dtype == np.float32 and image.min() == 0.0 and image.max() == 1.0
    coronal = image[0, :24, 24:48]
    bright_rows = np.nonzero((coronal == 1.0).any(axis=1))[0]
    assert bright_rows.max() < 12  # the superior block is drawn at the top
    assert not np.array_equal(montage_tensor(-volumes), image)
