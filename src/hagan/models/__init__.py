"""Models that plug into the trainer; ``build_model`` picks one by ``model.name``.

Each entry names the class by import path, so a run imports only the model it trains (and
``import hagan.models`` imports no network at all).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..checks import short_repr
from ..errors import HaganError

if TYPE_CHECKING:
    from ..config import Config
    from .base import GenerativeModel

MODELS: dict[str, str] = {
    "hagan": "hagan.models.hagan.model:HAGAN",
    "patch": "hagan.models.patch.model:MultiScalePatchGAN",
    "progressive": "hagan.models.progressive.model:ProgressiveGAN",
    "wgan-gp": "hagan.models.baselines.model:WGANGP",
    "alpha-gan": "hagan.models.baselines.model:AlphaGAN",
    "vae-gan": "hagan.models.baselines.model:VAEGAN",
}


def model_class(name: str) -> type[GenerativeModel]:
    if name not in MODELS:
        raise HaganError(f"unknown model {short_repr(name)}; choose one of {', '.join(MODELS)}")
    module_name, class_name = MODELS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_model(config: Config) -> GenerativeModel:
    return model_class(config.model.name)(config)


__all__ = ["MODELS", "build_model", "model_class"]
