"""`peftsmooth quantize`: the quantizer's error bounds, bit-exact packing, file sizes, quantized runs that
load as exactly the dequantized classifier, certify recording it, and every refusal."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import pytest
import torch
from conftest import TINY, compose
from safetensors.torch import save_file

from peftsmooth import cli
from peftsmooth.commands.quantize import check_quantize, run_quantize
from peftsmooth.commands.train import run_train
from peftsmooth.config import group_choices
from peftsmooth.errors import UserError
from peftsmooth.library.quantize import (
    BITS,
    QUANTIZED_FILE,
    Quantized,
    dequantize,
    load_quantized,
    pack,
    quantize,
    quantize_state,
    save_quantized,
    unpack,
)
from peftsmooth.models import build_classifier, load_state_dict_file
from peftsmooth.runs import load_run, read_run_info

QUICK = ["sigma=0.25", "train.epochs=1", "train.batch_size=32", "train.max_steps_per_epoch=2", "train.max_eval=32",
         "train.eval_batch_size=64", "train.num_workers=0", "train.warmup_epochs=0"]
# matrices (LoRA A and B, an expanding Linear), vectors (IA3's two layouts, a bias), a prompt, a conv
SHAPES = [(8, 96), (96, 8), (384, 96), (96, 1), (1, 128), (10,), (1, 10, 32), (6, 3, 3, 3)]


def _scales_per_element(q: Quantized) -> torch.Tensor:
    """Each element's scale, in the tensor's shape."""
    rows = q.shape[0] if q.shape else 1
    cols = math.prod(q.shape) // rows
    s = q.scales.float()
    return (s[:, None].expand(rows, cols) if q.axis == 0 else s[None, :].expand(rows, cols)).reshape(q.shape)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_levels_stay_within_half_a_scale(bits):
    gen = torch.Generator().manual_seed(bits)
    for shape in SHAPES:
        w = torch.randn(shape, generator=gen) * torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=gen)
        q = quantize(w, bits)
        err = (w - dequantize(q, bits)).abs()
        assert (err <= _scales_per_element(q) / 2 * (1 + 1e-6)).all(), (shape, bits)
        assert q.scales.dtype == torch.float16 and q.scales.numel() == min(shape[0], w.numel() // shape[0])
        assert (w.abs() <= _scales_per_element(q) * (2 ** (bits - 1) - 1)).all()  # no code was clipped
    zero = quantize(torch.zeros(4, 16), bits)
    assert torch.equal(dequantize(zero, bits), torch.zeros(4, 16))


def test_one_bit_is_sign_times_mean_abs():
    gen = torch.Generator().manual_seed(1)
    for shape in SHAPES:
        w = torch.randn(shape, generator=gen)
        w.view(-1)[0] = 0.0  # sign(0) = +1
        q = quantize(w, 1)
        m = w.reshape(shape[0], -1)
        mean = (m.abs().mean(1, keepdim=True) if q.axis == 0 else m.abs().mean(0, keepdim=True)).half().float()
        expected = torch.where(m >= 0, mean, -mean).reshape(shape)
        assert torch.equal(dequantize(q, 1), expected), shape


@pytest.mark.parametrize("bits", BITS)
def test_packing_round_trip_is_bit_exact(bits):
    for count in (1, 7, 8, 9, 1000):
        codes = torch.randint(0, 2 ** bits, (count,), generator=torch.Generator().manual_seed(count), dtype=torch.uint8)
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * bits / 8)
        assert torch.equal(unpack(packed, bits, count), codes)
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]  # low bits first


def test_what_is_kept_as_it_is():
    state = {"w": torch.randn(4, 8), "steps": torch.tensor([3]), "empty": torch.zeros(0, 3),
             "huge": torch.full((2, 2), 1e6), "head": torch.randn(2, 8)}
    quantized, kept = quantize_state(state, 4, keep={"head"})
    assert set(quantized) == {"w"} and set(kept) == {"steps", "empty", "huge", "head"}
    assert quantize(torch.full((2, 2), 1e6), 1) is None  # a scale beyond float16


def _lora_tensors(dim=96, depth=4, r=8):
    """LoRA r=8 on every block linear of the measured ViT (dim 96, depth 4), and its 10-class head."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for b in range(depth):
        for name, (i, o) in {"attn.qkv": (dim, 3 * dim), "attn.proj": (dim, dim), "mlp.fc1": (dim, 4 * dim),
                             "mlp.fc2": (4 * dim, dim)}.items():
            prefix = f"base_model.model.backbone.blocks.{b}.{name}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(r, i, generator=gen) / i ** 0.5
            state[f"{prefix}.lora_B.weight"] = torch.randn(o, r, generator=gen) / 10
    head = {"base_model.model.backbone.head.weight": torch.randn(10, dim, generator=gen),
            "base_model.model.backbone.head.bias": torch.randn(10, generator=gen)}
    return state, head


