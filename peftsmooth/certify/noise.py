"""The seeded noise of certification: sigma * N(0, I) in blocks, a function of (seed, phase, block) only.

Block k of phase p of an image seeded with s comes from a generator seeded with `block_seed(s, p, k)`,
so the noise an image sees never depends on the batch size, on packing images into one batch, on
out-of-memory retries, sharding or resuming (validity rule 7 in docs/architecture.md).

The blocks of one image are distinct by construction, on every device. The CPU generator (mt19937)
keeps only the low 32 bits of its seed; CUDA's Philox keeps all 64. So the low 32 bits of the block
seeds of one image are made distinct: they are base + mix32(phase * 2^30 + k) mod 2^32, where base
comes from the image's seed and mix32 is a bijection of 32-bit integers (MurmurHash3's finalizer).
Different (phase, block) pairs of one image therefore seed different generator states: no noise row
is ever repeated within an image, and its selection and estimation samples never share a block.
(Before `NOISE_SCHEME` "blocks-v2", block seeds were hashed to 63 bits; two blocks of one image
shared their low 32 bits with probability about 2^-32 per pair, and then repeated 128 noise rows on
the CPU.)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from peftsmooth.runtime import hash_seed

NOISE_BLOCK = 128  # samples per independently seeded noise block
NOISE_SCHEME = "blocks-v2"  # recorded in every certification's identity: a resume never mixes schemes
SELECTION, ESTIMATION, PREDICTION = "selection", "estimation", "predict"
# incremental certification's disagreement samples (f and f' on one noisy input): a phase no certificate
# of a parent model uses (peftsmooth.certify.incremental)
DISAGREEMENT = "disagreement"
PHASE_INDEX = {SELECTION: 0, ESTIMATION: 1, PREDICTION: 2, DISAGREEMENT: 3}  # at most 4: phase << 30 < 2^32
BLOCK_BITS = 30  # blocks per phase: 2^30 blocks of 128 samples, far beyond any n
_MASK32 = 0xFFFFFFFF


def image_seed(seed: int, idx: int) -> int:
    """The seed of image `idx` in a run seeded with `seed` (validity rule 7: noise depends only on (seed, idx))."""
    return hash_seed("image", int(seed), int(idx))


def preflight_stream(seed: int, idx: int, shape: Sequence[int], sigma: float, device) -> "NoiseStream":
    """The preflight check's noise for image `idx`: a seed of its own (the four phases are taken), so no
    certificate reads it; the check certifies nothing, it only warns or refuses before any sampling."""
    return NoiseStream(hash_seed("preflight", image_seed(seed, idx)), SELECTION, shape, sigma, device)


def mix32(value: int) -> int:
    """MurmurHash3's 32-bit finalizer: a bijection of [0, 2^32) that scatters consecutive integers."""
    value &= _MASK32
    value ^= value >> 16
    value = (value * 0x85EBCA6B) & _MASK32
    value ^= value >> 13
    value = (value * 0xC2B2AE35) & _MASK32
    return value ^ (value >> 16)


def block_seed(seed: int, phase: str, block: int) -> int:
    """The generator seed of block `block` of `phase` for an image seeded with `seed` (< 2^63).

    For one seed, distinct (phase, block) pairs get distinct low 32 bits: the bits every device's
    generator uses."""
    if not 0 <= block < 1 << BLOCK_BITS:
        raise ValueError(f"noise block {block} out of range [0, 2^{BLOCK_BITS})")
    base = hash_seed("noise", int(seed))
    low = (base + mix32((PHASE_INDEX[phase] << BLOCK_BITS) + block)) & _MASK32
    return (base >> 32) << 32 | low


class NoiseStream:
    """sigma * N(0, I) samples of one shape for one (seed, phase), drawn block by block on `device`."""

    def __init__(self, seed: int, phase: str, shape: Sequence[int], sigma: float, device: torch.device):
        if phase not in PHASE_INDEX:
            raise ValueError(f"phase={phase!r} is not one of {', '.join(PHASE_INDEX)}")
        self.seed, self.phase, self.shape = int(seed), phase, tuple(shape)
        self.sigma, self.device = float(sigma), torch.device(device)
        self._generator = torch.Generator(device=self.device)
        self._block = 0
        self._buffer: torch.Tensor | None = None  # drawn but not yet handed out

    def _next_block(self) -> torch.Tensor:
        self._generator.manual_seed(block_seed(self.seed, self.phase, self._block))
        self._block += 1
        noise = torch.randn((NOISE_BLOCK, *self.shape), generator=self._generator, device=self.device)
        return noise.mul_(self.sigma)

    def take(self, m: int) -> torch.Tensor:
        """The next m samples of the stream, shape (m, *shape)."""
        parts, have = [], 0
        if self._buffer is not None:
            parts, have, self._buffer = [self._buffer], len(self._buffer), None
        while have < m:
            block = self._next_block()
            parts.append(block)
            have += len(block)
        noise = parts[0] if len(parts) == 1 else torch.cat(parts)
        if have > m:
            self._buffer = noise[m:]
        return noise[:m]


def fresh_seed() -> int:
    """A seed for an image certified without one."""
    return int(torch.randint(0, 2**62, (1,)).item())


def check_args(**args) -> None:
    """Cohen's arguments (n0, n, alpha, batch_size), checked before any sampling."""
    for key in ("n0", "n", "batch_size"):
        if key in args and not (isinstance(args[key], (int, np.integer)) and args[key] >= 1):
            raise ValueError(f"{key} must be an integer >= 1, got {args[key]!r}")
    alpha = args.get("alpha")
    if alpha is not None and not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
