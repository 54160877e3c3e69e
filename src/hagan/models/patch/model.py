"""The multi-scale patch-based GAN of Uzunova et al. (MICCAI 2019; CMIG 2020): constant GPU memory in image size.

A low-resolution conditional GAN turns the edge sketch of the whole image (at twice its resolution) into
the whole image at ``patch.low_res_size``; then one high-resolution GAN per doubling of the resolution
generates ``patch.patch_size``^3 patches, each conditioned on the sketch patch at its own scale and on the
co-located patch of the previous scale, which covers twice its field of view. No network ever sees more
than a fixed-size input, so the accelerator's memory does not grow with the image: whole volumes, their
sketches, the patch crops and the stitched results stay in host memory (numpy), and only fixed-size
batches go to the device. Generation is a domain translation: sketch any volume (another MRI contrast, a
low-dose CT) and the cascade fills its edges with the training domain's appearance. From scratch, a small
unconditional "seed" GAN draws a low-resolution image whose sketch starts the cascade (the papers'
suggestion), so samples can be compared with HA-GAN's on the same metrics.

Training runs the stages one after another in one run (``lr``, ``hr1``..``hrN`` or ``patch``, then
``seed``); the stage follows from the iteration, so a resumed run continues in the right one.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from ...checks import short_repr
from ...config import Config
from ...data.intensity import BACKGROUND
from ...errors import HaganError
from ..base import GenerativeModel
from .networks import (
    LowResDiscriminator,
    LowResGenerator,
    PatchDiscriminator,
    PatchGenerator,
    SeedDiscriminator,
    SeedGenerator,
)
from .sketch import resize, resize_labels, sketch
from .stitch import crop_padded, stitch

# voxels above this (5% of the range above the background) count as foreground when sampling patches
FOREGROUND = -0.9
# sketches of the training volumes are kept (as uint8) up to this many bytes; each costs seconds at 256^3
SKETCH_CACHE_BYTES = 4 * 2**30


@dataclass(frozen=True)
class Stage:
    """One GAN of the cascade: ``kind`` is lr, hr (conditioned on the previous scale), patch or seed."""

    name: str
    kind: str
    size: int


class SketchCache:
    """Least recently used sketches by (volume index, size), stored as uint8 as the authors saved them."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    @staticmethod
    def encode(drawing: np.ndarray) -> np.ndarray:
        return np.round((drawing + 1) * 127.5).astype(np.uint8)

    @staticmethod
    def decode(item: np.ndarray) -> np.ndarray:
        return item.astype(np.float32) / 127.5 - 1

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item

    def put(self, key: tuple[int, int], item: np.ndarray) -> None:
        if item.nbytes > self.max_bytes or key in self._items:
            return
        while self.bytes + item.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.nbytes
        self._items[key] = item
        self.bytes += item.nbytes


