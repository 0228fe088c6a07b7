"""`peftsmooth denoise-baseline` end to end on digits with a tiny ViT and small denoisers (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, compose

from peftsmooth.commands import denoise_baseline as command
from peftsmooth.errors import UserError
from peftsmooth.models import build_classifier, load_state_dict_file, save_state_dict_file
from peftsmooth.runs import load_run, read_json, to_plain, write_run_info

SMALL_DNCNN = ["denoiser.arch.depth=4", "denoiser.arch.channels=8"]
QUICK = ["denoiser.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=32", "train.max_eval=32",
         "train.eval_batch_size=32"]


def _run(tmp_path, name: str, overrides: list[str]) -> tuple[dict, object]:
    run_dir = tmp_path / name
    run_dir.mkdir()
    cfg = compose("denoise-baseline", [*TINY, "sigma=0.25", *overrides], run_dir=run_dir)
    return command.run_denoise_baseline(cfg), run_dir


def _base_run(tmp_path):
    """A train-like run dir: the tiny ViT with fixed weights in model.safetensors, no adaptation."""
    base = tmp_path / "base"
    base.mkdir()
    cfg = compose("denoise-baseline", TINY)
    torch.manual_seed(123)
    classifier = build_classifier(cfg.model, 10, [1, 8, 8])
    save_state_dict_file(classifier.backbone.state_dict(), base / "model.safetensors")
    model_cfg = to_plain(cfg.model)
    model_cfg["checkpoint"] = str(base / "model.safetensors")
    write_run_info(base, command="train", method="full", model=model_cfg, model_name="vit_tiny",
                   dataset=to_plain(cfg.dataset), num_classes=10, image_size=[1, 8, 8], input_size=16, sigma=0.0,
                   adapt={"_target_": "peftsmooth.adapt.NoAdaptation"}, front=None, base=None,
                   files=["model.safetensors"], finished=True)
    return base


@pytest.fixture(scope="module")
def mse_run(tmp_path_factory):
    """One short MSE training of a small DnCNN in front of an off-the-shelf (random) tiny ViT."""
    tmp = tmp_path_factory.mktemp("mse")
    summary, run_dir = _run(tmp, "mse", [*SMALL_DNCNN, *QUICK])
    return summary, run_dir


def test_mse_run_directory(mse_run):
    summary, run_dir = mse_run
    info = read_json(run_dir / "run.json")
    assert info["command"] == "denoise-baseline" and info["method"] == "dncnn-mse" and info["finished"] is True
    assert info["front"]["_target_"] == "peftsmooth.front.denoisers.TrainedDenoiser"
    assert info["front"]["arch"] == {"_target_": "peftsmooth.front.denoisers.DnCNN", "image_channels": 1, "depth": 4,
                                     "channels": 8}
    assert info["adapt"] is None and info["base"] is None and info["model_name"] == "vit_tiny"
    # the random tiny ViT is kept (init.safetensors), so load_run rebuilds exactly this classifier
    assert info["files"] == ["init.safetensors", "denoiser.safetensors"]
    assert info["model"]["checkpoint"] == str(run_dir / "init.safetensors")
    denoiser_params = sum(v.numel() for k, v in load_state_dict_file(run_dir / "denoiser.safetensors").items()
                          if "running" not in k and "num_batches" not in k)
    assert info["trainable_params"] == denoiser_params < info["total_params"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and {"loss", "clean_acc", "noisy_acc", "test_mse", "lr", "time"} <= set(metrics[0])
    assert summary["noisy_acc"] == metrics[0]["noisy_acc"]


def test_load_run_is_classifier_after_denoiser(mse_run):
    """load_run puts the trained denoiser in classifier.front: output = f(D(x)) exactly."""
    _, run_dir = mse_run
    model, info = load_run(run_dir)
    cfg = compose("denoise-baseline", [*TINY, *SMALL_DNCNN])
    from hydra.utils import instantiate

    denoiser = instantiate(cfg.denoiser).load(run_dir).eval()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        expected = model.backbone(model.preprocess(denoiser(x)))
        assert torch.equal(model(x), expected)
        assert not torch.equal(model.front(x), x)  # the denoiser is really there


def test_run_json_of_earlier_versions_loads(mse_run, tmp_path):
    """A run.json written before the front stage moved to peftsmooth.front names the old `_target_`s:
    load_run rebuilds the same classifier from them."""
    from hydra.utils import get_class

    _, run_dir = mse_run
    text = (run_dir / "run.json").read_text().replace("peftsmooth.front.denoisers.", "peftsmooth.denoisers.")
    assert '"peftsmooth.denoisers.TrainedDenoiser"' in text and '"peftsmooth.denoisers.DnCNN"' in text
    (tmp_path / "run.json").write_text(text)
    (tmp_path / "denoiser.safetensors").write_bytes((run_dir / "denoiser.safetensors").read_bytes())
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_run(tmp_path)[0](x), load_run(run_dir)[0](x))
    assert get_class("peftsmooth.denoisers.PretrainedDiffusion").__module__ == "peftsmooth.front.diffusion"


def test_certify_runs_on_the_denoiser_run(mse_run, tmp_path):
    """`peftsmooth certify run=<dir>` certifies denoiser -> classifier with no special casing."""
    try:
        from peftsmooth.commands.certify import run_certify
    except ImportError as err:
        pytest.skip(f"certify is not available ({err})")
    _, run_dir = mse_run
    cfg = compose("certify", [f"run={run_dir}", "device=cpu", "certify.n0=10", "certify.n=40", "certify.max=3",
                              "certify.batch_size=40"], run_dir=tmp_path / "cert")
    summary = run_certify(cfg)
    assert summary["method"] == "dncnn-mse" and summary["num_images"] == 3
    assert summary["sigma"] == 0.25


def test_stability_keeps_classifier_bit_identical(tmp_path, monkeypatch):
    """Stability training from a base run: only the denoiser changes; the classifier's parameters and
    buffers are bit-identical afterwards, and the base's files come along for load_run."""
    base = _base_run(tmp_path)
    captured = {}
    original = command._classifier

    def capture(cfg, base_info, run_dir):
        classifier, fields = original(cfg, base_info, run_dir)
        captured["model"] = classifier
        captured["before"] = {k: v.clone() for k, v in classifier.state_dict().items()}
        return classifier, fields

    monkeypatch.setattr(command, "_classifier", capture)
    summary, run_dir = _run(tmp_path, "stab", [f"base={base}", "denoiser.objective=stability", "evaluate=false",
                                             *SMALL_DNCNN, *QUICK])
    after = captured["model"].state_dict()
    assert after.keys() == captured["before"].keys()
    assert all(torch.equal(after[k], captured["before"][k]) for k in after)
    assert not captured["model"].training

    info = read_json(run_dir / "run.json")
    base_info = read_json(base / "run.json")
    assert info["method"] == "dncnn-stability" and info["objective"] == "stability"
    assert info["model"] == base_info["model"] and info["adapt"] == base_info["adapt"]
    assert info["base"] == str(base.resolve()) and info["sigma"] == 0.25
    assert set(info["files"]) == {"model.safetensors", "denoiser.safetensors"}
    assert (run_dir / "model.safetensors").is_file()
    # the trained denoiser moved away from its identity initialization
    state = load_state_dict_file(run_dir / "denoiser.safetensors")
    assert state["dncnn.8.weight"].abs().sum() > 0
    model, _ = load_run(run_dir)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), captured["model"](model.front(x)))


