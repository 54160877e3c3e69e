"""GAN augmentation for supervised learning (HA-GAN's section IV-C, Table V).

For each seed, the Table VIII classifier is trained twice from the same initialisation (the seed
also seeds the shuffling, though the two sets' orders differ): on the real training set, and on the real set plus synthetic labelled volumes that make up
``synthetic_fraction`` (20%) of the augmented set, drawn with the training set's class proportions.
Accuracy on the held-out test split is compared over the seeds with a paired test.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from hagan.api import Run
from hagan.errors import HaganError
from hagan.training.accel import resolve_device

from .classifier import TrainingRecipe, classification_scores, predict_proba, train_classifier
from .datasets import VolumeSet, load_cache
from .report import mean_std, paired_comparison, save_figure, write_results

REAL = "real"
METRICS = ("accuracy", "balanced_accuracy", "auc")
SYNTHETIC_SEED_OFFSET = 10_000  # latents of seed s: far from the seeds training montages use


@dataclass
class AugmentationSettings:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    synthetic_fraction: float = 0.2
    classifier: TrainingRecipe = field(default_factory=TrainingRecipe)
    device: str = "auto"
    generate_batch: int = 4

    def check(self) -> None:
        if not 0 < self.synthetic_fraction < 1:
            raise HaganError(f"--synthetic-fraction must lie in (0, 1), got {self.synthetic_fraction}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise HaganError(f"--seeds must be distinct integers, got {self.seeds}")
        self.classifier.check()


def class_counts(labels: np.ndarray, total: int, num_classes: int) -> np.ndarray:
    """``total`` split over the classes in the proportions of ``labels`` (largest remainders round up)."""
    share = np.bincount(labels, minlength=num_classes) / len(labels) * total
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(counts - share)[: total - counts.sum()]] += 1
    return counts


def synthetic_count(n_real: int, fraction: float) -> int:
    """Synthetic volumes that make up ``fraction`` of the augmented set (the paper's 20% beside 80% real)."""
    return int(round(n_real * fraction / (1 - fraction)))


def generate_labelled(generator: list[Run], counts: np.ndarray, seed: int, batch_size: int = 4) -> np.ndarray:
    """Volumes of each class in order: from one class-conditional run, or from one unconditional run per class."""
    labels = np.repeat(np.arange(len(counts)), counts)
    if len(generator) == 1:
        return generator[0].generate(len(labels), seed=seed, labels=labels.tolist(), batch_size=batch_size)
    if len(generator) != len(counts):
        raise HaganError(f"per-class generation needs one run per class ({len(counts)}), got {len(generator)}")
    parts = [run.generate(int(n), seed=seed + 1000 * c, batch_size=batch_size) for c, (run, n) in enumerate(zip(generator, counts)) if n]
    return np.concatenate(parts)


def first_of_each_class(volumes: np.ndarray, labels: np.ndarray, num_classes: int) -> list[np.ndarray | None]:
    """One volume per class for the figure (None where a class has none)."""
    return [volumes[np.flatnonzero(labels == c)[0]] if np.any(labels == c) else None for c in range(num_classes)]


def _check_generator(label: str, generator: list[Run], num_classes: int, size: int) -> None:
    for run in generator:
        if run.size != size:
            raise HaganError(f"{label}: {run.run_dir} generates {run.size}^3 volumes but the data are {size}^3")
    if len(generator) == 1 and generator[0].config.model.num_classes != num_classes:
        raise HaganError(
            f"{label}: {generator[0].run_dir} has {generator[0].config.model.num_classes} classes (0: unconditional) "
            f"but the data have {num_classes}; pass a class-conditional run or one run per class (LABEL=RUN0,RUN1,...)"
        )
    if len(generator) > 1 and any(run.config.model.num_classes for run in generator):
        raise HaganError(f"{label}: one run per class must be unconditional runs")


def _evaluate(model: torch.nn.Module, held_out: dict[str, VolumeSet], device: torch.device) -> dict[str, dict[str, float]]:
    return {split: classification_scores(predict_proba(model, data.volumes, device), data.labels)
            for split, data in held_out.items()}


def run_augmentation(
    splits: dict[str, Path],
    generators: dict[str, list[Run]],
    out: str | os.PathLike,
    settings: AugmentationSettings,
    progress: bool = True,
) -> dict:
    """Write results.json and augmentation.png into ``out``; returns the results.

    ``splits`` maps ``train``, ``test`` (and optionally ``val``) to labelled caches; ``generators``
    maps a label (``hagan``, ``alpha-gan``, ...) to its run or its per-class runs.
    """
    settings.check()
    started = time.perf_counter()
    out = Path(out)
    device = resolve_device(settings.device)
    train = load_cache(splits["train"], progress)
    held_out = {split: load_cache(path, progress) for split, path in splits.items() if split != "train"}
    if "test" not in held_out:
        raise HaganError("the augmentation experiment needs a test split")
    for split, data in {"train": train, **held_out}.items():
        if np.any(data.labels < 0):
            raise HaganError(f"{splits[split]}: every volume needs a class label (some are -1)")
    num_classes = int(max(train.labels.max(), *(d.labels.max() for d in held_out.values()))) + 1
    size = train.volumes.shape[-1]
    for label, generator in generators.items():
        _check_generator(label, generator, num_classes, size)
    binary = bool(np.isin(train.volumes[: min(len(train), 32)], (-1.0, 1.0)).all())
    n_synthetic = synthetic_count(len(train), settings.synthetic_fraction)
    counts = class_counts(train.labels, n_synthetic, num_classes)
    arms = [REAL] + [f"{REAL}+{label}" for label in generators]
    evaluated = {"train": train, **held_out}  # the real training set shows how far each classifier fits it
    scores = {arm: {split: {metric: [] for metric in METRICS} for split in evaluated} for arm in arms}
    examples: dict[str, list[np.ndarray | None]] = {}

    for seed in tqdm(settings.seeds, desc="seeds", unit="seed", disable=not progress):
        sets = {REAL: (train.volumes, train.labels)}
        for label, generator in generators.items():
            synthetic = generate_labelled(generator, counts, SYNTHETIC_SEED_OFFSET + seed, settings.generate_batch)
            if binary:  # masks: threshold the generator's continuous output as the real data are stored
                synthetic = np.where(synthetic >= 0, 1.0, -1.0).astype(np.float32)
            synthetic_labels = np.repeat(np.arange(num_classes), counts)
            examples.setdefault(label, first_of_each_class(synthetic, synthetic_labels, num_classes))
            sets[f"{REAL}+{label}"] = (np.concatenate([train.volumes, synthetic]),
                                       np.concatenate([train.labels, synthetic_labels]))
        for arm, (volumes, labels) in sets.items():
            model = train_classifier(volumes, labels, num_classes, settings.classifier, seed, device, progress,
                                     description=f"{arm} seed {seed}")
            for split, values in _evaluate(model, evaluated, device).items():
                for metric, value in values.items():
                    scores[arm][split][metric].append(value)

    summary = {arm: {split: {metric: mean_std(v) for metric, v in values.items()} for split, values in by_split.items()}
               for arm, by_split in scores.items()}
    comparisons = {f"{arm} vs {REAL}": {metric: paired_comparison(scores[arm]["test"][metric], scores[REAL]["test"][metric])
                                        for metric in METRICS} for arm in arms[1:]}
    results = {
        "experiment": "augmentation",
        "data": {"splits": {k: str(v) for k, v in splits.items()}, "size": size, "classes": num_classes,
                 "train": len(train), **{split: len(d) for split, d in held_out.items()},
                 "train_class_counts": np.bincount(train.labels, minlength=num_classes).tolist(), "binary_masks": binary,
                 "test_majority_class_accuracy": float(np.bincount(held_out["test"].labels).max() / len(held_out["test"]))},
        "synthetic": {"fraction_of_augmented_set": settings.synthetic_fraction, "count": n_synthetic,
                      "class_counts": counts.tolist(), "latent_seed": f"{SYNTHETIC_SEED_OFFSET} + seed"},
        "generators": {label: [{"run": str(r.run_dir), "model": r.config.model.name, "iteration": r.iteration}
                               for r in generator] for label, generator in generators.items()},
        "classifier": {"architecture": "HA-GAN supplementary Table VIII", "optimizer": "Adam", **asdict(settings.classifier)},
        "device": str(device),
        "seeds": settings.seeds,
        "scores": scores,
        "summary": summary,
        "paired_tests": comparisons,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_results(out, results)
    augmentation_figure(scores, examples, train, held_out["test"].labels, num_classes, out / "augmentation.png")
    return results


def augmentation_figure(
    scores: dict, examples: dict[str, list[np.ndarray | None]], train: VolumeSet, test_labels: np.ndarray,
    num_classes: int, path: Path,
) -> Path:
    """Test accuracy of each arm with one line per seed and the majority-class rate a classifier must beat,
    beside a real and a synthetic volume of each class."""
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = figure.subfigures(1, 2, width_ratios=[1, 1.3])
    ax = left.subplots()
    arms = list(scores)
    values = np.array([scores[arm]["test"]["accuracy"] for arm in arms]) * 100
    positions = np.arange(len(arms))
    ax.plot(positions, values, color="0.7", marker="o", linewidth=1)
    ax.errorbar(positions, values.mean(axis=1), yerr=values.std(axis=1, ddof=1) if values.shape[1] > 1 else None,
                fmt="s", color="C3", capsize=6, label="mean ± sd")
    majority = 100 * np.bincount(test_labels, minlength=num_classes).max() / len(test_labels)
    ax.axhline(majority, color="k", linestyle="--", linewidth=0.8, label=f"majority class ({majority:.0f}%)")
    ax.set_xticks(positions, arms, rotation=15)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Table VIII CNN, {values.shape[1]} seeds (grey: one seed)", fontsize=10)
    ax.legend(fontsize=8)
    rows = [("real", first_of_each_class(train.volumes, train.labels, num_classes)), *examples.items()]
    axes = right.subplots(len(rows), num_classes, squeeze=False)
    for r, (name, volumes) in enumerate(rows):
        for c in range(num_classes):
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            if volumes[c] is not None:
                axes[r, c].imshow(volumes[c][len(volumes[c]) // 2], cmap="gray", vmin=-1, vmax=1)
            if r == 0:
                axes[r, c].set_title(f"class {c}", fontsize=9)
            if c == 0:
                axes[r, c].set_ylabel(name, fontsize=9)
    right.suptitle("middle axial slice", fontsize=10)
    return save_figure(figure, path)