class TensorMemoryPeak(TorchDispatchMode):
    """Peak bytes of tensor storage newly allocated by torch inside the block, on any device.

    On a GPU this is what ``torch.cuda.max_memory_allocated`` measures for the block (without the caching
    allocator's rounding); on a CPU it counts torch's work only, which separates the networks' memory from
    the numpy host work (whole volumes, sketches, stitching) that a GPU run keeps in host memory.
    """

    def __enter__(self) -> "TensorMemoryPeak":
        self.current = self.peak = 0
        self._live: WeakIdKeyDictionary = WeakIdKeyDictionary()
        return super().__enter__()

    def _release(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            nbytes = storage.nbytes()
            if nbytes == 0 or storage.data_ptr() in inputs or storage in self._live:
                continue
            self._live[storage] = nbytes
            weakref.finalize(storage, self._release, nbytes)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (N, C, D, H, W), borders replicated."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(kernel)
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        x = F.conv3d(F.pad(x, pad, mode="replicate"), kernel.view(shape).expand(c, 1, *shape[2:]), groups=c)
    return x


class MultiScalePatchGAN(GenerativeModel):
    translates = True

    def __init__(self, config: Config):
        super().__init__(config)
        m, p = config.model, config.patch
        self.size = m.size
        self.low_res = p.low_res_size
        self.patch = p.patch_size
        self.keep = p.keep_size
        self.method = p.method
        self.overlap = p.overlap if p.overlap >= 0 else (5 if p.method == "patchwise" else 0)
        self.seed_size = p.seed_size or p.low_res_size
        self._check(config)
        self.stages = self._build_stages()
        if p.stage and p.stage not in {s.name for s in self.stages}:
            raise HaganError(f"patch.stage {short_repr(p.stage)} is not a stage of this model; choose one of "
                             f"{', '.join(s.name for s in self.stages)}")
        self.generators = nn.ModuleDict()
        self.discriminators = nn.ModuleDict()
        for stage in self.stages:
            self.generators[stage.name], self.discriminators[stage.name] = self._networks(stage)
        self.stage_iterations = {stage.name: 0 for stage in self.stages}
        self.sketch_cache = None if config.data.augment else SketchCache(SKETCH_CACHE_BYTES)
        self._optimizers: dict[str, torch.optim.Optimizer] | None = None

    # ----- structure ------------------------------------------------------------------------------
    def _check(self, config: Config) -> None:
        s, low, patch = self.size, self.low_res, self.patch
        if config.model.num_classes:
            raise HaganError("model.num_classes: the patch model is conditioned on sketches, not classes; set it to 0")
        if low > s:
            raise HaganError(f"patch.low_res_size {low} exceeds model.size {s}")
        if self.method == "multiscale" and s > low and 2 * low < patch:
            raise HaganError(f"patch.patch_size {patch} does not fit the first high-resolution scale ({2 * low}^3); "
                             f"lower patch.patch_size or raise patch.low_res_size")
        if self.method == "patchwise" and s < patch:
            raise HaganError(f"patch.patch_size {patch} exceeds model.size {s}")

    def _build_stages(self) -> list[Stage]:
        if self.method == "patchwise":
            stages = [Stage("patch", "patch", self.size)]
        else:
            stages = [Stage("lr", "lr", self.low_res)]
            if self.method == "multiscale":
                doublings = int(math.log2(self.size // self.low_res))
                stages += [Stage(f"hr{i}", "hr", self.low_res * 2**i) for i in range(1, doublings + 1)]
        return stages + [Stage("seed", "seed", self.seed_size)]

    def _networks(self, stage: Stage) -> tuple[nn.Module, nn.Module]:
        m, p = self.config.model, self.config.patch
        if stage.kind == "lr":
            return LowResGenerator(m.width, p.res_blocks, p.dropout), LowResDiscriminator(m.width)
        if stage.kind == "seed":
            return SeedGenerator(m.latent_dim, stage.size, m.width), SeedDiscriminator(stage.size, m.width)
        conditioned = stage.kind == "hr"
        return (PatchGenerator(conditioned, m.width, p.res_blocks, p.dropout),
                PatchDiscriminator(3 if conditioned else 2, m.width))

    def stage_named(self, name: str) -> Stage:
        return next(stage for stage in self.stages if stage.name == name)

    def stage_at(self, iteration: int) -> Stage:
        """``patch.stage`` if set, else the stage the schedule puts ``iteration`` in."""
        p = self.config.patch
        if p.stage:
            return self.stage_named(p.stage)
        per_stage = p.iterations_per_stage or max(1, math.ceil(self.config.train.iterations / len(self.stages)))
        return self.stages[min(iteration // per_stage, len(self.stages) - 1)]

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self._optimizers is None:
            o = self.config.optim
            fused = self.device.type == "cuda"
            self._optimizers = {}
            for stage in self.stages:
                for prefix, nets, lr in (("G", self.generators, o.lr_g), ("D", self.discriminators, o.lr_d)):
                    self._optimizers[f"{prefix}_{stage.name}"] = torch.optim.Adam(
                        nets[stage.name].parameters(), lr=lr, betas=(o.beta1, o.beta2), fused=fused
                    )
        return self._optimizers

    def compiled_modules(self) -> list[nn.Module]:
        return [*self.generators.values(), *self.discriminators.values()]

    def extra_state(self) -> dict[str, Any]:
        return {"stage_iterations": dict(self.stage_iterations)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.stage_iterations.update(state.get("stage_iterations", {}))

    # ----- host-side data (numpy; never on the accelerator) ---------------------------------------
    def sketch_of(self, volume: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        p = self.config.patch
        return sketch(volume, sigma=p.sketch_sigma, low=p.sketch_low, high=p.sketch_high, labels=labels)

    def _training_sketch(self, volume: np.ndarray, size: int, index: int | None) -> np.ndarray:
        """The sketch at ``size`` in 8 bits, cached by the volume's cache index (unless augmentation changes
        the volumes); always quantised, so a resumed run sees the same sketches as an uninterrupted one."""
        cache = self.sketch_cache if index is not None else None
        item = cache.get((index, size)) if cache is not None else None
        if item is None:
            item = SketchCache.encode(self.sketch_of(resize(volume, size)))
            if cache is not None:
                cache.put((index, size), item)
        return SketchCache.decode(item)

    def _patch_starts(self, image: np.ndarray, count: int, rng: torch.Generator) -> list[tuple[int, int, int]]:
        """``count`` patch corners around voxels drawn uniformly from the foreground, inside the volume, even
        (so the previous scale's grid holds the co-located context patch exactly)."""
        foreground = np.flatnonzero(image > FOREGROUND)
        if foreground.size == 0:
            foreground = np.arange(image.size)
        picks = foreground[torch.randint(foreground.size, (count,), generator=rng).numpy()]
        centres = np.stack(np.unravel_index(picks, image.shape), axis=1)
        corners = np.clip(centres - self.patch // 2, 0, np.array(image.shape) - self.patch) // 2 * 2
        return [tuple(int(c) for c in corner) for corner in corners]

    def _context(self, previous: np.ndarray, start: tuple[int, int, int]) -> np.ndarray:
        """The previous scale's patch centred on the patch at ``start``: twice its field of view."""
        return crop_padded(previous, [s // 2 - self.patch // 4 for s in start], self.patch, BACKGROUND)

    def _to_device(self, array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(
            self.device, memory_format=self.memory_format
        )

    def _noise(self, like: Tensor, std: float, rng: torch.Generator) -> Tensor:
        return std * torch.randn(like.shape, generator=rng).to(like.device)

    def _augment_context(self, context: Tensor, rng: torch.Generator) -> Tensor:
        """The CMIG paper's corruption of the lower scale: blur (30%), half resolution (20%), noise (all)."""
        p = self.config.patch
        n = len(context)

        def chosen(probability: float) -> Tensor:
            return (torch.rand(n, generator=rng) < probability).to(context.device).view(n, 1, 1, 1, 1)

        if p.context_blur_p > 0 and p.context_blur_sigma > 0:
            context = torch.where(chosen(p.context_blur_p), gaussian_blur(context, p.context_blur_sigma), context)
        if p.context_half_res_p > 0:
            half = F.interpolate(F.avg_pool3d(context, 2), scale_factor=2, mode="trilinear", align_corners=False)
            context = torch.where(chosen(p.context_half_res_p), half, context)
        return context + self._noise(context, p.context_noise, rng)

    # ----- training -------------------------------------------------------------------------------
    def _adversarial(self, score: Tensor, real: bool) -> Tensor:
        target = torch.full_like(score, 1.0 if real else 0.0)
        if self.config.patch.adversarial == "lsgan":
            return F.mse_loss(score, target)
        return F.binary_cross_entropy_with_logits(score, target)

    def _accuracy(self, real_score: Tensor, fake_score: Tensor) -> float:
        """The share of scores on the right side of the decision boundary, over all ranks."""
        threshold = 0.5 if self.config.patch.adversarial == "lsgan" else 0.0
        correct = ((real_score >= threshold).float().mean() + (fake_score < threshold).float().mean()) / 2
        return float(self.dist.all_reduce_mean(correct.detach().reshape(1)))

    def _gan_step(self, stage: Stage, g_inputs: tuple[Tensor, ...], before: tuple[Tensor, ...],
                  after: tuple[Tensor, ...], target: Tensor, l1_weight: float) -> dict[str, float]:
        """pix2pix's update: D on (condition, real) vs (condition, fake), gated by its accuracy; then G
        with the adversarial loss through the frozen D plus ``l1_weight`` times L1 to the real image."""
        generator, discriminator = self.generators[stage.name], self.discriminators[stage.name]
        self.requires_grad_(False)
        generator.requires_grad_(True)
        with self.autocast():
            fake = generator(*g_inputs)
        discriminator.requires_grad_(True)
        with self.autocast():
            real_score = discriminator(*before, target, *after).float()
            fake_score = discriminator(*before, fake.detach(), *after).float()
        d_loss = (self._adversarial(real_score, True) + self._adversarial(fake_score, False)) / 2
        accuracy = self._accuracy(real_score, fake_score)
        updated = accuracy <= self.config.patch.d_accuracy_gate
        logs = {"loss/D": self.update(f"D_{stage.name}", d_loss) if updated else float(d_loss.detach()),
                "D/accuracy": accuracy, "D/updated": float(updated)}
        discriminator.requires_grad_(False)
        with self.autocast():
            g_adv = self._adversarial(discriminator(*before, fake, *after).float(), True)
        g_loss = g_adv
        if l1_weight > 0:
            g_l1 = F.l1_loss(fake.float(), target.float())
            g_loss = g_loss + l1_weight * g_l1
            logs["loss/G_L1"] = float(g_l1.detach())
        logs["loss/G_adv"] = float(g_adv.detach())
        logs["loss/G"] = self.update(f"G_{stage.name}", g_loss)
        self.requires_grad_(True)
        return logs

    def train_step(self, batch: dict[str, Tensor], iteration: int, rng: torch.Generator) -> dict[str, float]:
        stage = self.stage_at(iteration)
        volumes = batch["image"].detach().float().cpu().numpy()[:, 0]
        indices = [int(i) for i in batch["index"]] if "index" in batch else [None] * len(volumes)
        local = self.step_generator(rng)
        # dropout draws from the global generator: fork it, seeded from the run's stream, so resuming repeats it
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=local)))
            logs = getattr(self, f"_train_{stage.kind}")(stage, volumes, indices, rng, local)
        self.stage_iterations[stage.name] += 1
        logs["stage"] = float(self.stages.index(stage))
        return logs

    def _train_lr(self, stage: Stage, volumes: np.ndarray, indices: list[int | None], rng: torch.Generator,
                  local: torch.Generator) -> dict[str, float]:
        sketches = np.stack([self._training_sketch(v, 2 * stage.size, i) for v, i in zip(volumes, indices)])
        images = np.stack([resize(v, stage.size) for v in volumes])
        sketch_t = self._to_device(sketches[:, None])
        sketch_t = sketch_t + self._noise(sketch_t, self.config.patch.sketch_noise, local)
        target = self._to_device(images[:, None])
        return self._gan_step(stage, (sketch_t,), (sketch_t,), (), target, self.config.patch.lambda_l1)

    def _train_patches(self, stage: Stage, volumes: np.ndarray, indices: list[int | None], local: torch.Generator,
                       conditioned: bool) -> dict[str, float]:
        """20 foreground patches per volume: the real patch, its sketch and (hr) the previous scale's context."""
        sketches, targets, contexts = [], [], []
        for volume, index in zip(volumes, indices):
            image = resize(volume, stage.size)
            drawing = self._training_sketch(volume, stage.size, index)
            previous = resize(volume, stage.size // 2) if conditioned else None
            for start in self._patch_starts(image, self.config.patch.patches_per_volume, local):
                block = tuple(slice(s, s + self.patch) for s in start)
                targets.append(image[block])
                sketches.append(drawing[block])
                if conditioned:
                    contexts.append(self._context(previous, start))
        p = self.config.patch
        sketch_t = self._to_device(np.stack(sketches)[:, None])
        sketch_t = sketch_t + self._noise(sketch_t, p.sketch_noise, local)
        target = self._to_device(np.stack(targets)[:, None])
        if not conditioned:
            return self._gan_step(stage, (sketch_t,), (sketch_t,), (), target, p.lambda_l1)
        context = self._augment_context(self._to_device(np.stack(contexts)[:, None]), local)
        return self._gan_step(stage, (sketch_t, context), (sketch_t,), (context,), target, p.lambda_l1)

    def _train_hr(self, stage: Stage, volumes: np.ndarray, indices: list[int | None], rng: torch.Generator,
                  local: torch.Generator) -> dict[str, float]:
        return self._train_patches(stage, volumes, indices, local, conditioned=True)

    def _train_patch(self, stage: Stage, volumes: np.ndarray, indices: list[int | None], rng: torch.Generator,
                     local: torch.Generator) -> dict[str, float]:
        return self._train_patches(stage, volumes, indices, local, conditioned=False)

    def _train_seed(self, stage: Stage, volumes: np.ndarray, indices: list[int | None], rng: torch.Generator,
                    local: torch.Generator) -> dict[str, float]:
        target = self._to_device(np.stack([resize(v, stage.size) for v in volumes])[:, None])
        z = self.train_latent(len(volumes), rng)
        return self._gan_step(stage, (z,), (), (), target, l1_weight=0.0)

    # ----- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def _low_res(self, drawing: np.ndarray) -> np.ndarray:
        with self.autocast():
            image = self.generators["lr"](self._to_device(drawing[None, None]))
        return image.float().cpu().numpy()[0, 0]

    @torch.no_grad()
    def refine(self, stage: Stage, drawing: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        """The whole image of ``stage`` from its sketch (and the previous scale), patch by patch, keeping
        each patch's centre; ``patch.inference_batch`` patches at a time go to the device."""
        generator = self.generators[stage.name]
        size = drawing.shape[0]

        def generate(starts: list[tuple[int, int, int]]) -> np.ndarray:
            inputs = [self._to_device(np.stack([crop_padded(drawing, s, self.patch, BACKGROUND) for s in starts])[:, None])]
            if previous is not None:
                inputs.append(self._to_device(np.stack([self._context(previous, s) for s in starts])[:, None]))
            with self.autocast():
                return generator(*inputs).float().cpu().numpy()[:, 0]

        return stitch((size,) * 3, generate, self.patch, self.keep, self.overlap, self.config.patch.inference_batch)

    def cascade(self, sketch_at: Callable[[int, np.ndarray | None], np.ndarray],
                start: np.ndarray | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """Each stage's whole image in turn; ``sketch_at(size, previous image)`` supplies the sketches,
        ``start`` is the image the first sketch may be drawn from (the seed image from scratch)."""
        if self.method == "patchwise":
            stage = self.stage_named("patch")
            yield stage.name, self.refine(stage, sketch_at(stage.size, start), None)
            return
        image = self._low_res(sketch_at(2 * self.low_res, start))
        yield "lr", image
        if self.method == "small":
            yield "upsampled", resize(image, self.size)
            return
        for stage in self.stages:
            if stage.kind == "hr":
                image = self.refine(stage, sketch_at(stage.size, image), image)
                yield stage.name, image

    def _check_volume(self, volumes: Tensor | np.ndarray) -> np.ndarray:
        array = np.asarray(volumes.detach().float().cpu() if isinstance(volumes, Tensor) else volumes, np.float32)
        if array.ndim == 3:
            array = array[None, None]
        if array.ndim != 5 or array.shape[1] != 1 or array.shape[2:] != (self.size,) * 3:
            raise HaganError(f"expected volumes of shape (n, 1, {self.size}, {self.size}, {self.size}) or a single "
                             f"{self.size}^3 volume, got {tuple(array.shape)}")
        return array

    def translate_scales(self, volume: np.ndarray, labels: np.ndarray | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """The cascade driven by the sketches of ``volume`` (model.size^3, any domain) at every scale."""

        def sketch_at(size: int, previous: np.ndarray | None) -> np.ndarray:
            return self.sketch_of(resize(volume, size), None if labels is None else resize_labels(labels, size))

        return self.cascade(sketch_at)

    @torch.no_grad()
    def translate(self, volumes: Tensor | np.ndarray, labels: np.ndarray | None = None) -> Tensor:
        """Domain translation (n, 1, S, S, S) -> (n, 1, S, S, S): the training domain's appearance on the
        inputs' edges; ``labels`` (n, S, S, S) integer maps are overlaid on the sketches."""
        array = self._check_volume(volumes)
        if labels is not None and np.shape(labels) != (len(array),) + (self.size,) * 3:
            raise HaganError(f"label maps must have shape ({len(array)}, {self.size}, {self.size}, {self.size}), "
                             f"got {np.shape(labels)}")
        out = [_last(self.translate_scales(v[0], None if labels is None else labels[i])) for i, v in enumerate(array)]
        return torch.from_numpy(np.stack(out))[:, None]

    @torch.no_grad()
    def seed_images(self, z: Tensor) -> np.ndarray:
        with self.autocast():
            return self.generators["seed"](z.to(self.device)).float().cpu().numpy()[:, 0]

    @torch.no_grad()
    def decode(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Volumes from scratch: the seed GAN draws a low-resolution image from each latent ``z``
        (model.latent_dim values), whose sketch starts the cascade; each later sketch is drawn from the
        previous scale's image, upsampled."""
        if labels is not None:
            raise ValueError("the patch model is not class-conditional; generate without class labels")

        def sketch_at(size: int, previous: np.ndarray | None) -> np.ndarray:
            return self.sketch_of(resize(previous, size))

        out = [_last(self.cascade(sketch_at, seed)) for seed in self.seed_images(z)]
        return torch.from_numpy(np.stack(out))[:, None]


def _last(stages: Iterator[tuple[str, np.ndarray]]) -> np.ndarray:
    image = None
    for _, image in stages:
        pass
    return image