def test_stab_plus_mse_starts_from_the_mse_denoiser(mse_run, tmp_path):
    """denoiser.init=<MSE run>: the stability run starts from those weights ("Stab+MSE")."""
    _, mse_dir = mse_run
    summary, run_dir = _run(tmp_path, "stab_mse", ["denoiser.objective=stability", f"denoiser.init={mse_dir}",
                                                    "denoiser.epochs=0", *SMALL_DNCNN])
    assert summary["method"] == "dncnn-stability+mse"
    start = load_state_dict_file(mse_dir / "denoiser.safetensors")
    saved = load_state_dict_file(run_dir / "denoiser.safetensors")
    assert all(torch.equal(start[k], saved[k]) for k in start)


def test_ddpm_tiny_unet_end_to_end(tmp_path):
    """A tiny random diffusers UNet (flat save_pretrained layout + cosine scheduler config): the run
    dir rebuilds as one-shot denoiser -> classifier through load_run (and certify when present)."""
    diffusers = pytest.importorskip("diffusers", reason="the diffusion extra is not installed")
    from peftsmooth.front.diffusion import OneShotDiffusion, timestep_for_sigma

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    pretrained = tmp_path / "tiny_ddpm"
    unet.save_pretrained(pretrained)
    scheduler.save_pretrained(pretrained)
    summary, run_dir = _run(tmp_path, "ddpm", ["denoiser=ddpm", f"denoiser.pretrained={pretrained}",
                                               "train.max_eval=8", "train.eval_batch_size=8"])
    info = read_json(run_dir / "run.json")
    assert info["method"] == "ddpm" and info["trainable_params"] == 0 and info["files"] == ["init.safetensors"]
    assert info["timestep"] == timestep_for_sigma(scheduler.alphas_cumprod, 0.25)
    assert info["front"]["pretrained"] == str(pretrained) and info["front"]["sigma"] == 0.25
    assert "noisy_acc" in summary

    model, _ = load_run(run_dir)
    assert isinstance(model.front, OneShotDiffusion)
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        x_t = model.front.sqrt_abar * (2 * x - 1)
        eps = unet(x_t, torch.full((2,), info["timestep"])).sample
        x0 = ((x_t - model.front.sqrt_one_minus_abar * eps) / model.front.sqrt_abar).clamp(-1, 1)
        assert torch.allclose(model.front(x), (x0 + 1) / 2, atol=1e-6)
    try:
        from peftsmooth.commands.certify import run_certify
    except ImportError:
        return
    cfg = compose("certify", [f"run={run_dir}", "device=cpu", "certify.n0=4", "certify.n=8", "certify.max=1",
                              "certify.batch_size=8"], run_dir=tmp_path / "cert")
    assert run_certify(cfg)["method"] == "ddpm"


