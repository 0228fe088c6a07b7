"""What a training objective sees: one micro-batch (clean and noisy images, labels, sigma) and where
training stands (`Progress`), with the Gaussian noise of training."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def add_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + sigma * N(0, I) in native pixel space (no clipping: the smoothing noise is unbounded)."""
    if sigma == 0:
        return x
    if generator is None:
        return x + sigma * torch.randn_like(x)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
    return x + sigma * noise.to(x.device)


@dataclass(frozen=True)
class Progress:
    """Where training stands when a micro-batch is computed, for objectives with a schedule (e.g.
    SmoothAdv's epsilon warm-up). `step`: the 0-based global index of the optimizer step the
    micro-batch contributes to (the updates made before it, over every phase; checkpointed, so a
    resumed run sees the same values); `steps_per_epoch`: the updates of an epoch."""

    step: int = 0
    steps_per_epoch: int = 1

    @property
    def epochs(self) -> float:
        """Epochs of training done once this step is made."""
        return (self.step + 1) / self.steps_per_epoch


@dataclass
class Batch:
    """One micro-batch: clean (augmented) images, their noisy copy, labels, the noise level, and where
    training stands (the training loop fills it in; Progress() when an objective is called alone)."""

    x: torch.Tensor
    x_noisy: torch.Tensor
    y: torch.Tensor
    sigma: float
    progress: Progress = field(default_factory=Progress)

    def noisy(self) -> torch.Tensor:
        """Another independent noisy copy x + sigma * N(0, I)."""
        return add_noise(self.x, self.sigma)