def test_file_round_trip_and_sizes(tmp_path):
    adapter, head = _lora_tensors()
    save_file({**adapter, **head}, str(tmp_path / "fp32.safetensors"))
    fp32 = os.path.getsize(tmp_path / "fp32.safetensors")
    sizes = {}
    for bits in BITS:
        quantized, kept = quantize_state({**adapter, **head}, bits, keep=set(head))
        path = tmp_path / f"q{bits}.safetensors"
        save_quantized(path, quantized, kept, bits)
        sizes[bits] = os.path.getsize(path)
        state, read_bits = load_quantized(path)
        assert read_bits == bits and set(state) == set(adapter) | set(head)
        assert all(torch.equal(state[k], dequantize(q, bits)) for k, q in quantized.items())
        assert all(torch.equal(state[k], v) for k, v in head.items())  # the head stays fp32
    assert sizes[8] > sizes[4] > sizes[2] > sizes[1]
    assert fp32 / sizes[4] >= 6, f"4 bits: {fp32} -> {sizes[4]} bytes, {fp32 / sizes[4]:.2f}x (head fp32 in both)"
    assert fp32 / sizes[8] >= 3.5 and fp32 / sizes[1] >= 12


# --------------------------------------------------------------------------- quantized runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny trained runs (lora, adapter, prompt) and their quantized copies."""
    root = tmp_path_factory.mktemp("quantize")
    for method in ("lora", "adapter", "prompt"):
        run_train(compose("train", TINY + QUICK + [f"peft={method}"], run_dir=root / method))
    made = {}
    for method, bits, head in (("lora", 4, False), ("lora", 1, True), ("adapter", 2, False), ("prompt", 8, True)):
        overrides = [f"run={root / method}", f"bits={bits}", f"quantize_head={str(head).lower()}"]
        made[method, bits] = run_quantize(compose("quantize", overrides, run_dir=root / "hydra"))
    return root, made


def _logits(model, seed=0):
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("bits, head", [(4, False), (1, True)])
def test_quantized_lora_run_is_the_dequantized_classifier(runs, bits, head, tmp_path):
    from omegaconf import OmegaConf
    from peft import PeftModel

    root, made = runs
    out = root / (f"lora-{bits}bit" + ("+head" if head else ""))
    assert made["lora", bits]["out"] == str(out)
    info = read_run_info(out)
    assert info.command == "quantize" and info.method == f"lora-{bits}bit" + ("+head" if head else "")
    assert info.quantized["bits"] == bits and info.quantized["source"] == str(root / "lora")
    assert sorted(info.files) == ["adapter_config.json", QUANTIZED_FILE]
    assert sorted(os.listdir(out)) == sorted([*info.files, "run.json"])
    assert info.quantized["bytes_quantized"] == os.path.getsize(out / QUANTIZED_FILE) < info.quantized["bytes_source"]

    state, _ = load_quantized(out / QUANTIZED_FILE)
    source = load_state_dict_file(root / "lora" / "adapter_model.safetensors")
    head_keys = {k for k in source if ".head." in k}
    assert set(state) == set(source) and all(torch.equal(state[k], source[k]) != head for k in head_keys)
    shutil.copy(out / "adapter_config.json", tmp_path / "adapter_config.json")
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    classifier = build_classifier(OmegaConf.create(info.model), 10, [1, 8, 8])
    by_hand = PeftModel.from_pretrained(classifier, str(tmp_path)).eval()
    model, _ = load_run(out)
    assert torch.equal(_logits(model), _logits(by_hand))
    fp32, _ = load_run(root / "lora")
    assert not torch.equal(_logits(model), _logits(fp32))


