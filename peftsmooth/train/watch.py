"""What a researcher watches while a run trains, from the metrics lines the loop already writes.

`training.png` in the run directory: loss (left) and clean / noisy test accuracy (right) per epoch;
written when a run ends and, during a long one, at most every PLOT_EVERY_S seconds. With
`train.tensorboard=true` every epoch's numbers also go to TensorBoard event files in the run
directory (`tensorboard --logdir outputs/` then shows a whole sweep side by side); that needs the
optional `tensorboard` package (`pip install peftsmooth[tensorboard]`).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Sequence

from peftsmooth.errors import UserError

TRAINING_PNG = "training.png"
PLOT_EVERY_S = 60.0
TENSORBOARD_INSTALL = "pip install peftsmooth[tensorboard]"


def check_tensorboard(enabled: bool) -> None:
    """train.tensorboard=true needs the tensorboard package (checked without importing it)."""
    if enabled and importlib.util.find_spec("tensorboard") is None:
        raise UserError(f"train.tensorboard=true needs the tensorboard package: {TENSORBOARD_INSTALL} "
                        f"(or train.tensorboard=false)")


def _series(history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(int(m["epoch"]), float(m[key])) for m in history if isinstance(m.get(key), (int, float))]
    return [e for e, _ in points], [v for _, v in points]


# metrics.jsonl key -> its legend label, per panel
LOSS_SERIES = {"loss": "training loss"}
ACCURACY_SERIES = {"clean_acc": "clean (test)", "noisy_acc": "noisy (test)", "train_acc": "noisy (train batches)"}


def plot_training(history: Sequence[dict], path: str | Path) -> None:
    """training.png: the training loss, and clean / noisy test accuracy (and train accuracy), per epoch."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from peftsmooth.runtime import atomic_write

    fig = Figure(figsize=(8, 3.2))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, series, title in ((loss_ax, LOSS_SERIES, "loss"), (acc_ax, ACCURACY_SERIES, "accuracy")):
        for key, label in series.items():
            epochs, values = _series(history, key)
            if values:
                ax.plot(epochs, values, marker="o", ms=3, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    acc_ax.set_ylim(0, 1)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.16, top=0.9, wspace=0.25)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


class TrainingWatch:
    """training.png and (optionally) TensorBoard scalars of one run, fed the metrics history."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = False, resumed_epoch: int = 0):
        self.run_dir = Path(run_dir)
        self.plotted = time.time()
        self.writer = None
        if tensorboard:
            check_tensorboard(True)
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run hides what the killed one logged after its last checkpoint
            self.writer = SummaryWriter(str(self.run_dir), purge_step=resumed_epoch + 1 if resumed_epoch else None)

    def epoch(self, history: Sequence[dict]) -> None:
        """After each epoch: its numbers to TensorBoard; training.png when the last is old enough."""
        if self.writer is not None and history:
            last = history[-1]
            for key, value in last.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, int(last["epoch"]))
            self.writer.flush()
        if time.time() - self.plotted >= PLOT_EVERY_S:
            self.close(history, final=False)

    def close(self, history: Sequence[dict], final: bool = True) -> None:
        """training.png from the whole history (and, at the end, the TensorBoard file closed)."""
        plot_training(history, self.run_dir / TRAINING_PNG)
        self.plotted = time.time()
        if final and self.writer is not None:
            self.writer.close()
            self.writer = None
