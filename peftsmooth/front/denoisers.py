"""Denoisers for denoised smoothing: f(D(x + noise)) with the classifier f frozen.

Trained CNN denoisers (Salman et al. 2020, "Denoised Smoothing"): DnCNN (depth 17, 64 channels),
DnCNN-wide (128 channels) and MemNet (3 memory blocks of 6 residual blocks with a gate unit), each
trained by `peftsmooth denoise-baseline` with one of the OBJECTIVES below.

One-shot diffusion denoiser (Carlini et al. 2022, "(Certified!!) Adversarial Robustness for Free!"):
a pretrained DDPM predicts x_0 in a single step from the timestep whose noise level matches sigma.

A denoiser sits after the noise, in native [0,1] pixel space, before the classifier's preprocessing
(DESIGN.md section 1), so it becomes `BaseClassifier.front`. In `run.json` the `front` entry is the
denoiser config; its `_target_` is one of the front objects at the end of this file, whose
`.load(run_dir)` returns the denoiser module that `peftsmooth.runs.load_run` installs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn import init

from peftsmooth.errors import UserError, choice_error

WEIGHTS_FILE = "denoiser.safetensors"
DIFFUSION_EXTRA = "pip install -e .[diffusion]"


# --------------------------------------------------------------------------------------------------
# DnCNN (Zhang et al. 2017), as modified by Salman et al. 2020
# --------------------------------------------------------------------------------------------------
class DnCNN(nn.Module):
    """Conv+ReLU, (depth-2) x Conv+BN+ReLU, Conv; predicts the noise and returns x - noise.

    Orthogonal init with the last conv zeroed, so an untrained DnCNN is the identity.
    """

    def __init__(self, image_channels: int = 3, depth: int = 17, channels: int = 64, kernel_size: int = 3):
        super().__init__()
        pad = kernel_size // 2
        layers: list[nn.Module] = [nn.Conv2d(image_channels, channels, kernel_size, padding=pad, bias=True),
                                   nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(channels, channels, kernel_size, padding=pad, bias=False),
                       nn.BatchNorm2d(channels, eps=1e-4, momentum=0.95),
                       nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(channels, image_channels, kernel_size, padding=pad, bias=False))
        self.dncnn = nn.Sequential(*layers)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        last = None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                last = m
                init.orthogonal_(m.weight)
                if m.bias is not None:
                    init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                init.ones_(m.weight)
                init.zeros_(m.bias)
        init.zeros_(last.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.dncnn(x)


# --------------------------------------------------------------------------------------------------
# MemNet (Tai et al. 2017), as used by Salman et al. 2020
# --------------------------------------------------------------------------------------------------
class BNReLUConv(nn.Sequential):
    """Pre-activation conv: BN -> ReLU -> Conv (no bias)."""

    def __init__(self, in_channels: int, channels: int, k: int = 3, s: int = 1, p: int = 1):
        super().__init__()
        self.add_module("bn", nn.BatchNorm2d(in_channels))
        self.add_module("relu", nn.ReLU(inplace=False))
        self.add_module("conv", nn.Conv2d(in_channels, channels, k, s, p, bias=False))


class ResidualBlock(nn.Module):
    """x + conv(conv(x)) with pre-activation convs."""

    def __init__(self, channels: int):
        super().__init__()
        self.relu_conv1 = BNReLUConv(channels, channels)
        self.relu_conv2 = BNReLUConv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.relu_conv2(self.relu_conv1(x))


class MemoryBlock(nn.Module):
    """A recursive unit of residual blocks (short-term memory) and a 1x1 gate unit that fuses
    their outputs with every earlier memory block's output (long-term memory)."""

    def __init__(self, channels: int, num_resblock: int, index: int):
        super().__init__()
        self.recursive_unit = nn.ModuleList([ResidualBlock(channels) for _ in range(num_resblock)])
        self.gate_unit = BNReLUConv((num_resblock + index) * channels, channels, 1, 1, 0)

    def forward(self, x: torch.Tensor, long_term: list[torch.Tensor]) -> torch.Tensor:
        short_term = []
        for layer in self.recursive_unit:
            x = layer(x)
            short_term.append(x)
        gate_out = self.gate_unit(torch.cat(short_term + long_term, 1))
        long_term.append(gate_out)
        return gate_out


