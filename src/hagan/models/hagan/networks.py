"""The seven HA-GAN networks (Sun et al., IEEE JBHI 2022, supplementary Tables I-VII), for any
power-of-two output cube from 32 to 512.

Layouts follow the paper's tables, whose 128^3 and 256^3 cases coincide with the authors' code:
the common generator G^A ends at 1/4 of the output size, the sub-volume is a slab of 1/8 of the depth
at full in-plane size, and every module is built from plain Conv3d so it runs on CPU and GPU alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import GROUPS, LEAK, Upsample, check_size, minibatch_stddev, recomputed, scaled, spectral_norm


def conv_gn_relu(
    cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int = 1, norm: nn.Module | None = None
) -> nn.Sequential:
    """Convolution, GroupNorm (or the ``norm`` given), ReLU: the paper's generator block."""
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel, stride, padding), norm or nn.GroupNorm(GROUPS, cout), nn.ReLU(inplace=True)
    )


def sn_conv_lrelu(cin: int, cout: int, kernel, stride, padding) -> nn.Sequential:
    return nn.Sequential(spectral_norm(nn.Conv3d(cin, cout, kernel, stride, padding)), nn.LeakyReLU(LEAK, inplace=True))


class CommonGenerator(nn.Module):
    """G^A: latent (and one-hot class) to the 64-channel feature volume A at 1/4 of the output size."""

    def __init__(self, size: int, latent_dim: int = 1024, num_classes: int = 0, width: float = 1.0,
                 upsample: str = "nearest", recompute: bool = False):
        super().__init__()
        check_size(size)
        self.recompute = recompute  # see ``recomputed``
        self.latent_dim, self.num_classes = latent_dim, num_classes
        feature_size = size // 4
        upsamplings = int(math.log2(feature_size // 4))
        channels = [512, 512, 256, 128] + [64] * max(1, upsamplings - 3)
        channels = [scaled(c, width) for c in channels]
        self.base_channels = channels[0]
        self.fc = nn.Linear(latent_dim + num_classes, channels[0] * 4**3)
        layers: list[nn.Module] = []
        for i, cout in enumerate(channels):
            layers.append(conv_gn_relu(channels[max(i - 1, 0)], cout))
            if i < upsamplings:
                layers.append(Upsample(upsample))
        self.body = nn.Sequential(*layers)
        self.out_channels = channels[-1]

    def forward(self, z: Tensor, onehot: Tensor | None = None) -> Tensor:
        if self.num_classes:
            if onehot is None:
                raise ValueError("this generator is class-conditional: pass a class label")
            z = torch.cat([z, onehot.to(z.dtype)], dim=1)
        h = self.fc(z).view(z.shape[0], self.base_channels, 4, 4, 4)
        return recomputed(self.body, h) if self.recompute and torch.is_grad_enabled() else self.body(h)


class LowResGenerator(nn.Module):
    """G^L: A to the whole low-resolution image, no upsampling."""

    def __init__(self, in_channels: int, width: float = 1.0):
        super().__init__()
        c1, c2 = scaled(32, width), scaled(16, width)
        self.body = nn.Sequential(
            conv_gn_relu(in_channels, c1), conv_gn_relu(c1, c2), nn.Conv3d(c2, 1, 3, 1, 1), nn.Tanh()
        )

    def forward(self, a: Tensor) -> Tensor:
        return self.body(a)


class ChannelNorm(nn.Module):
    """Normalisation over the channels of each voxel alone, with GroupNorm's per-channel affine.

    GroupNorm's statistics span the whole input, so G^H normalises a training slab differently from the
    same slab inside a full volume; statistics of one voxel are the same wherever the voxel is cut out.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        channels_last = x.movedim(1, -1)
        normalised = F.layer_norm(channels_last, channels_last.shape[-1:], self.weight, self.bias, self.eps)
        return normalised.movedim(-1, 1)


HIGH_RES_NORMS = ("group", "channel")


class HighResGenerator(nn.Module):
    """G^H: lifts any depth range of A (a slab in training, all of it at inference) by 4x.

    With ``norm="channel"`` every output voxel depends only on the feature slices within ``halo`` of its
    own, so a slab computed from A's slab plus ``halo`` slices either side equals the full volume's slab.
    With ``recompute`` a differentiated pass keeps only the input of each upsampling stage (``recomputed``):
    at 512^3, batch 2, the full-resolution upsampled intermediate alone is 4 GiB in float32.
    """

    def __init__(self, in_channels: int, width: float = 1.0, norm: str = "group", upsample: str = "nearest",
                 recompute: bool = False):
        super().__init__()
        if norm not in HIGH_RES_NORMS:
            raise ValueError(f"norm must be one of {', '.join(HIGH_RES_NORMS)}, got {norm!r}")
        c = scaled(32, width)
        normalise = nn.GroupNorm(GROUPS, c) if norm == "group" else ChannelNorm(c)
        self.norm = norm
        self.recompute = recompute
        # x2, 3^3 conv, x2, 3^3 conv: a nearest upsampling reads one feature slice either side, a
        # trilinear one (each new slice interpolates two neighbours) two
        self.halo = 1 if upsample == "nearest" else 2
        self.body = nn.Sequential(
            Upsample(upsample),
            conv_gn_relu(in_channels, c, norm=normalise),
            Upsample(upsample),
            nn.Conv3d(c, 1, 3, 1, 1),
            nn.Tanh(),
        )

    def forward(self, a: Tensor) -> Tensor:
        return recomputed(self.body, a) if self.recompute and torch.is_grad_enabled() else self.body(a)

    def depth_range(self, a: Tensor, start: int, count: int) -> Tensor:
        """Output slices [4*start, 4*(start+count)) of ``self(a)``, computed from A's slices around them only.

        Exact for the voxel-local ``channel`` norm; GroupNorm's statistics would come from the cut-out.
        """
        depth = a.shape[2]
        lo, hi = max(start - self.halo, 0), min(start + count + self.halo, depth)
        out = self(a[:, :, lo:hi])
        offset = 4 * (start - lo)
        return out[:, :, offset : offset + 4 * count]


class HighResDiscriminator(nn.Module):
    """D^H: judges a slab (S/8 x S x S) given its normalised start position r, appended after the trunk."""

    def __init__(self, size: int, num_classes: int = 0, width: float = 1.0, minibatch_std: bool = False):
        super().__init__()
        check_size(size)
        self.minibatch_std = minibatch_std
        inplane_halvings = int(math.log2(size // 4))
        cube_convs = inplane_halvings - 3
        cube_channels = [scaled(64 // 2 ** (cube_convs - 1 - i), width) for i in range(cube_convs)]
        c128, c256, c512 = scaled(128, width), scaled(256, width), scaled(512, width)
        layers: list[nn.Module] = []
        cin = 1
        for cout in cube_channels:
            layers.append(sn_conv_lrelu(cin, cout, 4, 2, 1))
            cin = cout
        layers += [
            sn_conv_lrelu(cin, c128, (2, 4, 4), (2, 2, 2), (0, 1, 1)),
            sn_conv_lrelu(c128, c256, (2, 4, 4), (2, 2, 2), (0, 1, 1)),
            sn_conv_lrelu(c256, c512, (1, 4, 4), (1, 2, 2), (0, 1, 1)),
            sn_conv_lrelu(c512, c128, (1, 4, 4), 1, 0),
        ]
        self.trunk = nn.Sequential(*layers)
        h1, h2 = scaled(64, width), scaled(32, width)
        self.head = nn.Sequential(
            spectral_norm(nn.Linear(c128 + 1 + int(minibatch_std), h1)),
            nn.LeakyReLU(LEAK, inplace=True),
            spectral_norm(nn.Linear(h1, h2)),
            nn.LeakyReLU(LEAK, inplace=True),
        )
        self.adv = spectral_norm(nn.Linear(h2, 1))
        self.cls = spectral_norm(nn.Linear(h2, num_classes)) if num_classes else None

    def forward(self, slab: Tensor, r_normalised: Tensor) -> tuple[Tensor, Tensor | None]:
        h = self.trunk(slab).flatten(1)
        if self.minibatch_std:
            h = minibatch_stddev(h)
        h = self.head(torch.cat([h, r_normalised.view(-1, 1).to(h.dtype).expand(h.shape[0], 1)], dim=1))
        return self.adv(h), (self.cls(h) if self.cls is not None else None)


class LowResDiscriminator(nn.Module):
    """D^L: judges the whole low-resolution image (S/4 cube)."""

    def __init__(self, size: int, num_classes: int = 0, width: float = 1.0, minibatch_std: bool = False):
        super().__init__()
        check_size(size)
        self.minibatch_std = minibatch_std
        convs = int(math.log2(size // 16))
        channels = [scaled(256 // 2 ** (convs - 1 - i), width) for i in range(convs)]
        layers: list[nn.Module] = []
        cin = 1
        for cout in channels:
            layers.append(sn_conv_lrelu(cin, cout, 4, 2, 1))
            cin = cout
        self.trunk = nn.Sequential(*layers)
        self.num_classes = num_classes
        self.out = spectral_norm(nn.Conv3d(cin + int(minibatch_std), 1 + num_classes, 4, 1, 0))

    def forward(self, low: Tensor) -> tuple[Tensor, Tensor | None]:
        h = self.trunk(low)
        if self.minibatch_std:
            h = minibatch_stddev(h)
        h = self.out(h).flatten(1)
        return h[:, :1], (h[:, 1:] if self.num_classes else None)


class SlabEncoder(nn.Module):
    """E^H: a real slab to the slab of A that G^H would lift back to it."""

    def __init__(self, out_channels: int, width: float = 1.0):
        super().__init__()
        c = scaled(32, width)
        self.body = nn.Sequential(
            conv_gn_relu(1, c, 4, 2, 1), conv_gn_relu(c, c, 3, 1, 1), conv_gn_relu(c, out_channels, 4, 2, 1)
        )

    def forward(self, slab: Tensor) -> Tensor:
        return self.body(slab)


class GlobalEncoder(nn.Module):
    """E^G: the concatenated slab features of a whole volume to the latent code."""

    def __init__(self, size: int, in_channels: int, latent_dim: int = 1024, width: float = 1.0):
        super().__init__()
        check_size(size)
        convs = int(math.log2(size // 16))
        channels = [scaled(256 // 2 ** (convs - 1 - i), width) for i in range(convs)]
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in channels:
            layers.append(conv_gn_relu(cin, cout, 4, 2, 1))
            cin = cout
        self.body = nn.Sequential(*layers, nn.Conv3d(cin, latent_dim, 4, 1, 0))

    def forward(self, features: Tensor) -> Tensor:
        return self.body(features).flatten(1)
