import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hagan.data.cache import load_manifest
from hagan.data.dataset import CachedVolumeDataset, infinite_loader, split_indices
from hagan.data.io import write_volume
from hagan.data.preprocess import preprocess_folder
from hagan.errors import HaganError

SIZE = 8


def make_cache(root: Path, n: int, labels: list[int] | None = None) -> Path:
    src = root / f"src{n}"
    src.mkdir()
    rng = np.random.default_rng(n)
    for i in range(n):
        array = rng.uniform(0, 100, (12, 12, 12)).astype(np.float32)
        write_volume(src / f"vol{i}.nii.gz", array, np.diag([2.0, 2.0, 2.0, 1.0]))
    kwargs = {}
    if labels is not None:
        csv = root / f"labels{n}.csv"
        csv.write_text("file,label\n" + "".join(f"vol{i},{label}\n" for i, label in enumerate(labels)))
        kwargs = {"labels_csv": csv, "label_column": "label"}
    cache = root / f"cache{n}"
    preprocess_folder(src, cache, "mri", SIZE, mode="resize", progress=False, **kwargs)
    return cache


@pytest.fixture(scope="module")
def cache5(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("data"), 5, labels=[0, 2, 1, 0, 2])


@pytest.fixture(scope="module")
def cache2(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("data"), 2)


def test_dataset_items(cache5):
    seen = []
    dataset = CachedVolumeDataset(cache5, transform=lambda x: seen.append(x.shape) or x * 0.5, indices=[3, 1])
    assert len(dataset) == 2
    item = dataset[0]
    assert item["image"].shape == (1, SIZE, SIZE, SIZE) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].shape == () and int(item["label"]) == 0
    assert item["index"] == 3
    assert item["image"].abs().max() <= 0.5
    assert seen == [(1, SIZE, SIZE, SIZE)]
    assert dataset.size == SIZE and dataset.num_classes == 3
    assert dataset.names == ["vol3", "vol1"] and dataset.labels == [0, 2]
    manifest = load_manifest(cache5)
    np.testing.assert_array_equal(dataset.reference_affine, np.array(manifest["reference_affine"]))
    assert dataset.reference_affine.shape == (4, 4)


def test_unlabelled_cache_has_minus_one(cache2):
    dataset = CachedVolumeDataset(cache2)
    assert dataset.num_classes == 0 and int(dataset[1]["label"]) == -1


def test_not_a_cache(tmp_path):
    with pytest.raises(HaganError, match="hagan preprocess"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(HaganError, match=str(tmp_path)):
        CachedVolumeDataset(tmp_path)


def test_missing_cube_is_reported(cache2, tmp_path):
    manifest = load_manifest(cache2)
    manifest["entries"][0]["file"] = "volumes/gone.npy"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HaganError, match="incomplete"):
        CachedVolumeDataset(tmp_path)


def test_split_indices_is_deterministic_and_disjoint():
    train, val = split_indices(10, 0.2, seed=3)
    assert (train, val) == split_indices(10, 0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == list(range(10))
    assert split_indices(3, 0.1, seed=0)[1] != [] and split_indices(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(HaganError):
        split_indices(10, 1.0, seed=0)


def batch_indices(loader, count: int) -> list[list[int]]:
    return [batch["index"].tolist() for batch in itertools.islice(loader, count)]


def test_infinite_loader_is_deterministic_and_reshuffles_each_epoch(cache5):
    dataset = CachedVolumeDataset(cache5)
    first = batch_indices(infinite_loader(dataset, 2, seed=7), 6)
    assert first == batch_indices(infinite_loader(dataset, 2, seed=7), 6)
    assert first != batch_indices(infinite_loader(dataset, 2, seed=8), 6)
    epochs = [first[0] + first[1], first[2] + first[3], first[4] + first[5]]
    for epoch in epochs:  # drop_last: 2 full batches of distinct items per epoch of 5
        assert len(set(epoch)) == 4
    assert len({tuple(e) for e in epochs}) > 1


def test_infinite_loader_samples_with_replacement_when_data_is_small(cache2):
    dataset = CachedVolumeDataset(cache2)
    batches = list(itertools.islice(infinite_loader(dataset, 4, seed=0), 3))
    for batch in batches:
        assert batch["image"].shape == (4, 1, SIZE, SIZE, SIZE)
        assert batch["label"].shape == (4,)
        assert set(batch["index"].tolist()) <= {0, 1}
    assert batch_indices(infinite_loader(dataset, 4, seed=0), 3) == [b["index"].tolist() for b in batches]
