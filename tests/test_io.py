import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from hagan.data.io import atomic_write, list_volume_paths, read_volume, write_json_atomic, write_volume
from hagan.errors import HaganError, VolumeError

IXI_T1 = Path(__file__).resolve().parents[2] / "shared" / "data" / "ixi-t1-2mm" / "t1"


def rotated_affine() -> np.ndarray:
    """A non-trivial affine: rotation about z, a flipped axis, anisotropic spacing and an origin."""
    angle = np.deg2rad(20)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.5, -2.0, 3.0])
    affine[:3, 3] = [-40.0, 25.0, 10.0]
    return affine


def sample_array(shape=(10, 12, 14), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 100, shape).astype(np.float32)


def sitk_image(array_ijk: np.ndarray) -> sitk.Image:
    """A SimpleITK image with a rotated, flipped direction and an origin (array given in i,j,k order)."""
    image = sitk.GetImageFromArray(array_ijk.transpose(2, 1, 0))
    angle = np.deg2rad(30)
    direction = np.array(
        [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    ) @ np.diag([1.0, 1.0, -1.0])
    image.SetDirection(direction.ravel().tolist())
    image.SetSpacing((0.8, 1.2, 2.5))
    image.SetOrigin((12.0, -7.5, 33.0))
    return image


def test_nifti_round_trip_keeps_geometry(tmp_path):
    array, affine = sample_array(), rotated_affine()
    path = write_volume(tmp_path / "a.nii.gz", array, affine)
    volume = read_volume(path)
    assert volume.array.dtype == np.float32
    np.testing.assert_allclose(volume.array, array)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    np.testing.assert_allclose(volume.spacing, (1.5, 2.0, 3.0), atol=1e-5)


def test_nifti_scl_slope_is_applied(tmp_path):
    image = nib.Nifti1Image(np.full((4, 4, 4), 10, dtype=np.uint8), np.eye(4))
    image.header.set_slope_inter(2.5, 1.0)
    nib.save(image, tmp_path / "scaled.nii")
    assert read_volume(tmp_path / "scaled.nii").array.max() == pytest.approx(26.0)


@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".mhd", ".nhdr"])
def test_sitk_formats_match_nibabel_geometry(tmp_path, ext):
    array = sample_array()
    image = sitk_image(array)
    sitk.WriteImage(image, str(tmp_path / f"img{ext}"))
    sitk.WriteImage(image, str(tmp_path / "img.nii.gz"))
    reference = nib.load(tmp_path / "img.nii.gz")

    volume = read_volume(tmp_path / f"img{ext}")
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-4)
    np.testing.assert_allclose(volume.array, reference.get_fdata(), atol=1e-5)

    rewritten = read_volume(write_volume(tmp_path / "back.nii.gz", volume.array, volume.affine))
    np.testing.assert_allclose(rewritten.affine, volume.affine, atol=1e-5)
    np.testing.assert_allclose(rewritten.array, volume.array)


def write_dicom_series(folder: Path, image: sitk.Image, series_uid: str) -> None:
    """Per-slice DICOM writing with the position/orientation tags a series reader needs."""
    folder.mkdir(parents=True, exist_ok=True)
    direction = image.GetDirection()
    orientation = "\\".join(str(v) for v in (*direction[0::3], *direction[1::3]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        slice_.SetMetaData("0020|000e", series_uid)
        slice_.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.1")
        slice_.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        slice_.SetMetaData("0020|0037", orientation)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        slice_.SetMetaData("0020|0032", "\\".join(str(v) for v in position))
        slice_.SetMetaData("0020|0013", str(k + 1))
        slice_.SetMetaData("0008|0060", "CT")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)


def dicom_image() -> sitk.Image:
    array = np.random.default_rng(1).integers(-1000, 1000, (8, 9, 6)).astype(np.int16)
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0))
    image.SetSpacing((0.7, 0.9, 2.0))
    image.SetOrigin((-50.0, 20.0, 100.0))
    angle = np.deg2rad(15)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image.SetDirection(direction.ravel().tolist())
    return image


def test_dicom_series_geometry_matches_nibabel(tmp_path):
    image = dicom_image()
    write_dicom_series(tmp_path / "series", image, "1.2.826.0.1.3680043.2.1125.10")
    sitk.WriteImage(image, str(tmp_path / "ref.nii.gz"))
    reference = nib.load(tmp_path / "ref.nii.gz")

    volume = read_volume(tmp_path / "series")
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-3)
    np.testing.assert_allclose(volume.array, reference.get_fdata())


def test_folder_with_two_dicom_series_is_refused(tmp_path):
    image = dicom_image()
    write_dicom_series(tmp_path / "mixed", image, "1.2.826.0.1.3680043.2.1125.11")
    write_dicom_series(tmp_path / "other", image, "1.2.826.0.1.3680043.2.1125.12")
    for k, dcm in enumerate(sorted((tmp_path / "other").iterdir())):
        dcm.rename(tmp_path / "mixed" / f"other{k:03d}.dcm")
    with pytest.raises(VolumeError, match="2 DICOM series") as info:
        read_volume(tmp_path / "mixed")
    assert "mixed" in str(info.value)


def test_folder_without_dicom_is_a_volume_error(tmp_path):
    folder = tmp_path / "notdicom"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    with pytest.raises(VolumeError, match="no DICOM") as info:
        read_volume(folder)
    assert "notdicom" in str(info.value)


