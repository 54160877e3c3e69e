"""Options of the multi-scale patch-based GAN (``model.name: patch``, Uzunova et al. 2019 and 2020).

Defaults are the papers' and the authors' code's: a 64^3 low-resolution GAN fed 128^3 sketches, 32^3
patches of which the central 20^3 are kept at inference, 20 foreground patches per volume, LSGAN with
L1 weight 10, the discriminator updated only while its accuracy is at most 0.8, Canny thresholds 0.1 and
0.2, and the CMIG paper's augmentation of the lower scale's patches (noise on all, blur on 30%, half
resolution on 20%) and of the sketches (noise). Noise levels and the blur width are not given in the
papers; the values here are ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...checks import short_repr
from ..spec import ModelSpec

METHODS = ("multiscale", "patchwise", "small")
ADVERSARIAL = ("lsgan", "bce")


@dataclass
class PatchConfig:
    # multiscale: the papers' method; patchwise: one patch GAN at full resolution conditioned on the sketch
    # only, stitched with overlapping centres; small: the low-resolution GAN, upsampled to model.size
    method: str = "multiscale"
    low_res_size: int = 64
    patch_size: int = 32
    # the centre of each generated patch used at inference (its receptive-field centre)
    keep_size: int = 20
    # voxels by which kept centres overlap and are averaged; -1: the papers' (0 multiscale, 5 patchwise)
    overlap: int = -1
    patches_per_volume: int = 20
    # iterations of each stage (lr, hr1..hrN or patch, then seed); 0: train.iterations split evenly
    iterations_per_stage: int = 0
    # train only this stage (e.g. hr1) whatever the iteration; empty: follow the schedule
    stage: str = ""
    res_blocks: int = 6
    dropout: float = 0.5
    lambda_l1: float = 10.0
    adversarial: str = "lsgan"
    # the discriminator steps only while its accuracy on the batch is at most this (1: always)
    d_accuracy_gate: float = 0.8
    sketch_sigma: float = 1.4142135623730951
    sketch_low: float = 0.1
    sketch_high: float = 0.2
    sketch_noise: float = 0.01
    context_noise: float = 0.02
    context_blur_p: float = 0.3
    context_blur_sigma: float = 1.0
    context_half_res_p: float = 0.2
    # edge of the unconditional seed GAN's images, whose sketches start generation from scratch (0: low_res_size)
    seed_size: int = 0
    # patches per generator call at inference: GPU memory grows with this, not with the image
    inference_batch: int = 32

    def problems(self) -> list[str]:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {', '.join(METHODS)}, got {short_repr(self.method)}")
        if self.adversarial not in ADVERSARIAL:
            problems.append(f"adversarial must be one of {', '.join(ADVERSARIAL)}, got {short_repr(self.adversarial)}")
        for name in ("low_res_size", "seed_size"):
            value = getattr(self, name)
            if value and (value < 8 or value & (value - 1)):
                problems.append(f"{name} must be a power of two of at least 8, got {value}")
        if self.low_res_size < 16:
            problems.append(f"low_res_size must be at least 16 (the discriminator's depth), got {self.low_res_size}")
        if self.patch_size < 16 or self.patch_size % 4:
            problems.append(f"patch_size must be a multiple of 4 of at least 16, got {self.patch_size}")
        if not 0 < self.keep_size <= self.patch_size or self.keep_size % 2 or (self.patch_size - self.keep_size) % 4:
            problems.append(f"keep_size must be even, at most patch_size and leave a border (patch_size - keep_size) "
                            f"divisible by 4, got {self.keep_size} with patch_size {self.patch_size}")
        if not -1 <= self.overlap < self.keep_size:
            problems.append(f"overlap must be -1 (the papers') or lie in [0, keep_size), got {self.overlap}")
        if self.method == "multiscale" and self.overlap > 0:
            problems.append("overlap must be 0 or -1 for the multiscale method, whose patches are aligned with "
                            "the previous scale's grid")
        for name in ("patches_per_volume", "inference_batch", "res_blocks"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.iterations_per_stage < 0:
            problems.append(f"iterations_per_stage must not be negative (0: split evenly), got {self.iterations_per_stage}")
        for name in ("dropout", "context_blur_p", "context_half_res_p"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0 < self.d_accuracy_gate <= 1:
            problems.append(f"d_accuracy_gate must lie in (0, 1], got {self.d_accuracy_gate}")
        for name in ("lambda_l1", "sketch_sigma", "sketch_noise", "context_noise", "context_blur_sigma"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.sketch_low <= self.sketch_high <= 1:
            problems.append(f"sketch_low and sketch_high must satisfy 0 <= sketch_low <= sketch_high <= 1, got "
                            f"{self.sketch_low} and {self.sketch_high}")
        return problems


def _uzunova(size: int, method: str = "multiscale", stages: int = 0) -> dict[str, Any]:
    """The authors' training settings: batch of one volume (20 patches), Adam 2e-4 with beta1 0.5."""
    return {
        "model": {"name": "patch", "size": size, "latent_dim": 512},
        "optim": {"batch_size": 1, "lr_g": 2e-4, "lr_d": 2e-4, "beta1": 0.5, "beta2": 0.999},
        "patch": {"method": method},
        "train": {"iterations": 20000 * stages, "sample_every": 1000, "checkpoint_every": 1000},
    }


# stages: lr + one per doubling from 64 + seed; patchwise and small: their one GAN + seed
PRESETS: dict[str, dict[str, Any]] = {
    "patch-128": _uzunova(128, stages=3),
    "patch-256": _uzunova(256, stages=4),
    "patch-512": _uzunova(512, stages=5),
    "patchwise-128": _uzunova(128, "patchwise", stages=2),
    "small-gan-128": _uzunova(128, "small", stages=2),
}

SPECS = (
    ModelSpec(
        name="patch", entry="hagan.models.patch.model:MultiScalePatchGAN", section="patch", options=PatchConfig,
        default_preset="patch-128",
        divergence_hint="lower the learning rates (optim.lr_g, optim.lr_d) or patch.d_accuracy_gate, or set "
                        "train.on_divergence: rollback",
    ),
)
