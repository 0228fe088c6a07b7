"""SPSA on smooth toy functions: its estimate points along the true gradient, and it minimizes."""

from __future__ import annotations

import pytest
import torch

from peftsmooth.errors import UserError
from peftsmooth.front.spsa import SPSA, SPSAConfig, perturbation, spsa_gradient

DIM = 20


def _toy(theta: torch.Tensor) -> torch.Tensor:
    """A smooth non-quadratic function with a known gradient (via autograd)."""
    w = torch.linspace(0.5, 2.0, theta.numel(), dtype=theta.dtype)
    return (w * theta**2).sum() + torch.sin(theta).sum() + 0.1 * (theta.sum()) ** 2


def _true_grad(theta: torch.Tensor) -> torch.Tensor:
    t = theta.clone().requires_grad_(True)
    _toy(t).backward()
    return t.grad


def _cosine(pairs: int, seed: int = 0) -> float:
    theta = torch.randn(DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g_hat, _ = spsa_gradient(lambda t: float(_toy(t)), theta, c=1e-3, pairs=pairs,
                             generator=torch.Generator().manual_seed(seed))
    return float(torch.nn.functional.cosine_similarity(g_hat, _true_grad(theta), dim=0))


def test_estimate_points_along_true_gradient_and_improves_with_pairs():
    few = sum(_cosine(1, seed) for seed in range(20)) / 20
    many = _cosine(400)
    assert few > 0.05                      # unbiased: positive on average even with one pair
    assert many > 0.9                      # enough pairs: nearly the true direction
    assert many > few


def test_estimate_is_exact_in_one_dimension():
    theta = torch.tensor([0.7], dtype=torch.float64)
    g_hat, _ = spsa_gradient(lambda t: float(_toy(t)), theta, c=1e-4, pairs=1)
    assert torch.allclose(g_hat, _true_grad(theta), rtol=1e-4)


def test_perturbation_entries_are_bounded_away_from_zero():
    d = perturbation(10_000, torch.zeros(1), torch.Generator().manual_seed(0))
    assert d.abs().min() >= 0.5 and d.abs().max() <= 1.0
    assert abs(float((d > 0).float().mean()) - 0.5) < 0.05


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_spsa_minimizes_the_toy_function(momentum):
    theta = torch.full((DIM,), 2.0, dtype=torch.float64)
    start = float(_toy(theta))
    opt = SPSA(SPSAConfig(pairs=4, lr=0.05, lr_decay=0.602, stability=10, c=0.01, c_decay=0.101,
                          momentum=momentum), seed=0)
    for _ in range(300):
        theta, info = opt.step(lambda t: float(_toy(t)), theta)
    assert float(_toy(theta)) < 0.05 * start
    assert opt.k == 300 and opt.evaluations == 300 * 2 * 4
    assert info["c_k"] < 0.01 and info["a_k"] < 0.05


def test_gains_decay():
    opt = SPSA(SPSAConfig(lr=1.0, lr_decay=0.5, stability=0, c=0.1, c_decay=0.5))
    assert opt.gains(1) == (1.0, 0.1)
    assert opt.gains(4) == (0.5, 0.05)


@pytest.mark.parametrize("bad", [dict(c=0), dict(c=-0.1), dict(pairs=0), dict(pairs=1.5), dict(lr=0),
                                 dict(momentum=1.0), dict(momentum=-0.1), dict(lr_decay=-1), dict(c_decay=-1),
                                 dict(c="big"), dict(pairs=None)])
def test_out_of_range_hyperparameters_are_user_errors(bad):
    with pytest.raises(UserError, match="spsa\\."):
        SPSAConfig(**bad)


def test_resumed_spsa_draws_what_the_uninterrupted_run_draws():
    cfg = SPSAConfig(pairs=2, lr=0.05, c=0.01)
    theta0 = torch.full((DIM,), 1.0, dtype=torch.float64)
    whole = SPSA(cfg, seed=3)
    theta = theta0
    for _ in range(6):
        theta, _ = whole.step(lambda t: float(_toy(t)), theta)
    first = SPSA(cfg, seed=3)
    half = theta0
    for _ in range(3):
        half, _ = first.step(lambda t: float(_toy(t)), half)
    resumed = SPSA(cfg, seed=3)
    resumed.load_state_dict(first.state_dict())
    for _ in range(3):
        half, _ = resumed.step(lambda t: float(_toy(t)), half)
    assert torch.equal(half, theta)


def test_batched_evaluation_gives_the_same_estimate():
    theta = torch.randn(DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    one, loss1 = spsa_gradient(lambda t: float(_toy(t)), theta, c=1e-3, pairs=7,
                               generator=torch.Generator().manual_seed(5))
    many, loss2 = spsa_gradient(lambda pts: [float(_toy(p)) for p in pts], theta, c=1e-3, pairs=7,
                                generator=torch.Generator().manual_seed(5), batched=True)
    assert torch.allclose(one, many) and loss1 == pytest.approx(loss2)
