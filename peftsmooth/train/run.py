"""The lifecycle of a run directory being written, shared by `train` and `denoise-baseline`:

  Run.open(cfg, command, device)   the directory (`resume=<dir>` or this job's Hydra directory) and
                                   the checks of `peftsmooth.train.loop.preflight` (fp16, resume config)
  run.build_classifier(model_cfg)  a randomly initialised backbone is kept in init.safetensors
  run.start(info)                  run.json with finished=false, argv recorded one way
  run.evaluate_once(model, eval)   the metrics line of a run that trains nothing (epoch 0)
  run.finish(files)                run.json with finished=true and every file load_run needs
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch.nn as nn

from peftsmooth.config import output_dir
from peftsmooth.distributed import DistInfo, broadcast_object, init_distributed, shutdown
from peftsmooth.errors import require
from peftsmooth.models import build_classifier, make_portable, save_state_dict_file
from peftsmooth.runs import INIT_FILE, RUN_FILE, RunInfo, command_line, is_random_init, read_run_info
from peftsmooth.train.loop import evaluation_record, preflight
from peftsmooth.train.state import CHECKPOINT, resume_fingerprint


def check_resume(resume, command: str) -> Path | None:
    """`resume=<dir>`: an existing run directory written by `command` (None without resume=)."""
    if not resume:
        return None
    path = Path(str(resume)).expanduser()
    require(path.is_dir(), f"resume={resume}: no such directory")
    require((path / CHECKPOINT).is_file() or (path / RUN_FILE).is_file(),
            f"resume={resume} is not a {command} run directory (no {CHECKPOINT} or {RUN_FILE})")
    if (path / RUN_FILE).is_file():
        written_by = read_run_info(path, "resume").command
        require(written_by in (None, command), f"resume={resume} is a {written_by} run; give a {command} run directory")
    return path.resolve()


def run_directory(cfg, command: str) -> Path:
    """`resume=<dir>` continues that run; otherwise this job's Hydra directory (which resumes too if
    it already holds a checkpoint, e.g. `hydra.run.dir=<dir>`)."""
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
        dist_info = init_distributed(device)
        path = broadcast_object(run_directory(cfg, command), dist_info)
        fingerprint = resume_fingerprint(cfg)
        checkpoint = preflight(path, fingerprint, dist_info.device, settings)
        return cls(command, path, dist_info, fingerprint, resuming=checkpoint is not None)

    def build_classifier(self, model_cfg, dataset_cfg):
        """The classifier of `model_cfg` for the dataset. A randomly initialised backbone (tiny test
        models) is kept in INIT_FILE so that load_run rebuilds it exactly: saved on a fresh start,
        read back when resuming. `model_cfg.checkpoint` then names that file (for run.json)."""
        self.kept_init = is_random_init(model_cfg)
        kept = self.path / INIT_FILE
        reuse = self.kept_init and self.resuming and kept.is_file()
        if reuse:
            model_cfg.checkpoint = str(kept)
        classifier = build_classifier(model_cfg, int(dataset_cfg.num_classes), list(dataset_cfg.image_size))
        make_portable(model_cfg)  # run.json: rebuilt from any working directory
        if self.kept_init and not reuse:
            if self.dist_info.is_main:
                save_state_dict_file(classifier.backbone.state_dict(), kept)
            model_cfg.checkpoint = str(kept)
        return classifier

    def start(self, info: RunInfo) -> None:
        """Record the run before the work: run.json with finished=false (rank 0)."""
        self.info = info.updated(command=self.command, argv=command_line(self.command), finished=False)
        if self.dist_info.is_main:
            self.info = self.info.write(self.path)
        _drop_stray_dir(output_dir().resolve(), self.path)

    def evaluate_once(self, model: nn.Module, evaluate) -> dict:
        """The metrics line of a run that trains nothing (epoch 0), written like fit's."""
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
