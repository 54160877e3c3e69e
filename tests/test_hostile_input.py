"""Hostile and broken input (issue 8): every bad file is one VolumeError line, never a crash.

The fuzzing uses a derandomised hypothesis profile so that CI runs are repeatable and bounded;
set HAGAN_FUZZ_SCALE=20 (say) for a longer, randomised local run. docs/reliability.md
records the kinds tried, the example counts and the messages.
"""

import gzip
import io
import os
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_io import dicom_image, write_dicom_series
from test_preprocess import head_phantom, lps_affine

from hagan.cli.commands import main
from hagan.data import io as hio
from hagan.data.io import VOLUME_EXTENSIONS, Volume, list_volume_paths, read_volume, write_volume
from hagan.data.preprocess import preprocess_folder, preprocess_volume
from hagan.errors import NoUsableVolumesError, VolumeError

FUZZ_SCALE = max(1, int(os.environ.get("HAGAN_FUZZ_SCALE", "1")))


def fuzz(examples: int) -> settings:
    """Bounded, repeatable hypothesis settings for CI (no deadline: the machine is shared)."""
    return settings(
        max_examples=examples * FUZZ_SCALE,
        deadline=None,
        derandomize=FUZZ_SCALE == 1,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


LAST_GUARD = "unreadable ("  # read_volume's catch-all for a library failure that no reader foresaw


def assert_one_line_error(err: VolumeError, path: Path) -> None:
    """Names the file, says why, fits on one line, and prints under a strict UTF-8 stream.

    read_volume turns every exception into a VolumeError, so that it is one proves nothing; what can fail
    is whether a reader recognised the problem: its reason, not the catch-all's "unreadable (Type: ...)".
    """
    message = str(err)
    assert hio.display_path(path) in message
    assert err.reason and "\n" not in message and "Traceback" not in message
    assert not err.reason.startswith(LAST_GUARD), f"no reader foresaw this failure: {message}"
    message.encode("utf-8")  # no lone surrogates: printable anywhere


def read_error(path) -> VolumeError:
    with pytest.raises(VolumeError) as info:
        read_volume(path)
    assert_one_line_error(info.value, Path(os.fsdecode(path)))
    return info.value


# ---------------------------------------------------------------- good files of every format

ARRAY = np.random.default_rng(3).uniform(0, 100, (12, 10, 8)).astype(np.float32)


def good_bytes(ext: str, tmp: Path) -> bytes:
    """A small valid file of the given single-file format."""
    path = tmp / f"good{ext}"
    if ext in (".nii.gz", ".nii"):
        nib.save(nib.Nifti1Image(ARRAY, np.eye(4)), path)
    elif ext in (".nrrd", ".mha"):
        sitk.WriteImage(sitk.GetImageFromArray(ARRAY.transpose(2, 1, 0)), str(path))
    elif ext == ".npy":
        np.save(path, ARRAY)
    elif ext == ".npz":
        np.savez_compressed(path, image=ARRAY, affine=np.eye(4))
    return path.read_bytes()


SINGLE_FILE = (".nii.gz", ".nii", ".nrrd", ".mha", ".npy", ".npz")


@pytest.mark.parametrize("ext", SINGLE_FILE)
def test_good_files_read(tmp_path, ext):
    (tmp_path / f"x{ext}").write_bytes(good_bytes(ext, tmp_path))
    np.testing.assert_allclose(read_volume(tmp_path / f"x{ext}").array, ARRAY)


# ---------------------------------------------------------------- truncation at many cut points


def cut_points(length: int, n: int = 60) -> list[int]:
    """Every cut inside the first 64 bytes (magic, headers) and n evenly spaced ones after."""
    return sorted(set(range(0, min(64, length))) | set(np.linspace(64, length - 1, n).astype(int).tolist()))


@pytest.mark.parametrize("ext", SINGLE_FILE)
def test_truncated_at_every_cut_point(tmp_path, ext):
    data = good_bytes(ext, tmp_path)
    path = tmp_path / f"cut{ext}"
    cuts = cut_points(len(data))
    for cut in cuts:
        path.write_bytes(data[:cut])
        read_error(path)
    assert len(cuts) >= 100


def test_truncated_gzip_of_a_bigger_nifti(tmp_path):
    """Cut points through the deflate stream of a ~200 KiB file, where gzip fails mid-decompression."""
    array = np.random.default_rng(0).normal(size=(40, 40, 32)).astype(np.float32)
    nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / "big.nii.gz")
    data = (tmp_path / "big.nii.gz").read_bytes()
    path = tmp_path / "cut.nii.gz"
    reasons = set()
    for cut in np.linspace(1, len(data) - 1, 100).astype(int):
        path.write_bytes(data[:cut])
        reasons.add(read_error(path).reason.split("(")[0].strip())
    assert reasons <= {
        "truncated: header declares 40x40x32 float32",  # cut inside the data
        "truncated gzip stream",  # cut inside the 8-byte CRC/length trailer
        "not a readable NIfTI file",  # cut inside the header
    }


