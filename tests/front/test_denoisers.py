"""Denoiser architectures, objectives and the one-shot diffusion step (peftsmooth.front.denoisers,
peftsmooth.front.diffusion, the denoiser objectives of peftsmooth.train.losses)."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from conftest import compose
from hydra.utils import instantiate

from peftsmooth.errors import UserError
from peftsmooth.front.denoisers import DenoisedClassifier
from peftsmooth.front.diffusion import OneShotDiffusion, check_image_size, noise_ratio, timestep_for_sigma
from peftsmooth.models import BaseClassifier
from peftsmooth.train.loop import Batch
from peftsmooth.train.losses import OBJECTIVES, build_objective

# Each architecture, shrunk to run in a second on CPU (the full sizes are the configs' defaults).
CNN_DENOISERS = {
    "dncnn": ["denoiser.arch.depth=6", "denoiser.arch.channels=16"],
    "dncnn_wide": ["denoiser.arch.depth=4", "denoiser.arch.channels=32"],
    "memnet": ["denoiser.arch.channels=8", "denoiser.arch.num_memblock=2", "denoiser.arch.num_resblock=1"],
}
LEARNING_RATE = {"dncnn": 3e-3, "dncnn_wide": 3e-3, "memnet": 1e-2}


def _digits(n: int, offset: int = 0) -> torch.Tensor:
    from peftsmooth.data import build_dataset

    cfg = compose("denoise-baseline", ["dataset=digits"]).dataset
    data = build_dataset(cfg, "train")
    return torch.stack([data[i][0] for i in range(offset, offset + n)])


@pytest.mark.parametrize("choice", sorted(CNN_DENOISERS))
def test_cnn_denoiser_keeps_shape_and_learns_to_denoise(choice):
    """Each architecture keeps (C,H,W) and lowers the test MSE in a few Adam steps on noisy digits."""
    cfg = compose("denoise-baseline", ["dataset=digits", f"denoiser={choice}", *CNN_DENOISERS[choice]])
    denoiser = instantiate(cfg.denoiser).build()
    sigma = 0.25
    x_train, x_test = _digits(32), _digits(32, offset=100)
    gen = torch.Generator().manual_seed(1)
    test_noisy = x_test + sigma * torch.randn(x_test.shape, generator=gen)

    def test_mse() -> float:
        denoiser.eval()
        with torch.no_grad():
            return float(((denoiser(test_noisy) - x_test) ** 2).mean())

    assert denoiser(test_noisy).shape == x_test.shape
    before = test_mse()
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=LEARNING_RATE[choice])
    model = DenoisedClassifier(denoiser, torch.nn.Identity())
    mse = build_objective("mse", "denoiser.objective")
    for _ in range(20):
        model.train()
        noisy = x_train + sigma * torch.randn(x_train.shape, generator=gen)
        loss, logits = mse(model, Batch(x_train, noisy, torch.zeros(32, dtype=torch.long), sigma))
        assert logits is None
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = test_mse()
    assert after < 0.95 * before, (before, after)  # identity: sigma^2 = 0.0625


@pytest.mark.parametrize("choice", sorted(CNN_DENOISERS))
def test_rgb_shapes(choice):
    cfg = compose("denoise-baseline", ["dataset=cifar10", f"denoiser={choice}", *CNN_DENOISERS[choice]])
    x = torch.rand(2, 3, 32, 32)
    assert instantiate(cfg.denoiser).build()(x).shape == x.shape


def test_full_size_parameter_counts():
    """The configs' default sizes are Salman et al.'s (3-channel counts)."""
    counts = {}
    for choice in CNN_DENOISERS:
        cfg = compose("denoise-baseline", ["dataset=cifar10", f"denoiser={choice}"])
        counts[choice] = sum(p.numel() for p in instantiate(cfg.denoiser).build().parameters())
    # DnCNN: 3->64 conv (+bias), 15 x (64->64 conv + BN), 64->3 conv
    assert counts["dncnn"] == (3 * 64 * 9 + 64) + 15 * (64 * 64 * 9 + 2 * 64) + 64 * 3 * 9
    assert counts["dncnn_wide"] == (3 * 128 * 9 + 128) + 15 * (128 * 128 * 9 + 2 * 128) + 128 * 3 * 9
    # MemNet: BN+conv feature extractor, 3 memory blocks of 6 residual blocks (2 BN+conv each) and a
    # 1x1 gate over (6 + i) * 64 channels, BN+conv reconstructor
    resblocks = 3 * 6 * 2 * (2 * 64 + 64 * 64 * 9)
    gates = sum(2 * (6 + i) * 64 + (6 + i) * 64 * 64 for i in (1, 2, 3))
    assert counts["memnet"] == (2 * 3 + 3 * 64 * 9) + resblocks + gates + (2 * 64 + 64 * 3 * 9)


def test_untrained_dncnn_is_identity():
    """Salman et al.'s init zeroes the last conv: the residual starts at 0, D(x) = x."""
    cfg = compose("denoise-baseline", ["dataset=digits", "denoiser.arch.depth=4", "denoiser.arch.channels=8"])
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(instantiate(cfg.denoiser).build()(x), x)


