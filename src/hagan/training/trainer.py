"""The one training loop every model plugs into: data, logging, samples, checkpoints, resume."""

from __future__ import annotations

import copy
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..checks import short_text
from ..config import Config, check_world_size, save_yaml
from ..data.augment import VolumeAugment
from ..data.dataset import CachedVolumeDataset, infinite_loader
from ..data.io import display_path, write_json_atomic
from ..errors import HaganError
from ..models import build_model, model_spec
from ..models.base import DivergenceError
from ..run_folder import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    CURVES_FILE,
    GEOMETRY_FILE,
    SAMPLES_DIR,
    STATE,
    TENSORBOARD_DIR,
    append_scalars,
    iteration_name,
    list_checkpoints,
    read_scalars,
    truncate_scalars,
)
from ..viz import label_display, montage_grid, montage_tensor, plot_curves, three_plane_montage
from . import accel
from .checkpoint import clean_partial, load_checkpoint, save_checkpoint
from .distributed import DistContext, device_for, env_world_size, from_env

SAMPLE_SEED = 1234
SAMPLES_SHOWN = 4


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
    """A new run needs an empty or new folder (holding at most its own data cache, ``config.data.cache``);
    a resumed run takes its saved config, updated by ``config``. Checks only: the folder is created once
    every check has passed, so a failed start leaves nothing on disk."""
    config_path = run_dir / CONFIG_FILE
    if resume:
        if not config_path.is_file():
            raise HaganError(f"{run_dir}: nothing to resume (no {CONFIG_FILE}); start a new run without --resume")
        return config
    own_cache = Path(os.path.abspath(config.data.cache))
    if config_path.exists() or (run_dir.is_dir() and any(Path(os.path.abspath(entry)) != own_cache
                                                         for entry in run_dir.iterdir())):
        raise HaganError(f"{run_dir}: folder already holds files; pass --resume to continue it or choose another --out")
    return config


