"""scripts/gpu_check.sh: the smoke mode runs every stage end to end (no timing assertions), and a stage
that fails or runs past its cap is recorded without stopping the others."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["cuda_tests", "sampler_vit", "sampler_resnet110", "pool_resnet110", "train_vit", "quickstart"]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_mode_runs_every_stage_and_writes_one_json_and_one_table(tmp_path):
    out = tmp_path / "gc"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--smoke", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=400,
                          env={**__import__("os").environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == STAGES
    assert {name: s["status"] for name, s in stages.items()} == dict.fromkeys(STAGES, "ok"), \
        {name: s["error"] for name, s in stages.items()}
    assert stages["cuda_tests"]["result"]["tests"] >= 1 and not stages["cuda_tests"]["result"]["failed"]
    vit = stages["sampler_vit"]["result"]["rows"]
    assert [(r["precision"], r["compile"]) for r in vit] == [("fp32", False), ("bf16", False), ("bf16", True)]
    assert all(r["reference_samples_per_second"] > 0 and r["flops_per_sample"] > 0 for r in vit)
    resnet = stages["sampler_resnet110"]["result"]["rows"]
    assert sorted({r["batch_size"] for r in resnet}) == [16, 32] and len(resnet) == 4
    pool = {(r["mode"], r["pool"]) for r in stages["pool_resnet110"]["result"]["rows"]}
    assert pool == {("sequential", False), ("sequential", True), ("cohen", False), ("cohen", True)}
    train = {r["method"]: r for r in stages["train_vit"]["result"]["rows"]}
    assert set(train) == {"lora", "full"} and train["lora"]["trainable_params"] < train["full"]["trainable_params"]
    quick = stages["quickstart"]["result"]
    assert quick["certify"]["num_images"] == 4 and quick["epoch"]["loss"] is not None
    table = (out / "gpu_check.md").read_text()
    assert "CPU smoke run" in table and table == done.stdout
    for title in ("Sampler throughput", "Sequential and Cohen", "Training step", "Quick start"):
        assert title in table


@pytest.mark.parametrize("fork", [False, True], ids=["subprocess", "fork"])
def test_a_failing_or_hanging_stage_is_recorded_and_the_next_one_runs(tmp_path, fork):
    gc = load_script()
    args = gc.parse_args(["--out", str(tmp_path)])
    args.fork = fork
    scripts = {"fails": "import sys\nprint('broken', file=sys.stderr)\nsys.exit(3)\n",
               "hangs": "import time\ntime.sleep(60)\n", "works": "print('{\"x\": 1}')\n"}
    for name, text in scripts.items():
        (tmp_path / f"{name}.py").write_text(text)

    def stage(name):
        return lambda ctx: {"rows": gc.json_lines(ctx.run([sys.executable, str(tmp_path / f"{name}.py")]))}

    start = time.monotonic()
    records = [gc.run_stage(name, cap, stage(name), args, start + 100) for name, cap in
               (("fails", 10), ("hangs", 1.5), ("works", 10))]
    assert time.monotonic() - start < 30
    assert [r["status"] for r in records] == ["failed", "timeout", "ok"]
    assert "exit code 3" in records[0]["error"] and "broken" in records[0]["error"]
    assert records[2]["result"] == {"rows": [{"x": 1}]}
    gc.write_report(tmp_path, {"mode": "full", "wall_s": 3.0, "stages": records, "environment": gc.environment(False)})
    assert "| hangs | timeout |" in (tmp_path / "gpu_check.md").read_text()
    assert json.loads((tmp_path / "gpu_check.json").read_text())["stages"][1]["status"] == "timeout"


def test_the_stage_caps_fit_eight_minutes_and_the_cuda_tests_are_found():
    gc = load_script()
    assert sum(cap for _, cap, _, _ in gc.STAGES) <= gc.BUDGET_S <= 480
    assert "tests/certify/test_smoothing.py" in gc.cuda_test_files()
