"""Procedural 3D phantoms with ground-truth attributes, so the project can train and test without downloads.

Arrays follow the project convention: axis 0 runs inferior->superior, axis 1 posterior->anterior and
axis 2 left->right (nibabel codes 'S', 'A', 'R'). Anatomy is laid out in millimetres, so ``spacing_mm``
changes the physical field of view, not the patient. Attributes are measured on the generated masks,
not copied from the random parameters, so they are the ground truth of what is in the image.

Every phantom draws its random parameters, geometry and textures from separate child streams of one
seed, so an override (say a larger ``lung_scale``) changes only what it names.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from hagan.data.io import atomic_write, write_volume
from hagan.errors import HaganError

FIELD_OF_VIEW_MM = {"thorax-ct": 350.0, "brain-mri": 240.0}
MIN_SIZE, MAX_SIZE = 16, 256

# Thorax anatomy is written in units of half the default thorax field of view (175 mm).
_THORAX_UNIT_MM = FIELD_OF_VIEW_MM["thorax-ct"] / 2
_AIR_HU, _PADDING_HU = -1000.0, -1024.0
# Emphysema fraction range (of lung parenchyma) for each GOLD-like grade; disjoint, so grade is recoverable.
_EMPHYSEMA_FRACTION = ((0.0, 0.0), (0.03, 0.08), (0.08, 0.15), (0.15, 0.25), (0.25, 0.40))

SeedLike = int | np.random.Generator | np.random.SeedSequence


# --------------------------------------------------------------------------- shared helpers


def phantom_affine(size: int, spacing_mm: float) -> np.ndarray:
    """Affine from (axis0=S, axis1=A, axis2=R) indices to RAS+ mm, volume centre at the world origin."""
    affine = np.zeros((4, 4))
    affine[0, 2] = affine[1, 1] = affine[2, 0] = spacing_mm
    affine[:3, 3] = -spacing_mm * (size - 1) / 2
    affine[3, 3] = 1.0
    return affine


def _check_size(size: int) -> None:
    if not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise HaganError(f"phantom size must be between {MIN_SIZE} and {MAX_SIZE}, got {size}")


def _grid(size: int, spacing_mm: float, unit_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates (z, y, x) as broadcastable open grids, in ``unit_mm`` from the centre."""
    u = ((np.arange(size) + 0.5 - size / 2) * (spacing_mm / unit_mm)).astype(np.float32)
    return u[:, None, None], u[None, :, None], u[None, None, :]


def _apply_overrides(params: dict, overrides: dict) -> dict:
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise HaganError(f"unknown phantom parameter(s) {unknown}; known: {sorted(params)}")
    return {**params, **overrides}