class MemNet(nn.Module):
    """Feature extractor, `num_memblock` memory blocks, reconstructor; global residual to the input."""

    def __init__(self, image_channels: int = 3, channels: int = 64, num_memblock: int = 3, num_resblock: int = 6):
        super().__init__()
        self.feature_extractor = BNReLUConv(image_channels, channels)
        self.dense_memory = nn.ModuleList([MemoryBlock(channels, num_resblock, i + 1) for i in range(num_memblock)])
        self.reconstructor = BNReLUConv(channels, image_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.feature_extractor(x)
        long_term = [out]
        for block in self.dense_memory:
            out = block(out, long_term)
        return x + self.reconstructor(out)


# --------------------------------------------------------------------------------------------------
# Training objectives (classifier frozen; only the denoiser learns), in the protocol of the shared
# training loop (peftsmooth.training): objective(model, batch) -> (loss, logits or None), where
# `model` is a DenoisedClassifier and `batch` holds the clean x, a noisy copy x_noisy and labels y.
# --------------------------------------------------------------------------------------------------
def mse_objective(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """||D(x + noise) - x||^2 (mean over pixels): the classifier plays no part."""
    return F.mse_loss(model(batch.x_noisy, part="denoiser").float(), batch.x), None


def stability_objective(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CE(f(D(x + noise)), argmax f(x)): the denoised input should keep the classifier's clean
    prediction (needs no labels, so it works for any off-the-shelf classifier)."""
    with torch.no_grad():
        target = model(batch.x, part="classifier").argmax(1)
    logits = model(batch.x_noisy)
    return F.cross_entropy(logits.float(), target), logits


def classification_objective(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CE(f(D(x + noise)), y): the denoised input should be classified as its label."""
    logits = model(batch.x_noisy)
    return F.cross_entropy(logits.float(), batch.y), logits


OBJECTIVES: dict[str, Callable] = {
    "mse": mse_objective,
    "stability": stability_objective,
    "classification": classification_objective,
}


def get_objective(name: str) -> Callable:
    if name not in OBJECTIVES:
        raise choice_error("denoiser.objective", name, OBJECTIVES)
    return OBJECTIVES[name]


class DenoisedClassifier(nn.Module):
    """f(D(x)) while D is trained: `train()` switches only the denoiser; the classifier stays in
    eval mode (no dropout, BatchNorm statistics untouched) and frozen.

    `part` picks what runs: "all" = f(D(x)), "denoiser" = D(x), "classifier" = f(x) (the clean
    reference of the stability objective). Going through forward keeps DataParallel wrappers valid.
    """

    def __init__(self, denoiser: nn.Module, classifier: nn.Module):
        super().__init__()
        self.denoiser = denoiser
        self.classifier = classifier
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.classifier.eval()

    def train(self, mode: bool = True):
        self.training = mode
        self.denoiser.train(mode)
        self.classifier.eval()
        return self

    def forward(self, x: torch.Tensor, part: str = "all") -> torch.Tensor:
        if part == "denoiser":
            return self.denoiser(x)
        if part == "classifier":
            return self.classifier(x)
        return self.classifier(self.denoiser(x))


# --------------------------------------------------------------------------------------------------
# One-shot diffusion denoising (Carlini et al. 2022)
# --------------------------------------------------------------------------------------------------
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
# Front objects: what `run.json`'s `front` instantiates; `.load(run_dir)` gives the denoiser module
# --------------------------------------------------------------------------------------------------
class TrainedDenoiser:
    """A CNN denoiser trained by denoise-baseline: `arch` (an nn.Module, instantiated by Hydra from
    its `_target_`) with the weights in `<run_dir>/denoiser.safetensors`. Training options in the
    same config (objective, init, lr, ...) are recorded in run.json and ignored here."""

    trains = True

    def __init__(self, arch: nn.Module, objective: str = "mse", init: str | None = None, **training_options):
        if not isinstance(arch, nn.Module):
            raise UserError("denoiser.arch must be a config with _target_ naming an nn.Module class")
        self.arch = arch
        self.objective = str(objective)
        self.init = init
        self.options = training_options

    def build(self) -> nn.Module:
        """The denoiser to train: fresh, or the weights of the `init` run (e.g. an MSE-trained one)."""
        if self.init:
            return self.load(self.init, key="denoiser.init")
        return self.arch

    def save(self, denoiser: nn.Module, run_dir: Path) -> list[str]:
        from peftsmooth.models import save_state_dict_file

        save_state_dict_file(denoiser.state_dict(), Path(run_dir) / WEIGHTS_FILE)
        return [WEIGHTS_FILE]

    def load(self, run_dir, key: str = "run") -> nn.Module:
        from peftsmooth.models import load_state_dict_file

        path = Path(str(run_dir)).expanduser() / WEIGHTS_FILE
        if not path.is_file():
            raise UserError(f"{key}={run_dir} has no {WEIGHTS_FILE}; give a run directory written by denoise-baseline")
        try:
            self.arch.load_state_dict(load_state_dict_file(path), strict=True)
        except RuntimeError as err:
            raise UserError(f"{key}={run_dir}: {WEIGHTS_FILE} does not fit {type(self.arch).__name__} "
                            f"(different architecture or channels)") from err
        return self.arch


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
        unet.requires_grad_(False)
        return OneShotDiffusion(unet.eval(), alphas_cumprod, self.sigma)

    def save(self, denoiser: nn.Module, run_dir: Path) -> list[str]:
        return []

    def load(self, run_dir) -> nn.Module:
        return self.build()
