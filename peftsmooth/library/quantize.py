"""Adapters stored at 8, 4, 2 or 1 bit: the quantizer, the packed file, and the adaptation that loads it.

Adapters tolerate very low precision (Jie et al. 2023 find 1-bit adapters still ahead of other
parameter-efficient methods). `peftsmooth quantize` (peftsmooth.commands.quantize) writes a run whose
adapter tensors are stored here; loading dequantizes them, and the classifier rebuilt from the
dequantized tensors is the one `certify` certifies (validity rule 5: what ran is what is certified).

One tensor, seen as a matrix (dim 0, everything else):
  scales   one per row, or one per column when there are fewer columns, so that a scale always covers
           the longer side: a Linear's weight (out <= in) gets one per output channel, LoRA's A (r, in)
           one per rank component, and so does LoRA's B (out, r), whose rows are only r long (a float16
           scale per 8 four-bit codes would double their size). 1-D tensors and vectors such as IA3's
           (96, 1) get one scale.
  b = 8/4/2  symmetric uniform levels: q = round(w / s) in [-(2^(b-1)-1), 2^(b-1)-1], s = max|w| /
           (2^(b-1)-1) over the row (or column), rounded up to float16, so |w - q s| <= s/2 for every
           element. 2 bits are the ternary levels -s, 0, s (zero stays exact).
  b = 1    sign(w) * s with s = mean|w| over the row (or column), the L1-optimal scale of a sign code
           (XNOR-Net; Jie et al.); sign(0) = +1.
  codes    q + 2^(b-1)-1 (b = 1: 1 where w >= 0) as unsigned b-bit integers, 8/b to a byte, the first
           in the low bits; each tensor's codes start on a byte boundary.

The file is one safetensors file: `__codes__` (uint8, every quantized tensor's packed codes),
`__scales__` (float16, their scales), the tensors kept as they were under their own names, and in
the metadata the bits and the quantized tensors in order (name, shape, dtype, axis). A tensor whose
scale does not fit a float16, or that is not a floating-point tensor, is kept as it is.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from peftsmooth.adapt.base import Adaptation
from peftsmooth.errors import UserError, choice_error, require
from peftsmooth.runtime import atomic_write

BITS = (8, 4, 2, 1)
QUANTIZED_FILE = "quantized.safetensors"
FORMAT = "peftsmooth.quantized/1"
CODES, SCALES = "__codes__", "__scales__"


@dataclass
class Quantized:
    """One tensor at low precision: packed codes, a float16 scale per row (axis 0) or column (axis 1)."""

    codes: torch.Tensor
    scales: torch.Tensor
    shape: tuple
    dtype: torch.dtype
    axis: int


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise choice_error("bits", bits, BITS)
    return int(bits)


# --------------------------------------------------------------------------- codes

def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned `bits`-bit integers (uint8, flat) packed 8/bits to a byte, the first in the low bits."""
    per = 8 // bits
    padded = torch.cat([codes.to(torch.int32), codes.new_zeros((-codes.numel()) % per, dtype=torch.int32)])
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (padded.view(-1, per) << shifts).sum(1).to(torch.uint8)


