"""Datasets in native pixel space: float tensors in [0,1], shape (C,H,W), plus integer labels.

Train-time augmentation (random crop, flip) is applied here, before any noise; Gaussian noise is
added later by the training loop or the smoothing sampler, in this same native space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from peftsmooth.errors import UserError, choice_error

DATASETS: dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str):
    """Register a factory `f(cfg, split, augment) -> Dataset` under `dataset.name`."""

    def wrap(fn):
        DATASETS[name] = fn
        return fn

    return wrap


def build_dataset(cfg, split: str, augment: bool = False) -> Dataset:
    """The `split` ('train' or 'test') of the dataset described by the `dataset` config."""
    if split not in ("train", "test"):
        raise choice_error("split", split, ["train", "test"])
    if cfg.name not in DATASETS:
        raise choice_error("dataset.name", cfg.name, DATASETS)
    return DATASETS[cfg.name](cfg, split, augment)


def train_transform(cfg):
    """Random crop (with padding) and flip on a [0,1] tensor, as the dataset config asks."""
    from torchvision.transforms import v2

    _, h, w = cfg.image_size
    steps = []
    pad = int(cfg.augment.get("crop_padding", 0))
    if pad > 0:
        steps.append(v2.RandomCrop((h, w), padding=pad))
    if cfg.augment.get("flip", False):
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps) if steps else None


class TransformedTensors(Dataset):
    """(image, label) pairs from tensors, with an optional per-item transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx):
        x = self.images[idx]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[idx])


@register_dataset("digits")
def digits(cfg, split: str, augment: bool) -> Dataset:
    """scikit-learn's 8x8 digits scaled to [0,1]; seeded 80/20 split (no download)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = int(round(len(labels) * float(cfg.get("test_fraction", 0.2))))
    chosen = order[:n_test] if split == "test" else order[n_test:]
    transform = train_transform(cfg) if augment else None
    return TransformedTensors(images[chosen], labels[chosen], transform)


def _missing(cfg, path: Path, what: str) -> UserError:
    return UserError(
        f"{what} not found at {path} (dataset.root={cfg.root}); "
        f"set dataset.root=/path/to/data or dataset.download=true where the network is reachable"
    )


def _cifar(cfg, split: str, augment: bool, cls, folder: str) -> Dataset:
    from torchvision.transforms import v2

    root = Path(str(cfg.root)).expanduser()
    steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    extra = train_transform(cfg) if augment else None
    if extra is not None:
        steps.append(extra)
    existed = root.exists()
    try:
        return cls(str(root), train=(split == "train"), download=bool(cfg.download), transform=v2.Compose(steps))
    except RuntimeError as err:  # "Dataset not found or corrupted"
        raise _missing(cfg, root / folder, cfg.name) from err
    except OSError as err:  # download attempted without network
        if not existed:  # the folder torchvision made for the download, left empty
            _remove_empty_dir(root)
        raise UserError(
            f"could not download {cfg.name} to {root} ({type(err).__name__}); "
            f"put {folder}/ under dataset.root=/path/to/data and set dataset.download=false"
        ) from err


def _remove_empty_dir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:  # not empty (a partial download stays for the next try) or already gone
        pass


@register_dataset("cifar10")
def cifar10(cfg, split: str, augment: bool) -> Dataset:
    from torchvision.datasets import CIFAR10

    return _cifar(cfg, split, augment, CIFAR10, "cifar-10-batches-py")


@register_dataset("cifar100")
def cifar100(cfg, split: str, augment: bool) -> Dataset:
    from torchvision.datasets import CIFAR100

    return _cifar(cfg, split, augment, CIFAR100, "cifar-100-python")


@register_dataset("imagenet")
def imagenet(cfg, split: str, augment: bool) -> Dataset:
    """ImageFolder under root/train and root/val; native space = 224x224 crop in [0,1]."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    folder = Path(str(cfg.root)).expanduser() / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise UserError(
            f"imagenet not found at {folder} (dataset.root={cfg.root}); "
            f"set dataset.root=/path/to/imagenet holding train/ and val/ class folders"
        )
    size = int(cfg.image_size[-1])
    if augment:
        geo = [v2.RandomResizedCrop(size)] + ([v2.RandomHorizontalFlip()] if cfg.augment.get("flip") else [])
    else:
        geo = [v2.Resize(int(round(size * 256 / 224))), v2.CenterCrop(size)]
    steps = [v2.ToImage(), *geo, v2.ToDtype(torch.float32, scale=True)]
    return ImageFolder(str(folder), transform=v2.Compose(steps))

