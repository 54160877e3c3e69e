"""Edge sketches: the conditioning through which the multi-scale patch GAN translates between domains.

A sketch keeps where the edges of a volume are and how strong they are, and drops its grey values, so
that a generator trained on sketches of one domain (say T1 MRI) fills the edges of any other domain's
volume (T2, low-dose CT) with the training domain's appearance (Uzunova et al., MICCAI 2019 and CMIG
2020). As the authors' MATLAB preprocessing did (``edge3(..., 'approxcanny', [0.1 0.2])`` times the
normalised Sobel gradient magnitude), edges are found with a 3D Canny detector (Gaussian smoothing,
non-maximum suppression along the gradient, hysteresis between thresholds relative to the strongest
gradient) and each edge voxel is weighted by the gradient magnitude, since weighted edges carried more
information than binary ones in their experiments. Label maps (e.g. tumours) can be overlaid as flat
regions, as the papers did to generate pathologies explicitly.

Sketches are float32 in [-1, 1], -1 where there is no edge, like the volumes the models see.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ...errors import HaganError

# MATLAB's Canny smoothing and the papers' hysteresis thresholds (fractions of the strongest gradient)
DEFAULT_SIGMA = math.sqrt(2.0)
DEFAULT_LOW = 0.1
DEFAULT_HIGH = 0.2
# label k is drawn at k / LABEL_LEVELS of the sketch range: the authors' 64 * k - 1 of 255 for k = 1..4
LABEL_LEVELS = 4

# The 13 neighbour directions up to sign, the first nonzero component positive (non-maximum suppression)
_DIRECTIONS = [
    (dz, dy, dx)
    for dz in (-1, 0, 1)
    for dy in (-1, 0, 1)
    for dx in (-1, 0, 1)
    if (dz, dy, dx) > (0, 0, 0)
]


def _check_volume(volume: np.ndarray, name: str = "volume") -> np.ndarray:
    array = np.asarray(volume, dtype=np.float32)
    if array.ndim != 3:
        raise HaganError(f"{name}: a sketch needs a 3D volume, got shape {array.shape}")
    if min(array.shape) < 3:
        raise HaganError(f"{name}: a sketch needs at least 3 voxels along every axis, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise HaganError(f"{name}: contains NaN or infinite values")
    return array


def gradient_magnitude(volume: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude, float32."""
    return ndimage.generic_gradient_magnitude(np.asarray(volume, dtype=np.float32), ndimage.sobel)


def _non_maximum_suppression(magnitude: np.ndarray, gradients: list[np.ndarray]) -> np.ndarray:
    """Voxels whose gradient magnitude is a maximum along their gradient direction, quantised to the
    nearest of the 26 neighbours; ties keep one voxel of the pair, so edges are one voxel thick."""
    norm = np.maximum(magnitude, np.finfo(np.float32).tiny)
    steps = [np.rint(g / norm).astype(np.int8) for g in gradients]
    first_nonzero_sign = np.where(steps[0] != 0, steps[0], np.where(steps[1] != 0, steps[1], steps[2]))
    code = np.zeros(magnitude.shape, dtype=np.int8)
    for step, weight in zip(steps, (9, 3, 1)):
        code += (step * first_nonzero_sign + 1) * weight
    padded = np.pad(magnitude, 1)
    shape = magnitude.shape
    keep = np.zeros(shape, dtype=bool)
    for dz, dy, dx in _DIRECTIONS:
        where = code == (dz + 1) * 9 + (dy + 1) * 3 + (dx + 1)
        if not where.any():
            continue
        ahead = padded[1 + dz : 1 + dz + shape[0], 1 + dy : 1 + dy + shape[1], 1 + dx : 1 + dx + shape[2]]
        behind = padded[1 - dz : 1 - dz + shape[0], 1 - dy : 1 - dy + shape[1], 1 - dx : 1 - dx + shape[2]]
        keep |= where & (magnitude >= ahead) & (magnitude > behind)
    return keep & (magnitude > 0)


