"""The growth schedule of the progressive GAN: which resolution, fade-in weight and network an
iteration trains, as a pure function of the iteration, so a resumed run continues exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .networks import resolutions


@dataclass(frozen=True)
class Phase:
    """What one iteration trains."""

    level: int  # index into the resolutions (0 = 4 per side)
    resolution: int
    alpha: float  # fade-in weight of the newest block: rises 0 -> 1 while fading, 1 when stable
    fading: bool
    encoder: bool  # the GAN is finished and frozen; only the encoder trains
    start: int  # first iteration of this phase

    @property
    def name(self) -> str:
        if self.encoder:
            return "encoder"
        return f"{'fade' if self.fading else 'stable'} {self.resolution}"


class GrowthSchedule:
    """Stable at ``start_size``; then for each doubling a fade-in phase and a stable phase; then
    ``final_iterations`` more at full size. After that the GAN goes on training at full size, or,
    with ``encoder``, is frozen while the encoder trains for the rest of the run. Nothing depends on
    the run's length, so a run resumed with more iterations keeps its schedule."""

    def __init__(
        self, start_size: int, size: int, fade_iterations: int, stable_iterations: int,
        final_iterations: int = 0, encoder: bool = False,
    ):
        all_resolutions = resolutions(size)
        if start_size not in all_resolutions:
            raise ValueError(f"start size {start_size} is not one of the resolutions {all_resolutions}")
        if fade_iterations < 1 or stable_iterations < 1 or final_iterations < 0:
            raise ValueError("fade and stable phases need at least one iteration each, the final phase none or more")
        self.size = size
        self.first_level = all_resolutions.index(start_size)
        self.last_level = len(all_resolutions) - 1
        self.fade_iterations, self.stable_iterations = fade_iterations, stable_iterations
        self.final_iterations = final_iterations
        self.encoder_start = self.growth_iterations + final_iterations if encoder else None

    @classmethod
    def from_images(
        cls, start_size: int, size: int, fade_images: int, stable_images: int, images_per_iteration: int,
        final_images: int = 0, encoder: bool = False,
    ) -> "GrowthSchedule":
        """Phase lengths given in training images, as Karras et al. count them."""
        fade, stable, final = (
            math.ceil(images / images_per_iteration) for images in (fade_images, stable_images, final_images)
        )
        return cls(start_size, size, fade, stable, final, encoder)

    @property
    def growth_iterations(self) -> int:
        """Iterations until the last phase reaches full size and turns stable."""
        doublings = self.last_level - self.first_level
        return self.stable_iterations + doublings * (self.fade_iterations + self.stable_iterations)

    def boundaries(self) -> list[Phase]:
        """The first iteration of every phase, in order (the encoder's last, if any)."""
        phases = [self.at(0)]
        start = self.stable_iterations
        for level in range(self.first_level + 1, self.last_level + 1):
            phases += [self.at(start), self.at(start + self.fade_iterations)]
            start += self.fade_iterations + self.stable_iterations
        if self.encoder_start is not None:
            phases.append(self.at(self.encoder_start))
        return phases

    def at(self, iteration: int) -> Phase:
        if self.encoder_start is not None and iteration >= self.encoder_start:
            return Phase(self.last_level, self.size, 1.0, False, True, self.encoder_start)
        if iteration < self.stable_iterations:
            return self._phase(self.first_level, 1.0, False, 0)
        offset = iteration - self.stable_iterations
        period = self.fade_iterations + self.stable_iterations
        doubling = offset // period
        level = self.first_level + 1 + doubling
        if level > self.last_level:  # the last stable phase goes on
            return self._phase(self.last_level, 1.0, False, self.growth_iterations - self.stable_iterations)
        into = offset - doubling * period
        begin = self.stable_iterations + doubling * period
        if into < self.fade_iterations:
            return self._phase(level, into / self.fade_iterations, True, begin)
        return self._phase(level, 1.0, False, begin + self.fade_iterations)

    def _phase(self, level: int, alpha: float, fading: bool, start: int) -> Phase:
        return Phase(level, resolutions(self.size)[level], alpha, fading, False, start)
