"""Hierarchical Amortized GAN: training on a random slab and the whole low-resolution image,
generating and encoding full volumes (Sun et al. 2022, sections III-B to III-E and IV-C)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..augment import AdaptiveAugmentStrength, diff_augment
from ..config import Config
from ..losses import discriminator_loss, generator_loss, gradient_penalty, r1_penalty
from .base import GenerativeModel
from .tiling import tiled_high_res
from .networks import (
    CommonGenerator,
    GlobalEncoder,
    HighResDiscriminator,
    HighResGenerator,
    LowResDiscriminator,
    LowResGenerator,
    SlabEncoder,
)

SLABS_PER_VOLUME = 8
# from 512^3 on, G^H's last upsampled intermediate has more than 2^31 elements, past what CUDA kernels
# index (an H100 answers "invalid argument"), so inference there always runs over depth tiles
UNTILED_LIMIT = 512
LOW_RES_FACTOR = 4


def module_groups(model: "HAGAN") -> dict[str, nn.Module]:
    """The paper's seven modules by their names (the keys of ``hagan summary``)."""
    names = {"G_A": "common", "G_L": "low_gen", "G_H": "high_gen", "D_H": "high_disc", "D_L": "low_disc",
             "E_H": "slab_encoder", "E_G": "global_encoder"}
    return {key: getattr(model, attr) for key, attr in names.items() if getattr(model, attr, None) is not None}