# ---------------------------------------------------------------- random and mutated bytes


@fuzz(120)
@given(ext=st.sampled_from(VOLUME_EXTENSIONS), data=st.binary(max_size=1500))
def test_random_bytes_under_any_extension(tmp_path, ext, data):
    path = tmp_path / f"random{ext}"
    path.write_bytes(data)
    try:
        volume = read_volume(path)
    except VolumeError as err:
        assert_one_line_error(err, path)
    else:
        assert isinstance(volume, Volume) and volume.array.ndim == 3


MAGICS = {
    ".nii.gz": gzip.compress(nib.Nifti1Header().binaryblock),
    ".nii": nib.Nifti1Header().binaryblock + b"\0\0\0\0",
    ".nrrd": b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\n",
    ".nhdr": b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\ndata file: x.raw\n\n",
    ".mha": b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n",
    ".mhd": b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_FLOAT\nElementDataFile = x.raw\n",
    ".npy": b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (4, 4, 4), }",
    ".npz": b"PK\x03\x04",
}


@fuzz(120)
@given(ext=st.sampled_from(sorted(MAGICS)), tail=st.binary(max_size=600))
def test_valid_magic_then_random_bytes(tmp_path, ext, tail):
    """A plausible header start gets the parsers past their magic checks into the deeper code."""
    path = tmp_path / f"magic{ext}"
    path.write_bytes(MAGICS[ext] + tail)
    (tmp_path / "x.raw").write_bytes(tail)
    try:
        read_volume(path)
    except VolumeError as err:
        assert_one_line_error(err, path)


@fuzz(150)
@given(
    ext=st.sampled_from(SINGLE_FILE),
    edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.none() | st.integers(0, 4000),
)
def test_mutated_headers(tmp_path, ext, edits, cut):
    """Byte flips in the first 400 bytes (where every header lives) of valid files, optionally cut."""
    data = bytearray(good_bytes(ext, tmp_path))
    for position, value in edits:
        if position < len(data):
            data[position] = value
    path = tmp_path / f"mutated{ext}"
    path.write_bytes(bytes(data[:cut] if cut is not None else data))
    try:
        volume = read_volume(path)
    except VolumeError as err:
        assert_one_line_error(err, path)
    else:
        assert volume.array.dtype == np.float32 and volume.array.ndim == 3


# ---------------------------------------------------------------- declared sizes vs the data


def nifti_bytes(shape, payload: bytes, dtype=np.float32, header_class=nib.Nifti1Header) -> bytes:
    """A NIfTI header declaring ``shape`` followed by ``payload`` (NIfTI-2 for dimensions over 32767)."""
    header = header_class()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = len(header.binaryblock) + 4
    header.set_sform(np.eye(4), code=1)
    return header.binaryblock + b"\0" * 4 + payload


def edit_header(data: bytes, old: bytes, new: bytes) -> bytes:
    assert old in data
    return data.replace(old, new, 1)


def sitk_with_sizes(tmp_path, ext, sizes: str, compress=False) -> bytes:
    sitk.WriteImage(sitk.GetImageFromArray(ARRAY.transpose(2, 1, 0)), str(tmp_path / f"g{ext}"), compress)
    data = (tmp_path / f"g{ext}").read_bytes()
    key = b"sizes: 12 10 8" if ext == ".nrrd" else b"DimSize = 12 10 8"
    return edit_header(data, key, key.replace(b"12 10 8", sizes.encode()))


