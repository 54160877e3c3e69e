"""What the rest of hagan knows of a model without importing it (or torch): a name, where its class
lives, its config section and default preset, and what to try when its training diverges."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str  # ``model.name``
    entry: str  # "module:Class", imported only when a run builds this model
    section: str  # the config section of its options (shared by the baselines)
    options: type  # that section's dataclass, with a ``problems()`` method
    # what ``hagan train --model NAME`` starts from without --preset or --config (None: the defaults)
    default_preset: str | None
    # appended to the divergence error: what to change in this model's config
    divergence_hint: str
