#!/usr/bin/env python
"""Peak memory of the multi-scale patch GAN as the image grows: one training step of the full-resolution
scale and one whole translation (every scale, stitched), for untrained tiny-width models; prints JSON.

    python benchmarks/patchgan_memory.py --sizes 64 128 256 --threads 1

The papers' claim is that the networks' memory does not depend on the image size, because no network
ever sees more than a fixed-size input. Two figures are reported per size, so the claim can be read off
apart from what does grow:
- ``torch_peak_mib``: the peak of torch's own tensors in the block (``TensorMemoryPeak``), i.e. what a
  GPU would hold (weights excluded, since they exist before the block);
- ``host_peak_mib``: the peak of numpy allocations in the block (``tracemalloc``): whole volumes, their
  sketches, patch crops and the stitched result, which stay in host memory and grow as size^3.
The input is a synthetic brain phantom (drawn at 64^3, interpolated), so the script needs no data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date

import torch

from hagan.config import build_config
from hagan.data.intensity import mri_recipe
from hagan.data.phantoms import brain_mri
from hagan.models.patch.model import MultiScalePatchGAN, TensorMemoryPeak
from hagan.models.patch.sketch import resize

MIB = 2**20
# the phantom is drawn once at this size and interpolated to each measured size (drawing it at 256^3 is slow)
PHANTOM_SIZE = 64


@contextmanager
def measured() -> Iterator[dict]:
    """Torch tensors' peak, numpy's peak (tracemalloc) and seconds of the block."""
    result: dict = {}
    tracemalloc.start()
    started = time.perf_counter()
    with TensorMemoryPeak() as tensors:
        yield result
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["torch_peak_mib"] = round(tensors.peak / MIB, 2)
    result["host_peak_mib"] = round(tracemalloc.get_traced_memory()[1] / MIB, 2)
    tracemalloc.stop()


def model_for(size: int, args: argparse.Namespace) -> MultiScalePatchGAN:
    torch.manual_seed(0)
    config = build_config(None, None, [{
        "model": {"name": "patch", "size": size, "latent_dim": 8, "width": args.width},
        "patch": {"low_res_size": args.low_res, "patch_size": args.patch_size, "keep_size": args.keep_size,
                  "res_blocks": args.res_blocks, "inference_batch": args.inference_batch},
        "optim": {"batch_size": 1},
    }])
    return MultiScalePatchGAN(config)


def measure(size: int, args: argparse.Namespace) -> dict:
    model = model_for(size, args)
    volume = resize(mri_recipe(brain_mri(PHANTOM_SIZE, 0)[0]), size)
    last = [stage for stage in model.stages if stage.kind == "hr"][-1].name
    model.config.patch.stage = last
    batch = {"image": torch.from_numpy(volume[None, None]), "index": torch.tensor([0])}
    rng = torch.Generator().manual_seed(0)
    model.train_step(batch, 0, rng)  # builds the optimizer state and caches the sketch, as later steps find them
    with measured() as train_step:
        model.train_step(batch, 1, rng)
    model.eval()
    with measured() as translation:
        out = model.translate(volume[None, None])
    assert out.shape == (1, 1, size, size, size)
    return {"size": size, "scales": [stage.name for stage in model.stages if stage.kind != "seed"],
            "train_stage": last, "train_step": train_step, "translate": translation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--low-res", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--keep-size", type=int, default=20)
    parser.add_argument("--width", type=float, default=0.0625, help="channel multiplier (1 = the authors')")
    parser.add_argument("--res-blocks", type=int, default=1)
    parser.add_argument("--inference-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        rows.append(measure(size, args))
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({
        "benchmark": "patchgan_memory", "date": date.today().isoformat(), "device": "cpu",
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "settings": {k: v for k, v in vars(args).items() if k not in ("sizes", "threads")},
        "rows": rows,
    }, indent=2))


if __name__ == "__main__":
    main()
