import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hagan.data.cube import canonicalise, fit_to_cube, generated_affine, trim_blank_slices
from hagan.data.intensity import RECIPES, apply_recipe, output_to_model_range, to_output_intensity
from hagan.data.io import Volume, read_volume, write_volume
from hagan.data.preprocess import ensure_cache, preprocess_folder, preprocess_volume
from hagan.errors import HaganError, NoUsableVolumesError, VolumeError

IXI_T1 = Path(__file__).resolve().parents[2] / "shared" / "data" / "ixi-t1-2mm" / "t1"


def world(affine: np.ndarray, index) -> np.ndarray:
    return nib.affines.apply_affine(affine, np.asarray(index, dtype=np.float64))


def head_phantom(shape=(24, 24, 24), seed=0, blank_ends=3) -> np.ndarray:
    """An ellipsoid 'head' with noise, blank planes at both ends of the last (file) axis."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = ((grid / np.array([0.8, 0.7, 0.9])[:, None, None, None]) ** 2).sum(axis=0) < 1
    array = np.where(inside, 500 + 100 * rng.standard_normal(shape), 0).astype(np.float32)
    array[..., :blank_ends] = 0
    array[..., shape[2] - blank_ends :] = 0
    return array


def lps_affine(spacing=(1.0, 1.2, 1.5)) -> np.ndarray:
    """Axis codes L, P, S: the DICOM/ITK convention the reader may meet in a NIfTI."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [30.0, 20.0, -10.0]
    return affine


def test_ct_window_on_known_values():
    hu = np.array([-1024, 600, -212, 3000, np.nan, -3000], dtype=np.float32)
    np.testing.assert_allclose(apply_recipe(hu, "ct"), [-1, 1, 0, 1, -1, -1], atol=1e-6)
    assert apply_recipe(hu, "ct").dtype == np.float32


def test_mri_clips_at_99_9th_percentile():
    array = np.arange(10000, dtype=np.float32).reshape(10, 10, 100)
    array[0, 0, 0] = np.nan
    array[9, 9, 99] = 1e6
    out = apply_recipe(array, "mri")
    high = np.percentile(np.nan_to_num(array, nan=0.0), 99.9)
    assert out[0, 0, 0] == -1.0
    assert out.min() == -1.0 and out.max() == 1.0
    assert np.all(out[np.nan_to_num(array) >= high] == 1.0)
    np.testing.assert_allclose(out[0, 0, 50], 2 * 50 / high - 1, rtol=1e-5)


def test_unknown_recipe_lists_valid_names():
    with pytest.raises(HaganError) as info:
        apply_recipe(np.zeros((2, 2, 2)), "pet")
    for name in RECIPES:
        assert name in str(info.value)


def test_canonicalise_lps_and_psr_keep_world_positions():
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    psr = np.zeros((4, 4))
    psr[:3, :3] = [[0, 0, 2.0], [-1.5, 0, 0], [0, 1.0, 0]]
    psr[:, 3] = [5.0, -3.0, 7.0, 1.0]
    for affine, codes in ((lps_affine(), ("L", "P", "S")), (psr, ("P", "S", "R"))):
        assert nib.aff2axcodes(affine) == codes
        out = canonicalise(Volume(array, affine))
        assert nib.aff2axcodes(out.affine) == ("S", "A", "R")
        voxel = (1, 3, 4)
        (where,) = np.argwhere(out.array == array[voxel])
        np.testing.assert_allclose(world(out.affine, where), world(affine, voxel), atol=1e-6)


def test_trim_removes_only_blank_end_slices_and_keeps_world_positions():
    array = np.full((10, 4, 4), -1.0, dtype=np.float32)
    array[2:8, 1, 1] = 0.5
    array[4] = -1.0  # interior blank plane: must stay
    affine = lps_affine()
    trimmed, new_affine = trim_blank_slices(array, affine)
    assert trimmed.shape == (6, 4, 4)
    np.testing.assert_array_equal(trimmed, array[2:8])
    np.testing.assert_allclose(world(new_affine, (0, 1, 1)), world(affine, (2, 1, 1)))


