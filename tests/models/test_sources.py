"""Model sources without the network: published RS checkpoints written here in their format, a tiny
transformers ViT saved to a temporary directory, torchvision models with random weights, a user's
module from a temporary file; and every source through train (lora / linear / full) and certify."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import compose
from omegaconf import OmegaConf

from peftsmooth.errors import UserError
from peftsmooth.models import build_classifier, model_label, module_tree
from peftsmooth.models.rs import CIFAR10_MEAN, CIFAR10_STD

# --- a test-only rewrite of the published code (locuslab/smoothing code/archs/cifar_resnet.py and
# code/datasets.py): what their checkpoints were saved from, written independently of ours ------------


class NormalizeLayer(nn.Module):
    """Their first layer: (x - mean) / std with plain tensors (no state-dict entries)."""

    def __init__(self, means, sds):
        super().__init__()
        self.means, self.sds = torch.tensor(means), torch.tensor(sds)

    def forward(self, x):
        return (x - self.means.view(1, -1, 1, 1)) / self.sds.view(1, -1, 1, 1)


class TheirBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class TheirResNet(nn.Module):
    def __init__(self, depth, num_classes=10):
        super().__init__()
        n, self.inplanes = (depth - 2) // 6, 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1, self.layer2, self.layer3 = self._layer(16, n), self._layer(32, n, 2), self._layer(64, n, 2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)

    def _layer(self, planes, blocks, stride=1):
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [TheirBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        return nn.Sequential(*layers, *(TheirBlock(planes, planes) for _ in range(1, blocks)))

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.avgpool(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.view(x.size(0), -1))


def randomize_bn(model: nn.Module) -> None:
    """Running statistics and affine weights away from their init, so that a wrong mapping shows."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def save_published(path: Path, arch: str, network: nn.Module, mean, std) -> nn.Module:
    """torch.save({'epoch', 'arch', 'state_dict', 'optimizer'}) of Sequential(NormalizeLayer, network)."""
    model = nn.Sequential(NormalizeLayer(mean, std), network).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model(torch.rand(2, 3, *(32, 32) if arch.startswith("cifar") else (224, 224))).mean().backward()
    optimizer.step()  # an optimizer state with momentum buffers, as in their files
    torch.save({"epoch": 90, "arch": arch, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    return model


def rs_cfg(arch: str, checkpoint=None):
    return OmegaConf.create({"source": "rs", "arch": arch, "checkpoint": str(checkpoint) if checkpoint else None})


@pytest.mark.parametrize("arch,depth", [("cifar_resnet20", 20), ("cifar_resnet110", 110)])
def test_published_cifar_checkpoints_give_the_logits_of_the_saved_module(tmp_path, arch, depth):
    torch.manual_seed(0)
    net = TheirResNet(depth)
    randomize_bn(net)
    theirs = save_published(tmp_path / "checkpoint.pth.tar", arch, net, CIFAR10_MEAN, CIFAR10_STD)
    assert any(k.startswith("1.layer3.") for k in torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)["state_dict"])
    ours = build_classifier(rs_cfg(arch, tmp_path / "checkpoint.pth.tar"), 10, [3, 32, 32]).eval()
    x = torch.rand(4, 3, 32, 32)  # native [0,1] pixels: the normalization is inside both
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    if depth == 110:
        assert len(theirs.state_dict()) == 668  # with the BN counters, as the published ResNet-110


def test_published_imagenet_resnet50_inside_dataparallel(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = nn.DataParallel(torchvision.models.resnet50())
    randomize_bn(net)
    theirs = save_published(tmp_path / "checkpoint.pth.tar", "resnet50", net, (0.485, 0.456, 0.406),
                            (0.229, 0.224, 0.225))
    assert "1.module.fc.weight" in torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    ours = build_classifier(rs_cfg("resnet50", tmp_path / "checkpoint.pth.tar"), 1000, [3, 224, 224]).eval()
    assert ours.input_size == 224
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_published_checkpoint_refusals_name_the_key_or_arch(tmp_path):
    net = TheirResNet(20)
    save_published(tmp_path / "c20.pth.tar", "cifar_resnet20", net, CIFAR10_MEAN, CIFAR10_STD)
    with pytest.raises(UserError, match="arch=cifar_resnet20, not model.arch=cifar_resnet110"):
        build_classifier(rs_cfg("cifar_resnet110", tmp_path / "c20.pth.tar"), 10, [3, 32, 32])
    state = {k.removeprefix("1."): v for k, v in net.state_dict().items() if k != "fc.bias"}
    torch.save({"arch": "cifar_resnet20", "state_dict": state}, tmp_path / "cut.pth.tar")
    with pytest.raises(UserError, match="missing key 'fc.bias'"):
        build_classifier(rs_cfg("cifar_resnet20", tmp_path / "cut.pth.tar"), 10, [3, 32, 32])
    with pytest.raises(UserError, match="model.arch=resnet18 is not allowed.*cifar_resnet20"):
        build_classifier(rs_cfg("resnet18"), 10, [3, 32, 32])


# --- transformers, torchvision, python ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """A tiny ViTForImageClassification and its image processor, written by save_pretrained."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    d = tmp_path_factory.mktemp("hf") / "tiny-vit"
    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=5)
    ViTForImageClassification(config).save_pretrained(d)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.4, 0.5, 0.6],
                      image_std=[0.2, 0.25, 0.3]).save_pretrained(d)
    return d


