"""Reading and writing volumes with their geometry (affine in RAS+ millimetres)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from hagan.errors import HaganError, VolumeError

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
SITK_EXTENSIONS = (".nrrd", ".nhdr", ".mha", ".mhd")
NUMPY_EXTENSIONS = (".npy", ".npz")
VOLUME_EXTENSIONS = NIFTI_EXTENSIONS + SITK_EXTENSIONS + NUMPY_EXTENSIONS
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
NPZ_IMAGE_KEYS = ("image", "volume", "arr_0")

# ITK stores geometry in LPS; flipping the first two world axes gives RAS.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Volume:
    """A 3D array and the 4x4 affine that maps its (axis0, axis1, axis2) indices to RAS+ world mm."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


def atomic_path(final: Path) -> Path:
    """A temporary sibling of ``final``; rename it onto ``final`` once fully written."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    return Path(tmp)


def write_volume(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write a NIfTI volume atomically: a killed process never leaves a half-written file."""
    path = Path(path)
    tmp = atomic_path(path)
    try:
        nib.save(nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64)), str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def volume_extension(path: str | os.PathLike) -> str | None:
    """The known volume extension of ``path`` (e.g. ``.nii.gz``), or None; case-insensitive."""
    name = Path(path).name.lower()
    return next((ext for ext in VOLUME_EXTENSIONS if name.endswith(ext)), None)


def volume_stem(path: str | os.PathLike) -> str:
    """The file name without its (possibly double) volume extension, so ``a.nii.gz`` gives ``a``."""
    name = Path(path).name
    ext = volume_extension(path)
    return name[: -len(ext)] if ext else name


def read_volume(path: str | os.PathLike) -> Volume:
    """Read any supported volume as float32 with a RAS+ affine; every failure is a VolumeError."""
    path = Path(path)
    if path.is_dir():
        array, affine = _read_dicom_series(path)
    else:
        if not path.exists():
            raise VolumeError(path, "file not found")
        ext = volume_extension(path)
        if ext is None:
            known = ", ".join(VOLUME_EXTENSIONS)
            raise VolumeError(path, f"unknown file type; expected one of {known} or a DICOM folder")
        if path.stat().st_size == 0:
            raise VolumeError(path, "empty file (0 bytes)")
        if ext in NIFTI_EXTENSIONS:
            array, affine = _read_nifti(path)
        elif ext in SITK_EXTENSIONS:
            array, affine = _read_sitk_file(path)
        else:
            array, affine = _read_numpy(path, ext)
    return _as_3d_volume(path, array, affine)


def list_volume_paths(folder: str | os.PathLike) -> list[Path]:
    """Volume files (known extensions) and DICOM series folders under ``folder``, sorted.

    Volume files are taken from ``folder`` itself; DICOM series are found in ``folder`` and any
    subfolder, each folder holding DICOM files counting as one series. Hidden entries are skipped
    so that half-written temporary files are never picked up.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HaganError(f"{folder}: not a folder")
    found = [
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and volume_extension(p)
    ]
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if any(_looks_like_dicom(Path(root) / f) for f in files if not f.startswith(".")):
            found.append(Path(root))
    return sorted(found)


def _looks_like_dicom(path: Path) -> bool:
    """A DICOM extension or the 'DICM' magic after the 128-byte preamble; cheap, no parsing."""
    if volume_extension(path):
        return False
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _short(exc: BaseException, path: Path) -> str:
    """A one-line summary of a library exception, for the reason part of a VolumeError.

    The error already starts with the path, so the library's copy of it is shortened to the name.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = (lines[-1] if lines else "").replace(str(path), path.name)
    if len(text) > 120:
        text = text[:117] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = nib.load(str(path))
    except Exception as exc:
        raise VolumeError(path, f"not a readable NIfTI file ({_short(exc, path)})") from exc
    _check_dims(path, image.shape)
    try:
        array = image.get_fdata(dtype=np.float32)
    except Exception as exc:
        raise VolumeError(path, f"truncated or corrupt NIfTI data ({_short(exc, path)})") from exc
    return array, np.asarray(image.affine, dtype=np.float64)


def _read_sitk_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = sitk.ReadImage(str(path))
    except Exception as exc:
        kind = path.suffix.lstrip(".").upper()
        raise VolumeError(path, f"not a readable {kind} image ({_short(exc, path)})") from exc
    return _sitk_to_array_affine(path, image)


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except Exception as exc:
        raise VolumeError(folder, f"cannot scan folder for DICOM files ({_short(exc, folder)})") from exc
    if not series_ids:
        raise VolumeError(folder, "folder holds no DICOM series")
    if len(series_ids) > 1:
        raise VolumeError(
            folder, f"folder holds {len(series_ids)} DICOM series; put each series in its own folder"
        )
    try:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0]))
        image = reader.Execute()
    except Exception as exc:
        raise VolumeError(folder, f"unreadable DICOM series ({_short(exc, folder)})") from exc
    return _sitk_to_array_affine(folder, image)


def _sitk_to_array_affine(path: Path, image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Array in ITK index order (i, j, k) with the matching RAS+ affine, like nibabel gives for NIfTI."""
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise VolumeError(
            path, f"{components} values per voxel (colour or vector image); need a scalar volume"
        )
    size = image.GetSize()
    if image.GetDimension() == 4 and size[3] == 1:
        extract = sitk.ExtractImageFilter()
        extract.SetSize([size[0], size[1], size[2], 0])
        extract.SetDirectionCollapseToSubmatrix()
        image = extract.Execute(image)
    if image.GetDimension() != 3:
        _check_dims(path, size)
    try:
        array = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0).astype(np.float32)
    except Exception as exc:
        raise VolumeError(path, f"unsupported voxel type ({_short(exc, path)})") from exc
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return array, affine


def _read_numpy(path: Path, ext: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        if ext == ".npy":
            return np.load(path, allow_pickle=False), np.eye(4)
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as exc:
        raise VolumeError(path, f"not a readable NumPy file ({_short(exc, path)})") from exc
    images = [key for key in arrays if key != "affine"]
    if len(images) == 1:
        key = images[0]
    else:
        key = next((k for k in NPZ_IMAGE_KEYS if k in arrays), None)
        if key is None:
            names = ", ".join(sorted(arrays)) or "none"
            raise VolumeError(
                path, f"cannot tell which array is the image (arrays: {names}); name it 'image'"
            )
    affine = arrays.get("affine", np.eye(4))
    if np.shape(affine) != (4, 4):
        raise VolumeError(path, f"'affine' has shape {np.shape(affine)}; expected 4x4")
    return arrays[key], np.asarray(affine, dtype=np.float64)


def _check_dims(path: Path, shape: tuple[int, ...]) -> None:
    """Raise for a shape that is not a 3D volume once trailing singleton dimensions are dropped."""
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    text = "x".join(str(n) for n in shape)
    if len(dims) > 3:
        raise VolumeError(path, f"{len(dims)}D image (shape {text}); need a single 3D volume")
    if len(dims) < 3 or min(dims) <= 1:
        raise VolumeError(path, f"2D image (shape {text}); need a 3D volume")


def _as_3d_volume(path: Path, array: np.ndarray, affine: np.ndarray) -> Volume:
    _check_dims(path, array.shape)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
        raise VolumeError(path, f"unsupported voxel type {array.dtype}; need real numbers")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(path, "degenerate affine (non-finite or zero voxel size)")
    array = array.reshape(array.shape[:3])
    return Volume(np.ascontiguousarray(array, dtype=np.float32), np.asarray(affine, dtype=np.float64))
