"""PEFT targets per model family (peftsmooth.adapt.targets) and the methods' training defaults.

The matrix: every conf/peft/*.yaml method (but the black-box ones, tested in test_blackbox) on the
tiny ViT, a tiny ResNet, the published CIFAR ResNet-20 (model=rs) and a tiny transformers ViT
(model=hf): build, apply, one training step, save, reload bit-exact, certify a few samples; or,
where the method cannot adapt the model, the one-line refusal.
"""

from __future__ import annotations

import functools
import logging
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TINY, TINY_MODEL, compose
from omegaconf import OmegaConf

from peftsmooth.adapt import build_adaptation, targets
from peftsmooth.certify.smoothing import Smooth
from peftsmooth.config import conf_dir, group_choices
from peftsmooth.errors import UserError
from peftsmooth.models import build_classifier, module_tree, save_state_dict_file
from peftsmooth.runs import RunInfo, load_run, to_plain, write_run_info

METHODS = [m for m in group_choices("peft") if not m.startswith("blackbox")]
# resnet10t with narrow stages at a 16x16 input; zero_init_last=false so that the branch convs get
# gradients from random init (timm zero-initialises the last BatchNorm of every block)
RESNET_MODEL = ["model=resnet_tiny", "model.input_size=16", "+model.kwargs.channels=[16,32,64,128]",
                "+model.kwargs.stem_width=8", "+model.kwargs.zero_init_last=false"]


@functools.lru_cache(maxsize=1)
def tiny_hf_vit() -> str:
    """A tiny transformers ViT (and its image processor) written by save_pretrained, once per process."""
    import tempfile

    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    d = tempfile.mkdtemp(prefix="peftsmooth-hf-")
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64)).save_pretrained(d)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(d)
    return d


MODELS = {"vit": lambda: TINY_MODEL, "resnet": lambda: RESNET_MODEL,
          "rs": lambda: ["model=rs", "model.arch=cifar_resnet20"],
          "hf": lambda: ["model=hf", f"model.name={tiny_hf_vit()}"]}
# what cannot adapt resnet10t (and the published CIFAR ResNet): no token sequence / transformer blocks,
# no nn.Linear in the body (VeRA), only 3x3 block convs (peft's OFT is exact on nn.Linear and 1x1 convs
# only); and a transformers ViT: our prompts and bottleneck adapters need a timm ViT
REFUSED = {(m, f) for f in ("resnet", "rs") for m in ("prompt", "prompt_deep", "adapter", "vera", "oft")} | \
    {(m, "hf") for m in ("prompt", "prompt_deep", "adapter")}


@functools.lru_cache(maxsize=1)
def _digits(n: int = 16):
    from peftsmooth.data import build_dataset

    data = build_dataset(compose("train", TINY).dataset, "train")
    x = torch.stack([data[i][0] for i in range(n)])
    return x, torch.tensor([data[i][1] for i in range(n)])


def _one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One AdamW step on the noisy batch: something that trains changes, nothing frozen does."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    noisy = x + 0.25 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    F.cross_entropy(model(noisy), y).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert changed and not changed & frozen, sorted(changed & frozen)[:3]


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_every_model_family(method, family, tmp_path):
    cfg = compose("train", ["dataset=digits", "device=cpu", *MODELS[family](), f"peft={method}"])
    adapt = build_adaptation(cfg.peft)
    if (method, family) in REFUSED:  # refused upfront on the module tree, and at apply time
        for run in (lambda: adapt.check(module_tree(cfg.model, 10)),
                    lambda: adapt.apply(build_classifier(cfg.model, 10, [1, 8, 8]))):
            with pytest.raises(UserError, match=f"peft={method} cannot adapt model.name=") as err:
                run()
            assert len(str(err.value).splitlines()) == 1
        return
    torch.manual_seed(0)
    classifier = build_classifier(cfg.model, 10, [1, 8, 8])
    init = tmp_path / "init.safetensors"
    save_state_dict_file(classifier.backbone.state_dict(), init)
    adapt.check(module_tree(cfg.model, 10))
    model = adapt.apply(classifier)
    x, y = _digits()
    if adapt.trains:
        _one_step(model, x, y)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    files = adapt.save(model, tmp_path)
    assert all((tmp_path / f).is_file() for f in files)
    write_run_info(tmp_path, model=dict(to_plain(cfg.model), checkpoint=str(init)), num_classes=10,
                   image_size=[1, 8, 8], adapt=cfg.peft, front=None)
    loaded, info = load_run(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), logits)
    certified, _ = info.adaptation().before_certify(loaded)
    with torch.no_grad():  # an exact merge: what is certified is what was trained
        assert torch.allclose(certified(x), logits, atol=1e-4)
    smooth = Smooth(certified, 10, 0.25)
    for i in range(2):
        label, radius = smooth.certify(x[i], n0=4, n=16, alpha=0.001, batch_size=16, seed=i)
        assert label in range(-1, 10) and radius >= 0


