"""Robust training objectives on the soft smoothed classifier: MACER and SmoothAdv (`train.loss`).

Both look at the *smoothed* classifier through k (m) noisy copies of every image, drawn from torch's
global stream (seeded per epoch by the training loop, so a resumed run draws the same noise), and
follow the authors' released code, whose formulas and normalisation are reproduced here:

- `Macer` (Zhai et al., ICLR 2020, "MACER: Attack-free and Scalable Robust Training via Maximizing
  Certified Radius"): cross-entropy of the mean softmax, plus a hinge on a differentiable surrogate of
  the certified radius. Attack-free: one forward pass of k copies.
- `SmoothAdv` (Salman et al., NeurIPS 2019, "Provably Robust Deep Learning via Adversarially Trained
  Smoothed Classifiers"): L2 PGD against the soft smoothed classifier (`smooth_pgd`), then
  cross-entropy on all m noisy copies of the adversarial image ("multi-noise" training).

An objective that follows a schedule reads `batch.progress` (peftsmooth.train.losses.Progress: the global
optimizer step, restored on resume), e.g. SmoothAdv's epsilon warm-up.

Where we differ from the authors' code, and why:
- Copies are laid out copy-major (k blocks of n images), theirs image-major: the same sums.
- MACER drops the images left out of the hinge with masks instead of boolean indexing (no host
  sync), with stand-in probabilities so their inf margin puts no nan into the gradient; the kept
  set and the value are theirs.
- SmoothAdv's zero-gradient fallback draws its normal direction every step (used only where the
  gradient is 0), so the stream's use does not depend on the data; the projection onto the ball is
  exact (torch.renorm's leaves norms 1e-7 relative short); the attack's loss is a sum over images,
  not a mean (the step normalises each image's gradient, so only fp16 underflow can tell).
- SmoothAdv's epsilon warm-up is per optimizer step, theirs per epoch (equal at each epoch's end);
  their training script cuts each loader batch into m mini-batches of n/m images and steps the
  optimizer on each, we take one step on the whole batch.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftsmooth.errors import require
from peftsmooth.train.batch import Batch, Progress


def number_option(loss: str, key: str, value, minimum: float, *, integer: bool = False,
                  strict: bool = False) -> float | int:
    """train.<loss>.<key> as a finite number >= minimum (> with strict), else a one-line UserError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    ok = ok and (value > minimum if strict else value >= minimum)
    kind = "an integer" if integer else "a number"
    require(ok, f"train.{loss}.{key}={value} must be {kind} {'>' if strict else '>='} {minimum:g}")
    return int(value) if integer else float(value)


def normal_icdf(p: torch.Tensor) -> torch.Tensor:
    """Phi^-1(p) as the MACER code computes it (torch Normal(0, 1).icdf: sqrt(2) erfinv(2p - 1)): a
    probability within float32 rounding of 0 or 1 gives -inf / inf."""
    return math.sqrt(2.0) * torch.erfinv(2 * p - 1)


# --------------------------------------------------------------------------- MACER

class MacerTerms(NamedTuple):
    """The parts of the MACER loss of one batch (sums over the batch, as in the authors' code)."""

    probs: torch.Tensor   # (n, classes): the soft smoothed classifier, mean over copies of softmax(logits)
    ce: torch.Tensor      # sum over images of -log(probs[y] + 1e-10)
    hinge: torch.Tensor   # sigma/2 * sum over contributing images of (gamma - margin)
    keep: torch.Tensor    # (n,) bool: the images that contribute to the hinge