def test_ddpm_wrong_image_size_is_a_user_error(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="the diffusion extra is not installed")
    pretrained = tmp_path / "rgb"
    diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                          block_out_channels=(8, 8), down_block_types=("DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).save_pretrained(pretrained)
    with pytest.raises(UserError, match="3x16x16 images but the dataset's images are 1x8x8"):
        _run(tmp_path, "bad", ["denoiser=ddpm", f"denoiser.pretrained={pretrained}"])
    assert not (tmp_path / "bad" / "run.json").exists()


def test_bad_input_before_any_work(tmp_path):
    with pytest.raises(UserError, match="denoiser.objective=sharpness.*classification, mse, stability"):
        _run(tmp_path, "a", ["denoiser.objective=sharpness", *SMALL_DNCNN])
    base = _base_run(tmp_path)
    cfg = compose("denoise-baseline", [f"base={base}", "dataset=cifar10"], run_dir=tmp_path)
    with pytest.raises(UserError, match="dataset=digits but dataset=cifar10; add dataset=digits"):
        command.run_denoise_baseline(cfg)
    with pytest.raises(UserError, match="no denoiser.safetensors"):
        _run(tmp_path, "b", [f"denoiser.init={base}", *SMALL_DNCNN])
    assert not any((tmp_path / d / "run.json").exists() for d in ("a", "b"))


def test_killed_run_resumes_to_the_same_metrics(tmp_path, monkeypatch):
    """A run killed after epoch 1 and started again in the same directory continues from its
    checkpoint and ends with the uninterrupted run's metrics and weights."""
    overrides = [*SMALL_DNCNN, *QUICK, "denoiser.epochs=2"]
    _, whole = _run(tmp_path, "whole", overrides)

    original = command.denoiser_evaluator

    def dies_in_epoch_2(*args, **kwargs):
        evaluate, calls = original(*args, **kwargs), []

        def wrapped(model, dist_info=None):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt  # killed before epoch 2 is checkpointed
            return evaluate(model, dist_info)

        return wrapped

    monkeypatch.setattr(command, "denoiser_evaluator", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "killed", overrides)
    monkeypatch.setattr(command, "denoiser_evaluator", original)
    killed = tmp_path / "killed"
    assert read_json(killed / "run.json")["finished"] is False
    cfg = compose("denoise-baseline", [*TINY, "sigma=0.25", *overrides], run_dir=killed)
    command.run_denoise_baseline(cfg)

    def metrics(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if k != "time"} for row in rows]

    assert metrics(killed) == metrics(whole) and len(metrics(whole)) == 2
    a, b = (load_state_dict_file(d / "denoiser.safetensors") for d in (whole, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)
