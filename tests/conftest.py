"""Shared test helpers: compose a command's config like the CLI does, with tiny CPU settings."""

from __future__ import annotations

import logging
import os

import pytest
import torch

# The test models are tiny: one thread is faster than two (and much faster on a shared machine).
# Subprocesses started by the tests (the CLI, torchrun) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from peftsmooth.config import conf_dir, config_name

# A ViT small enough to train and certify on digits in seconds on 2 CPU cores.
TINY_MODEL = [
    "model=vit_tiny",
    "model.input_size=16",
    "model.kwargs.img_size=16",
    "model.kwargs.patch_size=4",
    "model.kwargs.depth=2",
    "model.kwargs.embed_dim=32",
    "model.kwargs.num_heads=2",
]
TINY = ["dataset=digits", "device=cpu", *TINY_MODEL]


def compose(command: str, overrides: list[str] | None = None, run_dir=None):
    """The config `peftsmooth COMMAND overrides...` would run with (Hydra's own composition).

    With `run_dir`, `hydra.runtime.output_dir` is set too, so `run_<command>(cfg)` can be called
    directly inside a test (HydraConfig is registered for the call).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name(command), overrides=list(overrides or []),
                            return_hydra_config=run_dir is not None)
    if run_dir is not None:
        from omegaconf import open_dict

        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
        HydraConfig.instance().set_config(cfg)
    return cfg


def kill_after_epoch(epoch: int, train, *args, **kwargs) -> None:
    """Run `train(*args, **kwargs)` "killed" (a KeyboardInterrupt) right after the checkpoint of
    `epoch` is written, as a resume test needs it."""
    from peftsmooth.train import state as train_state

    original = train_state._save_checkpoint

    def killed(path, payload):
        original(path, payload)
        if payload["epoch"] == epoch:
            raise KeyboardInterrupt("killed")

    train_state._save_checkpoint = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            train(*args, **kwargs)
    finally:
        train_state._save_checkpoint = original


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def hydra_logging():
    """A Hydra job run in-process configures the root logger: put it back as it was afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def pytest_terminal_summary(terminalreporter):
    """Lines a test recorded as its `summary` property (e.g. how many documented commands were
    checked), printed at the end of the run, from xdist workers too."""
    for report in terminalreporter.stats.get("passed", []):
        for name, value in getattr(report, "user_properties", []):
            if name == "summary":
                terminalreporter.write_line(str(value))