@pytest.mark.parametrize("method, bits", [("adapter", 2), ("prompt", 8)])
def test_quantized_module_run_is_the_dequantized_classifier(runs, method, bits, tmp_path):
    from omegaconf import OmegaConf

    root, made = runs
    out = made[method, bits]["out"]
    info, source_info = read_run_info(out), read_run_info(root / method)
    inner = source_info.adaptation()
    state, _ = load_quantized(f"{out}/{QUANTIZED_FILE}")
    source = load_state_dict_file(root / method / inner.weights_file)
    assert set(state) == set(source)
    quantize_head = bits == 8
    assert torch.equal(state["backbone.head.weight"], source["backbone.head.weight"]) != quantize_head
    save_file(state, str(tmp_path / inner.weights_file))
    by_hand = inner.load(build_classifier(OmegaConf.create(info.model), 10, [1, 8, 8]), tmp_path).eval()
    model, _ = load_run(out)
    assert torch.equal(_logits(model), _logits(by_hand))
    assert info.files == [QUANTIZED_FILE] and info.quantized["tensors_kept"] == (0 if quantize_head else 2)


# boft is left out for time only (its first layer tries to build a CUDA extension, ~10 s); it quantizes
# like oft (the same orthogonal parametrisation, one more tensor per layer)
ADAPTERS = [m for m in group_choices("peft") if m not in ("linear", "full", "none", "blackbox", "blackbox_fo", "boft")]


@pytest.fixture(scope="module")
def tiny_model():
    return compose("train", TINY).model


@pytest.mark.parametrize("method", ADAPTERS)
def test_every_adapter_method_quantizes_and_loads_as_its_dequantized_tensors(method, tiny_model, tmp_path):
    """Each method's run (apply, weights moved off their init, save, run.json), quantized at 2 bits:
    load_run gives the method's own loader on a directory holding the dequantized tensors."""
    from omegaconf import OmegaConf

    from peftsmooth.adapt import build_adaptation
    from peftsmooth.commands.quantize import write_run
    from peftsmooth.config import conf_dir
    from peftsmooth.models import save_state_dict_file
    from peftsmooth.runs import to_plain, write_run_info

    peft_cfg = OmegaConf.load(conf_dir() / "peft" / f"{method}.yaml")
    adapt, run, hand = build_adaptation(peft_cfg), tmp_path / method, tmp_path / "by_hand"
    run.mkdir()
    classifier = build_classifier(tiny_model, 10, [1, 8, 8])
    save_state_dict_file(classifier.backbone.state_dict(), run / "init.safetensors")
    model = adapt.apply(classifier)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    files = adapt.save(model, run)
    model_cfg = dict(to_plain(tiny_model), checkpoint=str(run / "init.safetensors"))
    write_run_info(run, model=model_cfg, num_classes=10, image_size=[1, 8, 8], adapt=to_plain(peft_cfg), front=None,
                   method=method, files=files, finished=True)
    options = OmegaConf.create({"run": str(run), "bits": 2, "quantize_head": False, "out": None})
    out = str(check_quantize(options).out)
    write_run(check_quantize(options))

    hand.mkdir()
    weights = read_run_info(out).quantized["source_file"]
    for name in files:
        if name != weights:
            shutil.copy(run / name, hand / name)
    save_file(load_quantized(f"{out}/{QUANTIZED_FILE}")[0], str(hand / weights))
    by_hand = adapt.load(build_classifier(OmegaConf.create(model_cfg), 10, [1, 8, 8]), hand).eval()
    quantized, _ = load_run(out)
    assert torch.equal(_logits(quantized), _logits(by_hand))


def test_certify_and_report_treat_a_quantized_run_like_any_other(runs, tmp_path):
    from peftsmooth.commands.certify import run_certify
    from peftsmooth.report.table import build_report

    root, made = runs
    out = made["lora", 4]["out"]
    summary = run_certify(compose("certify", [f"run={out}", "device=cpu", "certify.n0=8", "certify.n=16",
                                              "certify.max=2", "sigma=0.25"], run_dir=tmp_path / "cert"))
    assert summary["method"] == "lora-4bit" and summary["run"] == out and summary["num_images"] == 2
    assert summary["quantized"] == read_run_info(out).quantized and summary["merged_adapters"] == ["LORA"]
    written = json.loads((tmp_path / "cert" / "summary.json").read_text())
    assert written["quantized"]["bits"] == 4
    rows = [r for r in build_report([tmp_path, root]).rows if r["method"] == "lora-4bit"]
    assert len(rows) == 1 and rows[0]["acr"] is not None


