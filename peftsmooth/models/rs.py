"""`model=rs`: the checkpoints the randomized-smoothing literature publishes, read as they are.

Cohen et al. 2019 (locuslab/smoothing), Salman et al. 2019 (SmoothAdv), Jeong & Shin 2020
(consistency), Jeong et al. 2021 (SmoothMix) and CAT-RS share one format:
`torch.save({'epoch', 'arch', 'state_dict', 'optimizer'}, 'checkpoint.pth.tar')`, where `state_dict` is
that of `nn.Sequential(NormalizeLayer(dataset mean, std), network)`. The normalization layer holds no
state (its numbers are constants of their code: `NORMALIZATION` below), so the network's keys start
with `1.`; the ImageNet ResNet-50 is torchvision's inside `nn.DataParallel`, so its keys read
`1.module.`. `arch` is one of ARCHS:

  cifar_resnet20, cifar_resnet110   the 6n+2 BasicBlock ResNet of their code (16/32/64 channels,
                                    conv1 bn1 layer1..3 avgpool fc) on 32x32 CIFAR-10 images
  resnet50                          torchvision's ResNet-50 on the 224x224 centre crop of ImageNet

The file is read with `torch.load(weights_only=True)`; its normalization goes inside f (BaseClassifier),
so noise and radii stay in native pixels, as in their code. `model.checkpoint` may also hold a plain
state dict of the network (what `peftsmooth train` keeps for a random start).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from peftsmooth.errors import UserError, choice_error
from peftsmooth.models.base import IMAGENET_MEAN, IMAGENET_STD, Preprocess, Source, check_files, describe

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
NORMALIZATION = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
ARCHS = {"cifar_resnet20": ("cifar10", 32), "cifar_resnet110": ("cifar10", 32), "resnet50": ("imagenet", 224)}


class BasicBlock(nn.Module):
    """conv3x3 - BN - ReLU - conv3x3 - BN, plus the shortcut (a 1x1 conv and BN where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of depth 6n+2 (n BasicBlocks per stage), with the module names of the published
    checkpoints."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth {depth} is not 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(cin, cout, stride), *(BasicBlock(cout, cout) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def network(arch: str, num_classes: int) -> nn.Module:
    if arch == "resnet50":
        import torchvision

        return torchvision.models.resnet50(weights=None, num_classes=num_classes)
    return CifarResNet(int(arch.removeprefix("cifar_resnet")), num_classes)


def published_state(state, arch: str) -> dict[str, torch.Tensor]:
    """The network's state dict from a published checkpoint: its `state_dict`, without the `1.` of the
    Sequential(normalize, network) and the `module.` of DataParallel; a plain state dict as it is."""
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        written = state.get("arch")
        if written is not None and str(written) != arch:
            raise UserError(f"model.checkpoint was saved with arch={written}, not model.arch={arch}")
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise UserError("model.checkpoint holds no state dict")
    out = {}
    for key, value in state.items():
        for prefix in ("1.module.", "1.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


class PublishedRS(Source):
    name = "rs"

    def check(self, model_cfg) -> None:
        arch = model_cfg.get("arch")
        if arch not in ARCHS:
            raise choice_error("model.arch", arch, ARCHS)
        check_files(model_cfg)

    def create(self, model_cfg, num_classes: int, weights: bool = True) -> nn.Module:
        arch = str(model_cfg.arch)
        backbone = network(arch, num_classes)
        describe(backbone, arch, "fc", "conv1")
        return backbone

    def load_checkpoint(self, backbone: nn.Module, model_cfg, num_classes: int) -> None:
        from peftsmooth.models.weights import load_into, read_weights_only

        state = published_state(read_weights_only(model_cfg.checkpoint), str(model_cfg.arch))
        load_into(backbone, state, f"model.checkpoint={model_cfg.checkpoint} (arch={model_cfg.arch}, "
                                   f"{num_classes} classes)")

    def preprocess(self, backbone: nn.Module, model_cfg) -> Preprocess:
        dataset, size = ARCHS[str(model_cfg.arch)]
        mean, std = NORMALIZATION[dataset]
        return Preprocess(size, mean, std)

    def label(self, model_cfg) -> str:
        return str(model_cfg.get("arch"))
