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
from .models.baselines import section as baseline_section
from .models.patch import section as patch_section
from .models.progressive import section as progressive_section
from .training.accel import PRECISIONS


@dataclass
class ModelConfig:
    name: str = "hagan"
    size: int = 256
    latent_dim: int = 1024
    width: float = 1.0
    num_classes: int = 0
    low_res_branch: bool = True
    encoder: bool = True
    r_sampling: str = "random"
    minibatch_std: bool = False
    consistent_slabs: bool = False
    upsample: str = "nearest"


@dataclass
class LossConfig:
    kind: str = "bce"
    lambda_recon_slab: float = 5.0
    lambda_recon_global: float = 5.0
    lambda_class: float = 0.1
    r1_gamma: float = 0.0
    r1_per_voxel: float = 0.0
    r1_every: int = 1
    gp_lambda: float = 10.0
    disc_losses: str = "averaged"
    weight_high: float = 1.0
    weight_low: float = 1.0
    lambda_recon_generator: float = 0.0
    lambda_latent_prior: float = 0.0
    diffaug: str = ""
    diffaug_p: float = 1.0
    ada_target: float = 0.0
    ada_kimg: float = 100.0


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
    # recompute the generators' upsampled activations (G^A, G^H) in the backward pass instead of keeping
    # them: the same gradients in less memory, for one more generator forward per update
    recompute_activations: bool = False
    ema_kimg: float = 0.0
    ema_rampup: float = 0.05


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    patch: patch_section.PatchConfig = field(default_factory=patch_section.PatchConfig)
    progressive: progressive_section.ProgressiveConfig = field(default_factory=progressive_section.ProgressiveConfig)
    baseline: baseline_section.BaselineConfig = field(default_factory=baseline_section.BaselineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "Config":
        """Build a config, refusing unknown sections and keys and values of the wrong type."""
        config = cls()
        merge_into(config, values, source)
        validate(config, source)
        return config


# what works on 100-150 volumes (docs/small-data.md): G^H trained exactly as it is sampled, WGAN-GP with a
# loss per discriminator, G also trained to reconstruct real volumes from the encoders' codes (with the codes
# held on the prior), trilinear upsampling, and samples from an exponential moving average of G
SMALL_DATA = {
    "model": {"consistent_slabs": True, "upsample": "trilinear"},
    "loss": {"kind": "wgan-gp", "disc_losses": "separate", "lambda_recon_generator": 5.0, "lambda_latent_prior": 1.0},
    "optim": {"lr_g": 2e-4, "lr_e": 2e-4},
    "train": {"ema_kimg": 1.0},
}


def with_sections(base: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    """A preset built on another: each named section is merged key by key, not replaced."""
    merged = copy.deepcopy(base)
    for name, values in sections.items():
        merged[name] = {**merged.get(name, {}), **values}
    return merged


PRESETS: dict[str, dict[str, Any]] = {
    "paper-256": {"model": {"size": 256}},
    "paper-128": {"model": {"size": 128}},
    "paper-512": {"model": {"size": 512}, "optim": {"batch_size": 2}, "train": {"recompute_activations": True}},
    "small-data-128": with_sections(SMALL_DATA, model={"size": 128}),
    "demo": with_sections(
        SMALL_DATA,
        model={"size": 32, "latent_dim": 128, "width": 0.25},
        train={"iterations": 600, "log_every": 10, "sample_every": 200, "checkpoint_every": 200},
    ),
    **patch_section.PRESETS,
    **progressive_section.PRESETS,
    **baseline_section.PRESETS,
}


# the preset a model trains with when `hagan train --model NAME` names no preset and no YAML file: the
# core optim section's defaults are HA-GAN's, wrong for a model whose paper fixes other rates and betas
MODEL_PRESETS = {
    "patch": "patch-128",
    "progressive": "progressive-128",
    "wgan-gp": "wgan-gp-128",
    "alpha-gan": "alpha-gan-128",
    "vae-gan": "vae-gan-128",
}


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise HaganError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def merge_into(config: Config, values: dict[str, Any], source: str) -> None:
    if not isinstance(values, dict):
        raise HaganError(f"{source}: expected a mapping of sections, got {type(values).__name__}")
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
        raise HaganError(f"--set {short_repr(text)}: expected section.key=value, e.g. loss.r1_gamma=1.0")
    path, raw = text.split("=", 1)
    section, key = path.split(".", 1)
    try:
        value = parse_yaml(raw)
    except ValueError as err:
        raise HaganError(f"--set {short_repr(path)}: {err}") from err
    return {section: {key: value}}


# the numeric keys of the core sections and the values they take; the sections of the other models
# check their own (``problems()``), and every float key of every section must be finite
AT_LEAST_ONE = ("model.latent_dim", "optim.batch_size", "train.iterations", "train.log_every", "train.sample_every",
                "train.checkpoint_every", "train.keep_checkpoints", "loss.r1_every")
POSITIVE = ("model.width", "optim.lr_g", "optim.lr_d", "optim.lr_e", "loss.ada_kimg")
# 0 switches a term or a feature off (a loss weight, R1, EMA, the time limit, periodic KID, rollbacks)
NOT_NEGATIVE = ("model.num_classes", "loss.lambda_recon_slab", "loss.lambda_recon_global", "loss.lambda_class",
                "loss.gp_lambda", "loss.weight_high", "loss.weight_low", "loss.r1_gamma", "loss.r1_per_voxel",
                "loss.lambda_recon_generator", "loss.lambda_latent_prior", "train.seed", "train.max_minutes",
                "train.eval_every", "train.max_rollbacks", "train.ema_kimg", "train.ema_rampup")
BELOW_ONE = ("optim.beta1", "optim.beta2", "loss.ada_target")  # in [0, 1)


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
    m, loss, t = config.model, config.loss, config.train
    problems = range_problems(config)
    if m.size not in (32, 64, 128, 256, 512):
        problems.append(f"model.size must be a power of two from 32 to 512, got {m.size}")
    if m.r_sampling not in ("random", "deterministic"):
        problems.append(f"model.r_sampling must be 'random' or 'deterministic', got {short_repr(m.r_sampling)}")
    if loss.kind not in ("bce", "wgan-gp"):
        problems.append(f"loss.kind must be 'bce' or 'wgan-gp', got {short_repr(loss.kind)}")
    if t.eval_samples < 2:
        problems.append(f"train.eval_samples must be at least 2, got {t.eval_samples}")
    if not 0 <= loss.diffaug_p <= 1:
        problems.append(f"loss.diffaug_p must lie in [0, 1], got {loss.diffaug_p}")
    if t.on_divergence not in ("stop", "rollback"):
        problems.append(f"train.on_divergence must be 'stop' or 'rollback', got {short_repr(t.on_divergence)}")
    if not 0 < t.rollback_lr_factor < 1:
        problems.append(f"train.rollback_lr_factor must lie in (0, 1), got {t.rollback_lr_factor}")
    if t.precision not in PRECISIONS:
        problems.append(f"train.precision must be one of {', '.join(PRECISIONS)}, got {short_repr(t.precision)}")
    if config.data.workers < -1:
        problems.append(f"data.workers must be -1 (auto), 0 (load in the training process) or more, got {config.data.workers}")
    problems += hagan_problems(config)
    for name in ("patch", "progressive", "baseline"):
        problems += [f"{name}.{problem}" for problem in getattr(config, name).problems()]
    if problems:
        raise HaganError(f"{source}: " + "; ".join(problems))


def hagan_problems(config: Config) -> list[str]:
    """The small-data options of HA-GAN: losses per discriminator, R1's scale, the encoders' terms, EMA."""
    m, loss, t = config.model, config.loss, config.train
    problems = []
    if m.upsample not in ("nearest", "trilinear"):
        problems.append(f"model.upsample must be 'nearest' or 'trilinear', got {short_repr(m.upsample)}")
    if m.upsample == "trilinear" and not m.consistent_slabs:
        problems.append("model.upsample: trilinear needs model.consistent_slabs: true (the paper's G^H is nearest only)")
    if loss.disc_losses not in ("averaged", "separate"):
        problems.append(f"loss.disc_losses must be 'averaged' or 'separate', got {short_repr(loss.disc_losses)}")
    if loss.r1_gamma > 0 and loss.r1_per_voxel > 0:
        problems.append("set loss.r1_gamma (a fixed gamma) or loss.r1_per_voxel (gamma from the voxels per batch), not both")
    if (loss.lambda_recon_generator > 0 or loss.lambda_latent_prior > 0) and not m.encoder:
        problems.append("loss.lambda_recon_generator and loss.lambda_latent_prior train through the encoders; "
                        "they need model.encoder: true")
    if m.name != "hagan":
        hagan_only = [name for name, on in (
            ("model.consistent_slabs", m.consistent_slabs), ("model.upsample", m.upsample != "nearest"),
            ("loss.disc_losses", loss.disc_losses != "averaged"),
            ("loss.r1_per_voxel", loss.r1_per_voxel > 0), ("loss.lambda_recon_generator", loss.lambda_recon_generator > 0),
            ("loss.lambda_latent_prior", loss.lambda_latent_prior > 0), ("train.ema_kimg", t.ema_kimg > 0)) if on]
        problems += [f"{name} is an HA-GAN option; model {short_repr(m.name)} does not use it" for name in hagan_only]
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
    sources = []
    if preset_name:
        sources.append(f"preset {preset_name}")
        merge_into(config, preset(preset_name), sources[-1])
    if yaml_path:
        sources.append(display_path(yaml_path))
        merge_into(config, load_yaml(yaml_path), sources[-1])
    for override in overrides or []:
        merge_into(config, override, "command line")
    if overrides:
        sources.append("command line")
    validate(config, " + ".join(sources) or "config")
    return config