def test_objectives_and_frozen_classifier():
    """stability targets argmax f(x), classification targets y; only the denoiser gets gradients,
    and train() leaves the classifier in eval mode."""
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.Dropout(0.5))
    denoiser = torch.nn.Conv2d(1, 1, 3, padding=1)
    model = DenoisedClassifier(denoiser, classifier).train()
    assert denoiser.training and not classifier.training
    x = torch.rand(8, 1, 8, 8)
    y = torch.arange(8) % 10
    batch = Batch(x, x + 0.1 * torch.randn_like(x), y, 0.1)
    for name in ("stability", "classification"):
        loss, logits = build_objective(name, "denoiser.objective")(model, batch)
        assert logits.shape == (8, 10)
        loss.backward()
    assert denoiser.weight.grad is not None
    assert all(p.grad is None for p in classifier.parameters())
    # stability: CE against the clean prediction, computed by hand
    with torch.no_grad():
        expect = torch.nn.functional.cross_entropy(classifier(denoiser(batch.x_noisy)), classifier(x).argmax(1))
        assert torch.allclose(build_objective("stability", "denoiser.objective")(model, batch)[0], expect)
    with pytest.raises(UserError, match="denoiser.objective=bogus.*classification, mse, stability"):
        build_objective("bogus", "denoiser.objective")


def test_denoiser_trains_as_the_classifiers_front():
    """f(D(x)) in training is a BaseClassifier with D as its `front` (as load_run rebuilds the run),
    on the classifier's own backbone, also under an adaptation's wrapper; the classifier is unchanged
    and stays in eval mode, and only the denoiser's parameters train."""
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.Dropout(0.5))
    base = BaseClassifier(backbone, 8, [0.5], [0.5], in_chans=1)
    wrapped = torch.nn.Sequential(base)              # stands for peft's PeftModel around the classifier
    denoiser = torch.nn.Conv2d(1, 1, 3, padding=1)
    model = DenoisedClassifier(denoiser, wrapped).train()
    trained = model.denoised
    assert isinstance(trained, BaseClassifier) and trained.front is denoiser and trained.backbone is backbone
    assert isinstance(base.front, torch.nn.Identity)
    assert denoiser.training and not backbone.training and not wrapped.training
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"denoiser.weight", "denoiser.bias"}
    x = torch.rand(4, 1, 8, 8)
    model.eval()
    assert torch.equal(model(x), backbone(base.preprocess(denoiser(x)))) and torch.equal(model(x), wrapped(denoiser(x)))
    assert torch.equal(model(x, part="classifier"), wrapped(x))
    assert sorted(OBJECTIVES) == ["denoiser.objective", "train.loss"]
    assert sorted(OBJECTIVES["train.loss"]) == ["ce", "consistency", "macer", "smoothadv"]


# --------------------------------------------------------------------------- sigma -> timestep

def _scheduler(schedule: str):
    diffusers = pytest.importorskip("diffusers", reason="the diffusion extra is not installed")
    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule)


SIGMAS = [0.12, 0.25, 0.5, 1.0]


