"""One entry point for every model: `build_classifier(model_cfg, num_classes, image_size)`, whatever its
source (`model.source`: timm, rs, torchvision, hf or python; see peftsmooth.models.base)."""

from __future__ import annotations

import json

import torch
import torch.nn as nn

from peftsmooth.errors import UserError, choice_error
from peftsmooth.models.base import Source
from peftsmooth.models.classifier import BaseClassifier
from peftsmooth.models.hf import HFSource
from peftsmooth.models.rs import PublishedRS
from peftsmooth.models.timm_source import TimmSource
from peftsmooth.models.torchvision_source import TorchvisionSource
from peftsmooth.models.user import PythonSource

SOURCES: dict[str, Source] = {s.name: s for s in (TimmSource(), PublishedRS(), TorchvisionSource(), HFSource(),
                                                   PythonSource())}


def source_of(model_cfg) -> Source:
    """The source `model.source` names (timm when absent, as in run.json files of earlier versions)."""
    name = str(model_cfg.get("source") or "timm")
    if name not in SOURCES:
        raise choice_error("model.source", name, SOURCES)
    return SOURCES[name]


def check_model_config(model_cfg, image_size=None) -> None:
    """The model's source, name and local files (and, given the dataset's image size, that its
    channels fit the model's where the config tells them), checked before anything is built or fetched."""
    source = source_of(model_cfg)
    source.check(model_cfg)
    if image_size is not None:
        check_channels(source.input_channels(model_cfg), image_size)


def build_classifier(model_cfg, num_classes: int, image_size) -> BaseClassifier:
    """The base classifier for a dataset of `num_classes` classes and native size (C,H,W).

    Weights: as the source gets them (hub, local file, published checkpoint); `model.checkpoint` (a
    backbone state dict written by `peftsmooth train`, or for `rs` the published checkpoint) wins.
    """
    source = source_of(model_cfg)
    source.check(model_cfg)
    if image_size is not None:
        check_channels(source.input_channels(model_cfg), image_size)
    backbone = source.create(model_cfg, int(num_classes))
    if model_cfg.get("checkpoint"):
        source.load_checkpoint(backbone, model_cfg, int(num_classes))
    classifier = wrap(backbone, source, model_cfg)
    if image_size is not None:
        check_channels(classifier.in_chans, image_size)
    return classifier


def check_channels(in_chans: int | None, image_size) -> None:
    """Grayscale images go into a model of any number of channels (repeated); otherwise the dataset's
    channels must be the model's."""
    channels = int(list(image_size)[0])
    if in_chans is not None and channels != 1 and channels != int(in_chans):
        raise UserError(f"the dataset's images have {channels} channels but the model takes {in_chans} "
                        f"(model.in_chans / model.kwargs.in_chans): choose a dataset with {in_chans} channel(s) or "
                        f"a model with {channels}")


def make_portable(model_cfg) -> None:
    """Record where the model's files and code are (absolute paths; a `model=python` factory's import
    root), so that a run rebuilds from any working directory (model_cfg is changed in place)."""
    from pathlib import Path

    for key in ("weights", "checkpoint"):
        value = model_cfg.get(key)
        if value and Path(str(value)).expanduser().is_file():
            model_cfg[key] = str(Path(str(value)).expanduser().resolve())
    source_of(model_cfg).make_portable(model_cfg)


def wrap(backbone: nn.Module, source: Source, model_cfg) -> BaseClassifier:
    p = source.preprocess(backbone, model_cfg)
    return BaseClassifier(backbone, p.input_size, p.mean, p.std, p.in_chans, resample=p.resample,
                          antialias=p.antialias, flip_channels=p.flip_channels)


_TREES: dict[str, BaseClassifier | None] = {}


def module_tree(model_cfg, num_classes: int) -> BaseClassifier | None:
    """The classifier's modules without weights (on the meta device: nothing is loaded, fetched or
    computed), for checks before any work; None where the model cannot be built that way. Kept per
    model (the jobs of a sweep share it): callers only read it."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else dict(model_cfg)
    key = json.dumps([plain, int(num_classes)], default=str, sort_keys=True)
    if key not in _TREES:
        try:
            source = source_of(model_cfg)
            with torch.device("meta"):
                _TREES[key] = wrap(source.create(model_cfg, num_classes, weights=False), source, model_cfg)
        except Exception:  # noqa: BLE001 - the real build reports it, with the weights
            _TREES[key] = None
    return _TREES[key]


def model_label(model_cfg, choice: str | None = None) -> str:
    """The model's name in run.json and report: a timm model's config choice (e.g. vit_tiny) or name;
    `<source>:<name>` for the other sources (rs:cifar_resnet110, hf:vit-base-patch16-224-in21k,
    torchvision:resnet50, python:<function>), so that the report shows where a model came from."""
    source = source_of(model_cfg)
    if source.name == "timm":
        return str(choice or model_cfg.get("name"))
    return f"{source.name}:{source.label(model_cfg)}"
