"""Turning raw scans into the model's cubes (canonical orientation, intensity recipe, trimming,
resizing: see :mod:`hagan.data.cube` and :mod:`hagan.data.intensity`), with their class labels and
label maps, and writing a folder of them as a cache.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from hagan import __version__
from hagan.data.cache import CACHE_FORMAT
from hagan.data.cube import (
    FIT_MODES,
    canonical_view,
    check_fit,
    fit_to_cube,
    generated_affine,
    nonblank_slices,
    trim_blank_slices,
)
from hagan.data.intensity import RECIPES, apply_recipe
from hagan.data.io import (
    Volume,
    atomic_write,
    display_path,
    fsync_path,
    list_volume_paths,
    read_volume,
    volume_stem,
    write_json_atomic,
)
from hagan.errors import HaganError, NoUsableVolumesError, VolumeError, printable

# label maps are stored in the smallest unsigned type that holds their largest value
MAX_SEGMENTATION_LABEL = np.iinfo(np.uint16).max
LABEL_NAME_SEPARATORS = "_-."
MAX_CLASS_LABEL = 65535  # a label above it is a measurement or a typo, not a class index
# The largest cube edge: the largest size any model trains at (preset paper-512). 512^3 float16 is
# 256 MiB per cube; a typo such as --size 1000 would write 2 GB per volume.
MAX_CUBE_SIZE = 512
# What a cache folder holds; a folder with anything else is never replaced (it holds user files).
CACHE_PARTS = ("manifest.json", "volumes", "segmentations")


def _check_raw(source: str, array: np.ndarray) -> None:
    finite = np.isfinite(array)
    if not finite.any():
        raise VolumeError(source, "no finite voxel values (all NaN or infinite)")
    if array.min(where=finite, initial=np.inf) == array.max(where=finite, initial=-np.inf):
        raise VolumeError(source, "constant intensity; nothing to learn")


def _preprocess(
    volume: Volume, recipe: str, size: int, mode: str, trim: bool, min_size: int | None, source: str
) -> tuple[Volume, int, str | None]:
    """The pipeline, also returning how many blank end slices were trimmed and any geometry warning
    (for the report)."""
    if mode not in FIT_MODES:
        raise HaganError(f"unknown mode {mode!r}; valid modes: {', '.join(FIT_MODES)}")
    _check_raw(source, volume.array)
    canonical, affine = canonical_view(volume)
    array = apply_recipe(canonical, recipe)  # the recipe's copy is the only one
    if array.min() == array.max():
        raise VolumeError(source, f"constant after the {recipe} recipe (all intensities outside its range)")
    kept = int(nonblank_slices(array).sum())
    if kept < 2:
        raise VolumeError(source, f"{kept} non-blank axial slice(s); need at least 2")
    trimmed = 0
    if trim:
        before = array.shape[0]
        array, affine = trim_blank_slices(array, affine)
        trimmed = before - array.shape[0]
    if mode == "pad":
        smallest = size // 2 if min_size is None else min_size
        if min(array.shape) < smallest:
            shape = "x".join(str(n) for n in array.shape)
            minimum = f"{smallest}x{smallest}x{smallest}"
            raise VolumeError(source, f"shape {shape} is smaller than the {minimum} minimum for pad mode")
    warning = check_fit(source, array.shape, Volume(array, affine).spacing, size, mode)
    cube, cube_affine = fit_to_cube(array, affine, size, mode)
    cube = np.clip(cube, -1.0, 1.0).astype(np.float32)
    return Volume(cube, cube_affine), trimmed, warning


def preprocess_volume(
    volume: Volume,
    recipe: str,
    size: int,
    mode: str = "resize_keep_aspect",
    trim: bool = True,
    *,
    min_size: int | None = None,
    source: str = "<volume>",
) -> Volume:
    """canonicalise -> recipe -> trim -> fit: a float32 cube in [-1, 1] with its world affine.

    ``min_size`` (pad mode only; default ``size // 2``) rejects volumes that would be mostly
    padding; ``source`` names the volume in VolumeErrors. A volume whose content would span fewer
    than MIN_FITTED_VOXELS cube voxels along an axis (see ``fitted_span``) is refused.
    Every problem with the volume itself is a VolumeError (never another exception type).
    """
    return _preprocess_guarded(volume, recipe, size, mode, trim, min_size, source)[0]


def _preprocess_guarded(
    volume: Volume, recipe: str, size: int, mode: str, trim: bool, min_size: int | None, source: str
) -> tuple[Volume, int, str | None]:
    """_preprocess with a printable ``source`` and any unforeseen failure turned into a VolumeError.

    Hostile values (NaN, infinities, float32 extremes, odd geometry) are handled explicitly; the
    guard is the last line so that one strange volume cannot take down a folder run. The original
    exception stays attached as the cause (``hagan --debug`` shows it).
    """
    source = display_path(source)
    try:
        with np.errstate(all="ignore"):
            return _preprocess(volume, recipe, size, mode, trim, min_size, source)
    except HaganError:
        raise
    except Exception as exc:
        detail = " ".join(str(exc).split())[:160]
        raise VolumeError(source, f"preprocessing failed ({type(exc).__name__}: {detail})") from exc


class SegmentationFolder:
    """Label maps matched to images by file name: the same stem (MSD's ``images/x.nii.gz`` and
    ``labels/x.nii.gz``), or the image's stem followed by a separator and a suffix (IXI's
    ``IXI013-HH-1212_T1.nii.gz`` and ``IXI013-HH-1212_T1_DLMUSE.nii.gz``)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.stems = [(volume_stem(path), path) for path in list_volume_paths(self.folder)]

    def match(self, image: Path) -> Path:
        stem = volume_stem(image)
        found = [path for name, path in self.stems if name == stem] or [
            path for name, path in self.stems
            if name.startswith(stem) and name[len(stem) : len(stem) + 1] in tuple(LABEL_NAME_SEPARATORS)
        ]
        if not found:
            raise VolumeError(display_path(image), f"no label map named like it in {display_path(self.folder)}")
        if len(found) > 1:
            names = ", ".join(path.name for path in found)
            raise VolumeError(display_path(image), f"several label maps match it ({names})")
        return found[0]


