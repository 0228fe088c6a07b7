"""scripts/bench_certify.py in smoke mode: well-formed output only (no timing assertions)."""

import importlib.util
import json

import pytest
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_certify.py"
KEYS = {"samples_per_second", "reference_samples_per_second", "speedup", "flops_per_sample", "achieved_tflops",
        "mfu", "peak_tflops", "peak_memory_mb", "batch_size", "precision", "compile", "channels_last", "device"}


def load_script():
    spec = importlib.util.spec_from_file_location("bench_certify", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_one_json_line_per_configuration(tmp_path, capsys):
    bench = load_script()
    out = tmp_path / "bench.jsonl"
    records = bench.main(["--smoke", "--out", str(out)])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    saved = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(printed) == len(saved) == 1
    record = saved[0]
    assert KEYS <= set(record)
    assert record["samples_per_second"] > 0 and record["reference_samples_per_second"] > 0
    assert record["flops_per_sample"] > 0 and record["mfu"] is None  # no CPU peak in the table


def test_reference_sampler_counts_every_sample():
    import torch

    bench = load_script()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    counts = bench.cohen_sample_noise(model, torch.rand(1, 2, 2), 250, 64, 0.5, 3)
    assert counts.sum() == 250 and counts.shape == (3,)


def test_peak_table_lookup():
    bench = load_script()
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "bf16", None) == 989.0
    assert bench.peak_tflops("some cpu", "fp32", None) is None
    assert bench.peak_tflops("some cpu", "fp32", 2.5) == 2.5


def load_pool_script():
    path = SCRIPT.parent / "bench_pool.py"
    spec = importlib.util.spec_from_file_location("bench_pool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pool_benchmark_smoke_run_checks_rows_and_reports_fill(capsys):
    """scripts/bench_pool.py --smoke: four configurations, the pool fills more of each forward pass than
    one image at a time, with the same samples per image (the script itself checks the rows agree)."""
    records = load_pool_script().main(["--smoke", "--images", "12", "--n-max", "1000", "--n0", "16",
                                       "--batch-size", "128"])
    by = {(r["mode"], r["pool"]): r for r in records}
    assert len(by) == 4
    for mode in ("sequential", "cohen"):
        assert by[mode, True]["samples_per_image"] == by[mode, False]["samples_per_image"]
        assert by[mode, True]["forward_calls"] < by[mode, False]["forward_calls"]
        assert 0 < by[mode, False]["batch_fill"] < by[mode, True]["batch_fill"] <= 1
    assert "| sequential | pool |" in capsys.readouterr().err


def test_the_gpu_benchmark_network_is_model_rs_resnet110():
    import torch

    from peftsmooth.models.rs import CifarResNet

    assert load_pool_script().CifarResNet is CifarResNet  # the network of model=rs model.arch=cifar_resnet110
    net = CifarResNet(110)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(1.73e6, rel=0.02)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_flops_count_the_attention_matmuls_on_every_device():
    """A fused attention kernel that flop_counter has no formula for (the CPU's) is counted as its two
    matmuls: 2 x 2 L^2 D FLOPs per sample for L tokens of width D."""
    import torch

    class Attention(torch.nn.Module):
        def forward(self, x):  # x: (batch, L, D)
            q = x.unsqueeze(1)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q).squeeze(1)

    tokens, width = 7, 16
    flops = load_script().flops_per_sample(Attention(), [tokens, width], torch.device("cpu"))
    assert flops == 2 * 2 * tokens**2 * width
