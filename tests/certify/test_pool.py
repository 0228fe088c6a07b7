"""The pool of images in flight (peftsmooth.certify.pool): full batches, answers independent of packing.

An image's decision, radius and samples must not depend on the batch size, the pool size or the
order of images, and must equal certifying it alone; every batch but the last is full; a kill loses
only the images in flight."""

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from peftsmooth.certify import results
from peftsmooth.certify.engine import Settings, certify_into, certify_rows, resume_rows
from peftsmooth.certify.noise import SELECTION
from peftsmooth.certify.pool import Request, in_order, run_alone, run_pool
from peftsmooth.certify.smoothing import Smooth, image_seed
from peftsmooth.config import conf_dir

N0, N_MAX, ALPHA, SIGMA = 16, 1000, 0.01, 0.5


class Margins(nn.Module):
    """Three classes from a linear map of the flattened image: images at many distances from the
    decision boundaries, so that sequential certification stops at many different looks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3)
        with torch.no_grad():
            self.linear.weight.mul_(6)

    def forward(self, x):
        return self.linear(x.flatten(1))


@pytest.fixture(scope="module")
def dataset():
    torch.manual_seed(2)
    return [(torch.rand(1, 2, 2), i % 3) for i in range(40)]


def settings(mode: str, **overrides) -> Settings:
    c = OmegaConf.load(conf_dir() / "certify" / f"{mode}.yaml")
    sizes = {"n0": N0, "n": N_MAX, "alpha": ALPHA} | ({"n_max": N_MAX} if mode == "sequential" else {})
    c.merge_with(OmegaConf.create(sizes | overrides))
    return Settings.from_config(c)


def answers(rows):
    """What a row says, by image, without its time."""
    return {r["idx"]: (r["label"], r["predict"], r["radius"], r["correct"], r["samples"]) for r in rows}


@pytest.mark.parametrize("mode", ["sequential", "cohen", "predict"])
def test_rows_do_not_depend_on_batch_size_pool_size_or_order(dataset, mode):
    todo = list(range(0, 40, 2))
    unpacked = answers(certify_rows(Smooth(Margins(), 3, SIGMA), dataset, todo, settings(mode, pack=False), 0, 64))
    for batch_size, pool_size in [(1, None), (7, 3), (64, None), (400, 2), (5000, None), (5000, 1)]:
        s = settings(mode, pool_size=pool_size)
        rows = list(certify_rows(Smooth(Margins(), 3, SIGMA), dataset, todo, s, 0, batch_size))
        assert answers(rows) == unpacked, (batch_size, pool_size)
    reverse = certify_rows(Smooth(Margins(), 3, SIGMA), dataset, todo[::-1], settings(mode), 0, 64)
    assert answers(reverse) == unpacked


def test_pooled_sequential_rows_equal_the_python_api_image_by_image(dataset):
    g = Smooth(Margins(), 3, SIGMA)
    rows = list(certify_rows(g, dataset, list(range(40)), settings("sequential"), 0, 256))
    samples = {r["samples"] for r in rows}
    assert len(samples) > 3, "the images should stop at different looks"
    for r in rows:
        x, _ = dataset[r["idx"]]
        alone = g.certify_sequential(x, N0, N_MAX, ALPHA, 256, seed=image_seed(0, r["idx"]))
        assert (r["predict"], r["radius"], r["samples"]) == alone


def test_every_batch_but_the_last_is_full(dataset):
    """A sequential run of many images fills its forward passes (>= 0.95); one image at a time does not."""
    many = [dataset[i % 40] for i in range(200)]
    fills = {}
    for pack in (True, False):
        g = Smooth(Margins(), 3, SIGMA)
        list(certify_rows(g, many, list(range(200)), settings("sequential", pack=pack), 0, 1000))
        fills[pack] = g.samples_drawn / (g.forward_calls * 1000)
    assert fills[True] >= 0.95 > fills[False]


class Batches(nn.Module):
    """Records the size of every forward pass."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.sizes = inner, []

    def forward(self, x):
        self.sizes.append(len(x))
        return self.inner(x)


