"""Black-box PEFTSmoothing: coordinator, query-only oracle, SPSA training, save/load, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TINY, compose

from peftsmooth.errors import UserError
from peftsmooth.front.blackbox import BlackBoxSPSA, QueryOracle, WhiteBoxCoordinator, seal
from peftsmooth.front.coordinator import Coordinator
from peftsmooth.models import BaseClassifier

IMAGE = [1, 8, 8]
COORD = dict(hidden=4, encoder=dict(name="random", width=8, depth=2, downsample=0))



def _digits(n: int, seed: int = 0):
    """Real digits (what the classifier below was fitted on), a fixed seeded subset."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    idx = torch.randperm(len(bunch.target), generator=torch.Generator().manual_seed(seed))[:n]
    x = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)[idx]
    return x, torch.tensor(bunch.target)[idx]


@pytest.fixture(scope="module")
def fitted_state():
    """A small clean classifier for digits (8x8 native, BaseClassifier preprocessing), fitted once."""
    torch.manual_seed(0)
    clf = _classifier()
    x, y = _digits(1000, seed=1)
    opt = torch.optim.Adam(clf.parameters(), 1e-2)
    for _ in range(150):
        loss = F.cross_entropy(clf(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in clf.state_dict().items()}


def _classifier(state=None, num_classes: int = 10) -> BaseClassifier:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))
    clf = BaseClassifier(backbone, 8, [0.5], [0.5], in_chans=1)
    if state is not None:
        clf.load_state_dict(state)
    return clf


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------- coordinator


@pytest.mark.parametrize("downsample", [0, 1])
def test_coordinator_output_is_native_size_and_starts_as_identity(downsample):
    coord = Coordinator(IMAGE, encoder=dict(name="random", width=8, downsample=downsample), hidden=4)
    x = torch.rand(3, *IMAGE)
    assert torch.equal(coord(x), x)                          # residual mode, zero-initialised last layer
    assert all(not p.requires_grad for p in coord.encoder.parameters())
    assert all(p.requires_grad for p in coord.decoder.parameters())
    coord.train()
    assert not coord.encoder.training                        # frozen encoder stays in eval mode
    image = Coordinator([3, 12, 12], encoder=dict(name="random", downsample=2), mode="image")
    out = image(torch.rand(2, 3, 12, 12))
    assert out.shape == (2, 3, 12, 12) and out.min() >= 0 and out.max() <= 1


def test_timm_encoder_builds_offline_without_pretrained_weights():
    coord = Coordinator([3, 16, 16], encoder=dict(name="timm", model="resnet10t", pretrained=False, stage=1), hidden=4)
    assert coord(torch.rand(2, 3, 16, 16)).shape == (2, 3, 16, 16)
    assert coord.encoder.saves_weights                          # random-init timm weights must be saved
    assert all(not p.requires_grad for p in coord.encoder.parameters())


def test_unknown_encoder_and_mode_are_user_errors():
    with pytest.raises(UserError, match="coordinator.encoder.name=nope.*random"):
        Coordinator(IMAGE, encoder=dict(name="nope"))
    with pytest.raises(UserError, match="coordinator.mode"):
        Coordinator(IMAGE, mode="sideways")


# ---------------------------------------------------------------- query-only access


def test_oracle_returns_detached_probabilities_and_counts_queries():
    clf = _classifier()
    oracle = QueryOracle(clf, 10)
    x = torch.rand(5, *IMAGE, requires_grad=True)
    probs = oracle(x)
    assert not probs.requires_grad and probs.grad_fn is None
    assert torch.allclose(probs.sum(1), torch.ones(5))
    assert oracle.queries == 5
    with pytest.raises(RuntimeError):          # nothing to backpropagate through: gradients stop here
        probs.sum().backward()
    assert all(p.grad is None for p in clf.parameters())


