"""Options of HA-GAN (``model.name: hagan``; Sun et al., IEEE JBHI 2022), and its presets.

Defaults are the paper's: both branches (D^H on a sub-volume, D^L on the whole low-resolution
volume), both encoders, a random slab position, the non-saturating loss with the reconstruction
weights 5 and the class weight 0.1 of the authors' code. The small-data options (separate
discriminator losses, R1, DiffAugment/ADA, the generator's reconstruction term, the moving average)
are off here and on in the ``small-data-*`` presets (docs/small-data.md).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ...checks import short_repr
from ..spec import ModelSpec

R_SAMPLINGS = ("random", "deterministic")
LOSSES = ("bce", "wgan-gp")
DISC_LOSSES = ("averaged", "separate")
UPSAMPLE_MODES = ("nearest", "trilinear")


@dataclass
class HaganConfig:
    # ablations of the paper's Table IV
    low_res_branch: bool = True
    encoder: bool = True
    r_sampling: str = "random"
    minibatch_std: bool = False
    # G^H trained exactly as it is sampled (a slab with its halo, channel norm) instead of the paper's
    # independent slabs with group norm; trilinear upsampling needs it
    consistent_slabs: bool = False
    upsample: str = "nearest"
    # bce: the paper's non-saturating loss; wgan-gp: Wasserstein with gradient penalty gp_lambda
    loss: str = "bce"
    gp_lambda: float = 10.0
    lambda_recon_slab: float = 5.0
    lambda_recon_global: float = 5.0
    lambda_class: float = 0.1
    # averaged: one adversarial term on the mean of the D^H and D^L logits (the authors' code);
    # separate: one term per discriminator, weighted weight_high and weight_low
    disc_losses: str = "averaged"
    weight_high: float = 1.0
    weight_low: float = 1.0
    # G also reconstructs real volumes from the encoders' codes, and E^G's codes are held on the prior
    lambda_recon_generator: float = 0.0
    lambda_latent_prior: float = 0.0
    # R1 on real volumes: a fixed gamma, or gamma from the voxels per batch; lazy every r1_every steps
    r1_gamma: float = 0.0
    r1_per_voxel: float = 0.0
    r1_every: int = 1
    # DiffAugment policy (e.g. "translation,cutout"), its probability, and ADA's target (0: fixed p)
    diffaug: str = ""
    diffaug_p: float = 1.0
    ada_target: float = 0.0
    ada_kimg: float = 100.0
    # samples come from an exponential moving average of G with this half-life in thousands of images
    ema_kimg: float = 0.0
    ema_rampup: float = 0.05
    # recompute the generators' upsampled activations (G^A, G^H) in the backward pass instead of keeping
    # them: the same gradients in less memory, for one more generator forward per update
    recompute_activations: bool = False

    def problems(self) -> list[str]:
        problems = []
        for name, allowed in (("r_sampling", R_SAMPLINGS), ("loss", LOSSES), ("disc_losses", DISC_LOSSES),
                              ("upsample", UPSAMPLE_MODES)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {', '.join(allowed)}, got {short_repr(getattr(self, name))}")
        if self.upsample == "trilinear" and not self.consistent_slabs:
            problems.append("upsample: trilinear needs hagan.consistent_slabs: true (the paper's G^H is nearest only)")
        if self.r1_every < 1:
            problems.append(f"r1_every must be at least 1, got {self.r1_every}")
        if not self.ada_kimg > 0:
            problems.append(f"ada_kimg must be positive, got {self.ada_kimg}")
        for name in ("gp_lambda", "lambda_recon_slab", "lambda_recon_global", "lambda_class", "weight_high",
                     "weight_low", "lambda_recon_generator", "lambda_latent_prior", "r1_gamma", "r1_per_voxel",
                     "ema_kimg", "ema_rampup"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.diffaug_p <= 1:
            problems.append(f"diffaug_p must lie in [0, 1], got {self.diffaug_p}")
        if not 0 <= self.ada_target < 1:
            problems.append(f"ada_target must lie in [0, 1), got {self.ada_target}")
        if self.r1_gamma > 0 and self.r1_per_voxel > 0:
            problems.append("r1_gamma: set hagan.r1_gamma (a fixed gamma) or hagan.r1_per_voxel (gamma from the voxels "
                            "per batch), not both")
        if (self.lambda_recon_generator > 0 or self.lambda_latent_prior > 0) and not self.encoder:
            problems.append("lambda_recon_generator and lambda_latent_prior train through the encoders; "
                            "they need hagan.encoder: true")
        return problems


def _with(base: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    """A preset built on another: each named section is merged key by key, not replaced."""
    merged = copy.deepcopy(base)
    for name, values in sections.items():
        merged[name] = {**merged.get(name, {}), **values}
    return merged


# what works on 100-150 volumes (docs/small-data.md): G^H trained exactly as it is sampled, WGAN-GP with a
# loss per discriminator, G also trained to reconstruct real volumes from the encoders' codes (with the codes
# held on the prior), trilinear upsampling, and samples from an exponential moving average of G
SMALL_DATA = {
    "hagan": {"consistent_slabs": True, "upsample": "trilinear", "loss": "wgan-gp", "disc_losses": "separate",
              "lambda_recon_generator": 5.0, "lambda_latent_prior": 1.0, "ema_kimg": 1.0},
    "optim": {"lr_g": 2e-4, "lr_e": 2e-4},
}

PRESETS: dict[str, dict[str, Any]] = {
    "paper-256": {"model": {"size": 256}},
    "paper-128": {"model": {"size": 128}},
    "paper-512": {"model": {"size": 512}, "optim": {"batch_size": 2}, "hagan": {"recompute_activations": True}},
    "small-data-128": _with(SMALL_DATA, model={"size": 128}),
    "demo": _with(
        SMALL_DATA,
        model={"size": 32, "latent_dim": 128, "width": 0.25},
        train={"iterations": 600, "log_every": 10, "sample_every": 200, "checkpoint_every": 200},
    ),
}

SPECS = (
    ModelSpec(
        name="hagan", entry="hagan.models.hagan.model:HAGAN", section="hagan", options=HaganConfig,
        default_preset=None,
        divergence_hint="lower the learning rates, enable hagan.r1_gamma / hagan.diffaug, or set "
                        "train.on_divergence: rollback",
    ),
)
