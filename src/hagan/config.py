"""Run configuration: one YAML file per run, presets for the paper's settings, validated before any work."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .checks import short_repr, short_text
from .data.io import display_path, write_text_atomic
from .errors import HaganError
from .models.registry import MODELS, PRESETS, SECTIONS, model_spec


@dataclass
class ModelConfig:
    name: str = "hagan"
    size: int = 256
    latent_dim: int = 1024
    width: float = 1.0
    num_classes: int = 0


@dataclass
class OptimConfig:
    batch_size: int = 4
    lr_g: float = 1e-4
    lr_d: float = 4e-4
    lr_e: float = 1e-4
    beta1: float = 0.0
    beta2: float = 0.999


@dataclass
class DataConfig:
    cache: str = ""
    augment: bool = False
    workers: int = -1


@dataclass
class TrainConfig:
    iterations: int = 80000
    log_every: int = 20
    sample_every: int = 500
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    seed: int = 0
    device: str = "auto"
    max_minutes: float = 0.0
    eval_every: int = 0
    eval_features: str = "deepbet"
    eval_samples: int = 16
    deterministic: bool = False
    on_divergence: str = "stop"
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    precision: str = "auto"
    channels_last: bool = False
    compile: bool = False


# the cube edges every model is built for, and the only sizes a cache is made at
MODEL_SIZES = (32, 64, 128, 256, 512)
# train.precision: auto is bf16 autocast where the GPU supports it, else fp32 (hagan.training.accel)
PRECISIONS = ("auto", "fp32", "bf16")

# the sections every model reads; each model's own options are a section of their own (hagan.models)
CORE_SECTIONS = ("model", "optim", "data", "train")


@dataclass
class CoreConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """The core sections and the trained model's own: what a run's config.yaml holds."""
        own = model_spec(self.model.name).section
        return {name: values for name, values in dataclasses.asdict(self).items()
                if name in CORE_SECTIONS or name == own}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "Config":
        """Build a config, refusing unknown sections and keys and values of the wrong type."""
        config = cls()
        merge_into(config, values, source)
        validate(config, source)
        return config


# the run configuration: the core sections, then one section per model of the registry (``config.hagan``,
# ``config.patch``, ...), so that a new model adds its options without a change here
Config = dataclasses.make_dataclass(
    "Config",
    [(name, options, field(default_factory=options)) for name, options in SECTIONS.items()],
    bases=(CoreConfig,),
)
Config.__module__ = __name__
Config.__doc__ = "One run's configuration: core sections and every model's section (only its own is used)."

# keys that moved from the core sections to HA-GAN's own; older config files and runs still load
LEGACY_HAGAN_KEYS = {
    **{f"model.{key}": key for key in ("low_res_branch", "encoder", "r_sampling", "minibatch_std",
                                         "consistent_slabs", "upsample")},
    **{f"loss.{key}": key for key in ("lambda_recon_slab", "lambda_recon_global", "lambda_class", "r1_gamma",
                                        "r1_per_voxel", "r1_every", "disc_losses", "weight_high", "weight_low",
                                        "lambda_recon_generator", "lambda_latent_prior", "diffaug", "diffaug_p",
                                        "ada_target", "ada_kimg")},
    "loss.kind": "loss",
    **{f"train.{key}": key for key in ("ema_kimg", "ema_rampup", "recompute_activations")},
}


def modern_layout(values: dict[str, Any], model_name: str) -> dict[str, Any]:
    """``values`` with the keys of the former layout in their sections of today: HA-GAN's options in
    ``hagan``, and ``loss.gp_lambda`` in the section of ``model_name``, the model it configures. What is
    left of ``loss`` is reported as an unknown section."""
    moved = {name: dict(section) if isinstance(section, dict) else section for name, section in values.items()}
    for section in ("model", "loss", "train"):
        if not isinstance(moved.get(section), dict):
            continue
        for key in list(moved[section]):
            shared = (section, key) == ("loss", "gp_lambda") and model_name in MODELS
            if shared and key in _option_names(model_name):
                home = model_spec(model_name).section, key
            elif f"{section}.{key}" in LEGACY_HAGAN_KEYS:
                home = "hagan", LEGACY_HAGAN_KEYS[f"{section}.{key}"]
            else:
                continue
            moved.setdefault(home[0], {})[home[1]] = moved[section].pop(key)
    if moved.get("loss") == {}:
        del moved["loss"]
    return moved


def _option_names(model_name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(model_spec(model_name).options)}


# what `hagan train --model NAME` starts from when it names no preset and no YAML file: the core optim
# section's defaults are HA-GAN's, wrong for a model whose paper fixes other rates and betas
MODEL_PRESETS = {name: spec.default_preset for name, spec in MODELS.items() if spec.default_preset}


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise HaganError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def merge_into(config: Config, values: dict[str, Any], source: str, model_name: str | None = None) -> None:
    """Set each ``section.key`` of ``values`` on ``config``; ``model_name`` (default: the one ``values`` or
    ``config`` names) places the former layout's shared keys (see ``modern_layout``)."""
    if not isinstance(values, dict):
        raise HaganError(f"{source}: expected a mapping of sections, got {type(values).__name__}")
    named = values.get("model", {}).get("name") if isinstance(values.get("model"), dict) else None
    values = modern_layout(values, model_name or named or config.model.name)
    names = [f.name for f in dataclasses.fields(config)]
    for section_name, section_values in values.items():
        if section_name not in names:
            raise HaganError(f"{source}: unknown section {short_repr(section_name)} (sections: {', '.join(names)})")
        if not isinstance(section_values, dict):
            raise HaganError(f"{source}: section {section_name!r} must be a mapping, "
                             f"got {type(section_values).__name__}")
        for key, value in section_values.items():
            set_value(getattr(config, section_name), section_name, key, value, source)


