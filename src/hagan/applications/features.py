"""Clinically relevant feature extraction (HA-GAN's section IV-D, Table VI).

Real volumes are encoded to latent codes by each model's encoder; a ridge regression (the paper's
alpha 1e-4; the paper does not say whether it standardised the features, this does, so that the
penalty weighs every latent dimension alike; ``alpha=None`` chooses it by leave-one-out inside each
training fold, which a set with fewer subjects than latent dimensions needs) predicts the logarithm
of each measurement, and R^2 is
scored on held-out folds of repeated k-fold cross-validation (the same folds for every feature set,
so their R^2 are paired, and compared with the corrected resampled t-test). Two references need no model: ``constant`` predicts the training folds'
mean (R^2 just below 0), ``image-E^3`` regresses on the volume average-pooled to E^3 voxels, which
tells how much an encoder adds over raw intensities.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from hagan.api import Run
from hagan.errors import HaganError

from .datasets import VolumeSet, load_for_run, measurements
from .regression import cross_validated_r2, kfold_indices, out_of_fold_predictions
from .report import corrected_resampled_comparison, save_figure, write_results

CONSTANT = "constant"


@dataclass
class FeatureSettings:
    targets: list[tuple[str, str]]
    folds: int = 5
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    alpha: float | None = 1e-4  # None: chosen by leave-one-out inside each training fold
    log: bool = True
    image_edge: int = 8
    batch_size: int = 4

    def check(self) -> None:
        if not self.targets:
            raise HaganError("--targets: name at least one measurement")
        if not self.seeds or self.folds < 2 or (self.alpha is not None and self.alpha < 0) or self.image_edge < 0:
            raise HaganError("features: need seeds, --folds >= 2, --alpha >= 0 (or auto) and --image-edge >= 0")


def image_features(volumes: np.ndarray, edge: int) -> np.ndarray:
    """Volumes average-pooled to ``edge``^3, flattened: a model-free reference feature set."""
    pooled = F.adaptive_avg_pool3d(torch.as_tensor(volumes, dtype=torch.float32)[:, None], edge)
    return pooled.flatten(1).numpy().astype(np.float64)


def encode_inputs(
    inputs: Sequence[str | os.PathLike], encoders: dict[str, Run], batch_size: int, progress: bool
) -> tuple[VolumeSet, dict[str, np.ndarray]]:
    """Each encoder's codes of the inputs, read in that run's own geometry; the first run's volumes returned too."""
    loaded: dict[tuple, VolumeSet] = {}
    codes: dict[str, np.ndarray] = {}
    first: VolumeSet | None = None
    for label, run in encoders.items():
        key = (run.geometry.get("recipe"), run.geometry.get("mode"), run.size)
        if key not in loaded:
            loaded[key] = load_for_run(inputs, run.geometry, run.size, progress)
        data = loaded[key]
        if first is not None and data.names != first.names:
            raise HaganError(f"{label}: its preprocessing kept other volumes than the first model's; pass a cache per model")
        first = first or data
        print(f"encoding {len(data)} volumes with {label} ({run.config.model.name}, {run.size}^3)")
        codes[label] = run.encode(data.volumes, batch_size=batch_size).astype(np.float64)
    assert first is not None
    return first, codes