def test_fit_resize_keeps_centre_and_extent():
    array = np.random.default_rng(0).uniform(-1, 1, (10, 20, 30)).astype(np.float32)
    affine = lps_affine()
    cube, cube_affine = fit_to_cube(array, affine, 16, mode="resize")
    assert cube.shape == (16, 16, 16) and cube.dtype == np.float32
    spacing = np.sqrt((cube_affine[:3, :3] ** 2).sum(axis=0))
    centre_in, centre_out = world(affine, np.array(array.shape) / 2 - 0.5), world(cube_affine, [7.5] * 3)
    assert np.all(np.abs(centre_in - centre_out) <= spacing / 2)
    np.testing.assert_allclose(spacing * 16, np.sqrt((affine[:3, :3] ** 2).sum(axis=0)) * array.shape)


def test_fit_pad_and_crop_shift_origin_exactly():
    array = np.arange(6 * 10 * 20, dtype=np.float32).reshape(6, 10, 20)
    affine = lps_affine()
    cube, cube_affine = fit_to_cube(array, affine, 12, mode="pad")
    assert cube.shape == (12, 12, 12)
    assert cube[0, 0, 0] == -1.0
    for voxel in [(0, 0, 4), (5, 9, 15), (3, 4, 10)]:
        (where,) = np.argwhere(cube == array[voxel])
        np.testing.assert_allclose(world(cube_affine, where), world(affine, voxel))


def test_fit_keep_aspect_gives_isotropic_spacing():
    array = np.zeros((10, 40, 40), dtype=np.float32)
    affine = np.diag([4.0, 1.0, 1.0, 1.0])  # 40 mm in every direction
    cube, cube_affine = fit_to_cube(array, affine, 20)
    assert cube.shape == (20, 20, 20)
    np.testing.assert_allclose(np.sqrt((cube_affine[:3, :3] ** 2).sum(axis=0)), [2.0, 2.0, 2.0])


def test_unknown_fit_mode():
    with pytest.raises(HaganError, match="resize_keep_aspect"):
        fit_to_cube(np.zeros((4, 4, 4)), np.eye(4), 8, mode="stretch")


def test_preprocess_volume_output():
    volume = Volume(head_phantom(), lps_affine())
    cube = preprocess_volume(volume, "mri", 16, mode="resize")
    assert cube.array.shape == (16, 16, 16) and cube.array.dtype == np.float32
    assert cube.array.min() >= -1 and cube.array.max() <= 1
    assert nib.aff2axcodes(cube.affine) == ("S", "A", "R")
    # The blank planes (along the file's S axis) were trimmed: the first cube plane holds anatomy.
    assert cube.array[0].max() > -1


def write_bad_volume(path: Path, kind: str) -> None:
    if kind == "constant":
        array = np.full((24, 24, 24), 7.0, dtype=np.float32)
    elif kind == "all_nan":
        array = np.full((24, 24, 24), np.nan, dtype=np.float32)
    elif kind == "one_slice":
        array = np.zeros((24, 24, 24), dtype=np.float32)
        array[5:10, 5:10, 12] = 100.0
    else:
        array = head_phantom((24, 24, 10), blank_ends=0)
    write_volume(path, array, lps_affine())


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("constant", "constant intensity; nothing to learn"),
        ("all_nan", "no finite voxel values"),
        ("one_slice", "need at least 2"),
        ("too_small", "smaller than the 16x16x16 minimum"),
    ],
)
def test_unusable_volumes_raise_volume_error_naming_the_file(tmp_path, kind, reason):
    path = tmp_path / f"{kind}.nii.gz"
    write_bad_volume(path, kind)
    with pytest.raises(VolumeError) as info:
        preprocess_volume(read_volume(path), "mri", 32, mode="pad", source=str(path))
    assert path.name in str(info.value)
    assert reason in info.value.reason


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        write_volume(src / f"IXI00{i}-HH-100{i}_T1.nii.gz", head_phantom(seed=i), lps_affine())
    (src / "broken.nii.gz").write_bytes(b"")
    write_bad_volume(src / "flat.nii.gz", "constant")
    (src / "readme.txt").write_text("ignored: not a volume extension")
    return src


