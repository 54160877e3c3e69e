"""Train one of HA-GAN's baselines (WGAN-GP, alpha-GAN, VAE-GAN) on IXI T1 for a wall-clock budget and
report what it cost and what it makes: training speed (overall, and steady from the first logged
iteration on) and peak memory, samples, their diversity, and (for the models with an encoder) the
reconstruction error of real heads and the spread of their codes.

Prints one JSON object and writes, under --out: the run (``run/``), ``MODEL_grid.png`` (axial slices of
16 samples), ``MODEL_planes.png`` (four samples in three planes), ``MODEL_reconstruction.png`` (four
real heads and their reconstructions) and ``result.json``.

On a GPU, with the same minutes as an HA-GAN run (docs/small-data.md: 6 minutes at 128^3):

    python experiments/baselines_ixi.py --data CACHE128 --model alpha-gan --size 128 --minutes 6 \
        --out runs/baselines-ixi128/alpha-gan

On CPU, a toy size (the numbers then say nothing about quality):

    python experiments/baselines_ixi.py --data ../shared/data/ixi-t1-2mm/t1 --model alpha-gan --size 32 \
        --width 0.125 --latent-dim 64 --iterations 100 --device cpu --out runs/baselines-ixi32/alpha-gan

--data is a cache from ``hagan preprocess`` or a folder of volumes (preprocessed to --size with the MRI
recipe into OUT/cache, the first --max-volumes files in name order).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from hagan.api import load_run
from hagan.config import PRESETS, build_config, parse_assignment
from hagan.data.dataset import CachedVolumeDataset
from hagan.data.preprocess import ensure_cache
from hagan.evaluation.bench import device_name, peak_rss_bytes, reset_peak_rss
from hagan.evaluation.metrics import grey_levels, pairwise_mean_abs_diff
from hagan.run_folder import SCALARS_FILE
from hagan.training.trainer import Trainer
from hagan.viz import montage_grid, three_plane_montage

MODELS = ("wgan-gp", "alpha-gan", "vae-gan")
SAMPLES = 16
RECONSTRUCTED = 4




def steady_speed(logged: list[dict]) -> float | None:
    """Iterations per second from the first logged iteration to the last, past start-up and warm-up."""
    if len(logged) < 2:
        return None
    first, last = logged[0], logged[-1]
    elapsed = last["iteration"] / last["speed/it_per_s"] - first["iteration"] / first["speed/it_per_s"]
    return round((last["iteration"] - first["iteration"]) / elapsed, 3)


def preset_for(model: str, size: int) -> str:
    """The model's Kwon et al. preset nearest in size (the architecture itself follows model.size)."""
    return f"{model}-128" if size >= 128 and f"{model}-128" in PRESETS else f"{model}-64"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a cache from `hagan preprocess`, or a folder of volumes")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="alpha-gan", choices=MODELS)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = the published layout)")
    parser.add_argument("--latent-dim", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=0.0, help="wall-clock training budget (0: none)")
    parser.add_argument("--iterations", type=int, default=1_000_000)
    parser.add_argument("--max-volumes", type=int, default=0, help="preprocess only the first N files (0: all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any further config override, e.g. baseline.critic_norm=batch")
    args = parser.parse_args()

    out = Path(args.out)
    cache = ensure_cache(Path(args.data), out / "cache", "mri", args.size, args.max_volumes)
    preset = preset_for(args.model, args.size)
    overrides = [
        {"data": {"cache": str(cache)}},
        {"model": {"size": args.size, "width": args.width, "latent_dim": args.latent_dim}},
        {"optim": {"batch_size": args.batch_size}},
        # samples and the checkpoint once, at the end, so that the logged speed is training alone
        {"train": {"iterations": args.iterations, "max_minutes": args.minutes, "device": args.device,
                   "precision": args.precision, "seed": args.seed, "log_every": 20,
                   "sample_every": 10**9, "checkpoint_every": 10**9}},
        *(parse_assignment(item) for item in args.set),
    ]
    config = build_config(preset, None, overrides)
    run_dir = out / "run"
    trainer = Trainer(config, run_dir)
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(trainer.device)
    else:
        reset_peak_rss()
    started = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(trainer.device) if cuda else peak_rss_bytes()
    logged = [json.loads(line) for line in (run_dir / SCALARS_FILE).read_text().splitlines()]
    last = logged[-1]

    run = load_run(run_dir, device=args.device)
    samples = run.generate(SAMPLES, seed=0)
    name = args.model
    montage_grid(list(samples), out / f"{name}_grid.png")
    three_plane_montage(list(samples[:4]), out / f"{name}_planes.png")
    real_set = CachedVolumeDataset(cache)
    real = np.stack([real_set[i]["image"][0].numpy() for i in range(min(SAMPLES, len(real_set)))])
    result = {
        "model": name, "preset": preset, "size": args.size, "width": args.width, "latent_dim": args.latent_dim,
        "batch_size": args.batch_size, "precision": run.model.precision, "device": trainer.device.type,
        "device_name": device_name(str(trainer.device)), "training_volumes": len(real_set),
        "iterations": trainer.final_iteration, "train_seconds": round(seconds, 1),
        "it_per_s": round(last["speed/it_per_s"], 3), "steady_it_per_s": steady_speed(logged),
        "peak_mem_bytes": int(peak), "mem_kind": "cuda_max_memory_allocated" if cuda else "peak_rss",
        "params": {k: sum(p.numel() for p in m.parameters()) for k, m in run.model.named_children()},
        "diversity_grey": round(pairwise_mean_abs_diff(grey_levels(samples)), 2),
        "real_diversity_grey": round(pairwise_mean_abs_diff(grey_levels(real)), 2),
        "final_losses": {k: round(v, 4) for k, v in last.items() if k.startswith("loss/")},
    }
    if hasattr(run.model, "encode"):
        heads = real[:RECONSTRUCTED]
        reconstructed = run.reconstruct(heads)
        result["reconstruction_l1_grey"] = round(float((grey_levels(heads) - grey_levels(reconstructed)).abs().mean()), 2)
        # how far the codes of real heads spread, per latent dimension; the prior's is 1
        result["code_std"] = round(float(torch.from_numpy(run.encode(real)).std(0).mean()), 3)
        three_plane_montage([*heads, *reconstructed], out / f"{name}_reconstruction.png",
                            titles=[f"real {i}" for i in range(len(heads))] + [f"rec {i}" for i in range(len(heads))],
                            cols=2)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
