"""One-shot diffusion denoising (Carlini et al. 2022, "(Certified!!) Adversarial Robustness for Free!").

A pretrained DDPM predicts x_0 in a single step from the timestep whose noise level matches sigma.
Nothing is trained: `denoise-baseline denoiser=ddpm` only records where the model comes from, and
`PretrainedDiffusion.load(run_dir)` rebuilds it as the run's `classifier.front`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from peftsmooth.errors import UserError
from peftsmooth.runtime import freeze, pin_eval

DIFFUSION_EXTRA = "pip install -e .[diffusion]"


def noise_ratio(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sqrt((1 - abar_t) / abar_t): the noise std of x_t / sqrt(abar_t), in [-1,1] pixel units."""
    abar = alphas_cumprod.double()
    return ((1 - abar) / abar).sqrt()


def timestep_for_sigma(alphas_cumprod: torch.Tensor, sigma: float) -> int:
    """The first t with sqrt((1-abar_t)/abar_t) >= 2 sigma.

    Pixels in [0,1] become [-1,1] for the diffusion model, which doubles the noise std; scaling
    2(x + noise) - 1 by sqrt(abar_t) then gives x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
    """
    hits = torch.nonzero(noise_ratio(alphas_cumprod) >= 2 * float(sigma))
    if len(hits) == 0:
        top = float(noise_ratio(alphas_cumprod)[-1]) / 2
        raise UserError(f"sigma={sigma} is above the diffusion model's largest noise level ({top:.3g}); use a smaller sigma")
    return int(hits[0])


class OneShotDiffusion(nn.Module):
    """D(x) = x_0 predicted in one step by a noise-prediction (epsilon) UNet at the matching t.

    `unet(x_t, t)` returns the predicted noise (a diffusers output with `.sample`, or a tensor);
    models that also learn the variance return 2C channels, of which the first C are the noise.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, sigma: float):
        super().__init__()
        self.unet = unet
        self.timestep = timestep_for_sigma(alphas_cumprod, sigma)
        abar = alphas_cumprod.double()[self.timestep]
        self.register_buffer("sqrt_abar", abar.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_abar", (1 - abar).sqrt().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_t = self.sqrt_abar * (2 * x - 1)
        t = torch.full((x.shape[0],), self.timestep, device=x.device, dtype=torch.long)
        eps = self.unet(x_t, t)
        eps = getattr(eps, "sample", eps)[:, : x.shape[1]]
        x_0 = (x_t - self.sqrt_one_minus_abar * eps) / self.sqrt_abar
        return (x_0.clamp(-1, 1) + 1) / 2


def require_diffusers():
    """Import diffusers, or a one-line UserError naming the extra to install."""
    try:
        import diffusers  # noqa: F401
    except ImportError as err:
        raise UserError(f"denoiser=ddpm needs the optional `diffusers` package: {DIFFUSION_EXTRA}") from err
    return diffusers


def _has_subfolder(pretrained: str, subfolder: str) -> bool:
    return (Path(pretrained).expanduser() / subfolder).is_dir()


def load_diffusion(pretrained: str, subfolder: str | None = None):
    """(UNet2DModel, alphas_cumprod) from a hub id or a local directory.

    Accepts a flat model directory (config.json + weights, scheduler_config.json beside it, like
    google/ddpm-cifar10-32) or a pipeline directory with unet/ and scheduler/ subfolders.
    """
    diffusers = require_diffusers()
    local = Path(str(pretrained)).expanduser()
    if subfolder is None and local.is_dir():
        subfolder = "unet" if _has_subfolder(pretrained, "unet") else None
    source = str(local) if local.is_dir() else str(pretrained)
    try:
        unet = diffusers.UNet2DModel.from_pretrained(source, subfolder=subfolder)
    except (OSError, ValueError, EnvironmentError) as err:
        raise UserError(
            f"denoiser.pretrained={pretrained}: cannot load a diffusers UNet2DModel ({str(err).splitlines()[0]}); "
            f"give a hub id such as google/ddpm-cifar10-32 or a local directory saved with save_pretrained"
        ) from err
    scheduler = None
    for sub in ("scheduler", None) if subfolder else (None, "scheduler"):
        try:
            scheduler = diffusers.DDPMScheduler.from_pretrained(source, subfolder=sub)
            break
        except (OSError, ValueError, EnvironmentError):
            continue
    if scheduler is None:  # DDPM's own schedule (Ho et al. 2020): linear betas 1e-4 .. 0.02, 1000 steps
        scheduler = diffusers.DDPMScheduler()
    return unet, scheduler.alphas_cumprod.clone()


def check_image_size(unet: nn.Module, image_size, pretrained: str) -> None:
    """The diffusion model must generate images of the dataset's native size and channels."""
    c, h, w = (int(v) for v in image_size)
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    if int(unet.config.in_channels) != c or tuple(size) != (h, w):
        raise UserError(
            f"denoiser.pretrained={pretrained} generates {unet.config.in_channels}x{size[0]}x{size[1]} images "
            f"but the dataset's images are {c}x{h}x{w}; use a diffusion model trained at the dataset's size"
        )


# --------------------------------------------------------------------------------------------------
# The front object: what `run.json`'s `front` instantiates; `.load(run_dir)` gives the denoiser module
# --------------------------------------------------------------------------------------------------
class PretrainedDiffusion:
    """A pretrained DDPM used as a one-shot denoiser: nothing is trained; the run directory only
    records where the model comes from (`pretrained`) and the sigma that fixes the timestep."""

    trains = False

    def __init__(self, pretrained: str, sigma: float, image_size=None, subfolder: str | None = None, **options):
        self.pretrained = str(pretrained)
        self.sigma = float(sigma)
        self.image_size = image_size
        self.subfolder = subfolder
        self.options = options

    def build(self) -> nn.Module:
        """The one-shot denoiser; a missing `diffusers` or a model of the wrong size is a UserError."""
        unet, alphas_cumprod = load_diffusion(self.pretrained, self.subfolder)
        if self.image_size is not None:
            check_image_size(unet, self.image_size, self.pretrained)
        return OneShotDiffusion(pin_eval(freeze(unet)), alphas_cumprod, self.sigma)

    def save(self, denoiser: nn.Module, run_dir: Path) -> list[str]:
        return []

    def load(self, run_dir) -> nn.Module:
        return self.build()
