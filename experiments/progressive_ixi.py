"""Train the progressive growing GAN on IXI T1 within a wall-clock budget, and report what it cost and
what it makes.

A progressive GAN's schedule is counted in images, but a fair comparison with an HA-GAN run is counted
in minutes, and its phases cost very different times (4^3 against 128^3). So the script first
calibrates: it times a few training iterations in every phase (each resolution's fade-in and stable
phase, and the encoder) on the real cache, with the peak memory of each; then it gives every GAN
phase the same number of iterations, as Karras et al. do, as many as fit in (1 - --encoder-share)
of --minutes, and the encoder the rest; then it trains through the trainer. Calibration time is not
part of the budget and is reported apart.

Prints one JSON object (per-phase it/s and peak memory from the calibration; iterations, seconds,
overall it/s and peak memory of the run; sample diversity; the encoder's reconstruction error) and
writes, under --out: the run (``run/``), ``progressive_grid.png`` (axial slices of 16 samples),
``progressive_planes.png`` (four samples in three planes), ``progressive_reconstruction.png`` and
``result.json``.

On a GPU at 128^3, with the minutes of the HA-GAN run in docs/small-data.md (6):

    python experiments/progressive_ixi.py --data CACHE128 --size 128 --minutes 6 --out runs/progressive-ixi128

On CPU at a toy size (the numbers then say nothing about quality):

    python experiments/progressive_ixi.py --data ../shared/data/ixi-t1-2mm/t1 --size 32 --width 0.25 \
        --minutes 3 --device cpu --max-volumes 20 --out runs/progressive-ixi32

--data is a cache from ``hagan preprocess`` or a folder of volumes (preprocessed to --size with the MRI
recipe into OUT/cache, the first --max-volumes files in name order).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from hagan.api import load_run
from hagan.config import build_config, parse_assignment
from hagan.data.dataset import CachedVolumeDataset, infinite_loader
from hagan.data.preprocess import ensure_cache
from hagan.evaluation.bench import device_name, peak_rss_bytes, reset_peak_rss
from hagan.evaluation.metrics import grey_levels, pairwise_mean_abs_diff
from hagan.models import build_model
from hagan.models.progressive.schedule import GrowthSchedule
from hagan.run_folder import SCALARS_FILE
from hagan.training.trainer import Trainer, pick_device
from hagan.viz import montage_grid, three_plane_montage

SAMPLES = 16
RECONSTRUCTED = 4




def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes())


def calibrate(config, steps: int) -> list[dict]:
    """Seconds per iteration and peak memory of every phase, on a throw-away model with a provisional
    schedule of one iteration per phase (so each phase's first iteration is its iteration index)."""
    probe = build_config(None, None, [config.to_dict(), {"progressive": {
        "fade_images": 1, "stable_images": 1, "final_images": 0}}])
    device = pick_device(probe.train.device)
    torch.manual_seed(probe.train.seed)
    model = build_model(probe).to(device).accelerate()
    model.train()
    loader = infinite_loader(CachedVolumeDataset(probe.data.cache), probe.optim.batch_size, seed=probe.train.seed)
    rng = torch.Generator().manual_seed(probe.train.seed)
    batches = [next(loader) for _ in range(2)]
    rows = []
    for phase in model.schedule.boundaries():
        model.train_step(batches[0], phase.start, rng)  # warm-up (allocator, kernels, Adam state)
        sync(device)
        reset_peak(device)
        started = time.perf_counter()
        for i in range(steps):
            model.train_step(batches[i % 2], phase.start, rng)
        sync(device)
        seconds = (time.perf_counter() - started) / steps
        rows.append({"phase": phase.name, "resolution": phase.resolution, "seconds_per_it": round(seconds, 4),
                     "it_per_s": round(1 / seconds, 2), "peak_mem_bytes": peak(device)})
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def plan(rows: list[dict], seconds: float, encoder_share: float) -> tuple[int, int]:
    """(iterations per GAN phase, encoder iterations) that fill ``seconds`` at the calibrated speeds."""
    gan = [r["seconds_per_it"] for r in rows if r["phase"] != "encoder"]
    encoder = [r["seconds_per_it"] for r in rows if r["phase"] == "encoder"][0]
    per_phase = max(1, math.floor(seconds * (1 - encoder_share) / sum(gan)))
    return per_phase, max(1, math.floor(seconds * encoder_share / encoder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a cache from `hagan preprocess`, or a folder of volumes")
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--dims", type=int, default=3, choices=[2, 3])
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = the preset's channels)")
    parser.add_argument("--latent-dim", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--start-size", type=int, default=4)
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock training budget")
    parser.add_argument("--encoder-share", type=float, default=0.1, help="share of the budget for the encoder")
    parser.add_argument("--calibration-steps", type=int, default=3, help="timed iterations per phase")
    parser.add_argument("--max-volumes", type=int, default=0, help="preprocess only the first N files (0: all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any further config override, e.g. progressive.max_channels=64")
    args = parser.parse_args()
    if not 0 < args.encoder_share < 1:
        raise SystemExit("--encoder-share must lie in (0, 1)")

    out = Path(args.out)
    cache = ensure_cache(Path(args.data), out / "cache", "mri", args.size, args.max_volumes)
    preset = "progressive-2d" if args.dims == 2 else "progressive-128"
    overrides = [
        {"data": {"cache": str(cache)}},
        {"model": {"size": args.size, "width": args.width, "latent_dim": args.latent_dim}},
        {"optim": {"batch_size": args.batch_size}},
        {"progressive": {"dims": args.dims, "start_size": args.start_size, "encoder": True}},
        # samples and the checkpoint once, at the end, so that the logged speed is training alone
        {"train": {"device": args.device, "precision": args.precision, "seed": args.seed, "log_every": 20,
                   "sample_every": 10**9, "checkpoint_every": 10**9}},
        *(parse_assignment(item) for item in args.set),
    ]
    config = build_config(preset, None, overrides)

    started = time.perf_counter()
    phases = calibrate(config, args.calibration_steps)
    calibration_seconds = time.perf_counter() - started
    per_phase, encoder_iterations = plan(phases, args.minutes * 60, args.encoder_share)
    p = config.progressive
    images = args.batch_size * (p.slices_per_volume if args.dims == 2 else 1)
    p.fade_images = p.stable_images = per_phase * images
    growth = GrowthSchedule(p.start_size, args.size, per_phase, per_phase).growth_iterations
    config.train.iterations = growth + encoder_iterations
    # a guard, not the budget: a run much slower than calibrated stops (and says so) instead of running on
    config.train.max_minutes = args.minutes * 1.5
    print(json.dumps({"calibration": phases, "iterations_per_phase": per_phase,
                      "encoder_iterations": encoder_iterations}), flush=True)

    run_dir = out / "run"
    trainer = Trainer(config, run_dir)
    device = trainer.device
    reset_peak(device)
    started = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - started
    run_peak = peak(device)
    logged = [json.loads(line) for line in (run_dir / SCALARS_FILE).read_text().splitlines()]
    last = logged[-1]

    run = load_run(run_dir, device=args.device)
    samples = run.generate(SAMPLES, seed=0)
    montage_grid(list(samples), out / "progressive_grid.png")
    real_set = CachedVolumeDataset(cache)
    real = np.stack([real_set[i]["image"][0].numpy() for i in range(min(SAMPLES, len(real_set)))])
    result = {
        "model": "progressive", "preset": preset, "dims": args.dims, "size": args.size, "width": args.width,
        "latent_dim": args.latent_dim, "batch_size": args.batch_size, "precision": run.model.precision,
        "device": device.type, "device_name": device_name(str(device)), "training_volumes": len(real_set),
        "minutes": args.minutes, "calibration_seconds": round(calibration_seconds, 1), "phases": phases,
        "iterations_per_phase": per_phase, "growth_iterations": growth, "encoder_iterations": encoder_iterations,
        "iterations": trainer.final_iteration, "completed": trainer.final_iteration == config.train.iterations,
        "train_seconds": round(seconds, 1), "it_per_s": round(trainer.final_iteration / seconds, 3),
        "peak_mem_bytes": run_peak, "mem_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "peak_rss",
        "params": {k: sum(p.numel() for p in m.parameters()) for k, m in run.model.named_children()},
        "final_phase": run.model.phase().name,
        "diversity_grey": round(pairwise_mean_abs_diff(grey_levels(samples)), 2),
        "real_diversity_grey": round(pairwise_mean_abs_diff(grey_levels(real)), 2),
        "final_losses": {k: round(v, 4) for k, v in last.items() if k.startswith("loss/")},
    }
    if args.dims == 3:
        three_plane_montage(list(samples[:4]), out / "progressive_planes.png")
    if args.dims == 3 and trainer.final_iteration > growth:  # a run stopped by the guard may have no encoder yet
        heads = real[:RECONSTRUCTED]
        reconstructed = run.reconstruct(heads)
        result["reconstruction_l1_grey"] = round(float((grey_levels(heads) - grey_levels(reconstructed)).abs().mean()), 2)
        three_plane_montage([*heads, *reconstructed], out / "progressive_reconstruction.png",
                            titles=[f"real {i}" for i in range(len(heads))] + [f"rec {i}" for i in range(len(heads))],
                            cols=2)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