def _hysteresis(candidates: np.ndarray, strength: np.ndarray, low: float, high: float) -> np.ndarray:
    """Candidates above ``low`` that are 26-connected to one above ``high``."""
    weak = candidates & (strength >= low)
    labels, count = ndimage.label(weak, structure=np.ones((3, 3, 3), dtype=bool))
    keep = np.zeros(count + 1, dtype=bool)
    keep[np.unique(labels[weak & (strength >= high)])] = True
    keep[0] = False
    return keep[labels]


def canny_edges(
    volume: np.ndarray, sigma: float = DEFAULT_SIGMA, low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH
) -> np.ndarray:
    """3D Canny edges (bool): thresholds are fractions of the strongest smoothed gradient, as MATLAB's."""
    if not 0 <= low <= high <= 1:
        raise HaganError(f"Canny thresholds must satisfy 0 <= low <= high <= 1, got low={low}, high={high}")
    if sigma < 0:
        raise HaganError(f"Canny sigma must not be negative, got {sigma}")
    array = _check_volume(volume)
    smoothed = ndimage.gaussian_filter(array, sigma) if sigma > 0 else array
    gradients = [ndimage.sobel(smoothed, axis=axis) for axis in range(3)]
    magnitude = np.sqrt(sum(g * g for g in gradients))
    peak = float(magnitude.max())
    if peak == 0:
        return np.zeros(array.shape, dtype=bool)
    thin = _non_maximum_suppression(magnitude, gradients)
    return _hysteresis(thin, magnitude / peak, low, high)


def overlay_labels(drawing: np.ndarray, labels: np.ndarray, levels: int = LABEL_LEVELS) -> np.ndarray:
    """Draw label ``k`` > 0 as a flat region of value ``min(k, levels) / levels`` over a [0, 1] drawing."""
    labels = np.asarray(labels)
    if labels.shape != drawing.shape:
        raise HaganError(f"label map shape {labels.shape} differs from the volume's {drawing.shape}")
    if levels < 1:
        raise HaganError(f"label levels must be at least 1, got {levels}")
    values = np.clip(labels, 0, levels).astype(np.float32) / levels
    return np.maximum(drawing, values)


def sketch(
    volume: np.ndarray,
    *,
    sigma: float = DEFAULT_SIGMA,
    low: float = DEFAULT_LOW,
    high: float = DEFAULT_HIGH,
    labels: np.ndarray | None = None,
    label_levels: int = LABEL_LEVELS,
) -> np.ndarray:
    """Gradient-weighted Canny edges of ``volume`` in [-1, 1] (-1: no edge), label map optionally overlaid."""
    array = _check_volume(volume)
    edges = canny_edges(array, sigma, low, high)
    weight = gradient_magnitude(array)
    peak = float(weight.max())
    drawing = np.where(edges, weight / peak if peak > 0 else 0.0, 0.0).astype(np.float32)
    if labels is not None:
        drawing = overlay_labels(drawing, labels, label_levels)
    return drawing * 2 - 1


def resize(volume: np.ndarray, shape: int | tuple[int, int, int]) -> np.ndarray:
    """A volume at another grid size over the same field of view: block means where every axis shrinks by
    an integer factor (no aliasing, as the low-resolution scales are trained on), linear interpolation
    otherwise. Float32."""
    array = np.asarray(volume, dtype=np.float32)
    target = (shape,) * 3 if isinstance(shape, int) else tuple(shape)
    if array.shape == target:
        return array
    if all(n % t == 0 for n, t in zip(array.shape, target)):
        factors = [n // t for n, t in zip(array.shape, target)]
        blocks = array.reshape(target[0], factors[0], target[1], factors[1], target[2], factors[2])
        return blocks.mean(axis=(1, 3, 5), dtype=np.float32)
    zoom = [t / n for n, t in zip(array.shape, target)]
    return ndimage.zoom(array, zoom, order=1, mode="nearest", grid_mode=True, output=np.float32)


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """An integer label cube at ``size``^3 by nearest neighbour, since labels must not be averaged."""
    labels = np.asarray(labels)
    if labels.shape == (size,) * 3:
        return labels
    return ndimage.zoom(labels, size / labels.shape[0], order=0, mode="nearest", grid_mode=True)