def unpack(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` codes of `pack`'s bytes."""
    shifts = torch.arange(8 // bits, dtype=torch.int32) * bits
    codes = (data.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count].to(torch.uint8)


def _matrix_dims(shape, axis: int) -> tuple[int, int]:
    """(number of scales, elements per scale) of a tensor of `shape` with scales along `axis`."""
    rows = int(shape[0]) if len(shape) else 1
    cols = math.prod(shape) // rows if rows else 0
    return (rows, cols) if axis == 0 else (cols, rows)


def _slices(w: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tensor as (scales, elements per scale) in float32, and the axis the scales run along."""
    m = w.detach().float().reshape(w.shape[0] if w.ndim else 1, -1)
    axis = 0 if m.shape[0] <= m.shape[1] else 1
    return (m if axis == 0 else m.t()), axis


def _float16_at_least(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float16, one step up where rounding went down (so the error bound holds)."""
    h = x.to(torch.float16)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, math.inf)), h)


def quantize(w: torch.Tensor, bits: int) -> Quantized | None:
    """`w` at `bits` bits (see the module docstring); None when it is kept as it is."""
    if not w.is_floating_point() or w.numel() == 0:
        return None
    slices, axis = _slices(w)
    if bits == 1:
        scales = slices.abs().mean(1).to(torch.float16)
        levels = (slices >= 0).to(torch.uint8)
    else:
        qmax = 2 ** (bits - 1) - 1
        scales = _float16_at_least(slices.abs().amax(1) / qmax)
        s = scales.float().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
        levels = (torch.round(slices / s).clamp(-qmax, qmax) + qmax).to(torch.uint8)
    if not torch.isfinite(scales).all():  # beyond float16 (or not finite itself)
        return None
    return Quantized(pack(levels.reshape(-1), bits), scales, tuple(w.shape), w.dtype, axis)


def dequantize(q: Quantized, bits: int) -> torch.Tensor:
    """The tensor the codes stand for, in the original shape and dtype."""
    rows, cols = _matrix_dims(q.shape, q.axis)
    levels = unpack(q.codes, bits, rows * cols).float().reshape(rows, cols)
    values = 2 * levels - 1 if bits == 1 else levels - (2 ** (bits - 1) - 1)
    m = values * q.scales.float().unsqueeze(1)
    return (m if q.axis == 0 else m.t()).reshape(q.shape).to(q.dtype).contiguous()


def quantize_state(state: dict, bits: int, keep: set[str] = frozenset()) -> tuple[dict, dict]:
    """(quantized tensors, tensors kept as they are): everything but `keep` (and what `quantize`
    keeps) at `bits` bits."""
    quantized, kept = {}, {}
    for name, tensor in state.items():
        q = None if name in keep else quantize(tensor, bits)
        if q is None:
            kept[name] = tensor
        else:
            quantized[name] = q
    return quantized, kept


# --------------------------------------------------------------------------- the file

def save_quantized(path: str | Path, quantized: dict[str, Quantized], kept: dict, bits: int) -> None:
    """One safetensors file: all codes, all scales, the kept tensors; the layout in the metadata."""
    from safetensors.torch import save_file

    require(not {CODES, SCALES} & set(kept), f"a tensor may not be named {CODES} or {SCALES}")
    entries = [[name, list(q.shape), str(q.dtype).removeprefix("torch."), q.axis] for name, q in quantized.items()]
    tensors = {CODES: torch.cat([q.codes for q in quantized.values()] or [torch.zeros(0, dtype=torch.uint8)]),
               SCALES: torch.cat([q.scales for q in quantized.values()] or [torch.zeros(0, dtype=torch.float16)]),
               **{k: v.detach().cpu().contiguous().clone() for k, v in kept.items()}}
    metadata = {"format": FORMAT, "bits": str(bits), "tensors": json.dumps(entries, separators=(",", ":"))}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_quantized(path: str | Path) -> tuple[dict[str, torch.Tensor], int]:
    """The dequantized state dict of a file `save_quantized` wrote, and its bits."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err})") from None
    require(meta.get("format") == FORMAT and CODES in tensors and SCALES in tensors,
            f"{path} is not a file written by `peftsmooth quantize` (format {meta.get('format')!r})")
    bits = check_bits(int(meta["bits"]))
    codes, scales = tensors.pop(CODES), tensors.pop(SCALES)
    at_code = at_scale = 0
    for name, shape, dtype, axis in json.loads(meta["tensors"]):
        rows, cols = _matrix_dims(shape, axis)
        nbytes = math.ceil(rows * cols * bits / 8)
        q = Quantized(codes[at_code:at_code + nbytes], scales[at_scale:at_scale + rows], tuple(shape),
                      getattr(torch, dtype), axis)
        require(q.codes.numel() == nbytes and q.scales.numel() == rows, f"{path} is truncated at {name}")
        tensors[name] = dequantize(q, bits)
        at_code, at_scale = at_code + nbytes, at_scale + rows
    require(at_code == codes.numel() and at_scale == scales.numel(), f"{path} has codes no tensor claims")
    return tensors, bits


# --------------------------------------------------------------------------- the adaptation

class QuantizedAdaptation(Adaptation):
    """A trained adapter (`inner`, the source run's adaptation) rebuilt from its quantized tensors.

    `load` dequantizes `file` and builds the inner method's model from those tensors, in memory:
    a peft tuner from the copied adapter_config.json, our own modules through their `load_state`.
    Nothing is trained further; before certification the inner method's preparation applies (the
    exact LoRA-type merge, through certify's merge_adapters)."""

    trains = False

    def __init__(self, inner, bits: int, file: str = QUANTIZED_FILE, quantize_head: bool = False):
        from peftsmooth.adapt import build_adaptation

        self.inner = inner if isinstance(inner, Adaptation) else build_adaptation(inner)  # run.json: a config
        self.bits, self.file, self.quantize_head = check_bits(bits), str(file), bool(quantize_head)
        self.name = f"{self.inner.name}-{self.bits}bit" + ("+head" if self.quantize_head else "")

    def apply(self, classifier: nn.Module) -> nn.Module:
        raise UserError(f"peft={self.name} is a quantized adapter: it is not trained further "
                        f"(train the source run, then `peftsmooth quantize` it)")

    def load(self, classifier: nn.Module, run_dir: Path) -> nn.Module:
        from peftsmooth.adapt.peft_tuners import PeftTuner

        path = Path(run_dir) / self.file
        require(path.is_file(), f"run={run_dir} has no {self.file} (written by `peftsmooth quantize`)")
        state, bits = load_quantized(path)
        require(bits == self.bits, f"{path} holds {bits}-bit codes but run.json says bits={self.bits}")
        if isinstance(self.inner, PeftTuner):
            return load_peft_state(classifier, Path(run_dir), state, path)
        return self.inner.load_state(classifier, state, path)

    def before_certify(self, model: nn.Module) -> tuple[nn.Module, list[str]]:
        return self.inner.before_certify(model)


def load_peft_state(classifier: nn.Module, run_dir: Path, state: dict, where: Path) -> nn.Module:
    """The PeftModel of run_dir's adapter_config.json on `classifier`, its adapter tensors from `state`
    (what PeftModel.from_pretrained does with adapter_model.safetensors), buffers from the run."""
    from peft import PeftConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    from peftsmooth.adapt.common import load_buffers

    require((run_dir / "adapter_config.json").is_file(), f"run={run_dir} has no adapter_config.json")
    config = PeftConfig.from_pretrained(str(run_dir))
    config.inference_mode = True
    model = PeftModel(classifier, config)
    expected = set(get_peft_model_state_dict(model))
    require(set(state) == expected, f"{where} does not fit its adapter_config.json (missing "
                                    f"{sorted(expected - set(state))[:2]}, unexpected {sorted(set(state) - expected)[:2]})")
    set_peft_model_state_dict(model, state)
    load_buffers(model, run_dir)
    return model
