"""MACER and SmoothAdv (peftsmooth.train.robust_losses): hand-computed terms, the PGD step, projection and
warm-up, no parameter gradient from the attack, option checks, and training / exact resume on digits."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TINY, compose, kill_after_epoch
from torch.utils.data import TensorDataset

from peftsmooth.commands.train import check_train, run_train
from peftsmooth.errors import UserError
from peftsmooth.runs import read_run_info
from peftsmooth.train import state as train_state
from peftsmooth.train import watch as train_watch
from peftsmooth.train.loop import TrainSettings, fit, read_metrics
from peftsmooth.train.losses import OBJECTIVES, Batch, Progress, build_objective
from peftsmooth.train.robust_losses import (
    Macer,
    SmoothAdv,
    macer_terms,
    pgd_step,
    project_l2,
    smooth_pgd,
    smoothed_ce,
    warmup_epsilon,
)

# Three images, two noisy copies each, three classes: logits[copy][image].
LOGITS = torch.tensor([[[2.0, 0, 0], [1, 0, 0], [3, 0, 0]],
                       [[1, 0.5, 0], [0, 1, 2], [3, 0, 0]]])
LABELS = torch.tensor([0, 1, 0])


def _softmax(v, beta=1.0):
    e = [math.exp(beta * t) for t in v]
    return [t / sum(e) for t in e]


def _mean_softmax(image, beta=1.0):
    copies = [_softmax(LOGITS[c, image].tolist(), beta) for c in range(LOGITS.shape[0])]
    return [sum(col) / len(copies) for col in zip(*copies)]


def test_macer_terms_match_a_hand_computation():
    sigma, beta, gamma = 0.5, 2.0, 3.0
    terms = macer_terms(LOGITS, LABELS, sigma, beta, gamma)
    probs = [_mean_softmax(i) for i in range(3)]
    assert torch.allclose(terms.probs, torch.tensor(probs), atol=1e-6)
    assert [round(p, 4) for p in probs[0]] == [0.6467, 0.2069, 0.1464]
    ce = sum(-math.log(probs[i][int(LABELS[i])] + 1e-10) for i in range(3))
    assert math.isclose(float(terms.ce), ce, rel_tol=1e-6)
    # beta-softmax means: image 0 right with margin 2.017 < gamma; image 1's top class is 2, not its
    # label 1; image 2 right but its margin 5.39 is beyond gamma: only image 0 contributes.
    icdf = NormalDist().inv_cdf
    q = _mean_softmax(0, beta)
    margin = icdf(q[0]) - icdf(sorted(q)[1])
    assert round(margin, 3) == 2.017
    assert terms.keep.tolist() == [True, False, False]
    assert math.isclose(float(terms.hinge), sigma / 2 * (gamma - margin), rel_tol=1e-5)


class _FixedNoiseBatch(Batch):
    """A batch whose extra noisy copies are given (the fixed noise generator of the tests)."""

    def __init__(self, x, copies, y, sigma):
        super().__init__(x, copies[0], y, sigma)
        self.rest = list(copies[1:])

    def noisy(self):
        return self.rest.pop(0)


def test_macer_objective_on_a_hand_set_linear_model():
    """Copies chosen so that a fixed linear model gives LOGITS: the loss is (CE + lbd * hinge) / n."""
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    batch = _FixedNoiseBatch(torch.zeros(3, 3), [LOGITS[0], LOGITS[1]], LABELS, 0.5)
    loss, logits = Macer(k=2, lbd=4.0, beta=2.0, gamma=3.0)(model, batch)
    terms = macer_terms(LOGITS, LABELS, 0.5, 2.0, 3.0)
    assert torch.allclose(loss, (terms.ce + 4.0 * terms.hinge) / 3)
    assert torch.equal(logits, LOGITS[0])  # the train accuracy looks at x_noisy's copy


def test_macer_drops_an_infinite_margin_and_keeps_the_gradient_finite():
    logits = torch.tensor([[[100.0, 0, 0], [1, 0, 0]], [[100, 0, 0], [0.5, 0, 0]]], requires_grad=True)
    terms = macer_terms(logits, torch.tensor([0, 0]), 0.25, 16.0, 1e9)
    assert terms.keep.tolist() == [False, True]  # p_A rounds to 1 in float32: Phi^-1 = inf, left out
    (terms.ce + terms.hinge).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[:, 1].abs().sum() > 0


def test_pgd_step_goes_along_the_normalised_gradient_and_projects():
    x, grad = torch.full((2, 1, 4, 4), 0.5), torch.randn(2, 1, 4, 4)
    delta = pgd_step(x, torch.zeros_like(x), grad, 0.1, 1.0)
    unit = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(delta, 0.1 * unit, atol=1e-7)
    big = pgd_step(x, torch.zeros_like(x), grad, 5.0, 0.3)  # x + delta leaves [0, 1]: clipped, then projected
    assert ((x + big) >= 0).all() and ((x + big) <= 1).all()
    assert (big.flatten(1).norm(dim=1) <= 0.3 * (1 + 1e-6)).all()


def test_projection_onto_the_epsilon_ball():
    delta = torch.randn(5, 3, 8, 8) * 10
    delta[0] *= 1e-4  # already inside: unchanged
    projected = project_l2(delta, 0.5)
    norms = projected.flatten(1).norm(dim=1)
    assert torch.equal(projected[0], delta[0])
    assert torch.allclose(norms[1:], torch.full((4,), 0.5), rtol=1e-6) and (norms <= 0.5 * (1 + 1e-6)).all()
    unit = lambda d: d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # noqa: E731
    assert torch.allclose(unit(projected[1:]), unit(delta[1:]))  # the direction is kept


class _ModeRecorder(nn.Module):
    """A linear classifier on 4x4 images that records its mode at every forward pass."""

    def __init__(self):
        super().__init__()
        self.linear, self.frozen = nn.Linear(16, 3), nn.Dropout(0.5)
        self.frozen.eval()  # a submodule a method keeps in eval: it must stay so
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.linear(x.flatten(1))


def test_one_step_attack_is_epsilon_along_the_smoothed_ce_gradient_and_leaves_parameters_alone():
    torch.manual_seed(3)
    model = _ModeRecorder().train()
    model.frozen.eval()
    x, y = torch.full((4, 1, 4, 4), 0.5), torch.tensor([0, 1, 2, 0])
    noise = 0.1 * torch.randn(3, 4, 1, 4, 4)
    xd = x.clone().requires_grad_(True)
    ce = smoothed_ce(model((xd.unsqueeze(0) + noise).flatten(0, 1)).view(3, 4, -1), y)
    (grad,) = torch.autograd.grad(ce, xd)
    model.modes.clear()
    adversarial = smooth_pgd(model, x, y, noise, epsilon=0.05, steps=1)
    delta = adversarial - x  # step 2 * eps along the unit gradient, projected back to norm eps
    unit = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(delta, 0.05 * unit, atol=1e-6)
    assert model.modes == [False]                       # the attack ran in eval mode
    assert model.training and not model.frozen.training  # and every module's mode came back
    assert all(p.grad is None for p in model.parameters()) and not adversarial.requires_grad


def test_attack_on_a_flat_model_takes_a_random_direction_within_the_ball():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    nn.init.zeros_(model[1].weight)  # zero input gradient everywhere
    x = torch.full((2, 1, 4, 4), 0.5)
    adversarial = smooth_pgd(model, x, torch.tensor([0, 1]), torch.zeros(2, 2, 1, 4, 4), 0.2, 2)
    norms = (adversarial - x).flatten(1).norm(dim=1)
    assert torch.isfinite(adversarial).all() and (norms > 0).all() and (norms <= 0.2 * (1 + 1e-6)).all()


def test_epsilon_warms_up_per_optimizer_step():
    eps = [warmup_epsilon(1.0, 2, Progress(s, 4)) for s in range(10)]
    assert eps == pytest.approx([1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8, 1, 1, 1])
    assert warmup_epsilon(0.5, 0, Progress(0, 4)) == 0.5
    assert Progress(3, 4).epochs == 1.0


def test_smoothadv_without_attack_is_ce_over_m_noisy_copies():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(1)
    loss, logits = SmoothAdv(m=3, epsilon=0.0)(model, Batch(x, x, y, 0.25))
    torch.manual_seed(1)
    copies = (x.unsqueeze(0) + 0.25 * torch.randn(3, *x.shape)).flatten(0, 1)
    assert torch.allclose(loss, F.cross_entropy(model(copies), y.repeat(3)))
    assert logits.shape == (4, 3)


@pytest.mark.parametrize("name, options, key", [
    ("macer", {"k": 0}, "train.macer.k=0"),
    ("macer", {"k": 2.5}, "train.macer.k=2.5"),
    ("macer", {"lbd": "x"}, "train.macer.lbd=x"),
    ("macer", {"beta": 0}, "train.macer.beta=0"),
    ("macer", {"gamma": -1}, "train.macer.gamma=-1"),
    ("smoothadv", {"m": 0}, "train.smoothadv.m=0"),
    ("smoothadv", {"epsilon": -0.1}, "train.smoothadv.epsilon=-0.1"),
    ("smoothadv", {"num_steps": 0}, "train.smoothadv.num_steps=0"),
    ("smoothadv", {"warmup_epochs": float("nan")}, "train.smoothadv.warmup_epochs=nan"),
])
def test_bad_options_are_one_line_user_errors(name, options, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        build_objective(name, **options)


def test_the_train_command_checks_the_options_before_any_work():
    assert {"macer", "smoothadv"} <= set(OBJECTIVES["train.loss"])
    with pytest.raises(UserError, match=r"train\.smoothadv\.num_steps=0"):
        check_train(compose("train", [*TINY, "train.loss=smoothadv", "train.smoothadv.num_steps=0"]))


def test_an_unused_losses_options_do_not_block_a_resume():
    options = {"macer": {"k": 16}, "smoothadv": {"m": 8}, "consistency": {"m": 2}}
    ce = train_state.resume_fingerprint({"train": {"loss": "ce", **options}})
    macer = train_state.resume_fingerprint({"train": {"loss": "macer", **options}})
    assert "macer" not in ce["train"] and "smoothadv" not in ce["train"]  # as in checkpoints made before them
    assert "macer" in macer["train"] and "smoothadv" not in macer["train"] and "consistency" in macer["train"]


# --------------------------------------------------------------------------- training

OPTIONS = {"macer": {"k": 3}, "smoothadv": {"m": 2, "warmup_epochs": 2}}


@pytest.fixture
def no_plot(monkeypatch):
    """training.png is another test's business; drawing it costs more than these runs."""
    monkeypatch.setattr(train_watch, "plot_training", lambda history, path: None)


