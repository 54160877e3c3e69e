"""The volumes, labels and measurements the applications read, always in the model's own representation.

Every set goes through ``hagan preprocess`` (a cache), so a classifier, a regression or a latent walk
sees real volumes exactly as the generative model saw them in training. Three sources:

* a MedMNIST-style ``.npz`` (``train_images``, ``train_labels``, ``val_*``, ``test_*``): one cache per
  official split, masks and images scaled to [-1, 1] by the ``mri`` recipe (min to p99.9);
* ``phantoms``: procedural thorax CT or brain MRI with ground-truth attributes (the CPU toy);
* caches or folders of volumes the user already has, with measurements from CSV tables.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hagan.data.cache import load_manifest
from hagan.data.dataset import CachedVolumeDataset, split_indices
from hagan.data.io import volume_stem, write_json_atomic
from hagan.data.phantoms import RECIPE_FOR_KIND, write_phantom_dataset
from hagan.data.preprocess import preprocess_folder
from hagan.errors import HaganError
from hagan.run_folder import GEOMETRY_FILE, prepare_inputs, volume_paths

NPZ_SPLITS = ("train", "val", "test")
ATTRIBUTES_FILE = "attributes.csv"
PREPARATION_FILE = "preparation.json"  # what a phantom preparation was made with, so a reuse can be checked
# what each phantom kind measures, in the order the experiments report them
PHANTOM_TARGETS = {
    "thorax-ct": ("lung_volume_ml", "bone_volume_ml", "body_volume_ml"),
    "brain-mri": ("ventricle_volume_ml", "brain_volume_ml", "intracranial_volume_ml"),
}


@dataclass
class VolumeSet:
    """Volumes (n, S, S, S) float32 in [-1, 1] with their names and integer labels (-1: none)."""

    volumes: np.ndarray
    names: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, keep: np.ndarray) -> "VolumeSet":
        """The volumes selected by a boolean mask or an index array."""
        keep = np.asarray(keep)
        index = np.flatnonzero(keep) if keep.dtype == bool else keep
        return VolumeSet(self.volumes[index], [self.names[i] for i in index], self.labels[index])


def is_cache(path: str | os.PathLike) -> bool:
    return (Path(path) / "manifest.json").is_file()


def load_cache(cache_dir: str | os.PathLike, progress: bool = False) -> VolumeSet:
    dataset = CachedVolumeDataset(cache_dir)
    volumes = np.stack([
        dataset[i]["image"][0].numpy()
        for i in tqdm(range(len(dataset)), desc=f"read {Path(cache_dir).name}", unit="vol", disable=not progress)
    ])
    return VolumeSet(volumes, dataset.names, np.asarray(dataset.labels, np.int64))


def load_for_run(inputs: Sequence[str | os.PathLike], geometry: dict, size: int, progress: bool = False) -> VolumeSet:
    """Caches as they are, other volumes preprocessed with the run's recipe and fit mode at its size."""
    parts: list[VolumeSet] = []
    raw: list[Path] = []  # volume files and folders, prepared below
    for item in inputs:
        path = Path(item)
        if is_cache(path):
            manifest = load_manifest(path)
            if (manifest["recipe"], manifest["size"]) != (geometry.get("recipe"), size):
                raise HaganError(
                    f"{path}: cache is {manifest['recipe']} at {manifest['size']}^3 but the run was trained on "
                    f"{geometry.get('recipe')} at {size}^3"
                )
            parts.append(load_cache(path, progress))
        elif path.is_dir() or path.is_file():
            raw.append(path)
        else:
            raise HaganError(f"{path}: no such cache, folder or volume file")
    if raw:
        if "recipe" not in geometry:
            raise HaganError(f"the run has no {GEOMETRY_FILE}, so raw volumes cannot be preprocessed as it was; "
                             "pass a cache")
        prepared = list(prepare_inputs(volume_paths(raw), geometry["recipe"], size,
                                       geometry.get("mode", "resize_keep_aspect"), progress))
        if prepared:
            parts.append(VolumeSet(np.stack([p.cube.array for p in prepared]), [volume_stem(p.path) for p in prepared],
                                   np.full(len(prepared), -1, np.int64)))
    if not parts:
        raise HaganError("no usable volume among the inputs")
    return VolumeSet(np.concatenate([p.volumes for p in parts]), [n for p in parts for n in p.names],
                     np.concatenate([p.labels for p in parts]))


