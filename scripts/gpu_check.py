#!/usr/bin/env python
"""The GPU figures in one command: every stage under its own time cap, one JSON file and one Markdown table.

    bash scripts/gpu_check.sh --out gpu_check/      # one GPU, <= 8 minutes, no download
    bash scripts/gpu_check.sh --smoke --out /tmp/x  # the same stages with tiny models on the CPU (CI)

Stages (docs/performance.md says what each column means):

  cuda_tests         the tests marked `@pytest.mark.cuda` (found by grep in tests/), with pytest
  sampler_vit        scripts/bench_certify.py: ViT-B/16 at 224 (random weights, CIFAR's 32x32 upsampled
                     inside f) at fp32, bf16 and bf16 + torch.compile, beside Cohen et al.'s fp32 sampler
  sampler_resnet110  the same for Cohen et al.'s CIFAR ResNet-110 (`model=rs`) at batch 400 and 4,096
  pool_resnet110     scripts/bench_pool.py: sequential and Cohen CERTIFY, pool on and off, batch 4,096
  train_vit          scripts/bench_train.py: LoRA against full fine-tuning, ViT-B/16 at 224, bf16
  quickstart         the README's quick start with the real CLI on a synthetic CIFAR-shaped
                     dataset=folder (2,000 training images): train 1 epoch, certify 20 images sequentially

Each stage runs in its own process group under its cap (the caps sum to less than --budget, 470 s by
default), so a stage that fails, crashes or hangs is recorded (status failed / timeout, exit code, the
tail of its log) and the next stage still runs. Logs of every stage are kept in <out>/logs/.
In --smoke mode (CPU, tiny models, few samples, TORCHDYNAMO_DISABLE=1 so +compile is exercised without a
cold compile) the stages run in children forked from one process that imported torch and peftsmooth
once: the same commands, seconds instead of a minute of interpreter start-ups.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
BUDGET_S = 470.0
TINY_VIT = ["model.input_size=16", "model.kwargs.img_size=16", "model.kwargs.patch_size=4", "model.kwargs.depth=2",
            "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2"]


class StageError(Exception):
    """A command of a stage failed or ran out of time."""

    def __init__(self, message: str, status: str = "failed", result: dict | None = None):
        super().__init__(message)
        self.status, self.result = status, result


@dataclass
class Context:
    """What a stage needs: where to write, the mode, and `run` for its commands (under the stage's deadline)."""

    out: Path
    smoke: bool
    stage: str
    deadline: float
    fork: bool

    def run(self, argv: list[str]) -> str:
        """Run argv (python ... / python -m ...) in ROOT; its stdout, or StageError on failure or timeout."""
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        stdout_path = logs / f"{self.stage}.stdout"
        log_path = logs / f"{self.stage}.log"
        start = stdout_path.stat().st_size if stdout_path.exists() else 0
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise StageError("no time left in the stage's cap", "timeout")
        stdout_path.touch()
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
        launch = run_forked if self.fork else run_subprocess
        code = launch(argv, stdout_path, log_path, left)
        text = stdout_path.read_bytes()[start:].decode(errors="replace")
        if code is None:
            raise StageError(f"{' '.join(argv[1:3])}: killed at the stage's cap", "timeout")
        if code != 0:
            raise StageError(f"{' '.join(argv[1:3])}: exit code {code}; {tail(log_path)}")
        return text


def run_subprocess(argv: list[str], stdout_path: Path, log_path: Path, timeout: float) -> int | None:
    """argv in a new process group; its exit code, or None after killing the group at `timeout`."""
    with open(stdout_path, "ab") as out, open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=log, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group of the process started here, and nothing else
            proc.wait()
            return None


def run_forked(argv: list[str], stdout_path: Path, log_path: Path, timeout: float) -> int | None:
    """argv run by runpy in a forked child (its own process group); as run_subprocess. Smoke mode only:
    the parent has imported the heavy modules once, and never touches an accelerator before forking."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.setpgid(0, 0)
        _exec_in_child(argv, stdout_path, log_path)
    try:
        os.setpgid(pid, pid)  # also from this side, so the group exists whoever runs first
    except OSError:
        pass  # the child has set it already (or has exec'd nothing and exited)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def _exec_in_child(argv: list[str], stdout_path: Path, log_path: Path) -> None:
    import runpy

    code = 1
    try:
        os.chdir(ROOT)
        out, log = os.open(stdout_path, os.O_WRONLY | os.O_APPEND), os.open(log_path, os.O_WRONLY | os.O_APPEND)
        os.dup2(out, 1)
        os.dup2(log, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # whatever the parent had put there
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        module = argv[2] if argv[1] == "-m" else None
        sys.argv = [argv[2 if module else 1], *argv[3 if module else 2:]]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True) if module else \
                runpy.run_path(argv[1], run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child reports any error through its log and exit code
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def tail(path: Path, lines: int = 6) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(line.strip() for line in text[-lines:])[-1200:]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# --- the stages ------------------------------------------------------------------------------


def cuda_test_files() -> list[str]:
    """The test files holding a test marked `pytest.mark.cuda`."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "pytest.mark.cuda" in p.read_text())


def stage_cuda_tests(ctx: Context) -> dict:
    files = cuda_test_files()
    if not files:
        raise StageError("no test in tests/ is marked pytest.mark.cuda")
    junit = ctx.out / "cuda_tests.xml"
    junit.unlink(missing_ok=True)  # never read a previous run's results
    argv = [sys.executable, "-m", "pytest", "-m", "cuda", "-n", "0", "-q", "-p", "no:cacheprovider",
            f"--junitxml={junit}", *files]
    try:
        ctx.run(argv)
    except StageError as err:
        if err.status == "timeout" or not junit.exists():
            raise
    cases = list(ElementTree.parse(junit).getroot().iter("testcase"))
    outcome = {case.get("classname", "") + "::" + case.get("name", ""): _outcome(case) for case in cases}
    failed = sorted(name for name, state in outcome.items() if state in ("failed", "error"))
    skipped = sorted(name for name, state in outcome.items() if state == "skipped")
    result = {"files": files, "tests": len(outcome), "passed": sum(s == "passed" for s in outcome.values()),
              "skipped": len(skipped), "failed": failed}
    if failed:
        raise StageError(f"{len(failed)} CUDA test(s) failed: {', '.join(failed)}", "failed", result)
    if skipped and not ctx.smoke:  # on the GPU machine a skipped CUDA test is a test that did not run
        raise StageError(f"{len(skipped)} CUDA test(s) skipped on the GPU run: {', '.join(skipped)}", "failed", result)
    return result


def _outcome(case) -> str:
    for state in ("failure", "error", "skipped"):
        if case.find(state) is not None:
            return {"failure": "failed"}.get(state, state)
    return "passed"


def stage_sampler_vit(ctx: Context) -> dict:
    """fp32 beside Cohen's fp32 sampler at a small n (both are slow), then bf16 and bf16 + compile at a
    larger n (a CERTIFY's partial n0 batch weighs less), each compared with that fp32 reference. One
    process per configuration: a compile that runs past the cap keeps the rows measured before it."""
    if ctx.smoke:
        model = ["--model", "vit_tiny", "--model-override", *TINY_VIT, "--image-size", "3", "16", "16",
                 "--batch-size", "64", "--n0", "16", "--repeats", "1", "--device", "cpu"]
        n_slow, n_fast = "96", "192"
    else:
        model = ["--model", "vit", "--model-override", "model.pretrained=false", "--image-size", "3", "32", "32",
                 "--batch-size", "1024", "--n0", "100", "--repeats", "2"]
        n_slow, n_fast = "2000", "20000"
    bench = [sys.executable, str(SCRIPTS / "bench_certify.py"), *model]
    rows: list[dict] = []
    try:
        rows += json_lines(ctx.run([*bench, "--configs", "fp32", "--n", n_slow]))
        reference = rows[0]["reference_samples_per_second"]
        for config in ("bf16", "bf16+compile"):
            fast = json_lines(ctx.run([*bench, "--configs", config, "--n", n_fast, "--no-reference"]))
            for row in fast:
                row.update(reference_samples_per_second=reference, speedup=row["samples_per_second"] / reference,
                           reference_n=int(n_slow))
            rows += fast
    except StageError as err:
        err.result = {"rows": rows}
        raise
    return {"rows": rows}


def stage_sampler_resnet110(ctx: Context) -> dict:
    if ctx.smoke:
        arch, batches, sizes = "cifar_resnet20", ["16", "32"], ["--n0", "16", "--n", "48", "--repeats", "1", "--device", "cpu"]
    else:
        arch, batches, sizes = "cifar_resnet110", ["400", "4096"], ["--n0", "100", "--n", "20000", "--repeats", "2"]
    args = ["--model", "rs", "--model-override", f"model.arch={arch}", "--image-size", "3", "32", "32",
            "--batch-size", *batches, "--configs", "fp32", "bf16", "--reference-once", *sizes]
    return {"rows": json_lines(ctx.run([sys.executable, str(SCRIPTS / "bench_certify.py"), *args]))}


def stage_pool_resnet110(ctx: Context) -> dict:
    if ctx.smoke:
        args = ["--smoke", "--images", "12", "--n-max", "1000", "--n0", "16", "--batch-size", "128", "--device", "cpu"]
    else:
        args = ["--resnet110", "--batch-size", "4096", "--images", "40", "--n-max", "10000", "--n0", "100",
                "--precision", "fp32"]
    return {"rows": json_lines(ctx.run([sys.executable, str(SCRIPTS / "bench_pool.py"), *args]))}


def stage_train_vit(ctx: Context) -> dict:
    args = ["--smoke"] if ctx.smoke else [
        "--model", "vit", "--model-override", "model.pretrained=false", "--image-size", "3", "32", "32",
        "--batch-size", "128", "--precision", "bf16", "--methods", "lora", "full", "--steps", "15", "--warmup", "3"]
    return {"rows": json_lines(ctx.run([sys.executable, str(SCRIPTS / "bench_train.py"), *args]))}


def synthetic_folder(root: Path, classes: int, train_per_class: int, test_per_class: int, size: int) -> Path:
    """A CIFAR-shaped dataset=folder: <root>/{train,test}/<class>/*.png, each class its own mean colour plus
    pixel noise (learnable, so the quick start's certification sees a trained model, not a constant one)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = rng.uniform(0.15, 0.85, size=(classes, 3))
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(colours[c] + rng.normal(0, 0.12, size=(size, size, 3)), 0, 1)
                Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


def quickstart_commands(ctx: Context, data: Path, run: Path) -> tuple[list[str], list[str]]:
    """`peftsmooth train` and `peftsmooth certify` of the README's quick start, on the synthetic folder."""
    cli = [sys.executable, "-m", "peftsmooth"]
    common = ["dataset=folder", f"dataset.root={data}", "sigma=0.5", "peft=lora", "train.epochs=1",
              "train.precision=bf16", f"hydra.run.dir={run}"]
    certify = ["certify=sequential", "certify.precision=bf16", f"run={run}"]
    if ctx.smoke:
        train = [*cli, "train", *common, "dataset.image_size=[3,16,16]", "model=vit_tiny", *TINY_VIT, "device=cpu",
                 "train.batch_size=16", "train.num_workers=0"]
        return train, [*cli, "certify", *certify, "certify.n0=16", "certify.n_max=256", "certify.batch_size=64",
                       "certify.skip=2", "device=cpu"]
    train = [*cli, "train", *common, "dataset.image_size=[3,32,32]", "model=vit", "model.pretrained=false"]
    return train, [*cli, "certify", *certify, "certify.n_max=10000", "certify.skip=10", "certify.batch_size=auto"]


def stage_quickstart(ctx: Context) -> dict:
    shape = (4, 10, 2, 16) if ctx.smoke else (10, 200, 20, 32)
    data = synthetic_folder(ctx.out / "quickstart" / "data", *shape)
    run = ctx.out / "quickstart" / "lora_sigma0.5"
    train, certify = quickstart_commands(ctx, data, run)
    start = time.perf_counter()
    ctx.run(train)
    train_s = time.perf_counter() - start
    epoch = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    info = json.loads((run / "run.json").read_text())
    start = time.perf_counter()
    ctx.run(certify)
    certify_s = time.perf_counter() - start
    summaries = sorted((run / "certify").rglob("summary.json"))
    if not summaries:
        raise StageError(f"certify wrote no summary.json under {run / 'certify'}")
    summary = json.loads(summaries[-1].read_text())
    keep = ("num_images", "acr", "abstain_rate", "samples_per_second", "n0", "n", "alpha", "precision", "device")
    return {"train_images": shape[0] * shape[1], "test_images": shape[0] * shape[2],
            "train_command": " ".join(train[1:]), "certify_command": " ".join(certify[1:]),
            "train_wall_s": train_s, "certify_wall_s": certify_s,
            "trainable_params": info.get("trainable_params"), "total_params": info.get("total_params"),
            "epoch": {k: epoch.get(k) for k in ("loss", "clean_acc", "noisy_acc", "time")},
            "certify": {k: summary.get(k) for k in keep if k in summary},
            "samples_per_image": _mean_samples(summaries[-1].parent / "certify.tsv")}


def _mean_samples(tsv: Path) -> float | None:
    import csv

    if not tsv.exists():
        return None
    rows = list(csv.DictReader(tsv.open(), delimiter="\t"))
    return sum(float(r["samples"]) for r in rows) / len(rows) if rows and "samples" in rows[0] else None


# Name, cap in seconds on one GPU (they sum to 465 s), cap in smoke mode, function.
STAGES: list[tuple[str, float, float, Callable[[Context], dict]]] = [
    ("cuda_tests", 35, 90, stage_cuda_tests),
    ("sampler_vit", 170, 90, stage_sampler_vit),
    ("sampler_resnet110", 55, 90, stage_sampler_resnet110),
    ("pool_resnet110", 60, 90, stage_pool_resnet110),
    ("train_vit", 45, 90, stage_train_vit),
    ("quickstart", 100, 120, stage_quickstart),
]


def run_stage(name: str, cap: float, fn: Callable[[Context], dict], args, run_deadline: float) -> dict:
    """One stage under min(its cap, what is left of the budget); whatever happens, a record of it."""
    start = time.monotonic()
    cap = min(cap, max(0.0, run_deadline - start))
    ctx = Context(Path(args.out), args.smoke, name, start + cap, args.fork)
    record = {"name": name, "status": "ok", "cap_s": cap, "wall_s": None, "error": None, "result": None}
    try:
        record["result"] = fn(ctx)
    except StageError as err:
        record.update(status=err.status, error=str(err), result=err.result)
    except Exception as err:  # noqa: BLE001 - a broken stage is recorded, the others still run
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
    record["wall_s"] = time.monotonic() - start
    print(f"gpu_check: {name}: {record['status']} in {record['wall_s']:.1f} s"
          + (f" ({record['error']})" if record["error"] else ""), file=sys.stderr, flush=True)
    return record


def environment(device: bool) -> dict:
    """Date, commit and software of this run; with `device`, the device too (asked for only after the last
    stage: the parent holds no GPU context while stages run, and forks none)."""
    import torch

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "commit": git("rev-parse", "--short", "HEAD"),
           "dirty": bool(git("status", "--porcelain", "--untracked-files=no")), "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "cpus": os.cpu_count(),
           "device": "(asked at the end)"}
    if device:
        cuda = torch.cuda.is_available()
        env.update(device=torch.cuda.get_device_name(0) if cuda else (platform.processor() or platform.machine()),
                   device_count=torch.cuda.device_count() if cuda else 0)
    return env