def macer_terms(logits: torch.Tensor, y: torch.Tensor, sigma: float, beta: float, gamma: float) -> MacerTerms:
    """MACER's terms from `logits` (k, n, classes) of k noisy copies of n images.

    With q = mean over copies of softmax(beta * logits), its top two p_A >= p_B and
    margin = Phi^-1(p_A) - Phi^-1(p_B) (the certified radius is sigma/2 * margin), an image contributes
    gamma - margin when q's top class is its label, the margin is finite and margin <= gamma (the
    hinge max(gamma - margin, 0) of the paper; an infinite margin, p_A or p_B rounded to 1 or 0, drops
    out as in the code). The dropped images get safe stand-in probabilities so no inf/nan reaches the
    gradient.
    """
    probs = logits.softmax(-1).mean(0)
    ce = F.nll_loss(torch.log(probs + 1e-10), y, reduction="sum")
    top, index = (beta * logits).softmax(-1).mean(0).topk(2, dim=1)
    with torch.no_grad():
        margin = normal_icdf(top[:, 0]) - normal_icdf(top[:, 1])
        keep = (index[:, 0] == y) & torch.isfinite(margin) & (margin <= gamma)
    half = torch.full_like(top[:, 0], 0.5)
    p_a, p_b = torch.where(keep, top[:, 0], half), torch.where(keep, top[:, 1], half)
    hinge = torch.where(keep, gamma - (normal_icdf(p_a) - normal_icdf(p_b)), torch.zeros_like(half))
    return MacerTerms(probs, ce, hinge.sum() * sigma / 2, keep)


class Macer:
    """MACER (Zhai et al. 2020): (CE + lbd * hinge) / n over k noisy copies of each of n images.

    CE is the cross-entropy of the soft smoothed classifier (the mean over copies of softmax(logits));
    the hinge pushes the certified-radius surrogate sigma/2 * (Phi^-1(p_A) - Phi^-1(p_B)) of the
    correctly classified images up to sigma/2 * gamma, with p_A, p_B from softmax(beta * logits)
    (see `macer_terms`). Both are sums over the batch divided by its size, as in the authors' code.
    Defaults: the paper's CIFAR-10 setting k=16, lbd=12 (sigma 0.25 and 0.5; the paper uses lbd=4 for
    sigma=1.0), beta=16, gamma=8. The k copies are x_noisy and k - 1 fresh draws, in one forward pass
    of k * n images; the logits returned (train accuracy) are those of x_noisy.
    """

    def __init__(self, k: int = 16, lbd: float = 12.0, beta: float = 16.0, gamma: float = 8.0):
        self.k = number_option("macer", "k", k, 1, integer=True)
        self.lbd = number_option("macer", "lbd", lbd, 0)
        self.beta = number_option("macer", "beta", beta, 0, strict=True)
        self.gamma = number_option("macer", "gamma", gamma, 0, strict=True)

    def __call__(self, model, batch: "Batch"):
        n = len(batch.y)
        copies = [batch.x_noisy] + [batch.noisy() for _ in range(self.k - 1)]
        logits = model(torch.cat(copies)).float().view(self.k, n, -1)
        terms = macer_terms(logits, batch.y, batch.sigma, self.beta, self.gamma)
        return (terms.ce + self.lbd * terms.hinge) / n, logits[0]


# --------------------------------------------------------------------------- SmoothAdv

