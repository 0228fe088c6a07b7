"""Progress of a certification as rows arrive: a rich bar on a terminal, one log line per image elsewhere."""

from __future__ import annotations

import logging
import sys
from typing import Sequence

log = logging.getLogger("peftsmooth.commands.certify")


class CertifyProgress:
    """Call it with each new row (the engine's `on_row` hook); shows images done, samples/s and the
    running ACR. Silent unless `show` (rank 0 of a torchrun world)."""

    def __init__(self, total: int, done_rows: Sequence[dict], show: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.total, self.done, self.show = total, len(done_rows), show
        self.acr_sum = sum(r["radius"] * r["correct"] for r in done_rows)
        self.tty = show and sys.stderr.isatty()
        columns = [TextColumn("certify"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
                   TextColumn("ACR {task.fields[acr]}"), TimeRemainingColumn()]
        self.bar = Progress(*columns, disable=not self.tty, transient=False)
        self.task = self.bar.add_task("certify", total=total, completed=self.done, speed="", acr="-")

    def __enter__(self) -> CertifyProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, row: dict) -> None:
        self.done += 1
        self.acr_sum += row["radius"] * row["correct"]
        speed = f"{row['samples'] / row['time']:,.0f} samples/s" if row["time"] > 0 else ""
        self.bar.update(self.task, advance=1, speed=speed, acr=f"{self.acr_sum / self.done:.3f}")
        if self.show and not self.tty:
            log.info("image %d (%d/%d): label %d predict %d radius %.3f, %s, running ACR %.3f", row["idx"],
                     self.done, self.total, row["label"], row["predict"], row["radius"], speed, self.acr_sum / self.done)
