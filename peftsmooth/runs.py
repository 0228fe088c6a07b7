"""Run directories: the `run.json` schema (`RunInfo`), the run lifecycle (`Run`) and `load_run`.

A run directory is anything `train` or `denoise-baseline` wrote. `run.json` records the model config
(including the weights it started from), the dataset, sigma, the adaptation (`adapt`, a config with
`_target_`) and the optional front module (`front`: a denoiser or coordinator, also with
`_target_`). It is written and read through one typed schema, `RunInfo`; `load_run` turns it back
into the exact classifier that was trained.

Every command that writes a run goes through the same lifecycle (`Run`):
  Run.open(cfg, command, device)   the directory (`resume=<dir>` or this job's Hydra directory) and
                                   the checks of `peftsmooth.training.preflight` (fp16, resume config)
  run.build_classifier(model_cfg)  a randomly initialised backbone is kept in init.safetensors
  run.start(info)                  run.json with finished=false, argv recorded one way
  run.evaluate_once(model, eval)   the metrics line of a run that trains nothing (epoch 0)
  run.finish(files)                run.json with finished=true and every file load_run needs
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch.nn as nn

from peftsmooth.distributed import DistInfo, broadcast_object, init_distributed, shutdown
from peftsmooth.errors import UserError, require
from peftsmooth.runtime import atomic_write_text, freeze

__all__ = ["RUN_FILE", "INIT_FILE", "RunInfo", "Run", "read_run_info", "write_run_info", "load_run",
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
    def read(cls, run_dir: str | Path) -> "RunInfo":
        """Read and check `run.json`; a directory without a valid one is a one-line UserError."""
        path = Path(str(run_dir)).expanduser() / RUN_FILE
        if not path.is_file():
            raise UserError(f"run={run_dir} is not a run directory (no {RUN_FILE}); "
                            f"give a directory written by train or denoise-baseline")
        try:
            values = read_json(path)
        except json.JSONDecodeError as err:
            raise UserError(f"run={run_dir}: {RUN_FILE} is not valid JSON ({err.msg})") from err
        if not isinstance(values, dict):
            raise UserError(f"run={run_dir}: {RUN_FILE} is not a JSON object")
        for key in REQUIRED:
            if key not in values:
                raise UserError(f"run={run_dir}: {RUN_FILE} has no {key!r}")
        info = cls.from_fields(**values)
        info.check(f"run={run_dir}")
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


def read_run_info(run_dir: str | Path) -> RunInfo:
    """`run.json` of a run directory, checked (see RunInfo.read)."""
    return RunInfo.read(run_dir)


def write_run_info(run_dir: str | Path, **values: Any) -> RunInfo:
    """Write `run.json` with the given keys (plus format and creation time)."""
    return RunInfo.from_fields(**values).write(run_dir)


def load_run(run_dir: str | Path) -> tuple[nn.Module, RunInfo]:
    """Rebuild the classifier a run produced, on the CPU, in eval mode, with its `run.json`."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from peftsmooth.models import build_classifier

    run_dir = Path(str(run_dir)).expanduser().resolve()
    info = read_run_info(run_dir)
    classifier = build_classifier(OmegaConf.create(info.model), int(info.num_classes), info.image_size)
    if info.front:
        classifier.front = instantiate(OmegaConf.create(info.front)).load(run_dir)
    model: nn.Module = classifier
    if info.adapt:
        model = info.adaptation().load(classifier, run_dir)
    return freeze(model).eval(), info


# --------------------------------------------------------------------------- the run lifecycle

def command_line(command: str) -> str:
    """The shell line that started this process's command (run.json's `argv`)."""
    from peftsmooth.cli import format_command

    return format_command(command, sys.argv[1:])


def check_resume(resume, command: str) -> Path | None:
    """`resume=<dir>`: an existing run directory written by `command` (None without resume=)."""
    from peftsmooth.train_state import CHECKPOINT

    if not resume:
        return None
    path = Path(str(resume)).expanduser()
    require(path.is_dir(), f"resume={resume}: no such directory")
    require((path / CHECKPOINT).is_file() or (path / RUN_FILE).is_file(),
            f"resume={resume} is not a {command} run directory (no {CHECKPOINT} or {RUN_FILE})")
    if (path / RUN_FILE).is_file():
        written_by = read_run_info(path).command
        require(written_by in (None, command), f"resume={resume} is a {written_by} run; give a {command} run directory")
    return path.resolve()


