"""train.schedule=lp_ft: the head found for every method, head-only then full phases, exact resume in
either phase, run.json / metrics.jsonl records, and the refusals."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import TINY, compose, kill_after_epoch
from torch.utils.data import TensorDataset

from peftsmooth import cli
from peftsmooth.adapt import build_adaptation
from peftsmooth.commands.train import run_train
from peftsmooth.errors import UserError
from peftsmooth.models import build_classifier, count_parameters
from peftsmooth.runs import load_run, read_run_info
from peftsmooth.train import state as train_state
from peftsmooth.train.loop import TrainSettings, fit, read_metrics
from peftsmooth.train.phases import HeadOnly, head_parameter_names, plan

QUICK = ["sigma=0.25", "train.batch_size=32", "train.max_steps_per_epoch=2", "train.max_eval=32",
         "train.eval_batch_size=32", "train.num_workers=0", "train.warmup_epochs=0.5"]
LP_FT = ["peft=lora", "train.epochs=4", "train.schedule=lp_ft", "train.lp_epochs=2"]
PEFT_METHODS = ["lora", "loha", "lokr", "ia3", "oft", "boft", "vera"]
OWN_METHODS = ["adapter", "prompt", "prompt_deep", "full"]


def _model(method: str):
    cfg = compose("train", [*TINY, f"peft={method}"])
    torch.manual_seed(0)
    return build_adaptation(cfg.peft).apply(build_classifier(cfg.model, 10, [1, 8, 8]))


def _train(run_dir, *overrides):
    return run_train(compose("train", [*TINY, *QUICK, *overrides], run_dir=run_dir))


def _numbers(run_dir):
    return [{k: v for k, v in m.items() if k != "time"} for m in read_metrics(run_dir)]


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before: dict, after: dict) -> set[str]:
    return {n for n in before if not torch.equal(before[n], after[n])}


@pytest.mark.parametrize("method", PEFT_METHODS + OWN_METHODS)
def test_lp_trains_only_the_head_then_ft_trains_the_method(method, tmp_path):
    """The head is found among the trainable parameters (peft: its modules_to_save copy); one lp epoch
    changes exactly the head, the ft epoch the method's parameters too, frozen weights never."""
    model = _model(method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prefix = "base_model.model." if method in PEFT_METHODS else ""
    copy = "modules_to_save.default." if method in PEFT_METHODS else ""
    head = {f"{prefix}backbone.head.{copy}weight", f"{prefix}backbone.head.{copy}bias"}
    assert head_parameter_names(model) == head and head < trainable

    snapshots = [_params(model)]
    data = TensorDataset(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    settings = TrainSettings(epochs=2, batch_size=16, warmup_epochs=0, schedule="lp_ft", lp_epochs=1)
    fit(model, data, sigma=0.25, settings=settings, run_dir=tmp_path, progress=False,
        evaluate=lambda m, dist_info=None: snapshots.append(_params(m)) or {})
    initial, after_lp, after_ft = snapshots
    assert _changed(initial, after_lp) == head
    ft_changed = _changed(after_lp, after_ft)
    assert head <= ft_changed <= trainable and ft_changed - head
    assert [m["phase"] for m in read_metrics(tmp_path)] == ["lp", "ft"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # given back after fit


def test_phases_have_their_own_lr_and_schedule():
    settings = TrainSettings(epochs=10, lr=1e-3, lp_lr=1e-2, warmup_epochs=1.0, schedule="lp_ft", lp_epochs=2)
    lp, ft = plan(settings)
    assert (lp.name, lp.first, lp.last, lp.head_only) == ("lp", 1, 2, True)
    assert (ft.name, ft.first, ft.last, ft.head_only) == ("ft", 3, 10, False)
    assert (lp.settings.epochs, lp.settings.lr, lp.settings.warmup_epochs) == (2, 1e-2, 0.2)
    assert (ft.settings.epochs, ft.settings.lr, ft.settings.warmup_epochs) == (8, 1e-3, 0.8)
    assert plan(TrainSettings(epochs=4, lp_lr=5e-2, schedule="lp_ft", lp_epochs=1))[0].settings.lr == 5e-2
    (only,) = plan(TrainSettings(epochs=4))
    assert only.name is None and only.settings == TrainSettings(epochs=4)  # standard: the run's own settings


def test_train_records_the_schedule_and_saves_the_whole_method(tmp_path):
    out = _train(tmp_path, "peft=lora", "train.epochs=2", "train.schedule=lp_ft", "train.lp_epochs=1")
    assert [m["phase"] for m in read_metrics(tmp_path)] == ["lp", "ft"]
    info = read_run_info(tmp_path)
    assert info["schedule"] == {"name": "lp_ft", "lp_epochs": 1, "lp_lr": 1e-2, "ft_epochs": 1,
                                "ft_lr": info["train"]["lr"]}
    assert out["trainable_params"] == count_parameters(_model("lora"))[0]  # the method's count, not the head's
    model, _ = load_run(tmp_path)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def _fit_lp_ft(run_dir):
    """4 epochs of lp_ft LoRA (2 head-only), on a freshly built model, as a new process would."""
    model = _model("lora")
    run_dir.mkdir(exist_ok=True)
    data = TensorDataset(torch.rand(48, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
                         torch.randint(0, 10, (48,), generator=torch.Generator().manual_seed(2)))
    settings = TrainSettings(epochs=4, batch_size=16, max_steps_per_epoch=2, warmup_epochs=0.5,
                             schedule="lp_ft", lp_epochs=2)
    fit(model, data, sigma=0.25, settings=settings, run_dir=run_dir, progress=False)
    return model


def test_resume_in_either_phase_reproduces_the_uninterrupted_run(tmp_path):
    """Killed mid-lp (lp optimizer restored), at the lp/ft boundary (fresh ft optimizer) and mid-ft
    (ft optimizer restored): the same metrics.jsonl and weights as one uninterrupted run."""
    weights = _fit_lp_ft(tmp_path / "whole").state_dict()
    reference = _numbers(tmp_path / "whole")
    assert [m["phase"] for m in reference] == ["lp", "lp", "ft", "ft"]
    for kill in (1, 2, 3):
        kill_after_epoch(kill, _fit_lp_ft, tmp_path / f"k{kill}")
        assert train_state.read_checkpoint(tmp_path / f"k{kill}")["phase"] == ("lp" if kill <= 2 else "ft")
        resumed = _fit_lp_ft(tmp_path / f"k{kill}").state_dict()
        assert _numbers(tmp_path / f"k{kill}") == reference, kill
        assert resumed.keys() == weights.keys() and all(torch.equal(resumed[k], weights[k]) for k in weights), kill


def test_standard_schedule_ignores_the_lp_keys(tmp_path):
    """A standard run has no phase field, and lp_epochs / lp_lr do not enter its resume fingerprint
    (so they cannot block a resume, and checkpoints written before the keys existed resume)."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    data = TensorDataset(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    fit(model, data, sigma=0.25, settings=TrainSettings(epochs=1, batch_size=16), run_dir=tmp_path, progress=False)
    assert "phase" not in read_metrics(tmp_path)[0] and train_state.read_checkpoint(tmp_path)["phase"] is None
    fingerprint = lambda *o: train_state.resume_fingerprint(compose("train", [*TINY, "peft=lora", *o]))
    assert fingerprint() == fingerprint("train.lp_epochs=7", "train.lp_lr=0.5")
    assert "schedule" not in fingerprint()["train"]
    assert fingerprint("train.schedule=lp_ft")["train"]["lp_epochs"] == 2


@pytest.mark.parametrize("args, message", [
    (["train.schedule=cosine"], "train.schedule=cosine is not allowed (choose from: lp_ft, standard)"),
    (["train.lp_epochs=0"], "train.lp_epochs=0 must be an integer with 1 <= lp_epochs < train.epochs=4"),
    (["train.lp_epochs=4"], "train.lp_epochs=4 must be"),
    (["train.lp_lr=0"], "train.lp_lr=0 must be > 0"),
    (["peft=linear"], "does not apply to peft=linear: it trains only the head already"),
    (["peft=none"], "does not apply to peft=none: it trains nothing"),
    (["peft=blackbox"], "does not apply to peft=blackbox: it trains without gradients"),
    (["peft=blackbox_fo"], "does not apply to peft=blackbox_fo: it trains a front module"),
])
def test_bad_schedule_is_refused_before_any_output(args, message, tmp_path):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _train(tmp_path, *LP_FT, *args)
    assert not any(tmp_path.iterdir())


def test_cli_refusal_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["peftsmooth"])
    with pytest.raises(SystemExit) as exited:
        cli.main(["train", *TINY, "peft=linear", "train.schedule=lp_ft"])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(err.splitlines()) == 1 and not any(tmp_path.iterdir())
    assert err.startswith("peftsmooth train: error: train.schedule=lp_ft does not apply to peft=linear")


def test_a_model_without_a_head_is_refused():
    with pytest.raises(UserError, match="belongs to a classification head"):
        HeadOnly(torch.nn.Linear(2, 2))
