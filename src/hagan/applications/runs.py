"""The generative models an application uses: an existing run, or one it trains (and resumes) itself.

Everything goes through :func:`hagan.api.load_run`, so any registered model's run plugs in: the
applications call ``Run.encode``, ``Run.generate`` and ``Run.model.decode`` and nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hagan.api import Run, load_run
from hagan.config import Config, build_config, load_yaml, parse_assignment
from hagan.errors import HaganError
from hagan.run_folder import CONFIG_FILE, trained_iterations
from hagan.training.trainer import train


class TrainingPaused(HaganError):
    """A run stopped at its time limit before its last iteration; the same command continues it."""


def training_config(
    preset: str | None, config_path: str | None, assignments: Sequence[str], cache: Path, **sections: dict
) -> Config:
    """Preset, YAML file, ``--set`` assignments, then what the experiment fixes (data, size, classes)."""
    overrides = [parse_assignment(item) for item in assignments]
    overrides += [{"data": {"cache": str(cache)}}] + [{name: values} for name, values in sections.items() if values]
    return build_config(preset, config_path, overrides)


def ensure_run(config: Config, run_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Train ``config`` into ``run_dir``, resume it if an earlier call stopped early, or reuse it if done.

    A run folder holding another model refuses, rather than silently mixing two experiments.
    Raises :class:`TrainingPaused` when ``train.max_minutes`` ends training before ``train.iterations``.
    """
    run_dir = Path(run_dir)
    saved = run_dir / CONFIG_FILE
    done = trained_iterations(run_dir)
    if saved.is_file():
        previous = load_yaml(saved)
        if previous.get("model") != config.to_dict()["model"]:
            raise HaganError(f"{run_dir}: holds a run of another model configuration; remove it or choose another --out")
        if done == 0:
            raise HaganError(f"{run_dir}: holds a run with no checkpoint yet; remove it or choose another --out")
        if done < config.train.iterations:
            print(f"resuming {run_dir} at iteration {done} of {config.train.iterations}")
            train(config, run_dir, resume=True, progress=progress)
    else:
        train(config, run_dir, progress=progress)
    done = trained_iterations(run_dir)
    if done < config.train.iterations:
        raise TrainingPaused(
            f"{run_dir}: training stopped at iteration {done} of {config.train.iterations} (train.max_minutes); "
            "run the same command again to continue"
        )
    return run_dir


def open_runs(specs: Sequence[str], device: str) -> dict[str, list[Run]]:
    """``LABEL=RUN`` or ``LABEL=RUN0,RUN1,...`` (one unconditional run per class, in class order)."""
    runs: dict[str, list[Run]] = {}
    for spec in specs:
        label, sep, folders = spec.partition("=")
        if not sep or not label or not folders:
            raise HaganError(f"--compare {spec!r}: expected LABEL=RUN_DIR or LABEL=RUN_CLASS0,RUN_CLASS1,...")
        if label in runs:
            raise HaganError(f"--compare: label {label!r} given twice")
        runs[label] = [load_run(folder, device=device) for folder in folders.split(",")]
    return runs