def _digits(n: int = 64) -> TensorDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return TensorDataset(torch.tensor(bunch.images[:n] / 16.0, dtype=torch.float32).unsqueeze(1),
                         torch.tensor(bunch.target[:n]))


def _fit(run_dir, loss):
    run_dir.mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    settings = TrainSettings(epochs=2, batch_size=16, max_steps_per_epoch=2, warmup_epochs=0.5)
    fit(model, _digits(), sigma=0.25, settings=settings, run_dir=run_dir, evaluate=None, progress=False,
        objective=build_objective(loss, **OPTIONS[loss]), config={"loss": loss})
    return [{k: v for k, v in m.items() if k != "time"} for m in read_metrics(run_dir)], model[1].weight.detach()


@pytest.mark.parametrize("loss", ["macer", "smoothadv"])
def test_killed_and_resumed_fit_matches_the_uninterrupted_one(loss, tmp_path, no_plot):
    """SmoothAdv's epsilon still ramps in epoch 2 (warm-up over 2 epochs): the resumed run must see
    the global step, not a restarted one; both draw their noisy copies from the seeded stream."""
    whole, weight = _fit(tmp_path / "whole", loss)
    kill_after_epoch(1, _fit, tmp_path / "split", loss)
    resumed, resumed_weight = _fit(tmp_path / "split", loss)
    assert resumed == whole and [m["step"] for m in whole] == [2, 4]
    assert torch.equal(resumed_weight, weight)


@pytest.mark.parametrize("loss, peft", [("macer", "full"), ("smoothadv", "linear")])
def test_the_train_command_trains_full_and_linear_in_bf16(loss, peft, tmp_path, no_plot):
    options = [f"train.{loss}.{k}={v}" for k, v in OPTIONS[loss].items()]
    cfg = compose("train", [*TINY, "sigma=0.25", f"peft={peft}", f"train.loss={loss}", *options, "train.epochs=1",
                            "train.batch_size=16", "train.max_steps_per_epoch=2", "train.max_eval=16",
                            "train.eval_batch_size=16", "train.num_workers=0", "train.precision=bf16"],
                  run_dir=tmp_path)
    out = run_train(cfg)
    assert out["epoch"] == 1 and math.isfinite(out["loss"]) and 0 <= out["noisy_acc"] <= 1
    assert read_run_info(tmp_path)["loss"] == loss
