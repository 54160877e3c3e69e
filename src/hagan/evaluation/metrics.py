"""Quality and diversity figures computed without any pretrained network."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def grey_levels(volumes: np.ndarray) -> Tensor:
    """Model range [-1, 1] to grey levels 0-255: the unit the docs report diversity and errors in."""
    return torch.from_numpy((volumes + 1) / 2 * 255)


def pairwise_mean_abs_diff(volumes: Tensor) -> float:
    """Mean absolute difference over all pairs of distinct samples: near 0 means mode collapse."""
    flat = volumes.flatten(1).float()
    n = flat.shape[0]
    if n < 2:
        raise ValueError("need at least two volumes to measure diversity")
    total = sum(float(torch.cdist(flat[i : i + 1], flat[i + 1 :], p=1).sum()) for i in range(n - 1))
    return total / (n * (n - 1) / 2) / flat.shape[1]
