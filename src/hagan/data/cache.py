"""A cache folder's manifest and cube files, checked field by field before anything trusts them.

The writer is :func:`hagan.data.preprocess.preprocess_folder`; the readers are the dataset, the
trainer and the commands that take a cache.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from hagan.checks import affine_problem, is_int, read_json_object, short_repr, short_text
from hagan.data.cube import FIT_MODES
from hagan.data.intensity import RECIPES
from hagan.data.io import display_path
from hagan.errors import HaganError

CACHE_FORMAT = "hagan-cache/1"


def load_manifest(cache_dir: str | os.PathLike) -> dict:
    """The cache's manifest, every field the library reads checked, or a HaganError naming the file."""
    cache_dir = Path(cache_dir)
    manifest_path = cache_dir / "manifest.json"
    if not manifest_path.is_file():
        raise HaganError(
            f"{display_path(cache_dir)}: not a hagan cache (no manifest.json); run `hagan preprocess` to create one"
        )
    manifest = read_json_object(manifest_path)
    if manifest.get("format") != CACHE_FORMAT:
        raise HaganError(f"{display_path(manifest_path)}: format is {short_repr(manifest.get('format'))}, not "
                         f"{CACHE_FORMAT!r}; run `hagan preprocess` to create the cache")
    problem = _manifest_problem(manifest)
    if problem:
        raise HaganError(f"{display_path(manifest_path)}: {problem}; run `hagan preprocess` again")
    return manifest


def _manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a manifest of the current format, or None."""
    for key in ("recipe", "mode", "size", "num_classes", "entries", "reference_affine"):
        if key not in manifest:
            return f"lacks {key}"
    if not isinstance(manifest["recipe"], str) or manifest["recipe"] not in RECIPES:
        return f"recipe must be one of {', '.join(RECIPES)}, got {short_repr(manifest['recipe'])}"
    if manifest["mode"] not in FIT_MODES:
        return f"mode must be one of {', '.join(FIT_MODES)}, got {short_repr(manifest['mode'])}"
    for key, low in (("size", 1), ("num_classes", 0), ("segmentation_labels", 0)):
        if key in manifest and not (is_int(manifest[key]) and manifest[key] >= low):
            return f"{key} must be an integer >= {low}, got {short_repr(manifest[key])}"
    affine = affine_problem(manifest["reference_affine"])
    if affine:
        return f"reference_affine {affine}"
    entries = manifest["entries"]
    if not isinstance(entries, list) or not entries:
        return f"entries must be a non-empty list, got {short_repr(entries)}"
    for i, entry in enumerate(entries):
        problem = _entry_problem(entry, manifest["num_classes"])
        if problem:
            return f"entry {i} {problem}"
    return None


def _entry_problem(entry: Any, num_classes: int) -> str | None:
    if not isinstance(entry, dict):
        return f"must be an object, got {short_repr(entry)}"
    for key in ("name", "file", "label", "affine"):
        if key not in entry:
            return f"lacks {key}"
    if not isinstance(entry["name"], str):
        return f"name must be a string, got {short_repr(entry['name'])}"
    label = entry["label"]
    if not is_int(label) or not -1 <= label < num_classes:
        return f"label must be an integer from -1 (unknown) to num_classes - 1 = {num_classes - 1}, got {short_repr(label)}"
    affine = affine_problem(entry["affine"])
    if affine:
        return f"affine {affine}"
    for key in ("file", "segmentation"):
        if key in entry:
            problem = _relative_path_problem(entry[key])
            if problem:
                return f"{key} {problem}"
    return None


def _relative_path_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a file of the cache: a cache names its files relative to itself, so an
    absolute path or a ``..`` that climbs out (``../../etc/passwd``) is refused before anything is opened."""
    if not isinstance(value, str) or not value:
        return f"must be a path inside the cache, got {short_repr(value)}"
    if "\0" in value or os.path.isabs(value) or ".." in PurePosixPath(value).parts:
        return f"{short_repr(value)} leads outside the cache; a cache names its files relative to itself"
    return None


def check_cube_file(path: Path, size: int, kind: str) -> None:
    """A cached ``.npy`` cube: readable without unpickling, ``size``^3, of numbers (``kind``: ``"image"``,
    floats; ``"segmentation"``, integers). Reads the header and maps the data; copies nothing."""
    where = display_path(path)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError as err:
        raise HaganError(f"{where}: missing; the cache is incomplete, run `hagan preprocess` again") from err
    except (OSError, ValueError, EOFError) as err:
        if "pickle" in str(err) or "Python objects" in str(err):
            raise HaganError(f"{where}: holds pickled Python objects, not a plain array; refusing to unpickle "
                             "(a pickle can run arbitrary code)") from err
        raise HaganError(f"{where}: not a readable .npy cube ({short_text(str(err), 80)})") from err
    if not isinstance(array, np.ndarray):
        array.close()
        raise HaganError(f"{where}: an .npz archive, not an .npy cube")
    kinds, wanted = ("f", "floating-point") if kind == "image" else ("iub", "integer")
    if array.dtype.kind not in kinds:
        raise HaganError(f"{where}: dtype {array.dtype}; {kind} cubes must be {wanted}")
    if array.shape != (size,) * 3:
        raise HaganError(f"{where}: shape {array.shape}, the manifest declares {size}^3 cubes")
