"""`model=hf model.name=<hub id or local directory>`: a transformers `AutoModelForImageClassification`.

`num_labels` is the dataset's number of classes, with a fresh head where the checkpoint's differs
(`ignore_mismatched_sizes`). The image processor saved beside the model (`preprocessor_config.json`)
is the reference: f resizes to the size it consumes (`crop_size` where it centre-crops, else `size`)
with its `resample`, and applies its rescale, normalization and channel flip (`processor_preprocess`);
a step f cannot honour is refused. Without a processor: ImageNet's mean and std at `image_size`.
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
        """As the model's image processor feeds it (see `processor_preprocess`); without a processor
        beside the model: ImageNet's mean and std at the config's `image_size`."""
        from transformers import AutoImageProcessor

        name, channels = str(model_cfg.name), int(backbone.config.num_channels)
        try:
            with self._hub(name) as offline:
                processor = AutoImageProcessor.from_pretrained(name, local_files_only=offline is not None)
        except (OSError, ValueError):
            size = model_cfg.get("input_size") or getattr(backbone.config, "image_size", 224)
            return Preprocess(square(size), IMAGENET_MEAN[:channels], IMAGENET_STD[:channels], channels)
        return processor_preprocess(processor, channels, model_cfg.get("input_size"), name)

    def make_portable(self, model_cfg) -> None:
        directory = local_dir(str(model_cfg.get("name") or ""))
        if directory is not None:
            model_cfg.name = str(directory.resolve())

    def label(self, model_cfg) -> str:
        name = str(model_cfg.get("name"))
        return Path(name).name if local_dir(name) else name


# What f honours of an image processor; a `do_*` step outside these (and not one that leaves an RGB
# image in [0, 1] as it is) is refused rather than silently skipped.
HONOURED_STEPS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_flip_channel_order")
NO_OP_STEPS = ("do_convert_rgb", "do_reduce_labels")  # our images are RGB already; labels are not images
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes, as processors keep them


def processor_preprocess(processor, channels: int, input_size, name: str) -> Preprocess:
    """The processor's pipeline as f runs it on native [0, 1] images: resize to the size the model
    consumes (`crop_size` where it centre-crops, else `size`), then one affine map per channel that
    is the processor's rescale (`rescale_factor` times 255, since native pixels are uint8 / 255;
    EfficientNet's `rescale_offset`), normalization (`do_normalize`, `image_mean`, `image_std`;
    EfficientNet's `include_top` divides by the std once more), then `do_flip_channel_order`."""
    settings = processor.to_dict()
    get = lambda key, default=None: getattr(processor, key, settings.get(key, default))  # noqa: E731
    unknown = [k for k, v in settings.items() if k.startswith("do_") and v and k not in HONOURED_STEPS + NO_OP_STEPS]
    if unknown:
        raise UserError(f"model.name={name}: its image processor sets {unknown[0]}=true, which f cannot honour "
                        f"(supported steps: {', '.join(HONOURED_STEPS)})")
    resample = RESAMPLE.get(int(getattr(get("resample", 2), "value", get("resample", 2))))
    if resample is None:
        raise UserError(f"model.name={name}: its image processor's resample={get('resample')} is not supported "
                        f"inside f (choose from: 2 bilinear, 3 bicubic)")
    scale = 255.0 * float(get("rescale_factor", 1 / 255)) if get("do_rescale", True) else 255.0
    offset = 1.0 if get("do_rescale", True) and get("rescale_offset", False) else 0.0
    normalize = bool(get("do_normalize", False))
    mean = per_channel(get("image_mean") if normalize else 0.0, channels, name, "image_mean")
    std = per_channel(get("image_std") if normalize else 1.0, channels, name, "image_std")
    top = per_channel(get("image_std"), channels, name, "image_std") if get("include_top", False) else (1.0,) * channels
    flip = bool(get("do_flip_channel_order", False))
    if flip and channels != 3:
        raise UserError(f"model.name={name}: do_flip_channel_order needs 3 channels, the model has {channels}")
    return Preprocess(square(input_size) if input_size else consumed_size(processor, name),
                      tuple((offset + m) / scale for m in mean), tuple(s * t / scale for s, t in zip(std, top)),
                      channels, resample=resample, antialias=True, flip_channels=flip)


def per_channel(values, channels: int, name: str, key: str) -> tuple[float, ...]:
    values = [values] if isinstance(values, (int, float)) else list(values)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise UserError(f"model.name={name}: the image processor's {key} has {len(values)} values for a model of "
                        f"{channels} channel(s)")
    return tuple(float(v) for v in values)


def consumed_size(processor, name: str) -> int:
    """The side of the square the model consumes: `crop_size` where the processor centre-crops, else
    `size` (`height`/`width` or `shortest_edge`)."""
    crop = getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None)
    size = side_dict(crop or getattr(processor, "size", None) or {})
    key = "crop_size" if crop else "size"
    if size.get("height") and size.get("width"):
        if size["height"] != size["width"]:
            raise UserError(f"model.name={name}: the image processor's {key} {size['height']}x{size['width']} is "
                            f"not square; give model.input_size=<side> to choose one")
        return int(size["height"])
    if size.get("shortest_edge") and not size.get("longest_edge"):
        return int(size["shortest_edge"])
    raise UserError(f"model.name={name}: the image processor's {key}={size} names no square input size; "
                    f"give model.input_size=<side>")


def side_dict(size) -> dict:
    """A processor's size (a dict or transformers' SizeDict) as a plain dict of its set keys."""
    if isinstance(size, dict):
        return {k: v for k, v in size.items() if v}
    keys = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")
    return {k: getattr(size, k) for k in keys if getattr(size, k, None)}