def test_hf_model_takes_mean_std_and_size_from_its_processor(tiny_hf):
    from transformers import ViTForImageClassification

    clf = build_classifier(OmegaConf.create({"source": "hf", "name": str(tiny_hf), "pretrained": True}), 10,
                           [1, 8, 8]).eval()
    assert clf.input_size == 16 and clf.mean.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])
    assert clf.backbone.classifier.out_features == 10  # a fresh head for the dataset's classes
    saved = ViTForImageClassification.from_pretrained(tiny_hf).eval()
    assert torch.equal(clf.backbone.vit.layers[0].mlp.fc1.weight, saved.vit.layers[0].mlp.fc1.weight)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():  # the body is the saved one: same features before the head
        big = F.interpolate(x.expand(-1, 3, -1, -1), size=(16, 16), mode="bilinear", align_corners=False)
        normed = (big - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
        hidden = saved.vit(normed).last_hidden_state[:, 0]
        torch.testing.assert_close(clf(x), clf.backbone.classifier(hidden))
    assert model_label(OmegaConf.create({"source": "hf", "name": str(tiny_hf)})) == "hf:tiny-vit"


def test_hf_hub_id_offline_is_one_line_naming_the_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="model.name=/path/to/a/directory written by save_pretrained"):
        build_classifier(OmegaConf.create({"source": "hf", "name": "nobody/not-a-cached-model-xyz"}), 10, [3, 32, 32])


def test_torchvision_models_with_random_weights_and_a_local_weights_file(tmp_path):
    import torchvision

    for name, head in (("resnet18", "fc"), ("vit_b_16", "heads.head"), ("convnext_tiny", "classifier.2"),
                       ("efficientnet_b0", "classifier.1")):
        tree = module_tree(OmegaConf.create({"source": "torchvision", "name": name}), 7)
        assert tree.backbone.pretrained_cfg["classifier"] == head and tree.input_size == 224, name
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18()
    torch.save(imagenet.state_dict(), tmp_path / "resnet18.pth")
    cfg = OmegaConf.create({"source": "torchvision", "name": "resnet18", "weights": str(tmp_path / "resnet18.pth"),
                            "input_size": 32})
    clf = build_classifier(cfg, 10, [3, 32, 32])
    assert clf.backbone.fc.out_features == 10 and torch.equal(clf.backbone.layer4[1].conv2.weight,
                                                              imagenet.layer4[1].conv2.weight)
    assert clf.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


USER_MODULE = '''
import torch.nn as nn

def build(num_classes):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, num_classes))

def not_a_module(num_classes):
    return "a string"
'''


