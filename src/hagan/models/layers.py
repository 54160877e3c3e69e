"""Building blocks shared by the models' networks: float32 spectral norm, channel scaling, minibatch
standard deviation and upsampling with optional recomputation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.utils.checkpoint import checkpoint

from ..config import MODEL_SIZES
from ..training.accel import full_precision

# channel counts stay multiples of the GroupNorm groups
GROUPS = 8
LEAK = 0.2


class Float32SpectralNorm(_SpectralNorm):
    """PyTorch's spectral norm (same buffers, keys and initialisation) with the power iteration and the
    division by sigma kept in float32 under bf16 autocast, where a bf16 estimate of sigma is too coarse."""

    def forward(self, weight: Tensor) -> Tensor:
        with full_precision(weight.device.type):
            return super().forward(weight)


def spectral_norm(module: nn.Module) -> nn.Module:
    parametrize.register_parametrization(module, "weight", Float32SpectralNorm(module.weight))
    return module


def check_size(size: int) -> None:
    if size not in MODEL_SIZES:
        raise ValueError(f"output size must be a power of two from 32 to 512, got {size}")


def scaled(channels: int, width: float) -> int:
    """Channel count scaled by ``width``, kept a multiple of the GroupNorm groups."""
    return max(GROUPS, int(round(channels * width / GROUPS)) * GROUPS)


def minibatch_stddev(x: Tensor) -> Tensor:
    """Append the batch's mean feature standard deviation as one more channel (Karras et al. 2018).

    A discriminator that sees how alike the samples of a batch are can reject a collapsed generator.
    Under torchrun the statistic is taken over each process's share of the batch.
    """
    std = x.float().std(dim=0, unbiased=False).mean().to(x.dtype) if x.shape[0] > 1 else x.new_zeros(())
    return torch.cat([x, std.expand(x.shape[0], 1, *x.shape[2:])], dim=1)


UPSAMPLE_MODES = ("nearest", "trilinear")


def recomputed(body: nn.Sequential, x: Tensor) -> Tensor:
    """``body(x)`` in segments that each begin at an upsampling and keep only their input for the backward
    pass, which recomputes the rest (activation checkpointing): the same values and gradients without
    holding a block's upsampled, convolved and normalised intermediates until the backward pass."""
    starts = [0] + [i for i, module in enumerate(body) if isinstance(module, Upsample) and i > 0] + [len(body)]
    for begin, end in zip(starts, starts[1:]):
        x = checkpoint(body[begin:end], x, use_reentrant=False)
    return x


class Upsample(nn.Module):
    """x2 interpolation: nearest, as the paper's 'Interpolation' rows and the authors' code, or trilinear,
    which does not leave the 2-voxel staircase that one 3^3 convolution after a nearest upsampling cannot smooth."""

    def __init__(self, mode: str = "nearest"):
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"upsampling must be one of {', '.join(UPSAMPLE_MODES)}, got {mode!r}")
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "nearest":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
