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



# --- any folder of class sub-directories -------------------------------------------------------

FOLDER_TEST_SPLITS = ("test", "val")


def _has_image(folder: Path) -> bool:
    """Whether `folder` holds an image file (stops at the first: a class of a large dataset is not listed)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return any(p.suffix.lower() in IMG_EXTENSIONS and p.is_file() for p in folder.rglob("*"))


def folder_split(root: Path, split: str) -> Path | None:
    """<root>/train, or <root>/test (else <root>/val); None when missing."""
    names = ("train",) if split == "train" else FOLDER_TEST_SPLITS
    return next((root / n for n in names if (root / n).is_dir()), None)


def folder_classes(root) -> int | None:
    """The number of class folders in <root>/train (None without one): `dataset.num_classes` of
    `dataset=folder` (conf/dataset/folder.yaml resolves it with this)."""
    train = folder_split(Path(str(root)).expanduser(), "train") if root else None
    return sum(1 for p in train.iterdir() if p.is_dir()) if train is not None else None


def check_folder(cfg) -> None:
    """`dataset=folder`, before any work: train/ and test/ (or val/) under dataset.root, the same class
    folders in both, images in each, and dataset.num_classes (when set) equal to their number."""
    if not cfg.get("root"):
        raise UserError("dataset=folder needs dataset.root=<dir> holding train/<class>/* and test/<class>/*")
    root = Path(str(cfg.root)).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset.root={cfg.root}: " + ("not a directory" if root.exists() else "no such directory"))
    splits = {s: folder_split(root, s) for s in ("train", "test")}
    for split, path in splits.items():
        if path is None:
            want = "train/" if split == "train" else "test/ or val/"
            raise UserError(f"dataset.root={cfg.root} has no {want} (a folder of class sub-directories each)")
    classes = {s: sorted(p.name for p in path.iterdir() if p.is_dir()) for s, path in splits.items()}
    if classes["train"] != classes["test"]:
        only = sorted(set(classes["train"]) ^ set(classes["test"]))
        raise UserError(f"dataset.root={cfg.root}: train/ and {splits['test'].name}/ have different classes "
                        f"(e.g. {only[0]!r})")
    for split, path in splits.items():
        empty = next((c for c in classes[split] if not _has_image(path / c)), None)
        if not classes[split] or empty is not None:
            where = path / empty if empty is not None else path
            raise UserError(f"dataset.root={cfg.root}: no images in {where}")
    given = cfg.get("num_classes")
    if given is not None and int(given) != len(classes["train"]):
        raise UserError(f"dataset.num_classes={given} but dataset.root={cfg.root} has {len(classes['train'])} "
                        f"class folders")
    if len(cfg.image_size) != 3 or int(cfg.image_size[0]) not in (1, 3):
        raise UserError(f"dataset.image_size={list(cfg.image_size)} must be [C, H, W] with C = 1 or 3")


def _open_image(path: str, mode: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


@register_dataset("folder")
def folder(cfg, split: str, augment: bool) -> Dataset:
    """An ImageFolder under <root>/train or <root>/test (val/): classes sorted by name; every image
    resized (shorter side) and centre-cropped to the native size [C, H, W], in [0,1], before any noise."""
    import functools

    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    check_folder(cfg)
    c, h, w = (int(v) for v in cfg.image_size)
    steps = [v2.ToImage(), v2.Resize(min(h, w)), v2.CenterCrop((h, w)), v2.ToDtype(torch.float32, scale=True)]
    extra = train_transform(cfg) if augment else None
    if extra is not None:
        steps.append(extra)
    loader = functools.partial(_open_image, mode="L" if c == 1 else "RGB")
    return ImageFolder(str(folder_split(Path(str(cfg.root)).expanduser(), split)), transform=v2.Compose(steps),
                       loader=loader)
