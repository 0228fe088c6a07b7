"""Pretrained weights where the hub cannot be reached: one line within seconds, or the cached copy."""

from __future__ import annotations

import time

import pytest
import torch
from omegaconf import OmegaConf

from peftsmooth import hub
from peftsmooth.errors import UserError
from peftsmooth.models import build_classifier, save_state_dict_file

TINY_VIT = {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}
REPO = "timm/vit_tiny_patch16_224.augreg_in21k"


@pytest.fixture
def unreachable(monkeypatch, tmp_path):
    """No hub, and an empty Hugging Face cache of our own."""
    from huggingface_hub import constants

    monkeypatch.setattr(hub, "reachable", lambda url, timeout=hub.PROBE_TIMEOUT_S: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path / "hf_cache"


def pretrained_cfg():
    return OmegaConf.create({"name": REPO.split("/")[1], "pretrained": True, "kwargs": TINY_VIT, "input_size": 16})


def test_a_hanging_hub_gives_up_after_the_timeout(monkeypatch):
    class Hanging:
        def head(self, url, timeout):
            time.sleep(30)

    monkeypatch.setattr("huggingface_hub.utils.get_session", lambda: Hanging())
    started = time.time()
    assert hub.reachable.__wrapped__("https://hub.invalid", timeout=0.2) is False
    assert time.time() - started < 2


def test_unreachable_and_not_cached_fails_before_building(unreachable, monkeypatch):
    import timm

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("the model was built"))
    started = time.time()
    with pytest.raises(UserError) as err:
        build_classifier(pretrained_cfg(), 10, [1, 8, 8])
    assert time.time() - started < 2
    message = str(err.value)
    assert "\n" not in message and "model.weights=" in message and "HF_HUB_OFFLINE=1" in message
    assert REPO in message and "cannot be reached" in message


def test_hf_hub_offline_is_honoured_without_asking_the_hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: pytest.fail("the hub was asked"))
    with hub.offline_unless_reachable() as reason:
        assert reason == "HF_HUB_OFFLINE=1 is set"
    assert constants.HF_HUB_OFFLINE is True


def test_unreachable_hub_loads_the_cached_copy(unreachable):
    """The client goes offline for the call: weights in the local cache load without a request."""
    import timm
    from huggingface_hub import constants

    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **TINY_VIT)
    revision = "0" * 40
    repo_dir = unreachable / f"models--{REPO.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    (repo_dir / "snapshots" / revision).mkdir(parents=True)
    save_state_dict_file(source.state_dict(), repo_dir / "snapshots" / revision / "model.safetensors")
    classifier = build_classifier(pretrained_cfg(), 10, [1, 8, 8])
    assert torch.equal(classifier.backbone.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert constants.HF_HUB_OFFLINE is False  # offline only for the call
