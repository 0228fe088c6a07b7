"""The independent audit's findings, each held by a test: distinct noise blocks on every device,
f certified in eval mode, a given look plan checked, one default radii list, and the noise scheme in
every certification's identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from scipy.stats import norm

from peftsmooth.certify import noise
from peftsmooth.certify.engine import resume_rows
from peftsmooth.certify.noise import ESTIMATION, NOISE_BLOCK, NOISE_SCHEME, PREDICTION, SELECTION, block_seed, mix32
from peftsmooth.certify.sequential import (DEFAULT_RADII, RADIUS_GRID, LookPlan, certify_sequential, look_plan,
                                           stop_rule)
from peftsmooth.certify.smoothing import Smooth, image_seed
from peftsmooth.config import conf_dir
from peftsmooth.errors import UserError
from peftsmooth.runtime import hash_seed

LOW32 = 0xFFFFFFFF
AUDIT_SEED = 7659149259013245914  # image 14529 of a run seeded 0


# --- (a) the noise blocks of one image are distinct by construction --------------------------------


def test_the_audit_example_collided_under_the_old_seeds():
    """What the audit found: under the 63-bit hashed block seeds, estimation blocks 71 and 683 of this
    image share the 32 bits the CPU generator keeps (so this test exercises the real case)."""
    assert image_seed(0, 14529) == AUDIT_SEED
    old = [hash_seed(AUDIT_SEED, ESTIMATION, k) for k in (71, 683)]
    assert old[0] != old[1] and old[0] & LOW32 == old[1] & LOW32
    new = [block_seed(AUDIT_SEED, ESTIMATION, k) for k in (71, 683)]
    assert new[0] & LOW32 != new[1] & LOW32


def test_mix32_is_a_bijection_on_a_large_sample():
    values = [mix32(v) for v in range(0, 1 << 30, 997)] + [mix32((2 << 30) + v) for v in range(0, 1 << 20, 7)]
    assert len(set(values)) == len(values) and all(0 <= v <= LOW32 for v in values)
    # its inverse exists (murmur3's finalizer is invertible): check a few round trips of the inverse steps
    inverse_1, inverse_2 = pow(0x85EBCA6B, -1, 1 << 32), pow(0xC2B2AE35, -1, 1 << 32)

    def unmix(h):
        h ^= h >> 16
        h = (h * inverse_2) & LOW32
        h ^= (h >> 13) ^ (h >> 26)
        h = (h * inverse_1) & LOW32
        return h ^ (h >> 16)

    assert all(unmix(mix32(v)) == v for v in (0, 1, 12345, LOW32, 3 << 30))


def test_block_seeds_of_every_image_differ_in_the_bits_every_generator_uses():
    """300 images x every phase x the blocks of n = 100,000 samples: the low 32 bits (all that the CPU's
    mt19937 keeps) never repeat within an image, and the seeds stay below 2^63."""
    blocks = -(-100_000 // NOISE_BLOCK)
    for idx in range(300):
        seed = image_seed(0, idx)
        seeds = [block_seed(seed, phase, k) for phase in (SELECTION, ESTIMATION, PREDICTION) for k in range(blocks)]
        assert len({s & LOW32 for s in seeds}) == len(seeds), idx
        assert all(0 <= s < 1 << 63 for s in seeds)


def test_block_seeds_are_checked():
    with pytest.raises(ValueError, match="noise block"):
        block_seed(1, ESTIMATION, 1 << noise.BLOCK_BITS)
    with pytest.raises(ValueError, match="phase"):
        noise.NoiseStream(1, "other", (1,), 0.5, torch.device("cpu"))


class NoiseRecorder(nn.Module):
    """f(x) = [sum(x) > 0]: keeps every input row it is given (at x = 0, the noise rows themselves)."""

    def __init__(self):
        super().__init__()
        self.rows: list[torch.Tensor] = []

    def forward(self, x):
        self.rows.append(x.flatten(1).clone())
        s = x.flatten(1).sum(1)
        return torch.stack([-s, s], dim=1)


def test_the_audit_example_feeds_f_no_repeated_noise_row():
    """`Smooth(f, 2, 0.5).certify(x, 100, 100000, 0.001, 1000, seed=...)` through the public API: the
    100,100 noise rows f sees are all different (under the old seeds, 128 of them repeated)."""
    f = NoiseRecorder()
    Smooth(f, 2, 0.5).certify(torch.zeros(1, 2, 2), 100, 100_000, 0.001, 1000, seed=AUDIT_SEED)
    rows = torch.cat(f.rows)
    assert len(rows) == 100_100
    assert len(torch.unique(rows, dim=0)) == len(rows)


# --- (b) f is certified in eval mode ---------------------------------------------------------------


class BatchDependent(nn.Module):
    """In training mode the output of a row depends on the rest of its batch (batch norm, dropout)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 3)
        nn.init.normal_(self.head.weight, std=3.0)

    def forward(self, x):
        return self.head(self.drop(self.norm(x.flatten(1))))