@pytest.mark.parametrize(
    "name, make, reason",
    [
        ("more.nii", lambda t: nifti_bytes((64, 64, 64), ARRAY.tobytes()), "truncated: header declares 64x64x64"),
        ("fewer.nii", lambda t: nifti_bytes((4, 4, 4), ARRAY.tobytes()), "dimensions disagree with the data"),
        ("more.nii.gz", lambda t: gzip.compress(nifti_bytes((64, 64, 64), ARRAY.tobytes())), "truncated: header"),
        ("fewer.nii.gz", lambda t: gzip.compress(nifti_bytes((4, 4, 4), ARRAY.tobytes())), "disagree with the data"),
        ("more.nrrd", lambda t: sitk_with_sizes(t, ".nrrd", "24 10 8"), "truncated: header declares 24x10x8"),
        ("fewer.nrrd", lambda t: sitk_with_sizes(t, ".nrrd", "6 10 8"), "dimensions disagree with the data"),
        ("more.mha", lambda t: sitk_with_sizes(t, ".mha", "24 10 8"), "truncated: header declares 24x10x8"),
        ("fewer.mha", lambda t: sitk_with_sizes(t, ".mha", "6 10 8"), "dimensions disagree with the data"),
        ("zmore.mha", lambda t: sitk_with_sizes(t, ".mha", "24 10 8", compress=True), "truncated: header declares 24x10x8"),
        ("zfewer.mha", lambda t: sitk_with_sizes(t, ".mha", "6 10 8", compress=True), "dimensions disagree with the data"),
        ("zmore.nrrd", lambda t: sitk_with_sizes(t, ".nrrd", "24 10 8", compress=True), "truncated: header declares 24x10x8"),
        ("zero.mha", lambda t: sitk_with_sizes(t, ".mha", "0 10 8"), "empty image (shape 0x10x8)"),
        ("neg.nrrd", lambda t: sitk_with_sizes(t, ".nrrd", "-12 10 8"), "size is zero"),
        ("more.npy", lambda t: edit_header(good_bytes(".npy", t), b"(12, 10, 8)", b"(12, 10, 9)"), "truncated"),
    ],
)
def test_header_disagrees_with_data(tmp_path, name, make, reason):
    path = tmp_path / name
    path.write_bytes(make(tmp_path))
    assert reason in read_error(path).reason


HUGE = 2**15


@pytest.mark.parametrize(
    "name, make",
    [
        ("huge.nii", lambda t: nifti_bytes((HUGE,) * 3, b"\0" * 4096, header_class=nib.Nifti2Header)),
        ("huge.nii.gz", lambda t: gzip.compress(nifti_bytes((HUGE,) * 3, b"\0" * 4096, header_class=nib.Nifti2Header))),
        ("huge1.nii", lambda t: nifti_bytes((HUGE - 1,) * 3, b"\0" * 4096)),  # NIfTI-1 dims are int16
        ("huge.nrrd", lambda t: sitk_with_sizes(t, ".nrrd", f"{HUGE} {HUGE} {HUGE}")),
        ("huge.mha", lambda t: sitk_with_sizes(t, ".mha", f"{HUGE} {HUGE} {HUGE}")),
        ("wrapped.mha", lambda t: sitk_with_sizes(t, ".mha", "-5 10 8")),  # -5 wraps to 2^32-5
        ("huge.npy", lambda t: edit_header(good_bytes(".npy", t), b"(12, 10, 8)", b"(32768, 32768, 32768)")),
    ],
)
def test_huge_declared_dimensions_fail_fast(tmp_path, name, make):
    path = tmp_path / name
    path.write_bytes(make(tmp_path))
    start = time.perf_counter()
    err = read_error(path)
    assert time.perf_counter() - start < 2.0
    assert "voxel limit" in err.reason


def test_declared_size_below_the_limit_is_still_checked_against_the_file(tmp_path, monkeypatch):
    """2000^3 float32 (30 GiB) is under raised limits, but a 4 KiB file cannot hold it."""
    monkeypatch.setattr(hio, "MAX_VOXELS", 10**10)
    monkeypatch.setattr(hio, "MAX_READ_BYTES", 1 << 40)
    (tmp_path / "big.nii").write_bytes(nifti_bytes((2000, 2000, 2000), b"\0" * 4096))
    (tmp_path / "big.nii.gz").write_bytes(gzip.compress(nifti_bytes((2000, 2000, 2000), b"\0" * 4096)))
    (tmp_path / "big.nrrd").write_bytes(sitk_with_sizes(tmp_path, ".nrrd", "2000 2000 2000"))
    assert "truncated: header declares 2000x2000x2000 float32" in read_error(tmp_path / "big.nii").reason
    assert "compressed data; dimensions disagree" in read_error(tmp_path / "big.nii.gz").reason
    assert "truncated: header declares 2000x2000x2000" in read_error(tmp_path / "big.nrrd").reason


