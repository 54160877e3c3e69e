"""Options of the 3D baselines of HA-GAN's paper (``model.name: wgan-gp | alpha-gan | vae-gan``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class BaselineConfig:
    lambda_recon: float = 10.0

    def problems(self) -> list[str]:
        return []


PRESETS: dict[str, dict[str, Any]] = {}
