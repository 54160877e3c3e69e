"""The 3D baselines of HA-GAN's paper: WGAN-GP, alpha-GAN and VAE-GAN as Kwon et al. (MICCAI 2019)
built them for brain MRI, and as HA-GAN's authors ran them at 128^3, for any power-of-two cube.

All three share one DCGAN-style generator (a transposed convolution from the latent to 4^3, then per
level nearest x2 upsampling, a 3^3 convolution, BatchNorm and ReLU, and tanh at full size) and one
critic (4^3 strided convolutions with LeakyReLU 0.2 from full size down to 4^3, then a 4^3
convolution to one score). Channels follow the published 64^3 and 128^3 layouts: the generator ends
with 64 channels and doubles them at each coarser level; the critic reaches 512 at 4^3 and halves
them at each finer level. ``model.width`` scales every channel and hidden-unit count.

Each model's iteration is a list of update steps, each a method that returns its loss from the
iteration's real batch; ``train_step`` runs them in the published order and ``memory_probes`` hands
the same methods to ``hagan bench`` for its meta-device memory estimate.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import Config
from ...errors import HaganError
from ...training.losses import wasserstein_critic_loss
from ..base import GenerativeModel
from ..layers import LEAK, Upsample, scaled

BASE_SIZE = 4
GENERATOR_LAST_CHANNELS = 64
CRITIC_TOP_CHANNELS = 512
CODE_CRITIC_UNITS = 4096
VAE_HEAD_UNITS = 2048


def levels(size: int) -> int:
    """Number of x2 steps between the 4^3 base and ``size``."""
    n = int(math.log2(size // BASE_SIZE))
    if size < 2 * BASE_SIZE or BASE_SIZE * 2**n != size:
        raise ValueError(f"output size must be a power of two of at least {2 * BASE_SIZE}, got {size}")
    return n


class Generator(nn.Module):
    """Latent (n, latent_dim) to a volume (n, 1, S, S, S) in [-1, 1]."""

    def __init__(self, size: int, latent_dim: int, width: float = 1.0):
        super().__init__()
        n = levels(size)
        channels = [scaled(GENERATOR_LAST_CHANNELS * 2 ** (n - 1 - i), width) for i in range(n)]
        layers: list[nn.Module] = [
            nn.ConvTranspose3d(latent_dim, channels[0], BASE_SIZE, bias=False),
            nn.BatchNorm3d(channels[0]),
            nn.ReLU(inplace=True),
        ]
        for cin, cout in zip(channels, channels[1:]):
            layers += [Upsample(), nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]
        layers += [Upsample(), nn.Conv3d(channels[-1], 1, 3, padding=1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.reshape(z.shape[0], -1, 1, 1, 1))


def downsampling_trunk(size: int, width: float, batch_norm: bool) -> tuple[nn.Sequential, int]:
    """Full size to 4^3 by stride-2 4^3 convolutions; no normalisation after the first, as DCGAN."""
    n = levels(size)
    channels = [scaled(CRITIC_TOP_CHANNELS // 2 ** (n - 1 - i), width) for i in range(n)]
    layers: list[nn.Module] = [nn.Conv3d(1, channels[0], 4, 2, 1), nn.LeakyReLU(LEAK, inplace=True)]
    for cin, cout in zip(channels, channels[1:]):
        layers.append(nn.Conv3d(cin, cout, 4, 2, 1))
        if batch_norm:
            layers.append(nn.BatchNorm3d(cout))
        layers.append(nn.LeakyReLU(LEAK, inplace=True))
    return nn.Sequential(*layers), channels[-1]


class Critic(nn.Module):
    """Volume to one unbounded score (a WGAN critic, or a logit for VAE-GAN's BCE)."""

    def __init__(self, size: int, width: float = 1.0, batch_norm: bool = False):
        super().__init__()
        self.trunk, channels = downsampling_trunk(size, width, batch_norm)
        self.head = nn.Conv3d(channels, 1, BASE_SIZE)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x)).flatten()


class Encoder(nn.Module):
    """alpha-GAN's encoder: the critic's trunk with BatchNorm and a 4^3 convolution to the latent."""

    def __init__(self, size: int, latent_dim: int, width: float = 1.0):
        super().__init__()
        self.trunk, channels = downsampling_trunk(size, width, batch_norm=True)
        self.head = nn.Conv3d(channels, latent_dim, BASE_SIZE)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x)).flatten(1)


