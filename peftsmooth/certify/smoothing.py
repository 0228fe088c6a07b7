"""Randomized smoothing: CERTIFY and PREDICT of Cohen, Rosenfeld & Kolter (2019), on the model's device.

The smoothed classifier is g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I), with the noise added in
the dataset's native pixel space (f does its own resizing and normalization). `Smooth` mirrors Cohen's
`core.py` (same names, same signatures); what differs is only how the samples are drawn and counted:

- noise is drawn on the model's device, in fp32, in blocks of `NOISE_BLOCK` samples; block k of phase p of
  an image seeded with s comes from a generator seeded with hash(s, p, k). So the noise an image sees
  depends only on its seed, never on the batch size, on packing several images into one batch, on
  out-of-memory retries or on sharding: a resumed or sharded run counts exactly the same samples.
- class counts stay on the device (`scatter_add_`); the host reads them once per phase, not per batch,
  and memory does not depend on n.
- `precision="bf16"|"fp16"` runs f under autocast. The noise and x + noise stay fp32 (the smoothing
  distribution is the exact Gaussian); rounding the noisy input is part of the base classifier, which
  is what gets certified (validity rule 5 in docs/architecture.md: what ran is certified).
- the selection samples (n0) and the estimation samples (n) come from different noise streams and are
  never reused for one another (validity rule 2).
- `compile()` wraps f in torch.compile: warmed up once, every batch padded to one fixed shape (padded
  rows are never counted), and the eager model kept when compilation fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from peftsmooth.certify.noise import (  # noqa: F401
    ESTIMATION,
    NOISE_BLOCK,
    PREDICTION,
    SELECTION,
    NoiseStream,
    check_args,
    fresh_seed,
    image_seed,
)
from peftsmooth.certify.pool import Job, Request, in_order, run_alone, run_pool
from peftsmooth.certify.sequential import smooth_certify_sequential
from peftsmooth.certify.stats import ABSTAIN, binomial_pvalue, lower_confidence_bound, radius
from peftsmooth.runtime import PRECISIONS, evaluating

log = logging.getLogger(__name__)

@dataclass
class Certificate:
    """One image's CERTIFY outcome, with the counts that justify it."""

    prediction: int
    radius: float
    cAHat: int
    nA: int
    pABar: float
    seconds: float


