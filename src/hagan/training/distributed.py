"""Data-parallel training on torch.distributed, launched by ``torchrun``.

Every rank holds a full copy of the model and trains on its shard of the global batch
(``optim.batch_size`` is the global batch; each rank takes ``batch_size / world_size`` items).
Gradients are averaged with one ``all_reduce`` right before each optimizer step
(:meth:`hagan.models.base.GenerativeModel.update`) instead of through DistributedDataParallel:
HA-GAN's D step with R1 or WGAN-GP needs a double backward (``create_graph=True``), which DDP's
reducer does not support, and each iteration runs four separate updates on four module groups.
Averaging before ``step`` is exactly DDP's semantics (mean-reduced losses over equal shards, so the
update equals one process with the global batch). Parameters and buffers are broadcast from rank 0
when training starts, and buffers (spectral norm's power-iteration vectors ``_u``/``_v``) again after
every iteration, as DDP's ``broadcast_buffers`` does; identical weights make them identical anyway.

``torchrun --nproc_per_node 2 -m hagan.cli train ...`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT; :func:`from_env` joins the group (nccl on CUDA, gloo on CPU).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import HaganError

T = TypeVar("T")


@dataclass
class DistContext:
    """Where this process stands in the job. The default is one process (no communication)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ----- collectives (no-ops for one process) ----------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        """In place: the mean over ranks."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(self.world_size)
        return tensor

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_gather_cat(self, tensor: Tensor) -> Tensor:
        """Concatenate equal-shaped tensors of all ranks along dim 0, in rank order."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def broadcast_object(self, value: T) -> T:
        if not self.enabled:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_tensors(self, tensors: Sequence[Tensor]) -> None:
        """Overwrite ``tensors`` on every rank with rank 0's values (one flat broadcast per dtype)."""
        if not self.enabled or not tensors:
            return
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src=0)
            offset = 0
            with torch.no_grad():
                for t in group:
                    n = t.numel()
                    t.copy_(flat[offset : offset + n].view_as(t))
                    offset += n

    def broadcast_module(self, module: nn.Module, buffers_only: bool = False) -> None:
        tensors = list(module.buffers())
        if not buffers_only:
            tensors = list(module.parameters()) + tensors
        self.broadcast_tensors([t for t in tensors if t.numel()])

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result, or its HaganError, to every rank."""
        if not self.enabled:
            return fn()
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except Exception as err:
                self.broadcast_object(("error", str(err)))
                raise
        outcome = self.broadcast_object(outcome)
        if outcome[0] == "error":
            raise HaganError(outcome[1])
        return outcome[1]

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def sync_gradients(ctx: DistContext, params: Iterable[Tensor], loss: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Average the gradients of ``params`` (and ``loss``) over ranks; say whether they are finite.

    One flat all_reduce carries every gradient and the loss, so all ranks see the same averaged
    values and take the same decision on divergence. Returns (mean loss, loss finite, grads finite)
    as device tensors, so that nothing is read back to the host here.
    """
    grads = [p.grad for p in params if p.grad is not None]
    loss_value = loss.detach().float().reshape(1)
    if ctx.enabled:
        flat = torch.cat([loss_value.to(grads[0].dtype if grads else loss_value.dtype)]
                         + [g.reshape(-1) for g in grads])
        ctx.all_reduce_mean(flat)
        offset = 1
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n
        loss_value = flat[:1].float()
        grads_finite = torch.isfinite(flat[1:]).all()
    elif grads:
        grads_finite = torch.isfinite(torch.stack(torch._foreach_norm(grads)).float()).all()
    else:
        grads_finite = torch.ones((), dtype=torch.bool, device=loss.device)
    value = loss_value.reshape(())
    return value, torch.isfinite(value), grads_finite


def env_world_size() -> int:
    """The world size torchrun announces (1 when not launched by torchrun)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def from_env(device_name: str = "auto", timeout_minutes: float = 30.0) -> DistContext:
    """Join the process group torchrun prepared, or return the one-process context."""
    world_size = env_world_size()
    if world_size <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=False)
    use_cuda = torch.cuda.is_available() and (device_name == "auto" or device_name.startswith("cuda"))
    backend = "nccl" if use_cuda else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(minutes=timeout_minutes)}
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(**kwargs)
    return DistContext(rank, world_size, local_rank, owns_group=True)


def device_for(ctx: DistContext, device_name: str) -> str:
    """The device string for this rank: ``auto``/``cuda`` become ``cuda:LOCAL_RANK`` under torchrun."""
    if not ctx.enabled:
        return device_name
    if device_name.startswith("cuda:"):
        raise HaganError(
            f"train.device is {device_name!r}, but under torchrun each process takes the GPU of its local rank; "
            "use --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs"
        )
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ctx.local_rank}"
    if device_name == "auto":
        return "cpu"
    return device_name
