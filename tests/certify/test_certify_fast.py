"""The speed options of certification change speed only: same samples, same counts (fp32), valid results."""

import os

import pytest
import torch
import torch.nn as nn
from conftest import TINY, compose

from peftsmooth.certify.smoothing import Smooth, image_seed
from peftsmooth.models import build_classifier


class OutOfMemoryAbove(nn.Module):
    """A classifier that fails like a full GPU on batches larger than `limit` rows."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit, self.rows = inner, limit, 0

    def forward(self, x):
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("simulated CUDA out of memory")
        self.rows += len(x)
        return self.inner(x)


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    model = build_classifier(compose("certify", TINY).model, 10, [1, 8, 8]).eval()
    with torch.no_grad():
        model.backbone.head.weight.mul_(4)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return [torch.rand(1, 8, 8) for _ in range(4)]


def test_optimized_paths_count_the_same_samples_fp32(tiny_vit, images):
    seeds = [image_seed(0, i) for i in range(len(images))]
    plain = Smooth(tiny_vit, 10, 0.25)
    expected = [plain.certify(x, 16, 120, 0.01, 8, seed=s) for x, s in zip(images, seeds)]
    counts = plain._sample_noise(images[0], 200, 8, seeds[0], "estimation")

    fast_model = OutOfMemoryAbove(tiny_vit, limit=32).to(memory_format=torch.channels_last)
    fast = Smooth(fast_model, 10, 0.25, channels_last=True, pad_batches=True)
    packed = list(fast.certify_many(images, seeds, 16, 120, 0.01, 64, pack=True))  # 4 selections in one batch
    assert [(c.prediction, c.radius) for c in packed] == expected
    assert fast.max_batch == 32  # halved once, then every batch fits
    assert (fast._sample_noise(images[0], 200, 64, seeds[0], "estimation") == counts).all()
    assert any(c.prediction != Smooth.ABSTAIN for c in packed)


def test_bf16_counts_stay_close_to_fp32(tiny_vit, images):
    x, seed = images[0], image_seed(0, 0)
    fp32 = Smooth(tiny_vit, 10, 0.25)._sample_noise(x, 512, 128, seed, "estimation")
    bf16 = Smooth(tiny_vit, 10, 0.25, precision="bf16")._sample_noise(x, 512, 128, seed, "estimation")
    assert bf16.sum() == 512
    assert abs(int(bf16.max()) - int(fp32.max())) <= 0.05 * 512  # same noise; rounding flips few votes


def test_compile_failure_falls_back_to_eager(tiny_vit, images, monkeypatch):
    def broken(model, *args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    g = Smooth(tiny_vit, 10, 0.25)
    error = g.compile(32, [1, 8, 8])
    assert "no compiler here" in error and g.base_classifier is tiny_vit and not g.pad_batches
    ref = Smooth(tiny_vit, 10, 0.25).certify(images[0], 8, 64, 0.01, 32, seed=3)
    assert g.certify(images[0], 8, 64, 0.01, 32, seed=3) == ref


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PEFTSMOOTH_SLOW_TESTS"),
                    reason="a cold torch.compile takes 30-90 s on 2 CPU cores; set PEFTSMOOTH_SLOW_TESTS=1 to run it")
def test_compiled_classifier_counts_the_same_samples():
    """torch.compile (fixed-shape padded batches) on a small classifier: same counts as eager, fp32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(1, 8, 8)
    eager = Smooth(model, 10, 0.5)._sample_noise(x, 300, 64, 5, "estimation")
    g = Smooth(model, 10, 0.5)
    error = g.compile(64, [1, 8, 8])
    if error is not None:
        pytest.skip(f"torch.compile unavailable here: {error}")
    assert g.pad_batches
    assert (g._sample_noise(x, 300, 64, 5, "estimation") == eager).all()
