"""Augmentation: differentiable ops for the discriminators' inputs, and random transforms of real volumes.

Two different jobs live here:

* :func:`diff_augment` and :class:`AdaptiveAugmentStrength` keep discriminators from memorising a
  small training set (DiffAugment, Zhao et al. 2020; StyleGAN2-ADA, Karras et al. 2020). The same
  ops are applied to real and fake inputs, and they are differentiable so the generator still gets
  gradients through them; the generator therefore learns the un-augmented distribution.
* :class:`VolumeAugment` perturbs real training volumes in the dataset. It is not differentiable and
  its transforms leak into what the generator learns, so they are kept small and anatomically
  plausible (near-symmetric flips, few-degree rotations, mild intensity changes).

Volumes are in [-1, 1] with background -1, so every op that exposes new voxels fills them with -1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hagan.data.intensity import BACKGROUND
from hagan.training.accel import host_to_device

_TRANSLATION_RATIO = 1 / 8
_CUTOUT_RATIO = 1 / 2
# Depth is only translated / cut along when it is a real volume axis, not a thin slab of a few slices.
_MIN_DEPTH_FOR_DEPTH_OPS = 16


def _rand(shape: tuple[int, ...], x: Tensor, generator: torch.Generator | None) -> Tensor:
    """U(0, 1) drawn on the generator's device (a CPU generator may drive a CUDA tensor)."""
    device = generator.device if generator is not None else x.device
    return host_to_device(torch.rand(shape, generator=generator, device=device), x.device).to(x.dtype)


