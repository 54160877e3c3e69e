"""Reading and writing volumes with their geometry (affine in RAS+ millimetres)."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from hagan.errors import HaganError, VolumeError, display_path, printable

if TYPE_CHECKING:
    import SimpleITK

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
SITK_EXTENSIONS = (".nrrd", ".nhdr", ".mha", ".mhd")
NUMPY_EXTENSIONS = (".npy", ".npz")
VOLUME_EXTENSIONS = NIFTI_EXTENSIONS + SITK_EXTENSIONS + NUMPY_EXTENSIONS
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
NPZ_IMAGE_KEYS = ("image", "volume", "arr_0")

# The largest volume read_volume accepts (1024^3 voxels, 4 GiB as float32): a header declaring
# more is refused before anything is allocated. Raise it here for bigger scans.
MAX_VOXELS = 1024**3
# The most memory one read may take at its peak (the data as stored plus their float32 copy), worked
# out from the header before anything is read: 8 GiB fits MAX_VOXELS of float32. The environment
# variable below (in GiB) overrides it without code.
MAX_READ_BYTES = 8 << 30
READ_LIMIT_VARIABLE = "HAGAN_MAX_READ_GIB"
# Deflate (gzip, zlib, zip) cannot expand data by more than about 1032:1.
_DEFLATE_MAX_RATIO = 1032

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


def current_umask() -> int:
    """The process's umask; reading it means setting it, so it is put back at once."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(final: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling of ``final`` to write; it replaces ``final`` only if the block
    completes, and the temporary is removed either way, so a reader (or a killed process) never
    sees a half-written file. The temporary is hidden and keeps ``final``'s suffixes (``.nii.gz``,
    ``.png``), so writers that infer the format from the name still work; the folder is created.
    The file gets the mode the umask gives a new file, not mkstemp's private 0600, so that
    collaborators can read caches, volumes and figures as they could any other file.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temporary_affixes(final.name)
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries, to disk, so that a rename that follows survives a
    power cut; best effort where the OS does not allow it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems
_TEMPORARY_SUFFIX_MAX = 16


def _temporary_affixes(name: str) -> tuple[str, str]:
    """mkstemp's prefix and suffix for a hidden sibling of ``name`` that fits in a file name.

    The suffix keeps the format's extensions (``.nii.gz``) for writers that infer the format from
    the name; the prefix keeps as much of ``name`` as fits beside mkstemp's 8 random characters,
    so that even a 255-byte name gets a legal temporary name.
    """
    extensions = "".join(Path(name).suffixes[-2:])
    if len(extensions.encode("utf-8", "surrogateescape")) > _TEMPORARY_SUFFIX_MAX:
        extensions = Path(name).suffix[:_TEMPORARY_SUFFIX_MAX]
    suffix = f".tmp{extensions}"
    room = _NAME_MAX - len(suffix.encode("utf-8", "surrogateescape")) - 2 - 8
    stem = name.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore")
    return f".{stem}.", suffix


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see atomic_write)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, value: Any, indent: int = 2) -> Path:
    """Write ``value`` as JSON to ``path`` atomically (see atomic_write)."""
    return write_text_atomic(path, json.dumps(value, indent=indent))