def count_classes(caches: Sequence[str | os.PathLike]) -> int:
    """Classes over labelled caches (largest label + 1); refuses caches with unlabelled volumes."""
    labels = [entry["label"] for cache in caches for entry in load_manifest(cache)["entries"]]
    if not labels or min(labels) < 0:
        raise HaganError(f"{', '.join(map(str, caches))}: every volume needs a class label (some are -1)")
    return max(labels) + 1


# --------------------------------------------------------------------------- measurements


def match_key(name: str) -> str:
    """A file name or table ID reduced to what both spell alike: ``IXI013-HH-1212_T1.nii.gz`` and
    ``IXI013-HH-1212-T1`` both become ``ixi013-hh-1212-t1``."""
    return re.sub(r"[\s_]+", "-", volume_stem(name.strip()).lower())


def parse_targets(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``NAME=COLUMN`` or ``COLUMN`` (named after itself) -> [(name, column)]."""
    targets = []
    for spec in specs:
        name, sep, column = spec.partition("=")
        if not sep:
            name, column = spec, spec
        if not name or not column:
            raise HaganError(f"--targets {spec!r}: expected NAME=COLUMN or COLUMN")
        targets.append((name, column))
    if len({name for name, _ in targets}) != len(targets):
        raise HaganError(f"--targets: names must be distinct, got {[n for n, _ in targets]}")
    return targets


def read_tables(paths: Sequence[str | os.PathLike]) -> dict[str, dict[str, str]]:
    """Rows of CSV tables keyed by ``match_key`` of their first column (or ``file``); later tables add columns."""
    rows: dict[str, dict[str, str]] = {}
    for path in paths:
        try:
            with open(path, newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle)
                if not reader.fieldnames:
                    raise HaganError(f"{path}: empty table")
                id_column = "file" if "file" in reader.fieldnames else reader.fieldnames[0]
                for row in reader:
                    rows.setdefault(match_key(row[id_column] or ""), {}).update(row)
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise HaganError(f"{path}: cannot read table ({err})") from err
    return rows


def require_columns(table: dict[str, dict[str, str]], targets: Sequence[tuple[str, str]]) -> None:
    """Refuse targets whose columns no table has, before any work depends on them."""
    columns = {column for row in table.values() for column in row if column is not None}  # None: surplus fields
    missing = [column for _, column in targets if column not in columns]
    if missing:
        raise HaganError(f"no column {', '.join(map(repr, missing))} in the tables (columns: {', '.join(sorted(columns)[:12])}, ...)")


def measurements(
    names: Sequence[str], table: dict[str, dict[str, str]], targets: Sequence[tuple[str, str]]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Which volumes have every target, and the targets' values for those volumes (float64)."""
    require_columns(table, targets)
    keep = np.zeros(len(names), bool)
    values = {name: np.full(len(names), np.nan) for name, _ in targets}
    for i, volume_name in enumerate(names):
        row = table.get(match_key(volume_name))
        if row is None:
            continue
        try:
            parsed = {name: float(row.get(column)) for name, column in targets}  # a row of another table may lack it
        except (TypeError, ValueError):
            continue
        if all(np.isfinite(v) for v in parsed.values()):
            keep[i] = True
            for name, value in parsed.items():
                values[name][i] = value
    if keep.sum() < 3:
        raise HaganError(f"only {int(keep.sum())} of {len(names)} volumes have every target in the tables; need at least 3")
    return keep, {name: v[keep] for name, v in values.items()}


# --------------------------------------------------------------------------- preparing caches


def cache_from_arrays(arrays: np.ndarray, labels: np.ndarray, prefix: str, cache: Path, recipe: str, size: int) -> Path:
    """Write arrays as .npy files and preprocess them into ``cache`` (labels kept); the files are removed after."""
    raw = cache.parent / f".raw-{cache.name}"
    raw.mkdir(parents=True, exist_ok=True)
    with open(raw / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label"])
        for i, (array, label) in enumerate(zip(arrays, labels)):
            name = f"{prefix}_{i:05d}.npy"
            np.save(raw / name, array)
            writer.writerow([name, int(label)])
    try:
        preprocess_folder(raw, cache, recipe=recipe, size=size, mode="resize", trim=False,
                          labels_csv=raw / "labels.csv", label_column="label", progress=False)
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    return cache


def prepare_npz_splits(npz_path: str | os.PathLike, out: str | os.PathLike, size: int) -> dict[str, Path]:
    """One cache per official split of a MedMNIST-style archive; splits already prepared are reused."""
    npz_path, out = Path(npz_path), Path(out)
    try:
        archive = np.load(npz_path)
    except (OSError, ValueError) as err:
        raise HaganError(f"{npz_path}: cannot read the archive ({err})") from err
    caches = {}
    with archive:
        for split in NPZ_SPLITS:
            if f"{split}_images" not in archive.files:
                continue
            cache = out / split
            if not is_cache(cache):
                images, labels = archive[f"{split}_images"], archive[f"{split}_labels"].reshape(-1)
                if images.ndim != 4 or len(images) != len(labels):
                    raise HaganError(f"{npz_path}: {split}_images must be (n, D, H, W) with one label each, "
                                     f"got {images.shape} and {labels.shape}")
                print(f"preparing the {split} split ({len(images)} volumes) at {size}^3")
                cache_from_arrays(images, labels, split, cache, "mri", size)
            caches[split] = cache
    if "train" not in caches or "test" not in caches:
        raise HaganError(f"{npz_path}: needs train_images/train_labels and test_images/test_labels")
    return caches


def prepare_phantoms(
    out: str | os.PathLike, kind: str, n: int, size: int, seed: int = 0, test_fraction: float = 0.0,
    label: str | None = None,
) -> tuple[dict[str, Path], Path]:
    """Phantoms written at ``size``^3 and cached (all in ``all``, or split into ``train``/``test``).

    ``label`` names an attribute column that becomes the class label (``grade`` for thorax CT).
    Returns the caches and the attribute table. An existing preparation is reused.
    """
    out = Path(out)
    table = out / "phantoms" / ATTRIBUTES_FILE
    recipe_file = out / PREPARATION_FILE
    preparation = {"kind": kind, "n": n, "size": size, "seed": seed, "test_fraction": test_fraction, "label": label}
    if recipe_file.is_file():
        earlier = json.loads(recipe_file.read_text())
        if earlier != preparation:
            raise HaganError(f"{out}: holds phantoms prepared as {earlier}, not {preparation}; remove it or choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise HaganError(f"{out}: exists and holds files that are not a phantom preparation; choose another --out")
    if not table.is_file():
        write_phantom_dataset(out / "phantoms", kind=kind, n=n, size=size, seed=seed, progress=True)
    files = sorted((out / "phantoms").glob(f"{kind}_*.nii.gz"))
    if test_fraction:
        train, test = split_indices(len(files), test_fraction, seed)
        groups = {"train": [files[i] for i in train], "test": [files[i] for i in test]}
    else:
        groups = {"all": files}
    caches = {}
    for split, paths in groups.items():
        cache = out / split
        if not is_cache(cache):
            preprocess_folder(paths, cache, recipe=RECIPE_FOR_KIND[kind], size=size, labels_csv=table if label else None,
                              label_column=label, progress=False)
        caches[split] = cache
    write_json_atomic(recipe_file, preparation)
    return caches, table