def segmentation_on_cube(labels: Volume, image: Volume, cube: Volume, source: str = "<labels>") -> np.ndarray:
    """A label map carried onto the cube's grid by nearest neighbour, 0 outside the source grid.

    The labels must share the image's grid (shape and affine). Each cube voxel takes the label of
    the source voxel whose cell holds the cube voxel's centre, found through the cube's world affine,
    so orientation, trimming, resizing and padding act on the labels exactly as on the image and
    no label value is ever blended with another.
    """
    source = display_path(source)
    array = labels.array
    if array.shape != image.array.shape:
        shape = "x".join(map(str, array.shape))
        raise VolumeError(source, f"label map is {shape}, not on the image's grid "
                                  f"({'x'.join(map(str, image.array.shape))})")
    if not np.allclose(labels.affine, image.affine, atol=1e-3):
        raise VolumeError(source, "label map's affine differs from the image's; resample it onto the image's grid")
    finite = np.isfinite(array)
    if not finite.all() or np.any(array < 0) or np.any(array != np.round(array)):
        raise VolumeError(source, "label map must hold non-negative integers")
    if array.max() > MAX_SEGMENTATION_LABEL:
        raise VolumeError(source, f"label {int(array.max())} exceeds {MAX_SEGMENTATION_LABEL}")
    dtype = np.uint8 if array.max() <= np.iinfo(np.uint8).max else np.uint16
    cube_to_source = np.linalg.inv(labels.affine) @ cube.affine
    resampled = ndimage.affine_transform(
        array, cube_to_source[:3, :3], offset=cube_to_source[:3, 3], output_shape=cube.array.shape,
        order=0, mode="grid-constant", cval=0.0,
    )
    return np.rint(resampled).astype(dtype)


@dataclass
class CacheEntryReport:
    """One volume that made it into the cache."""

    name: str
    source: str
    original_shape: tuple[int, ...]
    original_spacing: tuple[float, ...]
    trimmed_slices: int
    label: int