def smoothed_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the soft smoothed classifier, summed over images: logits (m, n, classes), the
    mean over the m copies of softmax, its log clamped at 1e-20 (the SmoothAdv code's 'safe softmax')."""
    probs = logits.softmax(-1).mean(0)
    return F.nll_loss(torch.log(probs.clamp_min(1e-20)), y, reduction="sum")


def project_l2(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Each image's delta scaled onto the L2 ball of radius epsilon when it lies outside."""
    norms = delta.flatten(1).norm(dim=1).view(-1, *[1] * (delta.dim() - 1))
    return delta * (epsilon / norms.clamp_min(1e-30)).clamp(max=1.0)


def pgd_step(x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, step_size: float,
             epsilon: float) -> torch.Tensor:
    """One L2 PGD ascent step: delta + step_size * grad / ||grad|| (per image; a zero gradient is
    replaced by a standard normal direction, as in the SmoothAdv code), x + delta clipped to the
    pixel range [0, 1], then projected onto the epsilon ball."""
    norms = grad.flatten(1).norm(dim=1).view(-1, *[1] * (grad.dim() - 1))
    direction = torch.where(norms > 0, grad / norms.clamp_min(1e-30), torch.randn_like(grad))
    delta = (x + delta + step_size * direction).clamp(0, 1) - x
    return project_l2(delta, epsilon)


@contextmanager
def eval_mode(module: nn.Module):
    """`module` in eval mode for the block, then every submodule's own mode back (modes set one by one,
    so modules pinned in eval or frozen in eval by a method stay as they were)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def smooth_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, epsilon: float,
               steps: int) -> torch.Tensor:
    """SmoothAdv-PGD: x + delta, ||delta||_2 <= epsilon, that raises the smoothed cross-entropy.

    `noise` (m, n, ...) is sigma * N(0, I), the same m draws at every step; each step ascends
    `smoothed_ce` of the logits of x + delta + noise_i by `pgd_step` with step size 2 * epsilon / steps
    (the code's rule). The model runs in eval mode, and the gradient is taken with respect to delta
    only: the parameters get none. Returns the adversarial images, detached.
    """
    if epsilon <= 0:
        return x.detach()
    x, m, n = x.detach(), noise.shape[0], len(y)
    delta = torch.zeros_like(x)
    with eval_mode(model):
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = model(((x + delta).unsqueeze(0) + noise).flatten(0, 1)).float()
            (grad,) = torch.autograd.grad(smoothed_ce(logits.view(m, n, -1), y), delta)
            delta = pgd_step(x, delta.detach(), grad, 2 * epsilon / steps, epsilon)
    return (x + delta).detach()


def warmup_epsilon(epsilon: float, warmup_epochs: float, progress: "Progress") -> float:
    """epsilon ramped linearly over the first `warmup_epochs`, per optimizer step: at step s (0-based)
    epsilon * min(1, (s + 1) / (warmup_epochs * steps_per_epoch)); the code's per-epoch rule
    min(1, (epoch + 1) / warmup) is this at each epoch's last step."""
    if warmup_epochs <= 0:
        return epsilon
    return epsilon * min(1.0, (progress.step + 1) / (warmup_epochs * progress.steps_per_epoch))


class SmoothAdv:
    """SmoothAdv-PGD with multi-noise training (Salman et al. 2019).

    Draws m noise vectors per image, attacks the soft smoothed classifier with `smooth_pgd` (on the
    module inside DistributedDataParallel, so the attack adds no gradient all-reduce), then returns the
    cross-entropy averaged over the m noisy copies of the adversarial image (the same noise as the
    attack). epsilon warms up over `warmup_epochs` (`warmup_epsilon`).

    Defaults (m=8, epsilon=1.0, num_steps=2): the authors' released CIFAR-10 model that is best at
    radius 0.625 for sigma=0.25 (2 PGD steps, m_train=8, epsilon=255/256). warmup_epochs=1: the paper
    ramps epsilon over the first 10 of 150 epochs; ours ramps per step over the first epoch.
    """

    def __init__(self, m: int = 8, epsilon: float = 1.0, num_steps: int = 2, warmup_epochs: float = 1.0):
        self.m = number_option("smoothadv", "m", m, 1, integer=True)
        self.epsilon = number_option("smoothadv", "epsilon", epsilon, 0)
        self.num_steps = number_option("smoothadv", "num_steps", num_steps, 1, integer=True)
        self.warmup_epochs = number_option("smoothadv", "warmup_epochs", warmup_epochs, 0)

    def __call__(self, model, batch: "Batch"):
        x, n = batch.x, len(batch.y)
        noise = batch.sigma * torch.randn((self.m, *x.shape), dtype=x.dtype, device=x.device)
        epsilon = warmup_epsilon(self.epsilon, self.warmup_epochs, batch.progress)
        inner = model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model
        adversarial = smooth_pgd(inner, x, batch.y, noise, epsilon, self.num_steps)
        logits = model((adversarial.unsqueeze(0) + noise).flatten(0, 1)).float()
        return F.cross_entropy(logits, batch.y.repeat(self.m)), logits[:n]
