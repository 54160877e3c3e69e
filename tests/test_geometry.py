"""Where written volumes sit in the world: reconstructions over their inputs, generated volumes in the
canonical geometry (RAS, centred on the origin, the cache's median cube spacing) whatever the file order."""

import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from hagan.api import load_run
from hagan.cli import main
from hagan.config import build_config, save_yaml
from hagan.data.cache import load_manifest
from hagan.data.dataset import CachedVolumeDataset
from hagan.data.io import read_volume, write_json_atomic, write_volume
from hagan.data.preprocess import preprocess_folder, preprocess_volume
from hagan.errors import HaganError
from hagan.models import build_model
from hagan.training.checkpoint import save_checkpoint

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


def cache_in_order(raw: Path, order: list[str], out: Path) -> Path:
    preprocess_folder([raw / f"{name}.nii.gz" for name in order], out, "mri", SIZE, mode="resize", progress=False)
    return out


@pytest.fixture(scope="module")
def spacings_cache(tmp_path_factory) -> tuple[Path, dict[str, tuple[np.ndarray, tuple[int, int, int]]]]:
    """Three RAS files whose cube spacings differ on every axis; b's are the median ones."""
    raw = tmp_path_factory.mktemp("spacings")
    volumes = {"a": (np.array([0.9, 1.0, 1.1]), (20, 30, 16)), "b": (np.array([1.0, 1.3, 2.0]), (24, 28, 20)),
               "c": (np.array([1.5, 1.5, 3.0]), (18, 26, 24))}
    for seed, (name, (spacing, shape)) in enumerate(volumes.items()):
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = (-40.0 * seed, 25.0, 10.0 * seed)
        noise_volume(raw / f"{name}.nii.gz", shape, affine, seed)
    return raw, volumes


def test_generated_geometry_is_canonical_whatever_the_file_order(spacings_cache, tmp_path):
    raw, volumes = spacings_cache
    first = cache_in_order(raw, ["a", "b", "c"], tmp_path / "abc")
    second = cache_in_order(raw, ["c", "b", "a"], tmp_path / "cba")
    affine = CachedVolumeDataset(first).reference_affine
    np.testing.assert_array_equal(affine, CachedVolumeDataset(second).reference_affine)
    np.testing.assert_array_equal(affine, load_manifest(first)["reference_affine"])

    # b's cube spacing: files are R, A, S; cube axes are S, A, R, each stretched to SIZE voxels
    spacing, shape = volumes["b"]
    s, a, r = (np.array(shape) * spacing / SIZE)[::-1]
    expected = np.array([[0, 0, r], [0, a, 0], [s, 0, 0]])
    np.testing.assert_allclose(affine[:3, :3], expected, rtol=1e-6)  # NIfTI headers hold float32
    assert nib.aff2axcodes(affine) == ("S", "A", "R")
    np.testing.assert_allclose(centre((SIZE,) * 3, affine), 0, atol=1e-9)

    # a cache written before the rule holds its first volume's affine; its generated geometry is the same
    manifest_path = second / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["reference_affine"] = manifest["entries"][0]["affine"]
    manifest_path.write_text(json.dumps(manifest))
    np.testing.assert_array_equal(CachedVolumeDataset(second).reference_affine, affine)


def test_generate_writes_the_canonical_geometry(spacings_cache, tmp_path):
    raw, _ = spacings_cache
    canonical = CachedVolumeDataset(cache_in_order(raw, ["a", "b", "c"], tmp_path / "abc")).reference_affine
    cache = cache_in_order(raw, ["c", "a", "b"], tmp_path / "cab")
    run = tmp_path / "run"
    assert main(["train", "--data", str(cache), "--out", str(run), "--size", str(SIZE), "--iterations", "1",
                 "--batch-size", "2", "--device", "cpu", "--set", "model.width=0.125", "--set",
                 "model.latent_dim=16", "--set", "train.sample_every=1", "--set", "train.checkpoint_every=1"]) == 0
    assert main(["generate", str(run), "--n", "1", "--out", str(tmp_path / "gen"), "--device", "cpu"]) == 0
    np.testing.assert_allclose(nib.load(tmp_path / "gen" / "sample_0000.nii.gz").affine, canonical, atol=1e-6)


@pytest.mark.parametrize(("affine", "problem"), [(None, "entry 0 lacks affine"),
                                                  (np.zeros((4, 4)).tolist(), "entry 0 affine is singular")])
def test_a_manifest_entry_without_a_usable_affine_is_refused(spacings_cache, tmp_path, affine, problem):
    raw, _ = spacings_cache
    cache = cache_in_order(raw, ["a", "b"], tmp_path / "cache")
    manifest = json.loads((cache / "manifest.json").read_text())
    if affine is None:
        del manifest["entries"][0]["affine"]
    else:
        manifest["entries"][0]["affine"] = affine
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HaganError, match=problem):
        load_manifest(cache)
