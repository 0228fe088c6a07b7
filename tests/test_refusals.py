"""Refused commands, run through the CLI entry in-process in an empty working directory: exit 2, one
line on stderr, no traceback, and nothing left behind (no outputs/, no data/, no Hydra directory)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from peftsmooth import cli, hub
from peftsmooth.train import watch as train_watch

TINY = ["dataset=digits", "device=cpu", "model=vit_tiny"]
# (arguments, a piece of the one-line error): every command, refused before Hydra starts
REFUSED = [
    (["certify", "certify.n=0"], "certify.n=0"),
    (["certify", "certify.alpha=1.5"], "certify.alpha=1.5"),
    (["certify", "sigma=0"], "sigma=0 must be > 0"),
    (["certify"], "sigma=null"),
    (["certify", "run=/no/such/run"], "run=/no/such/run: no such directory"),
    (["certify", "run=/tmp"], "run=/tmp is not a run directory"),
    # did you mean: config groups, keys inside groups, values with a fixed set of choices
    (["train", "modle=vit_tiny"], "modle: no such key or config group (did you mean model?)"),
    (["train", *TINY, "dataset.num_classes=5"], "dataset.num_classes=5: digits has 10 classes"),
    (["certify", *TINY, "sigma=0.25", "certify.mode=sequential"], "certify.mode=sequential lacks certify.n_max: choose"),
    (["certify", "certify=sequential", "certify.nmax=5"], "certify.nmax: certify has no such key (did you mean certify.n_max?)"),
    (["certify", "certify.nmax=5"], "certify=incremental and certify=sequential have certify.n_max"),
    (["train", "peft=lorra"], "peft=lorra is not allowed (did you mean peft=lora?)"),
    (["train", *TINY, "train.precision=fp61"], "(did you mean train.precision=fp16?)"),
    (["certify", "certify.mode=nope", "sigma=0.25"], "certify.mode=nope"),
    (["certify", "sigma=0.25", "model.weights=/no/such.safetensors"], "model.weights=/no/such.safetensors"),
    (["certify", "sigma=0.25", "device=nonsense"], "device=nonsense"),
    (["certify", "-m", "sigma=0.25,0"], "sigma=0 must be > 0"),
    (["train", "dataset=digits", "train.loss=no_such_loss"], "train.loss=no_such_loss"),
    (["train", *TINY, "train.epochs=-1"], "train.epochs=-1"),
    (["train", *TINY, "train.precision=fp16"], "needs a GPU"),
    (["train", *TINY, "peft=lora", "train.epochs=0"], "untrained adapter"),
    (["train", *TINY, "base=/no/such/run"], "base=/no/such/run: no such directory"),
    (["train", *TINY, "resume=/no/such/run"], "no such directory"),
    (["train", *TINY, "model.name=no_such_net"], "not a timm model"),
    (["train", "model=nope"], "model=nope is not allowed"),
    (["train", "no_such_key=1"], "no_such_key"),
    (["train", "-m", *TINY, "sigma=0.25,-1"], "sigma=-1 must be >= 0"),
    (["denoise-baseline", *TINY, "denoiser.objective=nope"], "denoiser.objective=nope"),
    (["denoise-baseline", *TINY, "base=/no/such/run"], "base=/no/such/run: no such directory"),
    (["denoise-baseline", *TINY, "base=/tmp"], "base=/tmp is not a run directory"),
    (["denoise-baseline", *TINY, "resume=/no/such/run"], "no such directory"),
    (["report", "/no/such/dir"], "/no/such/dir is not a directory"),
    (["report"], "dirs is empty"),
    (["report", "/tmp", "published=mnist"], "published=mnist is not allowed (choose from: cifar10, imagenet, list)"),
    (["report", "/tmp", "published=cifar10", "published_methods=[DDS]"], "published_methods=DDS is not allowed"),
    (["report", "/tmp", "published=imagenet", "published_sigmas=[0.12]"], "published_sigmas=0.12 is not allowed"),
    (["report", "/tmp", "formats=[md,docx]"], "formats=docx is not allowed (choose from: csv, md, pdf, png, tex)"),
    (["merge", "/no/such/dir"], "/no/such/dir is not a directory"),
    (["import", "method=cohen", "sigma=0.25"], "files"),
    (["import", "/no/such/log", "method=cohen", "sigma=0.25"], "/no/such/log"),
    (["demo", "sigma=0"], "sigma=0 must be > 0"),
    (["demo", "base_epochs=0"], "base_epochs=0"),
    (["demo", "certify.n=0"], "certify.n=0"),
    (["certify", "model=rs", "model.arch=nope", "dataset=digits", "sigma=0.25"], "model.arch=nope is not allowed"),
    (["certify", "model=rs", "model.checkpoint=/no/such.pth.tar", "dataset=digits", "sigma=0.25"],
     "model.checkpoint=/no/such.pth.tar: file not found"),
    (["train", "model=python", "model.factory=no_such_mod_xyz:build", "model.input_size=8", "model.normalize=false",
      "dataset=digits"], "cannot import no_such_mod_xyz"),
    (["train", "model=python", "model.factory=nocolon", "model.input_size=8", "dataset=digits"], "<module>:<function>"),
    (["train", "model=torchvision", "model.name=no_such_tv", "dataset=digits"], "not a torchvision model"),
    (["train", "model=hf", "model.name=./no/such/dir", "dataset=digits"], "no config.json there"),
    (["train", *TINY, "dataset=folder", "dataset.root=/no/such/folder"], "dataset.root=/no/such/folder: no such directory"),
    (["train", *TINY, "dataset=folder", "dataset.root=/tmp"], "has no train/"),
    (["certify", *TINY, "dataset=folder", "sigma=0.25"], "dataset=folder needs dataset.root"),
    (["train", "model=python", "model.factory=torch.nn:Identity", "model.input_size=8", "model.normalize=false",
      "model.in_chans=1", "dataset=cifar10"], "images have 3 channels but the model takes 1"),
    (["certify", "model=vit_tiny", "+model.kwargs.in_chans=1", "dataset=cifar10", "sigma=0.25"],
     "images have 3 channels but the model takes 1"),
    (["train", "model=python", "model.factory=torch.nn:Identity", "model.input_size=8", "model.in_chans=1",
      "model.mean=[0.5,0.5,0.5]", "model.std=[0.2]", "dataset=digits"], "must be 1 or model.in_chans=1 numbers"),
]


def refused(argv: list[str], cwd: Path, capsys) -> str:
    """Run `peftsmooth ARGV` in-process in `cwd`; assert exit 2 and one stderr line; return that line."""
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in cwd.iterdir()) == [], f"{argv} left {list(cwd.rglob('*'))}"
    return err.strip()


@pytest.mark.parametrize("argv, needle", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_refused_before_hydra_starts(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["peftsmooth"])
    line = refused(argv, tmp_path, capsys)
    assert line.startswith(f"peftsmooth {argv[0]}: error: ") and needle in line, line


def test_tensorboard_asked_for_but_not_installed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    real = train_watch.importlib.util.find_spec
    monkeypatch.setattr(train_watch.importlib.util, "find_spec", lambda n: None if n == "tensorboard" else real(n))
    line = refused(["train", *TINY, "train.tensorboard=true"], tmp_path, capsys)
    assert "train.tensorboard=true" in line and "pip install peftsmooth[tensorboard]" in line


def test_refused_after_hydra_started_leaves_nothing(tmp_path, monkeypatch, capsys, hydra_logging):
    """A dataset that is not there is only found once the run started: its directories go again."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["peftsmooth"])
    line = refused(["train", "dataset=cifar10", "dataset.root=nodata", "dataset.download=false", "model=vit_tiny",
                    "peft=none", "device=cpu"], tmp_path, capsys)
    assert "dataset.root=nodata" in line


def test_unreachable_hub_is_one_line_within_seconds(tmp_path, monkeypatch, capsys, hydra_logging):
    """certify of a hub-pretrained model with the hub unreachable and nothing cached: one line naming
    model.weights= and HF_HUB_OFFLINE=1, no retries, and (Hydra had started) nothing left behind."""
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["peftsmooth"])
    monkeypatch.setattr(hub, "reachable", lambda url, timeout=hub.PROBE_TIMEOUT_S: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path.parent / "empty_hf_cache"))
    started = time.time()
    line = refused(["certify", "dataset=digits", "device=cpu", "model=vit", "sigma=0.25"], tmp_path, capsys)
    assert time.time() - started < 15  # Hydra's start included; the hub part takes no time
    assert "model.weights=" in line and "HF_HUB_OFFLINE=1" in line and "cannot be reached" in line
    assert constants.HF_HUB_OFFLINE is False  # the client's offline switch was only for the call