class Smooth:
    """A smoothed classifier g around a base classifier f (an nn.Module on native-space inputs).

    f is certified in eval mode: every forward pass runs with each submodule's `training` flag off
    (dropout off, batch-norm running statistics), so that a sample's vote never depends on the rest of
    its batch, as batching and packing assume; the caller's flags are restored after each phase."""

    ABSTAIN = ABSTAIN

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float, *, precision: str = "fp32",
                 channels_last: bool = False, pad_batches: bool = False):
        """`pad_batches` pads every batch to the full batch size (a fixed shape for torch.compile and
        CUDA graphs); padded rows are never counted."""
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not float(sigma) > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        _check_precision(precision)
        self.base_classifier = base_classifier
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self.precision = precision
        self.channels_last = bool(channels_last)
        self.pad_batches = bool(pad_batches)
        self.max_batch: int | None = None  # set by the first out-of-memory retry
        self.forward_calls = 0  # completed forward passes of f so far (the warm-up of `compile` not included)
        self.samples_drawn = 0  # noisy samples classified so far (padding rows not included)
        self.batch_capacity = 0  # rows those passes could hold (the batch size, or less after out-of-memory)

    # --- the two algorithms -------------------------------------------------------------------

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int, *,
                seed: int | None = None, precision: str | None = None) -> tuple[int, float]:
        """Monte Carlo CERTIFY. With probability at least 1 - alpha over the noise, when the returned
        class is not ABSTAIN, g predicts it at x and everywhere in the L2 ball of the returned radius.

        :param x: one input image (C, H, W) in native pixel space
        :param n0: samples used to select the top class cAHat
        :param n: fresh samples used to estimate a lower bound pABar on pA
        :param alpha: failure probability
        :param batch_size: samples per forward pass
        :param seed: the image's noise seed (e.g. `image_seed(run_seed, idx)`); None draws one
        :return: (predicted class, certified radius), or (ABSTAIN, 0.0)
        """
        check_args(n0=n0, n=n, alpha=alpha, batch_size=batch_size)
        seed = fresh_seed() if seed is None else int(seed)
        with self._precision(precision):
            counts_selection = self._sample_noise(x, n0, batch_size, seed, SELECTION)
            cAHat = int(counts_selection.argmax())
            counts_estimation = self._sample_noise(x, n, batch_size, seed, ESTIMATION)
        nA = int(counts_estimation[cAHat])
        pABar = lower_confidence_bound(nA, n, alpha)
        if pABar < 0.5:
            return Smooth.ABSTAIN, 0.0
        return cAHat, radius(self.sigma, pABar)

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int, *,
                seed: int | None = None, precision: str | None = None) -> int:
        """Monte Carlo PREDICT. With probability at least 1 - alpha over the noise, the returned class
        (when not ABSTAIN) equals g(x).

        :param x: one input image (C, H, W) in native pixel space
        :param n: number of Monte Carlo samples
        :param alpha: failure probability of the hypothesis test
        :param batch_size: samples per forward pass
        :return: the predicted class, or ABSTAIN
        """
        check_args(n=n, alpha=alpha, batch_size=batch_size)
        seed = fresh_seed() if seed is None else int(seed)
        with self._precision(precision):
            counts = self._sample_noise(x, n, batch_size, seed, PREDICTION)
        return self._predict_from_counts(counts, alpha)

    @staticmethod
    def _predict_from_counts(counts: np.ndarray, alpha: float) -> int:
        """PREDICT's test: the top class, unless the binomial test of the top two counts fails at alpha."""
        top2 = np.argsort(-counts, kind="stable")[:2]
        count1, count2 = int(counts[top2[0]]), int(counts[top2[1]])
        if binomial_pvalue(count1, count2) > alpha:
            return Smooth.ABSTAIN
        return int(top2[0])

    def certify_many(self, xs: Iterable[torch.Tensor], seeds: Iterable[int], n0: int, n: int, alpha: float,
                     batch_size: int, *, pack: bool = True, precision: str | None = None) -> Iterator[Certificate]:
        """CERTIFY for a sequence of images, one `Certificate` per image in order.

        Same samples and same answers as calling `certify(x, ..., seed=s)` image by image; with `pack`,
        many images are in flight and every forward pass is filled from their samples (`pool`).
        """
        check_args(n0=n0, n=n, alpha=alpha, batch_size=batch_size)
        jobs = ((i, self.certify_job(x, seed, n0, n, alpha)) for i, (x, seed) in enumerate(zip(xs, seeds)))
        with self._precision(precision):
            for done in in_order(run_pool(self, jobs, batch_size, max_in_flight=None if pack else 1),
                                 itertools.count()):
                yield dataclasses.replace(done.result, seconds=done.seconds)

    # --- the algorithms as jobs of a pool of images in flight (peftsmooth.certify.pool) ----------

    def certify_job(self, x: torch.Tensor, seed: int, n0: int, n: int, alpha: float) -> Job:
        """CERTIFY of one image as a pool job: its n0 selection samples, then n estimation samples."""
        x = self._on_device(x)
        counts_selection = yield Request(x, self._stream(x, seed, SELECTION), n0)
        cAHat = int(counts_selection.argmax())
        counts_estimation = yield Request(x, self._stream(x, seed, ESTIMATION), n)
        nA = int(counts_estimation[cAHat])
        pABar = lower_confidence_bound(nA, n, alpha)
        prediction, r = (cAHat, radius(self.sigma, pABar)) if pABar >= 0.5 else (Smooth.ABSTAIN, 0.0)
        return Certificate(prediction, r, cAHat, nA, pABar, 0.0)

    def predict_job(self, x: torch.Tensor, seed: int, n: int, alpha: float) -> Job:
        """PREDICT of one image as a pool job: n samples; returns the class or ABSTAIN."""
        x = self._on_device(x)
        counts = yield Request(x, self._stream(x, seed, PREDICTION), n)
        return self._predict_from_counts(counts, alpha)

    def certify_sequential(self, x: torch.Tensor, n0: int, n_max: int, alpha: float, batch_size: int, *,
                           radii: Sequence[float] | None = None, max_radius_loss: float | None = None,
                           seed: int | None = None, stop: str | None = None,
                           precision: str | None = None) -> tuple[int, float, int]:
        """Sequential CERTIFY (`peftsmooth.certify.sequential`): CERTIFY's guarantee, sampling stopped as soon as
        the answer asked for is known. With probability at least 1 - alpha over the noise, when the
        returned class is not ABSTAIN, g predicts it everywhere in the L2 ball of the returned radius.

        :param n0: selection samples (their own noise stream; never counted in the estimate)
        :param n_max: the most estimation samples
        :param radii: stop once certification at each of these radii is decided (stop="radii", the
            default unless max_radius_loss is given)
        :param max_radius_loss: stop once the radius can grow by at most this much up to n_max (stop="radius")
        :return: (predicted class or ABSTAIN, certified radius, noisy samples classified including the n0)
        """
        return smooth_certify_sequential(self, x, n0, n_max, alpha, batch_size, radii=radii,
                                         max_radius_loss=max_radius_loss, seed=seed, stop=stop, precision=precision)

    # --- compilation --------------------------------------------------------------------------

    def compile(self, batch_size: int, image_shape: Sequence[int], *, mode: str | None = None) -> str | None:
        """torch.compile the base classifier and pad every batch to `batch_size` rows (one shape, so no
        recompilation for a last, partial batch); warmed up here, outside any timed loop. On failure the
        eager classifier stays and the error is returned (None on success). mode="reduce-overhead"
        adds CUDA graphs."""
        eager, eager_padding = self.base_classifier, self.pad_batches
        try:
            self.base_classifier = torch.compile(eager, mode=None if mode in (None, "default") else mode)
            self.pad_batches = True
            warm = torch.zeros(batch_size, *[int(s) for s in image_shape], device=self._device(None))
            counters = self.forward_calls, self.samples_drawn, self.batch_capacity
            with torch.no_grad(), evaluating(eager):
                for _ in range(2):
                    self._classify(warm, batch_size)
            self.forward_calls, self.samples_drawn, self.batch_capacity = counters  # the warm-up is not certification
            return None
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager execution
            log.warning("torch.compile failed (%s: %s); certifying the eager model", type(err).__name__, err)
            self.base_classifier, self.pad_batches = eager, eager_padding
            return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"

    # --- sampling -----------------------------------------------------------------------------

    def _sample_noise(self, x: torch.Tensor, num: int, batch_size: int, seed: int, phase: str) -> np.ndarray:
        """Class counts of f(x + e) over `num` noise samples of the (seed, phase) stream: one request run
        alone by the pool of images in flight (the one sampler; one host synchronization, at its end)."""
        return run_alone(self, self._counts_job(x, seed, phase, num), batch_size)

    def _counts_job(self, x: torch.Tensor, seed: int, phase: str, num: int) -> Job:
        x = self._on_device(x)
        counts = yield Request(x, self._stream(x, seed, phase), num)
        return counts

    def _classify(self, batch: torch.Tensor, batch_size: int) -> torch.Tensor:
        """argmax f(batch) in forward passes of at most `batch_size` rows, halved after an out-of-memory
        error (`max_batch`) for this and every later batch.

        Every row of `batch` is classified exactly once in the returned labels: a failed pass is retried
        with smaller ones and the passes that completed are kept, so a retry neither loses nor adds
        samples, and the counters (`forward_calls`, `samples_drawn`, `batch_capacity`) see only
        completed passes.
        """
        labels, start = [], 0
        while start < len(batch):
            limit = min(self.max_batch or batch_size, batch_size)
            try:
                labels.append(self._forward(batch[start:start + limit], limit))
            except torch.OutOfMemoryError:
                if limit <= 1:
                    raise
                self.max_batch = (limit + 1) // 2
                if batch.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            start += len(labels[-1])
        return labels[0] if len(labels) == 1 else torch.cat(labels)

    def _forward(self, chunk: torch.Tensor, full: int) -> torch.Tensor:
        """argmax f(chunk) in one forward pass that could hold `full` rows; counted once it completed."""
        labels = self.classify_uncounted(chunk, full)
        self.forward_calls += 1
        self.samples_drawn += len(chunk)
        self.batch_capacity += full
        return labels

    def classify_uncounted(self, chunk: torch.Tensor, full: int | None = None) -> torch.Tensor:
        """argmax f(chunk) in one forward pass as certification runs it (precision, memory format,
        padding to `full` rows), outside the sample counters: for checks such as the preflight."""
        rows = len(chunk)
        if self.pad_batches and full is not None and rows < full:
            chunk = torch.cat([chunk, chunk.new_zeros((full - rows, *chunk.shape[1:]))])
        if self.channels_last and chunk.dim() == 4:
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        with self._autocast(chunk.device):
            logits = self.base_classifier(chunk)
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"the base classifier returns {logits.shape[-1]} classes, Smooth expects {self.num_classes}")
        return logits[:rows].argmax(dim=1)

    # --- helpers ------------------------------------------------------------------------------

    def _on_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self._device(x), dtype=torch.float32)

    def _stream(self, x: torch.Tensor, seed: int, phase: str) -> NoiseStream:
        return NoiseStream(seed, phase, x.shape, self.sigma, self._device(x))

    def _device(self, x: torch.Tensor | None) -> torch.device:
        """The classifier's device; for one without parameters or buffers, x's (or the CPU)."""
        for tensor in itertools.chain(self.base_classifier.parameters(), self.base_classifier.buffers()):
            return tensor.device
        return x.device if x is not None else torch.device("cpu")

    @contextlib.contextmanager
    def _precision(self, precision: str | None):
        previous = self.precision
        if precision is not None:
            _check_precision(precision)
            self.precision = precision
        try:
            yield
        finally:
            self.precision = previous

    def _autocast(self, device: torch.device):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision} is not allowed (choose from: {', '.join(PRECISIONS)})")
