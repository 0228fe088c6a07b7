"""`peftsmooth quantize run=<dir> bits=8|4|2|1 [quantize_head=false] [out=<dir>]`: an adapter at low precision.

    peftsmooth quantize run=outputs/train/lora bits=4            # -> outputs/train/lora-4bit/
    peftsmooth certify run=outputs/train/lora-4bit sigma=0.25    # certifies the dequantized classifier

Every tensor of the trained adapter (peft's adapter_model.safetensors, or adapter.safetensors /
prompt.safetensors of our own modules) is stored at `bits` bits in quantized.safetensors
(peftsmooth.library.quantize). Stored as they were: the new classification head (peft's
`modules_to_save`; unless quantize_head=true), VeRA's shared random projections (not trained),
buffers. The output is an ordinary run directory that certify and report read like any other:
run.json (the source's, with method `<method>-<b>bit`, `adapt` the QuantizedAdaptation around the
source's adaptation and `quantized`: bits, the source and its SHA-256, the file sizes), the copied
adapter_config.json / buffers.safetensors. The backbone comes from where the source's came from.
Built in a hidden sibling directory, loaded once as certify will load it, then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from peftsmooth.config import hydra_app, output_dir
from peftsmooth.errors import UserError, require
from peftsmooth.library import quantize as q

log = logging.getLogger(__name__)

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
NOT_TRAINED = {"vera_A", "vera_B"}  # VeRA's shared random projections (save_projection=true)


@dataclass
class Plan:
    """What check_quantize found: the source run, its adaptation and files, bits and out."""

    source: Path
    info: object
    inner: object
    weights: str
    copies: list
    bits: int
    quantize_head: bool
    out: Path


def _adaptation(run, info):
    """The source run's adaptation, if it is an adapter quantize applies to (else one line why not)."""
    from peftsmooth.adapt.baselines import LinearProbe
    from peftsmooth.adapt.common import ModuleAdaptation
    from peftsmooth.adapt.peft_tuners import PeftTuner

    if info.front:
        raise UserError(f"run={run} has a front module ({info.front.get('_target_')}): quantize applies to a "
                        f"classifier's adapter, not to denoiser or black-box runs")
    if info.quantized or str((info.adapt or {}).get("_target_", "")).endswith("QuantizedAdaptation"):
        raise UserError(f"run={run} is already quantized ({(info.quantized or {}).get('bits')} bits, from "
                        f"{(info.quantized or {}).get('source')}); quantize the source run")
    inner = info.adaptation()
    if isinstance(inner, PeftTuner) or (isinstance(inner, ModuleAdaptation) and not isinstance(inner, LinearProbe)):
        return inner
    raise UserError(f"run={run} is a peft={info.method} run: quantize applies to adapters (peft tuners, prompt, "
                    f"adapter); full fine-tuning saves a whole model, linear and none no adapter")


def _files(run, source: Path, inner) -> tuple[str, list[str]]:
    """(the weights file to quantize, the files copied as they are), each checked to be there."""
    from peftsmooth.adapt.common import BUFFERS_FILE
    from peftsmooth.adapt.peft_tuners import PeftTuner

    if isinstance(inner, PeftTuner):
        weights, copies = PEFT_WEIGHTS, [PEFT_CONFIG] + ([BUFFERS_FILE] if (source / BUFFERS_FILE).is_file() else [])
    else:
        weights, copies = inner.weights_file, []
    for name in [weights, *copies]:
        require((source / name).is_file(), f"run={run} has no {name} (was the training finished?)")
    return weights, copies


def check_quantize(cfg) -> Plan:
    """Every check before anything is read beyond run.json: bits, quantize_head, the run, out."""
    from peftsmooth.runs import read_run_info

    bits = q.check_bits(cfg.get("bits"))
    head = cfg.get("quantize_head")
    require(isinstance(head, bool), f"quantize_head={head} must be true or false")
    require(bool(cfg.get("run")), "run: give the trained run to quantize, e.g. run=outputs/train/<dir>")
    source = Path(str(cfg.run)).expanduser().resolve()
    info = read_run_info(source)
    require(info.finished is not False, f"run={cfg.run} is not finished (run.json finished=false); "
                                        f"quantize a finished run")
    inner = _adaptation(cfg.run, info)
    weights, copies = _files(cfg.run, source, inner)
    default = source.parent / f"{source.name}-{bits}bit{'+head' if head else ''}"
    out = Path(str(cfg.out)).expanduser().resolve() if cfg.get("out") else default
    require(not out.exists() or (out.is_dir() and not any(out.iterdir())),
            f"out={out} already exists and is not empty; give another out= or remove it")
    return Plan(source, info, inner, weights, copies, bits, bool(head), out)


