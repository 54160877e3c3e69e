"""The preprocessed cache as a torch Dataset, plus deterministic splitting and endless batching."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hagan.errors import HaganError
from hagan.preprocess import CACHE_FORMAT


def load_manifest(cache_dir: str | os.PathLike) -> dict:
    """The cache's manifest, or a HaganError telling the user how to make one."""
    cache_dir = Path(cache_dir)
    manifest_path = cache_dir / "manifest.json"
    if not manifest_path.is_file():
        raise HaganError(
            f"{cache_dir}: not a hagan cache (no manifest.json); run `hagan preprocess` to create one"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise HaganError(
            f"{manifest_path}: unreadable manifest ({exc}); run `hagan preprocess` again"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise HaganError(f"{cache_dir}: not a {CACHE_FORMAT} cache; run `hagan preprocess` to create one")
    return manifest


class CachedVolumeDataset(Dataset):
    """Cubes from a hagan cache, memory-mapped so that only the items in use are read.

    Items are ``{"image": float32 (1, S, S, S), "label": int64 scalar (-1 unknown), "index": int}``
    where ``index`` is the entry's position in the manifest (stable across train/val subsets).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        indices: list[int] | None = None,
    ):
        self.cache_dir = Path(cache_dir)
        self.manifest = load_manifest(self.cache_dir)
        self.transform = transform
        entries = self.manifest["entries"]
        self.indices = list(range(len(entries))) if indices is None else [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < len(entries)]
        if bad:
            raise HaganError(f"{self.cache_dir}: indices {bad[:5]} out of range for {len(entries)} entries")
        files = [entries[i]["file"] for i in self.indices]
        missing = [f for f in files if not (self.cache_dir / f).is_file()]
        if missing:
            raise HaganError(
                f"{self.cache_dir}: cache is incomplete ({len(missing)} missing, e.g. {missing[0]}); "
                "run `hagan preprocess` again"
            )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        entry = self.manifest["entries"][index]
        array = np.load(self.cache_dir / entry["file"], mmap_mode="r")
        image = torch.from_numpy(np.array(array, dtype=np.float32))[None]
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": torch.tensor(int(entry["label"]), dtype=torch.int64), "index": index}

    @property
    def size(self) -> int:
        return int(self.manifest["size"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def reference_affine(self) -> np.ndarray:
        """The affine generated cubes are written with, so they overlay the training data."""
        return np.asarray(self.manifest["reference_affine"], dtype=np.float64)

    @property
    def names(self) -> list[str]:
        return [self.manifest["entries"][i]["name"] for i in self.indices]

    @property
    def labels(self) -> list[int]:
        return [int(self.manifest["entries"][i]["label"]) for i in self.indices]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A reproducible (train, val) split; keeps at least one training item and, if asked, one val item."""
    if not 0.0 <= val_fraction < 1.0:
        raise HaganError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return sorted(int(i) for i in order[n_val:]), sorted(int(i) for i in order[:n_val])


class _EndlessBatches:
    """Batch sampler: seeded reshuffle every epoch, full batches only; with fewer items than a
    batch, batches are drawn with replacement so a tiny dataset still trains."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n = n
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            if self.n < self.batch_size:
                yield torch.randint(self.n, (self.batch_size,), generator=self.generator).tolist()
                continue
            order = torch.randperm(self.n, generator=self.generator).tolist()
            for start in range(0, self.n - self.batch_size + 1, self.batch_size):
                yield order[start : start + self.batch_size]


def infinite_loader(
    dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0
) -> Iterator[dict]:
    """Yield batches forever (training counts iterations, not epochs); same seed, same batches."""
    if len(dataset) == 0:
        raise HaganError("cannot draw batches from an empty dataset")
    if batch_size < 1:
        raise HaganError(f"batch size must be at least 1, got {batch_size}")
    loader = DataLoader(
        dataset,
        batch_sampler=_EndlessBatches(len(dataset), batch_size, seed),
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    yield from loader