# --------------------------------------------------------------------------- the registry

def _names(classifier, config: str, **options):
    options = {"target_modules": targets.AUTO, **options}
    resolved = targets.resolve(classifier, config, options, "test")
    return resolved, {k: [n.removeprefix("backbone.") for n in v] for k, v in resolved.modules.items()}


def test_vit_rule_takes_the_block_linears_not_the_patch_embedding_or_the_head():
    tree = module_tree(compose("train", TINY).model, 10)
    resolved, names = _names(tree, "LoraConfig")
    assert resolved.rule is targets.TRANSFORMER
    assert names["target_modules"] == sorted(f"blocks.{b}.{m}" for b in range(2)
                                             for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    _, ia3 = _names(tree, "IA3Config", feedforward_modules=targets.AUTO)
    assert ia3["target_modules"] == sorted(f"blocks.{b}.{m}" for b in range(2) for m in ("attn.qkv", "mlp.fc2"))
    assert ia3["feedforward_modules"] == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    assert targets.stem_and_head(tree.backbone) == ["patch_embed", "head"]


def test_resnet_rule_takes_the_block_convs_not_the_stem_shortcut_or_head():
    tree = module_tree(compose("train", RESNET_MODEL).model, 10)
    resolved, names = _names(tree, "LoraConfig")
    assert resolved.rule is targets.RESNET
    assert names["target_modules"] == [f"layer{i}.0.conv{k}" for i in range(1, 5) for k in (1, 2)]
    _, ia3 = _names(tree, "IA3Config", feedforward_modules=targets.AUTO)
    assert ia3["feedforward_modules"] == ia3["target_modules"]  # BatchNorm follows: scale the inputs
    assert targets.stem_and_head(tree.backbone) == ["conv1", "fc"]
    with pytest.raises(UserError, match="wraps nn.Linear layers and none of the resnet rule"):
        _names(tree, "VeraConfig")


@pytest.mark.parametrize("name, rule, count", [("resnet50", "resnet", 48), ("vit_base_patch16_224", "transformer", 48),
                                               ("convnext_atto", "convnext", 24)])
def test_family_rules_on_the_real_module_trees(name, rule, count):
    """The models of conf/model/ (and a ConvNeXt), as module trees on the meta device (no weights)."""
    tree = module_tree(OmegaConf.create({"name": name, "kwargs": {}}), 10)
    resolved, names = _names(tree, "LoraConfig")
    assert resolved.rule.name == rule and len(names["target_modules"]) == count
    assert not any(n.startswith(("conv1", "patch_embed", "stem", "fc", "head")) for n in names["target_modules"])


def test_generic_rule_on_another_timm_model(caplog):
    """EfficientNet has no family rule: every ungrouped Linear / Conv2d outside stem and head (timm's
    100k-parameter test_efficientnet, built for real, adapted and run)."""
    cfg = OmegaConf.create({"name": "test_efficientnet", "pretrained": False, "input_size": 32, "kwargs": {}})
    classifier = build_classifier(cfg, 10, [1, 8, 8])
    assert targets.family(classifier.backbone) is targets.GENERIC
    resolved, names = _names(classifier, "LoraConfig")
    modules = dict(classifier.backbone.named_modules())
    assert names["target_modules"] and all(modules[n].groups == 1 for n in names["target_modules"]
                                           if isinstance(modules[n], nn.Conv2d))
    assert "conv_stem" not in names["target_modules"] and "classifier" not in names["target_modules"]
    assert any(why == "a grouped conv" for why in resolved.skipped.values())  # the depthwise convs
    adapt = build_adaptation(compose("train", TINY + ["peft=lora"]).peft)
    with caplog.at_level(logging.INFO, logger="peftsmooth.adapt"):
        model = adapt.apply(classifier)
    assert f"auto targets (generic rule): {len(names['target_modules'])} target_modules" in caplog.text
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_misfits_are_left_out_with_a_reason():
    assert targets.misfit(nn.Linear(6, 8), "BOFTConfig", {"boft_block_size": 4}) == \
        "input width 6 not divisible by boft_block_size=4"
    assert targets.misfit(nn.Conv2d(8, 8, 3, groups=8), "LoraConfig", {}) == "a grouped conv"
    assert targets.misfit(nn.Conv2d(8, 8, 3), "VeraConfig", {}) == "a Conv2d"
    assert targets.misfit(nn.Conv2d(16, 8, 3), "BOFTConfig", {"boft_block_size": 16}) is None  # 16*3*3 = 144
    assert targets.misfit(nn.Conv2d(16, 8, 1), "OFTConfig", {"oft_block_size": 16}) is None
    assert targets.misfit(nn.Conv2d(16, 8, 3), "OFTConfig", {"oft_block_size": 16}).startswith("a 3x3 conv")


def test_an_explicit_regex_is_honoured():
    cfg = compose("train", TINY + ["peft=lora", r"peft.target_modules=backbone\.blocks\.0\.attn\.qkv"])
    model = build_adaptation(cfg.peft).apply(build_classifier(cfg.model, 10, [1, 8, 8]))
    wrapped = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert len(wrapped) == 1 and ".blocks.0.attn.qkv." in wrapped[0]


@pytest.mark.parametrize("method", ["vera", "prompt"])
def test_train_refuses_a_method_that_cannot_adapt_the_model(method, tmp_path, monkeypatch, capsys):
    from test_refusals import refused

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["peftsmooth"])
    line = refused(["train", "dataset=digits", "device=cpu", "model=resnet_tiny", f"peft={method}"], tmp_path, capsys)
    assert line.startswith(f"peftsmooth train: error: peft={method} cannot adapt model.name=resnet10t"), line


