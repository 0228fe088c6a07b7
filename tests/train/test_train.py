"""`peftsmooth train` end to end on tiny models: files, resume, noise placement, losses, bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import TINY, compose, kill_after_epoch
from torch.utils.data import TensorDataset

from peftsmooth.commands.train import run_train
from peftsmooth.errors import UserError
from peftsmooth.models import build_classifier, load_state_dict_file
from peftsmooth.runs import load_run, read_run_info
from peftsmooth.train import loop as training
from peftsmooth.train.loop import Batch, TrainSettings, fit, read_metrics
from peftsmooth.train.losses import Consistency, CrossEntropy, build_objective

QUICK = ["sigma=0.25", "train.epochs=3", "train.batch_size=32", "train.max_steps_per_epoch=3",
         "train.max_eval=64", "train.eval_batch_size=64", "train.num_workers=0", "train.warmup_epochs=0.5"]
SCHEMA = {"format", "created", "command", "method", "model", "model_name", "dataset", "num_classes", "image_size",
          "input_size", "sigma", "adapt", "front", "base", "trainable_params", "total_params", "files", "argv",
          "finished"}
BIN = Path(sys.executable).parent



def _train(run_dir, *overrides):
    cfg = compose("train", TINY + QUICK + list(overrides), run_dir=run_dir)
    return run_train(cfg)


def _numbers(run_dir):
    return [{k: v for k, v in m.items() if k != "time"} for m in read_metrics(run_dir)]


HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def test_train_writes_run_files_and_certify_can_rebuild_it(tmp_path):
    out = _train(tmp_path, "peft=lora", *(["train.tensorboard=true"] if HAS_TENSORBOARD else []))
    info = read_run_info(tmp_path)
    assert SCHEMA <= set(info)
    assert info["finished"] is True and info["method"] == "lora" and info["command"] == "train"
    assert info["trainable_params"] == out["trainable_params"] < info["total_params"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(info["files"])
    assert all((tmp_path / f).is_file() for f in info["files"])
    metrics = read_metrics(tmp_path)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert {"epoch", "loss", "clean_acc", "noisy_acc", "lr", "time"} <= set(metrics[-1])
    assert 0 <= metrics[-1]["noisy_acc"] <= 1
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # loss, clean / noisy acc
    if HAS_TENSORBOARD:  # the extra is installed: the same numbers as TensorBoard scalars
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path))
        events.Reload()
        assert [(s.step, round(s.value, 5)) for s in events.Scalars("noisy_acc")] == \
            [(m["epoch"], round(m["noisy_acc"], 5)) for m in metrics]
        assert {"loss", "clean_acc", "lr"} <= set(events.Tags()["scalars"])
    from peft import PeftModel

    model, _ = load_run(tmp_path)
    assert isinstance(model, PeftModel)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_base_run_is_the_starting_point(tmp_path):
    base = tmp_path / "base"
    _train(base, "peft=full", "sigma=0", "train.epochs=1")
    assert (base / "model.safetensors").is_file()
    out = _train(tmp_path / "lin", "peft=linear", "train.epochs=1", f"base={base}")
    info = read_run_info(tmp_path / "lin")
    assert info["base"] == str(base.resolve())
    assert info["model"]["checkpoint"] == str((base / "model.safetensors").resolve())
    model, _ = load_run(tmp_path / "lin")
    trained = load_state_dict_file(base / "model.safetensors")
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, trained["blocks.0.attn.qkv.weight"])
    assert out["trainable_params"] == 330
    with pytest.raises(UserError, match="has no model.safetensors"):
        _train(tmp_path / "x", "peft=lora", f"base={tmp_path / 'lin'}")


def test_none_only_evaluates(tmp_path):
    out = _train(tmp_path, "peft=none")
    assert out["trainable_params"] == 0
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 1 and metrics[0]["epoch"] == 0 and metrics[0]["noisy_acc"] is not None
    assert (tmp_path / "training.png").is_file()  # every run has one, an evaluation-only one too


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    _train(tmp_path / "full_run", "peft=lora")
    reference = _numbers(tmp_path / "full_run")

    kill_after_epoch(2, _train, tmp_path / "killed", "peft=lora")
    assert [m["epoch"] for m in read_metrics(tmp_path / "killed")] == [1, 2]
    _train(tmp_path / "other", "peft=lora", f"resume={tmp_path / 'killed'}")  # resume= from another job dir
    assert _numbers(tmp_path / "killed") == reference
    a = load_state_dict_file(tmp_path / "full_run" / "adapter_model.safetensors")
    b = load_state_dict_file(tmp_path / "killed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_run_info(tmp_path / "killed")["finished"] is True


def test_resume_with_another_config_is_refused(tmp_path):
    _train(tmp_path, "peft=lora", "train.epochs=1")
    with pytest.raises(UserError, match="sigma"):
        _train(tmp_path / "x", "peft=lora", "train.epochs=1", "sigma=0.5", f"resume={tmp_path}")


class RecordingClassifier(nn.Module):
    """A classifier whose preprocessing records what it receives (to see where the noise was added)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []
        original = inner.preprocess

        def preprocess(x):
            self.seen.append(x.detach().clone())
            out = original(x)
            assert out.shape[-1] == inner.input_size  # resized after the noise
            return out

        inner.preprocess = preprocess

    def forward(self, x):
        return self.inner(x)


