"""The run folder module: importable without torch, and the one way inputs are prepared for a run."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from hagan.data.io import write_volume
from hagan.run_folder import iteration_name, prepare_inputs, volume_paths

SIZE = 16


def test_importing_the_run_folder_module_does_not_import_torch():
    code = "import sys, hagan.run_folder; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                                     os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "False"


def test_checkpoint_folders_and_sample_montages_sort_by_iteration():
    assert iteration_name(7) == "iter_00000007"
    assert sorted(iteration_name(i) for i in (10, 9, 100)) == [iteration_name(i) for i in (9, 10, 100)]


def test_folders_expand_to_their_volumes_and_an_empty_folder_stays_to_be_reported(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "empty").mkdir()
    for name in ("b.npy", "a.npy"):
        np.save(tmp_path / "data" / name, np.zeros((2, 2, 2), np.float32))
    given = tmp_path / "given.nii.gz"
    assert volume_paths([given, tmp_path / "data", tmp_path / "empty"]) == [
        given, tmp_path / "data" / "a.npy", tmp_path / "data" / "b.npy", tmp_path / "empty"]


def test_prepare_inputs_skips_a_bad_file_with_one_line_and_keeps_the_good_with_its_affine(tmp_path, capfd):
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = (-40.0, 25.0, 10.0)
    shape = (20, 24, 12)
    write_volume(tmp_path / "good.nii.gz", rng.uniform(-800, 300, shape).astype(np.float32), affine)
    (tmp_path / "broken.nii.gz").write_bytes(b"not a volume")
    paths = volume_paths([tmp_path])
    assert [p.name for p in paths] == ["broken.nii.gz", "good.nii.gz"]

    prepared = list(prepare_inputs(paths, "ct", SIZE, "resize_keep_aspect"))

    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("skipped ") and "broken.nii.gz" in err
    assert [(p.index, p.path.name) for p in prepared] == [(1, "good.nii.gz")]
    cube = prepared[0].cube
    assert cube.array.shape == (SIZE,) * 3 and cube.array.dtype == np.float32
    assert -1 <= cube.array.min() < cube.array.max() <= 1
    # the cube overlays its input: both centres are the same point in world space
    assert np.allclose(world_centre(cube.affine, cube.array.shape), world_centre(affine, shape), atol=2.0)


def world_centre(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3]
