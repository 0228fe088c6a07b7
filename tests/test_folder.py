"""dataset=folder: <root>/train/<class>/* and <root>/test/<class>/* (or val/), any image dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, compose
from omegaconf import OmegaConf
from PIL import Image

from peftsmooth.data import build_dataset, check_folder, folder_classes
from peftsmooth.errors import UserError

CLASSES = ("bee", "ant", "cat")  # sorted by name: ant=0, bee=1, cat=2


def write_folder(root: Path, per_class: int = 6, test: str = "test", classes=CLASSES, size=(30, 20)) -> Path:
    """Small RGB images of several sizes, one colour per class (so a model can learn them)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), (test, 3)):
        for k, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.zeros((size[1] + i, size[0], 3), dtype=np.uint8)
                base[..., k % 3] = 200
                noisy = np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(noisy).save(root / split / name / f"{i}.png")
    (root / "train" / classes[0] / "notes.txt").write_text("not an image")
    return root


def folder_cfg(root: Path, **extra):
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "dataset" / "folder.yaml")
    cfg.root = str(root)
    cfg.merge_with(OmegaConf.create(extra))
    return cfg


def test_images_are_resized_and_centre_cropped_to_the_native_size(tmp_path):
    root = write_folder(tmp_path / "ds")
    cfg = folder_cfg(root, image_size=[3, 16, 16])
    assert cfg.num_classes == 3 == folder_classes(root)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert len(train) == 18 and len(test) == 9 and train.classes == ["ant", "bee", "cat"]
    x, label = test[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert label == 0 and x[1].mean() > 0.6  # "ant" images are green: the class order is by name
    gray = build_dataset(folder_cfg(root, image_size=[1, 12, 10]), "train")[0][0]
    assert gray.shape == (1, 12, 10)


def test_val_stands_in_for_test(tmp_path):
    root = write_folder(tmp_path / "ds", test="val")
    assert len(build_dataset(folder_cfg(root, image_size=[3, 8, 8]), "test")) == 9


@pytest.mark.parametrize("damage, message", [
    (lambda r: __import__("shutil").rmtree(r / "test"), "has no test/ or val/"),
    (lambda r: __import__("shutil").rmtree(r / "train"), "has no train/"),
    (lambda r: [p.unlink() for p in (r / "test" / "cat").iterdir()], "no images in"),
    (lambda r: (r / "test" / "dog").mkdir(), "different classes (e.g. 'dog')"),
])
def test_a_broken_folder_is_one_line(tmp_path, damage, message):
    root = write_folder(tmp_path / "ds")
    damage(root)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_folder(folder_cfg(root))


def test_a_class_count_that_does_not_match_is_refused(tmp_path):
    root = write_folder(tmp_path / "ds")
    with pytest.raises(UserError, match="dataset.num_classes=4 but .* has 3 class folders"):
        check_folder(folder_cfg(root, num_classes=4))


def test_train_and_certify_on_a_folder_and_the_class_check(tmp_path):
    from peftsmooth.commands.certify import run_certify
    from peftsmooth.commands.train import run_train

    root = write_folder(tmp_path / "ds")
    data = ["dataset=folder", f"dataset.root={root}", "dataset.image_size=[3,16,16]", "device=cpu"]
    run_train(compose("train", [*data, *TINY_MODEL, "peft=linear", "sigma=0.25", "train.epochs=1",
                                "train.batch_size=6", "train.num_workers=0"], run_dir=tmp_path / "run"))
    summary = run_certify(compose("certify", [f"run={tmp_path / 'run'}", "device=cpu", "certify.n0=8", "certify.n=32",
                                              "certify.alpha=0.01", "certify.batch_size=40"], run_dir=tmp_path / "c"))
    assert summary["num_images"] == 9 and summary["dataset"] == "folder"
    other = write_folder(tmp_path / "two", classes=("a", "b"))
    with pytest.raises(UserError, match="does not match the run's num_classes=3"):
        run_certify(compose("certify", [f"run={tmp_path / 'run'}", "device=cpu", "dataset=folder",
                                        f"dataset.root={other}", "dataset.image_size=[3,16,16]"], run_dir=tmp_path / "c2"))
