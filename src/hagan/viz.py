"""Pictures of volumes and training curves, for eyeballing samples and runs on headless machines.

Figures are built with matplotlib's object API (``Figure``, no pyplot): rendering goes through Agg
without switching the global backend, so importing this module never disturbs a notebook's
backend and no figure is left registered in pyplot's global state. PNGs are written atomically.

Volume axes follow the project convention: axis 0 runs inferior->superior, axis 1
posterior->anterior, axis 2 left->right; values are in [-1, 1].
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from scipy.signal import lfilter
from torch import Tensor

from hagan.data.io import atomic_write

PLANE_NAMES = ("axial", "coronal", "sagittal")
MAX_MONTAGE_VOLUMES = 16
_PANEL_INCHES = 1.8
_DPI = 100


def _as_volume(volume: np.ndarray | Tensor) -> np.ndarray:
    """A (D, H, W) float array; leading singleton axes ((1, D, H, W) samples) are dropped."""
    array = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected a 3D (D, H, W) volume, got shape {array.shape}")
    return array.astype(np.float32, copy=False)


def _display_planes(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Middle axial, coronal and sagittal slices, flipped so that row 0 is the top of the picture.

    Flipping rows equals ``imshow(origin="lower")``: anterior is up in the axial slice and superior
    is up in the coronal and sagittal ones. The PNG and TensorBoard pictures share this function.
    """
    depth, height, width = volume.shape
    axial = volume[depth // 2]  # rows: posterior->anterior, columns: left->right
    coronal = volume[:, height // 2, :]  # rows: inferior->superior, columns: left->right
    sagittal = volume[:, :, width // 2]  # rows: inferior->superior, columns: posterior->anterior
    return axial[::-1], coronal[::-1], sagittal[::-1]


def _checked_titles(titles: Sequence[str] | None, count: int) -> list[str]:
    if titles is None:
        return [""] * count
    if len(titles) != count:
        raise ValueError(f"got {len(titles)} titles for {count} volumes")
    return [str(title) for title in titles]


def _dark_figure(columns: int, rows: int, title_space: float) -> tuple[Figure, np.ndarray]:
    figure = Figure(
        figsize=(columns * _PANEL_INCHES, rows * _PANEL_INCHES + title_space),
        dpi=_DPI,
        facecolor="black",
        layout="constrained",
    )
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return figure, axes


def _show(ax: Axes, image: np.ndarray, value_range: tuple[float, float]) -> None:
    ax.imshow(image, cmap="gray", vmin=value_range[0], vmax=value_range[1], interpolation="nearest")


def _save_png(figure: Figure, path: str | os.PathLike) -> Path:
    """Save so that a reader (or a killed run) never sees a half-written PNG."""
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", facecolor=figure.get_facecolor())
    return Path(path)


def three_plane_montage(
    volumes: Sequence[np.ndarray],
    path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    cols: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """Middle axial, coronal and sagittal slices of up to 16 volumes, to check anatomy in 3D at a glance.

    ``cols`` is the number of volumes per row (each takes three panels); by default one per row for
    up to four volumes, otherwise a near-square grid.
    """
    arrays = [_as_volume(volume) for volume in volumes]
    if not 1 <= len(arrays) <= MAX_MONTAGE_VOLUMES:
        raise ValueError(f"need 1 to {MAX_MONTAGE_VOLUMES} volumes, got {len(arrays)}")
    labels = _checked_titles(titles, len(arrays))
    cols = cols or (1 if len(arrays) <= 4 else math.ceil(math.sqrt(len(arrays))))
    rows = math.ceil(len(arrays) / cols)
    figure, axes = _dark_figure(3 * cols, rows, title_space=0.3)
    for index, (array, label) in enumerate(zip(arrays, labels)):
        row, col = divmod(index, cols)
        for plane, (name, image) in enumerate(zip(PLANE_NAMES, _display_planes(array))):
            ax = axes[row, 3 * col + plane]
            _show(ax, image, value_range)
            if row == 0:
                ax.set_title(name, color="white", fontsize=9)
        if label:
            axes[row, 3 * col].text(
                -0.04, 0.5, label, transform=axes[row, 3 * col].transAxes,
                rotation=90, ha="right", va="center", color="white", fontsize=9,
            )
    return _save_png(figure, path)


def montage_grid(
    volumes: Sequence[np.ndarray],
    path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    cols: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """Middle axial slices of many samples side by side, to spot mode collapse quickly."""
    arrays = [_as_volume(volume) for volume in volumes]
    if not arrays:
        raise ValueError("need at least one volume")
    labels = _checked_titles(titles, len(arrays))
    cols = cols or math.ceil(math.sqrt(len(arrays)))
    rows = math.ceil(len(arrays) / cols)
    figure, axes = _dark_figure(cols, rows, title_space=0.3 if titles else 0.0)
    for ax, array, label in zip(axes.flat, arrays, labels):
        _show(ax, _display_planes(array)[0], value_range)
        if label:
            ax.set_title(label, color="white", fontsize=9)
    return _save_png(figure, path)


def _ema(values: np.ndarray, smoothing: float) -> np.ndarray:
    """TensorBoard-style exponential moving average, starting at the first value."""
    if smoothing == 0.0 or values.size == 0:
        return values
    return lfilter([1.0 - smoothing], [1.0, -smoothing], values, zi=[smoothing * values[0]])[0]


def plot_curves(
    scalars: Mapping[str, Sequence[tuple[int, float]]],
    path: str | os.PathLike,
    title: str | None = None,
    smoothing: float = 0.0,
) -> Path:
    """Training curves, one subplot per tag prefix ("loss/D" and "loss/G" together, "aug/p" apart).

    With ``smoothing`` in (0, 1) the raw values are drawn faintly behind their moving average.
    """
    if not scalars:
        raise ValueError("no scalars to plot")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    groups: dict[str, list[str]] = {}
    for tag in scalars:
        groups.setdefault(tag.split("/", 1)[0], []).append(tag)
    figure = Figure(figsize=(7, 2.4 * len(groups) + 0.4), dpi=_DPI, layout="constrained")
    axes = figure.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (group, tags) in zip(axes, groups.items()):
        for tag in tags:
            steps, values = np.asarray(scalars[tag], dtype=np.float64).reshape(-1, 2).T
            (line,) = ax.plot(steps, _ema(values, smoothing), label=tag, linewidth=1.2)
            if smoothing > 0:
                ax.plot(steps, values, color=line.get_color(), alpha=0.25, linewidth=0.8)
        ax.set_title(group, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("iteration")
    if title:
        figure.suptitle(title)
    return _save_png(figure, path)


def label_display(labels: np.ndarray, largest: int) -> list[np.ndarray]:
    """Label maps (n, ...) with values 0..``largest`` as grey levels in [-1, 1] (background black,
    the largest label white), so they go through the same montages as images."""
    scale = max(int(largest), 1)
    return [np.asarray(label, dtype=np.float32) / scale * 2 - 1 for label in labels]


def montage_tensor(volumes: Tensor) -> np.ndarray:
    """A (3, H, W) RGB image in [0, 1] for TensorBoard's ``add_image``: one row of planes per volume.

    Takes the first channel of up to four volumes of a (B, C, D, H, W) batch in [-1, 1]; planes of
    different sizes are centred on black tiles.
    """
    if volumes.dim() != 5:
        raise ValueError(f"expected a (B, C, D, H, W) tensor, got shape {tuple(volumes.shape)}")
    batch = volumes[:4, 0].detach().float().cpu().numpy()
    _, depth, height, width = batch.shape
    tile_height, tile_width = max(height, depth), max(width, height)
    canvas = np.zeros((len(batch) * tile_height, 3 * tile_width), dtype=np.float32)
    for row, volume in enumerate(batch):
        for col, plane in enumerate(_display_planes(volume)):
            top = row * tile_height + (tile_height - plane.shape[0]) // 2
            left = col * tile_width + (tile_width - plane.shape[1]) // 2
            canvas[top : top + plane.shape[0], left : left + plane.shape[1]] = (plane + 1) / 2
    return np.repeat(canvas.clip(0, 1)[None], 3, axis=0)