@pytest.fixture(scope="module")
def user_module(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user") / "mynets.py"
    path.write_text(USER_MODULE)
    return path


def python_cfg(factory: str, **extra):
    return OmegaConf.create({"source": "python", "factory": factory, "input_size": 16, "mean": [0.5, 0.5, 0.5],
                             "std": [0.25, 0.25, 0.25], "normalize": True, "in_chans": 3} | extra)


def test_a_users_module_from_a_file(user_module):
    clf = build_classifier(python_cfg(f"{user_module}:build"), 10, [1, 8, 8])
    assert clf(torch.rand(2, 1, 8, 8)).shape == (2, 10) and clf.backbone.pretrained_cfg["classifier"] == "6"
    plain = build_classifier(python_cfg(f"{user_module}:build", normalize=False, mean=None, std=None), 10, [1, 8, 8])
    assert plain.mean.abs().sum() == 0 and (plain.std == 1).all()
    with pytest.raises(UserError, match="returned a str, not an nn.Module"):
        build_classifier(python_cfg(f"{user_module}:not_a_module"), 10, [1, 8, 8])
    with pytest.raises(UserError, match="cannot import no_such_module_xyz"):
        build_classifier(python_cfg("no_such_module_xyz:build"), 10, [1, 8, 8])
    with pytest.raises(UserError, match="has no function missing"):
        build_classifier(python_cfg(f"{user_module}:missing"), 10, [1, 8, 8])


def test_in_chans_is_honoured_with_statistics_of_matching_length(user_module, tmp_path):
    """A 1-channel module gets 1 channel (model=python with and without normalize, timm's
    kwargs.in_chans); grayscale data into a 3-channel model is still repeated."""
    one = tmp_path / "onechannel.py"
    one.write_text("import torch.nn as nn\n\ndef build(num_classes):\n    return nn.Sequential(nn.Conv2d(1, 4, 3), "
                   "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))\n")
    seen = []
    for extra in ({"normalize": False, "mean": None, "std": None}, {"mean": [0.5], "std": [0.25]}):
        clf = build_classifier(python_cfg(f"{one}:build", in_chans=1, **extra), 10, [1, 8, 8])
        clf.backbone.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
        assert clf(torch.rand(2, 1, 8, 8)).shape == (2, 10) and clf.mean.numel() == 1
    timm_cfg = OmegaConf.create({"source": "timm", "name": "vit_tiny_patch16_224", "pretrained": False, "input_size": 16,
                                 "kwargs": {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 24, "num_heads": 2,
                                            "in_chans": 1}})
    clf = build_classifier(timm_cfg, 10, [1, 8, 8])
    clf.backbone.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    assert clf(torch.rand(2, 1, 8, 8)).shape == (2, 10) and clf.mean.flatten().tolist() == [pytest.approx(0.5)]
    rgb = build_classifier(python_cfg(f"{user_module}:build"), 10, [1, 8, 8])
    rgb.backbone.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    rgb(torch.rand(2, 1, 8, 8))
    assert seen == [1, 1, 1, 3]
    with pytest.raises(UserError, match="images have 3 channels but the model takes 1"):
        build_classifier(timm_cfg, 10, [3, 8, 8])


# --- every source through the commands --------------------------------------------------------------


def source_overrides(source: str, tiny_hf: Path, user_module: Path) -> list[str]:
    return {
        "rs": ["model=rs", "model.arch=cifar_resnet20"],
        "torchvision": ["model=torchvision", "model.name=resnet18", "model.input_size=16"],
        "hf": ["model=hf", f"model.name={tiny_hf}"],
        "python": ["model=python", f"model.factory={user_module}:build", "model.input_size=16",
                   "model.mean=[0.5,0.5,0.5]", "model.std=[0.25,0.25,0.25]"],
    }[source]


TRAIN = ["dataset=digits", "device=cpu", "sigma=0.25", "train.epochs=1", "train.max_steps_per_epoch=2",
         "train.batch_size=16", "train.max_eval=32", "train.num_workers=0"]
CERTIFY = ["device=cpu", "certify.n0=8", "certify.n=32", "certify.alpha=0.01", "certify.batch_size=40",
           "certify.skip=100", "certify.max=2"]


@pytest.mark.parametrize("source", ["rs", "torchvision", "hf", "python"])
@pytest.mark.parametrize("method", ["lora", "linear", "full"])
def test_every_source_trains_and_certifies(tmp_path, source, method, tiny_hf, user_module):
    from peftsmooth.commands.certify import run_certify
    from peftsmooth.commands.train import run_train
    from peftsmooth.runs import load_run, read_run_info

    run_dir = tmp_path / "run"
    summary = run_train(compose("train", [*TRAIN, *source_overrides(source, tiny_hf, user_module), f"peft={method}"],
                                run_dir=run_dir))
    info = read_run_info(run_dir)
    assert info.model["source"] == source and info.model_name.startswith(f"{source}:") and info.finished
    assert 0 < summary["trainable_params"] < summary["total_params"] or method == "full"
    model, _ = load_run(run_dir)  # rebuilt from run.json alone
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    cert = run_certify(compose("certify", [f"run={run_dir}", *CERTIFY], run_dir=tmp_path / "cert"))
    assert cert["num_images"] == 2 and cert["model_name"] == info.model_name and not math.isnan(cert["acr"])


def test_combine_quantize_and_report_work_on_runs_of_other_sources(tmp_path, tiny_hf, user_module):
    """Two LoRA runs of one transformers ViT (model=hf) combined, a LoRA run of the published
    architecture (model=rs) quantized; both certified and reported like timm runs, the report's model
    column naming the source."""
    from peftsmooth.commands.certify import run_certify
    from peftsmooth.commands.combine import run_combine
    from peftsmooth.commands.quantize import run_quantize
    from peftsmooth.commands.train import run_train
    from peftsmooth.report.table import build_report

    hf = source_overrides("hf", tiny_hf, user_module)
    runs = [tmp_path / "hf0", tmp_path / "hf1"]
    for seed, run in enumerate(runs):
        run_train(compose("train", [*TRAIN, *hf, "peft=lora", f"seed={seed}"], run_dir=run))
    run_train(compose("train", [*TRAIN, "model=rs", "model.arch=cifar_resnet20", "peft=lora"], run_dir=tmp_path / "rs"))
    run_combine(compose("combine", [f"runs=[{runs[0]},{runs[1]}]", "combination=linear", f"out={tmp_path / 'mix'}"],
                        run_dir=tmp_path / "job1"))
    run_quantize(compose("quantize", [f"run={tmp_path / 'rs'}", "bits=4", f"out={tmp_path / 'q4'}"],
                         run_dir=tmp_path / "job2"))
    names = {}
    for run in (tmp_path / "mix", tmp_path / "q4"):
        cert = run_certify(compose("certify", [f"run={run}", *CERTIFY], run_dir=run / "certify" / "c"))
        names[run.name] = cert["model_name"]
        assert cert["num_images"] == 2
    assert names == {"mix": "hf:tiny-vit", "q4": "rs:cifar_resnet20"}
    rows = build_report([tmp_path]).rows
    assert {row["model"] for row in rows} == {"hf:tiny-vit", "rs:cifar_resnet20"} and len(rows) == 5


def test_lora_on_a_published_checkpoint_then_certify(tmp_path):
    """LoRA on a published-format ResNet-20 (their file, read as it is): run.json keeps the checkpoint's
    path, so load_run and certify rebuild the same classifier."""
    from peftsmooth.commands.certify import run_certify
    from peftsmooth.commands.train import run_train
    from peftsmooth.runs import load_run, read_run_info

    torch.manual_seed(0)
    net = TheirResNet(20)
    randomize_bn(net)
    save_published(tmp_path / "checkpoint.pth.tar", "cifar_resnet20", net, CIFAR10_MEAN, CIFAR10_STD)
    run_dir = tmp_path / "run"
    run_train(compose("train", [*TRAIN, "model=rs", "model.arch=cifar_resnet20", "peft=lora",
                                f"model.checkpoint={tmp_path / 'checkpoint.pth.tar'}"], run_dir=run_dir))
    info = read_run_info(run_dir)
    assert info.model["checkpoint"] == str(tmp_path / "checkpoint.pth.tar") and "init.safetensors" not in info.files
    model, _ = load_run(run_dir)
    assert torch.equal(model.base_model.model.backbone.conv1.weight, net.conv1.weight)  # the stem is not adapted
    cert = run_certify(compose("certify", [f"run={run_dir}", *CERTIFY], run_dir=tmp_path / "cert"))
    assert cert["model_name"] == "rs:cifar_resnet20" and cert["num_images"] == 2
