"""The quick-start job: phantoms with ground truth -> cache -> a small HA-GAN trained on CPU -> samples."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..api import load_run
from ..config import build_config
from ..data.dataset import CachedVolumeDataset
from ..data.phantoms import RECIPE_FOR_KIND, write_phantom_dataset
from ..data.preprocess import preprocess_folder
from ..errors import HaganError
from ..evaluation.metrics import pairwise_mean_abs_diff
from ..run_folder import CURVES_FILE, SAMPLES_DIR
from ..training.trainer import train
from ..viz import three_plane_montage

PHANTOM_SIZE = 64
GENERATED = 8


def run_demo(
    out: str | os.PathLike, kind: str = "thorax-ct", n: int = 48, iterations: int | None = None, seed: int = 0
) -> Path:
    """Run every stage into ``out`` and print where each result went; returns the run folder."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise HaganError(f"{out}: folder already holds files; choose another --out or remove it")
    overrides = [{"train": {"seed": seed}}] + ([{"train": {"iterations": iterations}}] if iterations else [])
    config = build_config("demo", None, overrides)
    size = config.model.size

    print(f"[1/4] writing {n} {kind} phantoms ({PHANTOM_SIZE}^3) with their ground-truth attributes")
    attributes = write_phantom_dataset(out / "phantoms", kind=kind, n=n, size=PHANTOM_SIZE, seed=seed, progress=True)

    print(f"[2/4] preprocessing with the {RECIPE_FOR_KIND[kind]!r} recipe to {size}^3")
    report = preprocess_folder(out / "phantoms", out / "cache", recipe=RECIPE_FOR_KIND[kind], size=size, progress=True)
    print(report.summary())

    print(f"[3/4] training HA-GAN ({config.train.iterations} iterations, preset 'demo') on {torch.device('cpu')}")
    config.data.cache = str(out / "cache")
    run_dir = train(config, out / "run")

    print(f"[4/4] generating {GENERATED} volumes")
    run = load_run(run_dir)
    volumes = run.generate(GENERATED, seed=seed)
    run.save(volumes, out / "generated")
    three_plane_montage(list(volumes), out / "generated" / "montage.png")
    real = np.stack([CachedVolumeDataset(out / "cache")[i]["image"][0].numpy() for i in range(GENERATED)])
    three_plane_montage(list(real), out / "real_montage.png")
    generated_diversity = pairwise_mean_abs_diff(torch.from_numpy(volumes))
    real_diversity = pairwise_mean_abs_diff(torch.from_numpy(real))
    print(
        f"done. phantom attributes: {attributes}\n"
        f"  generated NIfTI and montage: {out / 'generated'}\n"
        f"  real montage for comparison: {out / 'real_montage.png'}\n"
        f"  training curves: {run_dir / CURVES_FILE}; samples during training: {run_dir / SAMPLES_DIR}\n"
        f"  diversity (mean absolute difference between samples, [-1, 1] units): "
        f"generated {generated_diversity:.3f}, real {real_diversity:.3f}"
    )
    return run_dir