def test_preprocess_folder_writes_cache_and_reports_bad_files(mixed_folder, tmp_path):
    dst = tmp_path / "cache"
    report = preprocess_folder(mixed_folder, dst, "mri", 16, mode="resize", progress=False)
    manifest = json.loads((dst / "manifest.json").read_text())

    assert manifest["format"] == "hagan-cache/1"
    assert (manifest["recipe"], manifest["size"], manifest["mode"]) == ("mri", 16, "resize")
    assert [e["name"] for e in manifest["entries"]] == [f"IXI00{i}-HH-100{i}_T1" for i in range(3)]
    assert manifest["num_classes"] == 0
    assert manifest["reference_affine"] == generated_affine(manifest).tolist()
    for entry in manifest["entries"]:
        cube = np.load(dst / entry["file"])
        assert cube.shape == (16, 16, 16) and cube.dtype == np.float16
        assert cube.min() >= -1 and cube.max() <= 1
        assert entry["label"] == -1
        assert entry["original_shape"] == [24, 24, 24]
        np.testing.assert_allclose(entry["original_spacing"], [1.0, 1.2, 1.5])
    assert not [p for p in dst.rglob("*") if ".tmp" in p.name]

    assert len(report.entries) == 3 and report.entries[0].trimmed_slices == 6
    lines = report.summary().splitlines()
    assert lines[-2:] == [
        f"{mixed_folder / 'broken.nii.gz'}: empty file (0 bytes)",
        f"{mixed_folder / 'flat.nii.gz'}: constant intensity; nothing to learn",
    ]


def test_rerun_into_same_cache_and_refusals(mixed_folder, tmp_path):
    dst = tmp_path / "cache"
    preprocess_folder(mixed_folder, dst, "mri", 16, progress=False)
    with pytest.raises(HaganError, match="already a hagan cache .recipe=mri, size=16.*pass --force"):
        preprocess_folder(sorted(mixed_folder.glob("IXI000*")), dst, "mri", 16, progress=False)
    preprocess_folder(sorted(mixed_folder.glob("IXI000*")), dst, "mri", 16, progress=False, force=True)
    manifest = json.loads((dst / "manifest.json").read_text())
    assert len(manifest["entries"]) == 1
    assert sorted(p.name for p in (dst / "volumes").iterdir()) == ["IXI000-HH-1000_T1.npy"]

    with pytest.raises(HaganError, match="not a hagan cache"):
        preprocess_folder(mixed_folder, mixed_folder, "mri", 16, progress=False, force=True)


