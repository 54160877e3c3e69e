"""The small interface through which every model plugs into the one trainer and the inference API."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from ..config import Config


class GenerativeModel(nn.Module, ABC):
    """A model owns its networks, optimizers and update rule; the trainer owns data, logging and checkpoints."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config

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

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def latent(self, n: int, rng: torch.Generator) -> Tensor:
        """Standard normal latents drawn on the CPU generator so a seed means the same on every device."""
        return torch.randn(n, self.config.model.latent_dim, generator=rng).to(self.device)
