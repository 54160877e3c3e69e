"""Networks of the progressive growing GAN (Karras et al., ICLR 2018) in 2D and 3D.

Every layer of every resolution exists from the start, so the state_dict never changes as the
networks grow; a forward pass takes the resolution ``level`` (0 = the 4-per-side base) and the
fade-in weight ``alpha`` and runs only the layers that resolution uses. The three stabilisers of the
paper are here: pixelwise feature normalisation in the generator, the equalised learning rate
(weights drawn from N(0, 1) and scaled at run time by He's constant, so Adam's step is the same
relative size for every layer), and the minibatch standard deviation before the critic's last block.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import LEAK, minibatch_stddev

BASE_SIZE = 4
PIXEL_NORM_EPS = 1e-8
HE_GAIN = math.sqrt(2.0)


def resolutions(size: int) -> list[int]:
    """4, 8, ... up to ``size`` per side."""
    levels = int(round(math.log2(size / BASE_SIZE)))
    if size < BASE_SIZE or BASE_SIZE * 2**levels != size:
        raise ValueError(f"size must be a power of two of at least {BASE_SIZE}, got {size}")
    return [BASE_SIZE * 2**level for level in range(levels + 1)]


def channel_rule(base: int, smallest: int, largest: int, width: float = 1.0) -> Callable[[int], int]:
    """Channels at a resolution: ``base / resolution`` clipped to [smallest, largest], times ``width``
    (DeepNeuro's rule for Beers et al.: 128 up to 16 per side, then halving to 16 at 128)."""

    def channels(resolution: int) -> int:
        return max(1, int(round(min(max(base // resolution, smallest), largest) * width)))

    return channels


def pixel_norm(x: Tensor) -> Tensor:
    """Each position's feature vector scaled to unit root mean square (the generator's normalisation)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + PIXEL_NORM_EPS)


def downsample(x: Tensor, factor: int = 2) -> Tensor:
    """Average pooling by ``factor`` in every spatial axis (2D or 3D)."""
    if factor == 1:
        return x
    return (F.avg_pool3d if x.dim() == 5 else F.avg_pool2d)(x, factor)


def upsample(x: Tensor, factor: int = 2) -> Tensor:
    """Nearest-neighbour upsampling by ``factor``: the fade-in's old path, and the full-size output."""
    if factor == 1:
        return x
    return F.interpolate(x, scale_factor=factor, mode="nearest")


class EqualizedConv(nn.Module):
    """Convolution with the equalised learning rate: weights N(0, 1), scaled by gain / sqrt(fan-in) each call."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, kernel: int, gain: float = HE_GAIN):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *([kernel] * dims)))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = gain / math.sqrt(in_channels * kernel**dims)
        self.padding = kernel // 2
        self.conv = F.conv3d if dims == 3 else F.conv2d

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x, self.weight * self.scale, self.bias, padding=self.padding)


class EqualizedLinear(nn.Module):
    """Fully connected layer with the equalised learning rate."""

    def __init__(self, in_features: int, out_features: int, gain: float = HE_GAIN):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = gain / math.sqrt(in_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


def lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, LEAK)


class GeneratorBlock(nn.Module):
    """x2 nearest upsampling, then two 3-wide convolutions, each with LeakyReLU and pixel norm."""

    def __init__(self, dims: int, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = EqualizedConv(dims, in_channels, out_channels, 3)
        self.conv2 = EqualizedConv(dims, out_channels, out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = pixel_norm(lrelu(self.conv1(upsample(x))))
        return pixel_norm(lrelu(self.conv2(x)))


class ProgressiveGenerator(nn.Module):
    """Latent (n, latent_dim) to an image of ``out_channels`` channels at the level's resolution."""

    def __init__(self, dims: int, size: int, latent_dim: int, out_channels: int, channels: Callable[[int], int]):
        super().__init__()
        self.dims = dims
        self.resolutions = resolutions(size)
        base = channels(BASE_SIZE)
        self.base_channels = base
        # the paper's 4-per-side "dense" first layer, then one 3-wide convolution at 4 per side
        self.dense = EqualizedLinear(latent_dim, base * BASE_SIZE**dims)
        self.base_conv = EqualizedConv(dims, base, base, 3)
        self.blocks = nn.ModuleList(
            GeneratorBlock(dims, channels(r // 2), channels(r)) for r in self.resolutions[1:]
        )
        # toRGB: linear 1x1 projections, one per resolution
        self.to_image = nn.ModuleList(
            EqualizedConv(dims, channels(r), out_channels, 1, gain=1.0) for r in self.resolutions
        )

    def forward(self, z: Tensor, level: int, alpha: float = 1.0) -> Tensor:
        """The image at ``resolutions[level]``; while fading (alpha < 1) the new block's output is
        blended with the previous resolution's output upsampled by nearest neighbour."""
        x = self.dense(pixel_norm(z)).view(z.shape[0], self.base_channels, *([BASE_SIZE] * self.dims))
        x = pixel_norm(lrelu(x))
        x = pixel_norm(lrelu(self.base_conv(x)))
        for block in self.blocks[: max(level - 1, 0)]:
            x = block(x)
        if level == 0:
            return self.to_image[0](x)
        new = self.to_image[level](self.blocks[level - 1](x))
        if alpha >= 1.0:
            return new
        old = upsample(self.to_image[level - 1](x))
        return torch.lerp(old, new, alpha)


class DiscriminatorBlock(nn.Module):
    """Two 3-wide convolutions with LeakyReLU, then x2 average pooling."""

    def __init__(self, dims: int, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = EqualizedConv(dims, in_channels, in_channels, 3)
        self.conv2 = EqualizedConv(dims, in_channels, out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return downsample(lrelu(self.conv2(lrelu(self.conv1(x)))))


class ProgressiveDiscriminator(nn.Module):
    """An image at the level's resolution to ``outputs`` values: the critic's score (outputs 1, with the
    minibatch standard deviation), or, as Beers et al.'s encoder (``grows=False``: full-size input
    only, so no fromRGB of the smaller resolutions), a latent vector (without it)."""

    def __init__(
        self, dims: int, size: int, in_channels: int, channels: Callable[[int], int],
        outputs: int = 1, minibatch_std: bool = True, grows: bool = True,
    ):
        super().__init__()
        self.dims = dims
        self.resolutions = resolutions(size)
        self.minibatch_std = minibatch_std
        # fromRGB: 1x1 projections into the features, by input resolution
        inputs = self.resolutions if grows else self.resolutions[-1:]
        self.from_image = nn.ModuleDict({str(r): EqualizedConv(dims, in_channels, channels(r), 1) for r in inputs})
        # blocks[k] takes resolutions[k + 1] down to resolutions[k]
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(dims, channels(r), channels(r // 2)) for r in self.resolutions[1:]
        )
        base = channels(BASE_SIZE)
        self.final_conv = EqualizedConv(dims, base + int(minibatch_std), base, 3)
        self.final_dense = EqualizedLinear(base * BASE_SIZE**dims, base)
        self.output = EqualizedLinear(base, outputs, gain=1.0)

    def forward(self, x: Tensor, level: int, alpha: float = 1.0) -> Tensor:
        """(n, outputs); while fading, the new block's features are blended with those of the input
        average-pooled into the previous resolution's fromRGB."""
        h = lrelu(self.from_image[str(self.resolutions[level])](x))
        if level > 0:
            h = self.blocks[level - 1](h)
            if alpha < 1.0:
                h = torch.lerp(lrelu(self.from_image[str(self.resolutions[level - 1])](downsample(x))), h, alpha)
            for block in reversed(self.blocks[: level - 1]):
                h = block(h)
        if self.minibatch_std:
            h = minibatch_stddev(h)
        h = lrelu(self.final_conv(h))
        h = lrelu(self.final_dense(h.flatten(1)))
        return self.output(h)
