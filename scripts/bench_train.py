#!/usr/bin/env python
"""Training-step throughput: PEFT methods against full fine-tuning, same process, same model.

    python scripts/bench_train.py --model vit --model-override model.pretrained=false \
        --image-size 3 32 32 --batch-size 128 --precision bf16 --methods lora full
    python scripts/bench_train.py --smoke          # a tiny ViT on CPU in a few seconds (CI)

For every `peft=<method>` it builds the classifier of `model=<choice>` (random weights: the timing of a
step does not depend on them; ViT-B/16 sees the 32x32 native images upsampled to 224 inside f, as in
the README's quick start), adapts it as `peftsmooth train` does (`build_adaptation(cfg.peft).apply`),
and times optimizer steps of the training loop's `FirstOrderStep` (AdamW, autocast at --precision,
gradient clipping, the Gaussian-augmentation loss) on synthetic batches, after --warmup steps outside
the timed region. One JSON line per method (stdout, and appended to --out): images/s, milliseconds
per step, trainable parameters, FLOPs per image of one forward+backward (torch.utils.flop_counter,
counted on the adapted model: frozen weights get no weight gradient), achieved TFLOP/s, MFU against
the peak table of scripts/bench_certify.py, and peak memory. scripts/gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
SMOKE = dict(model="vit_tiny", model_override=["model.input_size=16", "model.kwargs.img_size=16",
                                                 "model.kwargs.depth=2", "model.kwargs.embed_dim=32",
                                                 "model.kwargs.num_heads=2"],
             image_size=[1, 8, 8], batch_size=8, steps=2, warmup=1, precision="fp32")


def bench_certify():
    """scripts/bench_certify.py as a module: its peak table, device name and memory helpers."""
    spec = importlib.util.spec_from_file_location("bench_certify", ROOT / "scripts" / "bench_certify.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_train(args, method: str):
    from hydra import compose, initialize_config_dir

    from peftsmooth.config import conf_dir

    overrides = [f"model={args.model}", *args.model_override, f"peft={method}", f"train.precision={args.precision}",
                 f"train.batch_size={args.batch_size}", f"sigma={args.sigma}"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def build_step(args, method: str, device: torch.device):
    """(adapted model, the training loop's FirstOrderStep for it) as `peftsmooth train peft=<method>` builds them."""
    from peftsmooth.adapt import build_adaptation
    from peftsmooth.distributed import DistInfo
    from peftsmooth.models import build_classifier
    from peftsmooth.train.losses import objective_from_cfg
    from peftsmooth.train.settings import TrainSettings
    from peftsmooth.train.steps import FirstOrderStep

    cfg = compose_train(args, method)
    classifier = build_classifier(cfg.model, args.num_classes, args.image_size)
    model = build_adaptation(cfg.peft).apply(classifier).to(device)
    settings = TrainSettings.from_cfg(cfg.train)
    step = FirstOrderStep(model, objective_from_cfg(cfg.train)[1], settings, DistInfo(device=device),
                          steps_per_epoch=args.warmup + args.steps)
    return model, step


def train_flops_per_image(model: nn.Module, step, args, device: torch.device, helpers) -> float:
    """FLOPs of one forward + backward per image, counted on a batch of 2 (no optimizer step), attention
    included (bench_certify.counted_attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from peftsmooth.train.losses import Batch, Progress
    from peftsmooth.train.steps import autocast

    x, noisy, y = synthetic_batch(2, args, device)
    counter = FlopCounterMode(display=False)
    model.train()
    with helpers.counted_attention(), counter:
        with autocast(device, step.autocast_dtype):
            loss, _ = step.objective(model, Batch(x, noisy, y, args.sigma, Progress()))
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def synthetic_batch(size: int, args, device: torch.device):
    x = torch.rand(size, *args.image_size, device=device)
    return x, x + args.sigma * torch.randn_like(x), torch.randint(args.num_classes, (size,), device=device)


def measure(args, method: str, device: torch.device, helpers) -> dict:
    """One method: images/s over --steps timed optimizer steps, FLOPs, MFU and peak memory."""
    gc.collect()  # the previous method's model and optimizer state leave the device's peak
    if device.type != "cpu":
        torch.accelerator.empty_cache()
    helpers.reset_peak_memory(device)
    model, step = build_step(args, method, device)
    flops = train_flops_per_image(model, step, args, device, helpers)
    x, noisy, y = synthetic_batch(args.batch_size, args, device)
    step.begin_epoch()
    for _ in range(args.warmup):
        step(x, noisy, y, args.sigma)
    helpers._sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(x, noisy, y, args.sigma)
    helpers._sync(device)
    seconds = time.perf_counter() - start
    images = args.steps * args.batch_size / seconds
    name = helpers.device_name(device)
    peak = helpers.peak_tflops(name, args.precision, args.peak_tflops)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "model": args.model, "model_override": args.model_override,
            "image_size": args.image_size, "device": str(device), "device_name": name,
            "precision": args.precision, "batch_size": args.batch_size, "steps": args.steps,
            "images_per_second": images, "ms_per_step": 1000 * seconds / args.steps,
            "trainable_params": trainable, "total_params": sum(p.numel() for p in model.parameters()),
            "flops_per_image": flops, "achieved_tflops": images * flops / 1e12, "peak_tflops": peak,
            "mfu": images * flops / 1e12 / peak if peak else None,
            "peak_memory_mb": helpers.peak_memory_mb(device), "torch": torch.__version__}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit", help="a conf/model choice")
    p.add_argument("--model-override", nargs="*", default=["model.pretrained=false"])
    p.add_argument("--image-size", nargs=3, type=int, default=[3, 32, 32], help="native C H W")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--methods", nargs="+", default=["lora", "full"], help="conf/peft choices")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", default="bf16", help="fp32 | bf16 | fp16")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per method")
    p.add_argument("--warmup", type=int, default=3, help="steps before the timed ones")
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--device", default="auto")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (else the table)")
    p.add_argument("--out", default=None, help="append the JSON lines to this file too")
    p.add_argument("--smoke", action="store_true", help="tiny ViT, two steps, CPU: a few seconds")
    return bench_certify().apply_smoke(p.parse_args(argv), SMOKE)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from peftsmooth.runtime import resolve_device

    device = resolve_device(args.device)
    helpers = bench_certify()
    torch.manual_seed(0)
    records = [measure(args, method, device, helpers) for method in args.methods]
    print(f"{'method':>8} {'trainable':>12} {'images/s':>9} {'ms/step':>8} {'GFLOP/img':>9} {'MFU':>6} {'peak MB':>8}",
          file=sys.stderr)
    for r in records:
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else f"{'-':>6}"
        print(f"{r['method']:>8} {r['trainable_params']:>12,} {r['images_per_second']:9.1f} {r['ms_per_step']:8.1f} "
              f"{r['flops_per_image'] / 1e9:9.3f} {mfu} {r['peak_memory_mb']:8.0f}", file=sys.stderr)
    for r in records:
        print(json.dumps(r))
    if args.out:
        with open(args.out, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    return records


if __name__ == "__main__":
    main()
