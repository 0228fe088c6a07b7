"""Shared plumbing for every command: device choice, precisions, seed derivation, atomic writes, freezing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import tempfile
import types
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from peftsmooth.errors import UserError

# autocast dtype of each `*.precision` choice (None: plain fp32)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def hash_seed(*parts) -> int:
    """A 63-bit seed from any hashable parts (blake2b of their repr): noise streams, image seeds."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (FNV-1a style; stable across runs and platforms): training epochs,
    evaluation batches, SPSA perturbations."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` on a uniquely named temporary file beside `path`, then rename it over `path`,
    so that a reader (or a resumed run) never sees half a file and two writers never share a temp name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file follows the umask
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """A directory that appears complete or not at all: the block fills a hidden sibling of `out`
    (directory walks such as report's skip hidden names), which is then renamed onto `out` (missing or
    empty); if the block fails, the sibling is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the directory follows the umask
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def freeze(module: nn.Module) -> nn.Module:
    """Stop gradients to every parameter of `module` (the one freeze loop of the package)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """`module` with every submodule in eval mode; each submodule's own flag restored on exit."""
    training = [m for m in module.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield module
    finally:
        for m in training:
            m.training = True


class EvalPinned(nn.Module):
    """Mixin for modules that must never leave eval mode (frozen encoders, sealed backbones): `train()`
    keeps them in eval, so batch-norm statistics and dropout never change under `model.train()`."""

    def train(self, mode: bool = True):
        return super().train(False)


def pin_eval(module: nn.Module) -> nn.Module:
    """Put `module` and every submodule in eval mode for good: later `train()` calls leave them in eval."""
    for sub in module.modules():
        sub.train = types.MethodType(_stay_in_eval, sub)
        nn.Module.train(sub, False)
    return module


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)