def run_directory(cfg, command: str) -> Path:
    """`resume=<dir>` continues that run; otherwise this job's Hydra directory (which resumes too if
    it already holds a checkpoint, e.g. `hydra.run.dir=<dir>`)."""
    from peftsmooth.config import output_dir

    resumed = check_resume(cfg.get("resume"), command)
    if resumed is not None:
        return resumed
    path = output_dir().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _drop_stray_dir(mine: Path, run_dir: Path) -> None:
    """A job whose Hydra directory is not the run directory (another torchrun rank, or `resume=`)
    removes it when it holds only Hydra's own files."""
    if mine != run_dir and mine.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in mine.iterdir()):
        shutil.rmtree(mine, ignore_errors=True)


class Run:
    """One run directory from start to finish (see the module docstring)."""

    def __init__(self, command: str, path: Path, dist_info: DistInfo, fingerprint: dict, resuming: bool):
        self.command, self.path, self.dist_info = command, path, dist_info
        self.fingerprint = fingerprint   # the config a checkpoint here must match (fit's `config`)
        self.resuming = resuming         # a checkpoint of this run is here
        self.kept_init = False           # whether INIT_FILE holds the backbone's starting weights
        self.info = RunInfo()

    @classmethod
    def open(cls, cfg, command: str, device, settings=None) -> "Run":
        """The run directory, agreed on by every torchrun rank, after every check before any work."""
        from peftsmooth.training import preflight, resume_fingerprint

        dist_info = init_distributed(device)
        path = broadcast_object(run_directory(cfg, command), dist_info)
        fingerprint = resume_fingerprint(cfg)
        checkpoint = preflight(path, fingerprint, dist_info.device, settings)
        return cls(command, path, dist_info, fingerprint, resuming=checkpoint is not None)

    def build_classifier(self, model_cfg, dataset_cfg):
        """The classifier of `model_cfg` for the dataset. A randomly initialised backbone (tiny test
        models) is kept in INIT_FILE so that load_run rebuilds it exactly: saved on a fresh start,
        read back when resuming. `model_cfg.checkpoint` then names that file (for run.json)."""
        from peftsmooth.models import build_classifier, save_state_dict_file

        self.kept_init = is_random_init(model_cfg)
        kept = self.path / INIT_FILE
        reuse = self.kept_init and self.resuming and kept.is_file()
        if reuse:
            model_cfg.checkpoint = str(kept)
        classifier = build_classifier(model_cfg, int(dataset_cfg.num_classes), list(dataset_cfg.image_size))
        if self.kept_init and not reuse:
            if self.dist_info.is_main:
                save_state_dict_file(classifier.backbone.state_dict(), kept)
            model_cfg.checkpoint = str(kept)
        return classifier

    def start(self, info: RunInfo) -> None:
        """Record the run before the work: run.json with finished=false (rank 0)."""
        from peftsmooth.config import output_dir

        self.info = info.updated(command=self.command, argv=command_line(self.command), finished=False)
        if self.dist_info.is_main:
            self.info = self.info.write(self.path)
        _drop_stray_dir(output_dir().resolve(), self.path)

    def evaluate_once(self, model: nn.Module, evaluate) -> dict:
        """The metrics line of a run that trains nothing (epoch 0), written like fit's."""
        from peftsmooth.training import evaluation_record

        return evaluation_record(model, evaluate, self.path, self.dist_info)

    def finish(self, files: list[str], **values: Any) -> RunInfo:
        """run.json with finished=true, listing the files recorded at start, the kept init and
        `files` (what the method saved); then leave the torchrun process group."""
        kept = [INIT_FILE] if self.kept_init else []
        self.info = self.info.updated(files=[*self.info.files, *kept, *files], finished=True, **values)
        if self.dist_info.is_main:
            self.info = self.info.write(self.path)
        shutdown(self.dist_info)
        return self.info
