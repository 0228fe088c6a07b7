"""Runs rebuild from any working directory: a `model=python model.factory=mynets:build` run trained in one
directory certifies and quantizes from another; a run whose module file moved certifies with
`model.factory=` on the command line, and a module whose state dict does not fit is refused."""

from __future__ import annotations

import shutil
import sys

import pytest
from conftest import compose

from peftsmooth.errors import UserError

MODULE = '''
import torch.nn as nn

def build(num_classes):
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, num_classes))

def wider(num_classes):
    return nn.Sequential(nn.Conv2d(3, 9, 3, padding=1), nn.ReLU(), nn.Conv2d(9, 9, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(9, num_classes))
'''
TRAIN = ["dataset=digits", "device=cpu", "sigma=0.25", "train.epochs=1", "train.max_steps_per_epoch=1",
         "train.batch_size=16", "train.max_eval=16", "train.num_workers=0", "model=python", "model.input_size=8",
         "model.mean=[0.5]", "model.std=[0.25]", "peft=lora"]
CERTIFY = ["device=cpu", "certify.n0=4", "certify.n=16", "certify.alpha=0.01", "certify.batch_size=16",
           "certify.skip=100", "certify.max=1"]


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """A LoRA run of `mynets:build`, trained with tmp/code as the working directory."""
    from peftsmooth.commands.train import run_train

    code = tmp_path / "code"
    code.mkdir()
    (code / "mynets.py").write_text(MODULE)
    monkeypatch.chdir(code)
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.modules.pop("mynets", None)  # a fresh process: nothing imported yet
    run_train(compose("train", [*TRAIN, "model.factory=mynets:build"], run_dir=tmp_path / "run"))
    sys.modules.pop("mynets", None)  # certify runs in another process
    sys.path[:] = [p for p in sys.path if p not in (str(code), "")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return tmp_path / "run"


def test_a_python_model_run_certifies_and_quantizes_from_another_directory(trained, tmp_path):
    from peftsmooth.commands.certify import run_certify
    from peftsmooth.commands.quantize import run_quantize
    from peftsmooth.runs import read_run_info

    assert read_run_info(trained).model["factory_path"] == str(tmp_path / "code")
    cert = run_certify(compose("certify", [f"run={trained}", *CERTIFY], run_dir=tmp_path / "cert"))
    assert cert["num_images"] == 1 and cert["model_name"] == "python:build"
    run_quantize(compose("quantize", [f"run={trained}", "bits=8", f"out={tmp_path / 'q8'}"], run_dir=tmp_path / "job"))
    assert run_certify(compose("certify", [f"run={tmp_path / 'q8'}", *CERTIFY], run_dir=tmp_path / "c2"))["num_images"] == 1


def test_a_run_whose_module_moved_certifies_with_the_factory_override(trained, tmp_path):
    from peftsmooth.commands.certify import check_certify, run_certify

    moved = tmp_path / "new_home" / "nets_v2.py"
    moved.parent.mkdir()
    shutil.move(tmp_path / "code" / "mynets.py", moved)
    with pytest.raises(UserError, match="cannot import mynets.*moved\\? give model.factory="):
        check_certify(compose("certify", [f"run={trained}", *CERTIFY], run_dir=tmp_path / "refused"))
    with pytest.raises(UserError, match="with model.factory=.*:wider: the run's weights do not fit that model"):
        run_certify(compose("certify", [f"run={trained}", *CERTIFY, f"model.factory={moved}:wider"],
                            run_dir=tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    cert = run_certify(compose("certify", [f"run={trained}", *CERTIFY, f"model.factory={moved}:build"],
                               run_dir=tmp_path / "cert"))
    assert cert["num_images"] == 1