def set_value(section: Any, section_name: str, key: str, value: Any, source: str) -> None:
    fields = [f.name for f in dataclasses.fields(section)]
    if key not in fields:
        shown = short_text(key, 60) if isinstance(key, str) else short_repr(key)
        raise HaganError(f"{source}: unknown key {section_name}.{shown} (keys: {', '.join(fields)})")
    expected = type(getattr(section, key))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is float and isinstance(value, str):
        value = yaml_float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise HaganError(f"{source}: {section_name}.{key} must be {expected.__name__}, "
                         f"got {short_repr(value)} ({type(value).__name__})")
    if expected is float and not math.isfinite(value):
        raise HaganError(f"{source}: {section_name}.{key} must be a finite number, got {value}")
    setattr(section, key, value)


def yaml_float(text: str) -> float | str:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; for a float key take it as the number it means."""
    try:
        return float(text)
    except ValueError:
        return text


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML that refuses aliases (``*name``, also in ``<<: *name``): a config never needs them, and
    nested aliases let a few hundred bytes stand for billions of values (a "billion laughs" bomb) that
    anyone who prints or walks the result pays for."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasError(event.anchor, event.start_mark)
        return super().compose_node(parent, index)


class _AliasError(yaml.YAMLError):
    def __init__(self, anchor: str, mark: Any):
        super().__init__(f"line {mark.line + 1}: the alias *{short_text(anchor, 40)} is not allowed in a config; "
                         "write the value out")


def parse_yaml(text: str) -> Any:
    """YAML as plain values, refusing aliases; raises ValueError with one short line."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except _AliasError as err:
        raise ValueError(str(err)) from err
    except yaml.YAMLError as err:
        raise ValueError(f"not valid YAML ({short_text(str(err))})") from err
    except RecursionError as err:
        raise ValueError("not usable YAML (nested too deeply)") from err
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise ValueError(f"not usable YAML ({short_text(str(err))})") from err


