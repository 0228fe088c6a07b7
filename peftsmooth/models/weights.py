"""Weights files: read without unpickling arbitrary objects, written atomically; a backbone checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from peftsmooth.errors import UserError
from peftsmooth.runtime import atomic_write


def read_weights_only(path: str | Path):
    """A `.safetensors` file, or whatever `torch.load(weights_only=True)` accepts (tensors, dicts, lists,
    numbers, strings): never arbitrary pickled objects."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal is a user-facing problem
        raise UserError(f"cannot read {path} as a weights-only checkpoint ({type(err).__name__})") from err


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a weights file (a checkpoint's `state_dict` or `model` entry where it has one)."""
    state = read_weights_only(path)
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    return with_metadata(dict(state), state)


def with_metadata(state: dict, source) -> dict:
    """`state` with the `_metadata` (per-module versions) that `source`, a saved state dict, carries:
    modules such as torchvision's MNASNet read their version from it while loading."""
    metadata = getattr(source, "_metadata", None)
    if metadata is None:
        return state
    from collections import OrderedDict

    kept = OrderedDict(state)
    kept._metadata = metadata
    return kept


def save_state_dict_file(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a safetensors file atomically (contiguous, de-aliased tensors)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Load `state` strictly; a key that does not fit is one line naming the first missing or unexpected key."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        first = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise UserError(f"{what} does not fit the model: {first} "
                        f"({len(missing)} missing, {len(unexpected)} unexpected)")
    shapes = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        k = shapes[0]
        raise UserError(f"{what} does not fit the model: {k!r} has shape {tuple(state[k].shape)}, "
                        f"the model's is {tuple(own[k].shape)}")
    module.load_state_dict(state, strict=True)