def test_smooth_certifies_f_in_eval_mode_and_restores_the_callers_flags():
    f = BatchDependent()
    f.train()
    f.drop.eval()  # a mixed state: every flag must come back as it was
    flags = {name: m.training for name, m in f.named_modules()}
    x = torch.rand(1, 2, 2)
    g = Smooth(f, 3, 0.25)
    got = [g.certify(x, 50, 500, 0.01, bs, seed=3) for bs in (1, 7, 500)]
    assert {name: m.training for name, m in f.named_modules()} == flags
    expected = Smooth(BatchDependent().eval(), 3, 0.25).certify(x, 50, 500, 0.01, 64, seed=3)
    assert got == [expected] * 3
    assert g.predict(x, 200, 0.01, 16, seed=3) == Smooth(BatchDependent().eval(), 3, 0.25).predict(x, 200, 0.01, 16, seed=3)
    prediction, radius, samples = g.certify_sequential(x, 50, 2000, 0.01, 64, seed=3)
    assert (prediction, radius, samples) == Smooth(BatchDependent().eval(), 3, 0.25).certify_sequential(
        x, 50, 2000, 0.01, 64, seed=3)
    assert {name: m.training for name, m in f.named_modules()} == flags
    assert f.norm.running_mean.abs().sum() == 0  # eval: no batch statistics were folded in


# --- (c) a given plan is checked -------------------------------------------------------------------


def hits(m):
    return m  # every vote for the selected class


def test_a_plan_that_spends_more_than_alpha_is_refused():
    looks = (128, 256, 1000)
    with pytest.raises(ValueError, match="sum to 0.003.*alpha=0.001"):
        certify_sequential(hits, 1000, 0.001, 0.5, plan=LookPlan(looks, (0.001,) * 3, (0.001,) * 3))
    with pytest.raises(ValueError, match="last look is 256, not n_max=1000"):
        certify_sequential(hits, 1000, 0.001, 0.5, plan=LookPlan((128, 256), (0.0005,) * 2, (0.01,) * 2))
    with pytest.raises(ValueError, match="increasing"):
        certify_sequential(hits, 1000, 0.001, 0.5, plan=LookPlan((256, 128, 1000), (0.0003,) * 3, (0.01,) * 3))
    with pytest.raises(ValueError, match="3 looks, 2 alphas"):
        certify_sequential(hits, 1000, 0.001, 0.5, plan=LookPlan(looks, (0.0005,) * 2, (0.01,) * 3))


def test_a_valid_plan_is_used_as_given():
    plan = look_plan(1000, 0.001)
    assert certify_sequential(hits, 1000, 0.001, 0.5, plan=plan) == certify_sequential(hits, 1000, 0.001, 0.5)
    # a plan spending less than alpha is valid (and certifies a smaller radius)
    frugal = LookPlan(plan.looks, tuple(a / 2 for a in plan.alphas), plan.upper_alphas)
    assert certify_sequential(hits, 1000, 0.001, 0.5, plan=frugal).radius < certify_sequential(hits, 1000, 0.001, 0.5).radius


# --- (d) one default radii list --------------------------------------------------------------------


def test_the_api_and_the_cli_decide_the_same_radii_by_default():
    for mode in ("cohen", "sequential"):
        grid = yaml.safe_load((conf_dir() / "certify" / f"{mode}.yaml").read_text())["radius_grid"]
        assert tuple(grid) == RADIUS_GRID
    cli_radii = [r for r in RADIUS_GRID if r > 0]  # certify.radii=null: the positive radii of radius_grid
    assert stop_rule() == stop_rule("radii", cli_radii) and list(DEFAULT_RADII) == cli_radii


@pytest.mark.parametrize("sigma", [0.25, 1.0])
def test_the_same_image_costs_the_same_samples_through_the_api_and_the_cli(sigma):
    """The audit's example: at pA = 0.999 the API's default and the CLI's default stop at the same look."""
    cli_radii = [r for r in RADIUS_GRID if r > 0]
    runs = []
    for radii in (None, cli_radii):
        rng = np.random.default_rng(0)
        runs.append(certify_sequential(lambda m: int(rng.binomial(m, 0.999)), 100_000, 0.001, sigma, radii=radii))
    assert runs[0] == runs[1] and runs[0].samples < 100_000
    assert runs[0].radius <= sigma * norm.ppf(0.999) + 1e-9 or runs[0].lower > 0.999


# --- (a) the noise scheme in the identity: a resume never mixes streams ----------------------------


def test_rows_of_the_earlier_noise_scheme_are_never_resumed(tmp_path):
    from peftsmooth.certify import results

    identity = {"mode": "cohen", "n0": 8, "n": 40, "noise": NOISE_SCHEME, "alpha": 0.01, "sigma": 0.5,
                "seed": 0, "precision": "fp32", "dataset": "toy"}
    rows = [{"idx": 0, "label": 1, "predict": 1, "radius": 0.2, "correct": 1, "time": 0.1, "samples": 48}]
    results.write_results(tmp_path, rows, [0.0], **{k: v for k, v in identity.items() if k != "noise"})
    results.TsvWriter(tmp_path / results.TSV_FILE).__enter__().write_row(rows[0])
    with pytest.raises(UserError, match="noise scheme blocks-v1.*never mixes"):
        resume_rows(tmp_path, identity, {0, 1})
    results.write_results(tmp_path, rows, [0.0], **identity)
    assert [r["idx"] for r in resume_rows(tmp_path, identity, {0, 1})] == [0]