def write_volume(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write a NIfTI volume atomically: a killed process never leaves a half-written file."""
    with atomic_write(path) as tmp:
        nib.save(nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64)), str(tmp))
    return Path(path)


def volume_extension(path: str | os.PathLike) -> str | None:
    """The known volume extension of ``path`` (e.g. ``.nii.gz``), or None; case-insensitive."""
    name = Path(path).name.lower()
    return next((ext for ext in VOLUME_EXTENSIONS if name.endswith(ext)), None)


def volume_stem(path: str | os.PathLike) -> str:
    """The file name without its (possibly double) volume extension, so ``a.nii.gz`` gives ``a``."""
    name = Path(path).name
    ext = volume_extension(path)
    return name[: -len(ext)] if ext else name


def _error(path: str | os.PathLike, reason: str) -> VolumeError:
    """A VolumeError whose message is one printable line."""
    return VolumeError(display_path(path), reason)


def _as_path(path: str | bytes | os.PathLike) -> Path:
    return Path(os.fsdecode(os.fspath(path)))


def read_volume(path: str | bytes | os.PathLike) -> Volume:
    """Read any supported volume as float32 with a RAS+ affine; every failure is a VolumeError.

    Declared sizes are checked against the file size and MAX_VOXELS before any voxel is read, so a
    hostile header never makes the reader allocate more than the file can hold. Anything that goes
    wrong inside a reader library becomes a VolumeError too (with the original as its cause).
    """
    path = _as_path(path)
    try:
        return _read_volume(path)
    except VolumeError:
        raise
    except Exception as exc:  # the last guard: a reader library failing in a way not foreseen
        raise _error(path, f"unreadable ({_short(exc, path)})") from exc


def _read_volume(path: Path) -> Volume:
    info = _stat_volume(path)
    if stat.S_ISDIR(info.st_mode):
        ext = volume_extension(path)
        if ext is not None:
            raise _error(path, f"is a folder, not a {ext} file")
        array, affine = _read_dicom_series(path)
        return _as_3d_volume(path, array, affine)
    ext = volume_extension(path)
    if ext is None:
        known = ", ".join(VOLUME_EXTENSIONS)
        raise _error(path, f"unknown file type; expected one of {known} or a DICOM folder")
    if not stat.S_ISREG(info.st_mode):
        raise _error(path, f"not a regular file ({_file_kind(info.st_mode)})")
    if info.st_size == 0:
        raise _error(path, "empty file (0 bytes)")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise _error(path, f"cannot open ({exc.strerror or type(exc).__name__})") from exc
    if ext in NIFTI_EXTENSIONS:
        array, affine = _read_nifti(path, ext, info.st_size)
    elif ext in SITK_EXTENSIONS:
        array, affine = _read_sitk_file(path, ext)
    else:
        array, affine = _read_numpy(path, ext, info.st_size)
    return _as_3d_volume(path, array, affine)


def _stat_volume(path: Path) -> os.stat_result:
    """stat() that follows links and turns loops, dangling links and missing files into VolumeErrors."""
    try:
        return os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _error(path, "symbolic link loop") from exc
        if exc.errno == errno.ENOENT:
            if os.path.islink(path):
                raise _error(path, "broken symbolic link (its target does not exist)") from exc
            raise _error(path, "file not found") from exc
        raise _error(path, f"cannot access ({exc.strerror or type(exc).__name__})") from exc


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device")]
    return next((name for test, name in kinds if test(mode)), "a special file")


def list_volume_paths(folder: str | bytes | os.PathLike) -> list[Path]:
    """Volume files (known extensions) and DICOM series folders under ``folder``, sorted.

    Volume files are taken from ``folder`` itself; DICOM series are found in ``folder`` and any
    subfolder, each folder holding DICOM files counting as one series. Hidden entries are skipped
    so that half-written temporary files are never picked up. Entries that merely carry a volume
    extension (a folder named ``x.nii.gz``, a dangling or looping link, a pipe) are listed too, so
    that reading them reports why they are unusable instead of leaving them out silently.
    """
    folder = _as_path(folder)
    if not folder.is_dir():
        raise HaganError(f"{display_path(folder)}: not a folder")
    try:
        found = {p for p in folder.iterdir() if not p.name.startswith(".") and volume_extension(p)}
    except OSError as exc:
        raise HaganError(f"{display_path(folder)}: cannot list folder ({exc.strerror or exc})") from exc
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if any(_looks_like_dicom(Path(root) / f) for f in files if not f.startswith(".")):
            found.add(Path(root))
    return sorted(found)


def _looks_like_dicom(path: Path) -> bool:
    """A DICOM extension or the 'DICM' magic after the 128-byte preamble; cheap, no parsing."""
    if volume_extension(path):
        return False
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _short(exc: BaseException, path: Path, *aliases: str) -> str:
    """A one-line summary of a library exception, for the reason part of a VolumeError.

    The error already starts with the path, so the library's copy of it (or of a temporary alias
    of it) is shortened to the name.
    """
    text = str(exc)
    for long in (str(path), *aliases):
        text = text.replace(long, printable(path.name))
    lines = [line.strip() for line in text.strip().split("\n") if line.strip()]
    # ITK's messages open with its source location and close with the specific cause
    text = (lines[-1] if lines[0].startswith("Exception thrown in SimpleITK") else " ".join(lines)) if lines else ""
    text = printable(text)
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _human(nbytes: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} bytes"  # unreachable


def _declared(shape: tuple[int, ...], dtype_name: str) -> str:
    return f"{'x'.join(str(n) for n in shape)} {dtype_name}"


def _check_declared_size(
    path: Path,
    shape: tuple[int, ...],
    itemsize: int,
    dtype_name: str,
    available: int | None,
    *,
    compressed: bool = False,
    what: str = "the file",
    bound: str = "exact",
    skipped: int = 0,
) -> None:
    """Refuse a header whose declared data cannot be right, before anything is allocated.

    ``available`` is the number of bytes that hold the data (None when unknown); ``bound`` says
    whether that is "exact", a "lower" bound (inflating stopped early) or an "upper" one (a skip
    of unknown length comes first). Raw data must fit in it exactly to within less than one slice;
    compressed data (with the ``skipped`` bytes before them) cannot expand by more than deflate's
    maximum ratio; no volume may exceed MAX_VOXELS, and reading it may not cost more than
    MAX_READ_BYTES.
    """
    voxels = math.prod(int(n) for n in shape)
    nbytes = voxels * itemsize
    declared = _declared(shape, dtype_name)
    if voxels > MAX_VOXELS:
        raise _error(
            path, f"header declares {declared} ({voxels:.3g} voxels, {_human(nbytes)}); "
            f"more than the {MAX_VOXELS:.3g}-voxel limit (hagan.data.io.MAX_VOXELS)",
        )
    cost, limit = read_cost(shape, itemsize), read_limit()
    if cost > limit:
        raise _error(
            path, f"header declares {declared}; reading it takes about {_human(cost)} of memory (the data and a "
            f"float32 copy), more than the {_human(limit)} limit (raise it with {READ_LIMIT_VARIABLE})",
        )
    if available is None:
        return
    if compressed:
        if nbytes + skipped > _DEFLATE_MAX_RATIO * available + 1024:
            raise _error(
                path, f"header declares {declared} ({_human(nbytes)}) but {what} holds only "
                f"{_human(available)} of compressed data; dimensions disagree with the data",
            )
        return
    if nbytes > available and bound != "lower":
        raise _error(
            path, f"truncated: header declares {declared} ({_human(nbytes)}) but {what} holds only "
            f"{_human(available)} of data",
        )
    slice_bytes = math.prod(int(n) for n in shape[:2]) * itemsize
    if available - nbytes >= max(slice_bytes, 1) and bound != "upper":
        raise _error(
            path, f"header declares {declared} ({_human(nbytes)}) but {what} holds "
            f"{'more than ' if bound == 'lower' else ''}{_human(available)} of data; dimensions disagree with the data",
        )


def read_limit() -> int:
    """MAX_READ_BYTES, or the environment's HAGAN_MAX_READ_GIB when set."""
    text = os.environ.get(READ_LIMIT_VARIABLE)
    if text is None:
        return MAX_READ_BYTES
    try:
        gib = float(text)
    except ValueError:
        gib = math.nan
    if not (math.isfinite(gib) and gib > 0):
        raise HaganError(f"{READ_LIMIT_VARIABLE}={printable(text[:40])!r}: expected a positive number of GiB, e.g. 16")
    return int(gib * 2**30)


