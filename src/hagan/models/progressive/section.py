"""Options of the progressive growing GAN (``model.name: progressive``; Karras et al. 2018, as Beers
et al. 2018 applied it to medical images).

Training starts at ``start_size`` per side and doubles up to ``model.size``: the first resolution
has one stable phase, each later one a fade-in phase (the new layers blended in, alpha rising
linearly from 0 to 1) and then a stable phase, each lasting the given number of training images
(iterations = images / images per iteration, rounded up), then ``final_images`` more at full size.
After that the GAN keeps training at full size until ``train.iterations``, or, with ``encoder``,
is frozen while the encoder that inverts the generator trains for the rest of the run.

The loss is always WGAN-GP with the drift term (gradient penalty weight ``gp_lambda``, drift 0.001).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..spec import ModelSpec

DIMS = (2, 3)


@dataclass
class ProgressiveConfig:
    # 3: volumes (n, 1, S, S, S); 2: axial slices of the cached volumes, generated as (n, 1, 1, S, S)
    dims: int = 3
    # per side at the first phase, a power of two from 4 (the network's base) to model.size
    start_size: int = 4
    # training images per fade-in phase and per stable phase
    fade_images: int = 32000
    stable_images: int = 32000
    final_images: int = 0
    # channels at resolution r: channel_base / r clipped to [min_channels, max_channels], times model.width
    channel_base: int = 2048
    max_channels: int = 128
    min_channels: int = 16
    # label maps as extra channels, generated and discriminated with the image: labels 1..N of the
    # cache's segmentations become N channels (+1 inside, -1 outside); 0 = image only
    segmentation_labels: int = 0
    # 2D only: axial slices drawn from each volume of the batch (images per iteration = batch x this)
    slices_per_volume: int = 4
    # after the last phase, train the encoder (the GAN frozen) for the rest of train.iterations
    encoder: bool = False
    # weight of the L1 reconstruction of real images through the frozen generator in the encoder's
    # loss, beside the latent regression on generated pairs (Beers et al.: 0, regression only)
    encoder_recon_weight: float = 0.0
    # weight of the gradient penalty in the critic's WGAN-GP loss
    gp_lambda: float = 10.0

    def problems(self) -> list[str]:
        problems = []
        if self.dims not in DIMS:
            problems.append(f"dims must be 2 or 3, got {self.dims}")
        if self.start_size < 4 or self.start_size & (self.start_size - 1):
            problems.append(f"start_size must be a power of two of at least 4, got {self.start_size}")
        for name in ("fade_images", "stable_images", "channel_base", "min_channels", "slices_per_volume"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_channels < self.min_channels:
            problems.append(f"max_channels ({self.max_channels}) must not be below min_channels ({self.min_channels})")
        for name in ("final_images", "segmentation_labels", "encoder_recon_weight", "gp_lambda"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        return problems


# Karras et al.'s optimiser (Adam, beta (0, 0.99), learning rate 0.001 with the equalised learning
# rate) and Beers et al.'s latent size 128; the phase lengths are the presets' own budgets
KARRAS_OPTIM = {"lr_g": 1e-3, "lr_d": 1e-3, "lr_e": 1e-3, "beta1": 0.0, "beta2": 0.99}

PRESETS: dict[str, dict[str, Any]] = {
    # 3D at 128^3: 4^3 stable, then five resolutions of fade + stable, 8000 iterations each at batch 4
    # (88000), then 8000 encoder iterations
    "progressive-128": {
        "model": {"name": "progressive", "size": 128, "latent_dim": 128},
        "optim": {"batch_size": 4, **KARRAS_OPTIM},
                "progressive": {"dims": 3, "start_size": 4, "fade_images": 32000, "stable_images": 32000, "encoder": True},
        "train": {"iterations": 96000},
    },
    # Beers et al.'s 2D schedule: 16 images per batch (4 volumes x 4 axial slices), 20000 iterations per
    # fade and per stable phase from 4^2 to 128^2 (220000), then 20000 encoder iterations
    "progressive-2d": {
        "model": {"name": "progressive", "size": 128, "latent_dim": 128},
        "optim": {"batch_size": 4, **KARRAS_OPTIM},
                "progressive": {"dims": 2, "start_size": 4, "fade_images": 320000, "stable_images": 320000,
                        "slices_per_volume": 4, "encoder": True},
        "train": {"iterations": 240000},
    },
    # MSD Task04 hippocampus crops (preprocess --size 64 --segmentations LABELS) with the anterior and
    # posterior hippocampus generated as two channels beside the image: 4000 iterations per phase at
    # batch 8 (36000), then 4000 encoder iterations
    "progressive-hippocampus": {
        "model": {"name": "progressive", "size": 64, "latent_dim": 128},
        "optim": {"batch_size": 8, **KARRAS_OPTIM},
                "progressive": {"dims": 3, "start_size": 4, "fade_images": 32000, "stable_images": 32000,
                        "segmentation_labels": 2, "encoder": True},
        "train": {"iterations": 40000},
    },
}

SPECS = (
    ModelSpec(
        name="progressive", entry="hagan.models.progressive.model:ProgressiveGAN", section="progressive",
        options=ProgressiveConfig, default_preset="progressive-128",
        divergence_hint="lower the learning rates (optim.lr_g, optim.lr_d) or raise progressive.gp_lambda, or set "
                        "train.on_divergence: rollback",
    ),
)
