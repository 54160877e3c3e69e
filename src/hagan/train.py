"""The one training loop every model plugs into: data, logging, samples, checkpoints, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .augment import VolumeAugment
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import Config, save_yaml
from .data import CachedVolumeDataset, infinite_loader
from .errors import HaganError
from .io import atomic_path
from .models import build_model
from .viz import montage_tensor, plot_curves, three_plane_montage

CONFIG_FILE = "config.yaml"
GEOMETRY_FILE = "geometry.json"
SCALARS_FILE = "scalars.jsonl"
SAMPLE_SEED = 1234
SAMPLES_SHOWN = 4


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HaganError(f"train.device is {name!r} but CUDA is not available on this machine")
    return torch.device(name)


def write_json(path: Path, value: Any) -> None:
    tmp = atomic_path(path)
    try:
        tmp.write_text(json.dumps(value, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The logged scalars of a run, by name, as (iteration, value) pairs."""
    series: dict[str, list[tuple[int, float]]] = {}
    path = Path(run_dir) / SCALARS_FILE
    if path.is_file():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            for key, value in record.items():
                if key != "iteration":
                    series.setdefault(key, []).append((record["iteration"], value))
    return series


class StopRequested:
    """SIGINT/SIGTERM end the loop after the current iteration, so the run saves and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequested":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def prepare_run_dir(run_dir: Path, config: Config, resume: bool) -> Config:
    """A new run needs an empty or new folder; a resumed run takes its saved config, updated by ``config``."""
    config_path = run_dir / CONFIG_FILE
    if resume:
        if not config_path.is_file():
            raise HaganError(f"{run_dir}: nothing to resume (no {CONFIG_FILE}); start a new run without --resume")
        return config
    if config_path.exists() or (run_dir.is_dir() and any(run_dir.iterdir())):
        raise HaganError(f"{run_dir}: folder already holds files; pass --resume to continue it or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    return config


class Trainer:
    def __init__(self, config: Config, run_dir: str | os.PathLike, resume: bool = False, progress: bool = True):
        self.run_dir = Path(run_dir)
        self.config = prepare_run_dir(self.run_dir, config, resume)
        self.resume = resume
        self.progress = progress
        self.device = pick_device(config.train.device)
        if not config.data.cache:
            raise HaganError("no training data: pass --data CACHE (a folder written by `hagan preprocess`)")
        transform = VolumeAugment(seed=config.train.seed) if config.data.augment else None
        self.dataset = CachedVolumeDataset(config.data.cache, transform=transform)
        self._check_data()
        torch.manual_seed(config.train.seed)
        self.model = build_model(config).to(self.device)
        self.optimizers = self.model.optimizers()
        self.rng = torch.Generator().manual_seed(config.train.seed)
        self.start_iteration = 0
        if resume:
            self._load_latest()
        save_yaml(config, self.run_dir / CONFIG_FILE)
        write_json(self.run_dir / GEOMETRY_FILE, self.geometry())

    def _check_data(self) -> None:
        m = self.config.model
        if self.dataset.size != m.size:
            raise HaganError(
                f"{self.config.data.cache}: volumes are {self.dataset.size}^3 but model.size is {m.size}; "
                f"preprocess with --size {m.size} or train with --size {self.dataset.size}"
            )
        if m.num_classes:
            labels = [entry["label"] for entry in self.dataset.manifest["entries"]]
            bad = [lab for lab in labels if not 0 <= lab < m.num_classes]
            if bad:
                raise HaganError(
                    f"{self.config.data.cache}: a class-conditional model with {m.num_classes} classes needs a label "
                    f"in 0..{m.num_classes - 1} for every volume; {len(bad)} volume(s) have {sorted(set(bad))}"
                )

    def geometry(self) -> dict[str, Any]:
        manifest = self.dataset.manifest
        return {
            "reference_affine": manifest["reference_affine"],
            "recipe": manifest["recipe"],
            "mode": manifest["mode"],
            "size": manifest["size"],
            "num_classes": self.config.model.num_classes,
        }

    def _load_latest(self) -> None:
        checkpoints = list_checkpoints(self.run_dir / "checkpoints")
        if not checkpoints:
            raise HaganError(f"{self.run_dir}: no complete checkpoint to resume from")
        state = load_checkpoint(checkpoints[-1], self.model, self.optimizers, self.rng)
        self.model.load_extra_state(state.get("extra", {}))
        self.start_iteration = int(state["iteration"])

    def save(self, iteration: int) -> Path:
        return save_checkpoint(
            self.run_dir / "checkpoints", iteration, self.model, self.optimizers, self.rng,
            {"extra": self.model.extra_state()}, self.config.train.keep_checkpoints,
        )

    def write_samples(self, iteration: int, writer: Any) -> None:
        self.model.eval()
        rng = torch.Generator().manual_seed(SAMPLE_SEED)
        labels = (torch.arange(SAMPLES_SHOWN) % self.config.model.num_classes) if self.config.model.num_classes else None
        volumes = self.model.sample(SAMPLES_SHOWN, rng, labels).float().cpu()
        self.model.train()
        three_plane_montage([v[0].numpy() for v in volumes], self.run_dir / "samples" / f"iter_{iteration:08d}.png")
        writer.add_image("samples", montage_tensor(volumes), iteration)

    def fit(self) -> Path:
        """Train until ``train.iterations`` (or ``train.max_minutes``); returns the run folder.

        SIGINT and SIGTERM stop after the current iteration and save a checkpoint.
        """
        from torch.utils.tensorboard import SummaryWriter

        t = self.config.train
        if self.start_iteration >= t.iterations:
            raise HaganError(
                f"{self.run_dir}: already trained {self.start_iteration} iterations; raise --iterations to continue"
            )
        loader = infinite_loader(self.dataset, self.config.optim.batch_size, seed=t.seed + self.start_iteration)
        writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.model.train()
        iteration = self.start_iteration
        bar = tqdm(total=t.iterations, initial=iteration, desc="train", unit="it", disable=not self.progress,
                   dynamic_ncols=True)
        started = time.perf_counter()
        deadline = started + t.max_minutes * 60 if t.max_minutes else float("inf")
        try:
            with StopRequested() as stop, open(self.run_dir / SCALARS_FILE, "a") as scalars_file:
                while iteration < t.iterations and not stop.requested and time.perf_counter() < deadline:
                    logs = self.model.train_step(next(loader), iteration, self.rng)
                    iteration += 1
                    bad = [k for k, v in logs.items() if not math.isfinite(v)]
                    if bad:
                        raise HaganError(
                            f"training diverged at iteration {iteration}: {bad[0]} = {logs[bad[0]]}; "
                            "lower the learning rates or enable loss.r1_gamma / loss.diffaug"
                        )
                    bar.update(1)
                    if iteration % t.log_every == 0 or iteration == t.iterations:
                        bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in logs.items() if k.startswith("loss/")})
                        logs["speed/it_per_s"] = (iteration - self.start_iteration) / (time.perf_counter() - started)
                        for key, value in logs.items():
                            writer.add_scalar(key, value, iteration)
                        scalars_file.write(json.dumps({"iteration": iteration, **logs}) + "\n")
                        scalars_file.flush()
                    if iteration % t.sample_every == 0:
                        self.write_samples(iteration, writer)
                    if iteration % t.checkpoint_every == 0:
                        self.save(iteration)
                if iteration % t.sample_every:
                    self.write_samples(iteration, writer)
        finally:
            bar.close()
            writer.close()
        if iteration % t.checkpoint_every:
            self.save(iteration)
        curves = read_scalars(self.run_dir)
        if curves:
            plot_curves(curves, self.run_dir / "curves.png", title=f"{self.run_dir.name}: training curves")
        return self.run_dir


def train(config: Config, run_dir: str | os.PathLike, resume: bool = False, progress: bool = True) -> Path:
    return Trainer(config, run_dir, resume, progress).fit()

