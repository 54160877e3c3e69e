"""Volumes of any size from fixed-size generated patches, keeping only each patch's receptive-field centre.

A convolutional generator sees zero padding near the border of its patch, so the outer voxels of each
generated patch are less trustworthy than the centre (Kamnitsas et al. 2017). The grid here places
patches so that their kept centres tile the whole volume: the first patch starts ``margin`` voxels
before the volume (its inputs are padded with background there) and the last one is shifted back to end
at the volume's edge. With ``overlap`` 0 each voxel takes the value of the last centre that covers it
(exact, so an identity generator reproduces its input bit for bit); with an overlap, as the plain
patch-wise baseline needs, overlapping centres are averaged.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ...errors import HaganError

Start = tuple[int, int, int]


def check_patch_geometry(patch: int, keep: int, overlap: int = 0) -> None:
    """The kept centre lies symmetrically inside the patch and overlaps are narrower than it."""
    if not 0 < keep <= patch or (patch - keep) % 2:
        raise HaganError(f"kept centre {keep} must be positive, at most the patch size {patch}, and leave "
                         "an even border (patch - keep even)")
    if not 0 <= overlap < keep:
        raise HaganError(f"patch overlap {overlap} must lie in [0, kept centre {keep})")


def patch_starts(length: int, patch: int, keep: int, overlap: int = 0) -> list[int]:
    """Starts along one axis of patches whose kept centres cover ``[0, length)``: stride ``keep - overlap``,
    the first patch ``margin`` before 0, the last shifted to end its centre exactly at ``length``."""
    check_patch_geometry(patch, keep, overlap)
    if length < 1:
        raise HaganError(f"cannot tile an axis of length {length}")
    margin = (patch - keep) // 2
    starts = []
    start = -margin
    while start + margin + keep < length:
        starts.append(start)
        start += keep - overlap
    last = max(-margin, length - margin - keep)
    if not starts or starts[-1] != last:
        starts.append(last)
    return starts


def patch_grid(shape: Sequence[int], patch: int, keep: int, overlap: int = 0) -> list[Start]:
    """All patch starts (z, y, x) that cover a volume of ``shape``."""
    return list(itertools.product(*(patch_starts(n, patch, keep, overlap) for n in shape)))


def crop_padded(volume: np.ndarray, start: Sequence[int], size: int, fill: float) -> np.ndarray:
    """The ``size``^3 block of ``volume`` at ``start``, with ``fill`` wherever it lies outside the volume."""
    out = np.full((size, size, size), fill, dtype=volume.dtype)
    source, target = [], []
    for axis, begin in enumerate(start):
        low, high = max(begin, 0), min(begin + size, volume.shape[axis])
        if high <= low:
            return out
        source.append(slice(low, high))
        target.append(slice(low - begin, high - begin))
    out[tuple(target)] = volume[tuple(source)]
    return out


class Stitcher:
    """Writes the kept centres of generated patches into a volume (averaging where centres overlap)."""

    def __init__(self, shape: Sequence[int], patch: int, keep: int, average: bool):
        self.shape = tuple(int(n) for n in shape)
        self.patch, self.keep = patch, keep
        self.margin = (patch - keep) // 2
        self.average = average
        self.volume = np.zeros(self.shape, dtype=np.float32)
        self.count = np.zeros(self.shape, dtype=np.uint8) if average else None

    def add(self, start: Sequence[int], patch: np.ndarray) -> None:
        if patch.shape != (self.patch,) * 3:
            raise HaganError(f"generated patch has shape {patch.shape}, expected {(self.patch,) * 3}")
        source, target = [], []
        for axis, begin in enumerate(start):
            low = max(begin + self.margin, 0)
            high = min(begin + self.margin + self.keep, self.shape[axis])
            source.append(slice(low - begin, high - begin))
            target.append(slice(low, high))
        block = patch[tuple(source)]
        if self.average:
            self.volume[tuple(target)] += block
            self.count[tuple(target)] += 1
        else:
            self.volume[tuple(target)] = block

    def result(self) -> np.ndarray:
        if not self.average:
            return self.volume
        if (self.count == 0).any():
            raise HaganError("the patches do not cover the whole volume")
        return self.volume / self.count


def _chunks(items: list[Start], size: int) -> Iterator[list[Start]]:
    for begin in range(0, len(items), size):
        yield items[begin : begin + size]


def stitch(
    shape: Sequence[int],
    generate: Callable[[list[Start]], np.ndarray],
    patch: int,
    keep: int,
    overlap: int = 0,
    batch_size: int = 32,
) -> np.ndarray:
    """A volume of ``shape`` from ``generate(starts) -> (len(starts), patch, patch, patch)``, called on at
    most ``batch_size`` patches at a time, so the generator's memory does not depend on ``shape``."""
    if batch_size < 1:
        raise HaganError(f"patch batch size must be at least 1, got {batch_size}")
    stitcher = Stitcher(shape, patch, keep, average=overlap > 0)
    for starts in _chunks(patch_grid(shape, patch, keep, overlap), batch_size):
        patches = np.asarray(generate(starts))
        for start, block in zip(starts, patches):
            stitcher.add(start, block)
    return stitcher.result()