def test_folder_with_only_bad_files(tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "a.nii.gz").write_text("not an image")
    write_bad_volume(src / "b.nii.gz", "all_nan")
    expected = r"no usable volume among 2 files \(first reason: .*a.nii.gz"
    with pytest.raises(NoUsableVolumesError, match=expected):
        preprocess_folder(src, tmp_path / "cache", "mri", 16, progress=False)
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_labels_from_csv_with_ixi_ids(mixed_folder, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("ID,Sex\nIXI000-HH-1000-T1,1\nIXI001-HH-1001-T1,0\n")
    report = preprocess_folder(
        mixed_folder, tmp_path / "cache", "mri", 16, labels_csv=labels, label_column="Sex", progress=False
    )
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert [e["label"] for e in manifest["entries"]] == [1, 0, -1]
    assert manifest["num_classes"] == 2
    assert "IXI002-HH-1002_T1.nii.gz: no label" in report.summary()
    with pytest.raises(HaganError, match="columns: ID, Sex"):
        preprocess_folder(mixed_folder, tmp_path / "c2", "mri", 16, labels_csv=labels, label_column="Age")


def test_written_back_cube_covers_source_world_extent(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    array = head_phantom((24, 30, 20), blank_ends=0)
    affine = lps_affine((1.0, 1.2, 1.5))
    write_volume(src / "head.nii.gz", array, affine)
    for mode in ("resize", "pad", "resize_keep_aspect"):
        dst = tmp_path / mode
        preprocess_folder(src, dst, "mri", 32, mode=mode, progress=False)
        manifest = json.loads((dst / "manifest.json").read_text())
        cube = np.load(dst / manifest["entries"][0]["file"]).astype(np.float32)
        cube_affine = np.array(manifest["entries"][0]["affine"])
        out = read_volume(write_volume(tmp_path / f"{mode}.nii.gz", cube, cube_affine))

        def foreground_box(volume: Volume, threshold: float) -> np.ndarray:
            corners = world(volume.affine, np.argwhere(volume.array > threshold))
            return np.array([corners.min(axis=0), corners.max(axis=0)])

        tolerance = 2 * max(max(out.spacing), 1.5)
        np.testing.assert_allclose(
            foreground_box(out, -0.5), foreground_box(Volume(array, affine), 250), atol=tolerance
        )


@pytest.mark.slow
@pytest.mark.skipif(not IXI_T1.is_dir(), reason="shared IXI data not available")
def test_preprocess_three_ixi_volumes(tmp_path):
    paths = sorted(IXI_T1.glob("*.nii.gz"))[:3]
    report = preprocess_folder(paths, tmp_path / "cache", "mri", 64, progress=False)
    assert len(report.entries) == 3 and not report.bad
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    for entry, path in zip(manifest["entries"], paths):
        cube = np.load(tmp_path / "cache" / entry["file"]).astype(np.float32)
        assert cube.shape == (64, 64, 64)
        assert -1 <= cube.min() and cube.max() <= 1 and cube.mean() > -0.95
        assert nib.aff2axcodes(np.array(entry["affine"])) == ("S", "A", "R")
        assert entry["original_shape"] == [120, 120, 90]
        source = read_volume(path)
        centre = world(source.affine, np.array(source.array.shape) / 2 - 0.5)
        assert np.linalg.norm(world(np.array(entry["affine"]), [31.5] * 3) - centre) < 20


def test_ensure_cache_takes_a_cache_as_it_is_and_caches_a_folder_once(tmp_path):
    folder = tmp_path / "volumes"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"v{i}.npy", np.random.default_rng(i).normal(size=(20, 20, 20)).astype(np.float32))
    cache = ensure_cache(folder, tmp_path / "cache", "mri", 16, max_volumes=2)
    assert cache == tmp_path / "cache" and len(json.loads((cache / "manifest.json").read_text())["entries"]) == 2
    assert ensure_cache(cache, tmp_path / "elsewhere", "mri", 16) == cache and not (tmp_path / "elsewhere").exists()
    stamp = (cache / "manifest.json").stat().st_mtime_ns
    assert ensure_cache(folder, cache, "mri", 16) == cache and (cache / "manifest.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("span", [1.0, 1e6, 3e38])
def test_recipes_match_a_float64_window_even_at_float32_extremes(span):
    array = np.linspace(-span, span, 1000, dtype=np.float32).reshape(10, 10, 10)
    low, high = float(array.min()), float(np.percentile(array, 99.9))
    expected = np.interp(array.astype(np.float64), (low, high), (-1.0, 1.0))
    np.testing.assert_allclose(apply_recipe(array, "mri"), expected, atol=1e-6)


@pytest.mark.parametrize("recipe", ["ct", "mri"])
def test_output_units_round_trip(recipe):
    """What `hagan generate` writes maps back to the model range that evaluation scores, for both recipes."""
    cube = np.linspace(-1, 1, 4096, dtype=np.float32).reshape(16, 16, 16)
    written = to_output_intensity(cube, recipe)
    if recipe == "ct":
        assert written.dtype == np.int16 and written.min() == -1024 and written.max() == 600
        tolerance = 1 / (600 + 1024)  # one Hounsfield unit of rounding, in model units
    else:
        assert written.dtype == np.float32 and written.min() == 0 and written.max() == 1
        tolerance = 1e-6
    np.testing.assert_allclose(output_to_model_range(written, recipe), cube, atol=tolerance)