# ---------------------------------------------------------------- NaN and Inf voxels


def test_nan_and_inf_voxels(tmp_path):
    array = head_phantom()
    array[3, 4, 5], array[10, 10, 10], array[12, 12, 12] = np.nan, np.inf, -np.inf
    volume = read_volume(write_volume(tmp_path / "naninf.nii.gz", array, lps_affine()))
    for recipe in ("ct", "mri"):
        cube = preprocess_volume(volume, recipe, 16).array
        assert np.isfinite(cube).all() and cube.min() >= -1 and cube.max() <= 1
    for fill, reason in ((np.nan, "no finite voxel values"), (np.inf, "no finite voxel values")):
        path = write_volume(tmp_path / f"all{fill}.nii.gz", np.full((8, 8, 8), fill, np.float32), np.eye(4))
        with pytest.raises(VolumeError, match=reason):
            preprocess_volume(read_volume(path), "mri", 16, source=str(path))


special_floats = st.sampled_from([np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-38, 0.0])


@fuzz(60)
@given(
    array=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=3, max_dims=3, min_side=2, max_side=9),
        elements=st.floats(width=32, allow_nan=True, allow_infinity=True) | special_floats,
    ),
    spacing=st.tuples(*[st.floats(1e-3, 1e3)] * 3),
    recipe=st.sampled_from(["ct", "mri"]),
    mode=st.sampled_from(["resize_keep_aspect", "resize", "pad"]),
)
def test_preprocess_volume_never_raises_anything_but_volume_error(array, spacing, recipe, mode):
    affine = np.diag([*spacing, 1.0])
    try:
        cube = preprocess_volume(Volume(array, affine), recipe, 8, mode, source="fuzz.nii.gz")
    except VolumeError as err:
        # preprocess_volume turns every exception into a VolumeError: what can fail is whether the problem
        # was recognised (a reason of its own, not the guard's) and whether a known cause gets its message
        assert "fuzz.nii.gz" in str(err) and "\n" not in str(err)
        assert not err.reason.startswith("preprocessing failed ("), f"no check foresaw this failure: {err}"
        if not np.isfinite(array).any():
            assert err.reason == "no finite voxel values (all NaN or infinite)", str(err)
    else:
        assert np.isfinite(array).any()
        assert cube.array.shape == (8, 8, 8)
        assert np.isfinite(cube.array).all() and cube.array.min() >= -1 and cube.array.max() <= 1
        assert np.isfinite(cube.affine).all()


# ---------------------------------------------------------------- 0-byte files, odd file-system entries


@pytest.mark.parametrize("ext", VOLUME_EXTENSIONS)
def test_zero_byte_files(tmp_path, ext):
    (tmp_path / f"empty{ext}").write_bytes(b"")
    assert read_error(tmp_path / f"empty{ext}").reason == "empty file (0 bytes)"


def test_links_folders_and_pipes_named_like_volumes(tmp_path):
    os.symlink("loop2.nii.gz", tmp_path / "loop1.nii.gz")
    os.symlink("loop1.nii.gz", tmp_path / "loop2.nii.gz")
    os.symlink("missing.nii.gz", tmp_path / "dangling.nii.gz")
    (tmp_path / "folder.nii.gz").mkdir()
    os.mkfifo(tmp_path / "pipe.nii")
    expected = {
        "loop1.nii.gz": "symbolic link loop",
        "loop2.nii.gz": "symbolic link loop",
        "dangling.nii.gz": "broken symbolic link (its target does not exist)",
        "folder.nii.gz": "is a folder, not a .nii.gz file",
        "pipe.nii": "not a regular file (a named pipe)",
    }
    listed = list_volume_paths(tmp_path)
    assert sorted(p.name for p in listed) == sorted(expected)
    for path in listed:
        assert read_error(path).reason == expected[path.name]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.nii.gz"
    path.write_bytes(good_bytes(".nii.gz", tmp_path))
    path.chmod(0)
    assert "Permission denied" in read_error(path).reason