@dataclass
class PreprocessReport:
    """What preprocess_folder did, for the CLI to print and for scripts to inspect."""

    cache_dir: Path
    entries: list[CacheEntryReport] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    segmentation_labels: int | None = None

    def summary(self) -> str:
        """Multi-line text ending with one 'path: reason' line per unusable file."""
        total = len(self.entries) + len(self.bad)
        lines = [
            f"cache: {display_path(self.cache_dir)}",
            f"{len(self.entries)} of {total} volumes preprocessed in {self.seconds:.1f} s",
        ]
        trimmed = sum(e.trimmed_slices for e in self.entries)
        if trimmed:
            lines.append(f"{trimmed} blank end slices trimmed in total")
        if self.segmentation_labels is not None:
            lines.append(f"label maps cached beside the cubes (labels 0..{self.segmentation_labels}, 0 background)")
        lines.extend(f"warning: {w}" for w in self.warnings)
        if self.bad:
            lines.append(f"{len(self.bad)} unusable files skipped:")
            lines.extend(f"{path}: {reason}" for path, reason in self.bad)
        return "\n".join(lines)


def _label_keys(name: str) -> list[str]:
    """Keys a file or CSV id is matched by: normalised name, and the IXI subject number if any."""
    stem = volume_stem(name.strip())
    key = re.sub(r"[\s_]+", "-", stem.lower())
    keys = [key]
    ixi = re.match(r"ixi0*(\d+)", key)
    if ixi:
        keys.append(f"ixi:{ixi.group(1)}")
    return keys


@dataclass(frozen=True)
class LabelRow:
    """One labelled row of a labels CSV; ``line`` is its line number (the header is line 1)."""

    line: int
    name: str
    label: int


def _read_labels(csv_path: Path, label_column: str) -> list[LabelRow]:
    """The labelled rows; blank cells are left out (reported as missing later).

    Two rows whose names match the same files (equal once normalised) with different labels are
    an error: which one is right cannot be guessed. The same label twice is accepted, since
    concatenated or joined tables often repeat a row and the result is unambiguous.
    """
    where = display_path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise HaganError(f"{where}: cannot read labels CSV ({exc})") from exc
    columns = [name for name in rows[0] if isinstance(name, str)] if rows else []  # DictReader keys extra fields None
    if not columns:
        raise HaganError(f"{where}: labels CSV is empty")
    if label_column not in columns:
        raise HaganError(f"{where}: no column {printable(label_column)!r}; columns: {printable(', '.join(columns))}")
    file_column = "file" if "file" in columns else columns[0]
    labelled: list[LabelRow] = []
    by_name: dict[str, LabelRow] = {}
    for line, row in enumerate(rows, start=2):
        text = (row.get(label_column) or "").strip()
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not value.is_integer() or not 0 <= value <= MAX_CLASS_LABEL:
            raise HaganError(
                f"{where}:{line}: label {printable(text[:40])!r} in column {printable(label_column)!r} is not a "
                f"class (an integer from 0 to {MAX_CLASS_LABEL})"
            )
        current = LabelRow(line, (row.get(file_column) or "").strip(), int(value))
        if not current.name:  # names no file, so labels none
            continue
        first = by_name.setdefault(_label_keys(current.name)[0], current)
        if first.label != current.label:
            raise HaganError(
                f"{where}: lines {first.line} ({display_path(first.name)}) and {line} ({display_path(current.name)}) "
                f"label the same files differently ({first.label} and {current.label}); keep one"
            )
        labelled.append(current)
    return labelled


def _assign_labels(rows: list[LabelRow], csv_path: Path, paths: list[Path]) -> tuple[list[int | None], list[str]]:
    """Each path's label (None: no row), and warnings; decided before any work so an error costs nothing.

    A row matching the file's normalised name wins. Otherwise the rows sharing its IXI subject
    number must agree, or the file is refused naming two of them. A row that labels several files
    is a warning, since a loose match may have given one scan's label to another.
    """
    exact: dict[str, LabelRow] = {}
    by_subject: dict[str, list[LabelRow]] = {}
    for row in rows:
        name_key, *aliases = _label_keys(row.name)
        exact.setdefault(name_key, row)
        for alias in aliases:
            by_subject.setdefault(alias, []).append(row)
    where = display_path(csv_path)
    found: list[int | None] = []
    users: dict[LabelRow, list[Path]] = {}
    for path in paths:
        name_key, *aliases = _label_keys(path.name)
        candidates = [exact[name_key]] if name_key in exact else [r for a in aliases for r in by_subject.get(a, [])]
        if len({r.label for r in candidates}) > 1:
            first = candidates[0]
            other = next(r for r in candidates if r.label != first.label)
            raise HaganError(
                f"{where}: {display_path(path.name)} matches line {first.line} ({display_path(first.name)}, label "
                f"{first.label}) and line {other.line} ({display_path(other.name)}, label {other.label}) by subject "
                "number; add a row with its exact name"
            )
        found.append(candidates[0].label if candidates else None)
        if candidates:
            users.setdefault(candidates[0], []).append(path)
    warnings = [
        f"{where}:{row.line}: {display_path(row.name)} labels {len(files)} files "
        f"({', '.join(display_path(p.name) for p in files[:3])}{', ...' if len(files) > 3 else ''}); "
        "check that one label fits them all"
        for row, files in users.items() if len(files) > 1
    ]
    return found, warnings


