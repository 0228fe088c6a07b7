"""`model=torchvision model.name=<torchvision.models name>`: any classification model of torchvision.

Weights: `model.pretrained=true` (the name's DEFAULT weights, from the torch hub cache or downloaded;
offline without them: one line naming `model.weights=`), `model.weights=<file>` (a state dict of that
model, read with weights_only=True) or none. With weights the model is built as torchvision builds it
for them (`builder_loads`: the weights' constructor arguments such as googlenet's `transform_input`,
then the load, then what the builder does after it); then the main and auxiliary heads are replaced
by fresh ones where the dataset's number of classes differs. Size (the crop the model consumes), mean,
std, interpolation and antialias come from the DEFAULT weights' transforms(); `model.input_size`
overrides the size.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn

from peftsmooth.errors import UserError
from peftsmooth.models.base import IMAGENET_MEAN, IMAGENET_STD, RESAMPLE_MODES, Preprocess, Source, check_files, \
    describe, square

HEADS = ("fc", "heads.head", "head", "classifier")  # torchvision's head attributes, in the order tried
AUX_HEADS = ("aux1.fc2", "aux2.fc2", "AuxLogits.fc")  # googlenet's and inception_v3's auxiliary heads


def head_name(model: nn.Module) -> str:
    """The module name of a torchvision classifier's head: its last Linear (ResNet `fc`, ViT
    `heads.head`, ConvNeXt / EfficientNet `classifier.N`, Swin `head`), or SqueezeNet's 1x1 Conv2d
    (`classifier.1`)."""
    names = dict(model.named_modules())
    for name in HEADS:
        if name in names:
            module = names[name]
            if isinstance(module, nn.Sequential):
                inner = [n for n, m in module.named_children() if isinstance(m, (nn.Linear, nn.Conv2d))]
                return f"{name}.{inner[-1]}" if inner else name
            return name
    raise UserError(f"{type(model).__name__} has none of the heads {', '.join(HEADS)}")


def head_names(model: nn.Module) -> list[str]:
    """The main head and the auxiliary heads the model keeps."""
    names = dict(model.named_modules())
    return [head_name(model)] + [n for n in AUX_HEADS if isinstance(names.get(n), nn.Linear)]


def replace_heads(model: nn.Module, num_classes: int) -> None:
    """Fresh heads (main and auxiliary) with num_classes outputs, where they have another number."""
    for name in head_names(model):
        if model.get_submodule(name).weight.shape[0] != num_classes:
            replace_head(model, name, num_classes)
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes


def fit_heads(model: nn.Module, state: dict) -> None:
    """Heads rebuilt to the shape of a weights file's (a file saved with another number of classes)."""
    own = model.state_dict()
    for name in head_names(model):
        weight = state.get(f"{name}.weight")
        if weight is not None and name + ".weight" in own and tuple(weight.shape) != tuple(own[name + ".weight"].shape):
            replace_head(model, name, int(weight.shape[0]))


def replace_head(model: nn.Module, name: str, num_classes: int) -> None:
    """The head `name` as a fresh layer of the same kind with num_classes outputs."""
    old = model.get_submodule(name)
    new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding) \
        if isinstance(old, nn.Conv2d) else nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new.to(old.weight.device, old.weight.dtype))


@contextlib.contextmanager
def builder_loads(state: dict | None, what: str):
    """Run a torchvision builder with pretrained weights as torchvision runs it (the weights'
    constructor arguments: `transform_input`, `aux_logits`, `init_weights`, a ViT's `image_size`, ...;
    then what it does after loading, e.g. dropping googlenet's auxiliary heads), except that the state
    dict is `state` (loaded strictly here, heads fitted to its shapes) instead of a download; `None`:
    keep the built weights (a checkpoint is loaded afterwards, or the weightless tree of the checks)."""
    from torchvision.models._api import WeightsEnum

    from peftsmooth.models.weights import load_into

    marker = _Marker()
    original = nn.Module.load_state_dict

    def load_state_dict(module, sd, *args, **kwargs):
        if sd is not marker:
            return original(module, sd, *args, **kwargs)
        if state is not None:
            fit_heads(module, state)
            load_into(module, state, what)

    own_get = WeightsEnum.__dict__["get_state_dict"]
    nn.Module.load_state_dict = load_state_dict
    WeightsEnum.get_state_dict = lambda self, *a, **k: marker
    try:
        yield
    finally:
        nn.Module.load_state_dict = original
        WeightsEnum.get_state_dict = own_get


class _Marker(dict):
    """The state dict a builder receives from `builder_loads`: recognised by identity."""


def default_weights(name: str):
    import torchvision

    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def cached_file(weights) -> Path:
    """Where torch.hub keeps the file of these weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


class TorchvisionSource(Source):
    name = "torchvision"

    def check(self, model_cfg) -> None:
        import torchvision

        check_files(model_cfg)
        if str(model_cfg.get("name")) not in torchvision.models.list_models():
            raise UserError(f"model.name={model_cfg.get('name')} is not a torchvision model "
                            f"(see torchvision.models.list_models())")

    def create(self, model_cfg, num_classes: int, weights: bool = True) -> nn.Module:
        """With weights (`model.pretrained`, `model.weights`, or a `model.checkpoint` of a model trained
        from them): built by torchvision's own builder for its DEFAULT weights (`builder_loads`), then
        fresh heads for num_classes; without: torchvision's random init for num_classes."""
        import torchvision

        name = str(model_cfg.name)
        file, checkpoint = model_cfg.get("weights"), model_cfg.get("checkpoint")
        pretrained = bool(file or model_cfg.get("pretrained"))
        enum = default_weights(name)
        if not pretrained or enum is None:
            if pretrained and not checkpoint and weights:
                raise UserError(f"model.name={name} has no pretrained torchvision weights; use model.pretrained=false")
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        else:
            state = self._weights_state(name, file) if weights and not checkpoint else None
            with builder_loads(state, f"model.weights={file}" if file else f"the {name} DEFAULT weights"):
                model = torchvision.models.get_model(name, weights=enum)
            replace_heads(model, num_classes)
        describe(model, name, head_name(model))
        return model

    @staticmethod
    def _weights_state(name: str, file) -> dict:
        from peftsmooth.models.weights import load_state_dict_file

        if file:
            return load_state_dict_file(file)
        w = default_weights(name)
        path = cached_file(w)
        if not path.is_file():
            from peftsmooth import hub

            if not hub.reachable(w.url):
                raise hub.weights_error(name, "model", f"{w.url} cannot be reached and {path} is not there")
            torch.hub.load_state_dict_from_url(w.url, progress=False)
        return load_state_dict_file(path)

    def preprocess(self, backbone: nn.Module, model_cfg) -> Preprocess:
        """As the DEFAULT weights' transforms(): the crop size (the size the model consumes), mean, std,
        interpolation and antialias; `model.input_size` overrides the size."""
        w = default_weights(str(model_cfg.name))
        if w is None:
            return Preprocess(square(model_cfg.get("input_size") or 224))
        t = w.transforms()
        mode = getattr(t.interpolation, "value", str(t.interpolation))
        if mode not in RESAMPLE_MODES:
            raise UserError(f"model.name={model_cfg.name}: its weights resize with {mode}, which f does not "
                            f"support (choose from: {', '.join(RESAMPLE_MODES)})")
        size = model_cfg.get("input_size") or square(list(t.crop_size))
        return Preprocess(square(size), tuple(t.mean or IMAGENET_MEAN), tuple(t.std or IMAGENET_STD),
                          resample=mode, antialias=bool(getattr(t, "antialias", True)))
