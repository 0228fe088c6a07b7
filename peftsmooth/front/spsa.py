"""SPSA: gradients from loss values only (Spall 1992), with BlackVIP's gradient correction.

The black-box setting gives us f(x) but not its gradient, so the coordinator's parameters theta
(one flat vector) are trained from loss values alone. One step of SPSA-GC (Oh et al., BlackVIP,
CVPR 2023), with Spall's gain sequences:

    a_k = lr / (k + stability)^lr_decay          c_k = c / k^c_decay               (k = 1, 2, ...)
    look-ahead   phi   = theta_k + momentum * m_k                (Nesterov "gradient correction")
    estimate     g_hat = 1/q sum_i [L(phi + c_k D_i) - L(phi - c_k D_i)] / (2 c_k D_i)
    update       m_{k+1} = momentum * m_k - a_k g_hat,     theta_{k+1} = theta_k + m_{k+1}

with q = `pairs` independent perturbations D_i whose entries are +-U(0.5, 1) (segmented uniform,
as in BlackVIP; the division is element-wise). Each step costs 2q loss evaluations, whatever the
dimension of theta; E[g_hat] = grad L + O(c_k^2), and its direction improves with q.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from peftsmooth.errors import require

LossFn = Callable[[torch.Tensor], float]


@dataclass(frozen=True)
class SPSAConfig:
    """SPSA-GC hyperparameters (names from Spall / BlackVIP); validated on construction."""

    pairs: int = 5            # q: perturbation pairs averaged per step (2q loss evaluations)
    lr: float = 1.0           # a: learning-rate numerator
    lr_decay: float = 0.4     # alpha: a_k = a / (k + stability)^alpha
    stability: float = 1.0    # A: Spall's stability constant in a_k
    c: float = 0.01           # perturbation size numerator
    c_decay: float = 0.1      # gamma: c_k = c / k^gamma
    momentum: float = 0.9     # beta: gradient-correction (Nesterov) momentum, 0 = plain SPSA

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            require(isinstance(value, (int, float)) and not isinstance(value, bool),
                    f"peft.spsa.{key}={value!r} must be a number")
        require(int(self.pairs) == self.pairs and self.pairs >= 1,
                f"peft.spsa.pairs={self.pairs} must be an integer >= 1 (perturbation pairs per step)")
        require(self.lr > 0, f"peft.spsa.lr={self.lr} must be > 0")
        require(self.lr_decay >= 0, f"peft.spsa.lr_decay={self.lr_decay} must be >= 0")
        require(self.stability >= 0, f"peft.spsa.stability={self.stability} must be >= 0")
        require(self.c > 0, f"peft.spsa.c={self.c} must be > 0 (perturbation size)")
        require(self.c_decay >= 0, f"peft.spsa.c_decay={self.c_decay} must be >= 0")
        require(0 <= self.momentum < 1, f"peft.spsa.momentum={self.momentum} must be in [0, 1)")


def perturbation(n: int, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One SPSA direction: entries +-U(0.5, 1), random sign (bounded away from 0, so 1/D is safe)."""
    magnitude = 0.5 + 0.5 * torch.rand(n, generator=generator)
    sign = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    return (magnitude * sign).to(device=like.device, dtype=like.dtype)


def spsa_gradient(loss_fn: LossFn, theta: torch.Tensor, c: float, pairs: int,
                  generator: torch.Generator | None = None, batched: bool = False) -> tuple[torch.Tensor, float]:
    """(g_hat, mean of the 2*pairs loss values) at `theta`, from two-sided perturbations of size c.

    With `batched=True`, `loss_fn` takes all 2*pairs points at once, as a (2*pairs, d) matrix
    (rows: theta + c*D_1, ..., theta + c*D_q, theta - c*D_1, ...), and returns their losses: one
    large query instead of 2q small ones.
    """
    deltas = torch.stack([perturbation(theta.numel(), theta, generator) for _ in range(pairs)])
    points = torch.cat([theta + c * deltas, theta - c * deltas])
    if batched:
        losses = torch.as_tensor(loss_fn(points), dtype=theta.dtype, device=theta.device).reshape(-1)
    else:
        losses = torch.tensor([float(loss_fn(p)) for p in points], dtype=theta.dtype, device=theta.device)
    plus, minus = losses[:pairs], losses[pairs:]
    g_hat = (((plus - minus) / (2 * c)).unsqueeze(1) / deltas).mean(0)
    return g_hat, float(losses.mean())


class SPSA:
    """SPSA-GC on a flat parameter vector; `step(loss_fn, theta)` returns the next theta.

    The perturbations of step k come from a generator seeded with (seed, k), so a run resumed from
    `state_dict()` draws exactly what the uninterrupted run would have drawn.
    """

    def __init__(self, config: SPSAConfig, seed: int = 0):
        self.config = config
        self.seed = int(seed)
        self.k = 0                                   # steps taken
        self.m: torch.Tensor | None = None           # momentum (same shape as theta)
        self.evaluations = 0                         # loss evaluations so far

    def gains(self, k: int) -> tuple[float, float]:
        """(a_k, c_k) for step k >= 1."""
        cfg = self.config
        return cfg.lr / (k + cfg.stability) ** cfg.lr_decay, cfg.c / k ** cfg.c_decay

    def step(self, loss_fn: LossFn, theta: torch.Tensor, batched: bool = False) -> tuple[torch.Tensor, dict]:
        """One SPSA-GC update; also returns the step's mean perturbed loss and its gains.

        `batched`: `loss_fn` evaluates a (2*pairs, d) matrix of points at once (see spsa_gradient).
        """
        self.k += 1
        a_k, c_k = self.gains(self.k)
        if self.m is None:
            self.m = torch.zeros_like(theta)
        beta = self.config.momentum
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.k) % 2**63)
        g_hat, loss = spsa_gradient(loss_fn, theta + beta * self.m, c_k, self.config.pairs, generator, batched)
        self.m = beta * self.m - a_k * g_hat
        self.evaluations += 2 * self.config.pairs
        return theta + self.m, {"loss": loss, "a_k": a_k, "c_k": c_k, "grad_norm": float(g_hat.norm())}

    def state_dict(self) -> dict:
        return {"k": self.k, "m": self.m, "evaluations": self.evaluations}

    def load_state_dict(self, state: dict) -> None:
        self.k, self.evaluations = int(state["k"]), int(state["evaluations"])
        self.m = None if state["m"] is None else state["m"].clone()