def _unique_name(path: Path, taken: set[str]) -> str:
    """A cache name from the file's stem: plain characters, and short enough that a counter and
    ``.npy`` still fit in a 255-byte file name."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", volume_stem(path))[:200].strip("._") or "volume"
    name, counter = base, 2
    while name in taken:
        name, counter = f"{base}-{counter}", counter + 1
    taken.add(name)
    return name


def _os_reason(err: OSError) -> str:
    """The operating system's reason in one printable line (``No space left on device``)."""
    return " ".join(printable(str(err.strerror or err)).split())


def _read_manifest(folder: Path) -> dict | None:
    """The folder's hagan manifest, or None when the folder is not a hagan cache."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == CACHE_FORMAT else None


def _leftovers(target: Path) -> list[tuple[str, str, Path]]:
    """(kind, token, folder) of the hidden staging (``.NAME.tmp-TOKEN``) and trash (``.NAME.trash-TOKEN``)
    folders that killed runs left beside ``target``."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|trash)-([0-9a-f]{{12}})")
    if not target.parent.is_dir():
        return []
    return sorted((m[1], m[2], p) for p in target.parent.iterdir() if (m := pattern.fullmatch(p.name)))


def _settle_leftovers(target: Path) -> None:
    """Finish a swap that a kill cut between its two renames, then remove what killed runs left.

    Only that moment leaves ``target`` missing with its old cache in a trash folder; the staged
    cache beside it is then complete (its manifest is written before the swap) and is put in place.
    """
    if not os.path.lexists(target):
        for token, trash in ((token, path) for kind, token, path in _leftovers(target) if kind == "trash"):
            staged = target.with_name(f".{target.name}.tmp-{token}")
            complete = next((p for p in (staged, trash) if _read_manifest(p) is not None), None)
            if complete is not None:
                os.rename(complete, target)
                break
    for _, _, leftover in _leftovers(target):
        shutil.rmtree(leftover, ignore_errors=True)


