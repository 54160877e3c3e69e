"""The small interface through which every model plugs into the one trainer and the inference API."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..config import Config
from ..errors import HaganError
from ..training import accel
from ..training.distributed import DistContext, sync_gradients


class DivergenceError(HaganError):
    """A loss or a gradient became NaN or Inf; that optimizer step was not taken."""

    def __init__(self, step: str | None, loss: float, where: str, name: str | None = None):
        self.step, self.loss, self.where = step, loss, where
        self.name = name or f"loss/{step}"
        self.iteration: int | None = None
        self.noticed: int | None = None  # when the trainer read the device-side record, if later
        super().__init__(self.describe())

    def describe(self) -> str:
        """E.g. ``training diverged at iteration 12: non-finite gradient in the D step (loss/D = 0.71)``."""
        at = f" at iteration {self.iteration}" if self.iteration is not None else ""
        step = f" in the {self.step} step" if self.step else ""
        later = ""
        if self.noticed is not None and self.iteration is not None and self.noticed > self.iteration:
            later = f" (read back at iteration {self.noticed}; no update with a non-finite value was applied)"
        return f"training diverged{at}: {self.where}{step} ({self.name} = {self.loss}){later}"


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` can skip its step on the device (a fused optimizer's ``found_inf``)."""
    return all(group.get("fused") for group in optimizer.param_groups)


def adam(params: Any, lr: float, betas: tuple[float, float], eps: float = 1e-8) -> torch.optim.Adam:
    """Fused Adam on every device: one kernel for all parameters, and a step that ``found_inf`` can skip
    without the host reading anything back (as torch.amp's GradScaler skips steps)."""
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)


