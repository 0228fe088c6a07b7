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


class Recording:
    """A stage context that records the commands a full (GPU) run would start, and answers each with
    one well-formed JSON line."""

    def __init__(self, out):
        self.out, self.smoke, self.stage, self.deadline, self.fork = out, False, "x", 0.0, False
        self.commands = []

    def run(self, argv):
        self.commands.append(argv)
        return '{"reference_samples_per_second": 1.0, "samples_per_second": 2.0}\n'


def load_bench(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_full_runs_commands_parse_and_compose(tmp_path):
    """The GPU run's command lines (which no CPU test executes) are accepted by the scripts' parsers, and
    the quick start's by Hydra, so a lent GPU's minutes are not lost to a misspelled option."""
    from conftest import compose

    gc = load_script()
    ctx = Recording(tmp_path)
    for stage in (gc.stage_sampler_vit, gc.stage_sampler_resnet110, gc.stage_pool_resnet110, gc.stage_train_vit):
        stage(ctx)
    scripts = {}
    for argv in ctx.commands:
        name = Path(argv[1]).stem
        scripts.setdefault(name, load_bench(name))
        args = scripts[name].parse_args(argv[2:])
        assert not getattr(args, "smoke", False) and getattr(args, "device", "auto") == "auto"
        if name == "bench_certify":
            assert {c[0] for c in scripts[name].configurations(args)} <= {"fp32", "bf16"}
    assert sorted(scripts) == ["bench_certify", "bench_pool", "bench_train"] and len(ctx.commands) == 6
    data = gc.synthetic_folder(tmp_path / "data", 2, 2, 1, 8)
    train, certify = gc.quickstart_commands(ctx, data, tmp_path / "run")
    assert train[2:4] == ["peftsmooth", "train"] and certify[2:4] == ["peftsmooth", "certify"]
    train_cfg = compose("train", train[4:])
    assert (train_cfg.model.pretrained, train_cfg.train.epochs, train_cfg.dataset.num_classes) == (False, 1, 2)
    certify_cfg = compose("certify", certify[4:])
    assert certify_cfg.certify.mode == "sequential" and certify_cfg.certify.n_max == 10000