class HAGAN(GenerativeModel):
    def __init__(self, config: Config):
        super().__init__(config)
        m = config.model
        self.size = m.size
        self.num_classes = m.num_classes
        self.feature_depth = m.size // LOW_RES_FACTOR
        self.slab_features = self.feature_depth // SLABS_PER_VOLUME
        self.common = CommonGenerator(m.size, m.latent_dim, m.num_classes, m.width)
        features = self.common.out_channels
        self.high_gen = HighResGenerator(features, m.width)
        self.high_disc = HighResDiscriminator(m.size, m.num_classes, m.width, m.minibatch_std)
        self.low_gen = LowResGenerator(features, m.width) if m.low_res_branch else None
        self.low_disc = LowResDiscriminator(m.size, m.num_classes, m.width, m.minibatch_std) if m.low_res_branch else None
        self.slab_encoder = SlabEncoder(features, m.width) if m.encoder else None
        self.global_encoder = GlobalEncoder(m.size, features, m.latent_dim, m.width) if m.encoder else None
        self.augment_strength = (
            AdaptiveAugmentStrength(target=config.loss.ada_target, target_kimg=config.loss.ada_kimg)
            if config.loss.diffaug and config.loss.ada_target > 0
            else None
        )
        self._optimizers: dict[str, torch.optim.Optimizer] | None = None
        self.tile_depth = 0  # feature slices per G^H tile at inference (0: whole volume at once, except 512^3)

    # ----- geometry of slabs ---------------------------------------------------------------------
    @property
    def slab_depth(self) -> int:
        return self.size // SLABS_PER_VOLUME

    @property
    def max_start(self) -> int:
        """Largest slab start in feature slices; the high-resolution start is 4x this (224 at 256^3)."""
        return self.feature_depth - self.slab_features

    def sample_start(self, iteration: int, rng: torch.Generator) -> int:
        """One start r per batch, in feature slices, so the real slab and G^H's output line up exactly."""
        if self.config.model.r_sampling == "deterministic":
            return (iteration % SLABS_PER_VOLUME) * self.slab_features
        return int(torch.randint(0, self.max_start + 1, (1,), generator=rng))

    def normalised_start(self, start: int) -> Tensor:
        return torch.tensor([start / self.max_start], device=self.device)

    def real_slab(self, volume: Tensor, start: int) -> Tensor:
        begin = start * LOW_RES_FACTOR
        return volume[:, :, begin : begin + self.slab_depth]

    @staticmethod
    def low_res(volume: Tensor) -> Tensor:
        """The real X^L: area averaging, which unlike the authors' nearest sampling does not alias."""
        return F.avg_pool3d(volume, LOW_RES_FACTOR)

    # ----- networks ----------------------------------------------------------------------------
    def onehot(self, labels: Tensor | None) -> Tensor | None:
        if not self.num_classes:
            return None
        if labels is None:
            raise ValueError(f"this model is class-conditional ({self.num_classes} classes): pass class labels")
        labels = labels.to(self.device).long()
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"class labels must lie in 0..{self.num_classes - 1}, got {labels.tolist()}")
        return F.one_hot(labels, self.num_classes).float()

    def generate_parts(self, z: Tensor, start: int, onehot: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Training-time generator: the slab at ``start`` and the whole low-resolution image."""
        features = self.common(z, onehot)
        slab = self.high_gen(features[:, :, start : start + self.slab_features])
        low = self.low_gen(features) if self.low_gen is not None else None
        return slab, low

    def discriminate(self, slab: Tensor, low: Tensor | None, start_normalised: Tensor) -> tuple[Tensor, Tensor | None]:
        """One logit per sample: D^H and D^L averaged, as the authors combine them; class logits likewise."""
        logit, cls = self.high_disc(slab, start_normalised)
        if self.low_disc is not None and low is not None:
            low_logit, low_cls = self.low_disc(low)
            logit = (logit + low_logit) / 2
            cls = (cls + low_cls) / 2 if cls is not None else None
        return logit, cls

    def augment(self, x: Tensor | None, rng: torch.Generator) -> Tensor | None:
        policy = self.config.loss.diffaug
        if not policy or x is None:
            return x
        p = self.augment_strength.p if self.augment_strength is not None else self.config.loss.diffaug_p
        return diff_augment(x, policy, generator=rng, probability=p)

    # ----- training ----------------------------------------------------------------------------
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self._optimizers is None:
            o = self.config.optim
            betas = (o.beta1, o.beta2)

            def adam(modules: list[nn.Module | None], lr: float) -> torch.optim.Optimizer:
                params = [p for module in modules if module is not None for p in module.parameters()]
                fused = self.device.type == "cuda"  # one kernel for all parameters instead of several per tensor
                return torch.optim.Adam(params, lr=lr, betas=betas, eps=1e-8, fused=fused)

            self._optimizers = {
                "G": adam([self.common, self.low_gen, self.high_gen], o.lr_g),
                "D": adam([self.high_disc, self.low_disc], o.lr_d),
            }
            if self.slab_encoder is not None:
                self._optimizers["E_H"] = adam([self.slab_encoder], o.lr_e)
                self._optimizers["E_G"] = adam([self.global_encoder], o.lr_e)
        return self._optimizers

    def train_step(self, batch: dict[str, Tensor], iteration: int, rng: torch.Generator) -> dict[str, float]:
        """The authors' order: D step, G step, E^H step, E^G step, each updating only its own module."""
        loss_cfg = self.config.loss
        real = batch["image"].to(self.device, memory_format=self.memory_format, non_blocking=True)
        onehot = self.onehot(batch["label"]) if self.num_classes else None
        labels = batch["label"].to(self.device) if self.num_classes else None
        b = real.shape[0]
        start = self.sample_start(iteration, rng)
        r = self.normalised_start(start)
        real_slab = self.real_slab(real, start)
        real_low = self.low_res(real) if self.low_gen is not None else None
        logs: dict[str, float] = {}
        aug_rng = self.step_generator(rng) if (loss_cfg.diffaug or loss_cfg.kind == "wgan-gp") else rng

        # D step
        self.requires_grad_(False)
        for module in (self.high_disc, self.low_disc):
            if module is not None:
                module.requires_grad_(True)
        with torch.no_grad(), self.autocast():
            fake_slab, fake_low = self.generate_parts(self.train_latent(b, rng), start, onehot)
        aug_real = (self.augment(real_slab, aug_rng), self.augment(real_low, aug_rng))
        aug_fake = (self.augment(fake_slab, aug_rng), self.augment(fake_low, aug_rng))
        with self.autocast():
            real_logit, real_cls = self.discriminate(*aug_real, r)
            fake_logit, _ = self.discriminate(*aug_fake, r)
        d_loss = discriminator_loss(loss_cfg.kind, real_logit, fake_logit)
        logs["loss/D_adv"] = float(d_loss.detach())
        inputs_real = [x for x in aug_real if x is not None]
        inputs_fake = [x for x in aug_fake if x is not None]

        def critic(*xs: Tensor) -> Tensor:
            with self.autocast():
                return self.discriminate(xs[0], xs[1] if len(xs) > 1 else None, r)[0].float()

        if loss_cfg.kind == "wgan-gp":
            gp = gradient_penalty(critic, inputs_real, inputs_fake, aug_rng)
            d_loss = d_loss + loss_cfg.gp_lambda * gp
            logs["loss/D_gp"] = float(gp.detach())
        if loss_cfg.r1_gamma > 0:
            r1 = r1_penalty(critic, inputs_real)
            d_loss = d_loss + loss_cfg.r1_gamma / 2 * r1
            logs["loss/D_r1"] = float(r1.detach())
        if real_cls is not None:
            d_cls = F.cross_entropy(real_cls.float(), labels)
            d_loss = d_loss + d_cls
            logs["loss/D_class"] = float(d_cls.detach())
        logs["loss/D"] = self.update("D", d_loss)
        logs["D/real_logit"] = float(real_logit.detach().mean())
        logs["D/fake_logit"] = float(fake_logit.detach().mean())
        if self.augment_strength is not None:
            # ADA's feedback sees the logits of the whole global batch, so p stays the same on all ranks
            logs["aug/p"] = self.augment_strength.update(self.dist.all_gather_cat(real_logit.detach()))

        # G step: a new z, the same r
        self.requires_grad_(False)
        for module in (self.common, self.low_gen, self.high_gen):
            if module is not None:
                module.requires_grad_(True)
        with self.autocast():
            fake_slab, fake_low = self.generate_parts(self.train_latent(b, rng), start, onehot)
            fake_logit, fake_cls = self.discriminate(
                self.augment(fake_slab, aug_rng), self.augment(fake_low, aug_rng), r
            )
        g_loss = generator_loss(loss_cfg.kind, fake_logit)
        logs["loss/G_adv"] = float(g_loss.detach())
        if fake_cls is not None:
            g_cls = F.cross_entropy(fake_cls.float(), labels)
            g_loss = g_loss + loss_cfg.lambda_class * g_cls
            logs["loss/G_class"] = float(g_cls.detach())
        self.update("G", g_loss)

        if self.slab_encoder is not None:
            logs.update(self.encoder_steps(real, real_slab, real_low, start, onehot))
        self.requires_grad_(True)
        return logs

    def encoder_steps(
        self, real: Tensor, real_slab: Tensor, real_low: Tensor | None, start: int, onehot: Tensor | None
    ) -> dict[str, float]:
        """E^H reconstructs the slab through frozen G^H (eq. 6); E^G the slab and X^L through frozen G (eq. 7)."""
        loss_cfg = self.config.loss
        self.requires_grad_(False)
        self.slab_encoder.requires_grad_(True)
        with self.autocast():
            slab_rec = self.high_gen(self.slab_encoder(real_slab))
        e_h = F.l1_loss(slab_rec.float(), real_slab.float())
        self.update("E_H", loss_cfg.lambda_recon_slab * e_h)

        self.slab_encoder.requires_grad_(False)
        self.global_encoder.requires_grad_(True)
        with self.autocast():
            with torch.no_grad():
                slab_features = self.encode_slabs(real)
            z_hat = self.global_encoder(slab_features)
            slab_rec, low_rec = self.generate_parts(z_hat, start, onehot)
        e_g = F.l1_loss(slab_rec.float(), real_slab.float())
        if low_rec is not None:
            e_g = (e_g + F.l1_loss(low_rec.float(), real_low.float())) / 2
        self.update("E_G", loss_cfg.lambda_recon_global * e_g)
        return {"loss/E_H": float(e_h.detach()), "loss/E_G": float(e_g.detach())}

    def compiled_modules(self) -> list[nn.Module]:
        """R1 and WGAN-GP differentiate the discriminators twice, which compiled graphs do not support."""
        twice = self.config.loss.r1_gamma > 0 or self.config.loss.kind == "wgan-gp"
        modules = [self.common, self.low_gen, self.high_gen, self.slab_encoder, self.global_encoder]
        if not twice:
            modules += [self.high_disc, self.low_disc]
        return [m for m in modules if m is not None]

    def extra_state(self) -> dict[str, Any]:
        return {"augment": self.augment_strength.state_dict()} if self.augment_strength is not None else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.augment_strength is not None and "augment" in state:
            self.augment_strength.load_state_dict(state["augment"])

    # ----- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Full volumes from latents: the complete A goes through G^H, as the paper's inference."""
        with self.autocast():
            features = self.common(z.to(self.device), self.onehot(labels))
            if self.tile_depth or self.size >= UNTILED_LIMIT:
                return tiled_high_res(self.high_gen, features, self.tile_depth or self.slab_features).float()
            return self.high_gen(features).float()

    @torch.no_grad()
    def decode_low_res(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.low_gen is None:
            raise ValueError("this model was trained without the low-resolution branch")
        with self.autocast():
            return self.low_gen(self.common(z.to(self.device), self.onehot(labels))).float()

    def sample(self, n: int, rng: torch.Generator, labels: Tensor | None = None) -> Tensor:
        return self.decode(self.latent(n, rng), labels)

    def encode_slabs(self, volumes: Tensor) -> Tensor:
        """E^H over all eight non-overlapping slabs in one batched call, concatenated along depth into A-hat."""
        b, s = volumes.shape[0], self.size
        slabs = volumes.reshape(b * SLABS_PER_VOLUME, 1, self.slab_depth, s, s)
        features = self.slab_encoder(slabs)
        _, c, d, h, w = features.shape
        return features.reshape(b, SLABS_PER_VOLUME, c, d, h, w).transpose(1, 2).reshape(b, c, d * SLABS_PER_VOLUME, h, w)

    @torch.no_grad()
    def encode(self, volumes: Tensor) -> Tensor:
        """Latent codes Z-hat of full volumes (n, 1, S, S, S)."""
        if self.slab_encoder is None:
            raise ValueError("this model was trained without encoders (model.encoder: false)")
        expected = (1, self.size, self.size, self.size)
        if tuple(volumes.shape[1:]) != expected:
            raise ValueError(f"volumes must have shape (n, {', '.join(map(str, expected))}), got {tuple(volumes.shape)}")
        with self.autocast():
            return self.global_encoder(self.encode_slabs(volumes.to(self.device))).float()
