#!/usr/bin/env python
"""Certification throughput: our sampler against a plain Cohen-style sampler, same process, same model.

    python scripts/bench_certify.py --model vit --image-size 3 224 224 --batch-size 400 \
        --precision fp32 bf16 --compile false true --n 20000
    python scripts/bench_certify.py --model rs --model-override model.arch=cifar_resnet110 \
        --batch-size 400 4096 --configs fp32 bf16 --reference-once   # Cohen et al.'s CIFAR ResNet-110
    python scripts/bench_certify.py --smoke          # a tiny ViT on CPU in a few seconds (CI)

For every (precision, compile, channels_last) configuration it times CERTIFY of one image (n0 + n
samples, after a warm-up outside the timed region) with `peftsmooth.certify.smoothing.Smooth`, and, interleaved
with it, the reference sampler below: Cohen et al.'s `core.py` loop (fp32, `randn_like` noise, counts
copied to the host and tallied in Python after every batch). It prints a table (stderr) and one JSON
line per configuration (stdout, and appended to --out): samples/s of both, their ratio, FLOPs per
sample (torch.utils.flop_counter), achieved TFLOP/s, model FLOP utilization against the device's peak
(table below, or --peak-tflops), and peak memory. With --reference-once the reference is timed with the
first configuration of each batch size only. scripts/gpu_check.py runs it for the GPU figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

# Dense peak TFLOP/s (no 2:4 sparsity) by (device-name substring, compute dtype); the first matching
# substring wins, so the NVL boards come before their SXM namesakes. Sources: NVIDIA's H100 datasheet
# (H100 SXM / PCIe / NVL) and H200 product page (H200 SXM / NVL), whose Tensor Core figures are
# quoted with sparsity: dense = half of them (H100 SXM BF16 1,979 -> 989; TF32 989 -> 494). fp32 is the
# non-tensor FP32 rate (PyTorch's matmul default; cuDNN convolutions default to TF32:
# torch.backends.cudnn.allow_tf32, recorded with each result). A100 / L40S / RTX 4090 / V100 from their
# datasheets likewise. Override with --peak-tflops.
PEAK_TFLOPS = {
    ("H200 NVL", "bf16"): 835.0, ("H200 NVL", "fp16"): 835.0, ("H200 NVL", "tf32"): 417.0, ("H200 NVL", "fp32"): 60.0,
    ("H100 NVL", "bf16"): 835.0, ("H100 NVL", "fp16"): 835.0, ("H100 NVL", "tf32"): 417.0, ("H100 NVL", "fp32"): 60.0,
    ("H200", "bf16"): 989.0, ("H200", "fp16"): 989.0, ("H200", "tf32"): 494.0, ("H200", "fp32"): 67.0,
    ("H100 SXM", "bf16"): 989.0, ("H100 SXM", "fp16"): 989.0, ("H100 SXM", "tf32"): 494.0, ("H100 SXM", "fp32"): 67.0,
    ("H100 80GB HBM3", "bf16"): 989.0, ("H100 80GB HBM3", "fp16"): 989.0, ("H100 80GB HBM3", "tf32"): 494.0,
    ("H100 80GB HBM3", "fp32"): 67.0,
    ("H100 PCIe", "bf16"): 756.0, ("H100 PCIe", "fp16"): 756.0, ("H100 PCIe", "tf32"): 378.0, ("H100 PCIe", "fp32"): 51.0,
    ("A100", "bf16"): 312.0, ("A100", "fp16"): 312.0, ("A100", "tf32"): 156.0, ("A100", "fp32"): 19.5,
    ("L40S", "bf16"): 362.0, ("L40S", "fp16"): 362.0, ("L40S", "fp32"): 91.6,
    ("RTX 4090", "bf16"): 165.2, ("RTX 4090", "fp16"): 165.2, ("RTX 4090", "fp32"): 82.6,
    ("V100", "fp16"): 125.0, ("V100", "fp32"): 15.7,
}

SMOKE = dict(model="vit_tiny", model_override=["model.input_size=16", "model.kwargs.img_size=16",
                                                 "model.kwargs.depth=2", "model.kwargs.embed_dim=32",
                                                 "model.kwargs.num_heads=2"],
             image_size=[1, 8, 8], num_classes=10, batch_size=[64], n0=16, n=256, repeats=1,
             precision=["fp32"], compile=["false"], channels_last=["false"])


# --- the reference: Cohen et al.'s sampler, as in locuslab/smoothing code/core.py ---------------

def cohen_sample_noise(base_classifier: nn.Module, x: torch.Tensor, num: int, batch_size: int, sigma: float,
                       num_classes: int) -> np.ndarray:
    """Cohen's `_sample_noise`: fp32, noise by randn_like, host-side counting after every batch."""
    with torch.no_grad():
        counts = np.zeros(num_classes, dtype=int)
        remaining = num
        for _ in range(int(np.ceil(num / batch_size))):
            this_batch_size = min(batch_size, remaining)
            remaining -= this_batch_size
            batch = x.repeat((this_batch_size, 1, 1, 1))
            noise = torch.randn_like(batch) * sigma
            predictions = base_classifier(batch + noise).argmax(1)
            counts += _count_arr(predictions.cpu().numpy(), num_classes)
        return counts