# ---------------------------------------------------------------- NumPy: never unpickle


class Trap:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    marker = None

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_numpy_object_arrays_and_pickles_are_never_unpickled(tmp_path):
    Trap.marker = tmp_path / "unpickled"
    trap = np.array([Trap()], dtype=object)
    np.save(tmp_path / "object.npy", trap, allow_pickle=True)
    np.savez(tmp_path / "object.npz", image=trap)
    (tmp_path / "pickle.npy").write_bytes(pickle.dumps(Trap()))
    (tmp_path / "pickle.npz").write_bytes(pickle.dumps(Trap()))
    with zipfile.ZipFile(tmp_path / "member.npz", "w") as archive:
        archive.writestr("image.npy", pickle.dumps(Trap()))
    assert "holds Python objects (dtype object)" in read_error(tmp_path / "object.npy").reason
    assert "holds Python objects (dtype object)" in read_error(tmp_path / "object.npz").reason
    assert "holds pickled Python data" in read_error(tmp_path / "pickle.npy").reason
    assert "holds pickled Python data" in read_error(tmp_path / "pickle.npz").reason
    assert "not a readable NumPy .npz archive" in read_error(tmp_path / "member.npz").reason
    assert not Trap.marker.exists()


def test_numpy_format_confusions(tmp_path):
    with open(tmp_path / "archive.npy", "wb") as f:  # an .npz under an .npy name
        np.savez(f, image=ARRAY)
    with open(tmp_path / "array.npz", "wb") as f:  # and the other way round
        np.save(f, ARRAY)
    np.savez(tmp_path / "bad_affine.npz", image=ARRAY, affine=np.array([["a"] * 4] * 4))
    np.savez(tmp_path / "record.npz", image=np.zeros((4, 4, 4), dtype=[("a", "f4"), ("b", "i4")]))
    assert "is a zip archive (an .npz?), not an .npy file" in read_error(tmp_path / "archive.npy").reason
    assert "is an .npy file, not an .npz archive" in read_error(tmp_path / "array.npz").reason
    assert "'affine' is <U1 of shape (4, 4)" in read_error(tmp_path / "bad_affine.npz").reason
    assert "unsupported voxel type" in read_error(tmp_path / "record.npz").reason


def test_npz_member_claiming_more_than_it_holds(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (512, 512, 512)})
    with zipfile.ZipFile(tmp_path / "liar.npz", "w") as archive:
        archive.writestr("image.npy", header.getvalue() + ARRAY.tobytes())
    assert "truncated: header declares 512x512x512 float32" in read_error(tmp_path / "liar.npz").reason


# ---------------------------------------------------------------- DICOM series


UID = "1.2.826.0.1.3680043.2.1125.2"


def test_dicom_missing_slice(tmp_path):
    write_dicom_series(tmp_path / "gap", dicom_image(), UID + "1")
    (tmp_path / "gap" / "slice003.dcm").unlink()
    reason = read_error(tmp_path / "gap").reason
    assert reason.startswith("non-uniform slice spacing: 4 mm between slice002.dcm and slice004.dcm, 2 mm elsewhere")


def test_dicom_duplicated_slice(tmp_path):
    write_dicom_series(tmp_path / "dup", dicom_image(), UID + "2")
    write_dicom_series(tmp_path / "copy", dicom_image(), UID + "2")
    (tmp_path / "copy" / "slice002.dcm").rename(tmp_path / "dup" / "again002.dcm")
    assert "two slices at the same position" in read_error(tmp_path / "dup").reason


def test_dicom_mixed_series_and_mixed_sizes(tmp_path):
    write_dicom_series(tmp_path / "mixed", dicom_image(), UID + "3")
    write_dicom_series(tmp_path / "other", dicom_image(), UID + "4")
    for dcm in (tmp_path / "other").iterdir():
        dcm.rename(tmp_path / "mixed" / f"other-{dcm.name}")
    assert "folder holds 2 DICOM series" in read_error(tmp_path / "mixed").reason

    big = dicom_image()
    small = sitk.Resample(big, [4, 9, 6], sitk.Transform(), sitk.sitkLinear, big.GetOrigin(), big.GetSpacing(),
                          big.GetDirection())
    write_dicom_series(tmp_path / "sizes", big, UID + "5")
    write_dicom_series(tmp_path / "small", small, UID + "5")
    (tmp_path / "sizes" / "slice003.dcm").unlink()
    (tmp_path / "small" / "slice003.dcm").rename(tmp_path / "sizes" / "slice003.dcm")
    assert "slices of different sizes" in read_error(tmp_path / "sizes").reason


