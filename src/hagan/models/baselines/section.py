"""Options of the 3D baselines of HA-GAN's paper (``model.name: wgan-gp | alpha-gan | vae-gan``).

The presets reproduce Kwon et al. (MICCAI 2019), the 3D implementations that HA-GAN's authors
compared against: latent 1000, batch 4, Adam with PyTorch's default betas, learning rate 2e-4 for
WGAN-GP and alpha-GAN and 1e-4 for VAE-GAN, gradient penalty 10 (``baseline.gp_lambda``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...checks import short_repr
from ..spec import ModelSpec

CRITIC_NORMS = ("none", "batch")


@dataclass
class BaselineConfig:
    # alpha-GAN: weight of the L1 reconstruction in the encoder-generator loss
    lambda_recon: float = 10.0
    # VAE-GAN: weights of the voxel-wise squared reconstruction error in the generator's and encoder's losses
    vae_recon_generator: float = 20.0
    vae_recon_encoder: float = 10.0
    # normalisation in the image critic and the code critic: "none" keeps the gradient penalty a
    # per-sample quantity (Gulrajani et al.); "batch" is the BatchNorm that Kwon et al.'s critics used
    critic_norm: str = "none"
    # weight of the gradient penalty in the critics' losses (WGAN-GP, alpha-GAN's code critic)
    gp_lambda: float = 10.0
    # updates per training iteration, each with fresh latents on the iteration's real batch
    critic_steps: int = 1
    generator_steps: int = 1

    def problems(self) -> list[str]:
        problems = []
        if self.critic_norm not in CRITIC_NORMS:
            problems.append(f"critic_norm must be one of {', '.join(CRITIC_NORMS)}, got {short_repr(self.critic_norm)}")
        for name in ("critic_steps", "generator_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lambda_recon", "vae_recon_generator", "vae_recon_encoder", "gp_lambda"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        return problems


def _kwon(name: str, size: int, lr: float, baseline: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {"name": name, "size": size, "latent_dim": 1000},
        "optim": {"batch_size": 4, "lr_g": lr, "lr_d": lr, "lr_e": lr, "beta1": 0.9, "beta2": 0.999},
        "baseline": baseline,
    }


# Kwon et al.'s WGAN-GP notebook takes one critic step and five generator steps per iteration
PRESETS: dict[str, dict[str, Any]] = {
    **{f"wgan-gp-{s}": _kwon("wgan-gp", s, 2e-4, {"critic_steps": 1, "generator_steps": 5}) for s in (64, 128)},
    **{f"alpha-gan-{s}": _kwon("alpha-gan", s, 2e-4, {"lambda_recon": 10.0}) for s in (64, 128)},
    **{f"vae-gan-{s}": _kwon("vae-gan", s, 1e-4, {"critic_norm": "batch"}) for s in (64, 128)},
}

_HINT = "lower the learning rates (optim.lr_g, optim.lr_d) or raise baseline.gp_lambda, or set train.on_divergence: rollback"
SPECS = tuple(
    ModelSpec(name=name, entry=f"hagan.models.baselines.model:{cls}", section="baseline", options=BaselineConfig,
              default_preset=f"{name}-128", divergence_hint=_HINT)
    for name, cls in (("wgan-gp", "WGANGP"), ("alpha-gan", "AlphaGAN"), ("vae-gan", "VAEGAN"))
)
