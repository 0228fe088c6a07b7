"""The base classifier f: native [0,1] image -> logits, with all preprocessing inside the model.

    x (native, noise already added) -> front (denoiser / coordinator, optional)
      -> channel repeat (grayscale -> RGB) -> resize to the backbone's input size -> (x-mean)/std
      -> timm backbone with a fresh head

Because resizing and normalization are part of f, the noise of randomized smoothing and the
certified radius stay in the dataset's native pixel space (validity rule 1 in docs/architecture.md).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftsmooth import hub
from peftsmooth.errors import UserError
from peftsmooth.runtime import atomic_write


class BaseClassifier(nn.Module):
    """Preprocessing + timm backbone. `forward` takes native-space images in [0,1]."""

    def __init__(self, backbone: nn.Module, input_size: int, mean, std, in_chans: int = 3,
                 front: nn.Module | None = None):
        super().__init__()
        self.front = front if front is not None else nn.Identity()
        self.backbone = backbone
        self.input_size = int(input_size)
        self.in_chans = int(in_chans)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Native [0,1] image -> the backbone's input (channels, size, normalization)."""
        if x.shape[1] == 1 and self.in_chans != 1:
            x = x.expand(-1, self.in_chans, -1, -1)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(self.front(x)))


def classifier_name(backbone: nn.Module) -> str:
    """Module name of the backbone's classification head (timm `pretrained_cfg['classifier']`)."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    name = cfg.get("classifier") or "head"
    return name if isinstance(name, str) else name[0]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights without unpickling arbitrary objects: safetensors, or torch.load(weights_only=True)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal is a user-facing problem
        raise UserError(f"cannot read {path} as a weights-only checkpoint ({type(err).__name__})") from err
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    return dict(state)


def save_state_dict_file(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a safetensors file atomically (contiguous, de-aliased tensors)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def check_model_config(model_cfg) -> None:
    """The model's name and local weight files, checked before anything is built or fetched."""
    import timm

    for key in ("weights", "checkpoint"):
        value = model_cfg.get(key)
        if value and not Path(str(value)).expanduser().is_file():
            raise UserError(f"model.{key}={value}: file not found")
    if not timm.is_model(str(model_cfg.name).split(".")[0]):
        raise UserError(f"model.name={model_cfg.name} is not a timm model (see timm.list_models())")


def _create_backbone(model_cfg, num_classes: int) -> nn.Module:
    """The timm backbone: random, from `model.weights` (a local file) or, `model.pretrained`, from the
    hub (offline at once where it cannot be reached: peftsmooth.hub). `model.checkpoint` wins over both."""
    import timm

    check_model_config(model_cfg)
    name, kwargs = str(model_cfg.name), dict(model_cfg.get("kwargs") or {})
    weights = None if model_cfg.get("checkpoint") else model_cfg.get("weights")
    from_hub = bool(model_cfg.get("pretrained", False)) and not weights and not model_cfg.get("checkpoint")
    if weights:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(Path(str(weights)).expanduser()), custom_load=False)
    with hub.offline_unless_reachable() if from_hub else contextlib.nullcontext() as offline:
        if offline is not None:
            hub.require_cached(name, "model", offline)
        try:
            return timm.create_model(name, pretrained=from_hub or bool(weights), num_classes=num_classes, **kwargs)
        except (OSError, ConnectionError, RuntimeError) as err:
            detail = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
            if weights:
                raise UserError(f"model.weights={weights} cannot be loaded into {name} ({detail})") from err
            if isinstance(err, RuntimeError) and not any(w in detail.lower() for w in ("download", "hub")):
                raise
            raise hub.weights_error(name, "model", offline or detail) from err


def build_classifier(model_cfg, num_classes: int, image_size) -> BaseClassifier:
    """The base classifier for a dataset of `num_classes` classes and native size (C,H,W).

    Weights: `model.pretrained` (hub), `model.weights` (local file), `model.checkpoint` (a full
    backbone state dict written by `peftsmooth train`, which wins over the other two).
    """
    backbone = _create_backbone(model_cfg, num_classes)
    if model_cfg.get("checkpoint"):
        state = load_state_dict_file(model_cfg.checkpoint)
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
            raise UserError(
                f"model.checkpoint={model_cfg.checkpoint} does not fit {model_cfg.name} with {num_classes} classes ({first})"
            ) from err
    return _wrap(backbone, model_cfg)


def _wrap(backbone: nn.Module, model_cfg) -> BaseClassifier:
    """The BaseClassifier around a timm backbone: its input size, channels and normalization."""
    from timm.data import resolve_data_config

    data_cfg = resolve_data_config(model=backbone)
    kwargs = model_cfg.get("kwargs") or {}
    input_size = kwargs.get("img_size") or model_cfg.get("input_size") or data_cfg["input_size"][-1]
    in_chans = int(kwargs.get("in_chans", 3))
    return BaseClassifier(backbone, int(input_size), data_cfg["mean"], data_cfg["std"], in_chans)


_TREES: dict[str, BaseClassifier | None] = {}


def module_tree(model_cfg, num_classes: int) -> BaseClassifier | None:
    """The classifier's modules without weights (on the meta device: nothing is loaded, fetched or
    computed), for checks before any work; None where the model cannot be built that way. Kept per
    model (the jobs of a sweep share it): callers only read it."""
    import json

    import timm
    from omegaconf import OmegaConf

    raw = model_cfg.get("kwargs") or {}
    kwargs = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else dict(raw)
    key = json.dumps([str(model_cfg.name), kwargs, model_cfg.get("input_size"), int(num_classes)], default=str)
    if key not in _TREES:
        try:
            with torch.device("meta"):
                backbone = timm.create_model(str(model_cfg.name), pretrained=False, num_classes=num_classes, **kwargs)
                _TREES[key] = _wrap(backbone, model_cfg)
        except Exception:  # noqa: BLE001 - the real build reports it, with the weights
            _TREES[key] = None
    return _TREES[key]