def test_batches_are_full_while_images_wait_to_join(dataset):
    """Partial forward passes come only at the end, once every image has joined and the last ones wait
    on their own looks (no sample is ever drawn for an image that does not need it)."""
    f = Batches(Margins())
    g = Smooth(f, 3, SIGMA)
    many = [dataset[i % 40] for i in range(200)]
    rows = list(certify_rows(g, many, list(range(200)), settings("sequential"), 0, 300))
    assert all(size == 300 for size in f.sizes[: len(f.sizes) // 2])
    assert sum(f.sizes) == sum(r["samples"] for r in rows) == g.samples_drawn
    assert g.forward_calls == len(f.sizes)


def test_cohen_shares_the_last_partial_batch_with_the_next_image(dataset):
    """Ten images, batch 300: one pass for the ten selections (all images joined, nothing else to draw),
    then full passes over the estimation samples across image boundaries, a partial one only at the end."""
    f = Batches(Margins())
    g = Smooth(f, 3, SIGMA)
    list(certify_rows(g, dataset, list(range(10)), settings("cohen"), 0, 300))
    assert f.sizes[0] == 10 * N0 and all(size == 300 for size in f.sizes[1:-1])
    assert len(f.sizes) == 1 + -(-10 * N_MAX // 300)  # unpacked: 10 * ceil(1016 / 300) = 40 passes


def test_run_in_order_and_alone_agree_with_the_pool(dataset):
    g = Smooth(Margins(), 3, SIGMA)
    jobs = [(i, g.certify_job(x, image_seed(0, i), N0, 500, ALPHA)) for i, (x, _) in enumerate(dataset[:6])]
    pooled = {done.key: done.result for done in run_pool(g, jobs, 128)}
    ordered = [done.key for done in in_order(run_pool(g, [(i, g.certify_job(x, image_seed(0, i), N0, 500, ALPHA))
                                                          for i, (x, _) in enumerate(dataset[:6])], 128), range(6))]
    assert ordered == list(range(6))
    for i, (x, _) in enumerate(dataset[:6]):
        alone = run_alone(g, g.certify_job(x, image_seed(0, i), N0, 500, ALPHA), 128)
        assert (alone.prediction, alone.radius) == (pooled[i].prediction, pooled[i].radius)
        assert (alone.prediction, alone.radius) == g.certify(x, N0, 500, ALPHA, 128, seed=image_seed(0, i))


def test_a_job_asking_for_no_samples_is_refused(dataset):
    g = Smooth(Margins(), 3, SIGMA)
    x = dataset[0][0]

    def bad_job():
        yield Request(x, g._stream(x, 1, SELECTION), 0)

    with pytest.raises(ValueError, match="asked for 0 samples"):
        list(run_pool(g, [(0, bad_job())], 16))


def test_a_kill_with_images_in_flight_loses_only_them(dataset, tmp_path):
    """Killed after 5 rows with many images in flight: the resumed run writes the rest, and the file
    holds the rows of an uninterrupted run (in completion order)."""
    todo = list(range(40))
    s = settings("sequential")
    (tmp_path / "reference").mkdir()
    reference = answers(certify_into(tmp_path / "reference", certify_rows(Smooth(Margins(), 3, SIGMA), dataset,
                                                                          todo, s, 0, 500)))
    reference = answers(results.read_tsv(tmp_path / "reference" / results.TSV_FILE))

    def killed_after(rows, k):
        for i, row in enumerate(rows):
            if i == k:
                raise KeyboardInterrupt
            yield row

    identity = {"mode": "sequential", "seed": 0}
    results.write_results(tmp_path, [], [0.0], **identity)
    with pytest.raises(KeyboardInterrupt):
        certify_into(tmp_path, killed_after(certify_rows(Smooth(Margins(), 3, SIGMA), dataset, todo, s, 0, 500), 5))
    kept = resume_rows(tmp_path, identity, set(todo))
    assert len(kept) == 5
    left = [i for i in todo if i not in {r["idx"] for r in kept}]
    certify_into(tmp_path, certify_rows(Smooth(Margins(), 3, SIGMA), dataset, left, s, 0, 500))
    final = results.read_tsv(tmp_path / results.TSV_FILE)
    assert len(final) == 40 and answers(final) == reference
