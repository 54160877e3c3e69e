"""Options of the progressive growing GAN (``model.name: progressive``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ProgressiveConfig:
    dims: int = 3
    start_size: int = 4

    def problems(self) -> list[str]:
        return []


PRESETS: dict[str, dict[str, Any]] = {}
