"""The preflight check: is the base classifier fed the way it was trained, before hours of sampling?

The field's most common complaints about certification are models fed the wrong way (sigma on another
pixel scale, ImageNet's class order, a missing or doubled normalization): they still "certify", at
near-chance accuracy, after hours. So before the first certification sample, `certify` measures the
base classifier f's clean accuracy (no noise) and its noisy accuracy (one draw of sigma * N(0, I) per
image) on the first `certify.preflight` images of the certified set, prints both, writes them to
summary.json (`preflight`), warns in one line when the clean accuracy is below twice chance, and
with `certify.preflight_min_acc` refuses to start below that accuracy.

The noise comes from each image's preflight stream, seeded apart so that no certificate reads it
(peftsmooth.certify.noise.preflight_stream),
and its forward passes are counted here, apart from the certification's counters.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from peftsmooth.certify.noise import preflight_stream
from peftsmooth.errors import UserError
from peftsmooth.runtime import evaluating

log = logging.getLogger(__name__)

LIKELY_CAUSES = ("normalization (mean/std applied twice or not at all)", "class order (the dataset's labels "
                 "against the model's)", "sigma on another pixel scale (ours: [0, 1] pixels)",
                 "a wrong checkpoint or dataset")


@dataclass(frozen=True)
class PreflightResult:
    images: int
    clean_accuracy: float
    noisy_accuracy: float
    chance: float  # 1 / num_classes
    forward_passes: int  # the preflight's own, not part of the certification's counters

    def as_dict(self) -> dict:
        return asdict(self)


def run_preflight(g, dataset, indices: Sequence[int], count: int, seed: int, batch_size: int) -> PreflightResult:
    """Clean and noisy accuracy of g's base classifier on the first `count` of `indices`."""
    chosen = list(indices)[:count]
    device = g._device(None)
    clean = noisy = passes = 0
    with torch.no_grad(), evaluating(g.base_classifier):
        for start in range(0, len(chosen), batch_size):
            part = chosen[start:start + batch_size]
            items = [dataset[idx] for idx in part]
            x = torch.stack([item[0] for item in items]).to(device=device, dtype=torch.float32)
            labels = torch.tensor([int(item[1]) for item in items], device=device)
            noise = torch.cat([preflight_stream(seed, idx, x.shape[1:], g.sigma, device).take(1)
                               for idx in part])
            clean += int((g.classify_uncounted(x, len(part)) == labels).sum())
            noisy += int((g.classify_uncounted(x + noise, len(part)) == labels).sum())
            passes += 2
    n = max(len(chosen), 1)
    return PreflightResult(len(chosen), clean / n, noisy / n, 1.0 / g.num_classes, passes)


def judge(result: PreflightResult, sigma: float, min_acc: float | None) -> str:
    """The line to print; a warning (logged) below twice chance; a UserError below `min_acc`."""
    line = (f"preflight on {result.images} images: clean accuracy {result.clean_accuracy:.3f}, noisy accuracy "
            f"{result.noisy_accuracy:.3f} at sigma={sigma:g} (chance {result.chance:.3f}; "
            f"{result.forward_passes} forward passes, not counted in the certification)")
    causes = f"likely causes: {'; '.join(LIKELY_CAUSES)}"
    if min_acc is not None and result.clean_accuracy < min_acc:
        raise UserError(f"certify.preflight_min_acc={min_acc:g}: the base classifier's clean accuracy on the first "
                        f"{result.images} images is {result.clean_accuracy:.3f}, below it; {causes} "
                        f"(certify.preflight_min_acc=null only warns)")
    if result.clean_accuracy < 2 * result.chance:
        log.warning("preflight: the base classifier's clean accuracy %.3f is below twice chance (%.3f); %s",
                    result.clean_accuracy, 2 * result.chance, causes)
    return line


def preflight_check(g, dataset, indices: Sequence[int], count: int, min_acc: float | None, seed: int,
                    batch_size: int, show: bool = True) -> dict | None:
    """`certify`'s preflight, before any certification sample: the numbers for summary.json (None when
    count is 0), the line logged; a UserError below `min_acc`."""
    if count == 0 or not indices:
        return None
    result = run_preflight(g, dataset, indices, count, seed, batch_size)
    line = judge(result, g.sigma, min_acc)
    if show:
        log.info("%s", line)
    return result.as_dict()
