"""Training objectives, the protocol every objective follows, and the one registry of them.

An objective is a callable `(model, batch) -> (loss, logits or None)`; `batch` is a `Batch` (clean x,
one noisy copy x_noisy, labels y, sigma, `noisy()` for more copies, and `progress`: where training
stands, for objectives with a schedule). Two config keys choose one by
name through `OBJECTIVES`: `train.loss` (the noisy classifier, options in `train.<loss>`) and
`denoiser.objective` (a denoiser in front of a frozen classifier, trained by denoise-baseline: the
model is a `peftsmooth.front.denoisers.DenoisedClassifier`). Unknown names list the known ones.
The robust objectives on the smoothed classifier (MACER, SmoothAdv) are in peftsmooth.train.robust_losses.
Extra noisy copies come from torch's global stream, which the training loop seeds every epoch, so a
resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftsmooth.errors import choice_error, require
from peftsmooth.runs import to_plain
from peftsmooth.train.batch import Batch, Progress, add_noise  # noqa: F401 (re-exported)
from peftsmooth.train.robust_losses import Macer, SmoothAdv

Objective = Callable[[nn.Module, Batch], "tuple[torch.Tensor, Optional[torch.Tensor]]"]


class CrossEntropy:
    """Gaussian data augmentation (Cohen et al. 2019): cross-entropy on x + sigma * N(0, I)."""

    def __init__(self, label_smoothing: float = 0.0):
        require(0 <= label_smoothing < 1, f"train.label_smoothing={label_smoothing} must be in [0, 1)")
        self.label_smoothing = float(label_smoothing)

    def __call__(self, model, batch):
        logits = model(batch.x_noisy)
        return F.cross_entropy(logits.float(), batch.y, label_smoothing=self.label_smoothing), logits


class Consistency:
    """Consistency regularization (Jeong & Shin, NeurIPS 2020).

    With m noisy copies x_i = x + sigma * N(0, I) and their softmax outputs p_i, p_bar = mean_i p_i:
        L = 1/m sum_i CE(f(x_i), y) + lambda * 1/m sum_i KL(p_bar || p_i) + eta * H(p_bar)
    Defaults m=2, lambda=10, eta=0.5 (the paper's CIFAR-10 setting for sigma=0.5 uses lambda in {10, 20}).
    """

    def __init__(self, m: int = 2, lbd: float = 10.0, eta: float = 0.5):
        require(int(m) == m and m >= 2, f"train.consistency.m={m} must be an integer >= 2 (noisy copies)")
        require(lbd >= 0, f"train.consistency.lbd={lbd} must be >= 0")
        require(eta >= 0, f"train.consistency.eta={eta} must be >= 0")
        self.m, self.lbd, self.eta = int(m), float(lbd), float(eta)

    def __call__(self, model, batch):
        copies = [batch.x_noisy] + [batch.noisy() for _ in range(self.m - 1)]
        logits = model(torch.cat(copies)).float()
        y = batch.y.repeat(self.m)
        ce = F.cross_entropy(logits, y)
        log_p = F.log_softmax(logits, dim=1).view(self.m, len(batch.y), -1)
        p_bar = log_p.exp().mean(0)
        log_p_bar = torch.log(p_bar.clamp_min(1e-12))
        kl = (p_bar.unsqueeze(0) * (log_p_bar.unsqueeze(0) - log_p)).sum(-1).mean()
        entropy = -(p_bar * log_p_bar).sum(-1).mean()
        return ce + self.lbd * kl + self.eta * entropy, logits[: len(batch.y)]


# --------------------------------------------------------------------------- denoiser objectives
# The classifier is frozen and only the denoiser learns; `model(x, part=...)` runs f(D(x)) ("all"),
# D(x) ("denoiser") or the classifier without the denoiser ("classifier").

class DenoiserMSE:
    """||D(x + noise) - x||^2 (mean over pixels): the classifier plays no part."""

    def __call__(self, model, batch):
        return F.mse_loss(model(batch.x_noisy, part="denoiser").float(), batch.x), None


class Stability:
    """CE(f(D(x + noise)), argmax f(x)): the denoised input should keep the classifier's clean
    prediction (needs no labels, so it works for any off-the-shelf classifier)."""

    def __call__(self, model, batch):
        with torch.no_grad():
            target = model(batch.x, part="classifier").argmax(1)
        logits = model(batch.x_noisy)
        return F.cross_entropy(logits.float(), target), logits


class Classification:
    """CE(f(D(x + noise)), y): the denoised input should be classified as its label."""

    def __call__(self, model, batch):
        logits = model(batch.x_noisy)
        return F.cross_entropy(logits.float(), batch.y), logits


# --------------------------------------------------------------------------- the registry

# Every objective, by the config key that chooses it, then by name: a class built with the options.
OBJECTIVES: dict[str, dict[str, Callable[..., Objective]]] = {
    "train.loss": {"ce": CrossEntropy, "consistency": Consistency, "macer": Macer, "smoothadv": SmoothAdv},
    "denoiser.objective": {"mse": DenoiserMSE, "stability": Stability, "classification": Classification},
}


def build_objective(name: str, key: str = "train.loss", **options) -> Objective:
    """The objective `name` among those `key` chooses from, built with its options."""
    choices = OBJECTIVES[key]
    if name not in choices:
        raise choice_error(key, name, choices)
    return choices[name](**options)


def objective_from_cfg(train_cfg: Any) -> tuple[str, Objective]:
    """(`train.loss`, that objective built with the options of `train.<loss>`)."""
    name = str(train_cfg.get("loss", "ce"))
    return name, build_objective(name, **dict(to_plain(train_cfg.get(name)) or {}))