def _soft(distance: np.ndarray, voxel: float) -> np.ndarray:
    """Partial-volume occupancy from a signed distance (positive inside), so thin structures stay visible."""
    return np.clip(distance / voxel + 0.5, 0.0, 1.0).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, sigma_vox: float) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation: a cheap random texture."""
    field = ndimage.gaussian_filter(rng.standard_normal((size,) * 3, dtype=np.float32), max(sigma_vox, 0.7))
    return field / field.std()


def _tubes(size: int, segments: np.ndarray, spacing_mm: float, unit_mm: float) -> np.ndarray:
    """Soft occupancy of tapered tubes; rows are (z0, y0, x0, z1, y1, x1, r0, r1) in ``unit_mm``.

    Each segment is evaluated only inside its bounding box, so the cost follows the tubes, not the volume.
    """
    occupancy = np.zeros((size,) * 3, np.float32)
    voxel = spacing_mm / unit_mm
    coords = ((np.arange(size) + 0.5 - size / 2) * voxel).astype(np.float32)
    for seg in segments:
        p0, p1, r0, r1 = seg[:3], seg[3:6], seg[6], seg[7]
        reach = max(r0, r1) + voxel
        lo = np.clip(np.floor((np.minimum(p0, p1) - reach) / voxel + size / 2).astype(int), 0, size)
        hi = np.clip(np.ceil((np.maximum(p0, p1) + reach) / voxel + size / 2).astype(int) + 1, 0, size)
        if np.any(hi <= lo):
            continue
        z = coords[lo[0] : hi[0], None, None] - p0[0]
        y = coords[None, lo[1] : hi[1], None] - p0[1]
        x = coords[None, None, lo[2] : hi[2]] - p0[2]
        d = p1 - p0
        t = np.clip((z * d[0] + y * d[1] + x * d[2]) / max(float(d @ d), 1e-12), 0.0, 1.0)
        dist = np.sqrt((z - t * d[0]) ** 2 + (y - t * d[1]) ** 2 + (x - t * d[2]) ** 2)
        box = occupancy[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        np.maximum(box, _soft(r0 + t * (r1 - r0) - dist, voxel), out=box)
    return occupancy


def _branching_tree(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    length: float,
    radius: float,
    depth: int,
    spread_deg: float = 38.0,
) -> list[np.ndarray]:
    """Segments of a random binary tree: each branch splits in two around a random axis, shorter and thinner."""
    segments = []
    unit = np.asarray(direction, float) / np.linalg.norm(direction)
    stack = [(np.asarray(start, float), unit, length, radius, depth)]
    while stack:
        point, unit, seg_len, seg_r, level = stack.pop()
        end = point + unit * seg_len
        segments.append(np.concatenate([point, end, [seg_r, seg_r * 0.85]]))
        if level <= 1:
            continue
        axis = rng.standard_normal(3)
        axis -= (axis @ unit) * unit
        axis /= np.linalg.norm(axis)
        for sign in (-1.0, 1.0):
            angle = np.deg2rad(spread_deg) * rng.uniform(0.6, 1.3) * sign
            normal = axis[[1, 2, 0]] * unit[[2, 0, 1]] - axis[[2, 0, 1]] * unit[[1, 2, 0]]  # axis x unit
            child = unit * np.cos(angle) + normal * np.sin(angle)
            stack.append((end, child, seg_len * rng.uniform(0.65, 0.85), seg_r * 0.75, level - 1))
    return segments


def _ellipsoid_depth(z, y, x, centre, axes) -> np.ndarray:
    """Approximate signed distance inside an ellipsoid (exact for spheres), in the coordinates' units."""
    qz, qy, qx = (z - centre[0]) / axes[0], (y - centre[1]) / axes[1], (x - centre[2]) / axes[2]
    rho = np.sqrt(qz**2 + qy**2 + qx**2)
    grad = np.sqrt((qz / axes[0]) ** 2 + (qy / axes[1]) ** 2 + (qx / axes[2]) ** 2)
    return (1.0 - rho) * rho / np.maximum(grad, 1e-6)


# --------------------------------------------------------------------------- thorax CT


def _thorax_parameters(rng: np.random.Generator) -> dict:
    return {
        "body_size": rng.uniform(0.85, 1.12),
        "body_aspect": rng.uniform(0.62, 0.76),
        "fat_thickness": rng.uniform(0.03, 0.08),
        "lung_scale": rng.uniform(0.85, 1.15),
        "lung_hu": rng.uniform(-870.0, -830.0),
        "heart_scale": rng.uniform(0.9, 1.1),
        "bone_scale": rng.uniform(0.8, 1.2),
        "grade": int(rng.integers(0, 5)),
        "emphysema_level": rng.uniform(),
        "noise_hu": rng.uniform(10.0, 20.0),
        "vertebra_phase": rng.uniform(),
        "blank_top": int(rng.integers(1, 4)),
        "blank_bottom": int(rng.integers(1, 4)),
    }