# --- the report ------------------------------------------------------------------------------


def _num(value, fmt: str = ",.0f") -> str:
    return "-" if value is None else format(value, fmt)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def sampler_table(stages: dict) -> list[str]:
    lines = ["| model | batch | n0 + n | precision | compile | samples/s | Cohen fp32 samples/s | speedup | "
             "GFLOP/sample | TFLOP/s | MFU | peak memory (MiB) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("sampler_vit", "sampler_resnet110"):
        for r in _rows(stages, name):
            model = " ".join([r["model"], *[o.split("=", 1)[1] for o in r["model_override"] if "arch=" in o]])
            compiled = "yes" if r["compile"] else ("failed" if r.get("compile_error") else "no")
            lines.append(f"| {model} | {r['batch_size']:,} | {r['n0'] + r['n']:,} | {r['precision']} | {compiled} | "
                         f"{_num(r['samples_per_second'])} | {_num(r['reference_samples_per_second'])} | "
                         f"{_num(r['speedup'], '.2f')} | {r['flops_per_sample'] / 1e9:.3f} | "
                         f"{_num(r['achieved_tflops'], '.2f')} | {_pct(r['mfu'])} | {_num(r['peak_memory_mb'])} |")
    return lines


def _rows(stages: dict, name: str) -> list[dict]:
    """The measured rows of a stage (none when it failed or did not run)."""
    return (stages.get(name, {}).get("result") or {}).get("rows", [])


def pool_table(stages: dict) -> list[str]:
    lines = ["| mode | images in flight | forward calls | batch fill | samples / image | wall (s) | samples/s |",
             "|---|---|---|---|---|---|---|"]
    for r in _rows(stages, "pool_resnet110"):
        lines.append(f"| {r['mode']} | {'pool' if r['pool'] else 'one'} | {r['forward_calls']:,} | "
                     f"{r['batch_fill']:.3f} | {r['samples_per_image']:,.0f} | {r['wall_s']:.2f} | "
                     f"{r['samples_per_s']:,.0f} |")
    return lines


def train_table(stages: dict) -> list[str]:
    lines = ["| method | trainable params | batch | precision | images/s | ms / step | GFLOP / image (fwd+bwd) | "
             "MFU | peak memory (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in _rows(stages, "train_vit"):
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['batch_size']} | {r['precision']} | "
                     f"{r['images_per_second']:,.1f} | {r['ms_per_step']:.1f} | {r['flops_per_image'] / 1e9:.2f} | "
                     f"{_pct(r['mfu'])} | {_num(r['peak_memory_mb'])} |")
    return lines


