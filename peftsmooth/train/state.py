"""Checkpoint and resume for the training loop: one `TrainState` saves and restores everything.

`checkpoint.pt` holds the trainable parameters and all buffers, the step object's state (optimizer,
scheduler, grad scaler, or a zeroth-order method's own state as `hook`) and the schedule phase it
belongs to (`phase`: lp / ft under train.schedule=lp_ft, else None), the RNG states, the epoch and
step counters and the config the run was started with. It is written atomically at the end of
every epoch (after `metrics.jsonl`) and read back with `torch.load(weights_only=True)`. A run resumes
only with the same config, minus the keys in RESUME_FREE, which do not change the numbers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from peftsmooth.errors import UserError, require
from peftsmooth.runtime import atomic_write, atomic_write_text

log = logging.getLogger("peftsmooth.train")

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"

# Config keys that may change between a run and its resumption (they do not change the numbers).
RESUME_FREE = ("hydra", "resume", "device", "train.num_workers", "train.eval_batch_size", "train.tensorboard")
# ... and the lp_ft keys under train.schedule=standard (so checkpoints made before they existed resume).
LP_FT_KEYS = ("train.schedule", "train.lp_epochs", "train.lp_lr")
# ... and the options of the robust losses other than train.loss (they change nothing then).
ROBUST_LOSS_KEYS = ("train.macer", "train.smoothadv")


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def trainable_state(model: nn.Module, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors training changes: the parameters `names` (default: those with requires_grad), and
    all buffers."""
    state = model.state_dict()
    keep = trainable_names(model) if names is None else set(names)
    keep |= {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu().clone() for k, v in state.items() if k in keep}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainState:
    """The resumable state of one training run: `state_dict()` is the checkpoint, `load_state_dict`
    restores it into the model and the step object (`FirstOrderStep` or `ZerothOrderStep`).

    The parameters checkpointed are those trainable when the state is made (before a phase of
    train.schedule=lp_ft freezes some). The step object is the current phase's (`use`); a resumed
    checkpoint's optimizer state goes into the step object of the phase it was saved in, and a
    phase that starts after the resume point starts with a fresh one, as in an uninterrupted run."""

    def __init__(self, model: nn.Module, stepper: Any = None, config: Any = None, phase: str | None = None):
        self.model, self.stepper, self.config, self.phase = model, stepper, config, phase
        self.trained = trainable_names(model)
        self.epoch = self.step = 0
        self.history: list[dict] = []   # one metrics record per completed epoch
        self.pending: dict | None = None  # a resumed checkpoint's step state, until its phase's stepper exists

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "model": trainable_state(self.model, self.trained),
                **self.stepper.state_dict(), "phase": self.phase, "rng": rng_state(),
                "config": json.dumps(self.config, default=str)}

    def use(self, stepper: Any, phase: str | None) -> None:
        """The step object of the phase about to train; it takes the resumed checkpoint's optimizer,
        scheduler and scaler state if the checkpoint was saved in this phase."""
        self.stepper, self.phase = stepper, phase
        pending, self.pending = self.pending, None
        if pending is not None and pending.get("phase") == phase:
            stepper.load_state_dict(pending)

    def load_state_dict(self, checkpoint: dict, run_dir: Path) -> None:
        missing = set(checkpoint["model"]) - set(self.model.state_dict())
        require(not missing, f"cannot resume {run_dir}: checkpoint tensors {sorted(missing)[:3]} are not in the model")
        self.model.load_state_dict(checkpoint["model"], strict=False)
        self.pending = checkpoint
        if self.stepper is not None:
            self.use(self.stepper, self.phase)
        if checkpoint.get("rng"):
            set_rng_state(checkpoint["rng"])
        self.epoch, self.step = int(checkpoint["epoch"]), int(checkpoint["step"])

    def resume(self, checkpoint: dict, run_dir: Path, announce: bool = True) -> None:
        """Continue after the checkpoint's epoch, with the metrics of the epochs before it."""
        self.load_state_dict(checkpoint, run_dir)
        self.history = [m for m in read_metrics(run_dir) if int(m.get("epoch", 0)) <= self.epoch]
        if announce:
            log.info("resuming %s after epoch %d (step %d)", run_dir, self.epoch, self.step)

    def end_epoch(self, record: dict, run_dir: Path, write: bool = True) -> None:
        """Count the finished epoch; on the writing rank, rewrite metrics.jsonl then the checkpoint."""
        self.epoch = int(record["epoch"])
        self.history.append(record)
        if write:
            write_metrics(run_dir, self.history)
            _save_checkpoint(run_dir / CHECKPOINT, self.state_dict())


def _save_checkpoint(path: Path, payload: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read_checkpoint(run_dir: str | Path) -> dict | None:
    """The checkpoint in `run_dir`, or None. Loaded without unrestricted unpickling."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"cannot read checkpoint {path} ({type(err).__name__}); delete it to start over") from err


def write_metrics(run_dir: str | Path, history: list[dict]) -> None:
    atomic_write_text(Path(run_dir) / METRICS, "".join(json.dumps(m) + "\n" for m in history))


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def resume_fingerprint(cfg, free: tuple[str, ...] = RESUME_FREE) -> dict:
    """The config a checkpoint must match to be resumed: `cfg` as plain data minus the `free` keys
    (and minus the lp_ft keys when train.schedule is standard, and the robust losses' options unless
    train.loss is that loss: they change nothing then)."""
    from peftsmooth.runs import to_plain

    plain = to_plain(cfg)
    if isinstance(plain, dict) and (plain.get("train") or {}).get("schedule", "standard") == "standard":
        free = (*free, *LP_FT_KEYS)
    if isinstance(plain, dict):
        loss = (plain.get("train") or {}).get("loss", "ce")
        free = (*free, *(key for key in ROBUST_LOSS_KEYS if key != f"train.{loss}"))
    for dotted in free:
        node, *rest = dotted.split(".")
        if rest and isinstance(plain.get(node), dict):
            plain[node].pop(rest[0], None)
        elif not rest:
            plain.pop(node, None)
    return plain


def _config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _config_diff(old.get(k, "<unset>"), new.get(k, "<unset>"), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]} ({old} -> {new})"]


def check_resume_config(checkpoint: dict, config: Any, run_dir: Path) -> None:
    """A UserError naming the keys whose value differs from the checkpoint's config."""
    if config is None:
        return
    old = json.loads(checkpoint.get("config", "null"))
    new = json.loads(json.dumps(config, default=str))
    diff = _config_diff(old, new)
    if diff:
        shown = "; ".join(diff[:4]) + (f"; ... ({len(diff)} keys)" if len(diff) > 4 else "")
        raise UserError(f"cannot resume {run_dir}: its checkpoint was written with a different config: {shown} "
                        f"(rerun with the same settings, or use a new run directory)")
