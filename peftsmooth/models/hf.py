"""`model=hf model.name=<hub id or local directory>`: a transformers `AutoModelForImageClassification`.

`num_labels` is the dataset's number of classes, with a fresh head where the checkpoint's differs
(`ignore_mismatched_sizes`). Mean, std and input size come from the image processor config saved
beside the model (`preprocessor_config.json`), ImageNet's and the config's `image_size` without one.
`model.pretrained=false` builds the architecture of the config with random weights. A hub id is
fetched through the same guard as timm's (peftsmooth.hub): where the hub cannot be reached, a copy in
the local cache still loads, and a missing one is one line naming the local-directory option.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from peftsmooth import hub
from peftsmooth.errors import UserError
from peftsmooth.models.base import IMAGENET_MEAN, IMAGENET_STD, Preprocess, Source, check_files, describe, \
    sequential_head, square


def local_dir(name: str) -> Path | None:
    path = Path(name).expanduser()
    return path if path.is_dir() else None


def offline_error(name: str, cause: str) -> UserError:
    return UserError(f"model.name={name}: could not load it from the Hugging Face hub ({cause}); give "
                     f"model.name=/path/to/a/directory written by save_pretrained (model and its image "
                     f"processor, downloaded where the hub is reachable), or run with HF_HUB_OFFLINE=1 "
                     f"once it is in the local cache")


class HFSource(Source):
    name = "hf"

    def check(self, model_cfg) -> None:
        check_files(model_cfg)
        name = str(model_cfg.get("name") or "")
        if not name:
            raise UserError("model=hf needs model.name=<hub id or local directory>")
        looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
        if looks_local and not (local_dir(name) and (local_dir(name) / "config.json").is_file()):
            raise UserError(f"model.name={name}: no config.json there (a directory written by save_pretrained)")

    def create(self, model_cfg, num_classes: int, weights: bool = True) -> nn.Module:
        from transformers import AutoConfig, AutoModelForImageClassification

        name = str(model_cfg.name)
        pretrained = weights and bool(model_cfg.get("pretrained", True)) and not model_cfg.get("checkpoint")
        labels = {"id2label": {i: str(i) for i in range(num_classes)},
                  "label2id": {str(i): i for i in range(num_classes)}}
        with self._hub(name) as offline:
            try:
                if pretrained:
                    model = AutoModelForImageClassification.from_pretrained(
                        name, ignore_mismatched_sizes=True, local_files_only=offline is not None, **labels)
                else:
                    config = AutoConfig.from_pretrained(name, local_files_only=offline is not None, **labels)
                    model = AutoModelForImageClassification.from_config(config)
            except OSError as err:
                raise offline_error(name, offline or f"{type(err).__name__}: {str(err).splitlines()[0]}") from err
        describe(model, name, sequential_head(model, "classifier"))
        return model

    @staticmethod
    def _hub(name: str):
        import contextlib

        return contextlib.nullcontext(None) if local_dir(name) else hub.offline_unless_reachable()

    def preprocess(self, backbone: nn.Module, model_cfg) -> Preprocess:
        from transformers import AutoImageProcessor

        name = str(model_cfg.name)
        size = model_cfg.get("input_size") or getattr(backbone.config, "image_size", 224)
        try:
            with self._hub(name) as offline:
                processor = AutoImageProcessor.from_pretrained(name, local_files_only=offline is not None)
        except (OSError, ValueError):
            return Preprocess(square(size), IMAGENET_MEAN, IMAGENET_STD, int(backbone.config.num_channels))
        processor_size = getattr(processor, "size", None)
        if not model_cfg.get("input_size") and processor_size:
            size = {k: getattr(processor_size, k, None) for k in ("height", "width", "shortest_edge")} \
                if not isinstance(processor_size, dict) else processor_size
        return Preprocess(square(size), tuple(processor.image_mean or IMAGENET_MEAN),
                          tuple(processor.image_std or IMAGENET_STD), int(backbone.config.num_channels))

    def label(self, model_cfg) -> str:
        name = str(model_cfg.get("name"))
        return Path(name).name if local_dir(name) else name
