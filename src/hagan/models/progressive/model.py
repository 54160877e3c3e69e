"""Progressive growing GAN (Karras et al., ICLR 2018) as Beers et al. (2018) applied it to medical
images, in 2D and 3D, with segmentation maps as extra channels and an encoder that inverts the
trained generator.

The trainer hands every iteration a full-size batch; the model average-pools it to the resolution
the iteration trains and, while a new resolution fades in, blends the real images the way the
generator's output is blended (the pooled-and-upsampled image weighted 1 - alpha). Phase and alpha
come from the iteration through :class:`GrowthSchedule`, and the number of finished iterations is a
buffer in the state_dict, so a checkpoint of any phase resumes exactly and generates at the
resolution it had reached. Generated images are nearest-upsampled to ``model.size`` until the
growth is complete.

Shapes: 3D models generate (n, 1, S, S, S); 2D models train on axial slices of the cached volumes
and generate (n, 1, 1, S, S), one axial slice per sample, which the trainer's montage, ``hagan
generate`` (a 1 x S x S NIfTI per sample) and ``Run.generate`` take as they are. Segmentation maps
come out through :meth:`ProgressiveGAN.decode_with_segmentation` as label maps of the same shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import Config
from ...errors import HaganError
from ...training.losses import WGAN_DRIFT, generator_loss, wasserstein_critic_loss
from ..base import GenerativeModel
from .networks import (
    ProgressiveDiscriminator,
    ProgressiveGenerator,
    channel_rule,
    downsample,
    pixel_norm,
    upsample,
)
from .schedule import GrowthSchedule, Phase

# an axial plane counts as blank (padding or air) where no voxel rises above the background by this
BLANK_TOLERANCE = 1e-3


def label_channels(segmentation: Tensor, labels: int) -> Tensor:
    """Label maps (n, 1, ...) int to ``labels`` channels (n, labels, ...): +1 where the voxel has
    label k (k = 1..labels), -1 elsewhere, the image's range, so that pooling gives soft maps."""
    values = torch.arange(1, labels + 1, device=segmentation.device)
    values = values.view(1, labels, *([1] * (segmentation.dim() - 2)))
    return (segmentation == values).float() * 2 - 1


def channels_to_labels(channels: Tensor) -> Tensor:
    """The inverse of :func:`label_channels`: each voxel takes the label of its highest channel if
    that is above 0 (nearer +1 than -1), else background 0; (n, labels, ...) to (n, 1, ...) int64."""
    background = torch.zeros_like(channels[:, :1])
    return torch.cat([background, channels], dim=1).argmax(dim=1, keepdim=True)