# --------------------------------------------------------------------------- refusals


def _fake_run(root, name, **changes):
    """A copy of the lora run's run.json (and nothing else unless `files`) with some keys changed."""
    run = root / "fakes" / name
    run.mkdir(parents=True, exist_ok=True)
    info = json.loads((root / "lora" / "run.json").read_text())
    for f in changes.pop("files", []):
        shutil.copy(root / "lora" / f, run / f)
    (run / "run.json").write_text(json.dumps({**info, **changes}))
    return run


def _refusals(root):
    (root / "full_out").mkdir(exist_ok=True)
    (root / "full_out" / "x").write_text("")
    lora = f"run={root / 'lora'}"
    return [
        ([lora, "bits=3"], "bits=3 is not allowed (choose from: 1, 2, 4, 8)"),
        ([lora, "bits=true"], "bits=True is not allowed"),
        ([lora], "bits=None is not allowed"),
        ([lora, "bits=4", "quantize_head=maybe"], "quantize_head=maybe must be true or false"),
        (["bits=4"], "run: give the trained run"),
        ([f"run={root / 'nothing'}", "bits=4"], ": no such directory"),
        ([f"run={_fake_run(root, 'unfinished', finished=False)}", "bits=4"], "is not finished"),
        ([f"run={_fake_run(root, 'front', front={'_target_': 'peftsmooth.front.denoisers.Denoiser'})}", "bits=4"],
         "not to denoiser or black-box runs"),
        ([f"run={_fake_run(root, 'full', method='full', adapt={'_target_': 'peftsmooth.adapt.baselines.FullFineTuning'})}",
          "bits=4"], "is a peft=full run: quantize applies to adapters"),
        ([f"run={_fake_run(root, 'linear', method='linear', adapt={'_target_': 'peftsmooth.adapt.baselines.LinearProbe'})}",
          "bits=4"], "is a peft=linear run"),
        ([f"run={_fake_run(root, 'none', method='none', adapt={'_target_': 'peftsmooth.adapt.NoAdaptation'})}", "bits=4"],
         "is a peft=none run"),
        ([f"run={root / 'lora-4bit'}", "bits=2"], "is already quantized (4 bits"),
        ([f"run={_fake_run(root, 'no_weights', files=['adapter_config.json'])}", "bits=4"],
         "has no adapter_model.safetensors"),
        ([lora, "bits=4", f"out={root / 'full_out'}"], "already exists and is not empty"),
        ([lora, "bits=4"], "lora-4bit already exists and is not empty"),  # the default out, made by the fixture
    ]


def test_every_refusal(runs):
    from omegaconf import OmegaConf

    root, _ = runs
    base = compose("quantize")
    before = sorted(p.name for p in root.iterdir())
    for argv, needle in _refusals(root):
        cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(argv))
        with pytest.raises(UserError) as refused:
            check_quantize(cfg)
        assert needle in str(refused.value), (argv, str(refused.value))
    assert sorted(p.name for p in root.iterdir()) == sorted({*before, "fakes", "full_out"})  # nothing written


def test_refused_through_the_cli_in_one_line_before_hydra_starts(runs, tmp_path, monkeypatch, capsys):
    root, _ = runs
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["peftsmooth"])
    for argv, needle in [(["bits=3"], "bits=3 is not allowed"), (["bits=2"], "is already quantized")]:
        with pytest.raises(SystemExit) as exited:
            cli.main(["quantize", f"run={root / 'lora-4bit'}", *argv])
        err = capsys.readouterr().err.strip()
        assert exited.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert err.startswith("peftsmooth quantize: error: ") and needle in err, (argv, err)
    assert list(tmp_path.iterdir()) == []  # no Hydra directory
    assert not any(p.name.startswith(".") for p in root.iterdir())  # no half-built run