def thorax_ct(
    size: int, rng_or_seed: SeedLike, *, spacing_mm: float | None = None, **overrides
) -> tuple[np.ndarray, dict]:
    """A chest-CT-like volume in HU with ground-truth attributes, for training and testing without real data.

    Anatomy: body with fat layer, lungs with vessel and airway trees, trachea, heart, aorta, spine, ribs,
    sternum, and emphysema-like low-attenuation blobs whose lung fraction grows with ``grade`` (0-4).
    Overrides (each otherwise random): body_size, body_aspect, fat_thickness, lung_scale, lung_hu,
    heart_scale, bone_scale, grade, emphysema_level (0-1 within the grade's range), noise_hu,
    vertebra_phase, blank_top, blank_bottom (blank padding slices, scaled with size).
    """
    _check_size(size)
    spacing = float(spacing_mm or FIELD_OF_VIEW_MM["thorax-ct"] / size)
    param_rng, tree_rng, texture_rng, noise_rng = np.random.default_rng(rng_or_seed).spawn(4)
    p = _apply_overrides(_thorax_parameters(param_rng), overrides)
    grade = int(p["grade"])
    if not 0 <= grade <= 4:
        raise HaganError(f"grade must be 0..4, got {p['grade']}")

    unit = _THORAX_UNIT_MM
    z, y, x = _grid(size, spacing, unit)
    bs, ls, bone = p["body_size"], p["lung_scale"], p["bone_scale"]
    ax = 0.78 * bs
    ay = ax * p["body_aspect"]
    y0 = -0.06
    X, Y = x / ax, (y - y0) / ay  # body-relative coordinates, 2D (1, n, n) after broadcasting

    def to_xyz(zz: float, yy: float, xx: float) -> np.ndarray:
        """Body-relative (z, Y, X) to grid units (z, y, x)."""
        return np.array([zz, y0 + yy * ay, xx * ax])

    # Body outline (superellipse), skin, subcutaneous fat; the rib cage is a smaller ellipse set forward.
    rho = (np.abs(X) ** 2.5 + np.abs(Y) ** 2.5) ** 0.4
    body = rho <= 1.0
    fat = (rho > 0.975 - p["fat_thickness"]) & (rho <= 0.975)
    Xr, Yr = X / 0.80, (Y - 0.08) / 0.72
    rho_rib = np.sqrt(Xr**2 + Yr**2)
    inside_ribs = rho_rib < 0.93

    # Diaphragm: two domes (right higher), lower for larger lungs.
    dome_top = -0.42 - 0.5 * (ls - 1.0) + np.where(X > 0, 0.05, -0.03)
    diaphragm = dome_top - 0.32 * (((np.abs(X) - 0.42) / 0.5) ** 2 + (Y / 0.95) ** 2)
    cavity = inside_ribs & (z > diaphragm)
    abdomen = inside_ribs & (z <= diaphragm)

    # Heart sits on the diaphragm, left and anterior; spine posterior midline.
    hs = p["heart_scale"]
    heart_centre = (float(dome_top.min()) + 0.14, 0.30, -0.14)  # (z, Y, X), body-relative in-plane
    heart_axes = (0.28 * hs, 0.42 * hs, 0.38 * hs)
    heart_q = ((z - heart_centre[0]) / heart_axes[0]) ** 2 + ((Y - heart_centre[1]) / heart_axes[1]) ** 2
    heart_q = heart_q + ((X - heart_centre[2]) / heart_axes[2]) ** 2
    heart = (heart_q <= 1.0) & cavity

    rvx, rvy = 0.085 * bs * bone, 0.075 * bs * bone
    yv = y0 - 0.40 * ay
    spine_e2 = (x / rvx) ** 2 + ((y - yv) / rvy) ** 2

    # Great vessels and oesophagus as tubes; their envelope keeps the lungs off the mediastinum.
    top = float(heart_centre[0] + heart_axes[0])
    aorta_path = [to_xyz(top - 0.1, 0.22, 0.03), to_xyz(0.45, 0.10, 0.03), to_xyz(0.50, -0.15, -0.15),
                  to_xyz(0.40, -0.30, -0.30), to_xyz(-1.2, -0.30, -0.30)]
    r_aorta = 0.075 * bs
    aorta_segments = [np.concatenate([a, b, [r_aorta, r_aorta]]) for a, b in zip(aorta_path, aorta_path[1:])]
    oesophagus = np.concatenate([to_xyz(1.2, -0.20, -0.05), to_xyz(-1.2, -0.22, -0.08), [0.03 * bs] * 2])
    envelope = np.array([s + np.r_[np.zeros(6), 0.03, 0.03] for s in [*aorta_segments, oesophagus]])
    mediastinal_tubes = _tubes(size, envelope, spacing, unit) > 0
    great_vessels = _tubes(size, np.array(aorta_segments), spacing, unit)
    oesophagus_occ = _tubes(size, oesophagus[None], spacing, unit)

    # Lungs: dome-shaped apex, fill the rib cage laterally, kept off the mediastinum, heart and spine.
    apex = min(0.86 + 0.1 * (ls - 1.0), 0.92)
    taper = np.sqrt(np.clip((apex - z) / 0.40, 0.0, 1.0))
    lung_shape = np.zeros((size,) * 3, bool)
    for side in (-1.0, 1.0):
        ellipse = ((X - side * 0.42) / (0.5 * ls)) ** 2 + ((Y + 0.05) / (1.0 * ls)) ** 2
        lung_shape |= (ellipse <= taper**2) & (side * X > 0.11 / ls)
    lung_shape &= cavity & ~mediastinal_tubes
    lung_shape &= ~((heart_q <= 1.1**2) | (spine_e2 <= 1.5**2))

    # Airway and vessel trees from the hila; trachea and main bronchi from the top of the volume.
    carina = to_xyz(0.18, -0.02, 0.0)
    airway_r = 0.05 * bs
    airway_segments = [np.concatenate([to_xyz(1.2, 0.0, 0.0), carina, [airway_r, airway_r]])]
    vessel_segments = []
    for side in (-1.0, 1.0):
        hilum = to_xyz(0.05 + 0.04 * side, -0.05, side * 0.26)
        airway_segments.append(np.concatenate([carina, hilum, [airway_r * 0.75, airway_r * 0.6]]))
        lobes = [(1.0, 0.1, 0.35 * side, 0.22), (0.6, -0.8, 0.5 * side, 0.18), (-0.1, 0.3, side, 0.16),
                 (-0.2, -0.9, 0.6 * side, 0.16), (-1.0, -0.4, 0.35 * side, 0.24), (-0.5, 0.9, 0.4 * side, 0.18)]
        for dz, dy, dx, length in lobes:
            direction = np.array([dz, dy * ay, dx * ax])
            vessel_segments += _branching_tree(tree_rng, hilum, direction, 0.7 * length * ls, 0.03 * bs, 6)
            airway_segments += _branching_tree(tree_rng, hilum, direction, length * ls, 0.026 * bs, 3)
    airway_segments = np.array(airway_segments)
    walls = _tubes(size, airway_segments * np.r_[np.ones(6), 1.35, 1.35] + np.r_[np.zeros(6), 0.01, 0.01],
                   spacing, unit) * cavity
    lumens = _tubes(size, airway_segments, spacing, unit) * cavity * ~heart
    vessels = _tubes(size, np.array(vessel_segments), spacing, unit) * cavity

    # Bones: vertebral bodies stacked along axis 0, posterior arches, ribs following the rib cage, sternum.
    level_height = 0.15
    level = (z / level_height - p["vertebra_phase"]) % 1.0
    in_vertebra = np.abs(level - 0.5) < 0.41
    vertebral_body = (spine_e2 <= 1.0) & in_vertebra
    trabecular = (spine_e2 <= 0.72**2) & (np.abs(level - 0.5) < 0.33)
    disc = (spine_e2 <= 1.0) & ~in_vertebra
    r_canal = 0.05 * bs
    y_canal = yv - rvy - r_canal * 1.05
    canal_r = np.sqrt(x**2 + (y - y_canal) ** 2)
    canal = canal_r <= r_canal
    arch_2d = (canal_r > r_canal) & (canal_r <= r_canal + 0.028 * bone) & (y < yv)
    arch_2d |= (np.abs(x) < 0.02 * bone) & (y < y_canal - r_canal) & (y > y_canal - r_canal - 0.15 * bs)
    arch_2d |= (np.abs(y - y_canal) < 0.022 * bone) & (np.abs(x) < 0.13 * bs) & ~canal
    arch = arch_2d & in_vertebra

    sin_phi = Yr / np.maximum(rho_rib, 1e-6)
    rib_t = (z + 0.22 * (1.0 + sin_phi)) / level_height - p["vertebra_phase"] - 0.5
    rib_dz = (rib_t - np.round(rib_t)) * level_height
    rib_dr = (rho_rib - 1.0) * np.sqrt(x**2 + (y - (y0 + 0.08 * ay)) ** 2) / np.maximum(rho_rib, 1e-6)
    rib_e2 = (rib_dr / (0.028 * bs * bone)) ** 2 + (rib_dz / (0.032 * bs * bone)) ** 2
    rib_span = (sin_phi < 0.88) & (np.abs(x) > 0.12 * bs)
    ribs = (rib_e2 <= 1.0) & rib_span
    rib_marrow = (rib_e2 <= 0.45**2) & rib_span
    y_sternum = y0 + 0.84 * ay
    sternum_2d = (np.abs(x) < 0.06 * bs) & (np.abs(y - y_sternum) < 0.03 * bs * bone)
    sternum = sternum_2d & (z > -0.45) & (z < 0.55)

    # Valid (non-blank) slab: a few blank slices top and bottom, as scanners pad them.
    blank_bottom = max(1, round(p["blank_bottom"] * size / 64))
    blank_top = max(1, round(p["blank_top"] * size / 64))
    valid = np.zeros((size, 1, 1), bool)
    valid[blank_bottom : size - blank_top] = True

    # Masks that define the attributes.
    bone_mask = (vertebral_body | arch | ribs | sternum) & body & valid
    lung = lung_shape & (walls < 0.5) & ~bone_mask & valid
    parenchyma = lung & (vessels < 0.5)

    # Emphysema: smooth random field, upper-lobe predominant, thresholded at the grade's lung fraction.
    field = _smooth_noise(texture_rng, size, 6.0 / spacing) + 0.8 * z
    low, high = _EMPHYSEMA_FRACTION[grade]
    target = low + float(np.clip(p["emphysema_level"], 0.0, 1.0)) * (high - low)
    emphysema = np.zeros_like(parenchyma)
    if target > 0 and parenchyma.any():
        threshold = np.quantile(field[parenchyma], 1.0 - target)
        emphysema = parenchyma & (field > threshold)

    # Composition, from the outside in; partial-volume tubes are blended, bones drawn last.
    image = np.where(body, np.float32(40.0), np.float32(_AIR_HU))
    image = np.where(fat | (cavity & ~lung_shape & (z < apex)), np.float32(-90.0), image)
    image = np.where(abdomen, np.float32(55.0), image)
    image = np.where(heart, np.float32(40.0), image)
    image = np.where(lung_shape, (p["lung_hu"] - 25.0 * Y).astype(np.float32), image)
    if emphysema.any():
        depth = np.clip((field - threshold) / 0.8, 0.0, 1.0)
        image = np.where(emphysema, (-950.0 - 50.0 * depth).astype(np.float32), image)
    for occupancy, hu in ((great_vessels, 45.0), (oesophagus_occ, 35.0), (vessels, 40.0), (walls, 10.0),
                          (lumens, _AIR_HU)):
        image += occupancy * (np.float32(hu) - image)
    image = np.where(disc & body, np.float32(80.0), image)
    image = np.where(canal & body, np.float32(20.0), image)
    image = np.where(vertebral_body | arch | ribs | sternum, np.float32(700.0), image)
    marrow = (trabecular & vertebral_body) | rib_marrow | (sternum & (np.abs(x) < 0.04 * bs))
    image = np.where(marrow, np.float32(300.0), image)

    image = ndimage.gaussian_filter(image, 0.6)
    image += noise_rng.normal(0.0, p["noise_hu"], image.shape).astype(np.float32)
    image[~valid[:, 0, 0]] = _PADDING_HU

    voxel_ml = spacing**3 / 1000.0
    lung_voxels = int(lung.sum())
    attributes = {
        "lung_volume_ml": lung_voxels * voxel_ml,
        "bone_volume_ml": int(bone_mask.sum()) * voxel_ml,
        "body_volume_ml": int((body & valid).sum()) * voxel_ml,
        "emphysema_fraction": int(emphysema.sum()) / lung_voxels if lung_voxels else 0.0,
        "grade": grade,
        "body_size": float(bs),
    }
    return image.astype(np.float32), attributes


