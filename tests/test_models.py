"""The base classifier: preprocessing inside the model, weights from local files, safe loading."""

import pytest
import torch
import torch.nn as nn
from conftest import TINY_MODEL, compose

from peftsmooth.errors import UserError
from peftsmooth.models import (
    BaseClassifier,
    build_classifier,
    classifier_name,
    count_parameters,
    load_state_dict_file,
    save_state_dict_file,
)


def tiny_model_cfg(*extra):
    return compose("train", ["peft=none", *TINY_MODEL, *extra]).model


class Recorder(nn.Module):
    """A backbone that remembers what it was fed and returns a fixed-size logit vector."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.seen = None
        self.num_classes = num_classes

    def forward(self, x):
        self.seen = x.detach().clone()
        return torch.zeros(x.shape[0], self.num_classes)


def test_preprocessing_resizes_and_normalizes_inside_the_model():
    rec = Recorder()
    clf = BaseClassifier(rec, input_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), in_chans=3)
    x = torch.full((2, 1, 8, 8), 0.75)  # native grayscale digits-size input
    assert clf(x).shape == (2, 3)
    assert rec.seen.shape == (2, 3, 16, 16)
    # (0.75 - 0.5) / 0.25 = 1 everywhere: constant images stay constant through bilinear resizing
    assert torch.allclose(rec.seen, torch.ones_like(rec.seen))


def test_noise_space_contract_noise_is_resized_with_the_image():
    """Noise added in native space reaches the backbone upsampled, never drawn at input size."""
    rec = Recorder()
    clf = BaseClassifier(rec, input_size=16, mean=(0.0,) * 3, std=(1.0,) * 3)
    native = torch.rand(1, 3, 8, 8)
    clf(native)
    expected = torch.nn.functional.interpolate(native, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(rec.seen, expected)


def test_front_module_runs_before_preprocessing():
    rec = Recorder()
    class Invert(nn.Module):  # stands for a denoiser / coordinator
        def forward(self, x):
            return 1 - x

    clf = BaseClassifier(rec, input_size=8, mean=(0.0,) * 3, std=(1.0,) * 3, front=Invert())
    x = torch.rand(1, 3, 8, 8)
    clf(x)
    assert torch.allclose(rec.seen, 1 - x)


def test_build_tiny_vit_and_head_name():
    clf = build_classifier(tiny_model_cfg(), num_classes=10, image_size=[1, 8, 8])
    assert clf.input_size == 16
    assert classifier_name(clf.backbone) == "head"
    assert clf(torch.rand(4, 1, 8, 8)).shape == (4, 10)
    trainable, total = count_parameters(clf)
    assert trainable == total > 0
    assert torch.allclose(clf.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))


def test_every_model_config_names_a_model_of_its_source():
    """timm configs name timm models; rs an architecture of the published checkpoints; torchvision a
    torchvision model (hf names a hub id, python a factory the user gives)."""
    import timm

    from peftsmooth.config import group_choices
    from peftsmooth.models import SOURCES
    from peftsmooth.models.rs import ARCHS

    seen = set()
    for choice in group_choices("model"):
        cfg = compose("train", [f"model={choice}", "peft=none"]).model
        seen.add(cfg.source)
        if cfg.source == "timm":
            assert timm.is_model(cfg.name.split(".")[0]), choice
        elif cfg.source == "rs":
            assert cfg.arch in ARCHS
        elif cfg.source == "torchvision":
            SOURCES["torchvision"].check(cfg)
    assert seen == set(SOURCES)


def test_local_weights_file_via_pretrained_cfg_overlay(tmp_path):
    source = build_classifier(tiny_model_cfg(), 10, [1, 8, 8])
    path = tmp_path / "weights.safetensors"
    save_state_dict_file(source.backbone.state_dict(), path)
    loaded = build_classifier(tiny_model_cfg(f"model.weights={path}"), 10, [1, 8, 8])
    a, b = source.backbone.state_dict(), loaded.backbone.state_dict()
    body = [k for k in a if not k.startswith("head")]
    assert body and all(torch.equal(a[k], b[k]) for k in body)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_full_checkpoint_reproduces_logits(tmp_path, suffix):
    source = build_classifier(tiny_model_cfg(), 10, [1, 8, 8]).eval()
    path = tmp_path / f"model{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": source.backbone.state_dict()}, path)
    else:
        save_state_dict_file(source.backbone.state_dict(), path)
    loaded = build_classifier(tiny_model_cfg(f"model.checkpoint={path}"), 10, [1, 8, 8]).eval()
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(source(x), loaded(x))


def test_checkpoint_with_other_class_count_is_a_user_error(tmp_path):
    source = build_classifier(tiny_model_cfg(), 10, [1, 8, 8])
    path = tmp_path / "model.safetensors"
    save_state_dict_file(source.backbone.state_dict(), path)
    with pytest.raises(UserError, match="does not fit"):
        build_classifier(tiny_model_cfg(f"model.checkpoint={path}"), 7, [1, 8, 8])


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"obj": object()}, path)
    with pytest.raises(UserError, match="weights-only"):
        load_state_dict_file(path)


def test_missing_weight_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="model.weights="):
        build_classifier(tiny_model_cfg(f"model.weights={tmp_path}/none.safetensors"), 10, [1, 8, 8])
    with pytest.raises(UserError, match="not found"):
        build_classifier(tiny_model_cfg(f"model.checkpoint={tmp_path}/none.safetensors"), 10, [1, 8, 8])


def test_unknown_timm_name_is_a_user_error():
    with pytest.raises(UserError, match="not a timm model"):
        build_classifier(tiny_model_cfg("model.name=not_a_model_xyz"), 10, [1, 8, 8])
