"""Intensity rules that measure a tissue's volume in real or generated volumes (the paper's Fig. 5).

The paper segments lungs with the Chest Imaging Platform and bone by thresholding; neither tool nor
threshold ships with its code. These rules are documented stand-ins that need no network, so a
latent walk can be measured anywhere. They act on model-range volumes in [-1, 1] and the recipe
the run was trained with (``ct``: the [-1024, 600] HU window; ``mri``: [min, p99.9] per volume).

* ``bone`` (CT): HU >= ``BONE_HU`` (200), above soft tissue and blood (< 100 HU) and below cortical bone.
* ``lung`` (CT): air-like voxels (HU < ``AIR_HU``, -400) inside the body, the body being every axial
  slice's tissue (HU >= -400) with its holes filled; air outside the patient never counts. Airways
  inside the body count as lung at these resolutions, as a threshold rule cannot part them.
* ``csf`` (MRI): voxels in the cerebrospinal-fluid band (``CSF_BAND``, recipe units) at least
  ``CSF_DEPTH_MM`` inside the head, which keeps scalp, skull and extra-cerebral fluid out and leaves
  the ventricles and deep sulci: a proxy of ventricle volume, not a parcellation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from hagan.data.intensity import to_hounsfield
from hagan.errors import HaganError

BONE_HU = 200.0
AIR_HU = -400.0
CSF_BAND = (-0.85, -0.3)
HEAD_LEVEL = -0.85
CSF_DEPTH_MM = 12.0

Spacing = tuple[float, float, float]


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Holes filled in each axial slice (axis 0), so a body outline encloses the lungs even where
    the trachea opens the 3D body surface at the top."""
    return np.stack([ndimage.binary_fill_holes(plane) for plane in mask])


def bone_mask(volume: np.ndarray, spacing_mm: Spacing = (1.0, 1.0, 1.0), threshold_hu: float = BONE_HU) -> np.ndarray:
    return to_hounsfield(volume) >= threshold_hu


def lung_mask(volume: np.ndarray, spacing_mm: Spacing = (1.0, 1.0, 1.0), air_hu: float = AIR_HU) -> np.ndarray:
    hu = to_hounsfield(volume)
    tissue = hu >= air_hu
    labels, count = ndimage.label(tissue)
    if count == 0:
        return np.zeros_like(tissue)
    sizes = ndimage.sum_labels(tissue, labels, index=np.arange(1, count + 1))
    body = _fill_slices(labels == 1 + int(np.argmax(sizes)))
    return body & ~tissue


def csf_mask(
    volume: np.ndarray, spacing_mm: Spacing = (1.0, 1.0, 1.0), band: tuple[float, float] = CSF_BAND, depth_mm: float = CSF_DEPTH_MM
) -> np.ndarray:
    volume = np.asarray(volume, np.float32)
    head = _fill_slices(volume > HEAD_LEVEL)
    inside = ndimage.distance_transform_edt(head, sampling=spacing_mm) >= depth_mm
    return inside & (volume >= band[0]) & (volume < band[1])


SEGMENTERS: dict[str, tuple[str, Callable[..., np.ndarray]]] = {
    "lung": ("ct", lung_mask),
    "bone": ("ct", bone_mask),
    "csf": ("mri", csf_mask),
}


def segment(volume: np.ndarray, tissue: str, recipe: str, spacing_mm: Spacing) -> np.ndarray:
    """The boolean mask of ``tissue`` in one volume, refusing a rule made for another modality."""
    if tissue not in SEGMENTERS:
        raise HaganError(f"unknown tissue {tissue!r}; choose one of {', '.join(SEGMENTERS)}")
    needed, rule = SEGMENTERS[tissue]
    if recipe != needed:
        raise HaganError(f"the {tissue} rule reads {needed.upper()} intensities, but the run's recipe is {recipe!r}")
    if np.asarray(volume).ndim != 3:
        raise HaganError(f"segmentation needs one 3D volume, got shape {np.shape(volume)}")
    return rule(volume, spacing_mm)


def volume_ml(mask: np.ndarray, spacing_mm: Spacing) -> float:
    """Mask volume in millilitres for voxels of ``spacing_mm`` (one value per axis)."""
    return float(np.count_nonzero(mask)) * float(np.prod(spacing_mm)) / 1000.0


def affine_spacing(affine: np.ndarray) -> Spacing:
    """Voxel edge lengths (mm) along the array axes of a 4x4 affine."""
    return tuple(float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))