# --------------------------------------------------------------------------- training defaults

def _method_train(method: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(conf_dir() / "peft" / f"{method}.yaml")).get("train") or {}


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_train_lr_defaults_come_from_the_method(method):
    defaults = _method_train(method)
    assert "lr" in defaults, f"conf/peft/{method}.yaml has no train.lr default"
    cfg = compose("train", TINY + [f"peft={method}"])
    assert cfg.train.lr == defaults["lr"]
    assert cfg.train.weight_decay == defaults.get("weight_decay", 0.05)
    assert "train" not in getattr(build_adaptation(cfg.peft), "options", {})  # not a method option


def test_the_command_line_lr_wins_and_is_what_run_json_and_resume_record():
    from peftsmooth.train.loop import resume_fingerprint

    assert compose("train", TINY + ["peft=none"]).train.lr == 1e-3  # a method without defaults
    cfg = compose("train", TINY + ["peft=lora", "train.lr=0.123", "train.weight_decay=0.5"])
    assert (cfg.train.lr, cfg.train.weight_decay) == (0.123, 0.5)
    cfg = compose("train", TINY + ["peft=ia3"])
    assert RunInfo.from_fields(train=cfg.train)["train"]["lr"] == _method_train("ia3")["lr"]
    fingerprint = resume_fingerprint(cfg)
    assert fingerprint["train"]["lr"] == _method_train("ia3")["lr"] and fingerprint["train"]["weight_decay"] == 0.0


@pytest.mark.parametrize("cfg, rule, count", [
    ({"source": "torchvision", "name": "resnet50"}, "resnet", 48),
    ({"source": "torchvision", "name": "vit_b_16"}, "torchvision ViT", 24),
    ({"source": "torchvision", "name": "convnext_tiny"}, "torchvision ConvNeXt", 36),
    ({"source": "rs", "arch": "cifar_resnet110"}, "resnet", 108),
])
def test_family_rules_of_the_other_sources(cfg, rule, count):
    tree = module_tree(OmegaConf.create(cfg), 10)
    resolved, names = _names(tree, "LoraConfig")
    assert resolved.rule.name == rule and len(names["target_modules"]) == count
    head = tree.backbone.pretrained_cfg["classifier"]
    assert not any(n.startswith(head) or "downsample" in n for n in names["target_modules"])


def test_generic_rule_on_a_torchvision_efficientnet_leaves_the_depthwise_convs_out():
    tree = module_tree(OmegaConf.create({"source": "torchvision", "name": "efficientnet_b0"}), 10)
    resolved, names = _names(tree, "LoraConfig")
    assert resolved.rule is targets.GENERIC and names["target_modules"]
    assert any("grouped" in why for why in resolved.skipped.values())
    assert not any(n.startswith(("features.0.", "classifier")) for n in names["target_modules"])


@pytest.mark.parametrize("config_cls, model_cls, kwargs, rule, count", [
    ("ViTConfig", "ViTForImageClassification", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                                "intermediate_size": 64}, "transformers ViT/DeiT/BEiT/Swin", 12),
    ("SwinConfig", "SwinForImageClassification", {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]},
     "transformers ViT/DeiT/BEiT/Swin", 12),
    ("ConvNextConfig", "ConvNextForImageClassification", {"hidden_sizes": [8, 16, 16, 16], "depths": [1, 1, 1, 1]},
     "transformers ConvNeXt", 8),
    ("ResNetConfig", "ResNetForImageClassification", {"hidden_sizes": [8, 16, 16, 16], "depths": [1, 1, 1, 1],
                                                      "embedding_size": 8}, "transformers ResNet", 12),
])
def test_family_rules_of_transformers_models(tmp_path, config_cls, model_cls, kwargs, rule, count):
    import transformers

    getattr(transformers, config_cls)(**kwargs).save_pretrained(tmp_path)
    tree = module_tree(OmegaConf.create({"source": "hf", "name": str(tmp_path), "pretrained": False}), 10)
    assert type(tree.backbone).__name__ == model_cls
    resolved, names = _names(tree, "LoraConfig")
    assert resolved.rule.name == rule and len(names["target_modules"]) == count
    assert not any(n.startswith("classifier") or "embed" in n or "shortcut" in n for n in names["target_modules"])