def _count_arr(arr: np.ndarray, length: int) -> np.ndarray:
    counts = np.zeros(length, dtype=int)
    for idx in arr:
        counts[idx] += 1
    return counts


def cohen_certify(base_classifier, x, n0, n, batch_size, sigma, num_classes) -> int:
    """The sampling of Cohen's CERTIFY (selection then estimation); returns nA."""
    counts_selection = cohen_sample_noise(base_classifier, x, n0, batch_size, sigma, num_classes)
    cAHat = counts_selection.argmax().item()
    counts_estimation = cohen_sample_noise(base_classifier, x, n, batch_size, sigma, num_classes)
    return int(counts_estimation[cAHat])


# --- measuring ----------------------------------------------------------------------------------

def build_model(args) -> nn.Module:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hydra import compose, initialize_config_dir

    from peftsmooth.config import conf_dir
    from peftsmooth.models import build_classifier

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="certify", overrides=[f"model={args.model}", *args.model_override])
    model = build_classifier(cfg.model, args.num_classes, args.image_size).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def counted_attention():
    """Attention as its two matmuls while FLOPs are counted: torch.utils.flop_counter has no formula for
    some fused kernels (the CPU's flash attention), which would drop the attention from the count on one
    device and not another. ViT-B/16 at 224: 33.7 GFLOP without it, 35.1 with it (17.6 G multiply-adds)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def flops_per_sample(model: nn.Module, image_size, device) -> float:
    """FLOPs of one forward pass per sample (2 per multiply-add), counted on a batch of 2."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counted_attention(), counter:
        model(torch.rand(2, *image_size, device=device))
    return counter.get_total_flops() / 2


def timed(fns: dict, repeats: int, device) -> dict:
    """Median seconds per call of each function, interleaved (a busy machine slows all alike), after
    one warm-up call of each outside the timed region."""
    for fn in fns.values():
        fn()
    _sync(device)
    times = {key: [] for key in fns}
    for rep in range(repeats):
        order = list(fns.items())
        for key, fn in (order if rep % 2 == 0 else order[::-1]):  # alternate who goes first
            start = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - start)
    return {key: float(np.median(t)) for key, t in times.items()}


def _sync(device):
    """Wait for the device's queued work (accelerators run asynchronously; the CPU needs nothing)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def reset_peak_memory(device) -> None:
    if device.type != "cpu":
        torch.accelerator.reset_peak_memory_stats(device)


def peak_memory_mb(device) -> float:
    """The device's peak allocated memory; on the CPU the process's peak resident set."""
    if device.type != "cpu":
        return torch.accelerator.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())


def tf32_flags() -> dict:
    """Whether fp32 matmuls / convolutions may run as TF32 on CUDA (fp32 MFU is against the FP32 peak)."""
    return {"matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32}


def peak_tflops(name: str, precision: str, override: float | None) -> float | None:
    if override:
        return override
    for (key, dtype), value in PEAK_TFLOPS.items():
        if key in name and dtype == precision:
            return value
    return None


def _bool(text: str) -> bool:
    return str(text).lower() in ("1", "true", "yes", "on")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_tiny", help="a conf/model choice (vit, vit_tiny, rs, resnet50, ...)")
    parser.add_argument("--model-override", nargs="*", default=[], help="Hydra overrides of the model config")
    parser.add_argument("--image-size", nargs=3, type=int, default=[3, 32, 32], help="native C H W")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batch-size", nargs="+", default=["400"], help="ints, or auto")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--compile", nargs="+", default=["false"], help="false and/or true")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--channels-last", nargs="+", default=["false"])
    parser.add_argument("--configs", nargs="+", default=None,
                        help="instead of precision x compile x channels-last: a list such as fp32 bf16 bf16+compile "
                             "(a precision, then +compile and/or +cl)")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=2, help="timed certifications per configuration")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (else the table)")
    parser.add_argument("--no-reference", action="store_true", help="skip the Cohen-style sampler")
    parser.add_argument("--reference-once", action="store_true",
                        help="time the Cohen-style sampler with the first configuration of each batch size only "
                             "(later rows of that batch size repeat its figure)")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file too")
    parser.add_argument("--smoke", action="store_true", help="tiny ViT, small n, CPU: a few seconds")
    return apply_smoke(parser.parse_args(argv), SMOKE)


def apply_smoke(args: argparse.Namespace, smoke: dict) -> argparse.Namespace:
    """--smoke: the script's tiny settings, on the CPU unless a device was named (bench_train uses it too)."""
    if args.smoke:
        for key, value in smoke.items():
            setattr(args, key, value)
        args.device = "cpu" if args.device == "auto" else args.device
    return args


