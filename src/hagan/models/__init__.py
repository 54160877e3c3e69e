"""The models that plug into the trainer, one folder each (class, networks, config section); the
registry (:mod:`hagan.models.registry`) lists them, and ``build_model`` imports only the class of the
model a run trains (``import hagan.models`` imports no network and no torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .registry import MODELS, PRESETS, SECTIONS, ModelSpec, model_spec

if TYPE_CHECKING:
    from ..config import Config
    from .base import GenerativeModel


def model_class(name: str) -> type[GenerativeModel]:
    module_name, class_name = model_spec(name).entry.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_model(config: Config) -> GenerativeModel:
    return model_class(config.model.name)(config)


__all__ = ["MODELS", "PRESETS", "SECTIONS", "ModelSpec", "build_model", "model_class", "model_spec"]
