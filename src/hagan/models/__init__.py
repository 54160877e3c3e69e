"""The models that plug into the trainer, registered in one place.

Each model's folder holds its class, its networks and a ``section`` module that describes it
(:class:`~hagan.models.spec.ModelSpec`: config section, presets, default preset, divergence hint)
without importing torch. ``hagan.config`` builds its sections and presets from this registry, and
``build_model`` imports only the class of the model a run trains. A new model is one folder and one
line in ``SECTION_MODULES``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..checks import short_repr
from ..errors import HaganError
from .baselines import section as baselines_section
from .hagan import section as hagan_section
from .patch import section as patch_section
from .progressive import section as progressive_section
from .spec import ModelSpec

if TYPE_CHECKING:
    from ..config import Config
    from .base import GenerativeModel

SECTION_MODULES = (hagan_section, patch_section, progressive_section, baselines_section)
MODELS: dict[str, ModelSpec] = {spec.name: spec for module in SECTION_MODULES for spec in module.SPECS}
# each config section and the dataclass of its options, in registry order
SECTIONS: dict[str, type] = {spec.section: spec.options for spec in MODELS.values()}
PRESETS: dict[str, dict[str, Any]] = {name: preset for module in SECTION_MODULES for name, preset in module.PRESETS.items()}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise HaganError(f"unknown model {short_repr(name)}; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def model_class(name: str) -> type[GenerativeModel]:
    module_name, class_name = model_spec(name).entry.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_model(config: Config) -> GenerativeModel:
    return model_class(config.model.name)(config)


__all__ = ["MODELS", "PRESETS", "SECTIONS", "ModelSpec", "build_model", "model_class", "model_spec"]
