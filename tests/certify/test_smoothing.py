"""Smooth (CERTIFY / PREDICT) against closed forms, and the sampler's bookkeeping.

The base classifier f(x) = [w.x + b > 0] makes everything exact: under x + N(0, sigma^2 I) the vote
for the true side is Binomial(n, pA) with pA = Phi(|w.x + b| / (sigma ||w||)), and the smoothed
classifier's true radius is the distance to the hyperplane, |w.x + b| / ||w||.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.stats import binom, norm

from peftsmooth.certify.smoothing import NOISE_BLOCK, Smooth, image_seed
from peftsmooth.certify.stats import lower_confidence_bound

SHAPE = (1, 2, 2)


class Linear2(nn.Module):
    """Two-class linear classifier on native inputs: logits (0, w.x + b)."""

    def __init__(self, w, b):
        super().__init__()
        self.register_buffer("w", torch.as_tensor(w, dtype=torch.float32).flatten())
        self.b = float(b)

    def margin(self, x):
        return float(x.flatten() @ self.w + self.b)

    def forward(self, x):
        s = x.flatten(1) @ self.w.to(x.dtype) + self.b
        return torch.stack([torch.zeros_like(s), s], dim=1)


class Recorder(nn.Module):
    """Wraps a module; records batch sizes and fails like a full GPU above `oom_above` rows."""

    def __init__(self, inner, oom_above=None):
        super().__init__()
        self.inner, self.oom_above, self.sizes = inner, oom_above, []

    def forward(self, x):
        if self.oom_above is not None and len(x) > self.oom_above:
            raise torch.OutOfMemoryError("simulated")
        self.sizes.append(len(x))
        return self.inner(x)


W = torch.tensor([1.0, -2.0, 0.5, 1.5])


def point_at_distance(d):
    """A point whose distance to the hyperplane w.x = 0 is d (signed)."""
    return (0.5 * torch.ones(4) + (d - float(0.5 * W.sum()) / W.norm()) * W / W.norm()).view(SHAPE)


def test_closed_form_point():
    f = Linear2(W, 0.0)
    assert f.margin(point_at_distance(0.3)) / float(W.norm()) == pytest.approx(0.3, abs=1e-5)


def test_vote_count_is_binomial_with_closed_form_pA():
    sigma, d, n = 0.5, 0.2, 4000
    f = Linear2(W, 0.0)
    g = Smooth(f, 2, sigma)
    pA = norm.cdf(d / sigma)
    counts = g._sample_noise(point_at_distance(d), n, 1000, seed=3, phase="estimation")
    assert counts.sum() == n
    lo, hi = binom.ppf([1e-4, 1 - 1e-4], n, pA)
    assert lo <= counts[1] <= hi


def test_certify_is_sound_and_tight_on_a_linear_classifier():
    sigma, d, n0, n, alpha, trials = 0.5, 0.3, 20, 400, 0.1, 300
    f = Linear2(W, 0.0)
    g = Smooth(f, 2, sigma)
    x = point_at_distance(d)
    true_radius = d  # distance to the decision boundary
    pA = norm.cdf(d / sigma)
    results = [g.certify(x, n0, n, alpha, 500, seed=image_seed(7, t)) for t in range(trials)]
    # a failure: a certificate that claims more than the truth (wrong class or too large a radius)
    failures = sum(1 for c, r in results if c != g.ABSTAIN and (c != 1 or r > true_radius + 1e-9))
    assert failures <= binom.ppf(0.999, trials, alpha)
    # not needlessly loose: Clopper-Pearson at alpha fails about alpha of the time (it is exact-tailed)
    assert failures >= binom.ppf(0.001, trials, alpha / 4)
    radii = np.array([r for c, r in results if c == 1])
    typical = sigma * norm.ppf(lower_confidence_bound(round(pA * n), n, alpha))
    assert abs(np.median(radii) - typical) < 0.05
    assert typical > 0.7 * true_radius


@pytest.mark.parametrize("mode", ["certify", "predict"])
def test_decision_boundary_abstains(mode):
    sigma, n, alpha, trials = 0.5, 200, 0.1, 300
    g = Smooth(Linear2(W, 0.0), 2, sigma)
    x = point_at_distance(0.0)  # pA = 1/2 exactly
    if mode == "certify":
        out = [g.certify(x, 10, n, alpha, 256, seed=image_seed(1, t))[0] for t in range(trials)]
    else:
        out = [g.predict(x, n, alpha, 256, seed=image_seed(1, t)) for t in range(trials)]
    abstains = sum(o == g.ABSTAIN for o in out)
    # abstaining is the right answer; a certificate or prediction here happens with probability <= alpha
    assert trials - abstains <= binom.ppf(0.999, trials, alpha)


def test_far_from_boundary_predicts_and_certifies():
    g = Smooth(Linear2(W, 0.0), 2, 0.25)
    x = point_at_distance(-1.0)
    assert g.predict(x, 100, 0.001, 50, seed=1) == 0
    c, r = g.certify(x, 10, 1000, 0.001, 64, seed=1)
    assert c == 0 and 0 < r <= 1.0
    # every sample votes for class 0: the radius is sigma * Phi^-1(alpha^(1/n))
    assert r == pytest.approx(0.25 * norm.ppf(0.001 ** (1 / 1000)))


def test_noise_depends_only_on_seed_not_on_batching():
    f = Linear2(W, 0.0)
    g = Smooth(f, 2, 0.5)
    x = point_at_distance(0.05)
    n = 3 * NOISE_BLOCK + 17
    ref = g._sample_noise(x, n, 7, seed=5, phase="estimation")
    for batch_size in (1, 64, NOISE_BLOCK, 1000):
        assert (g._sample_noise(x, n, batch_size, seed=5, phase="estimation") == ref).all()
    other = g._sample_noise(x, n, 64, seed=6, phase="estimation")
    assert not (other == ref).all()
    # the selection stream is a different stream: never the estimation samples again
    assert not (g._sample_noise(x, n, 64, seed=5, phase="selection") == ref).all()


def test_packed_certify_many_equals_one_by_one():
    f = Linear2(W, 0.0)
    g = Smooth(f, 2, 0.5)
    xs = [point_at_distance(d) for d in (0.3, -0.2, 0.0, 0.6, -0.05)]
    seeds = [image_seed(0, i) for i in range(len(xs))]
    single = [g.certify(x, 16, 300, 0.01, 40, seed=s) for x, s in zip(xs, seeds)]
    packed = list(g.certify_many(xs, seeds, 16, 300, 0.01, 64, pack=True))
    assert [(c.prediction, c.radius) for c in packed] == single
    assert all(c.seconds >= 0 for c in packed)


def test_out_of_memory_retry_counts_the_same_samples():
    f = Linear2(W, 0.0)
    x = point_at_distance(0.1)
    ref = Smooth(f, 2, 0.5)._sample_noise(x, 500, 100, seed=2, phase="estimation")
    rec = Recorder(f, oom_above=30)
    g = Smooth(rec, 2, 0.5)
    assert (g._sample_noise(x, 500, 100, seed=2, phase="estimation") == ref).all()
    assert g.max_batch <= 30 and max(rec.sizes) <= 30 and sum(rec.sizes) == 500


def test_counters_after_out_of_memory_retries_count_completed_passes_only():
    """forward_calls = completed passes, samples_drawn = rows classified once, batch_capacity = the rows
    each completed pass could hold after the reduction (25 here, not the configured 100)."""
    f = Linear2(W, 0.0)
    xs = [point_at_distance(0.1), point_at_distance(-0.2)]
    rec = Recorder(f, oom_above=30)
    g = Smooth(rec, 2, 0.5)
    list(g.certify_many(xs, [image_seed(0, 0), image_seed(0, 1)], 10, 120, 0.01, 100))
    assert g.max_batch == 25 and g.samples_drawn == sum(rec.sizes) == 2 * (10 + 120)
    # the first pass (both images' 2 x 10 selection samples) fitted in a batch of 100; the next failed
    # at 100 and 50 rows, and from then on every pass could hold 25
    assert rec.sizes[0] == 20 and g.forward_calls == len(rec.sizes) == 11
    assert g.batch_capacity == 100 + 25 * 10 and g.samples_drawn / g.batch_capacity == pytest.approx(260 / 350)
    plain = Smooth(Recorder(f), 2, 0.5)
    list(plain.certify_many(xs, [image_seed(0, 0), image_seed(0, 1)], 10, 120, 0.01, 100))
    assert (plain.forward_calls, plain.samples_drawn, plain.batch_capacity) == (4, 260, 400)  # 20, 100, 100, 40


def test_batches_never_exceed_batch_size_and_padding_is_not_counted():
    rec = Recorder(Linear2(W, 0.0))
    x = point_at_distance(0.1)
    plain = Smooth(rec, 2, 0.5)._sample_noise(x, 250, 64, seed=4, phase="estimation")
    assert max(rec.sizes) <= 64 and sum(rec.sizes) == 250  # memory bounded by the batch, not by n
    rec.sizes.clear()
    padded = Smooth(rec, 2, 0.5, pad_batches=True, channels_last=True)._sample_noise(x, 250, 64, seed=4, phase="estimation")
    assert set(rec.sizes) == {64} and (padded == plain).all() and padded.sum() == 250


def test_bf16_certificates_stay_valid():
    sigma, d, alpha, trials = 0.5, 0.4, 0.1, 100
    g = Smooth(Linear2(W, 0.0), 2, sigma, precision="bf16")
    x = point_at_distance(d)
    results = [g.certify(x, 10, 300, alpha, 310, seed=image_seed(11, t)) for t in range(trials)]
    failures = sum(1 for c, r in results if c != g.ABSTAIN and (c != 1 or r > d + 0.01))
    assert failures <= binom.ppf(0.999, trials, alpha)
    assert sum(c == 1 for c, _ in results) > trials / 2


@pytest.mark.parametrize("kwargs", [dict(n0=0), dict(n=0), dict(alpha=0.0), dict(alpha=1.0), dict(batch_size=0),
                                    dict(n=2.5)])
def test_bad_arguments_fail_before_sampling(kwargs):
    rec = Recorder(Linear2(W, 0.0))
    g = Smooth(rec, 2, 0.5)
    args = dict(n0=10, n=100, alpha=0.01, batch_size=10) | kwargs
    with pytest.raises(ValueError):
        g.certify(point_at_distance(0.1), args["n0"], args["n"], args["alpha"], args["batch_size"])
    with pytest.raises(ValueError):
        list(g.certify_many([point_at_distance(0.1)], [0], args["n0"], args["n"], args["alpha"], args["batch_size"]))
    assert rec.sizes == []


def test_bad_constructor_arguments():
    for sigma in (0.0, -1.0):
        with pytest.raises(ValueError):
            Smooth(Linear2(W, 0.0), 2, sigma)
    with pytest.raises(ValueError):
        Smooth(Linear2(W, 0.0), 2, 0.5, precision="fp8")
    g = Smooth(Linear2(W, 0.0), 3, 0.5)  # the classifier returns 2 classes
    with pytest.raises(ValueError, match="classes"):
        g.predict(point_at_distance(0.1), 10, 0.01, 10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (host synchronization and GPU memory)")
def test_gpu_sampling_synchronizes_per_request_not_per_batch_and_memory_is_independent_of_n():
    """n samples of one image through the pool on the GPU: the host synchronizes as often for n = 20,000
    as for n = 2,000 (the counts are read when the request completes, not after each batch of 500), and
    peak memory does not grow with n. scripts/gpu_check.sh runs the tests marked cuda."""
    import warnings

    f = Linear2(W, 0.0).cuda()
    g = Smooth(f, 2, 0.5)
    x = point_at_distance(0.1).cuda()
    g._sample_noise(x, 100, 500, 0, "selection")  # lazy CUDA initialization outside the measured calls
    syncs, peaks = [], []
    for n in (2_000, 20_000):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")  # every device-to-host synchronization warns
            try:
                counts = g._sample_noise(x, n, 500, 1, "estimation")
            finally:
                torch.cuda.set_sync_debug_mode(0)
        assert int(counts.sum()) == n
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
        peaks.append(torch.cuda.max_memory_allocated())
    assert syncs[0] == syncs[1], f"host synchronizations grow with n: {syncs}"
    assert peaks[1] <= peaks[0] * 1.1 + 2**20


def test_noise_seeds_are_the_blake2b_ones_and_precisions_are_shared():
    """image_seed keeps its seed (runtime.hash_seed: blake2b of the parts' repr), and block k of a phase is
    seeded with the image's blake2b noise base plus MurmurHash3's finalizer of (phase index << 30) + k in
    the low 32 bits (noise scheme blocks-v2), so certifications made before and after resume into the
    same rows."""
    import hashlib

    from peftsmooth import runtime
    from peftsmooth.certify import smoothing

    def blake(*parts):
        return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)

    def fmix32(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    assert image_seed(3, 17) == blake("image", 3, 17)
    base = blake("noise", 11)
    for phase, index in (("selection", 0), ("estimation", 1)):
        stream = smoothing.NoiseStream(11, phase, SHAPE, 0.5, torch.device("cpu"))
        stream.take(NOISE_BLOCK)  # block 0
        seed = (base >> 32) << 32 | ((base + fmix32((index << 30) + 1)) & 0xFFFFFFFF)
        expected = torch.randn((NOISE_BLOCK, *SHAPE), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(stream.take(NOISE_BLOCK), expected * 0.5, rtol=0, atol=0)
    assert smoothing.PRECISIONS is runtime.PRECISIONS