def parse_assignment(text: str) -> dict[str, Any]:
    """``section.key=value`` from the command line, the value parsed as YAML (so 1e-4, true, 128 work)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise HaganError(f"--set {short_repr(text)}: expected section.key=value, e.g. hagan.r1_gamma=1.0")
    path, raw = text.split("=", 1)
    section, key = path.split(".", 1)
    try:
        value = parse_yaml(raw)
    except ValueError as err:
        raise HaganError(f"--set {short_repr(path)}: {err}") from err
    return {section: {key: value}}


# the numeric keys of the core sections and the values they take; each model's section checks its own
# (``problems()``), and every float key of every section must be finite
AT_LEAST_ONE = ("model.latent_dim", "optim.batch_size", "train.iterations", "train.log_every", "train.sample_every",
                "train.checkpoint_every", "train.keep_checkpoints")
POSITIVE = ("model.width", "optim.lr_g", "optim.lr_d", "optim.lr_e")
# 0 switches a feature off (the time limit, periodic KID, rollbacks)
NOT_NEGATIVE = ("model.num_classes", "train.seed", "train.max_minutes", "train.eval_every", "train.max_rollbacks")
BELOW_ONE = ("optim.beta1", "optim.beta2")  # in [0, 1)


def range_problems(config: Config) -> list[str]:
    """Numbers outside the range their key allows, and non-finite floats anywhere in the config."""
    def value(name: str) -> Any:
        section, key = name.split(".")
        return getattr(getattr(config, section), key)

    problems = []
    for section_field in dataclasses.fields(config):
        section = getattr(config, section_field.name)
        for f in dataclasses.fields(section):
            number = getattr(section, f.name)
            if isinstance(number, float) and not math.isfinite(number):
                problems.append(f"{section_field.name}.{f.name} must be a finite number, got {number}")
    problems += [f"{n} must be at least 1, got {value(n)}" for n in AT_LEAST_ONE if value(n) < 1]
    problems += [f"{n} must be positive, got {value(n)}" for n in POSITIVE if not value(n) > 0]
    problems += [f"{n} must not be negative, got {value(n)}" for n in NOT_NEGATIVE if value(n) < 0]
    problems += [f"{n} must lie in [0, 1), got {value(n)}" for n in BELOW_ONE if not 0 <= value(n) < 1]
    return problems


def validate(config: Config, source: str = "config") -> None:
    m, t = config.model, config.train
    if m.name not in MODELS:
        raise HaganError(f"{source}: model.name must be one of {', '.join(MODELS)}, got {short_repr(m.name)}")
    problems = range_problems(config)
    if m.size not in MODEL_SIZES:
        problems.append(f"model.size must be a power of two from 32 to 512, got {m.size}")
    if t.eval_samples < 2:
        problems.append(f"train.eval_samples must be at least 2, got {t.eval_samples}")
    if t.on_divergence not in ("stop", "rollback"):
        problems.append(f"train.on_divergence must be 'stop' or 'rollback', got {short_repr(t.on_divergence)}")
    if not 0 < t.rollback_lr_factor < 1:
        problems.append(f"train.rollback_lr_factor must lie in (0, 1), got {t.rollback_lr_factor}")
    if t.precision not in PRECISIONS:
        problems.append(f"train.precision must be one of {', '.join(PRECISIONS)}, got {short_repr(t.precision)}")
    if config.data.workers < -1:
        problems.append(f"data.workers must be -1 (auto), 0 (load in the training process) or more, got {config.data.workers}")
    own = model_spec(m.name).section
    problems += [f"{own}.{problem}" for problem in getattr(config, own).problems()]
    problems += foreign_options(config)
    if problems:
        raise HaganError(f"{source}: " + "; ".join(problems))


def foreign_options(config: Config) -> list[str]:
    """Options set in another model's section: that model's, so this one would silently ignore them."""
    own = model_spec(config.model.name).section
    problems = []
    for name, options in SECTIONS.items():
        if name == own:
            continue
        owners = ", ".join(spec.name for spec in MODELS.values() if spec.section == name)
        section, default = getattr(config, name), options()
        problems += [f"{name}.{f.name} is an option of {owners}; model {short_repr(config.model.name)} does not use it"
                     for f in dataclasses.fields(section) if getattr(section, f.name) != getattr(default, f.name)]
    return problems


def check_world_size(config: Config, world_size: int) -> None:
    """Data parallelism splits the global ``optim.batch_size`` evenly over the processes."""
    b = config.optim.batch_size
    if world_size > 1 and b % world_size:
        raise HaganError(
            f"optim.batch_size {b} does not divide across {world_size} processes (optim.batch_size is the "
            f"global batch, split evenly over the ranks); use a multiple of {world_size}, e.g. "
            f"{max(world_size, b // world_size * world_size)} or {(b // world_size + 1) * world_size}"
        )


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML config file as a mapping of sections (empty: none), refusing aliases (see ``parse_yaml``)."""
    path = Path(path)
    where = display_path(path)
    try:
        values = parse_yaml(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise HaganError(f"{where}: cannot read config ({err.strerror})") from err
    except UnicodeDecodeError as err:
        raise HaganError(f"{where}: not a YAML config (not UTF-8 text at byte {err.start})") from err
    except ValueError as err:
        raise HaganError(f"{where}: {err}") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise HaganError(f"{where}: expected a mapping of sections, got {type(values).__name__}")
    return values


def save_yaml(config: Config, path: str | os.PathLike) -> Path:
    return write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def build_config(
    preset_name: str | None = None,
    yaml_path: str | os.PathLike | None = None,
    overrides: list[dict[str, Any]] | None = None,
) -> Config:
    """Defaults, then the preset, then the YAML file, then command-line overrides: later wins. A value
    out of range is reported with the sources it may have come from."""
    config = Config()
    layers = []
    if preset_name:
        layers.append((f"preset {preset_name}", preset(preset_name)))
    if yaml_path:
        layers.append((display_path(yaml_path), load_yaml(yaml_path)))
    layers += [("command line", override) for override in overrides or []]
    # the model the config ends up training: the former layout's shared keys go to its section
    names = [values["model"]["name"] for _, values in layers
             if isinstance(values.get("model"), dict) and "name" in values["model"]]
    model_name = names[-1] if names and isinstance(names[-1], str) else None
    sources = []
    for source, values in layers:
        merge_into(config, values, source, model_name)
        if source not in sources:
            sources.append(source)
    validate(config, " + ".join(sources) or "config")
    return config
