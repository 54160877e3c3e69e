"""The cube's geometry: canonical orientation, blank-slice trimming and the fit modes that bring a
volume to ``size``^3 while keeping its world affine right.

Cache/model axis convention: axis 0 runs inferior->superior (axial slices stacked along axis 0),
axis 1 posterior->anterior, axis 2 left->right, i.e. nibabel axis codes ('S', 'A', 'R'). The GAN's
sub-volumes are slabs along axis 0.
"""

from __future__ import annotations

from collections.abc import Iterable

import nibabel.orientations as nio
import numpy as np
from scipy import ndimage

from hagan.data.intensity import BACKGROUND
from hagan.data.io import Volume
from hagan.errors import HaganError, VolumeError

CANONICAL_AXCODES = ("S", "A", "R")
FIT_MODES = ("resize_keep_aspect", "resize", "pad")
# Geometry rule: along every cube axis the volume's content must span at least MIN_FITTED_VOXELS
# voxels (else it is skipped as unusable: a sheet or a rod) and is flagged when it spans less than
# SPARSE_FIT_FRACTION of the edge (a wrong voxel size in the header is the usual cause).
MIN_FITTED_VOXELS = 2
SPARSE_FIT_FRACTION = 1 / 8
_BLANK_TOLERANCE = 1e-6


def canonicalise(volume: Volume) -> Volume:
    """Reorient to the model's ('S','A','R') axes so every cube has the same anatomy layout."""
    array, affine = canonical_view(volume)
    return Volume(np.ascontiguousarray(array), affine)


