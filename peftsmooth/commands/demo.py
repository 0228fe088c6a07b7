"""`peftsmooth demo`: the real pipeline, end to end, on the embedded digits data.

It runs the same commands a researcher runs (as subprocesses, each with its own Hydra run dir
inside the demo's directory): a clean base classifier, LoRA PEFTSmoothing on noise, and
certification of both the unadapted base and the LoRA model. It then prints the comparison, copies
the LoRA model's summary.json to the demo directory and writes curve.png / curve.csv there: both
certified-accuracy curves on one plot (ACR in the legend), one column per method.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from peftsmooth.certify import results
from peftsmooth.config import hydra_app, output_dir
from peftsmooth.errors import UserError, choice_error, require
from peftsmooth.runs import read_json, write_json


def _peftsmooth(console: Console, title: str, args: list[str]) -> None:
    console.rule(f"[bold]{title}")
    console.print("$ peftsmooth " + " ".join(args), style="dim")
    done = subprocess.run([sys.executable, "-m", "peftsmooth", *args])
    if done.returncode != 0:
        raise UserError(f"demo step '{title}' failed (exit {done.returncode}); its output is above")


def _certify_dir(run_dir: Path) -> Path:
    found = sorted(run_dir.glob("certify/*/summary.json"))
    if not found:
        raise UserError(f"no certification summary under {run_dir}/certify")
    return found[-1].parent


def _compare_curves(out: Path, certs: dict[str, Path], summaries: dict[str, dict], cfg) -> None:
    """curve.csv (a column per method) and curve.png: the compared methods on one plot, ACR in the legend."""
    curves = {name: results.read_tsv(d / results.TSV_FILE) for name, d in certs.items()}
    results.write_curves_csv(curves, out / results.CURVE_CSV)
    with_acr = {name: (rows, summaries[name]["acr"]) for name, rows in curves.items()}
    results.plot_curves(with_acr, out / results.CURVE_PNG, title=f"digits, sigma={cfg.sigma:g}, n={cfg.certify.n}")


def check_demo(cfg) -> None:
    """The demo's options, before its first step trains anything: the model, sigma > 0 (it certifies
    there), epochs and batch size >= 1, and certify.* as certify reads them."""
    from omegaconf import OmegaConf

    from peftsmooth.certify.engine import Settings
    from peftsmooth.config import conf_dir, group_choices

    models = group_choices("model")
    if str(cfg.model) not in models:
        raise choice_error("model", cfg.model, models)
    require(float(cfg.sigma) > 0, f"sigma={cfg.sigma} must be > 0 (the demo certifies at it), e.g. sigma=0.25")
    for key in ("base_epochs", "lora_epochs", "batch_size"):
        require(int(cfg[key]) >= 1, f"{key}={cfg[key]} must be >= 1")
    Settings.from_config(OmegaConf.merge(OmegaConf.load(conf_dir() / "certify" / "cohen.yaml"), cfg.certify))


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of the finished steps it ran."""
    import resource

    own, steps = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + steps.ru_utime + steps.ru_stime


def _time_line(started: float, cpu_before: float, load_before: float) -> str:
    """What the demo cost on this machine: wall time, CPU seconds, cores and load (README's numbers)."""
    import os

    wall = time.monotonic() - started
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"demo time: {int(wall // 60)} min {wall % 60:.0f} s wall, {_cpu_seconds() - cpu_before:.0f} s CPU, "
            f"on {cores} cores (load average {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end)")


def run_demo(cfg) -> dict:
    import os

    started, cpu_before, load_before = time.monotonic(), _cpu_seconds(), os.getloadavg()[0]
    check_demo(cfg)
    console = Console()
    out = output_dir()
    common = ["dataset=digits", f"model={cfg.model}", *cfg.model_overrides, f"seed={cfg.seed}", f"device={cfg.device}"]
    train_common = [*common, f"train.batch_size={cfg.batch_size}", "train.num_workers=0"]  # digits live in memory
    base, lora = out / "base", out / "lora"
    certify = [f"certify.{k}={v}" for k, v in cfg.certify.items()]

    _peftsmooth(console, "1/4 clean base classifier (full fine-tuning, sigma=0)",
                ["train", *train_common, "peft=full", "sigma=0", f"train.epochs={cfg.base_epochs}",
                 "train.lr=1e-3",  # from random init: not full's fine-tuning default (1e-4)
                 f"hydra.run.dir={base}"])
    _peftsmooth(console, f"2/4 LoRA PEFTSmoothing at sigma={cfg.sigma}",
                ["train", *train_common, "peft=lora", f"sigma={cfg.sigma}", f"base={base}",
                 f"train.epochs={cfg.lora_epochs}", f"hydra.run.dir={lora}"])
    _peftsmooth(console, "3/4 certify the base classifier (no adaptation to noise)",
                ["certify", f"run={base}", f"sigma={cfg.sigma}", *certify])
    _peftsmooth(console, "4/4 certify the LoRA-adapted classifier",
                ["certify", f"run={lora}", *certify])

    compared = {"none (clean base)": (base, False), "lora": (lora, True)}
    rows = {}  # trainable params = what was trained to adapt to the noise (none for the clean base)
    for name, (run_dir, adapted) in compared.items():
        summary = read_json(_certify_dir(run_dir) / "summary.json")
        trainable = read_json(run_dir / "run.json").get("trainable_params") if adapted else 0
        rows[name] = {**summary, "trainable_params": trainable}
    shutil.copy(_certify_dir(lora) / "summary.json", out / "summary.json")
    write_json(out / "demo.json", rows)
    _compare_curves(out, {name: _certify_dir(run_dir) for name, (run_dir, _) in compared.items()}, rows, cfg)

    radii = [r for r in ("0.25", "0.5") if r in next(iter(rows.values()))["certified_accuracy"]]
    table = Table(title=f"digits, sigma={cfg.sigma}, n={cfg.certify.n}")
    for col in ("method", "trainable params", "smoothed acc", *[f"cert. acc @{r}" for r in radii], "ACR"):
        table.add_column(col, justify="right")
    for name, row in rows.items():
        table.add_row(name, f"{row['trainable_params']:,}", f"{row['clean_accuracy']:.3f}",
                      *[f"{row['certified_accuracy'][r]:.3f}" for r in radii], f"{row['acr']:.3f}")
    console.print(table)
    console.print(f"results: {out}/summary.json, {out}/curve.png, {out}/curve.csv, {out}/demo.json")
    print(_time_line(started, cpu_before, load_before), flush=True)  # one line, however narrow the terminal
    return rows


main = hydra_app("demo", run_demo, check=check_demo)