def _keep(plan: Plan, state: dict) -> set[str]:
    """The tensors stored as they are: the head (unless quantize_head), and what is no trained weight."""
    from omegaconf import OmegaConf

    from peftsmooth.adapt.common import head_module_name
    from peftsmooth.adapt.peft_tuners import PeftTuner
    from peftsmooth.models import build_classifier

    if isinstance(plan.inner, PeftTuner):
        heads = json.loads((plan.source / PEFT_CONFIG).read_text()).get("modules_to_save") or []
        untrained = {n for n in state if NOT_TRAINED & set(n.split("."))}
    else:  # our own modules: their file holds the trained parameters and the persistent buffers
        info = plan.info
        model = plan.inner.apply(build_classifier(OmegaConf.create(info.model), info.num_classes, info.image_size))
        heads = [head_module_name(model)]
        parameters = {n for n, _ in model.named_parameters()}
        untrained = {n for n in state if n not in parameters}
    in_head = {n for n in state if any(f".{h}." in f".{n}" for h in heads)}
    return untrained | (set() if plan.quantize_head else in_head)


def _record(plan: Plan, quantized: dict, kept: dict, written: Path) -> dict:
    """run.json's `quantized`: what was quantized from what, and the sizes of both files."""
    source_file = plan.source / plan.weights
    return {"bits": plan.bits, "quantize_head": plan.quantize_head, "source": str(plan.source),
            "source_file": plan.weights, "source_sha256": hashlib.sha256(source_file.read_bytes()).hexdigest(),
            "file": q.QUANTIZED_FILE, "bytes_source": source_file.stat().st_size,
            "bytes_quantized": written.stat().st_size,
            "bytes_kept": sum(t.numel() * t.element_size() for t in kept.values()),
            "tensors_quantized": len(quantized), "tensors_kept": len(kept)}


def _run_info(plan: Plan, record: dict):
    from peftsmooth.runs import command_line

    adapt = {"_target_": "peftsmooth.library.quantize.QuantizedAdaptation", "_recursive_": False,  # inner: built
             "inner": plan.info.adapt,                                                         # by build_adaptation
             "bits": plan.bits, "file": q.QUANTIZED_FILE, "quantize_head": plan.quantize_head}
    method = plan.info.method or plan.inner.name
    return plan.info.updated(command="quantize", argv=command_line("quantize"), adapt=adapt, finished=True,
                             method=f"{method}-{plan.bits}bit" + ("+head" if plan.quantize_head else ""),
                             files=[q.QUANTIZED_FILE, *plan.copies], quantized=record)


def write_run(plan: Plan) -> dict:
    """The quantized run, complete or not at all: built in a hidden sibling of out, loaded as certify
    loads it, then renamed into place (onto a missing or empty out)."""
    from peftsmooth.models import load_state_dict_file
    from peftsmooth.runs import load_run
    from peftsmooth.runtime import _umask

    state = load_state_dict_file(plan.source / plan.weights)
    quantized, kept = q.quantize_state(state, plan.bits, _keep(plan, state))
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{plan.out.name}.", dir=plan.out.parent))
    try:
        q.save_quantized(building / q.QUANTIZED_FILE, quantized, kept, plan.bits)
        for name in plan.copies:
            shutil.copy2(plan.source / name, building / name)
        record = _record(plan, quantized, kept, building / q.QUANTIZED_FILE)
        _run_info(plan, record).write(building)
        load_run(building)  # what certify will load must load
        os.chmod(building, 0o777 & ~_umask())
        os.replace(building, plan.out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return record


def run_quantize(cfg) -> dict:
    from peftsmooth.certify.reference import incremental_command
    from peftsmooth.config import _remove_if_unstarted

    plan = check_quantize(cfg)
    record = write_run(plan)
    _remove_if_unstarted(output_dir())
    print(f"peftsmooth quantize: {plan.info.method} at {plan.bits}-bit: {record['bytes_source']:,} -> "
          f"{record['bytes_quantized']:,} bytes ({record['bytes_source'] / record['bytes_quantized']:.1f}x; "
          f"{record['tensors_quantized']} tensors quantized, {record['tensors_kept']} kept) -> {plan.out}")
    print(f"certify it from its parent's certificate: {incremental_command(plan.out, plan.source)}")
    return {"out": str(plan.out), **record}


main = hydra_app("quantize", run_quantize, check=check_quantize)