def _check_destination(dst: Path, target: Path, force: bool) -> None:
    """Refuse, before any work, a destination that the new cache may not replace or cannot be written beside."""
    name = display_path(dst)
    if target.exists() and not target.is_dir():
        raise HaganError(f"{name}: exists and is not a folder")
    if not target.exists():
        ancestor = dst.parent  # as the user wrote it, to name it so
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise HaganError(f"{name}: cannot write ({display_path(ancestor)} is a file, not a folder)")
        return
    if os.path.ismount(target):
        raise HaganError(f"{name}: is a mount point, and a cache is swapped in by renaming; use a folder inside it")
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return
    manifest = _read_manifest(target)
    if manifest is None:
        raise HaganError(f"{name}: not empty and not a hagan cache; choose an empty or new folder")
    foreign = [e for e in entries if e not in CACHE_PARTS and not re.fullmatch(r"\.manifest\.json\..*\.tmp\.json", e)]
    if foreign:
        listed = ", ".join(display_path(e) for e in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise HaganError(f"{name}: a hagan cache that also holds other files ({listed}); move them out or choose "
                         "another folder")
    if not force:
        settings = ", ".join(f"{key}={manifest.get(key)}" for key in ("recipe", "size", "mode"))
        raise HaganError(f"{name}: already a hagan cache ({settings}, {len(manifest.get('entries', []))} volumes); "
                         "pass --force to replace it, or choose another folder")


def _prepare_destination(dst: Path, target: Path, force: bool) -> Path:
    """Check the destination and create the hidden sibling folder the new cache is built in, before
    any work; creating it proves that the destination can be written."""
    try:
        _settle_leftovers(target)
    except OSError as err:
        raise HaganError(f"{display_path(dst)}: cannot write ({_os_reason(err)})") from err
    _check_destination(dst, target, force)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.tmp-{secrets.token_hex(6)}")
        staging.mkdir()
    except OSError as err:
        raise HaganError(f"{display_path(dst)}: cannot write ({_os_reason(err)})") from err
    return staging


def _swap_into_place(staging: Path, target: Path) -> None:
    """Put the finished cache at ``target`` by two renames, so that a reader, or a kill, finds the
    complete old cache or the complete new one (_settle_leftovers finishes a swap cut in between)."""
    for folder in (staging / "volumes", staging / "segmentations", staging):
        if folder.is_dir():
            fsync_path(folder)
    trash = target.with_name(f".{target.name}.trash-{staging.name.rsplit('-', 1)[1]}")
    if os.path.lexists(target):
        os.rename(target, trash)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(trash, target)
            raise
    else:
        os.rename(staging, target)
    fsync_path(target.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write a .npy and flush it to disk. It is serialised in memory first: numpy writing to a file
    reports a full disk as '... requested and ... written' without the reason; a plain write says ENOSPC."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())


def preprocess_folder(
    src: str | os.PathLike | Iterable[str | os.PathLike],
    dst: str | os.PathLike,
    recipe: str,
    size: int,
    mode: str = "resize_keep_aspect",
    trim: bool = True,
    labels_csv: str | os.PathLike | None = None,
    label_column: str | None = None,
    progress: bool = True,
    *,
    min_size: int | None = None,
    segmentations: str | os.PathLike | None = None,
    force: bool = False,
) -> PreprocessReport:
    """Build a hagan cache in ``dst`` from a folder (or list) of volumes, skipping unusable files.

    Bad files are listed in the report rather than stopping the run; only a source with no usable
    volume at all raises NoUsableVolumesError. Everything that can be checked (arguments, labels,
    the destination) is checked before the first volume is read.

    The cache is built in a hidden sibling folder and swapped into place when complete, so ``dst``
    always holds the complete old cache or the complete new one, whatever stops the run (an error,
    a full disk, Ctrl-C, a kill); a later run removes what a killed one left. An existing cache is
    replaced only with ``force``; a non-empty folder that is not a hagan cache never is.

    ``segmentations`` names a folder of label maps, one per image on the image's grid (see
    ``SegmentationFolder`` for the naming); each is cached beside its cube on the cube's grid
    (``segmentation_on_cube``), and an image without a usable label map is listed as unusable.
    """
    start = time.perf_counter()
    if recipe not in RECIPES:
        raise HaganError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(sorted(RECIPES))}")
    if mode not in FIT_MODES:
        raise HaganError(f"unknown mode {mode!r}; valid modes: {', '.join(FIT_MODES)}")
    if size < 2:
        raise HaganError(f"cube size must be at least 2, got {size}")
    if size > MAX_CUBE_SIZE:
        raise HaganError(f"cube size {size} is above the {MAX_CUBE_SIZE} maximum (hagan.data.preprocess.MAX_CUBE_SIZE), "
                         f"the largest size a model trains at; {size}^3 float16 is {size**3 * 2 / 2**30:.1f} GiB per cube")
    if (labels_csv is None) != (label_column is None):
        raise HaganError("labels need both a labels CSV and a label column")
    if isinstance(src, (str, os.PathLike)):
        source_name = display_path(src)
        paths = list_volume_paths(src)
    else:
        paths = [Path(os.fsdecode(os.fspath(p))) for p in src]
        source_name = f"{len(paths)} listed paths"
    report = PreprocessReport(cache_dir=Path(dst))
    labels: list[int | None] = [-1] * len(paths)
    if labels_csv is not None:
        labels, report.warnings = _assign_labels(_read_labels(Path(labels_csv), label_column), Path(labels_csv), paths)
    label_maps = SegmentationFolder(segmentations) if segmentations is not None else None
    dst = Path(dst)
    target = Path(os.path.abspath(dst.resolve() if dst.is_symlink() else dst))
    staging = _prepare_destination(dst, target, force)
    try:
        manifest = _build_cache(
            staging, paths, labels, report, recipe, size, mode, trim, min_size, label_maps, labels_csv, progress
        )
        if manifest is None:
            first = f" (first reason: {report.bad[0][0]}: {report.bad[0][1]})" if report.bad else ""
            raise NoUsableVolumesError(f"{source_name}: no usable volume among {len(paths)} files{first}")
        _swap_into_place(staging, target)
    except OSError as err:
        raise HaganError(f"{display_path(dst)}: cannot write ({_os_reason(err)})") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.seconds = time.perf_counter() - start
    return report


def _build_cache(
    folder: Path, paths: list[Path], labels: list[int | None], report: PreprocessReport, recipe: str, size: int,
    mode: str, trim: bool, min_size: int | None, label_maps: SegmentationFolder | None,
    labels_csv: str | os.PathLike | None, progress: bool,
) -> dict | None:
    """Write every usable volume and, last, the manifest into ``folder``; the manifest, or None when no volume was usable."""
    (folder / "volumes").mkdir()
    if label_maps is not None:
        (folder / "segmentations").mkdir()
    entries: list[dict] = []
    taken: set[str] = set()
    largest_label = 0
    for path, found in zip(tqdm(paths, desc="preprocess", unit="vol", disable=not progress), labels):
        try:
            volume = read_volume(path)
            cube, trimmed, warning = _preprocess_guarded(volume, recipe, size, mode, trim, min_size, str(path))
            if label_maps is not None:
                label_path = label_maps.match(path)
                segmentation = segmentation_on_cube(read_volume(label_path), volume, cube, str(label_path))
        except VolumeError as exc:
            report.bad.append((exc.path, exc.reason))
            continue
        if warning is not None:
            report.warnings.append(warning)
        if found is None:
            report.warnings.append(f"{display_path(path)}: no label in {display_path(labels_csv)}; using -1")
        label = -1 if found is None else found
        name = _unique_name(path, taken)
        relative = f"volumes/{name}.npy"
        _save_npy(folder / relative, cube.array.astype(np.float16))
        entry = {
            "name": name,
            "file": relative,
            "source": str(Path(path).resolve()),
            "label": label,
            "affine": cube.affine.tolist(),
            "original_shape": list(volume.array.shape),
            "original_spacing": list(volume.spacing),
        }
        if label_maps is not None:
            entry["segmentation"] = f"segmentations/{name}.npy"
            largest_label = max(largest_label, int(segmentation.max()))
            _save_npy(folder / entry["segmentation"], segmentation)
        entries.append(entry)
        report.entries.append(
            CacheEntryReport(name, display_path(path), volume.array.shape, volume.spacing, trimmed, label)
        )
    if not entries:
        return None
    max_label = max(e["label"] for e in entries)
    manifest = {
        "format": CACHE_FORMAT,
        "hagan_version": __version__,
        "recipe": recipe,
        "size": size,
        "mode": mode,
        "entries": entries,
        "num_classes": max_label + 1 if max_label >= 0 else 0,
    }
    manifest["reference_affine"] = generated_affine(manifest).tolist()
    if label_maps is not None:
        # foreground label values 1..segmentation_labels; 0 is background
        manifest["segmentation_labels"] = report.segmentation_labels = largest_label
    write_json_atomic(folder / "manifest.json", manifest, indent=1)
    fsync_path(folder / "manifest.json")
    return manifest


def ensure_cache(data: str | os.PathLike, out: str | os.PathLike, recipe: str, size: int, max_volumes: int = 0) -> Path:
    """``data`` itself when it is already a cache, else ``out`` made from its first ``max_volumes``
    volumes (0: all), or reused when an earlier call made it: experiments accept either."""
    from hagan.data.cache import load_manifest

    try:
        load_manifest(data)
        return Path(data)
    except HaganError:
        cache = Path(out)
        if not cache.exists():
            files = list_volume_paths(data)[: max_volumes or None]
            print(preprocess_folder(files, cache, recipe=recipe, size=size).summary())
        return cache
