"""The preprocessed cache as a torch Dataset, plus deterministic splitting and endless batching."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hagan.data.cache import check_cube_file, load_manifest
from hagan.data.cube import generated_affine
from hagan.data.io import display_path
from hagan.errors import HaganError


class CachedVolumeDataset(Dataset):
    """Cubes from a hagan cache, memory-mapped so that only the items in use are read.

    Items are ``{"image": float32 (1, S, S, S), "label": int64 scalar (-1 unknown), "index": int}``
    where ``index`` is the entry's position in the manifest (stable across train/val subsets); a cache
    written with label maps (``hagan preprocess --segmentations``) adds ``"segmentation"``, int64
    (1, S, S, S) on the image's grid, 0 for background. ``transform`` acts on the image only.
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
        files = [(entries[i][key], kind) for i in self.indices
                 for key, kind in (("file", "image"), ("segmentation", "segmentation")) if key in entries[i]]
        missing = [f for f, _ in files if not (self.cache_dir / f).is_file()]
        if missing:
            raise HaganError(
                f"{display_path(self.cache_dir)}: cache is incomplete ({len(missing)} missing, e.g. "
                f"{display_path(missing[0])}); run `hagan preprocess` again"
            )
        for file, kind in files:
            check_cube_file(self.cache_dir / file, self.size, kind)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        entry = self.manifest["entries"][index]
        array = np.load(self.cache_dir / entry["file"], mmap_mode="r", allow_pickle=False)
        image = torch.from_numpy(np.array(array, dtype=np.float32))[None]
        if self.transform is not None:
            image = self.transform(image)
        item = {"image": image, "label": torch.tensor(int(entry["label"]), dtype=torch.int64), "index": index}
        if "segmentation" in entry:
            labels = np.load(self.cache_dir / entry["segmentation"], mmap_mode="r", allow_pickle=False)
            item["segmentation"] = torch.from_numpy(np.array(labels, dtype=np.int64))[None]
        return item

    @property
    def size(self) -> int:
        return int(self.manifest["size"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def segmentation_labels(self) -> int:
        """The largest label value of the cached label maps (0: no label maps)."""
        return int(self.manifest.get("segmentation_labels", 0))

    @property
    def reference_affine(self) -> np.ndarray:
        """The affine generated cubes are written with (``generated_affine``), computed from the entries so
        that caches whose manifest holds their first volume's affine get the same canonical geometry."""
        return generated_affine(self.manifest)

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


_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


def _mix(*values: int) -> int:
    """A deterministic 63-bit seed from integers (no Python hash randomisation)."""
    h = 0x2545F4914F6CDD1D
    for v in values:
        h = ((h ^ (int(v) & _MASK)) * _MIX + 0x632BE59BD9B4E019) & ((1 << 64) - 1)
        h ^= h >> 29
    return h & _MASK


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: a seeded permutation cut into full batches; with fewer items
    than a batch, one batch drawn with replacement per epoch, so a tiny dataset still trains."""
    generator = torch.Generator().manual_seed(_mix(seed, epoch))
    if n < batch_size:
        return [torch.randint(n, (batch_size,), generator=generator).tolist()]
    order = torch.randperm(n, generator=generator).tolist()
    return [order[start : start + batch_size] for start in range(0, n - batch_size + 1, batch_size)]


class _SeededItems(Dataset):
    """Items addressed as (index, item seed): a seeded random transform (``VolumeAugment(seed=...)``)
    is re-seeded per item, so augmentation depends only on the loader's position, whatever the
    number of workers or ranks, and is restored exactly with the loader state."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, item_seed = key
        generator = getattr(getattr(self.dataset, "transform", None), "_generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(item_seed)
        # the seed travels with the item, so a transform applied later on the GPU draws the same
        return {**self.dataset[index], "seed": item_seed}


class _BatchKeys:
    """Batch sampler over (index, item seed) keys from a given (epoch, position) on, this rank's shard."""

    def __init__(self, loader: "InfiniteLoader", epoch: int, position: int):
        self.loader, self.epoch, self.position = loader, epoch, position

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, position = self.epoch, self.position
        while True:
            batches = self.loader.epoch_batches(epoch)
            while position < len(batches):
                yield self.loader.shard_keys(batches[position], epoch, position)
                position += 1
            epoch, position = epoch + 1, 0


class InfiniteLoader:
    """Batches forever (training counts iterations, not epochs), with a resumable state.

    The state is ``{"epoch", "position"}`` (plus the seed it was made with): the permutation of an
    epoch is a pure function of (seed, epoch), so restoring the state replays exactly the batches, and
    the per-item augmentation, an uninterrupted run would have drawn. ``batch_size`` is the global
    batch; under data parallelism each of ``world_size`` ranks yields its contiguous shard
    ``[rank * b, (rank + 1) * b)`` of it, b = batch_size / world_size.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = False):
        if len(dataset) == 0:
            raise HaganError("cannot draw batches from an empty dataset")
        if batch_size < 1:
            raise HaganError(f"batch size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise HaganError(f"rank {rank} is not in a world of {world_size}")
        if batch_size % world_size:
            raise HaganError(
                f"optim.batch_size {batch_size} does not divide across {world_size} processes; "
                f"use a multiple of {world_size}"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, int(seed)
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.pin_memory = pin_memory
        self.local_batch = batch_size // world_size
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, list[list[int]]] | None = None
        self._iterator: Iterator[dict] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, _epoch_batches(len(self.dataset), self.batch_size, self.seed, epoch))
        return self._cache[1]

    def shard_keys(self, batch: list[int], epoch: int, position: int) -> list[tuple[int, int]]:
        begin = self.rank * self.local_batch
        return [(batch[slot], _mix(self.seed, epoch, position, slot))
                for slot in range(begin, begin + self.local_batch)]

    def __iter__(self) -> "InfiniteLoader":
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(DataLoader(
                _SeededItems(self.dataset),
                batch_sampler=_BatchKeys(self, self.epoch, self.position),
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
            ))
        batch = next(self._iterator)
        self.position += 1
        if self.position >= len(self.epoch_batches(self.epoch)):
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, int]:
        """Where the next batch comes from; JSON-serialisable."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("batch_size", self.batch_size)) != self.batch_size:
            raise HaganError(
                f"the saved data order is for optim.batch_size {state['batch_size']}, not {self.batch_size}; "
                "resume with the batch size the run was started with"
            )
        self.seed = int(state.get("seed", self.seed))
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._cache, self._iterator = None, None


def infinite_loader(
    dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0, rank: int = 0, world_size: int = 1,
    pin_memory: bool = False,
) -> InfiniteLoader:
    """Yield batches forever; same seed, same batches. The returned loader has ``state_dict`` /
    ``load_state_dict`` for exact resumption, and shards the global batch across ranks. Each item
    carries the ``seed`` its augmentation is drawn from."""
    return InfiniteLoader(dataset, batch_size, seed, num_workers, rank, world_size, pin_memory)
