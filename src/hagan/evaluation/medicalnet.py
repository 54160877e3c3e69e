"""MedicalNet (Med3D) 3D ResNets as feature extractors: architecture, checked weight loading.

The networks follow Tencent's MedicalNet pretraining models (Chen et al., 2019), which HA-GAN, WDM and
3D-MedDiffusion use for 3D FID and MMD:

* conv1 is a 7^3 convolution with stride 2 (1 input channel, 64 output), then BatchNorm, ReLU and a 3^3
  max-pool with stride 2;
* layer1 (64 planes) and layer2 (128 planes, stride 2) are ordinary residual stages; layer3 (256 planes)
  keeps stride 1 with dilation 2, layer4 (512 planes) stride 1 with dilation 4, so the output of layer4
  is at 1/8 of the input size;
* the segmentation head ``conv_seg`` is replaced by global average pooling: the features are 512-d for
  ResNet-10/18/34 (basic blocks) and 2048-d for ResNet-50 (bottlenecks, expansion 4).

Shortcuts: type ``B`` is a 1^3 convolution plus BatchNorm where the shape changes, type ``A`` a
parameter-free stride plus zero channel padding. The published ResNet-10 and ResNet-50 weights use B,
the published ResNet-18 and ResNet-34 weights use A; the shortcut type of a weights file is read from
its keys (``downsample.*`` tensors are present only with B).

No weights ship with hagan. A weights file is accepted when its sha256 is one of the published
MedicalNet files for that depth (``KNOWN_WEIGHTS``); any other file is refused unless the caller passes
``allow_unknown_weights=True``, which warns instead.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hagan.errors import HaganError

# sha256 of the published MedicalNet weight files (Tencent MedicalNet release, mirrored on the Hugging
# Face hub as TencentMedicalNet/MedicalNet-Resnet{10,18,34,50}); file name and depth for each.
KNOWN_WEIGHTS: dict[str, tuple[int, str]] = {
    "2824951eaef30e115929b89bec72342380b08d14792bda1449974ac849e497c0": (10, "resnet_10.pth"),
    "afa8055f3e47f4a18239495d92a7abc587902c69c31c743de2b2784653b72605": (10, "resnet_10_23dataset.pth"),
    "38b3a17444c5c18a795355a868e6a2d9ce9318054067f5373d337f55c0f61da3": (18, "resnet_18.pth"),
    "61224f9317fcce873366deb3703183e92cc47325b726b69691b33536244e10f4": (18, "resnet_18_23dataset.pth"),
    "977a1be79298602fa35980de9c03789229ad36087fb1f4d9bde468aec653c658": (34, "resnet_34.pth"),
    "3ea7188e396774e4ef95b66e5e90a78273bb33f6e58d3d717bf24f5f1aaeaa28": (34, "resnet_34_23dataset.pth"),
    "5b6189cafbee2f5604a7279b62bc163365aa6a86a377e1dc260a14275cacbd84": (50, "resnet_50.pth"),
    "ff48a62219073fb977fd3f4ddfb8dc1367f0ec156c8d6f6c37e205bd683a246e": (50, "resnet_50_23dataset.pth"),
    "a26bbcf9b2ad35f048b0fa317234c003f171a4d719760e5c4aff9f793654ebcf": (101, "resnet_101.pth"),
    "e96c459f5317ef2cbb898c91575402da2c78b31a31f55c5d28943683fe0626da": (152, "resnet_152.pth"),
    "df58525b0276117169782617a379480d2cbc75230e84e152c603bf22a1fabfa8": (200, "resnet_200.pth"),
}

# depth -> (block kind, blocks per stage, shortcut type of the published weights)
ARCHITECTURES: dict[int, tuple[str, tuple[int, int, int, int], str]] = {
    10: ("basic", (1, 1, 1, 1), "B"),
    18: ("basic", (2, 2, 2, 2), "A"),
    34: ("basic", (3, 4, 6, 3), "A"),
    50: ("bottleneck", (3, 4, 6, 3), "B"),
}


def _conv3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _zero_pad_shortcut(x: Tensor, planes: int, stride: int) -> Tensor:
    """Shortcut A: subsample by ``stride`` and append zero channels up to ``planes``."""
    out = x[:, :, ::stride, ::stride, ::stride] if stride > 1 else x
    pad = planes - out.shape[1]
    if pad <= 0:
        return out
    zeros = out.new_zeros(out.shape[0], pad, *out.shape[2:])
    return torch.cat([out, zeros], dim=1)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class MedicalNetResNet(nn.Module):
    """MedicalNet 3D ResNet trunk; ``forward`` gives globally average-pooled layer4 features (N, dim)."""

    def __init__(self, depth: int, shortcut: str | None = None):
        super().__init__()
        if depth not in ARCHITECTURES:
            raise HaganError(f"MedicalNet ResNet-{depth} is not supported; choose one of {sorted(ARCHITECTURES)}")
        kind, blocks, default_shortcut = ARCHITECTURES[depth]
        self.depth = depth
        self.shortcut = shortcut or default_shortcut
        if self.shortcut not in ("A", "B"):
            raise HaganError(f"shortcut type must be 'A' or 'B', got {self.shortcut!r}")
        block = BasicBlock if kind == "basic" else Bottleneck
        self._cin = 64
        self.conv1 = nn.Conv3d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        self.layer1 = self._stage(block, 64, blocks[0])
        self.layer2 = self._stage(block, 128, blocks[1], stride=2)
        self.layer3 = self._stage(block, 256, blocks[2], dilation=2)
        self.layer4 = self._stage(block, 512, blocks[3], dilation=4)
        self.dim = 512 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def _stage(self, block: type, planes: int, count: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        out_planes = planes * block.expansion
        downsample = None
        if stride != 1 or self._cin != out_planes:
            if self.shortcut == "A":
                downsample = _Lambda(partial(_zero_pad_shortcut, planes=out_planes, stride=stride))
            else:
                downsample = nn.Sequential(
                    nn.Conv3d(self._cin, out_planes, 1, stride=stride, bias=False), nn.BatchNorm3d(out_planes)
                )
        layers = [block(self._cin, planes, stride, dilation, downsample)]
        self._cin = out_planes
        layers += [block(self._cin, planes, 1, dilation) for _ in range(1, count)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.adaptive_avg_pool3d(x, 1).flatten(1)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_weights_hash(path: Path, depth: int, allow_unknown_weights: bool = False) -> str:
    """The file's sha256, after checking it is a published MedicalNet file of this depth."""
    digest = sha256_file(path)
    known = KNOWN_WEIGHTS.get(digest)
    if known is not None and known[0] == depth:
        return digest
    if known is not None:
        raise HaganError(
            f"{path}: this is MedicalNet {known[1]} (ResNet-{known[0]}), not ResNet-{depth}; "
            f"use --features medicalnet-r{known[0]}"
        )
    message = (
        f"{path}: sha256 {digest[:16]}... is not a published MedicalNet ResNet-{depth} weights file"
    )
    if not allow_unknown_weights:
        raise HaganError(message + "; pass allow_unknown_weights=True (--allow-unknown-weights) to use it anyway")
    warnings.warn(message + "; using it anyway: the numbers are not comparable with published ones", stacklevel=3)
    return digest


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a MedicalNet checkpoint: ``state_dict`` entry, ``module.`` stripped, ``conv_seg`` dropped."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's fault
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HaganError(f"{path}: not a readable PyTorch weights file ({first[:160]})") from exc
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise HaganError(f"{path}: holds no state dict of tensors (expected a 'state_dict' entry)")
    state = {}
    for key, value in loaded.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        if not key.startswith("conv_seg."):
            state[key] = value
    return state