def test_spsa_training_never_touches_the_classifier(fitted_state):
    clf = _classifier(fitted_state)
    adapt = BlackBoxSPSA(10, IMAGE, COORD, dict(pairs=2, lr=0.01), seed=0)
    model = adapt.apply(clf)
    before = _snapshot(model.backbone)
    for p in model.backbone.parameters():       # even if someone unfreezes it, no gradient may arrive
        p.requires_grad_(True)
    model.train()
    x, y = _digits(32)
    for _ in range(3):
        out = adapt.training_step(model, x + 0.5 * torch.randn_like(x), y)
    assert all(p.grad is None for p in model.backbone.parameters())
    after = _snapshot(model.backbone)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)   # bit-identical
    assert not model.backbone.training                              # sealed: eval mode despite train()
    assert out["queries"] == 2 * 2 * 32 and adapt.queries == 3 * 2 * 2 * 32
    assert adapt.extra_run_info() == {"queries": 3 * 2 * 2 * 32}


def test_spsa_coordinator_lowers_the_loss(fitted_state):
    sigma = 0.5
    clf = _classifier(fitted_state)
    adapt = BlackBoxSPSA(10, IMAGE, COORD, dict(pairs=4, lr=0.005, c=0.01), seed=0)
    model = adapt.apply(clf).eval()
    x, y = _digits(400, seed=2)
    gen = torch.Generator().manual_seed(3)
    x_eval = x[:200] + sigma * torch.randn(x[:200].shape, generator=gen)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(x_eval), y[:200]))

    start = eval_loss()
    for step in range(150):
        idx = torch.randint(0, 400, (64,), generator=gen)
        adapt.training_step(model, x[idx] + sigma * torch.randn(x[idx].shape, generator=gen), y[idx])
    assert eval_loss() < 0.9 * start
    assert torch.equal(model.backbone.state_dict()["1.weight"], fitted_state["backbone.1.weight"])


def test_first_order_variant_trains_only_the_coordinator_and_counts_queries(fitted_state):
    clf = _classifier(fitted_state)
    adapt = WhiteBoxCoordinator(10, IMAGE, COORD)
    model = adapt.apply(clf)
    assert not hasattr(adapt, "training_step")          # the shared loop trains it by backprop
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("front.decoder.") for n in trainable)
    x, y = _digits(16)
    F.cross_entropy(model(x + 0.5 * torch.randn_like(x)), y).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.front.decoder.out.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model(x)                                         # evaluation is not counted
    assert adapt.queries == 16


# ---------------------------------------------------------------- save / load


def test_save_load_round_trip_through_load_run(tmp_path, fitted_state):
    from peftsmooth.models import build_classifier, save_state_dict_file
    from peftsmooth.runs import load_run, to_plain, write_run_info

    cfg = compose("train", [*TINY, "peft=blackbox", "peft.spsa.pairs=1", "peft.coordinator.hidden=4"])
    torch.manual_seed(0)
    clf = build_classifier(cfg.model, 10, IMAGE)
    save_state_dict_file(clf.backbone.state_dict(), tmp_path / "base.safetensors")
    from peftsmooth.adapt import build_adaptation

    adapt = build_adaptation(cfg.peft)
    assert isinstance(adapt, BlackBoxSPSA)
    model = adapt.apply(clf)
    x, y = _digits(8)
    for _ in range(2):
        adapt.training_step(model, x + 0.25 * torch.randn_like(x), y)
    assert model.front.decoder.out.weight.abs().sum() > 0           # it moved away from the identity
    files = adapt.save(model, tmp_path)
    model_cfg = to_plain(cfg.model)
    model_cfg["checkpoint"] = str(tmp_path / "base.safetensors")
    write_run_info(tmp_path, command="train", method="blackbox", model=model_cfg, num_classes=10,
                   image_size=IMAGE, sigma=0.25, adapt=to_plain(cfg.peft), front=None, files=files,
                   **adapt.extra_run_info())
    assert json.loads((tmp_path / "run.json").read_text())["queries"] == 2 * 2 * 8
    loaded, info = load_run(tmp_path)
    assert isinstance(loaded.front, Coordinator)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    # run.json written before the move to peftsmooth.front: the old `_target_` still loads
    old = (tmp_path / "run.json").read_text().replace("peftsmooth.front.blackbox.", "peftsmooth.adapt.blackbox.")
    assert '"peftsmooth.adapt.blackbox.BlackBoxSPSA"' in old
    (tmp_path / "run.json").write_text(old)
    with torch.no_grad():
        assert torch.equal(load_run(tmp_path)[0](x), loaded(x))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("override,key", [("peft.spsa.c=0", "spsa.c"), ("peft.spsa.pairs=0", "spsa.pairs"),
                                          ("peft.spsa.momentum=1.5", "spsa.momentum"), ("peft.spsa.lr=-1", "spsa.lr")])