def run_features(
    inputs: Sequence[str | os.PathLike],
    table: dict[str, dict[str, str]],
    encoders: dict[str, Run],
    out: str | os.PathLike,
    settings: FeatureSettings,
    progress: bool = True,
) -> dict:
    """Write results.json and features.png into ``out``; returns the results."""
    settings.check()
    if not encoders:
        raise HaganError("features: no encoder to evaluate")
    started = time.perf_counter()
    out = Path(out)
    data, codes = encode_inputs(inputs, encoders, settings.batch_size, progress)
    keep, targets = measurements(data.names, table, settings.targets)
    feature_sets: dict[str, np.ndarray | None] = {label: c[keep] for label, c in codes.items()}
    if settings.image_edge:
        feature_sets[f"image-{settings.image_edge}^3"] = image_features(data.volumes[keep], settings.image_edge)
    feature_sets[CONSTANT] = None
    if settings.log:
        bad = [name for name, values in targets.items() if np.any(values <= 0)]
        if bad:
            raise HaganError(f"cannot take the logarithm of {', '.join(bad)}: values <= 0; pass --no-log")
        targets = {name: np.log(values) for name, values in targets.items()}
    if keep.sum() < settings.folds:
        raise HaganError(f"{int(keep.sum())} measured volumes are fewer than --folds {settings.folds}")

    r2 = {name: {label: cross_validated_r2(x, y, settings.folds, settings.seeds, settings.alpha)
                 for label, x in feature_sets.items()} for name, y in targets.items()}
    main = next(iter(encoders))
    test_train_ratio = 1 / (settings.folds - 1)
    comparisons = {name: {f"{main} vs {label}": corrected_resampled_comparison(scores[main]["per_fold"],
                                                                              scores[label]["per_fold"], test_train_ratio)
                          for label in scores if label != main} for name, scores in r2.items()}
    results = {
        "experiment": "features",
        "inputs": [str(p) for p in inputs],
        "subjects": int(keep.sum()),
        "volumes_without_measurements": int((~keep).sum()),
        "targets": {name: column for name, column in settings.targets},
        "transform": "log" if settings.log else "none",
        "regression": {"model": "ridge", "standardised": True, "folds": settings.folds,
                       "alpha": "leave-one-out in each training fold" if settings.alpha is None else settings.alpha},
        "seeds": settings.seeds,
        "encoders": {label: {"run": str(run.run_dir), "model": run.config.model.name, "iteration": run.iteration,
                             "size": run.size, "latent_dim": int(codes[label].shape[1])} for label, run in encoders.items()},
        "r2": r2,
        "paired_tests": comparisons,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_results(out, results)
    folds = kfold_indices(int(keep.sum()), settings.folds, settings.seeds[0])
    predictions = {name: out_of_fold_predictions(feature_sets[main], y, folds, settings.alpha) for name, y in targets.items()}
    features_figure(r2, targets, predictions, main, settings.log, out / "features.png")
    return results


def features_figure(
    r2: dict, targets: dict[str, np.ndarray], predictions: dict[str, np.ndarray], main: str, log: bool, path: Path
) -> Path:
    """Held-out R^2 of every feature set per measurement, and the main encoder's predictions (first seed)."""
    names = list(r2)
    figure = Figure(figsize=(4 + 3 * len(names), 6.5), layout="constrained")
    top, bottom = figure.subfigures(2, 1, height_ratios=[1, 1])
    ax = top.subplots()
    labels = list(r2[names[0]])
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        means = [r2[name][label]["pooled_mean"] for name in names]
        stds = [r2[name][label]["pooled_std"] for name in names]
        ax.bar(np.arange(len(names)) + (i - (len(labels) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=label)
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xticks(np.arange(len(names)), [f"log {n}" if log else n for n in names])
    ax.set_ylabel("held-out R² (mean ± sd over seeds)")
    ax.set_ylim(bottom=max(-1.0, min(0.0, ax.get_ylim()[0])))
    ax.legend(fontsize=8, ncols=len(labels))
    scatter = bottom.subplots(1, len(names), squeeze=False)[0]
    for axis, name in zip(scatter, names):
        y, p = targets[name], predictions[name]
        axis.scatter(y, p, s=12)
        lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
        axis.plot([lo, hi], [lo, hi], color="k", linewidth=0.8)
        axis.set_xlabel(f"measured {'log ' if log else ''}{name}", fontsize=9)
        axis.set_ylabel(f"{main}: held-out prediction", fontsize=9)
    return save_figure(figure, path)
