"""Networks of the multi-scale patch GAN (Uzunova et al. 2019/2020), as the authors' code builds them.

Generators are the pix2pix ResNet generator in 3D: two stride-2 convolutions down, residual blocks with
instance norm and dropout 0.5 (the papers' only noise source besides input noise), two transposed
convolutions up, a 7^3 convolution and tanh. The low-resolution generator takes edges at twice its
output resolution and halves them with one more stride-2 convolution. Discriminators are fully
convolutional PatchGANs with batch norm, trained with a least-squares loss.

Where this differs from the authors' code (their parameter counts are kept, see tests): convolutions are
initialised N(0, 0.02) as pix2pix does; discriminator convolutions pad by 1 so that test-sized patches
still produce an output; the low-resolution discriminator ends in a 1-channel convolution (the authors'
returned its 256 feature channels, each pushed to the target); and the high-resolution generator also
sees the centre of its context patch upsampled onto its own grid (a third input channel derived from the
second, so no information is added, only alignment).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BASE_CHANNELS = 64
RES_BLOCKS = 6


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def init_weights(module: nn.Module) -> None:
    """pix2pix's initialisation: N(0, 0.02) convolutions, N(1, 0.02) batch-norm scales."""
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _conv_block(cin: int, cout: int, kernel: int, stride: int, padding: int) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, kernel, stride, padding), nn.InstanceNorm3d(cout), nn.ReLU(inplace=True)]


class ResnetBlock(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_block(channels, channels, 3, 1, 1),
            nn.Dropout(dropout),
            nn.Conv3d(channels, channels, 3, 1, 1),
            nn.InstanceNorm3d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """Input channels at the output's grid (or at twice it with ``halve_input``) -> one channel in [-1, 1]."""

    def __init__(self, in_channels: int, width: float = 1.0, res_blocks: int = RES_BLOCKS, dropout: float = 0.5,
                 halve_input: bool = False):
        super().__init__()
        c = scaled(BASE_CHANNELS, width)
        layers = _conv_block(in_channels, c, 3, 1, 1)
        if halve_input:
            layers += _conv_block(c, c, 4, 2, 1)
        layers += _conv_block(c, 2 * c, 4, 2, 1) + _conv_block(2 * c, 4 * c, 4, 2, 1)
        layers += [ResnetBlock(4 * c, dropout) for _ in range(res_blocks)]
        for cin, cout in ((4 * c, 2 * c), (2 * c, c)):
            layers += [nn.ConvTranspose3d(cin, cout, 4, 2, 1), nn.InstanceNorm3d(cout), nn.ReLU(inplace=True)]
        layers += [nn.Conv3d(c, 1, 7, 1, 3), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def aligned_centre(context: Tensor) -> Tensor:
    """The centre half of a context patch (twice the output's field of view) upsampled onto the output grid."""
    p = context.shape[-1]
    centre = context[..., p // 4 : p // 4 + p // 2, p // 4 : p // 4 + p // 2, p // 4 : p // 4 + p // 2]
    return F.interpolate(centre, scale_factor=2, mode="trilinear", align_corners=False)


class PatchGenerator(nn.Module):
    """G_i: (sketch patch at scale i, context patch of scale i-1 with twice the field of view) -> patch.

    Without context (``conditioned`` False) it is the plain patch-wise baseline: sketch patch -> patch.
    """

    def __init__(self, conditioned: bool, width: float = 1.0, res_blocks: int = RES_BLOCKS, dropout: float = 0.5):
        super().__init__()
        self.conditioned = conditioned
        self.net = ResnetGenerator(3 if conditioned else 1, width, res_blocks, dropout)

    def forward(self, sketch: Tensor, context: Tensor | None = None) -> Tensor:
        if not self.conditioned:
            return self.net(sketch)
        return self.net(torch.cat([sketch, aligned_centre(context), context], dim=1))


class LowResGenerator(nn.Module):
    """G_0: the whole sketch at twice the low resolution -> the whole low-resolution image."""

    def __init__(self, width: float = 1.0, res_blocks: int = RES_BLOCKS, dropout: float = 0.5):
        super().__init__()
        self.net = ResnetGenerator(1, width, res_blocks, dropout, halve_input=True)

    def forward(self, sketch: Tensor) -> Tensor:
        return self.net(sketch)


def _disc_trunk(cin: int, c: int, first_stride: int, layers: int) -> list[nn.Module]:
    """Conv + LeakyReLU, then ``layers`` stride-2 convs doubling channels with batch norm."""
    modules: list[nn.Module] = [nn.Conv3d(cin, c, 4, first_stride, 1), nn.LeakyReLU(0.2, inplace=True)]
    for i in range(layers):
        cin_i, cout_i = c * 2**i, c * 2 ** (i + 1)
        modules += [nn.Conv3d(cin_i, cout_i, 4, 2, 1), nn.BatchNorm3d(cout_i), nn.LeakyReLU(0.2, inplace=True)]
    return modules


class PatchDiscriminator(nn.Module):
    """D_i: a map of real/fake scores for (sketch, patch, context) or, patch-wise, (sketch, patch)."""

    def __init__(self, in_channels: int, width: float = 1.0):
        super().__init__()
        c = scaled(BASE_CHANNELS, width)
        self.net = nn.Sequential(*_disc_trunk(in_channels, c, 1, 2), nn.Conv3d(4 * c, 1, 4, 2, 1))
        init_weights(self)

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.net(torch.cat(inputs, dim=1))


class LowResDiscriminator(nn.Module):
    """D_0: scores for (sketch at twice the resolution, image); a learnt stride-2 conv brings the sketch down."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        c = scaled(BASE_CHANNELS, width)
        self.sketch_down = nn.Conv3d(1, 1, 3, 2, 1)
        self.net = nn.Sequential(*_disc_trunk(2, c, 2, 2), nn.Conv3d(4 * c, 1, 4, 1, 1))
        init_weights(self)

    def forward(self, sketch: Tensor, image: Tensor) -> Tensor:
        return self.net(torch.cat([self.sketch_down(sketch), image], dim=1))


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class SeedGenerator(nn.Module):
    """An unconditional generator of small whole images, whose sketches start generation from scratch."""

    def __init__(self, latent_dim: int, size: int, width: float = 1.0):
        super().__init__()
        steps = int(math.log2(size // 4))
        c = scaled(BASE_CHANNELS * 2 ** min(steps, 2), width)
        self.base = c
        self.fc = nn.Linear(latent_dim, c * 4**3)
        layers: list[nn.Module] = []
        for _ in range(steps):
            out = max(scaled(16, width), c // 2)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(c, out, 3, 1, 1),
                       nn.GroupNorm(_groups(out), out), nn.ReLU(inplace=True)]
            c = out
        layers += [nn.Conv3d(c, 1, 3, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(self.fc(z).view(len(z), self.base, 4, 4, 4))


class SeedDiscriminator(nn.Module):
    """Scores whole small images: stride-2 convolutions down to 4^3, then one 4^3 convolution."""

    def __init__(self, size: int, width: float = 1.0):
        super().__init__()
        c = scaled(BASE_CHANNELS // 2, width)
        layers: list[nn.Module] = []
        cin = 1
        for _ in range(int(math.log2(size // 4))):
            layers += [nn.Conv3d(cin, c, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
            cin, c = c, min(2 * c, scaled(8 * BASE_CHANNELS, width))
        layers.append(nn.Conv3d(cin, 1, 4, 1, 0))
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)