def test_npy_and_npz(tmp_path):
    array, affine = sample_array(), rotated_affine()
    np.save(tmp_path / "plain.npy", array.astype(np.int16))
    np.savez(tmp_path / "single.npz", array)
    np.savez(tmp_path / "keyed.npz", image=array, affine=affine)
    np.savez(tmp_path / "ambiguous.npz", first=array, second=array)

    plain = read_volume(tmp_path / "plain.npy")
    assert plain.array.dtype == np.float32
    np.testing.assert_array_equal(plain.affine, np.eye(4))
    np.testing.assert_allclose(read_volume(tmp_path / "single.npz").array, array)
    keyed = read_volume(tmp_path / "keyed.npz")
    np.testing.assert_allclose(keyed.affine, affine)
    np.testing.assert_allclose(keyed.array, array)
    with pytest.raises(VolumeError, match="ambiguous.npz.*name it 'image'"):
        read_volume(tmp_path / "ambiguous.npz")


def test_4d_with_trailing_singleton_is_squeezed(tmp_path):
    nib.save(nib.Nifti1Image(sample_array((6, 7, 8, 1)), rotated_affine()), tmp_path / "t.nii.gz")
    volume = read_volume(tmp_path / "t.nii.gz")
    assert volume.array.shape == (6, 7, 8)
    np.testing.assert_allclose(volume.affine, rotated_affine(), atol=1e-5)


def make_truncated(path: Path) -> None:
    nib.save(nib.Nifti1Image(sample_array((20, 20, 20)), np.eye(4)), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())


def make_text(path: Path) -> None:
    path.write_text("this is not an image\n" * 20)


def make_2d(path: Path) -> None:
    nib.save(nib.Nifti1Image(sample_array((16, 16)), np.eye(4)), path)


def make_4d(path: Path) -> None:
    nib.save(nib.Nifti1Image(sample_array((6, 6, 6, 3)), np.eye(4)), path)


def make_4d_mha(path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(sample_array((3, 6, 6, 6)), isVector=False), str(path))


def make_2d_mha(path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(sample_array((6, 6))), str(path))


def make_vector_mha(path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(sample_array((6, 6, 6, 3)), isVector=True), str(path))


def make_gzipped_text(path: Path) -> None:
    path.write_bytes(gzip.compress(b"just some text, not a NIfTI header"))


@pytest.mark.parametrize(
    "name, make, reason",
    [
        ("truncated.nii.gz", make_truncated, "truncated"),
        ("random.nii.gz", make_random_bytes, "not a readable NIfTI"),
        ("random.nii", make_random_bytes, "not a readable NIfTI"),
        ("random.nrrd", make_random_bytes, "not a readable NRRD"),
        ("random.npy", make_random_bytes, "not a readable NumPy"),
        ("empty.nii.gz", lambda p: p.write_bytes(b""), "0 bytes"),
        ("text.nii.gz", make_text, "not a readable NIfTI"),
        ("gztext.nii.gz", make_gzipped_text, "not a readable NIfTI"),
        ("flat.nii.gz", make_2d, "2D image"),
        ("flat.mha", make_2d_mha, "2D image"),
        ("series.nii.gz", make_4d, "4D image"),
        ("series.mha", make_4d_mha, "4D image"),
        ("rgb.mha", make_vector_mha, "values per voxel"),
        ("notes.txt", make_text, "unknown file type"),
    ],
)
def test_bad_files_raise_volume_error_naming_the_file(tmp_path, name, make, reason):
    path = tmp_path / name
    make(path)
    with pytest.raises(VolumeError) as info:
        read_volume(path)
    assert name in str(info.value)
    assert reason in info.value.reason
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(VolumeError, match="not found"):
        read_volume(tmp_path / "ghost.nii.gz")


def test_nan_is_not_an_error_at_read_time(tmp_path):
    array = sample_array()
    array[0, 0, 0] = np.nan
    volume = read_volume(write_volume(tmp_path / "nan.nii.gz", array, np.eye(4)))
    assert np.isnan(volume.array[0, 0, 0])


def test_list_volume_paths(tmp_path):
    for name in ("b.nii.gz", "a.nrrd", "c.npy", "d.MHA"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.nii.gz").write_bytes(b"x")
    write_dicom_series(tmp_path / "patient" / "ct", dicom_image(), "1.2.826.0.1.3680043.2.1125.13")
    (tmp_path / "empty").mkdir()

    found = list_volume_paths(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.nrrd", "b.nii.gz", "c.npy", "d.MHA", "patient/ct"
    ]
    assert read_volume(found[-1]).array.shape == (8, 9, 6)
    with pytest.raises(HaganError, match="not a folder"):
        list_volume_paths(tmp_path / "a.nrrd")


@pytest.mark.skipif(not IXI_T1.is_dir(), reason="shared IXI data not available")
def test_ixi_scl_slope_is_applied():
    path = sorted(IXI_T1.glob("*.nii.gz"))[0]
    volume = read_volume(path)
    assert volume.array.shape == (120, 120, 90)
    assert volume.array.dtype == np.float32
    assert volume.array.max() > 1000
    np.testing.assert_allclose(volume.spacing, (2.0, 2.0, 2.0), atol=1e-3)


def test_atomic_write_replaces_only_when_the_block_completes(tmp_path):
    final = tmp_path / "out.nii.gz"
    final.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(final) as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz") and tmp != final
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert final.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]
    with atomic_write(final) as tmp:
        tmp.write_text("new")
    assert final.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_atomic_write_creates_the_folder(tmp_path):
    final = tmp_path / "a" / "b" / "x.json"
    write_json_atomic(final, {"k": [1, 2]})
    assert final.read_text() == '{\n  "k": [\n    1,\n    2\n  ]\n}'


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_gives_files_the_mode_the_umask_allows(tmp_path, umask, mode):
    saved = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(saved)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == mode
