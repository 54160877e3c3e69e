"""Hierarchical Amortized GAN: training on a random slab and the whole low-resolution image,
generating and encoding full volumes (Sun et al. 2022, sections III-B to III-E and IV-C)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import Config
from ...data.augment import AdaptiveAugmentStrength, diff_augment
from ...training.losses import (
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    latent_moment_penalty,
    r1_penalty,
)
from ..base import GenerativeModel, adam
from .networks import (
    CommonGenerator,
    GlobalEncoder,
    HighResDiscriminator,
    HighResGenerator,
    LowResDiscriminator,
    LowResGenerator,
    SlabEncoder,
)
from .tiling import tiled_high_res

SLABS_PER_VOLUME = 8
# from 512^3 on, G^H's last upsampled intermediate has more than 2^31 elements, past what CUDA kernels
# index (an H100 answers "invalid argument"), so inference there always runs over depth tiles
UNTILED_LIMIT = 512
LOW_RES_FACTOR = 4


EMA_MODULES = ("common", "low_gen", "high_gen")


@dataclass
class StepInputs:
    """What the four updates of one iteration share: the real batch, its slab and image, r, labels."""

    real: Tensor
    real_slab: Tensor
    real_low: Tensor | None
    start: int
    r: Tensor
    onehot: Tensor | None
    labels: Tensor | None
    aug_rng: torch.Generator


def reconstruction_l1(slab: Tensor, low: Tensor | None, real_slab: Tensor, real_low: Tensor | None) -> Tensor:
    """Eq. 7's L1 of the slab and of the low-resolution image, averaged (the slab alone without G^L)."""
    loss = F.l1_loss(slab.float(), real_slab.float())
    if low is not None:
        loss = (loss + F.l1_loss(low.float(), real_low.float())) / 2
    return loss


