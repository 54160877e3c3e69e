"""Fixtures shared by several test files."""

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def tiny_ct_cache(tmp_path_factory):
    """A tiny CT cache: five 32^3 volumes with a random block of tissue in air."""
    from hagan.data.preprocess import preprocess_folder

    root = tmp_path_factory.mktemp("shared-cache")
    rng = np.random.default_rng(0)
    (root / "raw").mkdir()
    for i in range(5):
        volume = np.full((32, 32, 32), -1000.0, np.float32)
        volume[4:28, 6:26, 6:26] = rng.uniform(-900, 400, (24, 20, 20))
        np.save(root / "raw" / f"v{i}.npy", volume)
    preprocess_folder(root / "raw", root / "cache", recipe="ct", size=32, progress=False)
    return root / "cache"


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny volumes: one thread is faster than several spinning on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