class VAEEncoder(nn.Module):
    """VAE-GAN's encoder: the same trunk, then two MLP heads for the posterior's mean and log-variance."""

    def __init__(self, size: int, latent_dim: int, width: float = 1.0):
        super().__init__()
        self.trunk, channels = downsampling_trunk(size, width, batch_norm=True)
        features, hidden = channels * BASE_SIZE**3, scaled(VAE_HEAD_UNITS, width)

        def head() -> nn.Sequential:
            return nn.Sequential(nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, latent_dim))

        self.mean, self.logvar = head(), head()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(x).flatten(1)
        return self.mean(h), self.logvar(h)


class CodeCritic(nn.Module):
    """alpha-GAN's code discriminator: an MLP telling encoded latents from the prior's."""

    def __init__(self, latent_dim: int, width: float = 1.0, batch_norm: bool = False):
        super().__init__()
        units = scaled(CODE_CRITIC_UNITS, width)
        layers: list[nn.Module] = []
        for cin in (latent_dim, units):
            layers.append(nn.Linear(cin, units))
            if batch_norm:
                layers.append(nn.BatchNorm1d(units))
            layers.append(nn.LeakyReLU(LEAK, inplace=True))
        layers.append(nn.Linear(units, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).flatten()


Step = Callable[[Tensor, torch.Generator, torch.Generator], tuple[Tensor, dict[str, Tensor]]]


class Baseline(GenerativeModel):
    """What the three baselines share: generator, critic, Adam per network, the step loop, decoding."""

    critic_uses_gradient_penalty = True

    def __init__(self, config: Config, critic_batch_norm: bool):
        super().__init__(config)
        m = config.model
        if m.num_classes:
            raise HaganError(f"model.num_classes: {m.name} is unconditional; set model.num_classes to 0")
        self.size = m.size
        self.generator = Generator(m.size, m.latent_dim, m.width)
        self.critic = Critic(m.size, m.width, critic_batch_norm)
        self._optimizers: dict[str, torch.optim.Optimizer] | None = None

    # ----- training ----------------------------------------------------------------------------
    def adam(self, *groups: tuple[nn.Module, float]) -> torch.optim.Optimizer:
        o = self.config.optim
        fused = self.device.type == "cuda"
        params = [{"params": list(module.parameters()), "lr": lr} for module, lr in groups]
        return torch.optim.Adam(params, betas=(o.beta1, o.beta2), eps=1e-8, fused=fused)

    @abstractmethod
    def steps(self) -> list[tuple[str, int, Step]]:
        """(optimizer name, updates per iteration, step) in the order the reference code runs them."""

    def train_step(self, batch: dict[str, Tensor], iteration: int, rng: torch.Generator) -> dict[str, float]:
        real = batch["image"].to(self.device, memory_format=self.memory_format, non_blocking=True)
        # per-sample draws (penalty mixing, reparameterisation) are per rank; latents come from rng
        sample_rng = self.step_generator(rng)
        logs: dict[str, float] = {}
        for name, repeats, step in self.steps():
            self.trainable(name)
            for _ in range(repeats):
                loss, extra = step(real, rng, sample_rng)
                logs[f"loss/{name}"] = self.update(name, loss)
            logs.update({key: float(value.detach()) for key, value in extra.items()})
        self.requires_grad_(True)
        return logs

    def trainable(self, optimizer_name: str) -> None:
        """Only the parameters that optimizer steps receive gradients."""
        self.requires_grad_(False)
        for group in self.optimizers()[optimizer_name].param_groups:
            for p in group["params"]:
                p.requires_grad_(True)

    def memory_probes(self, batch_size: int) -> dict[str, Callable[[], object]]:
        """Each update step's forward passes on a zero batch, for ``hagan bench``'s memory estimate."""
        s = self.size
        rng = torch.Generator()
        real = torch.zeros(batch_size, 1, s, s, s, device=self.device)
        return {name: (lambda step=step: step(real, rng, rng)) for name, _, step in self.steps()}

    def score(self, critic: nn.Module) -> Callable[[Tensor], Tensor]:
        def run(x: Tensor) -> Tensor:
            with self.autocast():
                return critic(x).float()

        return run

    def compiled_modules(self) -> list[nn.Module]:
        """A critic under a gradient penalty is differentiated twice, which compiled graphs do not support."""
        return [m for m in self.children() if not (self.critic_uses_gradient_penalty and m in self.critics())]

    def critics(self) -> list[nn.Module]:
        return [self.critic]

    # ----- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is not None:
            raise ValueError(f"{self.config.model.name} is unconditional: pass no class labels")
        with self.autocast():
            return self.generator(z.to(self.device)).float()

    def checked_volumes(self, volumes: Tensor) -> Tensor:
        expected = (1, self.size, self.size, self.size)
        if tuple(volumes.shape[1:]) != expected:
            raise ValueError(f"volumes must have shape (n, {', '.join(map(str, expected))}), got {tuple(volumes.shape)}")
        return volumes.to(self.device)


class WGANGP(Baseline):
    """3D WGAN-GP (Gulrajani et al. 2017), as Kwon et al.'s 3D baseline; no encoder."""

    def __init__(self, config: Config):
        super().__init__(config, critic_batch_norm=config.baseline.critic_norm == "batch")

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self._optimizers is None:
            o = self.config.optim
            self._optimizers = {"D": self.adam((self.critic, o.lr_d)), "G": self.adam((self.generator, o.lr_g))}
        return self._optimizers

    def steps(self) -> list[tuple[str, int, Step]]:
        b = self.config.baseline
        return [("D", b.critic_steps, self.critic_step), ("G", b.generator_steps, self.generator_step)]

    def critic_step(self, real: Tensor, rng: torch.Generator, sample_rng: torch.Generator):
        with torch.no_grad(), self.autocast():
            fake = self.generator(self.train_latent(real.shape[0], rng))
        out = wasserstein_critic_loss(self.score(self.critic), real, [fake], self.config.baseline.gp_lambda, sample_rng)
        return out.loss, {"D/wasserstein": out.distance, "loss/D_gp": out.penalty}

    def generator_step(self, real: Tensor, rng: torch.Generator, sample_rng: torch.Generator):
        with self.autocast():
            fake = self.generator(self.train_latent(real.shape[0], rng))
        return -self.score(self.critic)(fake).mean(), {}


class AlphaGAN(Baseline):
    """3D alpha-GAN with WGAN-GP critics (Rosca et al. 2017; Kwon et al. 2019's alpha-WGAN).

    Per iteration: the encoder and generator together (WGAN loss of the reconstructed and the random
    volumes, fooling the code critic, ``baseline.lambda_recon`` x L1 reconstruction), then the image
    critic (both fakes against the real batch, one gradient penalty each), then the code critic
    (the prior's latents against the encoded ones, with its own gradient penalty).
    """

    def __init__(self, config: Config):
        batch_norm = config.baseline.critic_norm == "batch"
        super().__init__(config, critic_batch_norm=batch_norm)
        m = config.model
        self.encoder = Encoder(m.size, m.latent_dim, m.width)
        self.code_critic = CodeCritic(m.latent_dim, m.width, batch_norm)

    def critics(self) -> list[nn.Module]:
        return [self.critic, self.code_critic]

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self._optimizers is None:
            o = self.config.optim
            self._optimizers = {
                "EG": self.adam((self.generator, o.lr_g), (self.encoder, o.lr_e)),
                "D": self.adam((self.critic, o.lr_d)),
                "C": self.adam((self.code_critic, o.lr_d)),
            }
        return self._optimizers

    def steps(self) -> list[tuple[str, int, Step]]:
        b = self.config.baseline
        return [("EG", b.generator_steps, self.encoder_generator_step), ("D", b.critic_steps, self.critic_step),
                ("C", b.critic_steps, self.code_critic_step)]

    def encoder_generator_step(self, real: Tensor, rng: torch.Generator, sample_rng: torch.Generator):
        with self.autocast():
            code = self.encoder(real)
            reconstructed = self.generator(code)
            generated = self.generator(self.train_latent(real.shape[0], rng))
        critic = self.score(self.critic)
        adversarial = -(critic(reconstructed).mean() + critic(generated).mean())
        fool_code_critic = -self.score(self.code_critic)(code).mean()
        recon = F.l1_loss(reconstructed.float(), real.float())
        loss = adversarial + fool_code_critic + self.config.baseline.lambda_recon * recon
        return loss, {"loss/EG_recon_l1": recon, "loss/EG_code": fool_code_critic}

    def critic_step(self, real: Tensor, rng: torch.Generator, sample_rng: torch.Generator):
        with torch.no_grad(), self.autocast():
            reconstructed = self.generator(self.encoder(real))
            generated = self.generator(self.train_latent(real.shape[0], rng))
        out = wasserstein_critic_loss(self.score(self.critic), real, [generated, reconstructed],
                                      self.config.baseline.gp_lambda, sample_rng)
        return out.loss, {"D/wasserstein": out.distance, "loss/D_gp": out.penalty}

    def code_critic_step(self, real: Tensor, rng: torch.Generator, sample_rng: torch.Generator):
        with torch.no_grad(), self.autocast():
            code = self.encoder(real).float()
        prior = self.train_latent(real.shape[0], rng)
        out = wasserstein_critic_loss(self.score(self.code_critic), prior, [code], self.config.baseline.gp_lambda, sample_rng)
        return out.loss, {"C/wasserstein": out.distance, "loss/C_gp": out.penalty}

    @torch.no_grad()
    def encode(self, volumes: Tensor) -> Tensor:
        """Latent codes (n, latent_dim) of full volumes (n, 1, S, S, S)."""
        with self.autocast():
            return self.encoder(self.checked_volumes(volumes)).float()


class VAEGAN(Baseline):
    """3D VAE-GAN (Larsen et al. 2016) as Kwon et al.'s baseline: voxel-wise reconstruction, BCE critic.

    Per iteration: the discriminator (real against reconstructed and random volumes), the generator
    (fooling it with both, plus ``baseline.vae_recon_generator`` x squared error), then the encoder
    (KL to the prior, averaged over batch and latent dimensions, plus ``baseline.vae_recon_encoder`` x
    squared error through the frozen generator). ``encode`` returns the posterior mean.
    """

    critic_uses_gradient_penalty = False

    def __init__(self, config: Config):
        super().__init__(config, critic_batch_norm=config.baseline.critic_norm == "batch")
        m = config.model
        self.encoder = VAEEncoder(m.size, m.latent_dim, m.width)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self._optimizers is None:
            o = self.config.optim
            self._optimizers = {"D": self.adam((self.critic, o.lr_d)), "G": self.adam((self.generator, o.lr_g)),
                                "E": self.adam((self.encoder, o.lr_e))}
        return self._optimizers

    def steps(self) -> list[tuple[str, int, Step]]:
        b = self.config.baseline
        return [("D", b.critic_steps, self.discriminator_step), ("G", b.generator_steps, self.generator_step),
                ("E", b.generator_steps, self.encoder_step)]

    def posterior_sample(self, real: Tensor, sample_rng: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(z, mean, logvar): one reparameterised draw from the encoder's posterior of each volume."""
        mean, logvar = self.encoder(real)
        noise = torch.randn(mean.shape, generator=sample_rng).to(mean.device, mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise, mean, logvar

    def discriminator_step(self, real: Tensor, rng: torch.Generator, sample_rng: torch.Generator):
        with torch.no_grad(), self.autocast():
            reconstructed = self.generator(self.posterior_sample(real, sample_rng)[0])
            generated = self.generator(self.train_latent(real.shape[0], rng))
        logit = self.score(self.critic)
        real_logit = logit(real)
        loss = F.softplus(-real_logit).mean() + F.softplus(logit(reconstructed)).mean() + F.softplus(logit(generated)).mean()
        return loss, {"D/real_logit": real_logit.mean()}

    def generator_step(self, real: Tensor, rng: torch.Generator, sample_rng: torch.Generator):
        with torch.no_grad(), self.autocast():
            code = self.posterior_sample(real, sample_rng)[0]
        with self.autocast():
            reconstructed = self.generator(code)
            generated = self.generator(self.train_latent(real.shape[0], rng))
        logit = self.score(self.critic)
        recon = F.mse_loss(reconstructed.float(), real.float())
        adversarial = F.softplus(-logit(reconstructed)).mean() + F.softplus(-logit(generated)).mean()
        return adversarial + self.config.baseline.vae_recon_generator * recon, {"loss/G_recon_mse": recon}

    def encoder_step(self, real: Tensor, rng: torch.Generator, sample_rng: torch.Generator):
        with self.autocast():
            code, mean, logvar = self.posterior_sample(real, sample_rng)
            reconstructed = self.generator(code)
        mean, logvar = mean.float(), logvar.float()
        kl = -0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).mean()
        recon = F.mse_loss(reconstructed.float(), real.float())
        return kl + self.config.baseline.vae_recon_encoder * recon, {"loss/E_kl": kl}

    @torch.no_grad()
    def encode(self, volumes: Tensor) -> Tensor:
        """Posterior means (n, latent_dim) of full volumes (n, 1, S, S, S)."""
        with self.autocast():
            return self.encoder(self.checked_volumes(volumes))[0].float()
