"""Models that plug into the trainer; ``build_model`` picks one by ``model.name``."""

from __future__ import annotations

from ..config import Config
from ..errors import HaganError
from .base import GenerativeModel
from .hagan import HAGAN

MODELS: dict[str, type[GenerativeModel]] = {"hagan": HAGAN}


def build_model(config: Config) -> GenerativeModel:
    if config.model.name not in MODELS:
        raise HaganError(f"unknown model {config.model.name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[config.model.name](config)


__all__ = ["MODELS", "GenerativeModel", "HAGAN", "build_model"]