def load_medicalnet(
    depth: int, weights: str | os.PathLike, allow_unknown_weights: bool = False
) -> tuple[MedicalNetResNet, str]:
    """Build MedicalNet ResNet-``depth`` from a weights file; returns the network (eval mode) and the file's sha256.

    Every problem is a one-line HaganError naming the file: unreadable, wrong hash (unless
    ``allow_unknown_weights``), missing or unexpected tensors, or a tensor of the wrong shape.
    """
    path = Path(weights)
    if not path.is_file():
        raise HaganError(f"{path}: MedicalNet weights file not found (see docs/metrics.md for where to get it)")
    digest = check_weights_hash(path, depth, allow_unknown_weights)
    state = read_state_dict(path)
    shortcut = "B" if any(".downsample." in k for k in state) else "A"
    model = MedicalNetResNet(depth, shortcut)
    expected = model.state_dict()
    for key, value in state.items():
        if key not in expected:
            raise HaganError(f"{path}: unexpected tensor {key!r} for MedicalNet ResNet-{depth} (shortcut {shortcut})")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise HaganError(
                f"{path}: tensor {key!r} has shape {tuple(value.shape)}, ResNet-{depth} needs {tuple(expected[key].shape)}"
            )
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise HaganError(f"{path}: tensor {missing[0]!r} missing ({len(missing)} missing) for MedicalNet ResNet-{depth}")
    model.load_state_dict(state, strict=False)
    return model.eval(), digest