def critic_loss(
    critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, gp_lambda: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Karras et al.'s critic loss: E[D(fake)] - E[D(real)] + gp_lambda * GP + 0.001 * E[D(real)^2]."""
    out = wasserstein_critic_loss(critic, real, [fake], gp_lambda, generator, drift=WGAN_DRIFT)
    return out.loss, {"D/wasserstein": out.distance, "loss/D_gp": out.penalty}


class ProgressiveGAN(GenerativeModel):
    def __init__(self, config: Config):
        super().__init__(config)
        m, p = config.model, config.progressive
        if m.num_classes:
            raise HaganError(f"model.num_classes is {m.num_classes}: the progressive GAN is unconditional; set it to 0")
        if p.start_size > m.size:
            raise HaganError(f"progressive.start_size {p.start_size} is larger than model.size {m.size}")
        if p.segmentation_labels and config.data.augment:
            raise HaganError("data.augment moves the image but not its label maps: turn it off when "
                             "progressive.segmentation_labels is set")
        self.dims, self.size = p.dims, m.size
        self.segmentation_labels = p.segmentation_labels
        channels = channel_rule(p.channel_base, p.min_channels, p.max_channels, m.width)
        image_channels = 1 + p.segmentation_labels
        self.generator = ProgressiveGenerator(p.dims, m.size, m.latent_dim, image_channels, channels)
        self.discriminator = ProgressiveDiscriminator(p.dims, m.size, image_channels, channels)
        # Beers et al.'s encoder: the discriminator's architecture ending in the latent vector
        self.encoder = (
            ProgressiveDiscriminator(p.dims, m.size, 1, channels, m.latent_dim, minibatch_std=False, grows=False)
            if p.encoder else None
        )
        self.schedule = GrowthSchedule.from_images(
            p.start_size, m.size, p.fade_images, p.stable_images, self.images_per_iteration, p.final_images, p.encoder,
        )
        # iterations trained so far: decides the resolution and fade-in weight a checkpoint generates at
        self.register_buffer("trained_iterations", torch.zeros((), dtype=torch.int64))
        self._optimizers: dict[str, torch.optim.Optimizer] | None = None
        self._segmentation_checked = False

    @property
    def images_per_iteration(self) -> int:
        """Training images per iteration over all processes: volumes, or axial slices in 2D."""
        p = self.config.progressive
        return self.config.optim.batch_size * (p.slices_per_volume if self.dims == 2 else 1)

    @property
    def memory_format(self) -> torch.memory_format:
        """``train.channels_last`` applies to 3D models; 2D weights have no channels-last-3d layout."""
        return super().memory_format if self.dims == 3 else torch.contiguous_format

    def phase(self) -> Phase:
        """The phase the weights are in: that of the next iteration to train."""
        return self.schedule.at(int(self.trained_iterations))

    # ----- data --------------------------------------------------------------------------------
    def training_images(self, batch: dict[str, Tensor], rng: torch.Generator) -> Tensor:
        """The batch as (n, 1 + labels, S, ...) on the device: image, then label channels; in 2D, axial
        slices drawn from each volume."""
        image = batch["image"]
        parts = [image]
        if self.segmentation_labels:
            parts.append(label_channels(self.checked_segmentation(batch), self.segmentation_labels).to(image.device))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else image
        if self.dims == 2:
            x = self.axial_slices(x, rng)
        return x.to(self.device, memory_format=self.memory_format, non_blocking=True).float()

    def checked_segmentation(self, batch: dict[str, Tensor]) -> Tensor:
        segmentation = batch.get("segmentation")
        n = self.segmentation_labels
        if segmentation is None:
            raise HaganError(
                f"progressive.segmentation_labels is {n} but the cache has no label maps; "
                "preprocess with --segmentations LABEL_FOLDER"
            )
        if not self._segmentation_checked:
            largest = int(segmentation.max())
            if largest > n:
                raise HaganError(
                    f"the cache's label maps hold label {largest} but progressive.segmentation_labels is {n}; "
                    f"set it to the cache's segmentation_labels"
                )
            self._segmentation_checked = True
        return segmentation

    def axial_slices(self, volumes: Tensor, rng: torch.Generator) -> Tensor:
        """``slices_per_volume`` axial planes (axis 2) of each volume, uniformly among its non-blank
        planes (all planes if it has none): (n, C, S, S, S) to (n * k, C, S, S)."""
        k = self.config.progressive.slices_per_volume
        # a fixed number of draws whatever the data, so the shared stream stays equal on all ranks
        draws = torch.rand(volumes.shape[0], k, generator=rng)
        nonblank = (volumes[:, 0] > -1 + BLANK_TOLERANCE).flatten(2).any(dim=2)
        picks = []
        for i in range(volumes.shape[0]):
            planes = torch.nonzero(nonblank[i]).flatten()
            if planes.numel() == 0:
                planes = torch.arange(volumes.shape[2])
            chosen = planes[(draws[i] * planes.numel()).long().clamp(max=planes.numel() - 1)]
            picks.append(volumes[i].index_select(1, chosen.to(volumes.device)).transpose(0, 1))
        return torch.cat(picks)

    def real_at(self, images: Tensor, phase: Phase) -> Tensor:
        """Full-size reals pooled to the phase's resolution; while fading, blended with their
        pooled-and-upsampled version as the generator's output is (Karras et al.)."""
        real = downsample(images, self.size // phase.resolution)
        if phase.fading:
            real = torch.lerp(upsample(downsample(real)), real, phase.alpha)
        return real

    # ----- training ----------------------------------------------------------------------------
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self._optimizers is None:
            o = self.config.optim

            def adam(module: nn.Module, lr: float) -> torch.optim.Optimizer:
                fused = self.device.type == "cuda"
                return torch.optim.Adam(module.parameters(), lr=lr, betas=(o.beta1, o.beta2), eps=1e-8, fused=fused)

            self._optimizers = {"G": adam(self.generator, o.lr_g), "D": adam(self.discriminator, o.lr_d)}
            if self.encoder is not None:
                self._optimizers["E"] = adam(self.encoder, o.lr_e)
        return self._optimizers

    def trainable(self, module: nn.Module) -> None:
        self.requires_grad_(False)
        module.requires_grad_(True)

    def score(self, phase: Phase) -> Callable[[Tensor], Tensor]:
        def critic(x: Tensor) -> Tensor:
            with self.autocast():
                return self.discriminator(x, phase.level, phase.alpha)[:, 0].float()

        return critic

    def train_step(self, batch: dict[str, Tensor], iteration: int, rng: torch.Generator) -> dict[str, float]:
        """A critic step and a generator step at the iteration's resolution, or, in the encoder phase,
        one encoder step; Adam's moments restart with each new resolution, as Karras et al.'s do."""
        phase = self.schedule.at(iteration)
        if phase.fading and iteration == phase.start:
            for name in ("G", "D"):
                self.optimizers()[name].state.clear()
        images = self.training_images(batch, rng)
        logs = self.encoder_step(images, rng) if phase.encoder else self.gan_steps(images, phase, rng)
        self.requires_grad_(True)
        self.trained_iterations.fill_(iteration + 1)
        logs["progress/resolution"] = float(phase.resolution)
        logs["progress/alpha"] = phase.alpha
        return logs

    def gan_steps(self, images: Tensor, phase: Phase, rng: torch.Generator) -> dict[str, float]:
        real = self.real_at(images, phase)
        n = real.shape[0]
        penalty_rng = self.step_generator(rng)
        critic = self.score(phase)

        self.trainable(self.discriminator)
        with torch.no_grad(), self.autocast():
            fake = self.generator(self.train_latent(n, rng), phase.level, phase.alpha)
        d_loss, parts = critic_loss(critic, real, fake.float(), self.config.progressive.gp_lambda, penalty_rng)
        logs = {"loss/D": self.update("D", d_loss), **{k: float(v.detach()) for k, v in parts.items()}}

        self.trainable(self.generator)
        with self.autocast():
            fake = self.generator(self.train_latent(n, rng), phase.level, phase.alpha)
        logs["loss/G"] = self.update("G", generator_loss("wgan-gp", critic(fake.float())))
        return logs

    def encoder_step(self, images: Tensor, rng: torch.Generator) -> dict[str, float]:
        """Beers et al.'s inversion: regress the latent of generated images (as the generator sees it,
        pixel-normalised, the part of z that decides the image), plus, with
        ``progressive.encoder_recon_weight``, the L1 reconstruction of real images through frozen G."""
        last = self.schedule.last_level
        self.trainable(self.encoder)
        n = images.shape[0]
        with torch.no_grad(), self.autocast():
            z = self.train_latent(n, rng)
            generated = self.generator(z, last)[:, :1].float().clamp(-1, 1)
        with self.autocast():
            predicted = self.encoder(generated, last).float()
        latent_error = F.mse_loss(predicted, pixel_norm(z.float()))
        loss, logs = latent_error, {"loss/E_latent": float(latent_error.detach())}
        weight = self.config.progressive.encoder_recon_weight
        if weight > 0:
            real = images[:, :1]
            with self.autocast():
                reconstruction = self.generator(self.encoder(real, last), last)[:, :1].float()
            recon_error = F.l1_loss(reconstruction, real)
            loss = loss + weight * recon_error
            logs["loss/E_recon"] = float(recon_error.detach())
        logs["loss/E"] = self.update("E", loss)
        return logs

    def compiled_modules(self) -> list[nn.Module]:
        """None: alpha changes at every fade-in iteration and the resolution with each phase, each a
        recompilation, and the critic is differentiated twice by the gradient penalty."""
        return []

    def memory_probes(self, batch_size: int) -> dict[str, Callable[[], object]]:
        """The forward passes of each update step at full size, for ``hagan bench``'s memory estimate."""
        last = self.schedule.last_level
        n = batch_size * (self.config.progressive.slices_per_volume if self.dims == 2 else 1)
        real = torch.zeros(n, 1 + self.segmentation_labels, *([self.size] * self.dims), device=self.device)
        z = torch.zeros(n, self.config.model.latent_dim, device=self.device)
        probes: dict[str, Callable[[], object]] = {
            "D": lambda: (self.discriminator(real, last), self.discriminator(self.generator(z, last), last)),
            "G": lambda: self.discriminator(self.generator(z, last), last),
        }
        if self.encoder is not None:
            probes["E"] = lambda: self.encoder(self.generator(z, last)[:, :1], last)
        return probes

    # ----- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode_channels(self, z: Tensor) -> Tensor:
        """All generated channels at full size, (n, 1 + labels, S, S, S) or (n, 1 + labels, 1, S, S) in 2D;
        the image channel clamped to [-1, 1], label channels raw."""
        phase = self.phase()
        with self.autocast():
            x = self.generator(z.to(self.device), phase.level, phase.alpha).float()
        x = upsample(x, self.size // phase.resolution)
        x = torch.cat([x[:, :1].clamp(-1, 1), x[:, 1:]], dim=1)
        return x.unsqueeze(2) if self.dims == 2 else x

    def decode(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is not None:
            raise ValueError("the progressive GAN is unconditional: pass no class labels")
        return self.decode_channels(z)[:, :1]

    def decode_with_segmentation(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Images (as ``decode``) and their generated label maps, int64 of the same shape, 0 background."""
        if not self.segmentation_labels:
            raise ValueError("this model generates no segmentation (progressive.segmentation_labels: 0)")
        x = self.decode_channels(z)
        return x[:, :1], channels_to_labels(x[:, 1:])

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Latents (n, latent_dim) of images in [-1, 1]: volumes (n, 1, S, S, S) for a 3D model; for a
        2D model slices (n, 1, 1, S, S) or (n, 1, S, S), or volumes, of which the middle axial slice."""
        if self.encoder is None:
            raise ValueError("this model was trained without an encoder (progressive.encoder: false)")
        if int(self.trained_iterations) <= self.schedule.encoder_start:
            raise ValueError(
                f"the encoder is not trained yet: this checkpoint is at iteration {int(self.trained_iterations)} "
                f"and the encoder trains from iteration {self.schedule.encoder_start} on; train on"
            )
        s = self.size
        shape = tuple(images.shape[1:])
        if self.dims == 2 and shape in ((1, 1, s, s), (1, s, s, s)):
            images = images[:, :, images.shape[2] // 2]
        expected = (1,) + (s,) * self.dims
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape (n, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        with self.autocast():
            return self.encoder(images.to(self.device).float(), self.schedule.last_level).float()
