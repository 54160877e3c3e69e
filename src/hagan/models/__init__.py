"""Models that plug into the trainer; ``build_model`` picks one by ``model.name``.

Each entry names the class by import path, so a run imports only the model it trains.
"""

from __future__ import annotations

import importlib

from ..checks import short_repr
from ..config import Config
from ..errors import HaganError
from .base import GenerativeModel
from .hagan import HAGAN

MODELS: dict[str, str] = {
    "hagan": "hagan.models.hagan:HAGAN",
    "patch": "hagan.models.patchgan:MultiScalePatchGAN",
    "progressive": "hagan.models.progressive:ProgressiveGAN",
    "wgan-gp": "hagan.models.baselines:WGANGP",
    "alpha-gan": "hagan.models.baselines:AlphaGAN",
    "vae-gan": "hagan.models.baselines:VAEGAN",
}


def model_class(name: str) -> type[GenerativeModel]:
    if name not in MODELS:
        raise HaganError(f"unknown model {short_repr(name)}; choose one of {', '.join(MODELS)}")
    module_name, class_name = MODELS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_model(config: Config) -> GenerativeModel:
    return model_class(config.model.name)(config)


__all__ = ["MODELS", "GenerativeModel", "HAGAN", "build_model", "model_class"]