def test_noise_is_added_in_native_space_fresh_each_step(tmp_path):
    cfg = compose("train", TINY)
    model = RecordingClassifier(build_classifier(cfg.model, 10, [1, 8, 8]))
    data = TensorDataset(torch.full((64, 1, 8, 8), 0.5), torch.zeros(64, dtype=torch.long))
    settings = TrainSettings(epochs=1, batch_size=32, lr=1e-3, warmup_epochs=0)
    fit(model, data, sigma=0.5, settings=settings, run_dir=tmp_path, evaluate=None, progress=False)
    assert len(model.seen) == 2
    first, second = model.seen
    assert first.shape == (32, 1, 8, 8)  # native size and channels: before resize / RGB repeat
    assert abs(float((first - 0.5).std()) - 0.5) < 0.05 and abs(float(first.mean()) - 0.5) < 0.05
    assert not torch.equal(first, second)


def test_consistency_loss_reduces_to_ce_without_regularizers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    batch = Batch(x, x + 0.25 * torch.randn_like(x), y, 0.25)
    torch.manual_seed(1)
    plain, _ = Consistency(m=2, lbd=0.0, eta=0.0)(model, batch)
    torch.manual_seed(1)
    second = batch.noisy()
    expected = (CrossEntropy()(model, batch)[0] + nn.functional.cross_entropy(model(second), y)) / 2
    assert torch.allclose(plain, expected, atol=1e-6)
    full, _ = Consistency()(model, batch)
    assert torch.isfinite(full) and full > 0
    with pytest.raises(UserError, match="train.loss"):
        build_objective("hinge")


def test_consistency_training_runs(tmp_path):
    out = _train(tmp_path, "peft=linear", "train.loss=consistency", "train.epochs=1")
    assert read_run_info(tmp_path)["loss"] == "consistency" and out["epoch"] == 1


def _cli(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([str(BIN / "peftsmooth"), "train", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["peft=nope"], "peft=nope"),      # rejected by the CLI before Hydra runs
    (["peft.r=0"], "peft.r=0"),        # rejected inside the command
])
def test_bad_input_exits_2_with_one_line(args, message, tmp_path):
    result = _cli([*TINY, "peft=lora", *args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("peftsmooth train: error:")]
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "run" / "run.json").exists()


