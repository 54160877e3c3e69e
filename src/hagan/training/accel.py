"""The fast path on GPUs: bf16 autocast, TF32, channels-last layouts and torch.compile, chosen in one place.

Everything here is a no-op on CPU unless asked for, so CPU runs stay the float32 reference that the
tests compare the fast path against.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from hagan.config import PRECISIONS
from hagan.errors import HaganError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU; a CUDA device on a machine without CUDA is an
    error here rather than deep inside the first tensor operation."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HaganError(f"device {name!r} needs CUDA, which is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise HaganError(f"unknown device {name[:40]!r}; use auto, cpu, cuda or cuda:N") from err


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` is bf16 on CUDA (the matrix units' fast mode) and float32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision == "bf16"``; losses and spectral norm stay float32 (they upcast
    themselves), and so does GroupNorm on CUDA, where autocast runs group_norm in float32."""
    device_type = torch.device(device).type
    if precision != "bf16" or device_type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Leave autocast for a numerically sensitive region (e.g. the spectral-norm power iteration)."""
    if device_type in ("cuda", "cpu"):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


def configure_cuda(deterministic: bool = False) -> None:
    """TF32 matrix products and convolutions, and cuDNN's autotuner unless runs must be deterministic."""
    if not torch.cuda.is_available():
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = not deterministic


def host_to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` (drawn on the CPU) on ``device`` without waiting for the GPU: a copy from pageable
    memory synchronises the stream, one from pinned memory with ``non_blocking`` does not. The CPU
    tensor is fresh and never written again, so the asynchronous copy is safe."""
    if torch.device(device).type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