def configurations(args) -> list[tuple[str, bool, bool]]:
    """(precision, compile, channels_last) of every row: --configs as given, else the cross product."""
    if args.configs:
        out = []
        for text in args.configs:
            precision, *flags = text.split("+")
            unknown = set(flags) - {"compile", "cl"}
            if unknown:
                raise SystemExit(f"--configs {text}: unknown flag(s) {sorted(unknown)} (allowed: compile, cl)")
            out.append((precision, "compile" in flags, "cl" in flags))
        return out
    return [(p, _bool(c), _bool(cl)) for p in args.precision for c in args.compile for cl in args.channels_last]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from peftsmooth.certify.engine import AUTO_BATCH
    from peftsmooth.runtime import resolve_device

    device = resolve_device(args.device)
    eager = build_model(args).to(device)
    x = torch.rand(*args.image_size, device=device)
    context = {"flops": flops_per_sample(eager, args.image_size, device), "name": device_name(device)}
    records = []
    for bs_text in args.batch_size:
        batch_size = AUTO_BATCH.get(device.type, 256) if bs_text == "auto" else int(bs_text)
        reference = None
        for precision, compiled, channels_last in configurations(args):
            time_reference = not args.no_reference and (reference is None or not args.reference_once)
            record = measure(args, eager, x, batch_size, precision, compiled, channels_last, time_reference, context)
            if time_reference:
                reference = record["reference_samples_per_second"]
            elif reference is not None:
                record.update(reference_samples_per_second=reference, speedup=record["samples_per_second"] / reference)
            records.append(record)
    _report(records)
    if args.out:
        with open(args.out, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    return records


def measure(args, eager: nn.Module, x: torch.Tensor, batch_size: int, precision: str, compiled: bool,
            channels_last: bool, time_reference: bool, context: dict) -> dict:
    """One row: CERTIFY of x by our sampler in this configuration (and the Cohen-style sampler beside it)."""
    from peftsmooth.certify.smoothing import Smooth

    device = x.device
    reset_peak_memory(device)
    model = eager.to(memory_format=torch.channels_last) if channels_last else eager
    g = Smooth(model, args.num_classes, args.sigma, precision=precision, channels_last=channels_last)
    compile_error = g.compile(batch_size, args.image_size, mode=args.compile_mode) if compiled else None
    fns = {"ours": lambda: g.certify(x, args.n0, args.n, 0.001, batch_size, seed=0)}
    if time_reference:
        fns["reference"] = lambda: cohen_certify(eager, x, args.n0, args.n, batch_size, args.sigma, args.num_classes)
    seconds = timed(fns, args.repeats, device)
    eager.to(memory_format=torch.contiguous_format)
    ours = (args.n0 + args.n) / seconds["ours"]
    ref = (args.n0 + args.n) / seconds["reference"] if "reference" in seconds else None
    peak = peak_tflops(context["name"], precision, args.peak_tflops)
    flops = context["flops"]
    return {
        "model": args.model, "model_override": args.model_override, "image_size": args.image_size,
        "device": str(device), "device_name": context["name"], "threads": torch.get_num_threads(),
        "batch_size": batch_size, "max_batch_after_oom": g.max_batch, "precision": precision,
        "compile": compiled and compile_error is None, "compile_error": compile_error,
        "compile_mode": args.compile_mode if compiled else None, "channels_last": channels_last,
        "n0": args.n0, "n": args.n, "repeats": args.repeats,
        "samples_per_second": ours, "reference_samples_per_second": ref, "speedup": ours / ref if ref else None,
        "flops_per_sample": flops, "achieved_tflops": ours * flops / 1e12, "peak_tflops": peak,
        "mfu": ours * flops / 1e12 / peak if peak else None, "peak_memory_mb": peak_memory_mb(device),
        **(tf32_flags() if device.type == "cuda" else {}), "torch": torch.__version__,
    }


def _report(records: list[dict]) -> None:
    header = f"{'batch':>6} {'prec':>5} {'compile':>7} {'cl':>3} {'ours/s':>10} {'Cohen/s':>10} {'ratio':>6} " \
             f"{'GFLOP/smp':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak MB':>8}"
    print(header, file=sys.stderr)
    for r in records:
        ref = f"{r['reference_samples_per_second']:10.0f}" if r["reference_samples_per_second"] else f"{'-':>10}"
        ratio = f"{r['speedup']:6.2f}" if r["speedup"] else f"{'-':>6}"
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else f"{'-':>6}"
        print(f"{r['batch_size']:>6} {r['precision']:>5} {str(r['compile']):>7} {'y' if r['channels_last'] else 'n':>3} "
              f"{r['samples_per_second']:10.0f} {ref} {ratio} {r['flops_per_sample'] / 1e9:9.3f} "
              f"{r['achieved_tflops']:8.3f} {mfu} {r['peak_memory_mb']:8.0f}", file=sys.stderr)
    for r in records:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
