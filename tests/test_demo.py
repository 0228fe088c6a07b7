"""The README's 'run the main job' command, shrunk: base -> LoRA -> certify on digits, real CLI."""

import json
import os
import re
import subprocess
import sys

import pytest


def test_demo_runs_the_real_pipeline(tmp_path):
    out_dir = tmp_path / "demo"
    args = [
        "demo", "device=cpu", "base_epochs=2", "lora_epochs=1", "batch_size=128",
        "model_overrides=['model.input_size=16','model.kwargs.img_size=16','model.kwargs.depth=2',"
        "'model.kwargs.embed_dim=32','model.kwargs.num_heads=2']",
        "certify.n0=16", "certify.n=64", "certify.skip=60", "certify.batch_size=64",
        f"hydra.run.dir={out_dir}",
    ]
    done = subprocess.run([sys.executable, "-m", "peftsmooth", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]  # its own cost, for the README's time, on one line
    assert re.match(r"demo time: \d+ min \d+ s wall, \d+ s CPU, on \d+ cores \(load average", last), last
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["num_images"] == 6 and summary["n"] == 64 and summary["sigma"] == 0.25
    assert 0.0 <= summary["acr"] and 0.0 <= summary["clean_accuracy"] <= 1.0
    assert (out_dir / "curve.png").stat().st_size > 1000
    rows = json.loads((out_dir / "demo.json").read_text())
    base, lora = rows["none (clean base)"], rows["lora"]
    # curve.png overlays both methods: its data, curve.csv, has one column per method, each the
    # certified accuracy of that method's own certification
    header, *lines = (out_dir / "curve.csv").read_text().splitlines()
    assert header.split(",") == ["radius", "none (clean base)", "lora"]
    table = {float(r): (float(b), float(a)) for r, b, a in (line.split(",") for line in lines)}
    for r in (0.0, 0.25):
        expected = (base["certified_accuracy"][str(r)], lora["certified_accuracy"][str(r)])
        assert table.get(r, (0.0, 0.0)) == pytest.approx(expected, abs=1e-6), r
    assert base["trainable_params"] == 0 < lora["trainable_params"]
    assert (out_dir / "lora" / "adapter_config.json").is_file()
    assert (out_dir / "base" / "model.safetensors").is_file()
