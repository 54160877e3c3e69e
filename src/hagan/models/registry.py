"""The registry of models: each model's ``section`` module describes it (:class:`~hagan.models.spec.ModelSpec`:
class, config section, default preset, divergence hint) and holds its presets without importing torch, so that
``hagan.config`` builds its sections and presets from here. A new model is one folder and one entry in
``SECTION_MODULES``.
"""

from __future__ import annotations

from typing import Any

from ..checks import short_repr
from ..errors import HaganError
from .baselines import section as baselines_section
from .hagan import section as hagan_section
from .patch import section as patch_section
from .progressive import section as progressive_section
from .spec import ModelSpec

SECTION_MODULES = (hagan_section, patch_section, progressive_section, baselines_section)
MODELS: dict[str, ModelSpec] = {spec.name: spec for module in SECTION_MODULES for spec in module.SPECS}
# each config section and the dataclass of its options, in registry order
SECTIONS: dict[str, type] = {spec.section: spec.options for spec in MODELS.values()}
PRESETS: dict[str, dict[str, Any]] = {name: preset for module in SECTION_MODULES for name, preset in module.PRESETS.items()}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise HaganError(f"unknown model {short_repr(name)}; choose one of {', '.join(MODELS)}")
    return MODELS[name]