@pytest.mark.parametrize("args, message", [
    (["peft.target_modules=nothing"], "matches no module"),
    (["train.precision=fp8"], "train.precision"),
    (["train.precision=fp16"], "needs a GPU"),
    (["train.loss=hinge"], "train.loss"),
    (["base=/no/such/run"], "base=/no/such/run: no such directory"),
    (["resume=/no/such/run"], "no such directory"),
    (["train.epochs=0"], "untrained adapter"),
])
def test_bad_input_is_a_user_error_before_any_output(args, message, tmp_path):
    with pytest.raises(UserError, match=message):
        _train(tmp_path, "peft=lora", *args)
    assert not (tmp_path / "run.json").exists() and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_torchrun_two_processes_matches_single_process_files(tmp_path):
    torchrun = BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed")
    common = [*TINY, *QUICK, "peft=lora", "train.epochs=2", "train.max_steps_per_epoch=2"]
    run_train(compose("train", common, run_dir=tmp_path / "single"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([str(torchrun), "--nproc_per_node=2", "--no-python", str(BIN / "peftsmooth"), "train",
                          *common, f"hydra.run.dir={tmp_path / 'ddp'}"], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=300)
    if ddp.returncode != 0 and ("gloo" in ddp.stderr.lower() or "rendezvous" in ddp.stderr.lower()):
        pytest.skip(f"torchrun with gloo cannot run here: {ddp.stderr.strip().splitlines()[-1]}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    files = lambda d: sorted(p.name for p in d.iterdir() if p.is_file() and p.suffix != ".log")
    assert files(tmp_path / "ddp") == files(tmp_path / "single")
    a, b = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert [m["epoch"] for m in a] == [m["epoch"] for m in b] and [m["step"] for m in a] == [m["step"] for m in b]
    assert set(a[-1]) == set(b[-1])
    info = read_run_info(tmp_path / "ddp")
    assert info["finished"] and info["trainable_params"] == read_run_info(tmp_path / "single")["trainable_params"]
    model, _ = load_run(tmp_path / "ddp")
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_grad_accumulation_counts_optimizer_steps(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    data = TensorDataset(torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    settings = TrainSettings(epochs=2, batch_size=8, grad_accum=2, warmup_epochs=0)
    out = fit(model, data, sigma=0.25, settings=settings, run_dir=tmp_path, evaluate=None, progress=False)
    assert [m["step"] for m in out["history"]] == [4, 8]  # 8 micro-batches per epoch / 2


class CountingHook:
    """A stand-in for a zeroth-order method: updates in place, reports queries, has state."""

    def __init__(self):
        self.calls = 0

    def training_step(self, model, x_noisy, y):
        self.calls += 1
        with torch.no_grad():
            model[1].bias.add_(0.01)
        return {"loss": 1.0 / self.calls, "correct": 1, "queries": 2 * len(y)}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = int(state["calls"])


def test_training_step_hook_replaces_backward_and_logs_its_fields(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    data = TensorDataset(torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    hook = CountingHook()
    bias = model[1].bias.detach().clone()
    settings = TrainSettings(epochs=2, batch_size=8)
    out = fit(model, data, sigma=0.25, settings=settings, run_dir=tmp_path, evaluate=None, step_hook=hook,
              progress=False)
    assert hook.calls == 8
    assert [m["queries"] for m in read_metrics(tmp_path)] == [64, 64]
    assert out["metrics"]["lr"] is None and out["metrics"]["train_acc"] == 4 / 32
    assert torch.allclose(model[1].bias.detach(), bias + 0.08)  # only the hook's in-place updates
    assert training.read_checkpoint(tmp_path)["hook"] == {"calls": 8}


def test_run_info_schema_round_trip_and_bad_values(tmp_path):
    from peftsmooth.runs import RunInfo, write_run_info

    written = write_run_info(tmp_path, command="train", model={"name": "m"}, num_classes=10, image_size=[1, 8, 8],
                             sigma=0.25, queries=12)
    info = read_run_info(tmp_path)
    assert isinstance(info, RunInfo) and info == written
    assert info.extra == {"queries": 12} and info["queries"] == 12 and info.sigma == 0.25
    assert json.loads((tmp_path / "run.json").read_text()) == dict(info)
    (tmp_path / "run.json").write_text(json.dumps({**dict(info), "num_classes": "ten"}))
    with pytest.raises(UserError, match="num_classes='ten'"):
        read_run_info(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({k: v for k, v in dict(info).items() if k != "image_size"}))
    with pytest.raises(UserError, match=f"^base={tmp_path}: run.json has no 'image_size'"):
        read_run_info(tmp_path, "base")  # the message names the key the user gave the directory with


def test_resume_of_another_commands_run_is_refused(tmp_path):
    from peftsmooth.runs import write_run_info

    (tmp_path / "d").mkdir()
    write_run_info(tmp_path / "d", command="denoise-baseline", model={"name": "m"}, num_classes=10,
                   image_size=[1, 8, 8])
    with pytest.raises(UserError, match="is a denoise-baseline run"):
        _train(tmp_path / "x", "peft=lora", f"resume={tmp_path / 'd'}")
