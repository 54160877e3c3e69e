"""Where written volumes sit in the world: reconstructions over their inputs."""

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from hagan.api import load_run
from hagan.checkpoint import save_checkpoint
from hagan.cli import main
from hagan.config import build_config, save_yaml
from hagan.errors import HaganError
from hagan.io import read_volume, write_json_atomic, write_volume
from hagan.models import build_model
from hagan.preprocess import preprocess_volume

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
TINY = {"model": {"size": SIZE, "latent_dim": 16, "width": 0.125}}


def edge_corners(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World coordinates (8, 3) of a grid's outer corners (voxel edges, not centres)."""
    voxels = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in shape])))
    return voxels @ affine[:3, :3].T + affine[:3, 3]


def centre(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]


def noise_volume(path: Path, shape: tuple[int, int, int], affine: np.ndarray, seed: int) -> Path:
    """Positive noise everywhere, so that no blank slice is trimmed and the cube covers the whole grid."""
    return write_volume(path, np.random.default_rng(seed).uniform(1, 100, shape).astype(np.float32), affine)


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory) -> Path:
    """An HA-GAN run at its initial weights with the resize fit mode (whose cube edges are the input's)."""
    root = tmp_path_factory.mktemp("fresh-run")
    config = build_config(None, None, [TINY])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(config)
    save_checkpoint(root / "checkpoints", 0, model, {}, torch.Generator().manual_seed(0), {}, keep=1)
    save_yaml(config, root / "config.yaml")
    write_json_atomic(root / "geometry.json", {"reference_affine": np.eye(4).tolist(), "recipe": "mri",
                                               "mode": "resize", "size": SIZE, "num_classes": 0})
    return root


def test_reconstructions_overlay_their_inputs_in_world_space(fresh_run, tmp_path):
    # an LPS-like grid with unequal voxels, an offset and the axes out of order; a plain RAS one elsewhere
    tilted = np.array([[0.0, -1.5, 0.0, 40.0], [-0.8, 0.0, 0.0, -12.0], [0.0, 0.0, 2.5, 7.0], [0, 0, 0, 1]])
    plain = np.array([[1.2, 0.0, 0.0, -90.0], [0.0, 1.2, 0.0, 30.0], [0.0, 0.0, 3.0, -50.0], [0, 0, 0, 1]])
    inputs = [noise_volume(tmp_path / "tilted.nii.gz", (20, 24, 16), tilted, 0),
              noise_volume(tmp_path / "plain.nii.gz", (18, 22, 12), plain, 1)]
    out = tmp_path / "recon"
    assert main(["reconstruct", str(fresh_run), *map(str, inputs), "--out", str(out), "--device", "cpu"]) == 0
    written = [nib.load(out / f"reconstruction_{i:04d}.nii.gz") for i in range(len(inputs))]
    for path, recon in zip(inputs, written):
        source = nib.load(path)
        assert recon.shape == (SIZE,) * 3
        np.testing.assert_allclose(centre(recon.shape, recon.affine), centre(source.shape, source.affine), atol=1e-3)
        for box in (np.min, np.max):
            np.testing.assert_allclose(box(edge_corners(recon.shape, recon.affine), axis=0),
                                       box(edge_corners(source.shape, source.affine), axis=0), atol=1e-3)
    assert not np.allclose(written[0].affine, written[1].affine)


def test_run_save_writes_each_volume_with_its_own_affine(fresh_run, tmp_path):
    path = noise_volume(tmp_path / "scan.nii.gz", (20, 24, 16), np.diag([1.5, 0.8, 2.5, 1.0]), 0)
    run = load_run(fresh_run, device="cpu")
    cube = preprocess_volume(read_volume(path), run.geometry["recipe"], run.size, run.geometry["mode"])
    recon = run.reconstruct(cube.array)
    [written] = run.save(recon, tmp_path / "recon", prefix="reconstruction", affines=[cube.affine])
    np.testing.assert_allclose(nib.load(written).affine, cube.affine, atol=1e-6)
    with pytest.raises(HaganError, match="save: 1 affines for 2 volumes; give one per volume"):
        run.save(np.concatenate([recon, recon]), tmp_path / "two", affines=[cube.affine])
    assert not (tmp_path / "two").exists()
