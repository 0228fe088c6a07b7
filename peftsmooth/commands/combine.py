"""`peftsmooth combine runs=[A,B,...] weights=[w1,w2,...] combination=<c> [out=<dir>]`: a new run from trained ones.

    peftsmooth combine runs=[lora_s0.25,lora_s0.5] weights=[0.5,0.5] combination=svd
    peftsmooth combine runs=[lora_s0.25] weights=[1.5]                 # one run: its adapter at strength 1.5
    peftsmooth combine runs=[lora_s0.25,lora_s0.5,lora_s1.0] combination=ensemble
    peftsmooth certify run=outputs/combine/<name> sigma=0.375          # like any run; report lists it

The runs must share the base classifier (model config and base weights) and the method family; every
check runs before anything is written (peftsmooth.library.combine.plan), and the run directory
appears complete or not at all. out defaults to outputs/combine/<combination>_<w>x<run>+....
"""

from __future__ import annotations

import logging

from peftsmooth.certify.reference import incremental_command
from peftsmooth.config import _remove_if_unstarted, hydra_app, output_dir
from peftsmooth.library import combine

log = logging.getLogger(__name__)


def check_combine(cfg) -> combine.Plan:
    """The runs, weights, combination and out, checked (no model is built)."""
    return combine.plan(cfg)


def run_combine(cfg) -> dict:
    plan = check_combine(cfg)
    info = combine.write_run(plan)
    _remove_if_unstarted(output_dir())  # the run is in out; Hydra's job directory holds nothing else
    print(f"peftsmooth combine: {info.method}: {info.trainable_params} adapter parameters "
          f"(of {info.total_params}) -> {plan.out}")
    print(f"certify it from a parent's certificate: {incremental_command(plan.out, plan.sources[0].path)}")
    return {"out": str(plan.out), "method": info.method, "trainable_params": info.trainable_params,
            "total_params": info.total_params, "sigma": info.sigma}


main = hydra_app("combine", run_combine, check=check_combine)