class Trainer:
    """Trains ``config`` into ``run_dir``; under torchrun one Trainer per rank (``dist``), rank 0 writes.

    Resuming restores everything that decides the next iteration: weights (with spectral-norm
    buffers), optimizer states, the trainer's random stream, the data order (loader epoch and
    position; augmentation is seeded per item from it) and the model's extra state (ADA's p), so
    N iterations straight and N/2 + resume + N/2 give the same weights (bitwise on CPU with
    ``train.deterministic``).
    """

    def __init__(
        self,
        config: Config,
        run_dir: str | os.PathLike,
        resume: bool = False,
        progress: bool = True,
        dist: DistContext | None = None,
    ):
        self.dist = dist or DistContext()
        check_world_size(config, self.dist.world_size)
        self.run_dir = Path(run_dir)
        self.device = accel.resolve_device(device_for(self.dist, config.train.device))
        if not config.data.cache:
            raise HaganError("no training data: pass --data CACHE (a folder written by `hagan preprocess`)")
        self.config = config
        self.dist.on_main(lambda: prepare_run_dir(self.run_dir, config, resume))
        self.resume = resume
        self.progress = progress and self.dist.is_main
        self.stopped_by_signal = False
        # augmentation runs on the training device, per item from the seed the loader gives it
        self.volume_augment = VolumeAugment() if config.data.augment else None
        self.dataset = CachedVolumeDataset(config.data.cache)
        self._check_data()
        if config.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.manual_seed(config.train.seed)
        if self.device.type == "cuda":
            accel.configure_cuda(config.train.deterministic)
        self.model = build_model(config).to(self.device).accelerate()
        self.model.dist = self.dist
        self.optimizers = self.model.optimizers()
        self.rng = torch.Generator().manual_seed(config.train.seed)
        self.loader = self._make_loader(config.train.seed)
        self.start_iteration = 0
        self.rollbacks = 0
        self.lr_scale = 1.0
        if resume:
            self._load_latest()
        # every rank starts from rank 0's parameters and buffers, as DistributedDataParallel does
        self.dist.broadcast_module(self.model)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(config, self.run_dir / CONFIG_FILE)
            write_json_atomic(self.run_dir / GEOMETRY_FILE, self.geometry())
        self.dist.barrier()

    def _make_loader(self, seed: int):
        cuda = self.device.type == "cuda"
        return infinite_loader(self.dataset, self.config.optim.batch_size, seed=seed, num_workers=self.workers,
                               rank=self.dist.rank, world_size=self.dist.world_size, pin_memory=cuda)

    @property
    def workers(self) -> int:
        """``data.workers``; auto (-1) loads in 4 background processes when training on a GPU, which a
        256^3 batch needs to keep up, and in the training process on CPU, where compute dominates."""
        if self.config.data.workers >= 0:
            return self.config.data.workers
        return min(4, max(1, (os.cpu_count() or 2) // 2)) if self.device.type == "cuda" else 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = next(self.loader)
        if self.volume_augment is not None:
            images = batch["image"].to(self.device, non_blocking=True)
            for i, seed in enumerate(batch["seed"].tolist()):
                self.volume_augment.reseed(seed)
                images[i] = self.volume_augment(images[i])
            batch["image"] = images
        return batch

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
            "reference_affine": self.dataset.reference_affine.tolist(),
            "recipe": manifest["recipe"],
            "mode": manifest["mode"],
            "size": manifest["size"],
            "num_classes": self.config.model.num_classes,
        }

    # ----- checkpoints -------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS_DIR

    def _latest_checkpoint_name(self, clean: bool = False) -> str | None:
        """Rank 0 decides which checkpoint every rank restores."""
        def pick() -> str | None:
            if clean:
                clean_partial(self.checkpoint_dir)
            found = list_checkpoints(self.checkpoint_dir)
            return found[-1].name if found else None
        return self.dist.on_main(pick)

    def _load_latest(self) -> None:
        name = self._latest_checkpoint_name(clean=True)
        if name is None:
            raise HaganError(f"{self.run_dir}: no complete checkpoint to resume from")
        self.start_iteration = self._restore(self.checkpoint_dir / name)
        if self.dist.is_main:
            truncate_scalars(self.run_dir, self.start_iteration)

    def _restore(self, checkpoint: Path) -> int:
        state = load_checkpoint(checkpoint, self.model, self.optimizers, self.rng)
        try:
            self.model.load_extra_state(state.get("extra", {}))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise HaganError(f"{display_path(checkpoint / STATE)}: extra does not fit model {self.config.model.name!r} "
                             f"({type(err).__name__}: {short_text(str(err), 80)})") from err
        iteration = int(state["iteration"])
        if "loader" in state:
            self.loader = self._make_loader(int(state["loader"].get("seed", self.config.train.seed)))
            self.loader.load_state_dict(state["loader"])
        else:  # checkpoints written before the loader had a state
            self.loader = self._make_loader(self.config.train.seed + iteration)
        self.rollbacks = int(state.get("rollbacks", 0))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        return iteration

    def training_state(self) -> dict[str, Any]:
        """What a checkpoint's state.json holds besides the iteration."""
        return {"extra": self.model.extra_state(), "loader": self.loader.state_dict(),
                "rollbacks": self.rollbacks, "lr_scale": self.lr_scale, "world_size": self.dist.world_size}

    def save(self, iteration: int) -> Path | None:
        """Rank 0 writes the checkpoint; the other ranks wait until it is complete."""
        path = None
        if self.dist.is_main:
            path = save_checkpoint(
                self.checkpoint_dir, iteration, self.model, self.optimizers, self.rng,
                self.training_state(), self.config.train.keep_checkpoints,
            )
        self.dist.barrier()
        return path

    def _snapshot(self, iteration: int) -> dict[str, Any]:
        """The starting state in memory: what a rollback returns to before the first checkpoint."""
        return {
            "iteration": iteration,
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizers": {k: copy.deepcopy(o.state_dict()) for k, o in self.optimizers.items()},
            "rng": self.rng.get_state(),
            "state": copy.deepcopy(self.training_state()),
        }

    def _restore_snapshot(self, snap: dict[str, Any]) -> int:
        self.model.load_state_dict(snap["model"])
        for key, optimizer in self.optimizers.items():
            optimizer.load_state_dict(copy.deepcopy(snap["optimizers"][key]))
        self.rng.set_state(snap["rng"])
        state = snap["state"]
        self.model.load_extra_state(copy.deepcopy(state["extra"]))
        self.loader = self._make_loader(state["loader"]["seed"])
        self.loader.load_state_dict(state["loader"])
        self.lr_scale = float(state["lr_scale"])
        return int(snap["iteration"])

    def rollback(self, err: DivergenceError, snapshot: dict[str, Any] | None) -> int:
        """Stop with the divergence message, or return to the last good state with lower learning rates."""
        t = self.config.train
        if t.on_divergence != "rollback":
            raise HaganError(f"{err.describe()}; {model_spec(self.config.model.name).divergence_hint}")
        if self.rollbacks >= t.max_rollbacks:
            raise HaganError(
                f"{err.describe()}; gave up after {self.rollbacks} rollback(s) (train.max_rollbacks = {t.max_rollbacks})"
            )
        rollbacks, scale = self.rollbacks + 1, self.lr_scale * t.rollback_lr_factor
        name = self._latest_checkpoint_name()
        if name is not None:
            iteration = self._restore(self.checkpoint_dir / name)
            source = name
        elif snapshot is not None:
            iteration = self._restore_snapshot(snapshot)
            source = f"the start (iteration {iteration})"
        else:  # pragma: no cover - fit always keeps a snapshot until the first checkpoint
            raise HaganError(err.describe() + "; no checkpoint to roll back to")
        restored_scale = self.lr_scale
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * scale / restored_scale
        self.rollbacks, self.lr_scale = rollbacks, scale
        if self.dist.is_main:
            truncate_scalars(self.run_dir, iteration)
            print(
                f"{err.describe()}; rolled back to {source} with the learning rates x{scale:g} of the configured "
                f"(rollback {rollbacks} of at most {t.max_rollbacks})",
                file=sys.stderr,
            )
        return iteration

    # ----- training ----------------------------------------------------------------------------
    def write_samples(self, iteration: int, writer: Any) -> None:
        """A montage of samples: three planes per volume, or for 2D models (samples of depth 1) the
        slices in a grid; a model that generates label maps (``segmentation_labels``) shows each
        sample's map beside it."""
        self.model.eval()
        rng = torch.Generator().manual_seed(SAMPLE_SEED)
        labels = (torch.arange(SAMPLES_SHOWN) % self.config.model.num_classes) if self.config.model.num_classes else None
        if self.model.segmentation_labels:
            volumes, segmentations = self.model.sample_with_segmentation(SAMPLES_SHOWN, rng)
            volumes, segmentations = volumes.float().cpu(), segmentations.cpu()
        else:
            volumes, segmentations = self.model.sample(SAMPLES_SHOWN, rng, labels).float().cpu(), None
        self.model.train()
        path = self.run_dir / SAMPLES_DIR / f"{iteration_name(iteration)}.png"
        shown, titles = [v[0].numpy() for v in volumes], None
        if segmentations is not None:
            maps = label_display(segmentations[:, 0].numpy(), self.model.segmentation_labels)
            shown = [x for pair in zip(shown, maps) for x in pair]
            titles = [t for i in range(len(volumes)) for t in (f"sample {i}", f"labels {i}")]
        cols = 2 if segmentations is not None else None  # a sample and its label map side by side
        if volumes.shape[2] == 1:
            montage_grid(shown, path, titles=titles, cols=cols)
        else:
            three_plane_montage(shown, path, titles=titles, cols=cols)
        writer.add_image("samples", montage_tensor(volumes), iteration)

    def periodic_kid(self) -> Any:
        """KID against a fixed real sample, like the authors' validation curve; real features computed once."""
        from ..evaluation import PeriodicKID, build_extractor

        t = self.config.train
        extractor = build_extractor(t.eval_features, device=str(self.device))
        return PeriodicKID(self.config.data.cache, extractor, n=t.eval_samples, seed=t.seed)

    def write_kid(self, iteration: int, tracker: Any, writer: Any) -> None:
        self.model.eval()
        rng = torch.Generator().manual_seed(SAMPLE_SEED)
        labels = torch.arange(self.config.train.eval_samples) % self.config.model.num_classes if self.config.model.num_classes else None
        value = tracker(lambda n: self.model.sample(n, rng, labels).float().cpu())
        self.model.train()
        writer.add_scalar("eval/kid", value, iteration)
        append_scalars(self.run_dir, {"iteration": iteration, "eval/kid": value})

    def _read_logs(self, logs: dict[str, torch.Tensor | float]) -> dict[str, float]:
        """The iteration's scalars (device tensors or numbers) as rank-averaged numbers, in one read from
        the device, so every rank logs and judges divergence on the same numbers."""
        keys = sorted(logs)
        values = torch.stack([torch.as_tensor(logs[k], dtype=torch.float64, device=self._comm_device).reshape(())
                              for k in keys])
        if self.dist.enabled:
            values = self.dist.all_reduce_mean(values)
        return dict(zip(keys, values.tolist()))

    def _check_divergence(self, logs: dict[str, float] | None, iteration: int) -> None:
        """Raise the first non-finite update the model recorded on the device since the last check, else
        a non-finite logged value; ``iteration`` (1-based) is the one just trained."""
        err = self.model.take_divergence()
        if err is not None:
            err.noticed = iteration
            raise err
        bad = [k for k, v in (logs or {}).items() if not math.isfinite(v)]
        if bad:
            err = DivergenceError(None, logs[bad[0]], "non-finite value", name=bad[0])
            err.iteration = iteration
            raise err

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _should_stop(self, stop: StopRequested, deadline: float) -> bool:
        """A signal or the time limit on any rank stops all ranks after the same iteration."""
        local = stop.requested or time.perf_counter() >= deadline
        if not self.dist.enabled:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=self._comm_device)
        return bool(self.dist.all_reduce_max(flag).item() > 0)

    def _writer(self, purge_step: int | None) -> Any:
        if not self.dist.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=purge_step)

    def fit(self) -> Path:
        """Train until ``train.iterations`` (or ``train.max_minutes``); returns the run folder.

        SIGINT and SIGTERM stop after the current iteration and save a checkpoint. NaN or Inf in a loss
        or gradient stops the run, or rolls it back (``train.on_divergence``).
        """
        t = self.config.train
        if self.start_iteration >= t.iterations:
            raise HaganError(
                f"{self.run_dir}: already trained {self.start_iteration} iterations; raise --iterations to continue"
            )
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        cudnn_benchmark = torch.backends.cudnn.benchmark
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        snapshot = None
        if t.on_divergence == "rollback" and self._latest_checkpoint_name() is None:
            snapshot = self._snapshot(self.start_iteration)
        main = self.dist.is_main
        kid_tracker = self.periodic_kid() if main and t.eval_every else None
        writer = self._writer(self.start_iteration if self.resume else None)
        self.model.train()
        iteration = self.start_iteration
        bar = tqdm(total=t.iterations, initial=iteration, desc="train", unit="it", disable=not self.progress,
                   dynamic_ncols=True)
        started = time.perf_counter()
        deadline = started + t.max_minutes * 60 if t.max_minutes else float("inf")
        try:
            with StopRequested() as stop:
                while iteration < t.iterations:
                    if self._should_stop(stop, deadline):
                        self.stopped_by_signal = stop.requested
                        break
                    done = iteration + 1
                    logged = done % t.log_every == 0 or done == t.iterations
                    try:
                        self.model.iteration = iteration
                        step_logs = self.model.train_step(self.next_batch(), iteration, self.rng)
                        # read back only when logging or before a checkpoint: the updates skip
                        # non-finite steps on the device, and the model keeps the first one
                        logs = self._read_logs(step_logs) if logged else None
                        if logged or done % t.checkpoint_every == 0:
                            self._check_divergence(logs, done)
                    except DivergenceError as err:
                        if err.iteration is None:
                            err.iteration = done
                        iteration = self.rollback(err, snapshot)
                        bar.reset(total=t.iterations)
                        bar.update(iteration)
                        if writer is not None:
                            writer.close()
                            writer = self._writer(iteration)
                        continue
                    # spectral norm's power-iteration vectors stay rank 0's (DDP's broadcast_buffers)
                    self.dist.broadcast_module(self.model, buffers_only=True)
                    iteration += 1
                    bar.update(1)
                    if main and logged:
                        bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in logs.items() if k.startswith("loss/")})
                        logs["speed/it_per_s"] = (iteration - self.start_iteration) / (time.perf_counter() - started)
                        for key, value in logs.items():
                            writer.add_scalar(key, value, iteration)
                        append_scalars(self.run_dir, {"iteration": iteration, **logs})
                    if main and iteration % t.sample_every == 0:
                        self.write_samples(iteration, writer)
                    if kid_tracker is not None and iteration % t.eval_every == 0:
                        self.write_kid(iteration, kid_tracker, writer)
                    if iteration % t.checkpoint_every == 0:
                        self.save(iteration)
                        snapshot = None
                rolled_back_at_stop = False
                try:  # stopped by a signal or the time limit between two checks
                    self._check_divergence(None, iteration)
                except DivergenceError as err:
                    rolled_back_at_stop = True
                    iteration = self.rollback(err, snapshot)
                if main and iteration % t.sample_every:
                    self.write_samples(iteration, writer)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
            if t.deterministic:
                torch.use_deterministic_algorithms(was_deterministic)
                torch.backends.cudnn.benchmark = cudnn_benchmark
        if rolled_back_at_stop or iteration % t.checkpoint_every:  # the rollback's count and rates must survive
            self.save(iteration)
        self.final_iteration = iteration
        if main:
            curves = read_scalars(self.run_dir)
            if curves:
                plot_curves(curves, self.run_dir / CURVES_FILE, title=f"{self.run_dir.name}: training curves")
        return self.run_dir


def train(
    config: Config, run_dir: str | os.PathLike, resume: bool = False, progress: bool = True,
    dist: DistContext | None = None,
) -> Path:
    """Train one run. Under torchrun (WORLD_SIZE > 1 in the environment) this process joins the
    process group as its rank; ``optim.batch_size`` is then the global batch."""
    owned = dist is None
    if owned:
        check_world_size(config, env_world_size())
        dist = from_env(config.train.device)
    try:
        return Trainer(config, run_dir, resume, progress, dist=dist).fit()
    finally:
        if owned:
            dist.close()
