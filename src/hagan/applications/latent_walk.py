"""Exploring the latent space (HA-GAN's section IV-E, Fig. 5): a walk along a measurement's direction.

A linear regression from encoded latents to a measurement (lung or bone volume, ventricle volume)
defines how far to go: a reference latent moves along a direction until the regression predicts
each target in turn, and the generated volumes are segmented to measure what actually changed.

Two choices are exposed because the literal one fails where an encoder is imperfect:

* ``direction``: ``weights`` is the regression's coefficient vector, the paper's wording. With more
  latent dimensions than subjects its largest weights sit on directions in which the codes barely
  vary, so the walk moves the prediction quickly while moving the volume little or not at all.
  ``pattern`` (default) is the same regression's activation pattern (Haufe et al., NeuroImage 2014):
  the covariance of the codes with the prediction, Sigma g / (g' Sigma g). It is the change of the
  codes that goes with a unit change of the prediction in the data, and it moves the prediction
  at the same rate as ``weights`` (g . d = 1 for both), so "until the target is reached" is unchanged.
* ``reference``: ``random`` draws the start from the prior, as the paper; ``encoded`` starts from a
  real volume's code. HA-GAN's encoder is not trained to match the prior, and results.json reports
  how far the codes lie from it (mean absolute code mean and code spread): when far, a direction
  learned among the codes says little about the generator near random latents.
* ``fit_on``: ``real`` regresses the table's measurement on the encoded real volumes, the paper's
  way; ``generated`` regresses the segmented volume of the generator's own samples on their latents,
  which needs no encoder and asks the generator directly which way the tissue grows, so it still
  works where encoding and decoding disagree (a generator and encoder early in training, or a model
  without an encoder). The targets are then quantiles of the generated samples' segmented volumes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.stats
import torch
from matplotlib.figure import Figure
from scipy import ndimage

from hagan.api import Run
from hagan.errors import HaganError

from .datasets import load_for_run, measurements
from .regression import Standardiser, fit_ridge, loo_alpha, r2_score
from .report import save_figure, write_results
from .segment import SEGMENTERS, affine_spacing, segment, volume_ml

DIRECTIONS = ("pattern", "weights")
REFERENCES = ("random", "encoded")
FIT_ON = ("real", "generated")
MASK_COLOUR = (0.1, 0.9, 0.2)


@dataclass
class WalkSettings:
    target: tuple[str, str]
    tissue: str
    steps: int = 7
    references: int = 3
    reference: str = "random"
    direction: str = "pattern"
    target_quantiles: tuple[float, float] = (0.05, 0.95)
    class_label: int | None = None
    alpha: float | None = None
    seed: int = 0
    fit_on: str = "real"
    samples: int = 128

    def check(self) -> None:
        problems = []
        if self.tissue not in SEGMENTERS:
            problems.append(f"--tissue must be one of {', '.join(SEGMENTERS)}")
        if self.direction not in DIRECTIONS:
            problems.append(f"--direction must be one of {', '.join(DIRECTIONS)}")
        if self.fit_on not in FIT_ON:
            problems.append(f"--fit-on must be one of {', '.join(FIT_ON)}")
        if self.fit_on == "generated" and self.samples < 8:
            problems.append(f"--samples must be at least 8 to fit a direction, got {self.samples}")
        if self.reference not in REFERENCES:
            problems.append(f"--reference must be one of {', '.join(REFERENCES)}")
        if self.steps < 3 or self.references < 1:
            problems.append("--steps must be at least 3 and --references at least 1")
        low, high = self.target_quantiles
        if not 0 <= low < high <= 1:
            problems.append(f"--target-quantiles must satisfy 0 <= low < high <= 1, got {self.target_quantiles}")
        if self.alpha is not None and self.alpha < 0:
            problems.append(f"--alpha must not be negative, got {self.alpha}")
        if problems:
            raise HaganError("latent walk: " + "; ".join(problems))


@dataclass
class LinearProbe:
    """Prediction f(z) = w . (z - mu) / s + b in raw latent units, its gradient and its walking direction."""

    scaler: Standardiser
    weights: np.ndarray
    intercept: float
    direction: np.ndarray
    alpha: float

    def predict(self, z: np.ndarray) -> np.ndarray:
        return self.scaler(np.atleast_2d(z)) @ self.weights + self.intercept

    @property
    def gradient(self) -> np.ndarray:
        return self.weights / self.scaler.scale


def fit_probe(codes: np.ndarray, values: np.ndarray, direction: str, alpha: float | None) -> LinearProbe:
    """Ridge from codes to the measurement (penalty by leave-one-out unless given) and the walking direction,
    scaled so that one unit along it raises the prediction by one unit of the measurement."""
    codes = np.asarray(codes, np.float64)
    scaler = Standardiser.fit(codes)
    chosen = loo_alpha(scaler(codes), values)[0] if alpha is None else alpha
    model = fit_ridge(scaler(codes), values, chosen)
    gradient = model.weights / scaler.scale
    if not np.any(gradient):
        raise HaganError("the regression found no latent direction (all weights 0); is the measurement constant?")
    if direction == "weights":
        step = gradient / (gradient @ gradient)
    else:
        pattern = np.cov(codes, rowvar=False) @ gradient
        step = pattern / (gradient @ pattern)
    return LinearProbe(scaler, model.weights, model.intercept, step, chosen)


def walk_latents(probe: LinearProbe, start: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Latents along the direction from ``start`` at which the probe predicts each target."""
    return start[None] + (targets - probe.predict(start)[0])[:, None] * probe.direction[None]