def quickstart_table(stages: dict) -> list[str]:
    r = stages.get("quickstart", {}).get("result")
    if not r:
        return []
    c, e = r["certify"], r["epoch"]
    return ["| step | wall (s) | result |", "|---|---|---|",
            f"| train: {r['train_images']:,} images, 1 epoch | {r['train_wall_s']:.1f} | loss {_num(e['loss'], '.3f')}, "
            f"clean acc {_num(e['clean_acc'], '.3f')}, noisy acc {_num(e['noisy_acc'], '.3f')} |",
            f"| certify: {c.get('num_images', '-')} images, sequential | {r['certify_wall_s']:.1f} | "
            f"ACR {_num(c.get('acr'), '.3f')}, {_num(r['samples_per_image'])} samples / image, "
            f"{_num(c.get('samples_per_second'))} samples/s |"]


def markdown(report: dict) -> str:
    env, stages = report["environment"], {s["name"]: s for s in report["stages"]}
    title = f"{env['device']}, {env['date']}, commit {env['commit']}{' (uncommitted changes)' if env['dirty'] else ''}"
    lines = [f"gpu_check ({report['mode']}): {title}, torch {env['torch']}, {report['wall_s']:.0f} s in all", ""]
    if report["mode"] == "smoke":
        lines += ["CPU smoke run (tiny models, few samples): it checks that the script works, not a performance figure.", ""]
    lines += ["| stage | status | wall (s) | cap (s) | note |", "|---|---|---|---|---|"]
    for s in report["stages"]:
        notes = [(s["error"] or "").replace("|", "/")[:300]]
        if s["name"] == "cuda_tests" and s["result"]:
            notes.insert(0, f"{s['result']['passed']} passed, {s['result']['skipped']} skipped of {s['result']['tests']}")
        note = "; ".join(n for n in notes if n)
        lines.append(f"| {s['name']} | {s['status']} | {_num(s['wall_s'], '.1f')} | {s['cap_s']:.0f} | {note} |")
    for title, table in (("Sampler throughput", sampler_table), ("Sequential and Cohen, pool on and off", pool_table),
                         ("Training step", train_table), ("Quick start", quickstart_table)):
        rows = table(stages)
        if len(rows) > 2:
            lines += ["", f"**{title}**", "", *rows]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> None:
    """gpu_check.json and gpu_check.md, each replaced whole (after every stage: a killed run keeps its results)."""
    for name, text in (("gpu_check.json", json.dumps(report, indent=1)), ("gpu_check.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check", help="directory for gpu_check.json, gpu_check.md and logs/")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU, in seconds (the test suite runs it)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all stages together")
    p.add_argument("--stages", nargs="+", choices=[s[0] for s in STAGES], default=None, help="a subset, in order")
    args = p.parse_args(argv)
    args.out = str(Path(args.out).resolve())  # the stages run in the repository root
    args.fork = args.smoke and hasattr(os, "fork")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        os.environ.update(TORCHDYNAMO_DISABLE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    if args.fork:  # import once here, fork per stage (no accelerator is touched before the forks)
        import peftsmooth.cli  # noqa: F401
        import pytest  # noqa: F401
        import timm  # noqa: F401
    start = time.monotonic()
    report = {"script": "scripts/gpu_check.sh", "argv": sys.argv[1:] if argv is None else list(argv),
              "mode": "smoke" if args.smoke else "full", "budget_s": args.budget, "stages": []}
    for name, cap, smoke_cap, fn in STAGES:
        if args.stages is None or name in args.stages:
            report["stages"].append(run_stage(name, smoke_cap if args.smoke else cap, fn, args, start + args.budget))
            report.update(wall_s=time.monotonic() - start, environment=environment(device=False))
            write_report(out, report)
    report.update(wall_s=time.monotonic() - start, environment=environment(device=True))
    write_report(out, report)
    print(markdown(report), end="")
    return report


if __name__ == "__main__":
    main()
