"""Run directories: the `run.json` schema (`RunInfo`) and `load_run`.

A run directory is anything `train` or `denoise-baseline` wrote. `run.json` records the model config
(including the weights it started from), the dataset, sigma, the adaptation (`adapt`, a config with
`_target_`) and the optional front module (`front`: a denoiser or coordinator, also with
`_target_`). It is written and read through one typed schema, `RunInfo`; `load_run` turns it back
into the exact classifier that was trained.

The lifecycle of a run being written (`Run`) is in `peftsmooth.train.run`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch.nn as nn

from peftsmooth.errors import UserError
from peftsmooth.runtime import atomic_write_text, freeze

__all__ = ["RUN_FILE", "INIT_FILE", "RunInfo", "read_run_info", "write_run_info", "load_run",
           "is_random_init", "to_plain", "read_json", "write_json", "atomic_write_text"]

RUN_FILE = "run.json"
RUN_FORMAT = 1
INIT_FILE = "init.safetensors"  # the starting weights of a randomly initialised backbone


def is_random_init(model_cfg) -> bool:
    """True when nothing but the seed defines the backbone's weights (no hub, file or checkpoint):
    such a run keeps them in INIT_FILE so that `load_run` can rebuild it exactly."""
    return not (model_cfg.get("pretrained") or model_cfg.get("weights") or model_cfg.get("checkpoint"))


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


# --------------------------------------------------------------------------- run.json

_INT, _NUMBER, _TEXT = (int,), (int, float), (str,)
# run.json key -> accepted types (None is accepted for every key but the three REQUIRED ones)
_TYPES: dict[str, tuple[type, ...]] = {
    "format": _INT, "created": _TEXT, "command": _TEXT, "method": _TEXT, "model": (dict,), "model_name": _TEXT,
    "dataset": (dict,), "num_classes": _INT, "image_size": (list,), "input_size": _INT, "sigma": _NUMBER,
    "adapt": (dict,), "front": (dict,), "base": _TEXT, "trainable_params": _INT, "total_params": _INT,
    "files": (list,), "argv": (str, list), "seed": _INT, "finished": (bool,), "quantized": (dict,),
}
REQUIRED = ("model", "num_classes", "image_size")


@dataclass
class RunInfo(Mapping):
    """The contents of `run.json`: the fields every run has, plus a command's or method's own fields
    in `extra` (e.g. `loss` and `train` for train, `objective` and `timestep` for denoise-baseline,
    `queries` for the black-box methods), written at the top level of the file.

    Read-only mapping access (`info["sigma"]`, `info.get("front")`) sees exactly the file's keys."""

    format: int = RUN_FORMAT
    created: str | None = None
    command: str | None = None
    method: str | None = None
    model: dict = field(default_factory=dict)        # the model config, `checkpoint` = the starting weights
    model_name: str | None = None
    dataset: dict | None = None
    num_classes: int = 0
    image_size: list = field(default_factory=list)   # native (C, H, W)
    input_size: int | None = None
    sigma: float | None = None
    adapt: dict | None = None                        # the adaptation config (`_target_`), None: none
    front: dict | None = None                        # the front module config (`_target_`), None: none
    base: str | None = None                          # the run this one started from
    trainable_params: int | None = None
    total_params: int | None = None
    files: list = field(default_factory=list)        # what load_run needs besides run.json
    argv: str | list | None = None                   # the command line (a list in older runs)
    seed: int | None = None
    finished: bool | None = None
    quantized: dict | None = None                    # `peftsmooth quantize`: bits, source, sizes
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, to_plain(getattr(self, f.name)))
        self.extra = {k: to_plain(v) for k, v in self.extra.items()}

    @classmethod
    def from_fields(cls, **values: Any) -> "RunInfo":
        """From run.json's keys: the schema's fields by name, every other key into `extra`."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in values.items() if k in known},
                   extra={k: v for k, v in values.items() if k not in known})

    def updated(self, **values: Any) -> "RunInfo":
        """A copy with some keys changed (schema fields or extra keys)."""
        other = RunInfo.from_fields(**values)
        known = {k: getattr(other, k) for k in values if k not in other.extra}
        return dataclasses.replace(self, **known, extra={**self.extra, **other.extra})

    def as_dict(self) -> dict:
        """run.json's contents, in the file's key order."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    def check(self, where: str) -> None:
        """A UserError naming the first key that is missing or of the wrong type."""
        values = self.as_dict()
        for key in REQUIRED:
            if values[key] in (None, 0, [], {}):
                raise UserError(f"{where}: {RUN_FILE} has no {key!r}")
        for key, types in _TYPES.items():
            value = values[key]
            if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
                raise UserError(f"{where}: {RUN_FILE} has {key}={value!r}, not a {'/'.join(t.__name__ for t in types)}")

    def write(self, run_dir: str | Path) -> "RunInfo":
        """Write `run.json` atomically, stamped with the time of writing; returns what was written."""
        info = dataclasses.replace(self, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        info.check(f"run={run_dir}")
        write_json(Path(run_dir) / RUN_FILE, info.as_dict())
        return info

    @classmethod
    def read(cls, run_dir: str | Path, key: str = "run") -> "RunInfo":
        """Read and check `run.json`; a directory without a valid one is a one-line UserError that names
        `key`, the option the user gave the directory with (run, base, resume, ...)."""
        folder = Path(str(run_dir)).expanduser()
        path = folder / RUN_FILE
        if not folder.exists():
            raise UserError(f"{key}={run_dir}: no such directory")
        if not path.is_file():
            raise UserError(f"{key}={run_dir} is not a run directory (no {RUN_FILE}); "
                            f"give a directory written by train or denoise-baseline")
        try:
            values = read_json(path)
        except json.JSONDecodeError as err:
            raise UserError(f"{key}={run_dir}: {RUN_FILE} is not valid JSON ({err.msg})") from err
        if not isinstance(values, dict):
            raise UserError(f"{key}={run_dir}: {RUN_FILE} is not a JSON object")
        for field in REQUIRED:
            if field not in values:
                raise UserError(f"{key}={run_dir}: {RUN_FILE} has no {field!r}")
        info = cls.from_fields(**values)
        info.check(f"{key}={run_dir}")
        return info

    def adaptation(self):
        """The adaptation object that produced this run (NoAdaptation when `adapt` is null)."""
        from peftsmooth.adapt import NoAdaptation, build_adaptation

        return build_adaptation(self.adapt) if self.adapt else NoAdaptation()

    # read-only mapping over run.json's keys (callers that index run.json like a dict keep working)
    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())


