"""Run directories: `run.json` (what rebuilds the classifier), atomic writes, and `load_run`.

A run directory is anything `train` or `denoise-baseline` wrote. `run.json` records the model config
(including the weights it started from), the dataset, sigma, the adaptation (`adapt`, a config with
`_target_`) and the optional front module (`front`: a denoiser or coordinator, also with
`_target_`). `load_run` turns that back into the exact classifier that was trained.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch.nn as nn

from peftsmooth.errors import UserError

RUN_FILE = "run.json"
RUN_FORMAT = 1
INIT_FILE = "init.safetensors"  # the starting weights of a randomly initialised backbone


def is_random_init(model_cfg) -> bool:
    """True when nothing but the seed defines the backbone's weights (no hub, file or checkpoint):
    such a run keeps them in INIT_FILE so that `load_run` can rebuild it exactly."""
    return not (model_cfg.get("pretrained") or model_cfg.get("weights") or model_cfg.get("checkpoint"))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def to_plain(cfg: Any) -> Any:
    """An OmegaConf node (or anything) as plain JSON-able Python, interpolations resolved."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def write_run_info(run_dir: str | Path, **fields: Any) -> dict:
    """Write `run.json` with the given fields (plus format and creation time)."""
    info = {"format": RUN_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    info.update({k: to_plain(v) for k, v in fields.items()})
    write_json(Path(run_dir) / RUN_FILE, info)
    return info


def read_run_info(run_dir: str | Path) -> dict:
    """Read `run.json`; a directory without one is a one-line UserError."""
    path = Path(str(run_dir)).expanduser() / RUN_FILE
    if not path.is_file():
        raise UserError(f"run={run_dir} is not a run directory (no {RUN_FILE}); give a directory written by train or denoise-baseline")
    try:
        info = read_json(path)
    except json.JSONDecodeError as err:
        raise UserError(f"run={run_dir}: {RUN_FILE} is not valid JSON ({err.msg})") from err
    for key in ("model", "num_classes", "image_size"):
        if key not in info:
            raise UserError(f"run={run_dir}: {RUN_FILE} has no {key!r}")
    return info


def load_run(run_dir: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the classifier a run produced, on the CPU, in eval mode, with its `run.json`."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from peftsmooth.models import build_classifier

    run_dir = Path(str(run_dir)).expanduser().resolve()
    info = read_run_info(run_dir)
    classifier = build_classifier(OmegaConf.create(info["model"]), int(info["num_classes"]), info["image_size"])
    if info.get("front"):
        classifier.front = instantiate(OmegaConf.create(info["front"])).load(run_dir)
    model: nn.Module = classifier
    if info.get("adapt"):
        model = instantiate(OmegaConf.create(info["adapt"])).load(classifier, run_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), info
