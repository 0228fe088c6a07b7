"""model=torchvision: every classification model of torchvision built as torchvision builds it for its
pretrained weights, from a weights file (no download), with a 10-class head, and one forward pass
from a 32x32 native image.

The weights file holds the model's own state dict: the one torchvision's builder loads for its DEFAULT
weights (captured from the builder itself, so googlenet / inception_v3 keep their auxiliary heads and
a ViT its weights' image size). The 14 models of at most SMALL parameters (squeezenet, shufflenet,
mnasnet, mobilenet, efficientnet_b0, regnet_*_400mf) are built for real, from a saved file, and run
their forward pass on real numbers. The other 66 (resnet50, vgg*, vit_*, convnext_*, regnet_y_128gf,
...: 6-630 M parameters) do the same build, load and head check with their parameters on the meta
device, and their forward pass on meta tensors (shapes only): a random init, a weights file and a
real forward at their size cost seconds each, which 66 times over would take minutes, and the code
they check is the same code."""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torchvision
from omegaconf import OmegaConf

from peftsmooth.models import build_classifier
from peftsmooth.models.torchvision_source import AUX_HEADS, default_weights, head_name

SMALL = 6_000_000  # parameters; above: the build and head check on the meta device (see the docstring)
MODELS = torchvision.models.list_models(module=torchvision.models)


class _Marker(dict):
    """What the builder receives instead of a download (an empty dict: builders that rename old keys
    first, e.g. densenet, leave it as it is)."""


def builders_state(name: str):
    """Run torchvision's builder with the name's DEFAULT weights, keeping (instead of downloading) the
    state dict it would load: the model's own, at the moment it loads it (its `_metadata` included)."""
    from torchvision.models._api import WeightsEnum

    marker, original, kept = _Marker(), nn.Module.load_state_dict, []
    own_get = WeightsEnum.__dict__["get_state_dict"]

    def load_state_dict(module, sd, *args, **kwargs):
        if sd is not marker:
            return original(module, sd, *args, **kwargs)
        kept.append(module.state_dict())

    nn.Module.load_state_dict, WeightsEnum.get_state_dict = load_state_dict, lambda self, *a, **k: marker
    try:
        torchvision.models.get_model(name, weights=default_weights(name))
    finally:
        nn.Module.load_state_dict, WeightsEnum.get_state_dict = original, own_get
    return kept[0]


def own_weights_file(name: str, path) -> dict:
    state = builders_state(name)
    torch.save(state, path)
    return state


def test_every_model_is_listed_with_default_weights():
    assert len(MODELS) >= 80 and all(default_weights(n) is not None for n in MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_every_torchvision_model_builds_from_a_weights_file_with_a_fresh_head(tmp_path, name, monkeypatch):
    from accelerate import init_empty_weights

    from peftsmooth.models.torchvision_source import TorchvisionSource

    cfg = OmegaConf.create({"source": "torchvision", "name": name, "weights": str(tmp_path / "w.pth")})
    with init_empty_weights():  # parameters on the meta device: nothing initialised
        empty = builders_state(name)
    if sum(v.numel() for k, v in empty.items() if v.is_meta) <= SMALL:
        torch.manual_seed(0)
        state = own_weights_file(name, tmp_path / "w.pth")
        clf = build_classifier(cfg, 10, [3, 32, 32]).eval()
        kept = {k: v for k, v in clf.backbone.state_dict().items() if k in state and v.shape == state[k].shape}
        assert all(torch.equal(v, state[k]) for k, v in kept.items())  # loaded, not re-initialised
        with torch.no_grad():
            assert clf(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    else:
        (tmp_path / "w.pth").touch()  # nothing written: the state below stands for its contents
        monkeypatch.setattr(TorchvisionSource, "_weights_state", staticmethod(lambda *_: empty))
        with init_empty_weights():
            clf = build_classifier(cfg, 10, [3, 32, 32]).eval().to("meta")
        with torch.no_grad():  # shapes only: a 32x32 native image through f to 10 logits
            assert clf(torch.empty(1, 3, 32, 32, device="meta")).shape == (1, 10)
    head = clf.backbone.get_submodule(head_name(clf.backbone))
    assert (head.out_features if isinstance(head, nn.Linear) else head.out_channels) == 10
    modules = dict(clf.backbone.named_modules())
    assert all(modules[n].out_features == 10 for n in AUX_HEADS if n in modules and modules[n] is not None)


@pytest.mark.parametrize("name,stem", [("googlenet", "conv1"), ("inception_v3", "Conv2d_1a_3x3")])
def test_googlenet_and_inception_stems_see_what_torchvisions_pretrained_pipeline_feeds(tmp_path, name, stem):
    """weights.transforms()'s normalization, then the model built with the weights (transform_input=True)."""
    torch.manual_seed(0)
    weights = default_weights(name)
    state = own_weights_file(name, tmp_path / "w.pth")
    theirs = torchvision.models.get_model(name, weights=None, transform_input=True, aux_logits=True,
                                          init_weights=False)  # as the builder makes it for these weights
    theirs.load_state_dict(state)
    clf = build_classifier(OmegaConf.create({"source": "torchvision", "name": name, "weights": str(tmp_path / "w.pth")}),
                           10, [3, 32, 32]).eval()
    theirs.eval()
    assert clf.backbone.transform_input
    t = weights.transforms()
    x = torch.rand(2, 3, t.crop_size[0], t.crop_size[0])  # native pixels at the consumed size
    expected = stem_input(theirs, stem, torchvision.transforms.functional.normalize(x, t.mean, t.std))
    torch.testing.assert_close(stem_input(clf, f"backbone.{stem}", x), expected, rtol=0, atol=1e-5)


def stem_input(model: nn.Module, stem: str, x: torch.Tensor) -> torch.Tensor:
    seen = []
    hook = model.get_submodule(stem).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    return seen[0]


def test_a_weights_file_with_another_head_and_a_checkpoint_of_a_pretrained_run(tmp_path):
    """squeezenet (a Conv2d head) from a file saved with 10 classes, for 7; then googlenet trained from
    pretrained weights (transform_input=True) rebuilt from its checkpoint: the same logits."""
    from peftsmooth.models import save_state_dict_file

    torch.manual_seed(0)
    theirs = torchvision.models.squeezenet1_1(num_classes=10)
    torch.save(theirs.state_dict(), tmp_path / "sq.pth")
    clf = build_classifier(OmegaConf.create({"source": "torchvision", "name": "squeezenet1_1",
                                             "weights": str(tmp_path / "sq.pth")}), 7, [3, 32, 32])
    assert clf.backbone.classifier[1].out_channels == 7
    assert torch.equal(clf.backbone.features[0].weight, theirs.features[0].weight)
    own_weights_file("googlenet", tmp_path / "g.pth")
    cfg = {"source": "torchvision", "name": "googlenet", "weights": str(tmp_path / "g.pth")}
    trained = build_classifier(OmegaConf.create(cfg), 10, [3, 32, 32]).eval()
    save_state_dict_file(trained.backbone.state_dict(), tmp_path / "model.safetensors")
    again = build_classifier(OmegaConf.create(cfg | {"checkpoint": str(tmp_path / "model.safetensors")}), 10,
                             [3, 32, 32]).eval()
    assert again.backbone.transform_input
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), trained(x))
