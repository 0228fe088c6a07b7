"""Device choice and seeding, shared by every command."""

from __future__ import annotations

import random

import numpy as np
import torch

from peftsmooth.errors import UserError


def resolve_device(name: str | None = "auto") -> torch.device:
    """`auto` -> the first CUDA GPU if there is one, else the CPU; otherwise the named device."""
    name = str(name or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"device={name} is not a torch device (use auto, cpu, cuda or cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA GPU is available (use device=auto or device=cpu)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