@pytest.mark.parametrize("sigma", SIGMAS)
def test_timestep_linear_schedule(sigma):
    """DDPM's linear betas (1e-4 .. 0.02): sqrt((1-a)/a) >= 2 sigma  <=>  a <= 1/(1+4 sigma^2), so t*
    is the number of steps with abar above that level; the continuous approximation
    log abar_t ~ -sum beta lands within one step."""
    abar = _scheduler("linear").alphas_cumprod
    t = timestep_for_sigma(abar, sigma)
    level = 1 / (1 + 4 * sigma**2)
    assert t == int((abar.double() > level).sum())
    assert noise_ratio(abar)[t] >= 2 * sigma > noise_ratio(abar)[t - 1]
    b0, b1, T = 1e-4, 0.02, 1000
    # -log(level) = sum_{i<=t} beta_i (first order) = (t+1) b0 + (b1-b0) t (t+1) / (2 (T-1)); solve for t
    a, b, c = (b1 - b0) / (2 * (T - 1)), b0 + (b1 - b0) / (2 * (T - 1)), b0 + math.log(level)
    approx = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    assert abs(t - approx) <= 1.5, (t, approx)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_timestep_cosine_schedule(sigma):
    """Cosine schedule (Nichol & Dhariwal 2021): abar_t = f((t+1)/T)/f(0), f(u) = cos^2((u+s)/(1+s) pi/2),
    inverted in closed form: t* = ceil(T u* - 1), u* = (1+s) 2/pi arccos(sqrt(f(0)/(1+4 sigma^2))) - s."""
    abar = _scheduler("squaredcos_cap_v2").alphas_cumprod
    s, T = 0.008, 1000
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    u = (1 + s) * 2 / math.pi * math.acos(math.sqrt(f0 / (1 + 4 * sigma**2))) - s
    assert timestep_for_sigma(abar, sigma) == math.ceil(T * u - 1)


def test_timestep_sigma_too_large():
    with pytest.raises(UserError, match="sigma=1000"):
        timestep_for_sigma(torch.linspace(0.99, 0.5, 10), 1000)


# --------------------------------------------------------------------------- one-shot step

class StubUNet(torch.nn.Module):
    """Returns the true noise of x_t, given the clean image: (x_t - sqrt(abar) x_0) / sqrt(1 - abar)."""

    def __init__(self, x0_pm1: torch.Tensor, abar: float, channels: int):
        super().__init__()
        self.x0, self.abar, self.channels, self.seen_t = x0_pm1, abar, channels, None

    def forward(self, x_t, t):
        self.seen_t = t
        eps = (x_t - math.sqrt(self.abar) * self.x0) / math.sqrt(1 - self.abar)
        return eps.repeat(1, self.channels // x_t.shape[1], 1, 1)  # 2C channels: learned variance


@pytest.mark.parametrize("channels_factor", [1, 2])
def test_one_shot_recovers_x_with_exact_noise(channels_factor):
    abar_all = torch.linspace(0.9999, 0.01, 1000).cumprod(0).clamp_min(1e-4)
    x = torch.rand(4, 3, 8, 8)
    sigma = 0.3
    t = timestep_for_sigma(abar_all, sigma)
    stub = StubUNet(2 * x - 1, float(abar_all.double()[t]), 3 * channels_factor)
    denoiser = OneShotDiffusion(stub, abar_all, sigma)
    noisy = x + sigma * torch.randn_like(x)
    out = denoiser(noisy)
    assert torch.allclose(out, x, atol=1e-5)
    assert stub.seen_t.tolist() == [t] * 4


def test_one_shot_step_when_sigma_matches_a_timestep():
    """With 2 sigma exactly the ratio of a timestep, x_t = sqrt(abar) x_0 + sqrt(1-abar) eps for the
    very eps that was drawn: a UNet that returns that eps gives back x."""
    abar_all = _scheduler("linear").alphas_cumprod
    t0 = 250
    sigma = float(noise_ratio(abar_all)[t0]) / 2
    x = torch.rand(2, 3, 8, 8)
    eps = torch.randn_like(x)

    class Echo(torch.nn.Module):
        def forward(self, x_t, t):
            assert int(t[0]) == t0
            return eps

    out = OneShotDiffusion(Echo(), abar_all, sigma)(x + sigma * eps)
    assert torch.allclose(out, x, atol=1e-5)


# --------------------------------------------------------------------------- diffusers loading

def test_missing_diffusers_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    cfg = compose("denoise-baseline", ["dataset=digits", "denoiser=ddpm"])
    front = instantiate(cfg.denoiser)
    with pytest.raises(UserError, match=r"pip install -e \.\[diffusion\]"):
        front.build()


def test_image_size_mismatch_names_both():
    class Cfg:
        sample_size, in_channels = 32, 3

    unet = torch.nn.Module()
    unet.config = Cfg
    check_image_size(unet, [3, 32, 32], "m")
    with pytest.raises(UserError, match="3x32x32 images but the dataset's images are 1x8x8"):
        check_image_size(unet, [1, 8, 8], "m")