class HAGAN(GenerativeModel):
    supports_tiling = True

    def __init__(self, config: Config):
        super().__init__(config)
        m, h = config.model, config.hagan
        self.size = m.size
        self.num_classes = m.num_classes
        self.feature_depth = m.size // LOW_RES_FACTOR
        self.slab_features = self.feature_depth // SLABS_PER_VOLUME
        recompute = config.hagan.recompute_activations
        self.common = CommonGenerator(m.size, m.latent_dim, m.num_classes, m.width, upsample=h.upsample,
                                      recompute=recompute)
        features = self.common.out_channels
        self.high_gen = HighResGenerator(features, m.width, norm="channel" if h.consistent_slabs else "group",
                                         upsample=h.upsample, recompute=recompute)
        self.high_disc = HighResDiscriminator(m.size, m.num_classes, m.width, h.minibatch_std)
        self.low_gen = LowResGenerator(features, m.width) if h.low_res_branch else None
        self.low_disc = LowResDiscriminator(m.size, m.num_classes, m.width, h.minibatch_std) if h.low_res_branch else None
        self.slab_encoder = SlabEncoder(features, m.width) if h.encoder else None
        self.global_encoder = GlobalEncoder(m.size, features, m.latent_dim, m.width) if h.encoder else None
        self.ema = self._ema_copy() if config.hagan.ema_kimg > 0 else None
        self.sample_from_ema = True  # inference uses the averaged generator when there is one
        self.augment_strength = (
            AdaptiveAugmentStrength(target=config.hagan.ada_target, target_kimg=config.hagan.ada_kimg)
            if config.hagan.diffaug and config.hagan.ada_target > 0
            else None
        )
        self._optimizers: dict[str, torch.optim.Optimizer] | None = None
        self._last_r1: dict[str, Tensor | float] = {}
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
        if self.config.hagan.r_sampling == "deterministic":
            return (iteration % SLABS_PER_VOLUME) * self.slab_features
        return int(torch.randint(0, self.max_start + 1, (1,), generator=rng))

    def normalised_start(self, start: int) -> Tensor:
        return torch.full((1,), start / self.max_start, device=self.device)  # a fill, not a host-to-device copy

    def real_slab(self, volume: Tensor, start: int) -> Tensor:
        begin = start * LOW_RES_FACTOR
        return volume[:, :, begin : begin + self.slab_depth]

    @staticmethod
    def low_res(volume: Tensor) -> Tensor:
        """The real X^L: area averaging, which unlike the authors' nearest sampling does not alias."""
        return F.avg_pool3d(volume, LOW_RES_FACTOR)

    @property
    def input_voxels(self) -> tuple[int, int]:
        """Voxels of one D^H input (a slab) and of one D^L input (the low-resolution image)."""
        return self.slab_depth * self.size * self.size, (self.size // LOW_RES_FACTOR) ** 3

    # ----- networks ----------------------------------------------------------------------------
    def onehot(self, labels: Tensor | None, check: bool = True) -> Tensor | None:
        """One-hot class vectors; ``check=False`` skips the range check, which reads the labels back to the
        host (training does: the trainer checked every label of the data before the first iteration)."""
        if not self.num_classes:
            return None
        if labels is None:
            raise ValueError(f"this model is class-conditional ({self.num_classes} classes): pass class labels")
        labels = labels.to(self.device).long()
        if check and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class labels must lie in 0..{self.num_classes - 1}, got {labels.tolist()}")
        # a comparison, not F.one_hot, which on CPU reads the labels back to check them
        return (labels[:, None] == torch.arange(self.num_classes, device=self.device)).float()

    def generate_parts(self, z: Tensor, start: int, onehot: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Training-time generator: the slab at ``start`` and the whole low-resolution image.

        With ``hagan.consistent_slabs`` the slab is the one full generation gives (G^H over A's slab plus a
        halo, cropped); otherwise G^H runs on A's slab alone, as the paper and the authors' code.
        """
        features = self.common(z, onehot)
        if self.config.hagan.consistent_slabs:
            slab = self.high_gen.depth_range(features, start, self.slab_features)
        else:
            slab = self.high_gen(features[:, :, start : start + self.slab_features])
        low = self.low_gen(features) if self.low_gen is not None else None
        return slab, low

    def head_logits(
        self, slab: Tensor, low: Tensor | None, start_normalised: Tensor
    ) -> list[tuple[Tensor, Tensor | None, float]]:
        """(adversarial logit, class logits, weight) for each term of the adversarial loss.

        ``hagan.disc_losses: averaged`` gives one term, the D^H and D^L logits averaged as the authors' code
        does; ``separate`` one term per discriminator, weighted, as the paper's eq. 4-5 write them.
        """
        loss_cfg = self.config.hagan
        if loss_cfg.disc_losses != "separate" or self.low_disc is None or low is None:
            return [(*self.discriminate(slab, low, start_normalised), 1.0)]
        logit, cls = self.high_disc(slab, start_normalised)
        low_logit, low_cls = self.low_disc(low)
        return [(logit, cls, loss_cfg.weight_high), (low_logit, low_cls, loss_cfg.weight_low)]

    def discriminate(self, slab: Tensor, low: Tensor | None, start_normalised: Tensor) -> tuple[Tensor, Tensor | None]:
        """One logit per sample: D^H and D^L averaged, as the authors combine them; class logits likewise."""
        logit, cls = self.high_disc(slab, start_normalised)
        if self.low_disc is not None and low is not None:
            low_logit, low_cls = self.low_disc(low)
            logit = (logit + low_logit) / 2
            cls = (cls + low_cls) / 2 if cls is not None else None
        return logit, cls

    def augment(self, x: Tensor | None, rng: torch.Generator) -> Tensor | None:
        policy = self.config.hagan.diffaug
        if not policy or x is None:
            return x
        p = self.augment_strength.p if self.augment_strength is not None else self.config.hagan.diffaug_p
        return diff_augment(x, policy, generator=rng, probability=p)

    # ----- training ----------------------------------------------------------------------------
    @property
    def generator_modules(self) -> list[nn.Module]:
        return [m for m in (self.common, self.low_gen, self.high_gen) if m is not None]

    @property
    def parts(self) -> dict[str, nn.Module]:
        """The paper's seven modules (G^A, G^L, G^H, D^H, D^L, E^H, E^G), those this configuration has."""
        modules = {"G_A": self.common, "G_L": self.low_gen, "G_H": self.high_gen, "D_H": self.high_disc,
                   "D_L": self.low_disc, "E_H": self.slab_encoder, "E_G": self.global_encoder}
        return {name: module for name, module in modules.items() if module is not None}

    def memory_probes(self, batch_size: int) -> dict[str, Callable[[], object]]:
        """The forward passes of the two largest update steps on a zero batch: G's (a slab and the low
        resolution volume through both discriminators) and E^G's (the whole volume through E^H, then G)."""
        z = torch.zeros(batch_size, self.config.model.latent_dim, device=self.device)
        onehot = torch.zeros(batch_size, self.num_classes, device=self.device) if self.num_classes else None
        r = torch.zeros(1, device=self.device)

        def g_step() -> None:
            slab, low = self.generate_parts(z, self.max_start, onehot)
            self.discriminate(slab, low, r)

        def eg_step() -> None:
            real = torch.zeros(batch_size, 1, self.size, self.size, self.size, device=self.device)
            self.generate_parts(self.global_encoder(self.encode_slabs(real)), self.max_start, onehot)

        return {"G": g_step, "E_G": eg_step} if self.global_encoder is not None else {"G": g_step}

    def generation_probe(self, n: int) -> Callable[[], object]:
        """G^H on G^A's features for ``n`` zero codes: the untiled whole-volume pass, the one to plan for."""
        z = torch.zeros(n, self.config.model.latent_dim, device=self.device)
        onehot = torch.zeros(n, self.num_classes, device=self.device) if self.num_classes else None
        return lambda: self.high_gen(self.common(z, onehot))

    @property
    def trained_modules(self) -> list[nn.Module]:
        """Every module an optimizer updates (the averaged generator is not one of them)."""
        return list(self.parts.values())

    def train_only(self, *modules: nn.Module | None) -> None:
        """Let gradients reach ``modules`` alone, so a step's backward pass builds nothing for the rest."""
        for module in self.trained_modules:
            module.requires_grad_(any(module is m for m in modules))

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self._optimizers is None:
            o = self.config.optim
            betas = (o.beta1, o.beta2)

            def of(modules: list[nn.Module | None], lr: float) -> torch.optim.Optimizer:
                return adam([p for module in modules if module is not None for p in module.parameters()], lr, betas)

            self._optimizers = {
                "G": of([self.common, self.low_gen, self.high_gen], o.lr_g),
                "D": of([self.high_disc, self.low_disc], o.lr_d),
            }
            if self.slab_encoder is not None:
                self._optimizers["E_H"] = of([self.slab_encoder], o.lr_e)
                self._optimizers["E_G"] = of([self.global_encoder], o.lr_e)
        return self._optimizers

    def train_step(self, batch: dict[str, Tensor], iteration: int, rng: torch.Generator) -> dict[str, Tensor | float]:
        """One iteration in the authors' order of phases, each updating only its own module; then the averaged
        generator follows G. The scalars stay on the device (the trainer reads them when it logs), so an
        iteration waits on the host only for its slab start and, every few, for ADA."""
        step = self.step_inputs(batch, iteration, rng)
        logs = self._discriminator_phase(step, iteration, rng)
        logs.update(self._generator_phase(step, rng))
        if self.slab_encoder is not None:
            logs.update(self._slab_encoder_phase(step))
            logs.update(self._global_encoder_phase(step))
        self.update_ema(iteration)
        self.train_only(*self.trained_modules)
        return logs

    def step_inputs(self, batch: dict[str, Tensor], iteration: int, rng: torch.Generator) -> StepInputs:
        """The iteration's real batch, its slab at a newly drawn start r and its X^L, which all four phases use."""
        loss_cfg = self.config.hagan
        real = batch["image"].to(self.device, memory_format=self.memory_format, non_blocking=True)
        onehot = self.onehot(batch["label"], check=False) if self.num_classes else None
        labels = batch["label"].to(self.device) if self.num_classes else None
        start = self.sample_start(iteration, rng)
        real_slab = self.real_slab(real, start)
        real_low = self.low_res(real) if self.low_gen is not None else None
        aug_rng = self.step_generator(rng) if (loss_cfg.diffaug or loss_cfg.loss == "wgan-gp") else rng
        return StepInputs(real, real_slab, real_low, start, self.normalised_start(start), onehot, labels, aug_rng)

    def _discriminator_phase(self, step: StepInputs, iteration: int, rng: torch.Generator) -> dict[str, Tensor | float]:
        """D^H and D^L minimise the adversarial loss, real against generated, plus penalties and the class loss."""
        loss_cfg = self.config.hagan
        self.train_only(self.high_disc, self.low_disc)
        logs: dict[str, Tensor | float] = {}
        with torch.no_grad(), self.autocast():
            fake_slab, fake_low = self.generate_parts(self.train_latent(step.real.shape[0], rng), step.start, step.onehot)
        aug_real = (self.augment(step.real_slab, step.aug_rng), self.augment(step.real_low, step.aug_rng))
        aug_fake = (self.augment(fake_slab, step.aug_rng), self.augment(fake_low, step.aug_rng))
        with self.autocast():
            real_heads = self.head_logits(*aug_real, step.r)
            fake_heads = self.head_logits(*aug_fake, step.r)
        d_loss = sum(w * discriminator_loss(loss_cfg.loss, real, fake)
                     for (real, _, w), (fake, _, _) in zip(real_heads, fake_heads))
        logs["loss/D_adv"] = d_loss.detach()
        d_loss = d_loss + self.penalties(aug_real, aug_fake, step, iteration, logs)
        if step.labels is not None:
            # weight 1, as in the authors' code: on real volumes only (a generated volume's class is what G is
            # still learning), this term is all that trains D's class heads, so it is not scaled down
            d_cls = sum(w * F.cross_entropy(cls.float(), step.labels) for _, cls, w in real_heads)
            d_loss = d_loss + d_cls
            logs["loss/D_class"] = d_cls.detach()
        logs["loss/D"] = self.update("D", d_loss)
        real_logit = torch.stack([h[0].detach().float() for h in real_heads]).mean(0)
        logs["D/real_logit"] = real_logit.mean()
        logs["D/fake_logit"] = torch.stack([h[0].detach().float() for h in fake_heads]).mean()
        if self.augment_strength is not None:
            # ADA's feedback sees the logits of the whole global batch, so p stays the same on all ranks
            logs["aug/p"] = self.augment_strength.update(self.dist.all_gather_cat(real_logit))
        return logs

    def penalties(
        self, aug_real: tuple[Tensor, Tensor | None], aug_fake: tuple[Tensor, Tensor | None], step: "StepInputs",
        iteration: int, logs: dict[str, Tensor | float],
    ) -> Tensor:
        """WGAN-GP and R1 on each adversarial term's own inputs, in float32 whatever the training precision."""
        loss_cfg = self.config.hagan
        total = torch.zeros((), device=self.device)
        use_r1 = (loss_cfg.r1_gamma > 0 or loss_cfg.r1_per_voxel > 0) and iteration % loss_cfg.r1_every == 0
        for name, critic, inputs, weight, voxels in self.critics(aug_real, aug_fake, step.r):
            reals, fakes = inputs
            if loss_cfg.loss == "wgan-gp":
                gp = gradient_penalty(critic, reals, fakes, step.aug_rng)
                total = total + weight * loss_cfg.gp_lambda * gp
                logs[f"loss/D_gp{name}"] = gp.detach()
            if use_r1:
                gamma = loss_cfg.r1_gamma or loss_cfg.r1_per_voxel * voxels / self.config.optim.batch_size
                r1 = r1_penalty(critic, reals)
                # lazy regularisation: applied every r1_every steps, scaled so its average weight is unchanged
                total = total + weight * gamma / 2 * r1 * loss_cfg.r1_every
                self._last_r1[f"loss/D_r1{name}"] = r1.detach()
        logs.update(self._last_r1)  # a lazy R1's latest value, so that every logged iteration shows it
        return total

    def critics(self, aug_real: tuple[Tensor, Tensor | None], aug_fake: tuple[Tensor, Tensor | None], r: Tensor):
        """(log suffix, critic, (real inputs, fake inputs), weight, voxels per item) per adversarial term."""
        def joint(*xs: Tensor) -> Tensor:
            return self.discriminate(xs[0], xs[1] if len(xs) > 1 else None, r)[0].float()

        def high(slab: Tensor) -> Tensor:
            return self.high_disc(slab, r)[0].float()

        def low(image: Tensor) -> Tensor:
            return self.low_disc(image)[0].float()

        slab_voxels, low_voxels = self.input_voxels
        if self.low_disc is None:
            return [("", high, ([aug_real[0]], [aug_fake[0]]), 1.0, slab_voxels)]
        if self.config.hagan.disc_losses == "separate":
            w_high, w_low = self.config.hagan.weight_high, self.config.hagan.weight_low
            return [("_high", high, ([aug_real[0]], [aug_fake[0]]), w_high, slab_voxels),
                    ("_low", low, ([aug_real[1]], [aug_fake[1]]), w_low, low_voxels)]
        return [("", joint, (list(aug_real), list(aug_fake)), 1.0, slab_voxels + low_voxels)]

    def _generator_phase(self, step: StepInputs, rng: torch.Generator) -> dict[str, Tensor | float]:
        """G^A, G^L and G^H minimise the adversarial loss on a new z (same r), the class loss and the reconstruction."""
        loss_cfg = self.config.hagan
        self.train_only(*self.generator_modules)
        logs: dict[str, Tensor | float] = {}
        with self.autocast():
            fake_slab, fake_low = self.generate_parts(self.train_latent(step.real.shape[0], rng), step.start, step.onehot)
            heads = self.head_logits(self.augment(fake_slab, step.aug_rng), self.augment(fake_low, step.aug_rng), step.r)
        g_loss = sum(w * generator_loss(loss_cfg.loss, logit) for logit, _, w in heads)
        logs["loss/G_adv"] = g_loss.detach()
        if step.labels is not None:
            # lambda_class, not D's weight 1: for G the class term competes with the adversarial one (being
            # classified as the requested class against looking real), and lambda_class sets that balance
            g_cls = sum(w * F.cross_entropy(cls.float(), step.labels) for _, cls, w in heads)
            g_loss = g_loss + loss_cfg.lambda_class * g_cls
            logs["loss/G_class"] = g_cls.detach()
        if loss_cfg.lambda_recon_generator > 0:
            # regenerate the real batch from its codes through the frozen encoders
            with torch.no_grad(), self.autocast():
                codes = self.global_encoder(self.encode_slabs(step.real))
            with self.autocast():
                slab_rec, low_rec = self.generate_parts(codes, step.start, step.onehot)
            g_rec = reconstruction_l1(slab_rec, low_rec, step.real_slab, step.real_low)
            g_loss = g_loss + loss_cfg.lambda_recon_generator * g_rec
            logs["loss/G_recon"] = g_rec.detach()
        self.update("G", g_loss)
        return logs

    def _slab_encoder_phase(self, step: StepInputs) -> dict[str, Tensor | float]:
        """E^H minimises the L1 between the real slab and its reconstruction through frozen G^H (eq. 6)."""
        self.train_only(self.slab_encoder)
        with self.autocast():
            slab_rec = self.high_gen(self.slab_encoder(step.real_slab))
        e_h = F.l1_loss(slab_rec.float(), step.real_slab.float())
        self.update("E_H", self.config.hagan.lambda_recon_slab * e_h)
        return {"loss/E_H": e_h.detach()}

    def _global_encoder_phase(self, step: StepInputs) -> dict[str, Tensor | float]:
        """E^G minimises eq. 7's L1 of the slab and X^L regenerated through frozen E^H and G, plus the prior term."""
        loss_cfg = self.config.hagan
        self.train_only(self.global_encoder)
        with self.autocast():
            with torch.no_grad():
                slab_features = self.encode_slabs(step.real)
            z_hat = self.global_encoder(slab_features)
            slab_rec, low_rec = self.generate_parts(z_hat, step.start, step.onehot)
        e_g = reconstruction_l1(slab_rec, low_rec, step.real_slab, step.real_low)
        e_g_loss = loss_cfg.lambda_recon_global * e_g
        logs: dict[str, Tensor | float] = {"loss/E_G": e_g.detach()}
        if loss_cfg.lambda_latent_prior > 0:
            # keeps the codes on the prior N(0, I) that G samples from
            prior = latent_moment_penalty(z_hat)
            e_g_loss = e_g_loss + loss_cfg.lambda_latent_prior * prior
            logs["loss/E_G_prior"] = prior.detach()
        self.update("E_G", e_g_loss)
        return logs

    def encoder_steps(
        self, real: Tensor, real_slab: Tensor, real_low: Tensor | None, start: int, onehot: Tensor | None
    ) -> dict[str, Tensor | float]:
        """E^H's phase then E^G's on one batch: the encoders' half of an iteration, for training them alone."""
        r = self.normalised_start(start)
        step = StepInputs(real, real_slab, real_low, start, r, onehot, None, torch.Generator())
        return {**self._slab_encoder_phase(step), **self._global_encoder_phase(step)}

    # ----- exponential moving average of G ---------------------------------------------------------
    def _ema_copy(self) -> nn.ModuleDict:
        modules = {name: copy.deepcopy(getattr(self, name)) for name in EMA_MODULES if getattr(self, name) is not None}
        ema = nn.ModuleDict(modules)
        ema.requires_grad_(False)
        return ema

    def ema_beta(self, iteration: int) -> float:
        """Decay per update for a half-life of ``hagan.ema_kimg`` thousand images, shortened early in
        training to ``hagan.ema_rampup`` of the images seen so far (StyleGAN2-ADA's ramp-up)."""
        t, batch = self.config.hagan, self.config.optim.batch_size
        half_life = t.ema_kimg * 1000
        if t.ema_rampup > 0:
            half_life = min(half_life, (iteration + 1) * batch * t.ema_rampup)
        return 0.5 ** (batch / max(half_life, 1e-8))

    @torch.no_grad()
    def update_ema(self, iteration: int) -> None:
        if self.ema is None:
            return
        beta = self.ema_beta(iteration)
        for name, averaged in self.ema.items():
            source = getattr(self, name)
            torch._foreach_lerp_(list(averaged.parameters()), list(source.parameters()), 1 - beta)
            for b_avg, b in zip(averaged.buffers(), source.buffers()):
                b_avg.copy_(b)

    def inference_generator(self) -> tuple[nn.Module, nn.Module | None, nn.Module]:
        """(G^A, G^L, G^H) that sampling uses: the averaged ones when the run keeps them, unless
        ``sample_from_ema`` was switched off to look at the raw weights."""
        if self.ema is not None and self.sample_from_ema:
            return self.ema["common"], self.ema["low_gen"] if "low_gen" in self.ema else None, self.ema["high_gen"]
        return self.common, self.low_gen, self.high_gen

    @torch.no_grad()
    def slab_mismatch(self, z: Tensor, labels: Tensor | None = None) -> float:
        """Mean |training slab - the same slab of the full volume| over every start, in [-1, 1] units:
        0 when G^H is trained on what inference produces (raw weights, float32)."""
        onehot = self.onehot(labels)
        full = self.high_gen(self.common(z.to(self.device), onehot)).float()
        errors = []
        for start in range(self.max_start + 1):
            slab, _ = self.generate_parts(z.to(self.device), start, onehot)
            errors.append(float((slab.float() - self.real_slab(full, start)).abs().mean()))
        return sum(errors) / len(errors)

    def compiled_modules(self) -> list[nn.Module]:
        """R1 and WGAN-GP differentiate the discriminators twice, which compiled graphs do not support."""
        h = self.config.hagan
        twice = h.r1_gamma > 0 or h.r1_per_voxel > 0 or h.loss == "wgan-gp"
        modules = [self.common, self.low_gen, self.high_gen, self.slab_encoder, self.global_encoder]
        if not twice:
            modules += [self.high_disc, self.low_disc]
        return [m for m in modules if m is not None]

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"last_r1": {k: float(v) for k, v in self._last_r1.items()}} if self._last_r1 else {}
        if self.augment_strength is not None:
            state["augment"] = self.augment_strength.state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.augment_strength is not None and "augment" in state:
            self.augment_strength.load_state_dict(state["augment"])
        self._last_r1 = dict(state.get("last_r1", {}))

    # ----- inference ---------------------------------------------------------------------------
    @property
    def keeps_moving_average(self) -> bool:
        return self.ema is not None

    @torch.no_grad()
    def decode(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Full volumes from latents: the complete A goes through G^H, as the paper's inference."""
        common, _, high_gen = self.inference_generator()
        with self.autocast():
            features = common(z.to(self.device), self.onehot(labels))
            if self.tile_depth or self.size >= UNTILED_LIMIT:
                return tiled_high_res(high_gen, features, self.tile_depth or self.slab_features).float()
            return high_gen(features).float()

    @torch.no_grad()
    def decode_low_res(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        common, low_gen, _ = self.inference_generator()
        if low_gen is None:
            raise ValueError("this model was trained without the low-resolution branch")
        with self.autocast():
            return low_gen(common(z.to(self.device), self.onehot(labels))).float()

    def decode_bytes(self) -> int:
        """Working memory of decoding one volume, for choosing a batch, per output voxel and G^H channel as
        measured on an H100: 10 bytes untiled (5.2 GB at 256^3), where G^H's full-size intermediates
        dominate, and 2 bytes tiled (7.9 GB at 512^3), which keeps the half-size buffer and the result."""
        _, _, high_gen = self.inference_generator()
        channels = high_gen.body[1][0].out_channels
        per_voxel = 2 if self.tile_depth or self.size >= UNTILED_LIMIT else 10
        return per_voxel * channels * self.size**3

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
            raise ValueError("this model was trained without encoders (hagan.encoder: false)")
        expected = (1, self.size, self.size, self.size)
        if tuple(volumes.shape[1:]) != expected:
            raise ValueError(f"volumes must have shape (n, {', '.join(map(str, expected))}), got {tuple(volumes.shape)}")
        with self.autocast():
            return self.global_encoder(self.encode_slabs(volumes.to(self.device))).float()
