"""Sweeps at cluster scale: Hydra multirun names, the SLURM launcher preset, and the end-to-end
multirun -> certify -> report chain on digits with a tiny model.

SLURM itself is not available here: the preset is checked by turning it into the sbatch script
submitit would submit (with a stub `srun` on PATH); `hydra/launcher=submitit_local` runs real jobs.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from conftest import TINY, compose
from omegaconf import OmegaConf


def _sbatch_script(launcher_cfg, folder: Path) -> tuple[str, int]:
    """The sbatch file hydra-submitit-launcher would write for this launcher config (same mapping
    of keys as hydra_plugins.hydra_submitit_launcher.BaseSubmititLauncher.launch)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = OmegaConf.to_container(launcher_cfg, resolve=False)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm",
                                     slurm_max_num_timeout=params["max_num_timeout"])
    params["name"] = "peftsmooth"
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout", "_target_")})
    return executor._executor._make_submission_file_text("python -m peftsmooth", "x"), executor._executor.max_num_timeout


def test_slurm_gpu_preset_gives_a_requeueable_gpu_job(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    srun = fake / "srun"
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    cfg = compose("report", ["hydra/launcher=slurm_gpu", "hydra.launcher.partition=a100",
                              "hydra.launcher.timeout_min=240"], run_dir=tmp_path / "run")
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    script, max_num_timeout = _sbatch_script(cfg.hydra.launcher, tmp_path / "submitit")
    for flag in ["--partition=a100", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=64GB", "--time=240",
                 "--requeue", "--signal=USR2@120"]:
        assert f"#SBATCH {flag}\n" in script, flag
    assert max_num_timeout == 5   # requeued after a timeout (and always after a preemption)


@pytest.mark.parametrize("command", ["train", "certify", "denoise-baseline"])
def test_every_sweepable_command_accepts_the_preset(command, tmp_path):
    cfg = compose(command, [*TINY, "hydra/launcher=slurm_gpu"], run_dir=tmp_path)
    assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.max_num_timeout == 5


def test_train_sweep_subdirs_are_readable(tmp_path):
    cfg = compose("train", [*TINY, "peft=none", "sigma=0.25"], run_dir=tmp_path)
    assert OmegaConf.select(cfg, "hydra.sweep.subdir") == "none_vit_tiny_digits_sigma0.25"


# --------------------------------------------------------------------------- end to end

# A few optimizer steps only: the models stay near chance (the numbers are checked for being carried
# over exactly; test_report.py checks the arithmetic on non-trivial synthetic certifications).
QUICK_TRAIN = ["train.epochs=1", "train.batch_size=64", "train.max_steps_per_epoch=2", "train.warmup_epochs=0",
               "train.max_eval=16", "train.eval_batch_size=64", "train.num_workers=0"]
TINY_CERTIFY = ["certify.n0=16", "certify.n=64", "certify.skip=60", "certify.batch_size=64"]  # 6 images
SIGMAS = [0.25, 0.5, 1.0]


def _peftsmooth(args, cwd, timeout=400):
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "peftsmooth", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """`train -m` over three sigmas (basic launcher), then `certify -m` over two of the three runs
    with hydra/launcher=submitit_local (each job in its own process); the third stays uncertified."""
    root = tmp_path_factory.mktemp("sweep")
    _peftsmooth(["train", "-m", *TINY, "peft=lora", f"sigma={','.join(map(str, SIGMAS))}", *QUICK_TRAIN,
                 f"hydra.sweep.dir={root / 'train'}"], cwd=root)
    runs = {s: root / "train" / f"lora_vit_tiny_digits_sigma{s}" for s in SIGMAS}
    certified = [runs[0.25], runs[1.0]]
    _peftsmooth(["certify", "-m", "hydra/launcher=submitit_local", f"run={','.join(map(str, certified))}",
                 "device=cpu", *TINY_CERTIFY, f"hydra.sweep.dir={root / 'certify'}"], cwd=root)
    return root, runs


def test_multirun_jobs_get_readable_directories(sweep):
    root, runs = sweep
    for sigma, run in runs.items():
        info = json.loads((run / "run.json").read_text())
        assert info["finished"] and info["sigma"] == sigma and info["method"] == "lora"
    # certify -m writes each certification into its run, where a single `certify run=<dir>` would
    assert (runs[0.25] / "certify" / "cohen_sigma0.25_n64" / "summary.json").is_file()
    assert (runs[1.0] / "certify" / "cohen_sigma1_n64" / "summary.json").is_file()
    assert not (runs[0.5] / "certify").exists()
    assert sorted(p.name for p in (root / "certify").iterdir() if not p.name.startswith(".")) == ["multirun.yaml"]
    assert any((root / "certify" / ".submitit").iterdir())  # the jobs went through submitit


def test_report_over_the_sweep_equals_the_summaries(sweep, tmp_path):
    from peftsmooth.certify.results import radius_key
    from peftsmooth.commands.report import run_report
    from peftsmooth.report.render import build_report, curve_groups

    root, runs = sweep
    grid = [0.25, 0.5, 0.75, 1.0]
    cfg = compose("report", [f"dirs=[{root}]", f"out={tmp_path}"], run_dir=tmp_path / "hydra")
    out = run_report(cfg)
    rows = {r["sigma"]: r for r in out["rows"]}
    assert sorted(rows) == SIGMAS
    assert rows[0.5]["status"] == "not certified" and rows[0.5]["acr"] is None
    for sigma in (0.25, 1.0):
        summary = json.loads(next((runs[sigma] / "certify").glob("*/summary.json")).read_text())
        row = rows[sigma]
        assert row["status"] == "complete" and row["method"] == "lora" and row["model"] == "vit_tiny"
        assert row["num_images"] == summary["num_images"] == 6
        assert row["cert_time_s"] == summary["elapsed_seconds"] > 0
        assert row["acr"] == summary["acr"] and row["smoothed_accuracy"] == summary["clean_accuracy"]
        for r in grid:
            assert row[f"cert@{r:g}"] == summary["certified_accuracy"][radius_key(r)]
        assert row["trainable_params"] == json.loads((runs[sigma] / "run.json").read_text())["trainable_params"]
    md = (tmp_path / "report.md").read_text()
    assert md.count("| lora | vit_tiny |") == 3
    assert (tmp_path / "report.png").stat().st_size > 1000
    # the plotted curves are the certifications' own curves (curve.csv written by certify)
    report = build_report([root], grid)
    for cert in report.certifications:
        points = [line.split(",") for line in (cert.path / "curve.csv").read_text().splitlines()[1:]]
        radii, expected = [float(r) for r, _ in points], [float(a) for _, a in points]
        (label, members), = curve_groups(report, radii).items()
        assert label.startswith("lora (vit_tiny), cohen, n=") and len(members) == 2
        values = next(v for c, _, v in members if c.path == cert.path)
        assert values == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("script", ["digits_small.sh", "cifar10_vit_comparison.sh", "certify_multigpu.sh"])
def test_scripts_parse(script):
    import subprocess

    path = Path(__file__).resolve().parents[1] / "scripts" / script
    assert os.access(path, os.X_OK)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_certify_multigpu_usage_is_exit_2():
    import subprocess

    path = Path(__file__).resolve().parents[1] / "scripts" / "certify_multigpu.sh"
    proc = subprocess.run(["bash", str(path), "everywhere", "4"], capture_output=True, text=True)
    assert proc.returncode == 2 and "certify_multigpu.sh local K" in proc.stderr
