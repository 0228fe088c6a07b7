#!/usr/bin/env python
"""Full-batch certification: forward passes, batch fill and wall time with and without images in flight.

    python scripts/bench_pool.py --run outputs/bench_pool/base      # CPU, digits (trains the base if absent)
    python scripts/bench_pool.py --resnet110 --batch-size 4096     # GPU: a ResNet-110-size CIFAR network
    python scripts/bench_pool.py --smoke                           # a tiny random model in seconds (CI)

Each configuration certifies the same images with `peftsmooth.certify.engine.certify_rows`, the code
`peftsmooth certify` runs, in one process, one after the other:

- `sequential, one image`: certify.pack=false, each look increment forwarded alone (the engine before
  the pool);
- `sequential, pool`: certify.pack=true, every forward pass filled from the images in flight;
- `cohen, one image` / `cohen, pool`: fixed-n CERTIFY at n = n_max, for the time sequential saves.

--resnet110 uses `peftsmooth.models.rs.CifarResNet(110)`, the network of `model=rs
model.arch=cifar_resnet110` (Cohen et al.'s CIFAR ResNet-110). scripts/gpu_check.py runs it at batch 4,096.

It checks that packing changed no row (prediction, radius, samples) and prints a Markdown table and
one JSON line per configuration: forward calls, batch fill (samples / (calls x batch size)), samples
per image, wall seconds and samples/s. With --resnet110 the network has random weights (the timing of
a forward pass does not depend on them) and the images are uniform noise with random labels, so the
stopping looks are not those of a trained model; on a trained model use --run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from peftsmooth.certify.engine import Settings, certify_rows
from peftsmooth.certify.smoothing import Smooth
from peftsmooth.config import conf_dir
from peftsmooth.models.rs import CifarResNet
from peftsmooth.runtime import resolve_device

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [("sequential", False), ("sequential", True), ("cohen", False), ("cohen", True)]


def settings(mode: str, pack: bool, n0: int, n_max: int, alpha: float) -> Settings:
    c = OmegaConf.load(conf_dir() / "certify" / f"{mode}.yaml")
    sizes = {"n0": n0, "n": n_max, "alpha": alpha, "pack": pack, "radii": [0.25, 0.5, 0.75, 1.0]}
    if mode == "sequential":
        sizes["n_max"] = n_max
    else:
        sizes.pop("radii")
    c.merge_with(OmegaConf.create(sizes))
    return Settings.from_config(c)


def measure(model: nn.Module, num_classes: int, sigma: float, images: list, args) -> list[dict]:
    """Every configuration of CONFIGS on the same images; the rows of pool and one-image runs must agree."""
    out, answers = [], {}
    for mode, pack in CONFIGS:
        g = Smooth(model, num_classes, sigma, precision=args.precision)
        s = settings(mode, pack, args.n0, args.n_max, args.alpha)
        _sync(args.device)
        start = time.perf_counter()
        rows = list(certify_rows(g, images, list(range(len(images))), s, 0, args.batch_size))
        _sync(args.device)
        wall = time.perf_counter() - start
        got = {r["idx"]: (r["predict"], r["radius"], r["samples"]) for r in rows}
        if mode in answers and answers[mode] != got:
            raise SystemExit(f"{mode}: rows differ between pool and one image at a time")
        answers[mode] = got
        drawn = sum(r["samples"] for r in rows)
        out.append({"mode": mode, "pool": pack, "images": len(rows), "batch_size": args.batch_size,
                    "forward_calls": g.forward_calls, "batch_fill": drawn / (g.forward_calls * args.batch_size),
                    "samples_per_image": drawn / len(rows), "wall_s": wall, "samples_per_s": drawn / wall,
                    "certified_acc_0.5": sum(r["correct"] and r["radius"] >= 0.5 for r in rows) / len(rows)})
    return out


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work before reading the clock (the CPU needs nothing)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def table(results: list[dict]) -> str:
    lines = ["| mode | images in flight | forward calls | batch fill | samples / image | wall (s) | samples/s | "
             "cert. acc @0.5 |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['mode']} | {'pool' if r['pool'] else 'one'} | {r['forward_calls']:,} | "
                     f"{r['batch_fill']:.3f} | {r['samples_per_image']:,.0f} | {r['wall_s']:.2f} | "
                     f"{r['samples_per_s']:,.0f} | {r['certified_acc_0.5']:.3f} |")
    return "\n".join(lines)


# --- the models ------------------------------------------------------------------------------


def digits_run(args) -> tuple[nn.Module, int, float, list]:
    """A trained digits run (trained here when `args.run` holds none) and its test images."""
    from peftsmooth.data import build_dataset
    from peftsmooth.runs import load_run

    run = Path(args.run)
    if not (run / "run.json").is_file() or '"finished": true' not in (run / "run.json").read_text():
        subprocess.run([sys.executable, "-m", "peftsmooth", "train", "dataset=digits", "model=vit_tiny",
                        "model.input_size=16", "model.kwargs.img_size=16", "device=cpu", "peft=full", "sigma=0.25",
                        "train.lr=1e-3", f"train.epochs={args.epochs}", "train.batch_size=64",
                        f"hydra.run.dir={run}"], check=True)
    model, info = load_run(run)
    test = build_dataset(OmegaConf.create(info.dataset), "test")
    images = [test[i] for i in range(0, len(test), args.skip)][: args.images]
    return model.to(args.device), int(info.num_classes), float(info.sigma), images


def random_images(count: int, shape: tuple[int, ...], num_classes: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(shape, generator=g), int(torch.randint(num_classes, (1,), generator=g))) for _ in range(count)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default=str(ROOT / "outputs" / "bench_pool" / "base"))
    p.add_argument("--resnet110", action="store_true", help="a ResNet-110-size CIFAR network (random weights)")
    p.add_argument("--smoke", action="store_true", help="a tiny random model, a few images (seconds)")
    p.add_argument("--images", type=int, default=60)
    p.add_argument("--skip", type=int, default=6)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n-max", type=int, default=20_000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--device", default="auto", help="auto (the first GPU, else the CPU), cpu, cuda:N, ...")
    p.add_argument("--out", help="append the JSON lines to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    args.device = resolve_device(args.device)
    torch.manual_seed(0)
    if args.smoke:
        model, num_classes, sigma = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), 3, 0.5
        images = random_images(args.images, (1, 2, 2), 3)
    elif args.resnet110:
        model, num_classes, sigma = CifarResNet(110), 10, 0.25
        images = random_images(args.images, (3, 32, 32), 10)
    else:
        model, num_classes, sigma, images = digits_run(args)
    results = measure(model.to(args.device).eval(), num_classes, sigma, images, args)
    device = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else str(args.device)
    print(f"{device}, sigma={sigma}, n0={args.n0}, n_max={args.n_max}, batch {args.batch_size}, "
          f"{len(images)} images, {args.precision}", file=sys.stderr)
    print(table(results), file=sys.stderr)
    for r in results:
        line = json.dumps({**r, "device": device, "precision": args.precision, "n_max": args.n_max})
        print(line)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return results


if __name__ == "__main__":
    main()
