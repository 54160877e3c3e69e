"""Does HA-GAN collapse on a small real set, and does the small-data configuration prevent it?

Trains the paper's configuration and the small-data configuration on the same cache for the same
wall-clock budget, then generates samples from each and prints, as JSON, the sample diversity
(mean absolute difference between distinct samples, in grey levels of 255, as our issue tracker
reports collapse) beside the real set's, and writes montages of both.

    python experiments/small_data.py --data ../shared/data/ixi-t1-2mm/t1 --size 128 --minutes 12 \
        --out runs/small-data-128

On CPU, use --size 32 --width 0.25 --latent-dim 128 --iterations 1500 for a quick look (a shared
machine makes equal minutes unequal work; equal iterations are the fair budget there).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from hagan.api import load_run
from hagan.config import build_config
from hagan.data.cache import load_manifest
from hagan.data.dataset import CachedVolumeDataset
from hagan.data.preprocess import preprocess_folder
from hagan.errors import HaganError
from hagan.evaluation.metrics import grey_levels, pairwise_mean_abs_diff
from hagan.run_folder import list_checkpoints
from hagan.training.trainer import train
from hagan.viz import montage_grid, three_plane_montage

# name -> (preset, overrides on top of it)
CONFIGS: dict[str, tuple[str, dict]] = {
    "paper": ("paper-128", {}),
    "small-data": ("small-data-128", {}),
    "small-data-wgan": ("small-data-128", {"hagan": {"loss": "wgan-gp", "r1_gamma": 0.0, "minibatch_std": True}}),
}



def diversity_curve(run_dir: Path, samples: int, device: str) -> list[list[float]]:
    """(iteration, diversity of ``samples`` volumes from seed 0) at every checkpoint the run kept."""
    curve = []
    for checkpoint in list_checkpoints(run_dir / "checkpoints"):
        run = load_run(run_dir, checkpoint=checkpoint, device=device)
        curve.append([run.iteration, pairwise_mean_abs_diff(grey_levels(run.generate(samples, seed=0)))])
    return curve


def plot_diversity(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        if "diversity_curve" in result:
            iterations, values = zip(*result["diversity_curve"])
            ax.plot(iterations, values, marker="o", label=name)
    ax.axhline(results["real"]["pairwise_mad_grey"], color="k", linestyle="--", label="real")
    ax.set_xlabel("iteration")
    ax.set_ylabel("pairwise mean abs. difference (grey levels)")
    ax.set_title("sample diversity during training")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder of real volumes, or a cache from `hagan preprocess`")
    parser.add_argument("--out", required=True)
    parser.add_argument("--recipe", default="mri", choices=["ct", "mri"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = the paper's)")
    parser.add_argument("--latent-dim", type=int, default=1024)
    parser.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget of each configuration (0: none)")
    parser.add_argument("--iterations", type=int, default=1_000_000, help="iterations of each configuration")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--configs", default="paper,small-data", help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--track-every", type=int, default=0,
                        help="keep a checkpoint every N iterations and report the sample diversity at each (0: end only)")
    parser.add_argument("--save-samples", action="store_true",
                        help="also write the samples as uint8 grey levels (samples_NAME.npz) for scoring elsewhere")
    args = parser.parse_args()

    out = Path(args.out)
    data = Path(args.data)
    try:
        load_manifest(data)
        cache = data
    except HaganError:
        cache = out / "cache"
        if not cache.exists():
            print(preprocess_folder(data, cache, recipe=args.recipe, size=args.size).summary())
    real_set = CachedVolumeDataset(cache)
    real = np.stack([real_set[i]["image"][0].numpy() for i in range(min(args.samples, len(real_set)))])
    results: dict[str, dict] = {
        "real": {"volumes": len(real_set), "pairwise_mad_grey": pairwise_mean_abs_diff(grey_levels(real))}
    }
    montage_grid(list(real), out / "real_grid.png")
    for name in args.configs.split(","):
        preset_name, extra = CONFIGS[name]
        overrides = [
            extra,
            {"data": {"cache": str(cache)}},
            {"model": {"size": args.size, "width": args.width, "latent_dim": args.latent_dim}},
            {"optim": {"batch_size": args.batch_size}},
            {"train": {"iterations": args.iterations, "max_minutes": args.minutes, "device": args.device,
                       "precision": args.precision, "seed": args.seed,
                       "sample_every": 500, "log_every": 20,
                       **({"checkpoint_every": args.track_every, "keep_checkpoints": 10_000} if args.track_every
                          else {"checkpoint_every": 1000})}},
        ]
        run_dir = out / name
        started = time.perf_counter()
        train(build_config(preset_name, None, overrides), run_dir)
        seconds = time.perf_counter() - started
        run = load_run(run_dir, device=args.device)
        samples = run.generate(args.samples, seed=0)
        montage_grid(list(samples), out / f"{name}_grid.png")
        three_plane_montage(list(samples[:4]), out / f"{name}_planes.png")
        if args.save_samples:
            np.savez_compressed(out / f"samples_{name}.npz", grey=grey_levels(samples).round().byte().numpy())
        results[name] = {
            "preset": preset_name,
            "overrides": extra,
            "precision": args.precision,
            "iterations": run.iteration,
            "train_seconds": round(seconds, 1),
            "pairwise_mad_grey": pairwise_mean_abs_diff(grey_levels(samples)),
        }
        if args.track_every:
            results[name]["diversity_curve"] = diversity_curve(run_dir, args.samples, args.device)
        print(json.dumps({name: results[name]}), flush=True)
    if args.track_every:
        plot_diversity(results, out / "diversity.png")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
