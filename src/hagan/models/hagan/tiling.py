"""G^H over a whole volume in depth tiles, for inference at sizes where the untiled pass runs out of memory.

``HighResGenerator(features)`` materialises the x2 and x4 nearest-upsampled inputs of its two convolutions for
the whole volume; at 512^3 those alone take tens of GB. A 3x3x3 convolution of an upsampled volume needs only
one upsampled row either side of the rows it produces, so each convolution can run on depth tiles with a
one-slice halo and give exactly the untiled result. Only the GroupNorm between them needs the whole volume:
its statistics are gathered over the one stored buffer (the first convolution's output) before it is
normalised in place. With the voxel-local channel norm nothing needs the whole volume: each tile is G^H of its
feature slices plus a halo, cropped, exactly as the training slabs are made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hagan.models.hagan.networks import HighResGenerator
from hagan.models.layers import Upsample

STRUCTURE = "expected high_gen.body = Upsample, (Conv3d, GroupNorm, ReLU), Upsample, Conv3d, Tanh"


def _layers(high_gen: HighResGenerator) -> tuple[Upsample, nn.Conv3d, nn.GroupNorm, Upsample, nn.Conv3d, nn.Tanh]:
    """The layers of ``high_gen.body`` by position; anything else would make the tiling silently wrong."""
    body = getattr(high_gen, "body", None)
    try:
        up1, (conv1, norm, relu), up2, conv2, tanh = body  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(STRUCTURE) from None
    types = (Upsample, nn.Conv3d, nn.GroupNorm, nn.ReLU, Upsample, nn.Conv3d, nn.Tanh)
    if not all(isinstance(m, t) for m, t in zip((up1, conv1, norm, relu, up2, conv2, tanh), types)):
        raise ValueError(STRUCTURE)
    for conv in (conv1, conv2):
        if (
            conv.kernel_size != (3, 3, 3)
            or conv.stride != (1, 1, 1)
            or conv.padding != (1, 1, 1)
            or conv.dilation != (1, 1, 1)
            or conv.padding_mode != "zeros"
        ):
            raise ValueError(f"tiling needs 3x3x3 convolutions with stride 1 and zero padding 1, got {conv}")
    return up1, conv1, norm, up2, conv2, tanh


def _upsampled_conv(x: Tensor, start: int, end: int, upsample: Upsample, conv: nn.Conv3d) -> Tensor:
    """Depth rows [2*start, 2*end) of ``conv(upsample(x))``, computed from rows start-1 .. end of ``x``."""
    depth = x.shape[2]
    lo, hi = max(start - 1, 0), min(end + 1, depth)
    up = upsample(x[:, :, lo:hi])
    # The conv needs upsampled rows 2*start-1 .. 2*end; past the volume ends it sees the zero padding.
    up = up[:, :, max(2 * start - 1, 0) - 2 * lo : min(2 * end + 1, 2 * depth) - 2 * lo]
    up = F.pad(up, (0, 0, 0, 0, int(start == 0), int(end == depth)))
    return F.conv3d(up, conv.weight, conv.bias, 1, (0, 1, 1), 1, conv.groups)


def _group_norm_relu_(buf: Tensor, norm: nn.GroupNorm, tile: int) -> None:
    """GroupNorm with whole-volume statistics, then ReLU, applied to ``buf`` in place one depth tile at a time.

    Per-tile means and variances are merged with Chan et al.'s pairwise formula, so no full-size float32 copy
    is made even when ``buf`` is half precision (autocast), and the merge stays accurate over many tiles.
    """
    n, channels, depth = buf.shape[:3]
    groups = norm.num_groups
    dtype = torch.promote_types(buf.dtype, torch.float32)  # float32 at least, as autocast runs GroupNorm
    count = 0
    mean = buf.new_zeros((n, groups), dtype=dtype)
    m2 = buf.new_zeros((n, groups), dtype=dtype)
    for a in range(0, depth, tile):
        x = buf[:, :, a : a + tile]
        x = x.view(n, groups, channels // groups, -1)
        var_b, mean_b = torch.var_mean(x.to(dtype), dim=(2, 3), correction=0)
        count_b = x[0, 0].numel()
        total = count + count_b
        delta = mean_b - mean
        mean = mean + delta * (count_b / total)
        m2 = m2 + var_b * count_b + delta.square() * (count * count_b / total)
        count = total
    rstd = torch.rsqrt(m2 / count + norm.eps)
    weight = norm.weight.to(dtype) if norm.weight is not None else torch.ones(channels, dtype=dtype, device=buf.device)
    bias = norm.bias.to(dtype) if norm.bias is not None else torch.zeros(channels, dtype=dtype, device=buf.device)
    scale = rstd.repeat_interleave(channels // groups, dim=1) * weight
    shift = bias - mean.repeat_interleave(channels // groups, dim=1) * scale
    scale, shift = scale.view(n, channels, 1, 1, 1), shift.view(n, channels, 1, 1, 1)
    for a in range(0, depth, tile):
        x = buf[:, :, a : a + tile]
        x.copy_(torch.addcmul(shift, x.to(dtype), scale).relu_())


def _tiled_local(high_gen: HighResGenerator, features: Tensor, tile_depth: int) -> Tensor:
    """G^H with the voxel-local norm: each tile from its own feature slices plus the halo, nothing else kept."""
    depth = features.shape[2]
    out: Tensor | None = None
    for start in range(0, depth, tile_depth):
        count = min(tile_depth, depth - start)
        y = high_gen.depth_range(features, start, count)
        if out is None:
            out = y.new_empty((y.shape[0], y.shape[1], 4 * depth, *y.shape[3:]))
        out[:, :, 4 * start : 4 * (start + count)] = y
    assert out is not None  # depth >= 1, so the loop ran
    return out


@torch.no_grad()
def tiled_high_res(high_gen: HighResGenerator, features: Tensor, tile_depth: int) -> Tensor:
    """``high_gen(features)`` for (N, C, D, H, W) features, computed over depth tiles of ``tile_depth`` slices.

    Gives the untiled result up to float rounding. With GroupNorm it stores the first convolution's output for
    the whole volume (N, c, 2D, 2H, 2W) besides the (N, 1, 4D, 4H, 4W) result, with the channel norm only the
    result; the upsampled inputs exist one tile at a time. Inference only; honours an enclosing ``torch.autocast``.
    """
    if tile_depth < 1:
        raise ValueError(f"tile_depth must be at least 1, got {tile_depth}")
    if features.dim() != 5 or features.shape[2] == 0:
        raise ValueError(f"features must be (N, C, D, H, W) with D >= 1, got shape {tuple(features.shape)}")
    n, _, depth, height, width = features.shape
    if isinstance(high_gen, HighResGenerator) and high_gen.norm == "channel":
        return _tiled_local(high_gen, features, tile_depth)
    up1, conv1, norm, up2, conv2, tanh = _layers(high_gen)

    buf: Tensor | None = None
    for start in range(0, depth, tile_depth):
        end = min(start + tile_depth, depth)
        h = _upsampled_conv(features, start, end, up1, conv1)
        if buf is None:
            buf = h.new_empty((n, h.shape[1], 2 * depth, 2 * height, 2 * width))
        buf[:, :, 2 * start : 2 * end] = h
    assert buf is not None  # depth >= 1, so the loop ran

    _group_norm_relu_(buf, norm, 2 * tile_depth)

    out: Tensor | None = None
    for start in range(0, 2 * depth, 2 * tile_depth):
        end = min(start + 2 * tile_depth, 2 * depth)
        y = tanh(_upsampled_conv(buf, start, end, up2, conv2))
        if out is None:
            out = y.new_empty((n, y.shape[1], 4 * depth, 4 * height, 4 * width))
        out[:, :, 2 * start : 2 * end] = y
    assert out is not None
    return out