def canonical_view(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """canonicalise's axes as a view of ``volume``'s voxels (flips and transposes copy nothing)."""
    current = nio.io_orientation(volume.affine)
    transform = nio.ornt_transform(current, nio.axcodes2ornt(CANONICAL_AXCODES))
    array = nio.apply_orientation(volume.array, transform)
    return array, volume.affine @ nio.inv_ornt_aff(transform, volume.array.shape)


def _shift_affine(affine: np.ndarray, offset: Iterable[float]) -> np.ndarray:
    """Affine of a grid whose voxel 0 sits at voxel ``offset`` of the old grid."""
    shift = np.eye(4)
    shift[:3, 3] = list(offset)
    return affine @ shift


def nonblank_slices(array: np.ndarray, background: float = BACKGROUND) -> np.ndarray:
    """Boolean per axial plane (axis 0): True where some voxel is above background."""
    return ~np.all(array <= background + _BLANK_TOLERANCE, axis=(1, 2))


def trim_blank_slices(
    array: np.ndarray, affine: np.ndarray, background: float = BACKGROUND
) -> tuple[np.ndarray, np.ndarray]:
    """Drop all-background axial planes at both ends (never inside) so the cube holds anatomy, not air.

    An entirely blank array comes back with zero planes; callers check for that first.
    """
    kept = np.flatnonzero(nonblank_slices(array, background))
    if kept.size == 0:
        return array[:0], affine.copy()
    first, last = int(kept[0]), int(kept[-1])
    return array[first : last + 1], _shift_affine(affine, (first, 0, 0))


def _zoom_to_shape(
    array: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Linear resampling that keeps the volume's outer edges in place (voxel-centre convention)."""
    scale = np.array(array.shape, dtype=np.float64) / np.array(shape, dtype=np.float64)
    zoomed = ndimage.zoom(array, 1.0 / scale, output=np.float32, order=1, mode="nearest", grid_mode=True)
    # Output voxel o samples input index (o + 0.5) * scale - 0.5.
    resample = np.eye(4)
    resample[:3, :3] = np.diag(scale)
    resample[:3, 3] = (scale - 1.0) / 2.0
    return zoomed, affine @ resample


def _pad_or_crop(
    array: np.ndarray, affine: np.ndarray, size: int, background: float
) -> tuple[np.ndarray, np.ndarray]:
    """Centre each axis in a ``size`` window, padding with background or cropping symmetrically."""
    pads, crops = [], []
    for n in array.shape:
        pad_before = max(size - n, 0) // 2
        crop_before = max(n - size, 0) // 2
        pads.append((pad_before, max(size - n, 0) - pad_before))
        crops.append(slice(crop_before, crop_before + min(n, size)))
    cube = np.pad(array[tuple(crops)], pads, mode="constant", constant_values=background)
    offset = [c.start - p[0] for c, p in zip(crops, pads)]
    return cube, _shift_affine(affine, offset)


def fit_to_cube(
    array: np.ndarray,
    affine: np.ndarray,
    size: int,
    mode: str = "resize_keep_aspect",
    background: float = BACKGROUND,
) -> tuple[np.ndarray, np.ndarray]:
    """Bring a volume to ``size``^3 and keep the affine right, so generated cubes can be placed in the world.

    ``resize`` stretches each axis to ``size`` (the paper's anisotropic resize); ``pad`` centre-pads
    with background or centre-crops; ``resize_keep_aspect`` resamples to isotropic *physical* spacing
    so that the largest physical extent fills ``size``, then pads, keeping anatomy proportions.
    """
    if mode not in FIT_MODES:
        raise HaganError(f"unknown mode {mode!r}; valid modes: {', '.join(FIT_MODES)}")
    if mode == "resize":
        return _zoom_to_shape(array, affine, (size, size, size))
    if mode == "resize_keep_aspect":
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        extent = np.array(array.shape) * spacing
        target_spacing = extent.max() / size
        shape = tuple(int(n) for n in np.clip(np.round(extent / target_spacing), 1, size))
        array, affine = _zoom_to_shape(array, affine, shape)
    return _pad_or_crop(array, affine, size, background)


def canonical_affine(spacing: Iterable[float], size: int) -> np.ndarray:
    """The geometry generated ``size``^3 cubes are written with: cube axes (S, A, R) along world +z, +y, +x
    (RAS mm), voxels of ``spacing`` (S, A, R) mm, no rotation, and the cube's centre at the world origin.
    A generated volume is no one's scan, so it sits in one documented place rather than over a subject's."""
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = *(float(s) for s in spacing), 1.0
    affine[:3, 3] = -affine[:3, :3] @ np.full(3, (size - 1) / 2)
    return affine


def generated_affine(manifest: dict) -> np.ndarray:
    """``canonical_affine`` at the median voxel size of the cache's cubes, axis by axis: cubes of the
    ``resize`` mode each have their own spacing, and the median depends neither on the order the files
    were listed in nor much on one odd scan."""
    affines = np.array([entry["affine"] for entry in manifest["entries"]], dtype=np.float64)
    spacing = np.median(np.sqrt((affines[:, :3, :3] ** 2).sum(axis=1)), axis=0)
    return canonical_affine(spacing, int(manifest["size"]))


def fitted_span(shape: tuple[int, ...], spacing: Iterable[float], size: int, mode: str) -> tuple[int, ...]:
    """Cube voxels that ``fit_to_cube`` gives the volume along each axis (the rest is padding).

    ``resize`` always fills the cube; ``pad`` keeps voxels one to one; ``resize_keep_aspect`` scales
    the largest physical extent to ``size``, so a volume of 0.1 x 0.1 x 10 mm voxels becomes a rod.
    """
    if mode == "resize":
        return (size,) * len(shape)
    if mode == "pad":
        return tuple(min(int(n), size) for n in shape)
    extent = np.array(shape, dtype=np.float64) * np.array(list(spacing), dtype=np.float64)
    return tuple(int(n) for n in np.clip(np.round(extent / extent.max() * size), 1, size))


def check_fit(source: str, shape: tuple[int, ...], spacing: Iterable[float], size: int, mode: str) -> str | None:
    """A VolumeError when the fitted content is a sheet or a rod, a warning when it fills little of the cube."""
    span = fitted_span(shape, spacing, size, mode)
    if min(span) >= SPARSE_FIT_FRACTION * size:
        return None
    extent = "x".join(f"{n * s:.3g}" for n, s in zip(shape, spacing))
    where = f"its {extent} mm extent (S, A, R) fills {'x'.join(map(str, span))} voxels of the {size}^3 cube"
    if min(span) < MIN_FITTED_VOXELS:
        raise VolumeError(source, f"{where}: a sheet or rod, nothing to learn; check the voxel size in its header")
    return f"{source}: {where} (under 1/{round(1 / SPARSE_FIT_FRACTION)} of an edge); check the voxel size in its header"
