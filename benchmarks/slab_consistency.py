"""What the paper's slab training costs in fidelity, and what training slabs as they are sampled costs in memory.

For each cube size, at initialisation and at full width: the mean |training slab - the same slab of the full
volume| over every start r (in [-1, 1] units; real heads differ by about 0.12), for the paper's G^H (GroupNorm
over the slab, zero padding at the slab's ends), for ``hagan.consistent_slabs`` (voxel-local norm, a halo of
feature slices, cropped) and for small-data-128's G^H (consistent, trilinear upsampling: a halo of 2). Then the peak tensor memory of one whole training iteration (D, G, E^H and E^G steps,
batch 4) of each, counted by a dispatch mode, so the figure is the same on any machine.

    python benchmarks/slab_consistency.py --sizes 32 64 128 --memory-size 128
"""

from __future__ import annotations

import argparse
import json

import torch

from hagan.config import build_config
from hagan.models import build_model
from hagan.models.patch.model import TensorMemoryPeak

MIB = 2**20


# name -> G^H's options
VARIANTS = {
    "paper": {"consistent_slabs": False},
    "consistent": {"consistent_slabs": True},
    "consistent-trilinear": {"consistent_slabs": True, "upsample": "trilinear"},
}


def model_for(size: int, variant: str, width: float):
    config = build_config("paper-128", None, [{"model": {"size": size, "width": width}, "hagan": VARIANTS[variant],
                                               "train": {"device": "cpu"}}])
    torch.manual_seed(0)
    return build_model(config)


def step_peak(size: int, variant: str, width: float, batch: int) -> int:
    model = model_for(size, variant, width)
    g = torch.Generator().manual_seed(0)
    data = {"image": torch.rand(batch, 1, size, size, size, generator=g) * 2 - 1, "label": torch.full((batch,), -1)}
    rng = torch.Generator().manual_seed(0)
    model.train_step(dict(data), 0, rng)  # optimizer states exist before the measured iteration
    with TensorMemoryPeak() as probe:
        model.train_step(dict(data), 1, rng)
    return probe.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--memory-size", type=int, default=128)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    result: dict = {"width": args.width, "mismatch_at_init": {}, "peak_step_mib": {}}
    z = torch.randn(2, 1024, generator=torch.Generator().manual_seed(0))
    for size in args.sizes:
        with torch.no_grad():
            result["mismatch_at_init"][size] = {
                name: round(model_for(size, name, args.width).eval().slab_mismatch(z), 4) for name in VARIANTS}
        print(json.dumps({"size": size, "mismatch": result["mismatch_at_init"][size]}), flush=True)
    for name in VARIANTS:
        peak = step_peak(args.memory_size, name, args.width, args.batch_size)
        result["peak_step_mib"][name] = round(peak / MIB, 1)
        print(json.dumps({"variant": name, "peak_step_mib": result["peak_step_mib"][name]}), flush=True)
    result["peak_ratio_to_paper"] = {name: round(result["peak_step_mib"][name] / result["peak_step_mib"]["paper"], 3)
                                     for name in VARIANTS}
    result["memory_size"], result["batch_size"] = args.memory_size, args.batch_size
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