# --------------------------------------------------------------------------- brain MRI


def _brain_parameters(rng: np.random.Generator) -> dict:
    return {
        "head_size": rng.uniform(0.9, 1.08),
        "skull_thickness_mm": rng.uniform(5.0, 8.0),
        "subarachnoid_mm": rng.uniform(1.5, 4.5),
        "cortical_thickness_mm": rng.uniform(2.5, 3.5),
        "ventricle_scale": rng.uniform(0.7, 1.6),
        "noise": rng.uniform(0.01, 0.025),
        "bias_strength": rng.uniform(0.05, 0.2),
    }


def brain_mri(
    size: int, rng_or_seed: SeedLike, *, spacing_mm: float | None = None, **overrides
) -> tuple[np.ndarray, dict]:
    """A T1-like head MRI (0..~1000) with ground-truth tissue volumes, for training without real data.

    Scalp, skull, CSF, folded cortex (a random field's zero set gives sulci), white matter, deep grey
    nuclei, lateral ventricles, cerebellum and brainstem; Rician noise and a smooth bias field.
    Overrides (each otherwise random): head_size, skull_thickness_mm, subarachnoid_mm,
    cortical_thickness_mm, ventricle_scale, noise (fraction of 1000), bias_strength.
    """
    _check_size(size)
    spacing = float(spacing_mm or FIELD_OF_VIEW_MM["brain-mri"] / size)
    param_rng, texture_rng, noise_rng = np.random.default_rng(rng_or_seed).spawn(3)
    p = _apply_overrides(_brain_parameters(param_rng), overrides)
    z, y, x = _grid(size, spacing, 1.0)  # millimetres
    hs, vs = p["head_size"], p["ventricle_scale"]

    def soft(distance: np.ndarray) -> np.ndarray:
        return _soft(distance, spacing)

    # Head layers share one distance field: scalp, then skull, then the intracranial volume.
    head_centre = (10.0, -5.0, 0.0)
    d_head = _ellipsoid_depth(z, y, x, head_centre, np.array([82.0, 95.0, 76.0]) * hs)
    scalp_mm, skull_mm = 6.0, p["skull_thickness_mm"]
    head, inner_scalp, icv = soft(d_head), soft(d_head - scalp_mm), soft(d_head - scalp_mm - skull_mm)

    # Cerebellum (posterior fossa) with concentric folia; the tentorium keeps the cerebrum above it.
    cb_centre, cb_axes = (-42.0 * hs, -50.0 * hs, 0.0), np.array([28.0, 38.0, 55.0]) * hs
    d_cb = _ellipsoid_depth(z, y, x, cb_centre, cb_axes)
    rho_cb = np.sqrt(sum(((c - m) / a) ** 2 for c, m, a in zip((z, y, x), cb_centre, cb_axes)))
    folium_mm = 5.0
    to_fissure = np.abs((rho_cb * cb_axes[0] / folium_mm + 0.5) % 1.0 - 0.5) * folium_mm
    outer_cb = soft((rho_cb - 0.45) * cb_axes[0])
    cerebellum = np.minimum(soft(d_cb), 1.0 - np.minimum(soft(0.7 - to_fissure), outer_cb))
    cb_wm = np.maximum(soft((0.45 - rho_cb) * cb_axes[0]),
                       np.minimum(soft(to_fissure - 0.35 * folium_mm), soft((0.8 - rho_cb) * cb_axes[0])))

    # Brainstem: a vertical tube from the midbrain down through the posterior fossa.
    brainstem = np.minimum(soft(12.0 * hs - np.sqrt((y + 18.0 * hs) ** 2 + x**2)), soft(5.0 - z))

    # Cerebrum: folded cortex from a smooth random field; sulci are its zero set near the surface.
    sigma_mm = 6.0
    field = _smooth_noise(texture_rng, size, sigma_mm / spacing)
    to_sulcus = np.abs(field) * (sigma_mm / np.sqrt(1.5))  # ~ mm to the field's zero surface
    depth = d_head - scalp_mm - skull_mm - p["subarachnoid_mm"]
    sulcal_depth, half_width = 20.0, 0.5 + 0.25 * p["subarachnoid_mm"]
    sulci = np.minimum(soft(half_width - to_sulcus), soft(sulcal_depth - depth))
    # The midline fissure stops at the corpus callosum, an arch over the ventricles.
    bend = 12.0 * ((y + 5.0 * hs) / (30.0 * hs)) ** 2
    callosum_top = (22.0 + 8.0 * vs + 7.0) * hs
    deep = _ellipsoid_depth(z, y, x, (0.0, -5.0 * hs, 0.0), np.array([60.0, 40.0, 30.0]) * hs)
    core = np.minimum(soft(callosum_top - z - bend), soft(deep))
    fissure = np.minimum(soft(half_width - np.abs(x)), 1.0 - core)
    cerebrum = np.minimum(soft(depth), 1.0 - np.maximum(sulci, fissure))
    cerebrum = np.minimum(cerebrum, 1.0 - soft(d_cb + 3.0))
    ct = p["cortical_thickness_mm"]
    gyral_gm = ct + sulcal_depth * (1.0 - np.clip(to_sulcus / (2.0 * sigma_mm / np.sqrt(1.5)), 0.0, 1.0))
    cerebral_wm = np.minimum(soft(depth - gyral_gm), np.maximum(soft(np.abs(x) - half_width - ct), core))

    brain = np.minimum(np.maximum(np.maximum(cerebrum, cerebellum), brainstem), icv)
    wm_all = np.minimum(np.maximum(np.maximum(cerebral_wm, np.minimum(cb_wm, cerebellum)), brainstem), brain)

    # Lateral ventricles (bent ellipsoids) and a slit third ventricle, all scaled together; deep grey nuclei.
    ventricles = soft(_ellipsoid_depth(z, y, x, (5.0 * hs, -8.0 * hs, 0.0), np.array([10.0, 18.0, 2.0 * vs]) * hs))
    # Thalami and hypothalamus fill the midline below the callosum.
    thalamic = _ellipsoid_depth(z, y, x, (0.0, -10.0 * hs, 0.0), np.array([25.0, 22.0, 10.0]) * hs)
    deep_gm = np.minimum(soft(thalamic), soft(callosum_top - 8.0 * hs - z - bend))
    for side in (-1.0, 1.0):
        v_axes = np.array([8.0 * vs, 28.0 * np.sqrt(vs), 6.0 * vs]) * hs
        ventricles = np.maximum(ventricles, soft(_ellipsoid_depth(
            z + bend, y, x, (22.0 * hs, -5.0 * hs, side * (2.5 + v_axes[2])), v_axes)))
        for centre, axes in (((5.0, -15.0, 12.0), (10.0, 14.0, 10.0)), ((12.0, 5.0, 25.0), (12.0, 16.0, 6.0))):
            nucleus = _ellipsoid_depth(z, y, x, (centre[0] * hs, centre[1] * hs, side * centre[2] * hs),
                                       np.array(axes) * hs)
            deep_gm = np.maximum(deep_gm, soft(nucleus))

    # Tissue fractions partition every voxel, so the image and the label map agree.
    ventricles = np.minimum(ventricles, brain)
    deep_gm = np.minimum(deep_gm, brain - ventricles)
    wm = np.minimum(wm_all, brain - ventricles - deep_gm)
    cortex = brain - ventricles - deep_gm - wm
    fractions = np.stack([1.0 - head, head - inner_scalp, inner_scalp - icv, icv - brain,
                          ventricles, cortex, deep_gm, wm])
    intensity = np.array([0.0, 600.0, 150.0, 200.0, 200.0, 550.0, 650.0, 850.0], np.float32)
    image = np.tensordot(intensity, fractions, axes=1)
    labels = fractions.argmax(axis=0)

    zn, yn, xn = (c / 120.0 for c in (z, y, x))
    basis = [zn, yn, xn, zn * yn, yn * xn, zn * xn, zn**2 - yn**2, xn**2 - yn**2]
    coefficients = noise_rng.normal(0.0, 1.0, len(basis)) / np.sqrt(len(basis))
    bias = np.exp(p["bias_strength"] * sum(c * b for c, b in zip(coefficients, basis)))
    sigma = p["noise"] * 1000.0
    image = image * bias
    image = np.sqrt((image + noise_rng.normal(0.0, sigma, image.shape)) ** 2
                    + noise_rng.normal(0.0, sigma, image.shape) ** 2)

    counts = np.bincount(labels.ravel(), minlength=len(intensity))
    voxel_ml = spacing**3 / 1000.0
    grey, white = counts[5] + counts[6], counts[7]
    attributes = {
        "ventricle_volume_ml": counts[4] * voxel_ml,
        "brain_volume_ml": (grey + white) * voxel_ml,
        "intracranial_volume_ml": counts[3:].sum() * voxel_ml,
        "grey_matter_volume_ml": grey * voxel_ml,
        "white_matter_volume_ml": white * voxel_ml,
    }
    return image.astype(np.float32), {k: float(v) for k, v in attributes.items()}