def read_run_info(run_dir: str | Path, key: str = "run") -> RunInfo:
    """`run.json` of a run directory, checked (see RunInfo.read; errors name `key`)."""
    return RunInfo.read(run_dir, key)


def write_run_info(run_dir: str | Path, **values: Any) -> RunInfo:
    """Write `run.json` with the given keys (plus format and creation time)."""
    return RunInfo.from_fields(**values).write(run_dir)


MOVABLE_MODEL_KEYS = ("factory", "weights", "checkpoint")  # what `certify run=... model.KEY=` may override


def run_model_config(run_dir: str | Path, info: RunInfo, overrides: dict | None = None) -> dict:
    """The model config that rebuilds the run: run.json's, with `overrides` (the code or files of a
    run that moved, see MOVABLE_MODEL_KEYS); a recorded file that is gone but lies in the run
    directory (a run moved as a whole) is taken from there."""
    model = dict(info.model)
    for key, value in (overrides or {}).items():
        if key not in MOVABLE_MODEL_KEYS:
            raise UserError(f"model.{key} cannot be overridden with run= (allowed: "
                            f"{', '.join('model.' + k for k in MOVABLE_MODEL_KEYS)})")
        model[key] = value
        if key == "factory":
            model.pop("factory_path", None)  # the new code is found where the user says
    checkpoint = model.get("checkpoint")
    if checkpoint and not (overrides or {}).get("checkpoint") and not Path(str(checkpoint)).expanduser().is_file():
        beside = Path(str(run_dir)).expanduser() / Path(str(checkpoint)).name
        if beside.is_file():
            model["checkpoint"] = str(beside.resolve())
    return model


def load_run(run_dir: str | Path, model_overrides: dict | None = None) -> tuple[nn.Module, RunInfo]:
    """Rebuild the classifier a run produced, on the CPU, in eval mode, with its `run.json` (the model
    config with `model_overrides`, see run_model_config; the run's weights must fit what they build)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from peftsmooth.models import build_classifier

    run_dir = Path(str(run_dir)).expanduser().resolve()
    info = read_run_info(run_dir)
    model_cfg = OmegaConf.create(run_model_config(run_dir, info, model_overrides))
    try:
        classifier = build_classifier(model_cfg, int(info.num_classes), info.image_size)
        if info.front:
            classifier.front = instantiate(OmegaConf.create(info.front)).load(run_dir)
        model: nn.Module = classifier
        if info.adapt:
            model = info.adaptation().load(classifier, run_dir)
    except (UserError, RuntimeError, KeyError, ValueError) as err:  # the run's weights and the new code disagree
        if not model_overrides:
            raise
        given = ", ".join(f"model.{k}={v}" for k, v in model_overrides.items())
        detail = str(err).strip().splitlines()[0][:300] if isinstance(err, UserError) else \
            f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
        raise UserError(f"run={run_dir} with {given}: the run's weights do not fit that model ({detail})") from None
    return freeze(model).eval(), info


def command_line(command: str) -> str:
    """The shell line that started this process's command (run.json's `argv`)."""
    from peftsmooth.config import format_command

    return format_command(command, sys.argv[1:])


def link_run_files(base_dir: str, files: list, run_dir: Path) -> list[str]:
    """A base run's files (e.g. its adaptation weights), hard-linked (or copied) into run_dir so that
    load_run(run_dir) finds them; returns their names."""
    out = []
    for name in files or []:
        src, dst = Path(str(base_dir)).expanduser() / name, run_dir / name
        if not src.exists():
            raise UserError(f"base={base_dir}: run.json lists {name} but the file is missing")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            dst.unlink() if dst.is_file() else shutil.rmtree(dst)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        out.append(str(name))
    return out
