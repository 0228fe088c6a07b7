"""Datasets: native [0,1] space, sizes, augmentation before noise, offline error paths."""

import numpy as np
import pytest
import torch
from conftest import compose

from peftsmooth.data import DATASETS, build_dataset
from peftsmooth.errors import UserError


def dataset_cfg(name, **overrides):
    cfg = compose("train", [f"dataset={name}", "peft=none"]).dataset
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def test_registry_covers_every_dataset_config():
    from peftsmooth.config import group_choices

    assert set(group_choices("dataset")) <= set(DATASETS)


def test_digits_native_space_and_split():
    cfg = dataset_cfg("digits")
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert len(train) + len(test) == 1797
    assert len(test) == 359 or len(test) == 360
    x, y = test[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    xs = torch.stack([test[i][0] for i in range(len(test))])
    assert xs.min() >= 0 and xs.max() <= 1 and xs.max() == 1
    labels = {test[i][1] for i in range(len(test))}
    assert labels == set(range(10))
    # the split is deterministic and disjoint
    again = build_dataset(cfg, "test")
    assert torch.equal(xs, torch.stack([again[i][0] for i in range(len(again))]))


def test_digits_augmentation_is_pixel_space_crop_without_flip():
    cfg = dataset_cfg("digits")
    plain = build_dataset(cfg, "train", augment=False)
    aug = build_dataset(cfg, "train", augment=True)
    torch.manual_seed(0)
    changed = 0
    for i in range(50):
        xa, ya = aug[i]
        xp, yp = plain[i]
        assert ya == yp and xa.shape == xp.shape
        assert xa.min() >= 0 and xa.max() <= 1
        changed += int(not torch.equal(xa, xp))
    assert changed > 10  # random crops move most images


def test_unknown_split_is_a_user_error():
    with pytest.raises(UserError, match="split"):
        build_dataset(dataset_cfg("digits"), "validation")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_offline_missing_files_names_path_and_override(tmp_path, name):
    cfg = dataset_cfg(name, root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(UserError) as err:
        build_dataset(cfg, "test")
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and "dataset.root=" in message
    assert "\n" not in message


def test_imagenet_missing_root_names_path(tmp_path):
    cfg = dataset_cfg("imagenet", root=str(tmp_path))
    with pytest.raises(UserError, match=r"imagenet not found at .*val.*dataset\.root="):
        build_dataset(cfg, "test")


def test_imagenet_imagefolder_fixture(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for k in range(2):
                arr = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
                Image.fromarray(arr).save(folder / f"{k}.png")
    cfg = dataset_cfg("imagenet", root=str(tmp_path), image_size=[3, 32, 32])
    test = build_dataset(cfg, "test")
    train = build_dataset(cfg, "train", augment=True)
    assert len(test) == 4 and len(train) == 4
    x, y = test[3]
    assert x.shape == (3, 32, 32) and y == 1
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    assert train[0][0].shape == (3, 32, 32)
