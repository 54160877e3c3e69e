"""Options of the multi-scale patch-based GAN (``model.name: patch``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class PatchConfig:
    low_res_size: int = 64
    patch_size: int = 32

    def problems(self) -> list[str]:
        return []


PRESETS: dict[str, dict[str, Any]] = {}
