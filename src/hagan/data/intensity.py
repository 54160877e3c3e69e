"""Intensity recipes: raw scanner values to the model's [-1, 1] and back to the units a user reads.

Each recipe has its inverse here, so the CT window and the MRI scale are defined once for reading
(preprocess), writing (generate, reconstruct, translate) and scoring (evaluate).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hagan.errors import HaganError, printable

# the model range's floor: air, background and padding
BACKGROUND = -1.0
CT_WINDOW_HU = (-1024.0, 600.0)
MRI_PERCENTILE = 99.9


def ct_recipe(array: np.ndarray) -> np.ndarray:
    """HU window [-1024, 600] to [-1, 1]; missing (non-finite) voxels count as air."""
    return _window_in_place(_finite_copy(array, CT_WINDOW_HU[0]), *CT_WINDOW_HU)


def mri_recipe(array: np.ndarray) -> np.ndarray:
    """[min, p99.9] to [-1, 1]: MRI has no absolute scale, and a few hot voxels must not squash the rest."""
    out = _finite_copy(array, 0.0)
    low = float(out.min())
    high = float(np.percentile(out, MRI_PERCENTILE))
    if high <= low:
        high = float(out.max())
    if high <= low:
        return np.full(array.shape, BACKGROUND, dtype=np.float32)
    return _window_in_place(out, low, high)


def _finite_copy(array: np.ndarray, missing: float) -> np.ndarray:
    """One float32 copy with non-finite voxels set to ``missing``: the recipes then work in place, so a
    large volume costs one more volume rather than four (float64 temporaries included)."""
    out = np.array(array, dtype=np.float32)
    out[~np.isfinite(out)] = missing
    return out


def _window_in_place(out: np.ndarray, low: float, high: float) -> np.ndarray:
    """[low, high] mapped linearly to [-1, 1], clipped outside, overwriting ``out``. Centred, then
    divided by the half-width, so that no step overflows float32 even for windows of +-3e38."""
    np.clip(out, low, high, out=out)
    out -= np.float32(low / 2 + high / 2)
    out /= np.float32(high / 2 - low / 2)
    return np.clip(out, -1.0, 1.0, out=out)


RECIPES: dict[str, Callable[[np.ndarray], np.ndarray]] = {"ct": ct_recipe, "mri": mri_recipe}


def to_output_intensity(array: np.ndarray, recipe: str) -> np.ndarray:
    """Undo the recipe's scaling for writing: CT back to Hounsfield units (int16), MRI to [0, 1] (float32)."""
    if recipe == "ct":
        return np.round(to_hounsfield(array)).astype(np.int16)
    return ((np.asarray(array, np.float32) + 1) / 2).astype(np.float32)


def to_hounsfield(array: np.ndarray) -> np.ndarray:
    """Model range [-1, 1] back to Hounsfield units of the CT recipe's window (float32)."""
    low, high = CT_WINDOW_HU
    return (np.asarray(array, np.float32) + 1) / 2 * (high - low) + low


def output_to_model_range(array: np.ndarray, recipe: str) -> np.ndarray:
    """to_output_intensity's inverse: CT from Hounsfield units, MRI from [0, 1], 'none' as is."""
    if recipe == "ct":
        low, high = CT_WINDOW_HU
        out = (array - low) / (high - low) * 2 - 1
    elif recipe == "mri":
        out = array * 2 - 1
    elif recipe == "none":
        out = array
    else:
        raise HaganError(f"unknown recipe {printable(str(recipe))!r} for generated volumes; choose from ct, mri, none")
    return np.clip(out, -1, 1).astype(np.float32)


def apply_recipe(array: np.ndarray, name: str) -> np.ndarray:
    """Apply the intensity recipe called ``name`` (see RECIPES); the result is float32 in [-1, 1]."""
    if name not in RECIPES:
        raise HaganError(f"unknown recipe {name!r}; valid recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name](array)
