"""peftsmooth.certify.engine on its own: image selection, resume with a torn tail, the mode registry, samples."""

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from peftsmooth.certify import engine, results
from peftsmooth.certify.engine import Mode, Settings, certify_into, certify_rows, resume_rows, select_indices
from peftsmooth.certify.smoothing import Smooth, image_seed
from peftsmooth.config import conf_dir
from peftsmooth.errors import UserError

IDENTITY = {"mode": "cohen", "n0": 8, "n": 40, "alpha": 0.01, "sigma": 0.5, "seed": 0, "precision": "fp32",
            "dataset": "toy"}


def certify_cfg(preset: str = "cohen", **overrides):
    """conf/certify/<preset>.yaml with small sample sizes and `overrides`."""
    c = OmegaConf.load(conf_dir() / "certify" / f"{preset}.yaml")
    c.merge_with(OmegaConf.create({"n0": 8, "n": 40, "alpha": 0.01, "batch_size": 16} | overrides))
    return c


def settings(preset: str = "cohen", **overrides) -> Settings:
    return Settings.from_config(certify_cfg(preset, **overrides))


@pytest.fixture(scope="module")
def smooth():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[1].weight.mul_(8)
    return Smooth(model, 3, 0.5)


@pytest.fixture(scope="module")
def dataset():
    torch.manual_seed(1)
    return [(torch.rand(1, 2, 2), i % 3) for i in range(12)]


def test_selection_is_cohens_then_the_shard():
    assert select_indices(100, settings(skip=20)) == [0, 20, 40, 60, 80]
    assert select_indices(100, settings(skip=20, start=5, max=3)) == [5, 25, 45]
    whole = select_indices(50, settings(skip=3, max=10))
    parts = [select_indices(50, settings(skip=3, max=10, shard=i, num_shards=3)) for i in range(3)]
    assert parts[1] == whole[1::3] and sorted(sum(parts, [])) == whole
    ranked = settings(skip=3, max=10).for_rank(2, 3)
    assert (ranked.shard, ranked.num_shards) == (2, 3) and select_indices(50, ranked) == parts[2]


def test_rows_carry_samples_and_match_image_by_image_certify(smooth, dataset):
    s = settings(batch_size=32)  # packing: 4 images share their selection forward passes
    rows = list(certify_rows(smooth, dataset, [0, 3, 4, 7, 11], s, 0, 32))
    assert [r["idx"] for r in rows] == [0, 3, 4, 7, 11]
    for r in rows:
        x, label = dataset[r["idx"]]
        assert (r["predict"], r["radius"]) == smooth.certify(x, 8, 40, 0.01, 32, seed=image_seed(0, r["idx"]))
        assert r["label"] == label and r["correct"] == int(r["predict"] == label)
        assert r["samples"] == 8 + 40 and r["time"] >= 0
    predicted = list(certify_rows(smooth, dataset, [0, 3], settings("predict"), 0, 16))
    assert {r["samples"] for r in predicted} == {40} and {r["radius"] for r in predicted} == {0.0}


def test_resume_drops_a_torn_tail_and_continues(smooth, dataset, tmp_path):
    s = settings()
    results.write_results(tmp_path, [], s.radius_grid, **IDENTITY)
    certify_into(tmp_path, certify_rows(smooth, dataset, [0, 1, 2], s, 0, 16))
    tsv = tmp_path / results.TSV_FILE
    tsv.write_text(tsv.read_text() + "3\t0\t")  # killed while writing image 3's row
    done = resume_rows(tmp_path, IDENTITY, set(range(6)))
    assert [r["idx"] for r in done] == [0, 1, 2]
    seen = []
    certify_into(tmp_path, certify_rows(smooth, dataset, [3, 4, 5], s, 0, 16), on_row=seen.append)
    assert [r["idx"] for r in seen] == [3, 4, 5]
    straight = tmp_path / "straight"
    straight.mkdir()
    certify_into(straight, certify_rows(smooth, dataset, list(range(6)), s, 0, 16))
    cut = [line.split("\t")[:5] for line in tsv.read_text().splitlines()]
    assert cut == [line.split("\t")[:5] for line in (straight / results.TSV_FILE).read_text().splitlines()]


