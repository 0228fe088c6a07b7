"""`model.source: timm` (the default): `timm.create_model` with a fresh head; weights from the hub
(`model.pretrained`, guarded by peftsmooth.hub), a local file (`model.weights`) or `model.checkpoint`."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch.nn as nn

from peftsmooth import hub
from peftsmooth.errors import UserError
from peftsmooth.models.base import Preprocess, Source, check_files


class TimmSource(Source):
    name = "timm"

    def check(self, model_cfg) -> None:
        import timm

        check_files(model_cfg)
        if not timm.is_model(str(model_cfg.name).split(".")[0]):
            raise UserError(f"model.name={model_cfg.name} is not a timm model (see timm.list_models())")

    def create(self, model_cfg, num_classes: int, weights: bool = True) -> nn.Module:
        """Random, from `model.weights` (a local file) or, `model.pretrained`, from the hub (offline at
        once where it cannot be reached). `model.checkpoint` wins over both (loaded afterwards)."""
        import timm

        name, kwargs = str(model_cfg.name), dict(model_cfg.get("kwargs") or {})
        if not weights:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        file = None if model_cfg.get("checkpoint") else model_cfg.get("weights")
        from_hub = bool(model_cfg.get("pretrained", False)) and not file and not model_cfg.get("checkpoint")
        if file:
            kwargs["pretrained_cfg_overlay"] = dict(file=str(Path(str(file)).expanduser()), custom_load=False)
        with hub.offline_unless_reachable() if from_hub else contextlib.nullcontext() as offline:
            if offline is not None:
                hub.require_cached(name, "model", offline)
            try:
                return timm.create_model(name, pretrained=from_hub or bool(file), num_classes=num_classes, **kwargs)
            except (OSError, ConnectionError, RuntimeError) as err:
                detail = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
                if file:
                    raise UserError(f"model.weights={file} cannot be loaded into {name} ({detail})") from err
                if isinstance(err, RuntimeError) and not any(w in detail.lower() for w in ("download", "hub")):
                    raise
                raise hub.weights_error(name, "model", offline or detail) from err

    def load_checkpoint(self, backbone: nn.Module, model_cfg, num_classes: int) -> None:
        from peftsmooth.models.weights import load_state_dict_file

        state = load_state_dict_file(model_cfg.checkpoint)
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
            raise UserError(f"model.checkpoint={model_cfg.checkpoint} does not fit {model_cfg.name} with "
                            f"{num_classes} classes ({first})") from err

    def preprocess(self, backbone: nn.Module, model_cfg) -> Preprocess:
        """Mean and std from timm's data config; the input size from `kwargs.img_size`, `input_size`, or it."""
        from timm.data import resolve_data_config

        data_cfg = resolve_data_config(model=backbone)
        kwargs = model_cfg.get("kwargs") or {}
        input_size = kwargs.get("img_size") or model_cfg.get("input_size") or data_cfg["input_size"][-1]
        channels = self.input_channels(model_cfg)
        return Preprocess(int(input_size), channel_stats(data_cfg["mean"], channels, model_cfg.name),
                          channel_stats(data_cfg["std"], channels, model_cfg.name), channels)

    def input_channels(self, model_cfg) -> int:
        return int((model_cfg.get("kwargs") or {}).get("in_chans", 3))


def channel_stats(values, channels: int, name) -> tuple[float, ...]:
    """timm's mean or std for a model of `channels` inputs: as they are for 3 channels; their average
    for one (the statistics of a grey image made of the three; timm's `adapt_input_conv` likewise sums
    the pretrained RGB kernels into one)."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if channels == 1:
        return (sum(values) / len(values),)
    raise UserError(f"model.kwargs.in_chans={channels}: {name}'s data config has statistics for {len(values)} "
                    f"channels only (use in_chans 1 or {len(values)})")
