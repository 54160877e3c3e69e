"""The small interface through which every model plugs into the one trainer and the inference API."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from .. import accel
from ..config import Config
from ..distributed import DistContext, sync_gradients
from ..errors import HaganError


class DivergenceError(HaganError):
    """A loss or a gradient became NaN or Inf; the optimizer step was not taken."""

    def __init__(self, step: str | None, loss: float, where: str, name: str | None = None):
        self.step, self.loss, self.where = step, loss, where
        self.name = name or f"loss/{step}"
        self.iteration: int | None = None
        super().__init__(self.describe())

    def describe(self) -> str:
        """E.g. ``training diverged at iteration 12: non-finite gradient in the D step (loss/D = 0.71)``."""
        at = f" at iteration {self.iteration}" if self.iteration is not None else ""
        step = f" in the {self.step} step" if self.step else ""
        return f"training diverged{at}: {self.where}{step} ({self.name} = {self.loss})"


class GenerativeModel(nn.Module, ABC):
    """A model owns its networks, optimizers and update rule; the trainer owns data, logging and checkpoints."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.dist = DistContext()  # the trainer sets the real one under torchrun

    @abstractmethod
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Named optimizers, saved and restored with the checkpoint."""

    @abstractmethod
    def train_step(self, batch: dict[str, Tensor], iteration: int, rng: torch.Generator) -> dict[str, float]:
        """One full training iteration; returns the scalars to log."""

    @abstractmethod
    def sample(self, n: int, rng: torch.Generator, labels: Tensor | None = None) -> Tensor:
        """``n`` full-resolution volumes (n, 1, S, S, S) in [-1, 1]."""

    def extra_state(self) -> dict[str, Any]:
        """Scalars besides weights that a resumed run needs (e.g. an adaptive augmentation strength)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` returned."""

    def update(self, name: str, loss: Tensor) -> float:
        """One optimizer step: zero_grad, backward, average gradients over ranks, check, step.

        All four of HA-GAN's updates go through here, so data-parallel training has DDP's semantics
        (gradients averaged over ranks before the step) even with double backward, and NaN or Inf in
        the loss or a gradient raises :class:`DivergenceError` before the weights are touched.
        Returns the loss averaged over ranks.
        """
        optimizer = self.optimizers()[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        value, loss_finite, grads_finite = sync_gradients(self.dist, params, loss)
        if not loss_finite:
            raise DivergenceError(name, value, "non-finite loss")
        if not grads_finite:
            raise DivergenceError(name, value, "non-finite gradient")
        optimizer.step()
        return value

    def train_latent(self, n: int, rng: torch.Generator) -> Tensor:
        """Latents for this rank's ``n`` items: the global batch's latents are drawn on every rank and
        each takes its own shard, so k ranks of batch n see the noise one process of batch k*n would."""
        world, rank = self.dist.world_size, self.dist.rank
        z = torch.randn(n * world, self.config.model.latent_dim, generator=rng)
        return z[rank * n : (rank + 1) * n].to(self.device)

    def step_generator(self, rng: torch.Generator) -> torch.Generator:
        """The stream for per-sample draws of local size (DiffAugment, WGAN-GP mixing): the shared
        ``rng`` with one process; under torchrun a per-rank stream seeded from one shared draw, so ranks
        augment their items independently while ``rng`` stays identical on all ranks."""
        if not self.dist.enabled:
            return rng
        seed = int(torch.randint(0, 2**62, (1,), generator=rng))
        return torch.Generator().manual_seed(seed + 7919 * self.dist.rank)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def precision(self) -> str:
        """``fp32`` or ``bf16``: ``train.precision`` resolved for the device the model is on."""
        return accel.resolve_precision(self.config.train.precision, self.device)

    def autocast(self):
        """The context every forward pass of training and inference runs in."""
        return accel.autocast(self.device, self.precision)

    @property
    def memory_format(self) -> torch.memory_format:
        channels_last = self.config.train.channels_last and self.device.type == "cuda"
        return torch.channels_last_3d if channels_last else torch.contiguous_format

    def accelerate(self) -> "GenerativeModel":
        """Apply ``train.channels_last`` and ``train.compile`` once the model is on its device."""
        if self.memory_format == torch.channels_last_3d:
            self.to(memory_format=torch.channels_last_3d)
        if self.config.train.compile:
            for module in self.compiled_modules():
                module.compile()
        return self

    def compiled_modules(self) -> list[nn.Module]:
        """The networks ``train.compile`` compiles (those never differentiated twice)."""
        return list(self.children())

    def latent(self, n: int, rng: torch.Generator) -> Tensor:
        """Standard normal latents drawn on the CPU generator so a seed means the same on every device."""
        return torch.randn(n, self.config.model.latent_dim, generator=rng).to(self.device)
