"""Adversarial objectives and regularisers shared by all models.

``bce`` is the paper's non-saturating loss (eq. 4-5, as the authors' code computes it with
BCEWithLogits); ``wgan-gp`` and R1 are the options the field uses when data are few.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from hagan.training.accel import host_to_device

LOSS_KINDS = ("bce", "wgan-gp")
WGAN_DRIFT = 1e-3


def check_loss_kind(kind: str) -> None:
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSS_KINDS)}")


def discriminator_loss(kind: str, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """D's loss on one batch of real and one of fake logits (WGAN drift term included)."""
    check_loss_kind(kind)
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if kind == "bce":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    return wgan_critic_loss(real_logits, fake_logits, WGAN_DRIFT)


def wgan_critic_loss(real_logits: Tensor, fake_logits: Tensor, drift: float = 0.0) -> Tensor:
    """E[D(fake)] - E[D(real)]: the WGAN critic loss of every model, computed here alone.

    ``drift`` x E[D(real)^2] (Karras et al.'s 0.001) keeps the unbounded logits near 0; Kwon et al.'s
    baselines train without it.
    """
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    loss = fake_logits.mean() - real_logits.mean()
    if drift:
        loss = loss + drift * real_logits.pow(2).mean()
    return loss


def generator_loss(kind: str, fake_logits: Tensor) -> Tensor:
    """G's non-saturating (bce) or Wasserstein loss."""
    check_loss_kind(kind)
    fake_logits = fake_logits.float()
    if kind == "bce":
        return F.softplus(-fake_logits).mean()
    return -fake_logits.mean()


def _squared_grad_norm(outputs: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    grads = torch.autograd.grad(outputs.sum(), list(inputs), create_graph=True)
    return sum(g.float().pow(2).flatten(1).sum(1) for g in grads)


def r1_penalty(critic: Callable[..., Tensor], reals: Sequence[Tensor]) -> Tensor:
    """E ||grad_x D(x)||^2 over real inputs (several inputs count as one joint input); scale by gamma/2."""
    reals = [x.detach().requires_grad_(True) for x in reals]
    return _squared_grad_norm(critic(*reals), reals).mean()


def gradient_penalty(
    critic: Callable[..., Tensor], reals: Sequence[Tensor], fakes: Sequence[Tensor], generator: torch.Generator | None = None
) -> Tensor:
    """WGAN-GP: (||grad D(x_hat)|| - 1)^2 on one interpolation per sample, shared by all inputs."""
    batch = reals[0].shape[0]
    eps = host_to_device(torch.rand(batch, generator=generator, device="cpu"), reals[0].device)
    mixed = []
    for real, fake in zip(reals, fakes):
        e = eps.view(batch, *([1] * (real.dim() - 1))).to(real.dtype)
        mixed.append((e * real.detach() + (1 - e) * fake.detach()).requires_grad_(True))
    norms = _squared_grad_norm(critic(*mixed), mixed).add(1e-12).sqrt()
    return (norms - 1).pow(2).mean()


class CriticLoss(NamedTuple):
    loss: Tensor
    distance: Tensor  # E[D(real)] - E[D(fake)], averaged over the fakes: the critic's Wasserstein estimate
    penalty: Tensor   # the gradient penalty, summed over the fakes, before its weight


def wasserstein_critic_loss(
    critic: Callable[[Tensor], Tensor],
    real: Tensor,
    fakes: Sequence[Tensor],
    gp_lambda: float,
    generator: torch.Generator | None = None,
    drift: float = 0.0,
) -> CriticLoss:
    """Sum over the fakes of the WGAN critic loss plus gp_lambda x its own gradient penalty.

    For critics that score one input: one fake for WGAN-GP, the progressive GAN and alpha-GAN's code
    critic (whose "real" is the prior), the random and the reconstructed volumes for alpha-GAN's image
    critic. The critic scores the real batch once, then each fake followed by its penalty.
    """
    real_logits = critic(real).float()
    loss = real_logits.new_zeros(())
    distance = real_logits.new_zeros(())
    penalty = real_logits.new_zeros(())
    for fake in fakes:
        fake_logits = critic(fake).float()
        gp = gradient_penalty(critic, [real], [fake], generator)
        loss = loss + wgan_critic_loss(real_logits, fake_logits, drift) + gp_lambda * gp
        distance = distance + (real_logits.mean() - fake_logits.mean()) / len(fakes)
        penalty = penalty + gp
    return CriticLoss(loss, distance, penalty)


def latent_moment_penalty(codes: Tensor) -> Tensor:
    """How far a batch of codes (n, d) is from N(0, I) in its first two moments, per dimension.

    The encoder's codes are what G learns to reconstruct from; keeping their mean at 0 and their second
    moment at 1 keeps them where random latents fall, so that G's prior samples stay heads.
    """
    codes = codes.float()
    return codes.mean(0).pow(2).mean() + (codes.pow(2).mean(0) - 1).pow(2).mean()