def test_bad_spsa_hyperparameters_fail_before_any_work(override, key):
    from peftsmooth.adapt import build_adaptation

    cfg = compose("train", [*TINY, "peft=blackbox", override])
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        build_adaptation(cfg.peft)


def test_classifier_with_wrong_output_size_is_a_user_error():
    clf = _classifier(num_classes=7)
    with pytest.raises(UserError, match="num_classes=10"):
        BlackBoxSPSA(10, IMAGE, COORD, {}).apply(clf)


def test_seal_freezes_weights_and_pins_eval_mode():
    clf = seal(_classifier())
    clf.train()
    assert not clf.backbone.training and all(not p.requires_grad for p in clf.parameters())


# ---------------------------------------------------------------- end to end: train -> certify


def test_train_records_queries_and_certify_uses_the_coordinator(tmp_path):
    from peftsmooth.commands.certify import run_certify
    from peftsmooth.commands.train import run_train
    from peftsmooth.runs import load_run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train = [*TINY, "peft=blackbox", "sigma=0.25", "peft.spsa.pairs=1", "train.epochs=2", "train.batch_size=16",
             "train.max_steps_per_epoch=2", "train.max_eval=16", "train.num_workers=0"]
    run_train(compose("train", train, run_dir=run_dir))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_step = 2 * 1 * 16                                    # 2 queries (one pair) per image per step
    assert [m["queries"] for m in metrics] == [2 * per_step, 2 * per_step]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["queries"] == 4 * per_step and info["method"] == "blackbox" and info["finished"]
    assert info["trainable_params"] == sum(p.numel() for p in load_run(run_dir)[0].front.decoder.parameters())
    assert "coordinator.safetensors" in info["files"]

    out = tmp_path / "certify"
    summary = run_certify(compose("certify", [f"run={run_dir}", "device=cpu", "certify.n0=4", "certify.n=16",
                                              "certify.alpha=0.1", "certify.max=2", "certify.batch_size=16"],
                                  run_dir=out))
    assert summary["num_images"] == 2 and summary["method"] == "blackbox" and summary["complete"]
    assert (out / "certify.tsv").read_text().count("\n") == 3   # header + 2 images


def test_cli_bad_spsa_value_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "peftsmooth", "train", *TINY, "peft=blackbox", "peft.spsa.c=0",
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "spsa.c=0" in lines[0] and "> 0" in lines[0]
    assert not run_dir.exists()


def test_resumed_spsa_run_matches_the_uninterrupted_run(tmp_path, fitted_state):
    from torch.utils.data import TensorDataset

    from peftsmooth.train.loop import TrainSettings, fit

    x, y = _digits(64)
    data = TensorDataset(x, y)

    def run(run_dir, epochs):
        run_dir.mkdir(exist_ok=True)
        adapt = BlackBoxSPSA(10, IMAGE, COORD, dict(pairs=2, lr=0.01), seed=0)
        model = adapt.apply(_classifier(fitted_state))
        step, adapt.calls = adapt.training_step, 0

        def counted(*args):
            adapt.calls += 1
            return step(*args)

        adapt.training_step = counted
        fit(model, data, sigma=0.5, settings=TrainSettings(epochs=epochs, batch_size=32), run_dir=run_dir,
            seed=0, device=torch.device("cpu"), step_hook=adapt, progress=False)
        return model.front.trainable_state_dict(), adapt

    whole, adapt_whole = run(tmp_path / "whole", 2)
    run(tmp_path / "split", 1)
    resumed, adapt_resumed = run(tmp_path / "split", 2)     # a new process would start like this
    assert adapt_resumed.calls == 2                          # only the second epoch ran (2 batches)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert adapt_resumed.queries == adapt_whole.queries == 2 * 2 * 2 * 64
