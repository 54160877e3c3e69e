"""End-to-end evaluation: real set vs generated set, on one or more feature extractors.

>>> from hagan.evaluation import evaluate
>>> result = evaluate("cache/ixi-128", "runs/ixi", "eval/ixi", features=["deepbet"], n=256)
>>> result["fid"], result["kid_mean"], result["ms_ssim"]

Volumes are streamed in batches through every extractor at once, so a large set never has to fit in
memory; only the first ``ms_ssim_volumes`` generated (and real) volumes are kept for MS-SSIM.

Both sets are compared on one grid, the protocol's cube (``GRID_RULE``), so volumes of any tool, shape
and spacing can be scored. Every score comes with two references on the same scale: one half of the
real set against the other (what real data scores) and the real set's mean volume repeated (what a
generator that learned only the average scores).
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import torch
from tqdm import tqdm

from hagan import __version__
from hagan.checks import read_json_object
from hagan.data.cube import canonicalise, fit_to_cube
from hagan.data.intensity import output_to_model_range
from hagan.data.io import atomic_write, list_volume_paths, read_volume, write_json_atomic, write_text_atomic
from hagan.errors import HaganError, VolumeError
from hagan.evaluation.embedding import embedding_figure
from hagan.evaluation.features import PLANES, TorchExtractor, build_extractor
from hagan.evaluation.stats import (
    DATA_RANGE,
    FID_METHODS,
    MS_SSIM_KERNEL,
    MS_SSIM_SIGMA,
    feature_statistics,
    fid_from_features,
    kid,
    mean_pairwise_ms_ssim,
    mmd,
    ms_ssim_scales,
)
from hagan.run_folder import CONFIG_FILE, GEOMETRY_FILE, prepare_volume
from hagan.training.accel import resolve_device

STATS_FORMAT = "hagan-eval-stats/1"
FAKE_RECIPES = ("ct", "mri", "none")
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
DEFAULT_SIZE = 128  # deepbet's input size and the small-data preset's, when neither set fixes a grid
GRID_RULE = (
    "the size is --size, else that of a set already on a cube grid (a run, a `hagan generate` folder, a cache, "
    "a stats file, an array), else the edge of generated volumes that are cubes, else 128. Caches, runs and "
    "arrays are used as they are; a `hagan generate` folder (geometry.json) is mapped back from its output "
    "units; any other folder of volumes is preprocessed as training data: reoriented to (S, A, R), intensities "
    "by the recipe (ct: HU window, mri: percentile) to [-1, 1], blank end slices trimmed, fitted to the cube by "
    "the mode (resize_keep_aspect: isotropic spacing, largest extent fills the cube, then padding); with "
    "recipe none, volumes already in [-1, 1] are reoriented and fitted only"
)


# ------------------------------------------------------------------------------------------ sources


class VolumeSource:
    """A set of cubes in [-1, 1], read batch by batch: ``len``, ``size``, ``batches(b)``, ``describe()``."""

    kind = "volumes"

    def __init__(self, n: int, size: int):
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:  # (B, 1, S, S, S) float32
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, "n": self.n, "size": self.size}


class ArraySource(VolumeSource):
    kind = "array"

    def __init__(self, volumes):
        x = torch.as_tensor(np.asarray(volumes), dtype=torch.float32)
        x = x[:, None] if x.dim() == 4 else x
        if x.dim() != 5 or x.shape[1] != 1 or len(set(x.shape[2:])) != 1:
            raise HaganError(f"volumes must be cubes (N, S, S, S) or (N, 1, S, S, S), got {tuple(x.shape)}")
        super().__init__(len(x), int(x.shape[2]))
        self.x = x

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for i in range(0, self.n, batch_size):
            yield self.x[i : i + batch_size]


class CacheSource(VolumeSource):
    kind = "cache"

    def __init__(self, cache_dir: Path):
        from hagan.data.dataset import CachedVolumeDataset

        self.dataset = CachedVolumeDataset(cache_dir)
        self.path = cache_dir
        super().__init__(len(self.dataset), self.dataset.size)
        self.recipe = self.dataset.manifest.get("recipe")

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for i in range(0, self.n, batch_size):
            yield torch.stack([self.dataset[j]["image"] for j in range(i, min(i + batch_size, self.n))])

    def describe(self) -> dict:
        return {**super().describe(), "path": str(self.path), "recipe": self.recipe}


class FileSource(VolumeSource):
    """Volume files mapped to [-1, 1] cubes by ``load(path) -> (S, S, S) array``; unusable files skipped."""

    def __init__(self, kind: str, folder: Path, paths: list[Path], load: Callable[[Path], np.ndarray], size: int, info: dict):
        self.kind, self.folder, self.paths, self.load, self.info = kind, folder, paths, load, info
        self.skipped: list[str] = []
        super().__init__(len(paths), size)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        batch: list[torch.Tensor] = []
        for path in self.paths:
            try:
                batch.append(torch.from_numpy(np.ascontiguousarray(self.load(path), dtype=np.float32))[None])
            except VolumeError as exc:
                self.skipped.append(str(exc))
                continue
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)

    def describe(self) -> dict:
        return {**super().describe(), "path": str(self.folder), **self.info, "skipped": self.skipped}


class RunSource(VolumeSource):
    """``n`` volumes generated by a training run, the same as ``hagan generate --n N --seed S``."""

    kind = "run"

    def __init__(self, run_dir: Path, n: int, seed: int, device: str, class_label: int | None = None):
        from hagan.api import load_run

        self.run = load_run(run_dir, device=device)
        self.seed, self.class_label = seed, class_label
        super().__init__(n, self.run.size)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        z = self.run.latents(self.n, self.seed)
        for volumes in self.run.decode_batches(z, self.class_label, batch_size):
            yield volumes.clamp(-1, 1)

    def describe(self) -> dict:
        return {
            **super().describe(), "path": str(self.run.run_dir), "checkpoint": str(self.run.checkpoint),
            "iteration": self.run.iteration, "seed": self.seed, "recipe": self.run.geometry.get("recipe"),
        }


def _is_run(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def _is_cache(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def _read_geometry(folder: Path) -> dict:
    path = folder / GEOMETRY_FILE
    return read_json_object(path) if path.is_file() else {}


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _is_stats(real: Any) -> bool:
    return _is_path(real) and str(real).endswith(".npz") and Path(real).is_file()


def _array_size(volumes: Any) -> int:
    """The cube edge of an array of volumes (N, S, S, S) or (N, 1, S, S, S); ArraySource checks the rest."""
    shape = np.shape(volumes)
    return int(shape[-1]) if shape else 0


def protocol_size(real: Any, fake: Any, size: int | None = None) -> tuple[int, str]:
    """The cube edge both sets are compared at and what fixed it (``GRID_RULE``): ``size`` when given,
    else the size of a set already on a cube grid, else the edge of generated cubes, else DEFAULT_SIZE."""
    fixed: list[tuple[int, str]] = []
    if not _is_path(fake):
        fixed.append((_array_size(fake), "the generated array"))
    elif _is_run(Path(fake)):
        from hagan.api import load_run

        edge = _read_geometry(Path(fake)).get("size") or load_run(fake, device="cpu").size
        fixed.append((int(edge), f"run {fake}"))
    elif (geometry := _read_geometry(Path(fake))).get("recipe") and geometry.get("size"):
        fixed.append((int(geometry["size"]), f"{Path(fake) / GEOMETRY_FILE}"))
    if not _is_path(real):
        fixed.append((_array_size(real), "the real array"))
    elif _is_stats(real):
        fixed.append((int(load_stats(real)[1].get("size") or 0), f"stats file {real}"))
    elif _is_cache(Path(real)):
        from hagan.data.cache import load_manifest

        fixed.append((int(load_manifest(real)["size"]), f"cache {real}"))
    if size is not None:
        for edge, source in fixed:
            if edge != size:
                raise HaganError(f"--size {size}: {source} is on a {edge}^3 grid; drop --size or pass --size {edge}")
        return size, "--size"
    if fixed:
        return fixed[0][0], fixed[0][1]
    if Path(fake).is_dir():
        paths = list_volume_paths(Path(fake))
        shape = read_volume(paths[0]).array.shape if paths else ()
        if len(shape) == 3 and len(set(shape)) == 1:
            return int(shape[0]), f"the generated volumes' edge ({paths[0].name})"
    return DEFAULT_SIZE, "default"


def fit_volume(path: Path, recipe: str, size: int, mode: str) -> np.ndarray:
    """A volume file on the protocol's cube (``GRID_RULE``): the training preprocessing for ct and mri,
    reorientation and fitting only for recipe 'none' (values already in [-1, 1])."""
    if recipe != "none":
        return prepare_volume(path, recipe, size, mode).array
    canonical = canonicalise(read_volume(path))  # read_volume gives 3D arrays only
    if canonical.array.shape == (size,) * 3:
        return np.clip(canonical.array, -1, 1).astype(np.float32)
    cube, _ = fit_to_cube(canonical.array.astype(np.float32), canonical.affine, size, mode)
    return np.clip(cube, -1, 1).astype(np.float32)


def open_fake(
    fake, n: int | None, seed: int, device: str, recipe: str | None, class_label: int | None = None,
    size: int | None = None, mode: str = "resize_keep_aspect",
) -> tuple[VolumeSource | None, dict]:
    """The generated set as a source (a RUN's source needs ``n``: None until it is known) and its geometry.

    A folder written by ``hagan generate`` (its geometry.json names the recipe) holds cubes in output
    units, mapped back to [-1, 1]; any other folder is any tool's volumes, fitted to the ``size`` cube
    by ``fit_volume``.
    """
    if not _is_path(fake):
        source = ArraySource(fake)
        return (ArraySource(source.x[:n]) if n else source), {}
    path = Path(fake)
    if _is_run(path):
        geometry = _read_geometry(path)
        return (RunSource(path, n, seed, device, class_label) if n else None), {**geometry, "run": str(path)}
    if not path.is_dir():
        raise HaganError(f"{path}: neither a folder of generated volumes nor a training run")
    paths = list_volume_paths(path)
    if not paths:
        raise HaganError(f"{path}: no volume files found")
    paths = paths[:n] if n else paths
    geometry = _read_geometry(path)
    first = read_volume(paths[0]).array
    if geometry.get("recipe"):
        generated_recipe = geometry["recipe"]
        if first.ndim != 3 or len(set(first.shape)) != 1:
            raise HaganError(f"{paths[0]}: volumes written by `hagan generate` are cubes, got shape {first.shape}")
        edge = first.shape[0]
        if size is not None and edge != size:
            raise HaganError(f"{paths[0]}: generated volumes are {edge}^3, the protocol's cube is {size}^3")

        def load(p: Path) -> np.ndarray:
            array = canonicalise(read_volume(p)).array
            if array.shape != (edge,) * 3:
                raise VolumeError(p, f"shape {array.shape} differs from the first generated volume's {(edge,) * 3}")
            return output_to_model_range(array, generated_recipe)

        info = {"recipe": generated_recipe, "recipe_from": GEOMETRY_FILE, "fit": "hagan generate output units"}
        return FileSource("folder", path, paths, load, edge, info), geometry
    fake_recipe = recipe
    if fake_recipe is None:
        if first.min() < -1e-6 and first.max() <= 1 + 1e-6:
            fake_recipe = "none"
        else:
            raise HaganError(
                f"{path}: cannot tell the generated volumes' units (values {first.min():.4g}..{first.max():.4g}) "
                "and the folder has no geometry.json; pass their intensity recipe (--recipe ct|mri, or none for [-1, 1])"
            )
    if fake_recipe not in FAKE_RECIPES:
        raise HaganError(f"unknown recipe {fake_recipe!r} for generated volumes; choose from {', '.join(FAKE_RECIPES)}")
    edge = size if size is not None else DEFAULT_SIZE
    info = {"recipe": fake_recipe, "recipe_from": "argument" if recipe else "values in [-1, 1]",
            "mode": mode, "fit": "training preprocessing" if fake_recipe != "none" else "reoriented and fitted"}
    return (FileSource("folder", path, paths, lambda p: fit_volume(p, fake_recipe, edge, mode), edge, info),
            {"recipe": fake_recipe})


def open_real(real, size: int, recipe: str | None, mode: str) -> VolumeSource:
    """A real set as a source at the protocol's size: a hagan cache, a folder of raw volumes, or an array."""
    if not _is_path(real):
        source = ArraySource(real)
    elif _is_cache(Path(real)):
        source = CacheSource(Path(real))
    else:
        folder = Path(real)
        if not folder.is_dir():
            raise HaganError(f"{folder}: neither a hagan cache, a folder of volumes nor a stats .npz file")
        if recipe is None:
            raise HaganError(f"{folder}: a folder of raw volumes needs the intensity recipe (--recipe ct|mri)")
        paths = list_volume_paths(folder)
        if not paths:
            raise HaganError(f"{folder}: no volume files found")
        info = {"recipe": recipe, "mode": mode, "fit": "training preprocessing"}
        source = FileSource("folder", folder, paths, lambda p: fit_volume(p, recipe, size, mode), size, info)
    if source.size != size:
        raise HaganError(
            f"{real}: real volumes are {source.size}^3 but the protocol's cube is {size}^3; "
            f"preprocess the real set with --size {size}"
        )
    return source


# ------------------------------------------------------------------------------------------ features


def extract_all(
    source: VolumeSource,
    extractors: Sequence[TorchExtractor],
    batch_size: int,
    keep: int,
    progress: bool,
    desc: str,
) -> tuple[dict[str, dict[str, np.ndarray]], torch.Tensor | None, torch.Tensor]:
    """One pass over the source: every extractor's feature sets, the first ``keep`` volumes (float16), and
    the mean volume (1, 1, S, S, S) that the trivial-generator reference repeats."""
    collected: dict[str, dict[str, list]] = {e.name: {} for e in extractors}
    kept: list[torch.Tensor] = []
    total: torch.Tensor | None = None
    count = 0
    bar = tqdm(total=len(source), desc=desc, unit="vol", disable=not progress)
    for batch in source.batches(batch_size):
        for extractor in extractors:
            for key, value in extractor.extract_sets(batch, batch_size=batch_size).items():
                collected[extractor.name].setdefault(key, []).append(value.double().numpy())
        if count < keep:
            kept.append(batch[: keep - count].half())
        batch_sum = batch.double().sum(0, keepdim=True)
        total = batch_sum if total is None else total + batch_sum
        count += len(batch)
        bar.update(len(batch))
    bar.close()
    if count == 0:
        raise HaganError(f"{desc}: no usable volume")
    features = {name: {k: np.concatenate(v) for k, v in sets.items()} for name, sets in collected.items()}
    return features, (torch.cat(kept) if kept else None), (total / count).float()


def volume_rows(sets: Mapping[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    """The feature rows of the volumes at ``index``; a plane set holds the same number of slices per volume."""
    n = len(sets["volume"])
    return {k: v.reshape(n, -1, v.shape[-1])[index].reshape(-1, v.shape[-1]) for k, v in sets.items()}


def real_halves(sets: Mapping[str, np.ndarray], seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The real set split at random (seeded) into two halves: the real-versus-real reference."""
    order = np.random.default_rng(seed).permutation(len(sets["volume"]))
    half = len(order) // 2
    return volume_rows(sets, order[:half]), volume_rows(sets, order[half:])


def repeated(sets: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """One volume's feature sets as if a generator had produced that volume ``n`` times."""
    return {k: np.tile(v, (n, 1)) for k, v in sets.items()}


# ------------------------------------------------------------------------------------------ stats files


def _comparable(protocol: dict) -> dict:
    return {k: v for k, v in protocol.items() if k != "versions"}


def write_stats(path: str | os.PathLike, features: Mapping[str, Mapping[str, np.ndarray]], info: dict) -> Path:
    """Write real-set features, their mean and covariance per feature set, and the protocol (atomic .npz)."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    arrays: dict[str, np.ndarray] = {"protocol_json": np.array(json.dumps({"format": STATS_FORMAT, **info}))}
    for name, sets in features.items():
        for key, value in sets.items():
            mu, sigma = feature_statistics(value) if len(value) >= 2 else (value.mean(0), np.zeros((0, 0)))
            arrays[f"{name}::{key}::features"] = value
            arrays[f"{name}::{key}::mu"] = mu
            arrays[f"{name}::{key}::sigma"] = sigma
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_stats(path: str | os.PathLike) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """(features per extractor and set, protocol info) from a file written by ``write_stats``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            info = json.loads(str(archive["protocol_json"]))
            features: dict[str, dict[str, np.ndarray]] = {}
            for key in archive.files:
                parts = key.split("::")
                if len(parts) == 3 and parts[2] == "features":
                    features.setdefault(parts[0], {})[parts[1]] = archive[key].astype(np.float64)
    except (OSError, ValueError, KeyError) as exc:
        raise HaganError(f"{path}: not a hagan evaluation stats file ({type(exc).__name__})") from exc
    if info.get("format") != STATS_FORMAT:
        raise HaganError(f"{path}: not a {STATS_FORMAT} stats file")
    return features, info


def _check_stats(path, info: dict, extractors: Sequence[TorchExtractor], size: int) -> None:
    if info.get("size") != size:
        raise HaganError(f"{path}: stats are of {info.get('size')}^3 volumes, the generated ones are {size}^3")
    saved = info.get("features", {})
    for e in extractors:
        if e.name not in saved:
            raise HaganError(f"{path}: no {e.name} features in this stats file (it has: {', '.join(saved) or 'none'})")
        if _comparable(saved[e.name]) != _comparable(e.protocol()):
            mine, theirs = _comparable(e.protocol()), _comparable(saved[e.name])
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise HaganError(f"{path}: {e.name} features were computed with another protocol (differs in: {', '.join(diff)})")


# ------------------------------------------------------------------------------------------ metrics


def feature_metrics(
    real: Mapping[str, np.ndarray], fake: Mapping[str, np.ndarray], seed: int = 0, fid_method: str = "sqrtm"
) -> dict:
    """FID (per plane and mean for 2.5D sets), KID mean/std and MMD between two extractors' feature sets."""
    out: dict[str, Any] = {}
    planes = [p for p in PLANES if p in real and p in fake]
    if planes:
        for p in planes:
            out[f"fid_{p}"] = fid_from_features(real[p], fake[p], fid_method)
        out["fid"] = float(np.mean([out[f"fid_{p}"] for p in planes]))
    else:
        out["fid"] = fid_from_features(real["volume"], fake["volume"], fid_method)
    subset = min(KID_SUBSET_SIZE, len(real["volume"]), len(fake["volume"]))
    out["kid_mean"], out["kid_std"] = kid(real["volume"], fake["volume"], KID_SUBSETS, subset, seed)
    out["kid_subset_size"] = subset
    out["mmd"] = mmd(real["volume"], fake["volume"])
    return out


def _versions(extractors: Sequence[TorchExtractor]) -> dict:
    versions = {"hagan": __version__, "torch": torch.__version__, "numpy": np.__version__,
                "scipy": scipy.__version__, "python": platform.python_version()}
    for e in extractors:
        versions.update(e.protocol().get("versions", {}))
    return versions


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _score_cells(m: dict | None) -> str:
    if m is None:
        return "- | - | - | - | -"
    planes = " / ".join(_fmt(m[f"fid_{p}"]) for p in PLANES if f"fid_{p}" in m) or "-"
    return f"{_fmt(m['fid'])} | {_fmt(m['kid_mean'])} | {_fmt(m['kid_std'])} | {_fmt(m['mmd'])} | {planes}"


def metrics_markdown(result: dict) -> str:
    """The scores, each feature's followed by its two reference rows, so every number comes with a scale."""
    grid = result["protocol"].get("grid", {})
    halves = result.get("reference", {}).get("real_halves") or {}
    halves_label = f"real half vs other half ({' vs '.join(map(str, halves['n']))})" if halves else "real half vs other half"
    lines = [
        f"# Evaluation: {result['n_fake']} generated vs {result['n_real']} real volumes ({result['protocol']['size']}^3)",
        "",
        "| features | compared with the real set | FID | KID mean | KID std | MMD | per-plane FID (axial / coronal / sagittal) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in result["features"].items():
        reference = m.get("reference", {})
        lines += [
            f"| {name} | **generated ({result['n_fake']})** | {_score_cells(m)} |",
            f"| {name} | reference: {halves_label} | {_score_cells(reference.get('real_halves'))} |",
            f"| {name} | reference: real mean volume x {result['n_fake']} | {_score_cells(reference.get('mean_volume'))} |",
        ]
    lines += ["", "| diversity | value |", "|---|---|", f"| MS-SSIM generated (mean over {result['ms_ssim_pairs']} pairs) | {_fmt(result['ms_ssim'])} |"]
    if result.get("ms_ssim_real") is not None:
        lines.append(f"| MS-SSIM real (mean over {result['ms_ssim_real_pairs']} pairs) | {_fmt(result['ms_ssim_real'])} |")
    lines.append("| MS-SSIM of the mean volume repeated (no diversity) | 1 |")
    lines += [
        "",
        "Lower FID, KID and MMD are better; MS-SSIM near the real set's value is better (higher = less diverse).",
        "Scale: generated scores near the real-halves row are as close to the real set as real data is; scores at or "
        "above the mean-volume row are no better than one average volume repeated.",
        f"Grid: {grid.get('size', result['protocol']['size'])}^3 ({grid.get('size_from', '-')}), fit mode "
        f"{grid.get('mode', '-')}; the rule is in metrics.json (protocol.grid).",
        "Protocol: see metrics.json and docs/metrics.md. Numbers from different feature extractors, sizes or sample counts are not comparable.",
    ]
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def evaluate(
    real,
    fake,
    out_dir: str | os.PathLike,
    features: Sequence[str] = ("deepbet",),
    weights: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
    n: int | None = None,
    seed: int = 0,
    save_stats: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 2,
    recipe: str | None = None,
    progress: bool = True,
    *,
    mode: str | None = None,
    allow_unknown_weights: bool = False,
    ms_ssim_volumes: int = 50,
    ms_ssim_pairs: int = 500,
    class_label: int | None = None,
    extractor_options: Mapping[str, Mapping[str, Any]] | None = None,
    figure: bool = True,
    fid_method: str = "sqrtm",
    size: int | None = None,
) -> dict:
    """Score generated volumes against real ones; writes metrics.json, metrics.md, features.npz, figures.

    Both sets are brought to the protocol's cube of edge ``size`` by ``GRID_RULE`` (recorded in metrics.json).
    real: a hagan cache folder, a folder of raw volumes (preprocessed with ``recipe`` and ``mode``), a stats
    .npz from ``save_stats``, or an array (N, S, S, S) in [-1, 1].
    fake: a folder written by ``hagan generate`` (output units mapped back to [-1, 1] with the recipe of its
    geometry.json), a folder of any tool's volumes of any shape (preprocessed with ``recipe``, or taken as
    [-1, 1] when it has negative values and no recipe is given), a training run folder (``n`` volumes
    generated with ``seed``, as ``hagan generate``), or an array in [-1, 1].
    n: generated volumes to use (first n files of a folder); for a run, default the real set's size.
    weights: one path (for the MedicalNet extractor) or {feature name: path}.
    Every score is also given for two references (``reference`` in the result): one half of the real set
    against the other (split with ``seed``), and the real set's mean volume repeated n_fake times.
    Returns the metrics.json content.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    features = list(features)
    if not features:
        raise HaganError("no feature extractor chosen; e.g. features=['deepbet']")
    if len(set(features)) != len(features):
        raise HaganError(f"feature extractors listed twice: {features}")
    if n is not None and n < 2:
        raise HaganError(f"n must be at least 2, got {n}")
    dev = str(resolve_device(device))
    if str(dev).startswith("cuda") and not torch.cuda.is_available():
        raise HaganError(f"device {dev!r} requested but CUDA is not available")
    if fid_method not in FID_METHODS:
        raise HaganError(f"fid_method must be one of {', '.join(FID_METHODS)}, got {fid_method!r}")
    if recipe is not None and recipe not in FAKE_RECIPES:
        raise HaganError(f"unknown recipe {recipe!r}; choose from {', '.join(FAKE_RECIPES)}")

    options = extractor_options or {}
    extractors = []
    for name in features:
        w = weights.get(name) if isinstance(weights, Mapping) else (weights if name.startswith("medicalnet") else None)
        extractors.append(build_extractor(name, w, dev, allow_unknown_weights, **options.get(name, {})))
    protocols = {e.name: e.protocol() for e in extractors}

    size, size_from = protocol_size(real, fake, size)
    fake_geometry = _read_geometry(Path(fake)) if _is_path(fake) and Path(fake).is_dir() else {}
    mode = mode or fake_geometry.get("mode") or "resize_keep_aspect"
    fake_source, geometry = open_fake(fake, n, seed, dev, recipe, class_label, size, mode)
    real_is_stats = _is_stats(real)
    real_recipe = recipe if recipe not in (None, "none") else geometry.get("recipe")
    if real_recipe == "none":
        real_recipe = None

    notes: list[str] = []
    real_volumes = real_mean = None
    if real_is_stats:
        real_features, info = load_stats(real)
        _check_stats(real, info, extractors, size)
        real_features = {e.name: real_features[e.name] for e in extractors}
        real_desc = {"kind": "stats", "path": str(real), "n": info.get("n"), "source": info.get("source")}
        n_real = int(info.get("n") or len(real_features[extractors[0].name]["volume"]))
    else:
        real_source = open_real(real, size, real_recipe, mode)
        real_features, real_volumes, real_mean = extract_all(
            real_source, extractors, batch_size, ms_ssim_volumes, progress, "real features"
        )
        real_desc = real_source.describe()
        n_real = len(real_features[extractors[0].name]["volume"])
    if fake_source is None:
        fake_source = RunSource(Path(fake), n or n_real, seed, dev, class_label)
    fake_features, fake_volumes, _ = extract_all(
        fake_source, extractors, batch_size, ms_ssim_volumes, progress, "generated features"
    )
    n_fake = len(fake_features[extractors[0].name]["volume"])
    if n_real < 2 or n_fake < 2:
        raise HaganError(f"need at least 2 real and 2 generated volumes, got {n_real} and {n_fake}")

    if save_stats is not None:
        if real_is_stats:
            raise HaganError(f"real set {real} is already a stats file; drop save_stats")
        stats_info = {"size": size, "n": n_real, "source": real_desc, "features": protocols,
                      "input_range": [-1.0, 1.0], "versions": _versions(extractors)}
        save_stats_path = write_stats(save_stats, real_features, stats_info)
    else:
        save_stats_path = None

    per_feature = {}
    halves_n = [n_real // 2, n_real - n_real // 2] if n_real >= 4 else None
    for e in extractors:
        per_feature[e.name] = feature_metrics(real_features[e.name], fake_features[e.name], seed, fid_method)
        reference: dict[str, Any] = {"real_halves": None, "mean_volume": None}
        if halves_n is not None:
            reference["real_halves"] = feature_metrics(*real_halves(real_features[e.name], seed), seed, fid_method)
        if real_mean is not None:
            mean_sets = {k: v.double().numpy() for k, v in e.extract_sets(real_mean, batch_size=1).items()}
            reference["mean_volume"] = feature_metrics(real_features[e.name], repeated(mean_sets, n_fake), seed,
                                                       fid_method)
        per_feature[e.name]["reference"] = reference
        dim_set = "axial" if "axial" in fake_features[e.name] else "volume"
        smallest = min(len(real_features[e.name][dim_set]), len(fake_features[e.name][dim_set]))
        if smallest <= e.dim:
            notes.append(
                f"{e.name}: {smallest} samples <= {e.dim} feature dimensions: the covariances are rank-deficient and "
                "FID is biased upwards; compare FID only at equal sample counts, prefer KID for small sets"
            )
    if halves_n is None:
        notes.append(f"no real-versus-real reference: it needs at least 4 real volumes, got {n_real}")
    if real_mean is None:
        notes.append("no mean-volume reference: the real set is a stats file, which holds no volumes")

    ms_fake, pairs_fake = mean_pairwise_ms_ssim(fake_volumes.float(), ms_ssim_pairs, seed, device=dev)
    ms_real, pairs_real = (None, 0)
    if real_volumes is not None and len(real_volumes) >= 2:
        ms_real, pairs_real = mean_pairwise_ms_ssim(real_volumes.float(), ms_ssim_pairs, seed, device=dev)

    first = per_feature[extractors[0].name]
    skipped = [*real_desc.get("skipped", []), *fake_source.describe().get("skipped", [])]
    if skipped:
        notes.append(f"{len(skipped)} unusable volume file(s) skipped (listed under protocol.real/fake.skipped)")
    result: dict[str, Any] = {
        "fid": first["fid"],
        "kid_mean": first["kid_mean"],
        "kid_std": first["kid_std"],
        "mmd": first["mmd"],
        "ms_ssim": ms_fake,
        "ms_ssim_pairs": pairs_fake,
        "ms_ssim_real": ms_real,
        "ms_ssim_real_pairs": pairs_real,
        "n_real": n_real,
        "n_fake": n_fake,
        "reference": {
            "real_halves": first["reference"]["real_halves"] and {"n": halves_n, **first["reference"]["real_halves"]},
            "mean_volume": first["reference"]["mean_volume"] and {"n": n_fake, "ms_ssim": 1.0,
                                                                  **first["reference"]["mean_volume"]},
        },
        "features": per_feature,
        "protocol": {
            "primary_features": extractors[0].name,
            "input_range": [-1.0, 1.0],
            "size": size,
            "grid": {"size": size, "size_from": size_from, "mode": mode, "rule": GRID_RULE},
            "reference": {
                "real_halves": "the real set split at random (seed) into two halves, scored against each other "
                               "as a generated set would be: what real data scores (smaller samples than the "
                               "generated comparison, so FID reads slightly high)",
                "mean_volume": "the real set's voxel-wise mean volume repeated n_fake times, scored against the "
                               "real set: what a generator that learned only the average scores",
            },
            "n": n_fake,
            "seed": seed,
            "real": real_desc,
            "fake": fake_source.describe(),
            "features": protocols,
            "kid": {"kernel": "(x.y/d + 1)^3", "estimator": "unbiased MMD^2", "subsets": KID_SUBSETS,
                    "subset_size": "min(1000, n_real, n_fake)"},
            "mmd": {"kernel": "gaussian exp(-|x-y|^2/median^2)", "bandwidth": "median pairwise distance of pooled sample",
                    "estimator": "unbiased MMD^2"},
            "fid": {"covariance": "ddof=1", "method": fid_method,
                    "sqrtm": "scipy.linalg.sqrtm of S1 S2, eps=1e-6 fallback; eigh: same value by symmetric eigendecomposition",
                    "2.5d": "per plane on slice features, fid = mean of planes"},
            "ms_ssim": {"kernel_size": MS_SSIM_KERNEL, "sigma": MS_SSIM_SIGMA, "data_range": DATA_RANGE,
                        "scales": ms_ssim_scales((size,) * 3), "volumes": min(ms_ssim_volumes, n_fake),
                        "max_pairs": ms_ssim_pairs},
            "versions": _versions(extractors),
            "device": str(dev),
        },
        "stats_file": str(save_stats_path) if save_stats_path else None,
        "notes": notes,
    }

    out.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name in real_features:
        arrays[f"real::{name}"] = real_features[name]["volume"]
        arrays[f"fake::{name}"] = fake_features[name]["volume"]
    with atomic_write(out / "features.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    if figure:
        figures = {}
        for name in real_features:
            path = out / f"embedding_{name}.png"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                emb = embedding_figure(
                    {"real": real_features[name]["volume"], "generated": fake_features[name]["volume"]},
                    path, title=f"MDS of {name} features", seed=seed,
                )
            figures[name] = {"path": path.name, "method": emb["method"]}
        result["figures"] = figures
    result["seconds"] = round(time.perf_counter() - start, 2)
    write_json_atomic(out / "metrics.json", result)
    write_text_atomic(out / "metrics.md", metrics_markdown(result))
    return result


def embedding_from_evaluations(
    evaluations: Mapping[str, str | os.PathLike], path: str | os.PathLike, feature: str | None = None, seed: int = 0
) -> dict:
    """Fig. 4 for several methods: {label: evaluate() output folder}; the real set comes from the first."""
    sets: dict[str, np.ndarray] = {}
    for label, folder in evaluations.items():
        file = Path(folder) / "features.npz"
        if not file.is_file():
            raise HaganError(f"{folder}: no features.npz (run evaluate first)")
        with np.load(file, allow_pickle=False) as archive:
            names = sorted(k.split("::", 1)[1] for k in archive.files if k.startswith("fake::"))
            chosen = feature or names[0]
            if f"fake::{chosen}" not in archive.files:
                raise HaganError(f"{file}: no {chosen} features (has: {', '.join(names)})")
            if not sets:
                sets["real"] = archive[f"real::{chosen}"]
            sets[label] = archive[f"fake::{chosen}"]
    return embedding_figure(sets, path, title=f"MDS of {chosen} features", seed=seed)


class PeriodicKID:
    """KID of a model's samples against a fixed real sample, for logging during training.

    Real features are computed once at construction: ``n`` volumes drawn (seeded) from the cache.
    ``kid_tracker(sample_fn)`` calls ``sample_fn(n)`` for n volumes in [-1, 1], (n, 1, S, S, S) or
    (n, S, S, S), and returns the KID mean (subsets of min(1000, n), 50 subsets).
    """

    def __init__(
        self, real_cache: str | os.PathLike, extractor: TorchExtractor, n: int = 32, seed: int = 0,
        batch_size: int = 2, n_subsets: int = 50,
    ):
        from hagan.data.dataset import CachedVolumeDataset

        dataset = CachedVolumeDataset(real_cache)
        if len(dataset) < 2 or n < 2:
            raise HaganError(f"periodic KID needs at least 2 real volumes and n >= 2 (cache has {len(dataset)}, n={n})")
        order = np.random.default_rng(seed).permutation(len(dataset))[: min(n, len(dataset))]
        real = torch.stack([dataset[int(i)]["image"] for i in sorted(order)])
        self.extractor, self.n, self.seed = extractor, n, seed
        self.batch_size, self.n_subsets = batch_size, n_subsets
        self.real_features = extractor.extract(real, batch_size).double().numpy()

    def __call__(self, model_sample_fn: Callable[[int], Any]) -> float:
        samples = model_sample_fn(self.n)
        if isinstance(samples, torch.Tensor):
            volumes = samples.detach().float().cpu()
        else:
            volumes = torch.as_tensor(np.asarray(samples), dtype=torch.float32)
        fake = self.extractor.extract(volumes.float(), self.batch_size).double().numpy()
        return kid(self.real_features, fake, self.n_subsets, None, self.seed)[0]