def monotonic_trend(targets: np.ndarray, measured: np.ndarray) -> float:
    """Spearman correlation of measured against intended values; 0 when nothing changed."""
    if np.ptp(measured) == 0:
        return 0.0
    return float(scipy.stats.spearmanr(targets, measured).statistic)


def run_latent_walk(
    inputs: Sequence[str | os.PathLike],
    table: dict[str, dict[str, str]],
    run: Run,
    out: str | os.PathLike,
    settings: WalkSettings,
    progress: bool = True,
) -> dict:
    """Write results.json, latent_walk.png and the first walk's volumes into ``out``; returns the results."""
    settings.check()
    started = time.perf_counter()
    out = Path(out)
    recipe = run.geometry.get("recipe", "")
    spacing = affine_spacing(run.affine)
    data = load_for_run(inputs, run.geometry, run.size, progress)
    keep, values = measurements(data.names, table, [settings.target])
    name = settings.target[0]
    real = data.subset(keep)
    y = values[name]
    needs_codes = settings.fit_on == "real" or settings.reference == "encoded"
    codes = run.encode(real.volumes).astype(np.float64) if needs_codes else None
    segmented_real = np.array([volume_ml(segment(v, settings.tissue, recipe, spacing), spacing) for v in real.volumes])

    def decode_and_measure(latents: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        volumes = np.concatenate(list(run.decode_batches(torch.as_tensor(latents, dtype=torch.float32),
                                                         settings.class_label, batch_size=4)))[:, 0]
        masks = [segment(v, settings.tissue, recipe, spacing) for v in volumes]
        return volumes, masks, np.array([volume_ml(m, spacing) for m in masks])

    if settings.fit_on == "real":
        fit_codes, fit_values, walked = codes, y, name
    else:  # the generator's own samples, drawn apart from the references' seed
        fit_codes = run.latents(settings.samples, seed=settings.seed + 1).numpy().astype(np.float64)
        fit_values = decode_and_measure(fit_codes)[2]
        walked = f"segmented {settings.tissue} (ml)"
    probe = fit_probe(fit_codes, fit_values, settings.direction, settings.alpha)
    targets = np.linspace(*np.quantile(fit_values, settings.target_quantiles), settings.steps)

    if settings.reference == "random":
        starts = run.latents(settings.references, seed=settings.seed).numpy().astype(np.float64)
        start_names = [f"prior seed {settings.seed} #{i}" for i in range(settings.references)]
    else:
        chosen = np.random.default_rng(settings.seed).permutation(len(y))[: settings.references]
        starts, start_names = codes[chosen], [real.names[i] for i in chosen]
    walks, first_volumes, first_masks = [], None, None
    for start, start_name in zip(starts, start_names):
        path = walk_latents(probe, start, targets)
        volumes, masks, measured = decode_and_measure(path)
        walks.append({
            "reference": start_name,
            "predicted_at_reference": float(probe.predict(start)[0]),
            "latent_distance": float(np.linalg.norm(path[-1] - path[0])),
            "measured_ml": measured.tolist(),
            "spearman": monotonic_trend(targets, measured),
            "change_ml": float(measured[-1] - measured[0]),
        })
        if first_volumes is None:
            first_volumes, first_masks = volumes, masks
    run.save(first_volumes, out / "walk", prefix=f"{name}_step")

    trends = [w["spearman"] for w in walks]
    results = {
        "experiment": "latent-walk",
        "run": {"dir": str(run.run_dir), "model": run.config.model.name, "iteration": run.iteration, "size": run.size},
        "inputs": [str(p) for p in inputs],
        "subjects": int(keep.sum()),
        "target": {"name": name, "column": settings.target[1], "walked": walked,
                   "quantiles": list(settings.target_quantiles), "values": targets.tolist()},
        "tissue": settings.tissue,
        "segmentation": {"rule": SEGMENTERS[settings.tissue][1].__name__, "spacing_mm": list(spacing),
                         "real_pearson_with_target": float(np.corrcoef(segmented_real, y)[0, 1]) if np.ptp(segmented_real) else 0.0,
                         "real_mean_ml": float(segmented_real.mean())},
        "regression": {"fit_on": settings.fit_on, "samples": len(fit_values), "alpha": probe.alpha,
                       "alpha_choice": "leave-one-out" if settings.alpha is None else "given",
                       "in_sample_r2": r2_score(fit_values, probe.predict(fit_codes)), "direction": settings.direction},
        "codes": None if codes is None else {
            "mean_abs_mean": float(np.abs(codes.mean(axis=0)).mean()), "mean_std": float(codes.std(axis=0).mean()),
            "prior": "mean 0, std 1 per dimension", "latent_dim": int(codes.shape[1])},
        "reference": settings.reference,
        "class_label": settings.class_label,
        "seed": settings.seed,
        "walks": walks,
        "summary": {"mean_spearman": float(np.mean(trends)), "increasing_walks": int(sum(t > 0 for t in trends)),
                    "walks": len(walks), "mean_change_ml": float(np.mean([w["change_ml"] for w in walks]))},
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_results(out, results)
    walk_figure(first_volumes, first_masks, targets, walks, walked, settings.tissue, out / "latent_walk.png")
    return results


def _overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    grey = np.repeat(((np.clip(image, -1, 1) + 1) / 2)[..., None], 3, axis=-1)
    edge = mask & ~ndimage.binary_erosion(mask)
    grey[mask] = 0.55 * grey[mask] + 0.45 * np.array(MASK_COLOUR)
    grey[edge] = MASK_COLOUR
    return grey


def walk_figure(
    volumes: np.ndarray, masks: list[np.ndarray], targets: np.ndarray, walks: list[dict], name: str, tissue: str,
    path: Path,
) -> Path:
    """The first walk's coronal and axial middle slices with the mask in green, and every walk's measured volume."""
    steps = len(volumes)
    figure = Figure(figsize=(1.6 * steps + 4.5, 3.6), layout="constrained")
    left, right = figure.subfigures(1, 2, width_ratios=[1.6 * steps, 4.5])
    axes = left.subplots(2, steps, squeeze=False)
    for k, (volume, mask) in enumerate(zip(volumes, masks)):
        middle = volume.shape[1] // 2, volume.shape[0] // 2
        coronal = _overlay(np.flipud(volume[:, middle[0], :]), np.flipud(mask[:, middle[0], :]))
        axial = _overlay(volume[middle[1]], mask[middle[1]])
        for row, image in enumerate((coronal, axial)):
            axes[row, k].imshow(image)
            axes[row, k].set_xticks([]), axes[row, k].set_yticks([])
        axes[0, k].set_title(f"{walks[0]['measured_ml'][k]:.0f} ml", fontsize=8)
        axes[1, k].set_xlabel(f"target {targets[k]:.0f}", fontsize=7)
    axes[0, 0].set_ylabel("coronal", fontsize=8)
    axes[1, 0].set_ylabel("axial", fontsize=8)
    left.suptitle(f"walk 1: {tissue} mask in green, measured volume above", fontsize=9)
    ax = right.subplots()
    for i, walk in enumerate(walks):
        ax.plot(targets, walk["measured_ml"], marker="o", label=f"walk {i + 1} (ρ={walk['spearman']:.2f})")
    ax.set_xlabel(f"regression's predicted {name}")
    ax.set_ylabel(f"segmented {tissue} volume (ml)")
    ax.legend(fontsize=7)
    return save_figure(figure, path)