def test_resume_refuses_other_settings_and_other_images(smooth, dataset, tmp_path):
    with pytest.raises(UserError, match="certify.resume"):
        resume_rows(tmp_path, IDENTITY, {0}, resume=str(tmp_path))
    assert resume_rows(tmp_path, IDENTITY, {0}) == []  # nothing yet: a fresh start
    results.write_results(tmp_path, [], [0.0], **IDENTITY)
    certify_into(tmp_path, certify_rows(smooth, dataset, [0, 5], settings(), 0, 16))
    with pytest.raises(UserError, match="alpha=0.01, this run has alpha=0.05"):
        resume_rows(tmp_path, IDENTITY | {"alpha": 0.05}, {0, 5})
    with pytest.raises(UserError, match="outside this run's selection"):
        resume_rows(tmp_path, IDENTITY, {0})


def test_a_registered_mode_runs_with_its_own_checked_options(smooth, dataset, monkeypatch):
    monkeypatch.setattr(engine, "MODES", dict(engine.MODES))

    @engine.register("toy")
    class Toy(Mode):
        uses_n0 = False

        def read_options(self, c):
            budget = c.get("budget")
            if not (isinstance(budget, int) and budget >= 1):
                raise UserError(f"certify.budget={budget} must be an integer >= 1")
            return {"budget": budget}

        def certify_one(self, g, x, seed, s, batch_size):
            return 1, 0.5, s.options["budget"] + seed % 2

    assert set(engine.MODES) == {"cohen", "predict", "sequential", "incremental", "toy"}
    with pytest.raises(UserError, match="certify.budget"):
        settings(mode="toy", budget=0)
    s = settings(mode="toy", budget=7)
    assert s.options == {"budget": 7} and s.engine_mode.identity(s) == {"n0": None, "n": 40, "noise": "blocks-v2"}
    rows = list(certify_rows(smooth, dataset, [2, 6], s, 0, 16))
    assert [r["samples"] for r in rows] == [7 + image_seed(0, i) % 2 for i in (2, 6)]
    assert [(r["predict"], r["radius"], r["correct"]) for r in rows] == [(1, 0.5, 0), (1, 0.5, 0)]


def test_settings_checks_and_batch_size():
    with pytest.raises(UserError, match="certify.mode=nope"):
        settings(mode="nope")
    with pytest.raises(UserError, match="certify.compile_mode"):
        settings(compile_mode="fast")
    assert settings(batch_size="auto").batch_for(torch.device("cpu")) == engine.AUTO_BATCH["cpu"]
    assert settings(batch_size=48).batch_for(torch.device("cpu")) == 48
    assert engine.MODES["cohen"].identity(settings()) == {"n0": 8, "n": 40, "noise": "blocks-v2"}
    assert engine.MODES["predict"].identity(settings("predict")) == {"n0": None, "n": 40, "noise": "blocks-v2"}


def test_sequential_rows_match_image_by_image_certify_sequential(smooth, dataset):
    from peftsmooth.certify.sequential import sequential_certificate

    s = settings("sequential", n_max=500, n=500, batch_size=32, radius_grid=[0.0, 0.25, 0.5])
    assert s.options == {"n_max": 500, "stop": "radii", "radii": [0.25, 0.5], "max_radius_loss": None}
    assert s.engine_mode.identity(s) == {"n0": 8, "n": 500, "noise": "blocks-v2", "stop": "radii", "radii": [0.25, 0.5],
                                         "max_radius_loss": None}
    rows = list(certify_rows(smooth, dataset, [0, 3, 4, 7, 11], s, 0, 32))  # packed selection: 4 images a pass
    for r in rows:
        cert = sequential_certificate(smooth, dataset[r["idx"]][0], 8, 500, 0.01, 32, radii=[0.25, 0.5],
                                      seed=image_seed(0, r["idx"]))
        assert (r["predict"], r["radius"], r["samples"]) == (cert.prediction, cert.radius, cert.samples)
    assert smooth.certify_sequential(dataset[0][0], 8, 500, 0.01, 32, radii=[0.25, 0.5], seed=image_seed(0, 0)) == \
        (rows[0]["predict"], rows[0]["radius"], rows[0]["samples"])