def _randint(low: int, high: int, batch: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else x.device
    return host_to_device(torch.randint(low, high, (batch,), generator=generator, device=device), x.device)


def _brightness(x: Tensor, generator: torch.Generator | None) -> Tensor:
    # ±25 % of the value range (width 2), which equals DiffAugment's ±0.5 on [-1, 1] images.
    shift = (_rand((x.shape[0], 1, 1, 1, 1), x, generator) - 0.5) * 0.5 * 2.0
    return x + shift


def _contrast(x: Tensor, generator: torch.Generator | None) -> Tensor:
    factor = _rand((x.shape[0], 1, 1, 1, 1), x, generator) + 0.5
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    return (x - mean) * factor + mean


def _spatial_extent(size: int, ratio: float, is_depth: bool) -> int:
    return int(size * ratio + 0.5) if not is_depth or size >= _MIN_DEPTH_FOR_DEPTH_OPS else 0


def _translation(x: Tensor, generator: torch.Generator | None) -> Tensor:
    batch, channels, depth, height, width = x.shape
    padded = F.pad(x, (1, 1, 1, 1, 1, 1), value=BACKGROUND)
    index = []
    for axis, size in enumerate((depth, height, width)):
        max_shift = _spatial_extent(size, _TRANSLATION_RATIO, is_depth=axis == 0)
        shift = _randint(-max_shift, max_shift + 1, batch, x, generator)
        # Reading outside the volume lands on the one-voxel background border of `padded`.
        coords = torch.arange(size, device=x.device)[None, :] + shift[:, None] + 1
        view = [batch, 1, 1, 1]
        view[axis + 1] = size
        index.append(coords.clamp(0, size + 1).view(view))
    batch_index = torch.arange(batch, device=x.device).view(batch, 1, 1, 1)
    # Advanced indexing (a gather) keeps the op differentiable with respect to x.
    shifted = padded.permute(0, 2, 3, 4, 1)[batch_index, index[0], index[1], index[2]]
    return shifted.permute(0, 4, 1, 2, 3)


def _cutout(x: Tensor, generator: torch.Generator | None) -> Tensor:
    batch, _, depth, height, width = x.shape
    inside = torch.ones((batch, 1, 1, 1, 1), dtype=torch.bool, device=x.device)
    for axis, size in enumerate((depth, height, width)):
        box = _spatial_extent(size, _CUTOUT_RATIO, is_depth=axis == 0)
        coords = torch.arange(size, device=x.device)[None, :]
        if box == 0:  # thin slab: the box spans all of its slices
            axis_inside = torch.ones((batch, size), dtype=torch.bool, device=x.device)
        else:
            # The centre ranges over the whole axis, so the box may be clipped at the border (as in DiffAugment).
            start = _randint(0, size + 1 - box % 2, batch, x, generator)[:, None] - box // 2
            axis_inside = (coords >= start) & (coords < start + box)
        view = [batch, 1, 1, 1, 1]
        view[axis + 2] = size
        inside = inside & axis_inside.view(view)
    return x.masked_fill(inside, BACKGROUND)


_OPS: dict[str, Callable[[Tensor, torch.Generator | None], Tensor]] = {
    "brightness": _brightness,
    "contrast": _contrast,
    "translation": _translation,
    "cutout": _cutout,
}


def diff_augment(
    x: Tensor,
    policy: str = "brightness,contrast,translation,cutout",
    generator: torch.Generator | None = None,
    probability: float = 1.0,
) -> Tensor:
    """Randomly augment a (B, C, D, H, W) batch so that gradients still reach whoever produced it.

    Apply it with the same policy and probability to real and fake discriminator inputs. Each op in
    ``policy`` (comma-separated) is applied to each sample with ``probability`` (ADA's strength p).
    Colour saturation is left out: it means nothing for one-channel images.
    """
    if x.dim() != 5:
        raise ValueError(f"expected a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    names = [name.strip() for name in policy.split(",") if name.strip()]
    unknown = [name for name in names if name not in _OPS]
    if unknown:
        raise ValueError(f"unknown augmentation op(s) {unknown}; valid ops are {sorted(_OPS)}")
    for name in names:
        selected = _rand((x.shape[0],), x, generator) < probability
        augmented = _OPS[name](x, generator)
        x = torch.where(selected.view(-1, 1, 1, 1, 1), augmented, x)
    return x


class AdaptiveAugmentStrength:
    """ADA's feedback loop: raise the augmentation probability p while the discriminator overfits.

    Overfitting shows as the discriminator being confidently right on reals: r_t = E[sign(D(real))]
    tends to 1. Every ``interval`` updates, p moves by ±(images seen in the interval) /
    (``target_kimg`` * 1000) towards keeping r_t at ``target``, so p can go from 0 to 1 within
    ``target_kimg`` thousand images. ADA used 500 kimg for runs of ~25 M images; 3D runs see about
    100 times fewer volumes, hence the smaller default.
    """

    def __init__(
        self,
        target: float = 0.6,
        interval: int = 4,
        target_kimg: float = 100.0,
        p_max: float = 1.0,
        p: float = 0.0,
    ):
        if interval < 1 or target_kimg <= 0 or not 0.0 <= p_max <= 1.0:
            raise ValueError("need interval >= 1, target_kimg > 0 and 0 <= p_max <= 1")
        self.target = target
        self.interval = interval
        self.target_kimg = target_kimg
        self.p_max = p_max
        self.p = min(max(p, 0.0), p_max)
        self.r_t = 0.0
        self._sign_sum: Tensor | float = 0.0
        self._logit_count = 0
        self._images = 0
        self._updates = 0

    def update(self, real_logits: Tensor) -> float:
        """Record one batch of discriminator outputs on reals; returns the probability to use next.

        The sum of signs stays on the logits' device and is read back once per ``interval`` updates."""
        logits = real_logits.detach()
        self._sign_sum = torch.sign(logits).sum(dtype=torch.float64) + self._sign_sum
        self._logit_count += logits.numel()
        self._images += logits.shape[0] if logits.dim() > 0 else 1
        self._updates += 1
        if self._updates >= self.interval:
            self.r_t = float(self._sign_sum) / max(self._logit_count, 1)
            direction = (self.r_t > self.target) - (self.r_t < self.target)
            step = direction * self._images / (self.target_kimg * 1000)
            self.p = min(max(self.p + step, 0.0), self.p_max)
            self._sign_sum, self._logit_count, self._images, self._updates = 0.0, 0, 0, 0
        return self.p

    def state_dict(self) -> dict[str, float | int]:
        """The changing state only, so a resumed run may change target, interval or kimg."""
        return {
            "p": self.p,
            "r_t": self.r_t,
            "sign_sum": float(self._sign_sum),
            "logit_count": self._logit_count,
            "images": self._images,
            "updates": self._updates,
        }

    def load_state_dict(self, state: Mapping[str, float | int]) -> None:
        self.p = min(max(float(state["p"]), 0.0), self.p_max)
        self.r_t = float(state["r_t"])
        self._sign_sum = float(state["sign_sum"])
        self._logit_count = int(state["logit_count"])
        self._images = int(state["images"])
        self._updates = int(state["updates"])


@dataclass
class VolumeAugment:
    """Small random transforms of one real (C, D, H, W) volume in [-1, 1], applied in the dataset.

    With ``seed=None`` draws come from torch's global RNG, which DataLoader seeds differently in
    every worker and epoch; a seeded private generator is reproducible in one process but would be
    copied into every worker and repeat there, so leave it None when using workers.
    """

    enabled: bool = True
    gamma: tuple[float, float] = (0.8, 1.25)
    brightness: float = 0.05
    contrast: float = 0.1
    flip_prob: float = 0.5
    max_rotation_deg: float = 5.0
    max_scale: float = 0.05
    seed: int | None = None
    _generator: torch.Generator | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        self.gamma = (float(self.gamma[0]), float(self.gamma[1]))
        if not 0.0 < self.gamma[0] <= self.gamma[1]:
            raise ValueError(f"gamma range must satisfy 0 < low <= high, got {self.gamma}")
        if self.seed is not None:
            self._generator = torch.Generator().manual_seed(self.seed)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> VolumeAugment:
        """Build from a config section; misspelt keys are errors rather than silently ignored."""
        valid = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(config) - valid)
        if unknown:
            raise ValueError(f"unknown augmentation setting(s) {unknown}; valid settings are {sorted(valid)}")
        return cls(**config)

    def reseed(self, seed: int) -> None:
        """Draw the next transform from ``seed`` (one seed per item makes augmentation resumable)."""
        if self._generator is None:
            self._generator = torch.Generator()
        self._generator.manual_seed(int(seed))

    def __call__(self, volume: Tensor) -> Tensor:
        if not self.enabled:
            return volume
        if volume.dim() != 4:
            raise ValueError(f"expected a (C, D, H, W) volume, got shape {tuple(volume.shape)}")
        volume = self._intensity(volume)
        if float(self._uniform(0.0, 1.0)) < self.flip_prob:
            volume = torch.flip(volume, dims=(-1,))  # left-right: anatomy is roughly symmetric
        if self.max_rotation_deg > 0 or self.max_scale > 0:
            volume = self._rotate_and_scale(volume)
        return volume

    def _uniform(self, low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand((), generator=self._generator)

    def _intensity(self, volume: Tensor) -> Tensor:
        """Gamma, contrast and brightness on [0, 1] intensities, leaving background voxels at -1."""
        unit = ((volume + 1) / 2).clamp(0, 1)
        foreground = unit > 0
        log_gamma = self._uniform(math.log(self.gamma[0]), math.log(self.gamma[1]))  # symmetric around 1
        unit = unit ** torch.exp(log_gamma).to(volume.dtype)
        if foreground.any():
            mean = unit[foreground].mean()
            contrast = self._uniform(1 - self.contrast, 1 + self.contrast).to(volume.dtype)
            shift = self._uniform(-self.brightness, self.brightness).to(volume.dtype)
            jittered = ((unit - mean) * contrast + mean + shift).clamp(0, 1)
            unit = torch.where(foreground, jittered, unit)
        return unit * 2 - 1

    def _rotate_and_scale(self, volume: Tensor) -> Tensor:
        """Rotate about the D axis and scale isotropically, with -1 filling what comes into view."""
        _, depth, height, width = volume.shape
        angle = math.radians(float(self._uniform(-self.max_rotation_deg, self.max_rotation_deg)))
        inverse_scale = 1.0 / float(self._uniform(1 - self.max_scale, 1 + self.max_scale))
        cos, sin = math.cos(angle) * inverse_scale, math.sin(angle) * inverse_scale
        # affine_grid works in normalised coordinates; the H/W ratios keep the rotation rigid in voxels.
        theta = torch.tensor(
            [
                [cos, -sin * height / width, 0.0, 0.0],
                [sin * width / height, cos, 0.0, 0.0],
                [0.0, 0.0, inverse_scale, 0.0],
            ],
            dtype=volume.dtype,
            device=volume.device,
        )[None]
        grid = F.affine_grid(theta, [1, volume.shape[0], depth, height, width], align_corners=False)
        # grid_sample pads with zeros; shifting by +1 turns that zero into the -1 background.
        shifted = (volume + 1)[None]
        resampled = F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return (resampled[0] - 1).clamp(-1, 1)