def test_dicom_folder_of_random_bytes(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.dcm").write_bytes(np.random.default_rng(i).bytes(2000))
    assert read_error(folder).reason == "folder holds no DICOM series"


# ---------------------------------------------------------------- non-UTF-8 file names


def bytes_name(folder: Path, name: bytes) -> bytes:
    return os.path.join(os.fsencode(folder), name)


@pytest.mark.parametrize("ext", SINGLE_FILE)
def test_non_utf8_names_read_list_and_report(tmp_path, ext):
    good = bytes_name(tmp_path, b"\xff\xfe" + ext.encode())
    bad = bytes_name(tmp_path, b"bad\xe9" + ext.encode())
    with open(good, "wb") as f:
        f.write(good_bytes(ext, tmp_path))
    with open(bad, "wb") as f:
        f.write(b"\xff" * 100)
    listed = [p for p in list_volume_paths(tmp_path) if not p.name.startswith("good")]
    assert [os.fsencode(p) for p in listed] == sorted([good, bad])
    for path in (good, os.fsdecode(good), Path(os.fsdecode(good))):
        np.testing.assert_allclose(read_volume(path).array, ARRAY)
    err = read_error(bad)
    assert f"bad\\xe9{ext}:" in str(err)


def test_non_utf8_detached_header_and_dicom_folder(tmp_path):
    folder = bytes_name(tmp_path, b"s\xe9rie")
    write_dicom_series(tmp_path / "series", dicom_image(), UID + "6")  # SimpleITK cannot write there
    os.rename(tmp_path / "series", folder)
    for name in os.listdir(folder):
        os.rename(os.path.join(folder, name), os.path.join(folder, b"\xff" + os.fsencode(name)))
    assert read_volume(folder).array.shape == (8, 9, 6)
    os.remove(os.path.join(folder, b"\xffslice003.dcm"))
    assert "between \\xffslice002.dcm and \\xffslice004.dcm" in read_error(folder).reason

    sitk.WriteImage(sitk.GetImageFromArray(ARRAY.transpose(2, 1, 0)), str(tmp_path / "d.mhd"))
    os.rename(tmp_path / "d.mhd", bytes_name(tmp_path, b"d\xff.mhd"))
    np.testing.assert_allclose(read_volume(bytes_name(tmp_path, b"d\xff.mhd")).array, ARRAY)


# ---------------------------------------------------------------- a folder run over everything


def bad_files(folder: Path) -> dict[str, str]:
    """Write one file of each bad kind; returns the name each is reported under -> expected reason."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent
    data = good_bytes(".nii.gz", tmp)
    (folder / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    (folder / "random.nii.gz").write_bytes(np.random.default_rng(0).bytes(3000))
    (folder / "random.nrrd").write_bytes(np.random.default_rng(1).bytes(3000))
    (folder / "random.mha").write_bytes(np.random.default_rng(2).bytes(3000))
    (folder / "empty.nii").write_bytes(b"")
    (folder / "more.nii").write_bytes(nifti_bytes((64, 64, 64), ARRAY.tobytes()))
    (folder / "more.nrrd").write_bytes(sitk_with_sizes(tmp, ".nrrd", "24 10 8"))
    (folder / "huge.nii.gz").write_bytes(gzip.compress(nifti_bytes((HUGE,) * 3, b"\0" * 64, header_class=nib.Nifti2Header)))
    write_volume(folder / "allnan.nii.gz", np.full((8, 8, 8), np.nan, np.float32), np.eye(4))
    np.save(folder / "object.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    np.savez(folder / "pickled.npz", image=np.array([{}], dtype=object))
    os.symlink("loop.mha", folder / "loop.mha")
    (folder / "dir.nii.gz").mkdir()
    write_dicom_series(folder / "gap", dicom_image(), UID + "7")
    (folder / "gap" / "slice002.dcm").unlink()
    write_dicom_series(folder / "mixed", dicom_image(), UID + "8")
    write_dicom_series(folder / "mixed2", dicom_image(), UID + "9")
    for dcm in (folder / "mixed2").iterdir():
        dcm.rename(folder / "mixed" / f"b-{dcm.name}")
    (folder / "mixed2").rmdir()
    with open(bytes_name(folder, b"\xff\xfe.nii.gz"), "wb") as f:
        f.write(b"not a volume")
    return {
        "truncated.nii.gz": "truncated: header declares 12x10x8 float32",
        "random.nii.gz": "not a readable NIfTI file",
        "random.nrrd": "not a readable NRRD image",
        "random.mha": "not a readable MetaImage image",
        "empty.nii": "empty file (0 bytes)",
        "more.nii": "truncated: header declares 64x64x64",
        "more.nrrd": "truncated: header declares 24x10x8",
        "huge.nii.gz": "voxel limit",
        "allnan.nii.gz": "no finite voxel values",
        "object.npy": "holds Python objects",
        "pickled.npz": "holds Python objects",
        "loop.mha": "symbolic link loop",
        "dir.nii.gz": "is a folder, not a .nii.gz file",
        "gap": "non-uniform slice spacing",
        "mixed": "folder holds 2 DICOM series",
        "\\xff\\xfe.nii.gz": "not a readable NIfTI file",
    }


def good_files(folder: Path, n: int = 2) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_volume(folder / f"good{i}.nii.gz", head_phantom(seed=i), lps_affine())
    return [f"good{i}" for i in range(n)]


def test_preprocess_folder_keeps_good_files_and_lists_every_bad_one(tmp_path):
    src = tmp_path / "src"
    expected = bad_files(src)
    names = good_files(src)
    report = preprocess_folder(src, tmp_path / "cache", "mri", 16, progress=False)
    assert [e.name for e in report.entries] == names
    reported = {Path(path).name: reason for path, reason in report.bad}
    assert sorted(reported) == sorted(expected)
    for name, reason in expected.items():
        assert reason in reported[name], (name, reported[name])
    summary = report.summary()
    summary.encode("utf-8")
    assert f"{len(expected)} unusable files skipped:" in summary


def test_preprocess_folder_of_only_bad_files(tmp_path):
    bad_files(tmp_path / "src")
    with pytest.raises(NoUsableVolumesError) as info:
        preprocess_folder(tmp_path / "src", tmp_path / "cache", "mri", 16, progress=False)
    str(info.value).encode("utf-8")
    assert "\n" not in str(info.value)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real command in a child process, with strict UTF-8 output as on an en_US.UTF-8 terminal."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    return subprocess.run([sys.executable, "-m", "hagan.cli", *args], capture_output=True, env=env, timeout=300)


def test_cli_over_a_mixed_folder(tmp_path, capfd):
    """In process (importing hagan costs seconds); capfd also sees what C++ libraries print."""
    mixed = tmp_path / "mixed"
    expected = bad_files(mixed)
    good_files(mixed)
    assert main(["preprocess", str(mixed), str(tmp_path / "cache"), "--recipe", "mri", "--size", "32"]) == 0
    out, err = capfd.readouterr()
    out.encode("utf-8"), err.encode("utf-8")  # printable on a strict UTF-8 terminal
    assert "Traceback" not in out + err
    assert f"2 of {2 + len(expected)} volumes preprocessed" in out
    assert f"{len(expected)} unusable files skipped:" in out
    assert "\\xff\\xfe.nii.gz: not a readable NIfTI file" in out
    assert "WARNING" not in err and "MetaImage" not in err  # native library chatter stays quiet


def test_cli_over_a_folder_of_only_bad_files(tmp_path, capfd):
    only_bad = tmp_path / "bad"
    expected = bad_files(only_bad)
    result = run_cli("preprocess", str(only_bad), str(tmp_path / "c1"), "--recipe", "mri", "--size", "32")
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("hagan preprocess: error: ")
    assert f"no usable volume among {len(expected)} files" in errors[0]

    # --debug lets the exception (and so its traceback) through
    with pytest.raises(NoUsableVolumesError, match="no usable volume"):
        main(["--debug", "preprocess", str(only_bad), str(tmp_path / "c2"), "--recipe", "mri", "--size", "32"])
