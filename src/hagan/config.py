"""Run configuration: one YAML file per run, presets for the paper's settings, validated before any work."""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .accel import PRECISIONS
from .errors import HaganError
from .io import write_text_atomic
from .sections import baselines as baseline_section, patch as patch_section, progressive as progressive_section


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
    "paper-512": {"model": {"size": 512}, "optim": {"batch_size": 2}},
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
    for section_name, section_values in values.items():
        section = getattr(config, section_name, None)
        if section is None or not dataclasses.is_dataclass(section):
            names = ", ".join(f.name for f in dataclasses.fields(config))
            raise HaganError(f"{source}: unknown section {section_name!r} (sections: {names})")
        if not isinstance(section_values, dict):
            raise HaganError(f"{source}: section {section_name!r} must be a mapping")
        for key, value in section_values.items():
            set_value(section, section_name, key, value, source)


def set_value(section: Any, section_name: str, key: str, value: Any, source: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        raise HaganError(f"{source}: unknown key {section_name}.{key} (keys: {', '.join(fields)})")
    expected = type(getattr(section, key))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is float and isinstance(value, str):
        value = yaml_float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise HaganError(
            f"{source}: {section_name}.{key} must be {expected.__name__}, got {value!r} ({type(value).__name__})"
        )
    setattr(section, key, value)


def yaml_float(text: str) -> float | str:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; for a float key take it as the number it means."""
    try:
        return float(text)
    except ValueError:
        return text


def parse_assignment(text: str) -> dict[str, Any]:
    """``section.key=value`` from the command line, the value parsed as YAML (so 1e-4, true, 128 work)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise HaganError(f"--set {text!r}: expected section.key=value, e.g. loss.r1_gamma=1.0")
    path, raw = text.split("=", 1)
    section, key = path.split(".", 1)
    return {section: {key: yaml.safe_load(raw)}}


def validate(config: Config, source: str = "config") -> None:
    m, loss, o, t = config.model, config.loss, config.optim, config.train
    problems = []
    if m.size not in (32, 64, 128, 256, 512):
        problems.append(f"model.size must be a power of two from 32 to 512, got {m.size}")
    if m.r_sampling not in ("random", "deterministic"):
        problems.append(f"model.r_sampling must be 'random' or 'deterministic', got {m.r_sampling!r}")
    if loss.kind not in ("bce", "wgan-gp"):
        problems.append(f"loss.kind must be 'bce' or 'wgan-gp', got {loss.kind!r}")
    for name, value in (("model.latent_dim", m.latent_dim), ("optim.batch_size", o.batch_size),
                        ("train.iterations", t.iterations), ("train.log_every", t.log_every),
                        ("train.sample_every", t.sample_every), ("train.checkpoint_every", t.checkpoint_every),
                        ("train.keep_checkpoints", t.keep_checkpoints)):
        if value < 1:
            problems.append(f"{name} must be at least 1, got {value}")
    if m.width <= 0 or m.num_classes < 0:
        problems.append("model.width must be positive and model.num_classes not negative")
    if t.eval_every < 0 or (t.eval_every and t.eval_samples < 2):
        problems.append("train.eval_every must not be negative (0: off) and train.eval_samples at least 2")
    if t.max_minutes < 0:
        problems.append(f"train.max_minutes must not be negative (0 means no limit), got {t.max_minutes}")
    if not 0 <= loss.diffaug_p <= 1 or not 0 <= loss.ada_target < 1:
        problems.append("loss.diffaug_p must lie in [0, 1] and loss.ada_target in [0, 1)")
    if t.on_divergence not in ("stop", "rollback"):
        problems.append(f"train.on_divergence must be 'stop' or 'rollback', got {t.on_divergence!r}")
    if not 0 < t.rollback_lr_factor < 1:
        problems.append(f"train.rollback_lr_factor must lie in (0, 1), got {t.rollback_lr_factor}")
    if t.precision not in PRECISIONS:
        problems.append(f"train.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    if config.data.workers < -1:
        problems.append(f"data.workers must be -1 (auto), 0 (load in the training process) or more, got {config.data.workers}")
    if t.max_rollbacks < 0:
        problems.append(f"train.max_rollbacks must not be negative, got {t.max_rollbacks}")
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
        problems.append(f"model.upsample must be 'nearest' or 'trilinear', got {m.upsample!r}")
    if m.upsample == "trilinear" and not m.consistent_slabs:
        problems.append("model.upsample: trilinear needs model.consistent_slabs: true (the paper's G^H is nearest only)")
    if loss.disc_losses not in ("averaged", "separate"):
        problems.append(f"loss.disc_losses must be 'averaged' or 'separate', got {loss.disc_losses!r}")
    negative = [name for name, value in (
        ("loss.weight_high", loss.weight_high), ("loss.weight_low", loss.weight_low),
        ("loss.r1_gamma", loss.r1_gamma), ("loss.r1_per_voxel", loss.r1_per_voxel),
        ("loss.lambda_recon_generator", loss.lambda_recon_generator),
        ("loss.lambda_latent_prior", loss.lambda_latent_prior),
        ("train.ema_kimg", t.ema_kimg), ("train.ema_rampup", t.ema_rampup)) if value < 0]
    problems += [f"{name} must not be negative" for name in negative]
    if loss.r1_gamma > 0 and loss.r1_per_voxel > 0:
        problems.append("set loss.r1_gamma (a fixed gamma) or loss.r1_per_voxel (gamma from the voxels per batch), not both")
    if loss.r1_every < 1:
        problems.append(f"loss.r1_every must be at least 1 (1: R1 at every step), got {loss.r1_every}")
    if (loss.lambda_recon_generator > 0 or loss.lambda_latent_prior > 0) and not m.encoder:
        problems.append("loss.lambda_recon_generator and loss.lambda_latent_prior train through the encoders; "
                        "they need model.encoder: true")
    if m.name != "hagan":
        hagan_only = [name for name, on in (
            ("model.consistent_slabs", m.consistent_slabs), ("model.upsample", m.upsample != "nearest"),
            ("loss.disc_losses", loss.disc_losses != "averaged"),
            ("loss.r1_per_voxel", loss.r1_per_voxel > 0), ("loss.lambda_recon_generator", loss.lambda_recon_generator > 0),
            ("loss.lambda_latent_prior", loss.lambda_latent_prior > 0), ("train.ema_kimg", t.ema_kimg > 0)) if on]
        problems += [f"{name} is an HA-GAN option; model {m.name!r} does not use it" for name in hagan_only]
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
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise HaganError(f"{path}: cannot read config ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise HaganError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    return values


def save_yaml(config: Config, path: str | os.PathLike) -> Path:
    return write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def build_config(
    preset_name: str | None = None,
    yaml_path: str | os.PathLike | None = None,
    overrides: list[dict[str, Any]] | None = None,
) -> Config:
    """Defaults, then the preset, then the YAML file, then command-line overrides: later wins."""
    config = Config()
    if preset_name:
        merge_into(config, preset(preset_name), f"preset {preset_name}")
    if yaml_path:
        merge_into(config, load_yaml(yaml_path), str(yaml_path))
    for override in overrides or []:
        merge_into(config, override, "command line")
    validate(config)
    return config