def read_cost(shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes of memory reading a volume takes at its peak: the data as stored and their float32 copy."""
    voxels = math.prod(int(n) for n in shape)
    return voxels * itemsize + voxels * 4


def _read_nifti(path: Path, ext: str, file_size: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = nib.load(str(path), keep_file_open=True)
        shape = tuple(int(n) for n in image.shape)
        dtype = np.dtype(image.header.get_data_dtype())
        offset = int(getattr(image.dataobj, "offset", image.header.get_data_offset()))
    except Exception as exc:
        raise _error(path, f"not a readable NIfTI file ({_short(exc, path)})") from exc
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise _error(path, f"unsupported voxel type {dtype} in the NIfTI header; need real numbers")
    _check_dims(path, shape)
    compressed = ext == ".nii.gz"  # the offset counts uncompressed bytes: bound by the whole file
    available = file_size if compressed else max(file_size - offset, 0)
    _check_declared_size(
        path, shape, dtype.itemsize, str(dtype), available, compressed=compressed, skipped=offset if compressed else 0
    )
    if compressed:
        # Inflate the whole stream once, keeping nothing: nibabel alone stops reading where the data
        # end, so a stream cut in its trailer or carrying more data than the header declares goes unseen.
        slice_bytes = math.prod(shape[:2]) * dtype.itemsize
        limit = offset + math.prod(shape) * dtype.itemsize + slice_bytes
        length, complete = _inflated_length(path, path, 0, limit, wbits=31)
        bounded = length > limit
        what = "the decompressed file" if complete or bounded else "the gzip stream (cut short)"
        _check_declared_size(
            path, shape, dtype.itemsize, str(dtype), max(length - offset, 0), what=what,
            bound="lower" if bounded else "exact",
        )
        if not complete:
            raise _error(path, "truncated gzip stream (its end marker and checksum are missing)")
    try:
        array = _nifti_as_float32(image, shape, dtype.itemsize)
    except Exception as exc:
        raise _error(path, f"truncated or corrupt NIfTI data ({_short(exc, path)})") from exc
    try:
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:
        raise _error(path, f"unreadable NIfTI geometry ({_short(exc, path)})") from exc
    return array, affine


_CHUNK = 1 << 20


def _nifti_as_float32(image: nib.Nifti1Image, shape: tuple[int, ...], itemsize: int) -> np.ndarray:
    """The voxels as float32, read a slab at a time so that the stored data and the float64 of
    nibabel's scaling are never held whole beside the result: the peak is one float32 volume."""
    array = np.empty(shape, dtype=np.float32)
    step = max(1, _CHUNK * 16 // max(math.prod(shape[:2]) * itemsize, 1))
    with np.errstate(over="ignore", invalid="ignore"):  # huge scl_slope: inf voxels, handled later
        for start in range(0, shape[2], step):
            array[:, :, start:start + step] = image.dataobj[:, :, start:start + step]
    return array



def _inflated_length(path: Path, source: Path, start: int, limit: int, wbits: int) -> tuple[int, bool]:
    """How many bytes the compressed stream of ``source`` from byte ``start`` inflates to (counting
    stops past ``limit``), and whether it ended properly (end marker, length and checksum verified).

    Inflates one chunk at a time and keeps none of it, so a bomb, a huge NIfTI ``vox_offset`` or a
    lying header costs time bounded by deflate's ratio but never memory. ``wbits`` 31 reads gzip
    (several members allowed, then zero padding), 47 gzip or zlib (see zlib.decompressobj).
    """
    total = 0
    with open(source, "rb") as f:
        f.seek(start)
        inflater = zlib.decompressobj(wbits=wbits)
        data = b""
        while total <= limit:
            if not data:
                data = f.read(_CHUNK)
                if not data:
                    return total, False
            try:
                total += len(inflater.decompress(data, _CHUNK))
            except zlib.error as exc:
                raise _error(path, f"corrupt compressed data (zlib: {exc})") from exc
            data = inflater.unconsumed_tail
            if not inflater.eof:
                continue
            data = inflater.unused_data
            while not data.strip(b"\0"):  # zero padding after the last member is harmless
                data = f.read(_CHUNK)
                if not data:
                    return total, True
            if len(data) < 2:
                data += f.read(1)
            if not data.startswith(b"\x1f\x8b"):
                trailing = os.fstat(f.fileno()).st_size - f.tell() + len(data)
                raise _error(path, f"{trailing} bytes of trailing garbage after the compressed data")
            inflater = zlib.decompressobj(wbits=wbits)
    return total, False


_SITK_IO = {".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO", ".mha": "MetaImageIO", ".mhd": "MetaImageIO"}
_SITK_KIND = {".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage"}


def _simpleitk():
    """SimpleITK is imported on the first DICOM, NRRD or MHA read: NIfTI and NumPy users (and training
    from a cache) need neither its native library nor its start-up time."""
    import SimpleITK

    return SimpleITK


def _read_sitk_file(path: Path, ext: str) -> tuple[np.ndarray, np.ndarray]:
    kind = _SITK_KIND[ext]
    header = _text_header(path, ext)  # refuses data files outside the header's folder before ITK opens any
    sitk = _simpleitk()
    with _sitk_file_name(path, ext) as name, _quiet_native_stderr():
        reader = sitk.ImageFileReader()
        reader.SetImageIO(_SITK_IO[ext])
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
            size = tuple(int(n) for n in reader.GetSize())
            components = int(reader.GetNumberOfComponents())
            pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
            itemsize = _sitk_itemsize(reader.GetPixelID())
        except Exception as exc:
            raise _error(path, f"not a readable {kind} image ({_short(exc, path, name)})") from exc
        if components != 1:
            raise _error(path, f"{components} values per voxel (colour or vector image); need a scalar volume")
        _check_dims(path, size)
        _check_declared_size(path, size, itemsize, pixel, None)  # the voxel and memory limits, before inflating
        available, bound, what = _data_size(path, header, size, itemsize)
        _check_declared_size(path, size, itemsize, pixel, available, what=what, bound=bound)
        try:
            image = reader.Execute()
        except Exception as exc:
            raise _error(path, f"truncated or corrupt {kind} data ({_short(exc, path, name)})") from exc
    return _sitk_to_array_affine(path, image)


def _missing_magic(ext: str, head: bytes) -> str | None:
    """Why ``head`` is not the start of a NRRD or MetaImage header, or None when it may be one."""
    if _SITK_KIND[ext] == "NRRD" and not head.startswith(b"NRRD"):
        return "no NRRD magic line at the start"
    if _SITK_KIND[ext] == "MetaImage" and not any(key in head[:1024] for key in (b"ObjectType", b"NDims")):
        return "no MetaImage header (ObjectType/NDims lines)"
    return None


def _sitk_itemsize(pixel_id: int) -> int:
    sitk = _simpleitk()
    sizes = {
        sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2,
        sitk.sitkUInt32: 4, sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8,
        sitk.sitkFloat32: 4, sitk.sitkFloat64: 8, sitk.sitkComplexFloat32: 8, sitk.sitkComplexFloat64: 16,
    }
    return sizes.get(pixel_id, 1)


_HEADER_MAX = 1 << 20
_MAX_DATA_FILES = 1 << 16


@dataclass
class _TextHeader:
    """What a NRRD or MetaImage text header says about where its voxel data are and how they are stored."""

    encoding: str  # "raw", "gzip", "text", "hex" or one we cannot measure
    data_start: int  # where the data start in the header's own file
    data_files: list[Path] | None  # the detached data files, inside the header's folder; None: attached
    skip: int  # bytes skipped before the data of each file (-1: up to the data at the file's end)
    unknown_skip: bool  # a line skip, whose length in bytes the header does not say


def _header_lines(path: Path, head: bytes, nrrd: bool) -> tuple[list[tuple[str, int]], int]:
    """The header's lines, each with the offset just past it, and where the header ends.

    A carriage return inside a line is refused: teem ends lines at a lone CR, so a header could
    otherwise hide a field from us that ITK reads. NRRD headers end at a blank line, MetaImage
    headers at their data file field (any letter case, or one we do not read could follow).
    """
    lines, position = [], 0
    while position < len(head):
        end = head.find(b"\n", position)
        stop = len(head) if end < 0 else end
        raw = head[position:stop]
        position = len(head) if end < 0 else end + 1
        if b"\r" in (raw[:-1] if raw.endswith(b"\r") and end >= 0 else raw):
            raise _error(path, "a carriage return inside a header line; save the header with plain line ends")
        line = raw.decode("latin-1").rstrip("\r")
        if nrrd and not line.strip():
            return lines, position
        lines.append((line, position))
        if not nrrd and _meta_key(line).lower() == "elementdatafile":
            return lines, position
    if len(head) > _HEADER_MAX:
        raise _error(path, f"header longer than {_human(_HEADER_MAX)} (no end found)")
    return lines, position


def _meta_key(line: str) -> str:
    """A MetaImage line's key: MetaIO ends it at the first '=' or ':'."""
    return re.split(r"[=:]", line, maxsplit=1)[0].strip()


def _text_header(path: Path, ext: str) -> _TextHeader:
    """Parse a NRRD or MetaImage header ourselves, before ITK sees it.

    A detached header names its data files (NRRD ``data file``, MetaImage ``ElementDataFile``: one
    name, a LIST of names or a printf pattern). Every one of them must resolve, after symbolic
    links, inside the folder of the header that names it, or a header could make ``hagan preprocess``
    read and cache any file the user can read (``../../etc/shadow``). Where our reading of a header
    could differ from ITK's (a second data file field, one in another spelling, a lone carriage
    return, a pattern with a conversion that is not an integer's), the header is refused.
    """
    with open(path, "rb") as f:
        head = f.read(_HEADER_MAX + 1)
    missing = _missing_magic(ext, head)
    if missing:
        raise _error(path, f"not a readable {_SITK_KIND[ext]} image ({missing})")
    nrrd = ext in (".nrrd", ".nhdr")
    lines, data_start = _header_lines(path, head, nrrd)
    fields: dict[str, str] = {}
    detached: str | None = None
    names: list[str] = []
    blank_name = False
    for line, end in lines:
        if nrrd and (line.startswith("#") or line.startswith("NRRD") or not line.strip()):
            continue
        if nrrd and ":=" in line and (": " not in line or line.index(":=") < line.index(": ")):
            if "datafile" in "".join(line.split(":=")[0].lower().split()):
                raise _error(path, "header names a data file in a form hagan does not read")
            continue  # a key/value pair, not a field
        if nrrd:
            key, _, value = line.partition(":")
        else:
            key, value = _meta_key(line), re.split(r"[=:]", line, maxsplit=1)[1:] or [""]
            value = value[0].lstrip(" \t=:")
        key, value = key.strip(), value.strip()
        if "datafile" not in "".join(key.lower().split()):
            fields[key.lower()] = value
            continue
        if detached is not None or key not in (("data file", "datafile") if nrrd else ("ElementDataFile",)):
            raise _error(path, "header names its data file twice, or in a form hagan does not read")
        detached = value
        if value.upper().startswith("LIST"):
            if len(head) > _HEADER_MAX:
                raise _error(path, f"header with its LIST of data files longer than {_human(_HEADER_MAX)}")
            rest = head[end:].decode("latin-1")
            if "\r" in rest.replace("\r\n", "\n"):
                raise _error(path, "a carriage return inside the LIST of data files")
            names = rest.replace("\r\n", "\n").split("\n")
            if names and names[-1] == "":
                names.pop()
            blank_name = not names or any(not name.strip() for name in names)
            names = [name.strip() for name in names if name.strip()]
            break
    if nrrd:
        encoding = fields.get("encoding", "raw").lower()
        skip_text = fields.get("byte skip") or fields.get("byteskip") or "0"
        unknown_skip = "line skip" in fields or "lineskip" in fields
    else:
        encoding = "gzip" if fields.get("compresseddata", "false").lower() == "true" else "raw"
        skip_text = fields.get("headersize", "0")
        unknown_skip = False
        if detached is not None and detached.upper() == "LOCAL":
            detached = None
    encoding = {"gz": "gzip", "bz2": "bzip2", "txt": "text", "ascii": "text"}.get(encoding, encoding)
    if encoding == "bzip2":
        raise _error(path, "bzip2-encoded NRRD data cannot be read (ITK's NRRD reader lacks bzip2); save it raw or gzip")
    try:
        skip = int(skip_text)
    except ValueError:
        raise _error(path, f"header's byte skip {printable(skip_text[:40])!r} is not a whole number") from None
    data_files = None
    if detached is not None:
        if not names:
            names = _pattern_names(path, detached, nrrd) if "%" in detached else [detached]
        if len(names) > _MAX_DATA_FILES:
            raise _error(path, f"header names {len(names)} data files; at most {_MAX_DATA_FILES} are read")
        data_files = [_data_file_inside(path, name) for name in names]
        if blank_name:  # teem would count a blank line as a name
            raise _error(path, "a blank or missing name in the LIST of data files")
    return _TextHeader(encoding, data_start, data_files, skip, unknown_skip or skip < -1)


# one printf conversion of an integer, as both teem and MetaIO format slice numbers; anything else
# (%s, %n, two conversions) would make the C library read memory it should not
_INTEGER_FORMAT = re.compile(r"[^%]*%[-+ 0#]*[0-9]*(?:\.[0-9]+)?[diouxX][^%]*")


def _pattern_names(path: Path, value: str, nrrd: bool) -> list[str]:
    """The names a printf-style data file pattern (``slice%03d.raw 1 40 1``) expands to.

    Only FORMAT FIRST LAST STEP (NRRD may add a piece dimension) with one integer conversion is
    read; the other forms MetaIO accepts are refused rather than guessed at.
    """
    parts = value.split()
    shown = printable(value[:80])
    if len(parts) not in ((4, 5) if nrrd else (4,)) or not _INTEGER_FORMAT.fullmatch(parts[0]):
        raise _error(path, f"data file pattern {shown!r} is not one hagan reads (FORMAT FIRST LAST STEP, "
                           "one integer conversion such as %03d)")
    try:
        first, last, step = (int(n) for n in parts[1:4])
    except ValueError:
        raise _error(path, f"data file pattern {shown!r}: FIRST LAST STEP must be whole numbers") from None
    if step == 0 or (last - first) * step < 0:
        raise _error(path, f"data file pattern {shown!r} has a step that never reaches its end")
    count = (last - first) // step + 1
    if count > _MAX_DATA_FILES:
        raise _error(path, f"data file pattern names {count} files; at most {_MAX_DATA_FILES} are read")
    return [parts[0] % i for i in range(first, last + (1 if step > 0 else -1), step)]


def _data_file_inside(path: Path, name: str) -> Path:
    """The data file ``name`` that the header ``path`` names, refused unless it resolves (after
    symbolic links) inside the header's own folder."""
    shown = printable(name if len(name) <= 120 else name[:117] + "...")
    if not name or "\0" in name:
        raise _error(path, f"header names an invalid data file {shown!r}")
    folder = os.path.realpath(path.parent)
    target = os.path.realpath(os.path.join(path.parent, name))
    if os.path.commonpath([folder, target]) != folder:
        raise _error(
            path, f"its data file {shown!r} lies outside the header's folder; refusing to read it "
            "(put the data file beside its header)",
        )
    return Path(target)


def _data_size(path: Path, header: _TextHeader, shape: tuple[int, ...], itemsize: int) -> tuple[int | None, str, str]:
    """How many bytes hold the voxel data, how to compare them with the header, and where they are.

    The middle value is "exact", "lower" (measuring stopped past what the header declares plus one
    slice: the data hold at least that much) or "upper" (a skip of unknown length precedes the data).
    Compressed data are inflated, never kept, to measure them: ITK does not always notice a stream
    shorter than its header says (a compressed MetaImage comes back silently part-filled). Text data
    count as ``itemsize`` bytes per number, hex data as one byte per two digits. None when the
    encoding gives no useful figure.
    """
    limit = (math.prod(shape) + math.prod(shape[:2])) * itemsize
    if header.data_files is None:
        sources, what = [(path, header.data_start, os.stat(path).st_size)], "the file"
    else:
        sources = []
        for source in header.data_files:
            try:
                info = os.stat(source)
            except OSError as exc:
                raise _error(path, f"its data file {printable(source.name)!r} cannot be read ({exc.strerror})") from exc
            if not stat.S_ISREG(info.st_mode):
                raise _error(path, f"its data file {printable(source.name)!r} is not a regular file ({_file_kind(info.st_mode)})")
            sources.append((source, 0, info.st_size))
        what = f"its data file {printable(sources[0][0].name)!r}" if len(sources) == 1 else f"its {len(sources)} data files"
    skip = max(header.skip, 0)
    bound = "upper" if header.unknown_skip or header.skip == -1 else "exact"
    if header.encoding == "raw":
        return sum(max(size - start - skip, 0) for _, start, size in sources), bound, what
    if header.encoding not in ("gzip", "text", "hex"):
        return None, "exact", what
    detail = {"gzip": "inflated", "text": "as text", "hex": "as hex"}[header.encoding]
    total = 0
    for source, start, _ in sources:
        left = limit - total
        if header.encoding == "gzip":
            length = _inflated_length(path, source, start, left, wbits=47)[0] - skip
        elif header.encoding == "text":
            length = _count_bytes(source, start, left // itemsize + 1, _number_starts) * itemsize
        else:
            length = _count_bytes(source, start, 2 * left + 2, _hex_digits) // 2
        total += max(length, 0)
        if total > limit:
            return total, "lower", f"{what} ({detail})"
    return total, bound, f"{what} ({detail})"


def _number_starts(chunk: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Where a number starts in text data: a character after white space or a comma."""
    separator = _SEPARATORS[chunk]
    return ~separator & np.concatenate((_SEPARATORS[previous] if previous.size else [True], separator[:-1]))


def _hex_digits(chunk: np.ndarray, previous: np.ndarray) -> np.ndarray:
    return _HEX[chunk]


_SEPARATORS = np.zeros(256, dtype=bool)
_SEPARATORS[list(b" \t\n\r\v\f,")] = True
_HEX = np.zeros(256, dtype=bool)
_HEX[list(b"0123456789abcdefABCDEF")] = True


def _count_bytes(source: Path, start: int, limit: int, selects) -> int:
    """How many bytes of ``source`` from ``start`` ``selects`` picks (counting stops past ``limit``),
    one chunk in memory at a time."""
    count, previous = 0, np.empty(0, dtype=np.uint8)
    with open(source, "rb") as f:
        f.seek(start)
        while count <= limit and (chunk := f.read(_CHUNK)):
            codes = np.frombuffer(chunk, dtype=np.uint8)
            count += int(selects(codes, previous).sum())
            previous = codes[-1:]
    return count


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    sitk = _simpleitk()
    with _sitk_folder_name(folder) as (name, originals), _quiet_native_stderr():
        try:
            series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(name)
        except Exception as exc:
            raise _error(folder, f"cannot scan folder for DICOM files ({_short(exc, folder, name)})") from exc
        if not series_ids:
            raise _error(folder, "folder holds no DICOM series")
        if len(series_ids) > 1:
            raise _error(
                folder, f"folder holds {len(series_ids)} DICOM series; put each series in its own folder"
            )
        try:
            files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(name, series_ids[0]))
        except Exception as exc:
            raise _error(folder, f"unreadable DICOM series ({_short(exc, folder, name)})") from exc
        _check_dicom_slices(folder, files, originals)
        try:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
        except Exception as exc:
            raise _error(folder, f"unreadable DICOM series ({_short(exc, folder, name)})") from exc
    return _sitk_to_array_affine(folder, image)


def _check_dicom_slices(folder: Path, files: list[str], originals: dict[str, str]) -> None:
    """Refuse series with slices of different sizes or orientations, repeated positions, or gaps.

    ITK would read such a series anyway with an average slice spacing, silently stretching anatomy.
    """
    def name(file: str) -> str:
        return printable(originals.get(file, os.path.basename(file)))

    sitk = _simpleitk()
    origins, shapes, normals = [], [], []
    for file in files:
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(file)
        try:
            reader.ReadImageInformation()
        except Exception as exc:
            raise _error(folder, f"unreadable DICOM slice {name(file)} ({_short(exc, folder)})") from exc
        size = reader.GetSize()
        itemsize = _sitk_itemsize(reader.GetPixelID())
        shortfall = _pixel_data_mismatch(file)
        if shortfall is not None:
            declared, stored = shortfall
            state = "truncated: " if stored < declared else ""
            raise _error(
                folder, f"{state}slice {name(file)} declares {'x'.join(str(n) for n in size)} voxels "
                f"({_human(declared)}) but its pixel data hold {_human(stored)}"
                f"{'' if state else '; dimensions disagree with the data'}",
            )
        direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(len(size), len(size))
        origins.append(np.asarray(reader.GetOrigin(), dtype=np.float64)[:3])
        shapes.append(tuple(size[:2]))
        normals.append(direction[:3, 2] if direction.shape[0] >= 3 else np.array([0.0, 0.0, 1.0]))
        if len(size) > 2 and size[2] > 1 and len(files) > 1:
            raise _error(folder, f"multi-frame file {name(file)} mixed with other slices in one series")
    if shapes:
        _check_declared_size(folder, (*shapes[0], len(files)), itemsize, f"{8 * itemsize}-bit", None)
    if len(files) < 2:
        return
    for file, shape in zip(files, shapes):
        if shape != shapes[0]:
            raise _error(
                folder, f"slices of different sizes ({name(files[0])} is {shapes[0][0]}x{shapes[0][1]}, "
                f"{name(file)} is {shape[0]}x{shape[1]})",
            )
    for file, normal in zip(files, normals):
        if not np.allclose(normal, normals[0], atol=1e-3):
            raise _error(folder, f"slices with different orientations ({name(files[0])} and {name(file)})")
    positions = np.array([origin @ normals[0] for origin in origins])
    steps = np.diff(positions)
    if not (np.all(steps > 0) or np.all(steps < 0)):
        # GDCM falls back to file-name order when it cannot sort (e.g. on repeated positions)
        order = np.argsort(positions, kind="stable")
        files[:] = [files[i] for i in order]
        positions = positions[order]
    gaps = np.abs(np.diff(positions))
    for i, gap in enumerate(gaps):
        if gap < 1e-3:
            raise _error(
                folder, f"two slices at the same position {positions[i]:.4g} mm ({name(files[i])} and "
                f"{name(files[i + 1])}); duplicated slices or mixed acquisitions",
            )
    typical = float(np.median(gaps))
    irregular = np.flatnonzero(np.abs(gaps - typical) > 0.1 * typical)
    if irregular.size:
        i = int(irregular[0])
        raise _error(
            folder, f"non-uniform slice spacing: {gaps[i]:.4g} mm between {name(files[i])} and "
            f"{name(files[i + 1])}, {typical:.4g} mm elsewhere ({irregular.size} irregular of "
            f"{gaps.size} gaps); missing slices?",
        )


def _pixel_data_mismatch(file: str) -> tuple[int, int] | None:
    """(declared, stored) bytes of an uncompressed DICOM slice whose pixel data are not the size its
    Rows, Columns, frames, samples and bits say; None when they agree or cannot be compared.

    GDCM reads such a slice without an error: a 4096 x 4096 claim over a few bytes comes back as a
    huge image of zeros. The pixel data's length is read with pydicom (the ``dicom`` extra) without
    loading the data; compressed (encapsulated) data have no fixed length and are not compared.
    """
    try:
        import pydicom

        dataset = pydicom.dcmread(file, defer_size=1024, force=True)
        element = dataset.get_item(0x7FE00010)
        if element is None or element.length == 0xFFFFFFFF:
            return None
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        bits = int(dataset.BitsAllocated)
        pixels = int(dataset.Rows) * int(dataset.Columns) * frames * int(dataset.get("SamplesPerPixel", 1) or 1)
    except Exception:  # no pydicom, or a header only GDCM understands: GDCM's own checks apply
        return None
    declared = (pixels * bits + 7) // 8
    stored = int(element.length)
    return None if declared <= stored <= declared + 1 else (declared, stored)  # one byte pads to even length


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@contextmanager
def _sitk_file_name(path: Path, ext: str) -> Iterator[str]:
    """A name SimpleITK can take for ``path``.

    SimpleITK aborts the whole process (an uncatchable C++ std::logic_error) when given a path that
    is not valid UTF-8, e.g. a Linux file name with undecodable bytes. Such a file is read through
    a temporary symbolic link with a plain name; for detached headers, the links include the
    header's siblings with UTF-8 names so that its data file is found.
    """
    text = str(path)
    if _utf8_ok(text):
        yield text
        return
    with tempfile.TemporaryDirectory(prefix="hagan-read-") as tmp:
        link = os.path.join(tmp, "volume" + ext)
        os.symlink(os.path.abspath(path), link)
        if ext in (".mhd", ".nhdr"):
            with os.scandir(path.parent) as entries:
                for entry in entries:
                    if _utf8_ok(entry.name) and not os.path.exists(os.path.join(tmp, entry.name)):
                        os.symlink(os.path.abspath(entry.path), os.path.join(tmp, entry.name))
        yield link


@contextmanager
def _sitk_folder_name(folder: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """Like _sitk_file_name for a DICOM folder; also maps link names back to the original file names."""
    try:
        entries = sorted(os.listdir(folder))
    except OSError as exc:
        raise _error(folder, f"cannot list folder ({exc.strerror or type(exc).__name__})") from exc
    if _utf8_ok(str(folder)) and all(_utf8_ok(e) for e in entries):
        yield str(folder), {}
        return
    with tempfile.TemporaryDirectory(prefix="hagan-read-") as tmp:
        originals = {}
        for i, entry in enumerate(entries):
            source = os.path.join(os.path.abspath(folder), entry)
            if entry.startswith(".") or not os.path.isfile(source):
                continue
            link = os.path.join(tmp, f"slice{i:06d}.dcm")
            os.symlink(source, link)
            originals[link] = entry
        yield tmp, originals


@contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence what ITK, GDCM and MetaIO print straight to the C-level stderr while they read.

    Their failures still arrive as exceptions (turned into one-line VolumeErrors); without this, a
    folder of broken files would spray multi-line native warnings over the command's output.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _sitk_to_array_affine(path: Path, image: SimpleITK.Image) -> tuple[np.ndarray, np.ndarray]:
    """Array in ITK index order (i, j, k) with the matching RAS+ affine, like nibabel gives for NIfTI."""
    sitk = _simpleitk()
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise _error(
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
        raise _error(path, f"unsupported voxel type ({_short(exc, path)})") from exc
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return array, affine


_PICKLE_HINT = "refusing to unpickle (a pickle can run arbitrary code); save a plain numeric array"


def _npy_header(path: Path, stream) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from an .npy header, refusing object dtypes before any data is read."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        shape, _, dtype = np.lib.format._read_array_header(stream, version)
    if dtype.hasobject:
        raise _error(path, f"holds Python objects (dtype {dtype}); {_PICKLE_HINT}")
    return tuple(int(n) for n in shape), dtype


def _read_numpy(path: Path, ext: str, file_size: int) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:1] == b"\x80":
        raise _error(path, f"holds pickled Python data, not an array; {_PICKLE_HINT}")
    if ext == ".npy":
        if magic.startswith(b"PK\x03\x04"):
            raise _error(path, "is a zip archive (an .npz?), not an .npy file")
        if magic != b"\x93NUMPY":
            raise _error(path, "not a readable NumPy file (no .npy magic number)")
        try:
            with open(path, "rb") as f:
                shape, dtype = _npy_header(path, f)
                _check_numpy_array(path, shape, dtype, file_size - f.tell())
                f.seek(0)
                array = np.lib.format.read_array(f, allow_pickle=False)
        except VolumeError:
            raise
        except Exception as exc:
            raise _error(path, f"not a readable NumPy file ({_short(exc, path)})") from exc
        return array, np.eye(4)
    if magic == b"\x93NUMPY":
        raise _error(path, "is an .npy file, not an .npz archive")
    try:
        archive = zipfile.ZipFile(path)
    except Exception as exc:
        raise _error(path, f"not a readable NumPy .npz archive ({_short(exc, path)})") from exc
    with archive:
        try:
            members = {
                info.filename[: -len(".npy")]: info for info in archive.infolist() if info.filename.endswith(".npy")
            }
            images = [key for key in members if key != "affine"]
            if len(images) == 1:
                key = images[0]
            else:
                key = next((k for k in NPZ_IMAGE_KEYS if k in members), None)
                if key is None:
                    names = ", ".join(sorted(members)) or "none"
                    raise _error(path, f"cannot tell which array is the image (arrays: {names}); name it 'image'")
            array = _read_npz_member(path, archive, members[key])
            affine = _read_npz_member(path, archive, members["affine"]) if "affine" in members else np.eye(4)
        except VolumeError:
            raise
        except Exception as exc:
            raise _error(path, f"not a readable NumPy .npz archive ({_short(exc, path)})") from exc
    if np.shape(affine) != (4, 4) or not (np.issubdtype(affine.dtype, np.number) and not np.iscomplexobj(affine)):
        raise _error(path, f"'affine' is {affine.dtype} of shape {np.shape(affine)}; expected 4x4 real numbers")
    return array, np.asarray(affine, dtype=np.float64)


def _read_npz_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    what = f"member {info.filename!r}"
    with archive.open(info) as stream:
        shape, dtype = _npy_header(path, stream)
        header = stream.tell() if stream.seekable() else 0
    available = max(info.file_size - header, 0)
    _check_numpy_array(path, shape, dtype, available, what=what, volume=not info.filename.startswith("affine"))
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > _DEFLATE_MAX_RATIO * info.compress_size + 1024:
        raise _error(path, f"{what} claims {_human(info.file_size)} from {_human(info.compress_size)} compressed; corrupt archive")
    with archive.open(info) as stream:
        return np.lib.format.read_array(stream, allow_pickle=False)


def _check_numpy_array(
    path: Path, shape: tuple[int, ...], dtype: np.dtype, available: int, what: str = "the file", volume: bool = True
) -> None:
    if volume:
        _check_dims(path, shape)
    _check_declared_size(path, shape, dtype.itemsize, str(dtype), available, what=what)


def _check_dims(path: Path, shape: tuple[int, ...]) -> None:
    """Raise for a shape that is not a 3D volume once trailing singleton dimensions are dropped."""
    dims = [int(n) for n in shape]
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    text = "x".join(str(n) for n in shape) or "()"
    if any(n <= 0 for n in dims):
        raise _error(path, f"empty image (shape {text}); need a 3D volume")
    if len(dims) > 3:
        raise _error(path, f"{len(dims)}D image (shape {text}); need a single 3D volume")
    if len(dims) < 3 or min(dims) <= 1:
        raise _error(path, f"{min(len(dims), 2)}D image (shape {text}); need a 3D volume")


def _as_3d_volume(path: Path, array: np.ndarray, affine: np.ndarray) -> Volume:
    if not isinstance(array, np.ndarray):
        raise _error(path, f"holds a {type(array).__name__}, not an array")
    _check_dims(path, array.shape)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
        raise _error(path, f"unsupported voxel type {array.dtype}; need real numbers")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise _error(path, "degenerate affine (non-finite or zero voxel size)")
    array = array.reshape(array.shape[:3])
    return Volume(np.ascontiguousarray(array, dtype=np.float32), np.asarray(affine, dtype=np.float64))
