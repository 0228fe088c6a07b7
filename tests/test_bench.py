"""scripts/bench_certify.py in smoke mode: well-formed output only (no timing assertions)."""

import importlib.util
import json
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
