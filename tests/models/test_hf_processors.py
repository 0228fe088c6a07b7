"""model=hf: f feeds each transformers model family what its own image processor feeds it.

For every family a tiny random model and that family's processor are saved to a temporary directory
(sizes scaled down, each processor's quirks kept: DeiT's crop, MobileViT's BGR flip without
normalization, EfficientNet's include_top, ConvNeXt's crop_pct, ...). An image at the size the model
consumes goes through f and through `processor(images, do_resize=False, do_center_crop=False)`; the
backbone's input must equal the processor's pixel values, and a native 32x32 image must run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from peftsmooth.errors import UserError
from peftsmooth.models import build_classifier


def _vit(t, **kw):
    return t.ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, **kw)


def families():
    """name -> (model class, config, processor): what the hub's checkpoints of that family ship."""
    import transformers as t

    tiny_cnn = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    return {
        "vit": (t.ViTForImageClassification, _vit(t), t.ViTImageProcessor(size={"height": 32, "width": 32})),
        "vit-no-normalize": (t.ViTForImageClassification, _vit(t),
                             t.ViTImageProcessor(size={"height": 32, "width": 32}, do_normalize=False)),
        "deit": (t.DeiTForImageClassification,
                 t.DeiTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=32),
                 t.DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32})),
        "beit": (t.BeitForImageClassification,
                 t.BeitConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=32, use_mean_pooling=True),
                 t.BeitImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})),
        "swin": (t.SwinForImageClassification,
                 t.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4),
                 t.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                                     image_std=[0.229, 0.224, 0.225], resample=3)),
        "convnext": (t.ConvNextForImageClassification,
                     t.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32),
                     t.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875,
                                              image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])),
        "mobilenet_v1": (t.MobileNetV1ForImageClassification,
                         t.MobileNetV1Config(image_size=32, depth_multiplier=0.25, min_depth=4),
                         t.MobileNetV1ImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})),
        "mobilenet_v2": (t.MobileNetV2ForImageClassification,
                         t.MobileNetV2Config(image_size=32, depth_multiplier=0.25, min_depth=4),
                         t.MobileNetV2ImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})),
        "mobilevit": (t.MobileViTForImageClassification,
                      t.MobileViTConfig(image_size=32, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16],
                                        num_attention_heads=2, patch_size=2),
                      t.MobileViTImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 32, "width": 32})),
        "efficientnet": (t.EfficientNetForImageClassification,
                         t.EfficientNetConfig(image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128),
                         t.EfficientNetImageProcessor(size={"height": 32, "width": 32},
                                                      crop_size={"height": 28, "width": 28})),
        "resnet": (t.ResNetForImageClassification, t.ResNetConfig(layer_type="basic", **tiny_cnn),
                   t.ConvNextImageProcessor(size={"shortest_edge": 32}, image_mean=[0.485, 0.456, 0.406],
                                            image_std=[0.229, 0.224, 0.225])),
        "levit": (t.LevitForImageClassification,
                  t.LevitConfig(image_size=32, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3], depths=[1, 1, 1],
                                key_dim=[8, 8, 8]),
                  t.LevitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})),
        "poolformer": (t.PoolFormerForImageClassification,
                       t.PoolFormerConfig(hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1]),
                       t.PoolFormerImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})),
        "bit": (t.BitForImageClassification,
                t.BitConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_groups=4),
                t.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})),
    }


def save_family(directory, family: str):
    model_class, config, processor = families()[family]
    torch.manual_seed(0)
    model_class(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def backbone_input(clf, x: torch.Tensor) -> torch.Tensor:
    """What the backbone receives from f for native images x."""
    seen = []
    hook = clf.backbone.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(
        kwargs.get("pixel_values", args[0] if args else None)), with_kwargs=True)
    try:
        with torch.no_grad():
            clf(x)
    finally:
        hook.remove()
    return seen[0]


def processor_reference(directory, images: np.ndarray) -> torch.Tensor:
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(directory)
    return processor(list(images), do_resize=False, do_center_crop=False, return_tensors="pt").pixel_values


def hf_cfg(directory):
    return OmegaConf.create({"source": "hf", "name": str(directory), "pretrained": True})


@pytest.mark.parametrize("family", list(families()))
def test_f_feeds_the_backbone_what_the_image_processor_gives(tmp_path, family):
    directory = save_family(tmp_path / family, family)
    clf = build_classifier(hf_cfg(directory), 10, [3, 32, 32]).eval()
    side = clf.input_size
    images = np.random.default_rng(0).integers(0, 256, size=(2, side, side, 3), dtype=np.uint8)
    native = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # native pixels: uint8 / 255
    expected = processor_reference(directory, images)
    got = backbone_input(clf, native)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5, family
    with torch.no_grad():
        assert clf(torch.rand(2, 3, 32, 32)).shape == (2, 10)  # a native 32x32 image runs through f


def test_consumed_size_and_resample_come_from_the_processor(tmp_path):
    deit = build_classifier(hf_cfg(save_family(tmp_path / "deit", "deit")), 10, [3, 32, 32])
    assert deit.input_size == 32 and deit.resample == "bicubic"  # crop_size, not size (40)
    vit = build_classifier(hf_cfg(save_family(tmp_path / "vit", "vit")), 10, [3, 32, 32])
    assert vit.resample == "bilinear" and not vit.flip_channels
    mobilevit = build_classifier(hf_cfg(save_family(tmp_path / "mvit", "mobilevit")), 10, [3, 32, 32])
    assert mobilevit.input_size == 32 and mobilevit.flip_channels  # crop 32 > shortest_edge 28


def test_a_processor_step_f_cannot_honour_is_refused(tmp_path):
    from transformers import DPTImageProcessor, ViTForImageClassification

    import transformers as t

    ViTForImageClassification(_vit(t)).save_pretrained(tmp_path)
    DPTImageProcessor(size={"height": 32, "width": 32}, do_pad=True).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="sets do_pad=true, which f cannot honour"):
        build_classifier(hf_cfg(tmp_path), 10, [3, 32, 32])
    t.ViTImageProcessor(size={"height": 32, "width": 32}, resample=0).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="resample=0 is not supported"):
        build_classifier(hf_cfg(tmp_path), 10, [3, 32, 32])
    t.ViTImageProcessor(size={"height": 32, "width": 24}).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="32x24 is not square"):
        build_classifier(hf_cfg(tmp_path), 10, [3, 32, 32])
