"""CNN denoisers for denoised smoothing: f(D(x + noise)) with the classifier f frozen.

Trained CNN denoisers (Salman et al. 2020, "Denoised Smoothing"): DnCNN (depth 17, 64 channels),
DnCNN-wide (128 channels) and MemNet (3 memory blocks of 6 residual blocks with a gate unit), each
trained by `peftsmooth denoise-baseline` with one of the `denoiser.objective` objectives of
`peftsmooth.train.losses`. The one-shot diffusion denoiser is in `peftsmooth.front.diffusion`.

A denoiser sits after the noise, in native [0,1] pixel space, before the classifier's preprocessing
(docs/architecture.md, section 1): it is `BaseClassifier.front`, while it trains (`DenoisedClassifier`)
and when `peftsmooth.runs.load_run` rebuilds the run. In `run.json` the `front` entry is the denoiser
config; its `_target_` is a front object (`TrainedDenoiser` below, `diffusion.PretrainedDiffusion`),
whose `.load(run_dir)` returns the denoiser module.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import init

from peftsmooth.errors import UserError
from peftsmooth.models import BaseClassifier, load_state_dict_file, save_state_dict_file
from peftsmooth.runtime import freeze, pin_eval
from peftsmooth.train.batch import add_noise
from peftsmooth.train.loop import accuracy_evaluator, eval_loader

WEIGHTS_FILE = "denoiser.safetensors"


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
# The model a denoiser trains in: D as the classifier's front, for the denoiser objectives
# --------------------------------------------------------------------------------------------------
def with_front(classifier: nn.Module, front: nn.Module) -> nn.Module:
    """f with `front` where load_run puts it, as `BaseClassifier.front`: a BaseClassifier that shares
    the classifier's backbone (adapter included) and preprocessing, the classifier itself left as it
    is. A classifier that is not a BaseClassifier (tests) simply runs after the front."""
    base = next((m for m in classifier.modules() if isinstance(m, BaseClassifier)), None)
    if base is None:
        return nn.Sequential(front, classifier)
    return BaseClassifier(base.backbone, front=front, **base.settings())


class DenoisedClassifier(nn.Module):
    """f(D(x)) while D is trained, with D as the classifier's `front` (`with_front`); the classifier
    is frozen and pinned to eval mode (no dropout, BatchNorm statistics untouched), so `train()`
    switches only the denoiser.

    `part` picks what runs: "all" = f(D(x)), "denoiser" = D(x), "classifier" = f(x) (the clean
    reference of the stability objective); see the denoiser objectives in `peftsmooth.train.losses`.
    Going through forward keeps DataParallel wrappers valid. The denoiser and the classifier are
    registered first, so a checkpoint names their tensors `denoiser.*` and `classifier.*`.
    """

    def __init__(self, denoiser: nn.Module, classifier: nn.Module):
        super().__init__()
        self.denoiser = denoiser
        self.classifier = pin_eval(freeze(classifier))
        self.denoised = with_front(classifier, denoiser)

    def forward(self, x: torch.Tensor, part: str = "all") -> torch.Tensor:
        if part == "denoiser":
            return self.denoiser(x)
        if part == "classifier":
            return self.classifier(x)
        return self.denoised(x)


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
        save_state_dict_file(denoiser.state_dict(), Path(run_dir) / WEIGHTS_FILE)
        return [WEIGHTS_FILE]

    def load(self, run_dir, key: str = "run") -> nn.Module:
        path = Path(str(run_dir)).expanduser() / WEIGHTS_FILE
        if not path.is_file():
            raise UserError(f"{key}={run_dir} has no {WEIGHTS_FILE}; give a run directory written by denoise-baseline")
        try:
            self.arch.load_state_dict(load_state_dict_file(path), strict=True)
        except RuntimeError as err:
            raise UserError(f"{key}={run_dir}: {WEIGHTS_FILE} does not fit {type(self.arch).__name__} "
                            f"(different architecture or channels)") from err
        return self.arch


def denoiser_evaluator(test_set, sigma: float, settings, seed: int):
    """Clean / noisy accuracy of f(D(.)) (the shared evaluator) plus the denoiser's test MSE on the
    same kind of seeded noise: ||D(x + noise) - x||^2 per pixel."""
    accuracy = accuracy_evaluator(test_set, sigma, settings, seed)
    loader = eval_loader(test_set, settings)

    @torch.no_grad()
    def evaluate(model, dist_info=None) -> dict:
        out = accuracy(model, dist_info)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total = count = 0.0
        for b, (x, _) in enumerate(loader):
            x = x.to(device)
            noisy = add_noise(x, sigma, torch.Generator().manual_seed(seed * 1_000_003 + b))
            total += float(((model(noisy, part="denoiser").float() - x) ** 2).sum())
            count += x.numel()
        model.train(was_training)
        out["test_mse"] = total / max(count, 1)
        return out

    return evaluate
