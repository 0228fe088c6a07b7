"""Every adaptation method (each YAML of conf/peft/): what trains, that it learns, exact save/reload."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, compose
from torch.utils.data import TensorDataset

from peftsmooth.adapt import build_adaptation
from peftsmooth.config import group_choices
from peftsmooth.data import build_dataset
from peftsmooth.errors import UserError
from peftsmooth.models import build_classifier, count_parameters, save_state_dict_file
from peftsmooth.runs import load_run, to_plain, write_run_info
from peftsmooth.train.loop import TrainSettings, fit

METHODS = group_choices("peft")

# Tiny ViT of conftest: depth 2, dim 32, mlp 128, 10 classes -> head 32*10+10 = 330 parameters.
HEAD = 330
BLOCK_LINEARS = [(32, 96), (32, 32), (32, 128), (128, 32)]  # qkv, proj, fc1, fc2 (in, out)
EXPECTED_TRAINABLE = {
    "linear": HEAD,
    "lora": 2 * sum(8 * (i + o) for i, o in BLOCK_LINEARS) + HEAD,      # r=8, A and B per linear
    "prompt": 10 * 32 + HEAD,                                           # 10 tokens, shallow
    "prompt_deep": 2 * 10 * 32 + HEAD,                                  # 10 tokens per block
    "adapter": 2 * (32 * 64 + 64 + 64 * 32 + 32) + HEAD,               # bottleneck 64, parallel
    "ia3": 2 * (96 + 128) + HEAD,                                       # qkv outputs, fc2 inputs
    "none": 0,
}



def _setup(method, tmp_path, extra=()):
    cfg = compose("train", TINY + [f"peft={method}", *extra])
    adapt = build_adaptation(cfg.peft)
    torch.manual_seed(0)
    classifier = build_classifier(cfg.model, 10, [1, 8, 8])
    init = tmp_path / "init.safetensors"
    save_state_dict_file(classifier.backbone.state_dict(), init)
    return cfg, adapt, classifier, init


def _fixed_batch():
    """64 training images (clean), and one fixed noisy copy of them to measure the loss on."""
    train = build_dataset(compose("train", TINY).dataset, "train")
    x = torch.stack([train[i][0] for i in range(64)])
    y = torch.tensor([train[i][1] for i in range(64)])
    noisy = x + 0.25 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    return TensorDataset(x, y), noisy, y


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_only_its_parameters_and_reloads_exactly(method, tmp_path):
    cfg, adapt, classifier, init = _setup(method, tmp_path)
    backbone_total = count_parameters(classifier)[1]
    model = adapt.apply(classifier)
    trainable, total = count_parameters(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}

    if method in EXPECTED_TRAINABLE:
        assert trainable == EXPECTED_TRAINABLE[method]
    elif method == "full":
        assert trainable == total == backbone_total
    else:
        assert 0 < trainable < total
    if method != "full":
        assert not any("patch_embed" in n for n in names), "the patch embedding must stay frozen"
    if method == "none":
        return

    train_set, x, y = _fixed_batch()
    model.eval()
    with torch.no_grad():
        before_logits = model(x)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = TrainSettings(epochs=3, batch_size=32, lr=1e-2, warmup_epochs=0)
    step_hook = adapt if adapt.zeroth_order else None
    result = fit(model, train_set, sigma=0.25, settings=settings, run_dir=tmp_path, evaluate=None,
                 save=adapt.save, seed=0, device=torch.device("cpu"), step_hook=step_hook, progress=False)
    model.eval()
    with torch.no_grad():
        logits = model(x)

    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "training changed nothing"
    assert changed <= names, f"frozen parameters changed: {sorted(changed - names)[:3]}"
    if step_hook is None:  # a gradient method learns in a few steps (zeroth order: its own tests)
        assert F.cross_entropy(logits, y) < F.cross_entropy(before_logits, y)

    # save -> run.json -> load_run rebuilds the same classifier (logits identical)
    assert all((tmp_path / f).is_file() for f in result["files"])
    model_cfg = dict(to_plain(cfg.model), checkpoint=str(init))
    write_run_info(tmp_path, model=model_cfg, num_classes=10, image_size=[1, 8, 8], adapt=cfg.peft, front=None)
    loaded, _ = load_run(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), logits)


def test_lora_targets_block_linears_only(tmp_path):
    _, adapt, classifier, _ = _setup("lora", tmp_path)
    model = adapt.apply(classifier)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert len(wrapped) == 2 * 4
    assert all(".blocks." in n for n in wrapped)


@pytest.mark.parametrize("override, message", [
    ("peft.r=0", "peft.r=0"),
    ("peft.r=-2", "peft.r=-2"),
    ("+peft.no_such_option=1", "peft.no_such_option"),
    ("peft.target_modules=nothing_matches", "matches no module"),
])
def test_bad_peft_options_are_user_errors(override, message, tmp_path):
    with pytest.raises(UserError, match=message):
        _, adapt, classifier, _ = _setup("lora", tmp_path, [override])
        adapt.apply(classifier)


def test_prompt_and_adapter_need_a_vit(tmp_path):
    cfg = compose("train", ["dataset=digits", "device=cpu", "model=resnet_tiny", "peft=prompt"])
    classifier = build_classifier(cfg.model, 10, [1, 8, 8])
    with pytest.raises(UserError, match="needs a ViT"):
        build_adaptation(cfg.peft).apply(classifier)


def test_unknown_adapter_style_is_user_error():
    with pytest.raises(UserError, match="peft.style"):
        build_adaptation(compose("train", TINY + ["peft=adapter", "peft.style=diagonal"]).peft)


def test_a_target_that_is_not_an_adaptation_is_a_user_error():
    with pytest.raises(UserError, match="not an adaptation method"):
        build_adaptation({"_target_": "collections.OrderedDict"})


def test_the_base_class_gives_the_defaults():
    from peftsmooth.adapt import Adaptation, NoAdaptation

    none = NoAdaptation()
    model = torch.nn.Linear(2, 2)
    assert isinstance(none, Adaptation) and not none.trains and not none.zeroth_order
    assert none.save(model, None) == [] and none.extra_run_info() == {}
    assert none.before_certify(model) == (model, [])
    assert not hasattr(none, "training_step")  # only zeroth-order methods have one
