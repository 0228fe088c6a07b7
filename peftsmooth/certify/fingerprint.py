"""A fingerprint of the weights a certification certifies (summary.json `weights_sha256`).

A certificate is about one classifier (validity rule 5). Incremental certification rebuilds its parent's
classifier f from the parent run, so it must be able to tell whether the f it rebuilt is the f that was
certified (not, say, an adapter trained a few epochs more in the same run directory): both
certifications record this fingerprint, and the incremental one compares them.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the state dict in sorted key order: each key, dtype, shape and the tensor's raw bytes.

    Computed once per certification, before the model is prepared (merged, moved): one pass over the
    weights on the CPU: 86 M fp32 parameters (a ViT-B's count, 0.35 GB) hashed in 0.27 s on this
    project's 2-core CPU machine (12 nn.Linear(3072, 2340) layers), next to the hours a certification
    takes; tiny models in tests cost microseconds. The rebuilt parent f is hashed once more."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        value = state[key]
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            tensor = value.detach().to("cpu").contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        else:  # e.g. extra state of a quantized layer
            digest.update(repr(value).encode())
    return digest.hexdigest()