class GenerativeModel(nn.Module, ABC):
    """A model owns its networks, optimizers and update rule; the trainer owns data, logging and checkpoints."""

    # Optional abilities, declared here so that the rest of the code asks the contract instead of probing
    # the class: a model that has one overrides the method or flag; the others answer with a clear error.
    supports_tiling = False  # whether ``tile_depth`` (generation over depth tiles) means anything to it
    translates = False  # whether ``translate`` maps sketches of other domains into the training domain
    segmentation_labels = 0  # label classes generated beside the image (0: none)

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.dist = DistContext()  # the trainer sets the real one under torchrun
        self.iteration = 0  # the trainer's 0-based iteration, for the divergence record
        self._divergence: Tensor | None = None

    @abstractmethod
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Named optimizers, saved and restored with the checkpoint."""

    @abstractmethod
    def train_step(self, batch: dict[str, Tensor], iteration: int, rng: torch.Generator) -> dict[str, float]:
        """One full training iteration; returns the scalars to log."""

    def sample(self, n: int, rng: torch.Generator, labels: Tensor | None = None) -> Tensor:
        """``n`` full-resolution volumes (n, 1, S, S, S) in [-1, 1]: ``decode`` of latents from the prior."""
        return self.decode(self.latent(n, rng), labels)

    @abstractmethod
    def decode(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Volumes (n, 1, S, S, S) in [-1, 1] from latents ``z``: what ``sample`` draws, for given latents."""

    def encode(self, volumes: Tensor) -> Tensor:
        """Latent codes (n, latent_dim) of volumes (n, 1, S, S, S) in [-1, 1]."""
        raise HaganError(f"model {self.config.model.name!r} has no encoder")

    def translate(self, volumes: Tensor, labels: Tensor | None = None) -> Tensor:
        """Volumes of another domain generated in the training domain (see ``translates``)."""
        raise HaganError(f"model {self.config.model.name!r} cannot translate sketches; train one with --model patch")

    def decode_with_segmentation(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``decode`` and the label maps generated with it (see ``segmentation_labels``)."""
        raise HaganError(f"model {self.config.model.name!r} generates no label maps")

    def sample_with_segmentation(self, n: int, rng: torch.Generator) -> tuple[Tensor, Tensor]:
        """``sample`` and the label maps generated with it (see ``segmentation_labels``)."""
        return self.decode_with_segmentation(self.latent(n, rng))

    @property
    def keeps_moving_average(self) -> bool:
        """Whether the model keeps a moving average of its generator to sample from (``sample_from_ema``)."""
        return False

    def decode_bytes(self) -> int | None:
        """Working memory of decoding one volume, for choosing a batch; None when the model has no estimate."""
        return None

    def memory_probes(self, batch_size: int) -> dict[str, Callable[[], object]] | None:
        """Each update step's forward passes on a zero batch, for ``hagan bench``'s memory estimate; None
        when the model offers none."""
        return None

    def generation_probe(self, n: int) -> Callable[[], object]:
        """The forward pass that generates ``n`` volumes (``decode`` of zero latents, which runs on the meta
        device where drawing latents does not), for ``hagan bench``'s memory estimate."""
        z = torch.zeros(n, self.config.model.latent_dim, device=self.device)
        return lambda: self.decode(z)

    @property
    def parts(self) -> dict[str, nn.Module]:
        """The model's networks by the names ``hagan summary`` and ``hagan bench`` report them under."""
        return dict(self.named_children())

    def extra_state(self) -> dict[str, Any]:
        """Scalars besides weights that a resumed run needs (e.g. an adaptive augmentation strength)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` returned."""

    def update(self, name: str, loss: Tensor) -> Tensor | float:
        """One optimizer step: zero_grad, backward, average gradients over ranks, check, step.

        All four of HA-GAN's updates go through here, so data-parallel training has DDP's semantics
        (gradients averaged over ranks before the step) even with double backward. A non-finite loss
        or gradient never reaches the weights: a fused optimizer skips the step on the device and the
        first such update is recorded there (``take_divergence`` reads it, as the trainer does every
        ``train.log_every`` iterations); any other optimizer is checked on the host, which raises
        :class:`DivergenceError` before the step. Returns the loss averaged over ranks: a device
        tensor when the step was guarded on the device, else a float.
        """
        optimizer = self.optimizers()[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        value, loss_finite, grads_finite = sync_gradients(self.dist, params, loss)
        if not skips_on_device(optimizer):
            if not bool(loss_finite):
                raise DivergenceError(name, float(value), "non-finite loss")
            if not bool(grads_finite):
                raise DivergenceError(name, float(value), "non-finite gradient")
            optimizer.step()
            return float(value)
        finite = loss_finite & grads_finite
        self._record_divergence(list(self.optimizers()).index(name), value, loss_finite, finite)
        optimizer.found_inf = (~finite).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # a later step() elsewhere must not obey this update's flag
        return value

    def _record_divergence(self, index: int, value: Tensor, loss_finite: Tensor, finite: Tensor) -> None:
        """Keep (1-based iteration, update index, loss, loss finite) of the first non-finite update on the
        device: all zeros while there was none."""
        record = self._divergence
        if record is None:
            record = torch.zeros(4, dtype=torch.float64, device=value.device)
        v = value.detach().double().reshape(())
        entry = torch.stack([torch.full_like(v, self.iteration + 1), torch.full_like(v, index), v, loss_finite.double()])
        self._divergence = torch.where(~finite & (record[0] == 0), entry, record)

    def take_divergence(self) -> DivergenceError | None:
        """The first non-finite update since the last call (one read from the device), then forget it."""
        record, self._divergence = self._divergence, None
        if record is None:
            return None
        iteration, index, loss, loss_finite = record.tolist()
        if iteration == 0:
            return None
        err = DivergenceError(list(self.optimizers())[int(index)], loss,
                              "non-finite gradient" if loss_finite else "non-finite loss")
        err.iteration = int(iteration)
        return err

    def train_latent(self, n: int, rng: torch.Generator) -> Tensor:
        """Latents for this rank's ``n`` items: the global batch's latents are drawn on every rank and
        each takes its own shard, so k ranks of batch n see the noise one process of batch k*n would."""
        world, rank = self.dist.world_size, self.dist.rank
        z = torch.randn(n * world, self.config.model.latent_dim, generator=rng)
        return accel.host_to_device(z[rank * n : (rank + 1) * n].contiguous(), self.device)

    def step_generator(self, rng: torch.Generator) -> torch.Generator:
        """The stream for per-sample draws of local size (DiffAugment, WGAN-GP mixing): the shared
        ``rng`` with one process; under torchrun a per-rank stream seeded from one shared draw, so ranks
        augment their items independently while ``rng`` stays identical on all ranks."""
        if not self.dist.enabled:
            return rng
        seed = int(torch.randint(0, 2**62, (1,), generator=rng))
        return torch.Generator().manual_seed(seed + 7919 * self.dist.rank)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def precision(self) -> str:
        """``fp32`` or ``bf16``: ``train.precision`` resolved for the device the model is on."""
        return accel.resolve_precision(self.config.train.precision, self.device)

    def autocast(self):
        """The context every forward pass of training and inference runs in."""
        return accel.autocast(self.device, self.precision)

    @property
    def memory_format(self) -> torch.memory_format:
        channels_last = self.config.train.channels_last and self.device.type == "cuda"
        return torch.channels_last_3d if channels_last else torch.contiguous_format

    def accelerate(self) -> "GenerativeModel":
        """Apply ``train.channels_last`` and ``train.compile`` once the model is on its device."""
        if self.memory_format == torch.channels_last_3d:
            self.to(memory_format=torch.channels_last_3d)
        if self.config.train.compile:
            for module in self.compiled_modules():
                module.compile()
        return self

    def compiled_modules(self) -> list[nn.Module]:
        """The networks ``train.compile`` compiles (those never differentiated twice)."""
        return list(self.children())

    def latent(self, n: int, rng: torch.Generator) -> Tensor:
        """Standard normal latents drawn on the CPU generator so a seed means the same on every device."""
        return torch.randn(n, self.config.model.latent_dim, generator=rng).to(self.device)
