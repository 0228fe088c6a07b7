"""The preflight check before certification: clean and noisy accuracy of f on the first images of the
certified set, from a noise stream no certificate reads, counted apart; a warning below twice chance,
a refusal below certify.preflight_min_acc; the certificates themselves unchanged."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
import torch.nn as nn
from conftest import TINY, compose

from peftsmooth.certify.noise import (DISAGREEMENT, ESTIMATION, PREDICTION, SELECTION, NoiseStream, image_seed,
                                      preflight_stream)
from peftsmooth.certify.preflight import judge, run_preflight
from peftsmooth.certify.smoothing import Smooth
from peftsmooth.errors import UserError


class ThresholdOnFirstPixel(nn.Module):
    """Class 1 when the first pixel exceeds 0.5, else 0: its accuracies can be computed by hand."""

    def forward(self, x):
        s = x.flatten(1)[:, :1] - 0.5
        return torch.cat([-s, s], dim=1)


def test_preflight_accuracies_noise_stream_and_counters_are_exact():
    torch.manual_seed(0)
    xs = torch.rand(12, 1, 4, 4)
    labels = (xs.flatten(1)[:, 0] > 0.5).long()
    labels[:3] = 1 - labels[:3]  # three wrong labels: clean accuracy 9/12 on all, 7/10 on the first 10
    dataset = list(zip(xs, labels.tolist()))
    g = Smooth(ThresholdOnFirstPixel(), 2, sigma=0.3)
    indices = list(range(12))
    result = run_preflight(g, dataset, indices, count=10, seed=5, batch_size=4)
    assert result.images == 10 and result.clean_accuracy == pytest.approx(7 / 10)
    noisy = [int((xs[i].flatten()[0] + preflight_stream(5, i, (1, 4, 4), 0.3, "cpu").take(1)
                  .flatten()[0] > 0.5)) == labels[i] for i in range(10)]
    assert result.noisy_accuracy == pytest.approx(sum(noisy) / 10)
    assert result.forward_passes == 2 * 3 and (g.forward_calls, g.samples_drawn, g.batch_capacity) == (0, 0, 0)
    first = {phase: NoiseStream(image_seed(5, 0), phase, (1, 4, 4), 0.3, "cpu").take(128)
             for phase in (SELECTION, ESTIMATION, PREDICTION, DISAGREEMENT)}
    preflight = preflight_stream(5, 0, (1, 4, 4), 0.3, "cpu").take(1)
    for phase in first:  # a stream of its own: no certificate's block
        assert not torch.isclose(preflight, first[phase]).all(dim=(1, 2, 3)).any()


def test_judge_warns_below_twice_chance_and_refuses_below_min_acc(caplog):
    class AlwaysOne(nn.Module):
        def forward(self, x):
            return nn.functional.one_hot(torch.ones(len(x), dtype=torch.long), 10).float()

    g = Smooth(AlwaysOne(), 10, sigma=0.5)
    low = run_preflight(g, [(torch.ones(1, 2, 2), 3)] * 4, range(4), 4, 0, 8)  # always class 1: accuracy 0
    with caplog.at_level(logging.WARNING, logger="peftsmooth.certify.preflight"):
        line = judge(low, 0.5, None)
    assert "clean accuracy 0.000" in line and "8 forward passes" not in line and "2 forward passes" in line
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "below twice chance (0.200)" in warning[0]
    assert all(cause in warning[0] for cause in ("normalization", "class order", "sigma on another pixel scale",
                                                 "checkpoint or dataset"))
    with pytest.raises(UserError, match="certify.preflight_min_acc=0.5: .* is 0.000, below it"):
        judge(low, 0.5, 0.5)


SMALL = ["device=cpu", "certify.n0=8", "certify.n=32", "certify.alpha=0.01", "certify.batch_size=32",
         "certify.skip=100", "certify.max=3"]


def test_certify_writes_the_preflight_and_leaves_the_rows_unchanged(tmp_path):
    from peftsmooth.commands.certify import run_certify

    base = [*TINY, "sigma=0.25", *SMALL]
    with_check = run_certify(compose("certify", [*base, "certify.preflight=20"], run_dir=tmp_path / "a"))
    without = run_certify(compose("certify", [*base, "certify.preflight=0"], run_dir=tmp_path / "b"))
    saved = json.loads((tmp_path / "a" / "summary.json").read_text())["preflight"]
    assert saved == with_check["preflight"] and saved["images"] == 3 and saved["forward_passes"] == 2
    assert 0 <= saved["clean_accuracy"] <= 1 and without["preflight"] is None
    rows = [(tmp_path / d / "certify.tsv").read_text().splitlines() for d in ("a", "b")]
    assert [r.split("\t")[:5] for r in rows[0]] == [r.split("\t")[:5] for r in rows[1]]
    assert with_check["forward_calls"] == without["forward_calls"]  # the preflight's passes are apart
    again = run_certify(compose("certify", [*base, "certify.preflight=20", "certify.preflight_min_acc=1.0"],
                                run_dir=tmp_path / "a"))  # nothing left to certify: no check, the recorded one
    assert again["preflight"] == saved and again["complete"]


def test_preflight_min_acc_refuses_and_leaves_nothing(tmp_path, monkeypatch, capsys, hydra_logging):
    from peftsmooth import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["peftsmooth"])
    with pytest.raises(SystemExit) as exited:
        cli.main(["certify", *TINY, "sigma=0.25", *SMALL, "certify.preflight_min_acc=0.99"])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(err.splitlines()) == 1 and "certify.preflight_min_acc=0.99" in err
    assert list(tmp_path.iterdir()) == []


def test_a_refused_resume_leaves_the_certification_as_it_was(tmp_path, monkeypatch, capsys, hydra_logging):
    """Hydra rewrites .hydra/ and the job appends to its log before the refusal: both go back."""
    from peftsmooth import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["peftsmooth"])
    command = ["certify", *TINY, "sigma=0.25", *SMALL, "hydra.run.dir=cert"]
    cli.main(command)
    before = {p: p.read_bytes() for p in (tmp_path / "cert").rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exited:  # a larger selection (something to do) below the bar
        cli.main([*command[:-1], "certify.max=4", "certify.preflight_min_acc=0.99", "hydra.run.dir=cert"])
    assert exited.value.code == 2 and "certify.preflight_min_acc=0.99" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (tmp_path / "cert").rglob("*") if p.is_file()} == before