# --------------------------------------------------------------------------- datasets

KINDS: dict[str, Callable[..., tuple[np.ndarray, dict]]] = {"thorax-ct": thorax_ct, "brain-mri": brain_mri}
RECIPE_FOR_KIND = {"thorax-ct": "ct", "brain-mri": "mri"}


def phantom_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for phantom ``index`` of a dataset: depends on (seed, index) only, not on n."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, index)))


def dataset_grade(seed: int, index: int) -> int:
    """Grade of thorax phantom ``index``: each block of five holds grades 0-4 in a seeded order (balanced)."""
    block_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, index // 5)))
    return int(block_rng.permutation(5)[index % 5])


def write_phantom_dataset(
    out_dir: str | os.PathLike,
    kind: str = "thorax-ct",
    n: int = 16,
    size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Write ``n`` phantoms as ``<kind>_<iiii>.nii.gz`` plus ``attributes.csv``; returns the CSV path.

    CT is stored as int16 HU, MRI as float32. Phantom i is the same whatever ``n`` is.
    """
    if kind not in KINDS:
        raise HaganError(f"unknown phantom kind {kind!r}; choose from {sorted(KINDS)}")
    if n < 1:
        raise HaganError(f"number of phantoms must be at least 1, got {n}")
    _check_size(size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    affine = phantom_affine(size, FIELD_OF_VIEW_MM[kind] / size)
    rows = []
    for index in tqdm(range(n), desc=f"{kind} phantoms", unit="volume", disable=not progress):
        overrides = {"grade": dataset_grade(seed, index)} if kind == "thorax-ct" else {}
        array, attributes = KINDS[kind](size, phantom_rng(seed, index), **overrides)
        if kind == "thorax-ct":
            array = np.clip(np.rint(array), -32768, 32767).astype(np.int16)
        name = f"{kind}_{index:04d}.nii.gz"
        write_volume(out / name, array, affine)
        rows.append({"file": name, **attributes})

    csv_path = out / "attributes.csv"
    with atomic_write(csv_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    return csv_path
