"""Cohen's certify.tsv: the one writer and the one parser of the project (certify resume, merge, report,
import).

The columns are Cohen's six, `idx label predict radius correct time`, then the extra columns of
`EXTRA_COLUMNS` that the rows carry: `samples` (classifier evaluations spent on the image, selection
samples included, both models counted in incremental certification; not forward passes, which carry
up to certify.batch_size samples each), `pA_lower` (the exact lower bound on pA behind the radius, so
that a changed model can be certified from this certificate), and for incremental certification
`route` and `disagreements`. Cohen's own analysis (`pandas.read_csv(sep="\\t")`, columns read by
name) still reads the file. Rows are appended and fsync'd one image at a time, so a
killed run loses at most the row it was writing; the parser drops that torn last line and refuses any
other malformed line with a UserError naming the file and the line. `correct` is checked against
`predict == label` on every row: a log whose `correct` column means something else (e.g. a running
total) would otherwise give wrong certified accuracies.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Sequence

from peftsmooth.errors import UserError
from peftsmooth.runtime import atomic_write_text

TSV_FILE = "certify.tsv"
HEADER = ("idx", "label", "predict", "radius", "correct", "time")  # Cohen's columns, always first
SAMPLES = "samples"  # classifier evaluations spent on the image (selection samples included)
PA_LOWER = "pA_lower"  # the lower bound on pA behind the radius, written exactly (repr of the float)
ROUTE = "route"  # incremental certification: how the row was obtained (peftsmooth.certify.incremental.ROUTES)
DISAGREEMENTS = "disagreements"  # incremental certification: f != f' among the row's disagreement samples
EXTRA_COLUMNS = (SAMPLES, PA_LOWER, ROUTE, DISAGREEMENTS)  # in this order, each when every row carries it
RADIUS_DECIMALS = 6  # radii are written rounded DOWN, so the file never claims more than was certified


# --- the TSV: writing ----------------------------------------------------------------------

def format_row(idx: int, label: int, prediction: int, radius: float, correct: bool, seconds: float,
               samples: int | None = None) -> str:
    whole, _, frac = f"{max(float(radius), 0.0):.12f}".partition(".")
    r = f"{whole}.{frac[:RADIUS_DECIMALS]}"  # truncated, not rounded: never more than was certified
    tail = "" if samples is None else f"\t{int(samples)}"
    return f"{idx}\t{label}\t{prediction}\t{r}\t{int(bool(correct))}\t{seconds:.4f}{tail}\n"


def _row_line(row: dict, columns: Sequence[str]) -> str:
    """One TSV line of a row dict (TSV names: idx, label, predict, radius, time, and the extra columns)."""
    extra = list(columns[len(HEADER):])
    for name in extra:
        if row.get(name) is None:
            raise ValueError(f"row {row.get('idx')} has no {name!r}, but the TSV has a {name} column")
    line = format_row(row["idx"], row["label"], row["predict"], row["radius"], row["predict"] == row["label"],
                      row["time"], row[SAMPLES] if SAMPLES in extra else None)
    tail = "".join(f"\t{_format_extra(name, row[name])}" for name in extra if name != SAMPLES)
    return line[:-1] + tail + "\n"


def _format_extra(name: str, value) -> str:
    if name == PA_LOWER:
        return repr(float(value))  # exact: reading it back gives the very float that was certified
    return str(int(value)) if name == DISAGREEMENTS else str(value)


def _columns_for(rows: Sequence[dict]) -> tuple[str, ...]:
    """Cohen's six columns, then each extra column that every row carries."""
    return HEADER + tuple(c for c in EXTRA_COLUMNS if rows and all(r.get(c) is not None for r in rows))


def _known_columns(columns: tuple[str, ...]) -> bool:
    """Whether this module can append rows under `columns`: Cohen's six, then extras in EXTRA_COLUMNS order."""
    extra = columns[len(HEADER):]
    return columns[: len(HEADER)] == HEADER and list(extra) == [c for c in EXTRA_COLUMNS if c in extra]


class TsvWriter:
    """Appends one fsync'd row per image (the only file certify writes as it goes).

    A new file gets its header with the first row: Cohen's six columns, plus the extra columns the row
    carries. An existing file keeps the columns it has, so a certification begun before the samples
    (or pA_lower) column existed resumes without it (its samples are then the fixed n0 + n of its mode)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _drop_torn_tail(self.path)
        self.columns = read_columns(self.path)
        if self.columns is not None and not _known_columns(self.columns):
            raise UserError(f"{self.path}: cannot append to a certify.tsv with columns {self.columns}")
        self._fh = open(self.path, "a")

    def write(self, idx: int, label: int, prediction: int, radius: float, seconds: float,
              samples: int | None = None) -> None:
        self.write_row({"idx": idx, "label": label, "predict": prediction, "radius": radius, "time": seconds,
                        SAMPLES: samples})

    def write_row(self, row: dict) -> None:
        if self.columns is None:
            self._write_header(_columns_for([row]))
        self._fh.write(_row_line(row, self.columns))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def _write_header(self, columns: tuple[str, ...]) -> None:
        self.columns = columns
        self._fh.write("\t".join(columns) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self.columns is None:  # no image certified: still a file Cohen's analysis reads (no rows)
            self._write_header(HEADER)
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tsv_text(rows: Sequence[dict]) -> str:
    """The whole file of `rows`: header and one line per row."""
    columns = _columns_for(rows)
    return "".join(["\t".join(columns) + "\n"] + [_row_line(r, columns) for r in rows])


def write_tsv(path: str | Path, rows: Sequence[dict]) -> None:
    """A whole TSV at once (merged shards, imported logs), atomically."""
    atomic_write_text(path, tsv_text(rows))


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a run killed mid-write) so appended rows start on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


# --- the TSV: reading (the one parser: certify resume, merge, report, import) ---------------

_TIMEDELTA = re.compile(r"(?:(\d+) days?, )?(\d+):([0-5]\d):([0-5]\d(?:\.\d*)?)")


def parse_seconds(text: str) -> float:
    """Cohen's `time` column: seconds, or a datetime.timedelta as his certify.py prints it
    (`0:00:13.736080`, `1 day, 2:03:04.5`)."""
    try:
        seconds = float(text)
    except ValueError:
        match = _TIMEDELTA.fullmatch(text.strip())
        if not match:
            raise
        days, hours, minutes, secs = match.groups()
        seconds = int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(secs)
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(text)
    return seconds


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _flag(text: str) -> int:
    value = int(text)
    if value not in (0, 1):
        raise ValueError(text)
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(text)
    return value


def _radius(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(text)
    return value


# column -> (parser, what a valid value is); columns not listed here are read past
_PARSERS = {"idx": (_count, "an image index >= 0"), "label": (int, "an integer class"),
            "predict": (int, "an integer class (-1: abstain)"), "radius": (_radius, "a radius >= 0"),
            "correct": (_flag, "0 or 1"), "time": (parse_seconds, "seconds or H:MM:SS.ffffff"),
            SAMPLES: (_count, "a sample count >= 0"), PA_LOWER: (_probability, "a probability in [0, 1]"),
            ROUTE: (str, "a route name"), DISAGREEMENTS: (_count, "a count >= 0")}


def _complete_lines(path: Path, foreign: bool = False) -> list[str]:
    """The lines of `path` that end with a newline: a last line without one was torn by a kill.
    A `foreign` file (another tool's log) keeps such a line: it is parsed like the others."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a certify.tsv (not UTF-8 text at byte {err.start})") from None
    lines = text.split("\n")
    if not foreign or lines[-1] == "":
        lines = lines[:-1]
    return [line.removesuffix("\r") for line in lines]


def _parse_header(line: str, path: Path) -> tuple[str, ...]:
    columns = tuple(line.split("\t"))
    if columns[: len(HEADER)] != HEADER or len(set(columns)) != len(columns) or "" in columns:
        raise UserError(f"{path}:1: not a certify.tsv header ({line!r}); it must start with the columns "
                        f"{' '.join(HEADER)}, tab-separated")
    return columns


def _parse_row(line: str, columns: tuple[str, ...], where: str) -> dict:
    fields = line.split("\t")
    if len(fields) != len(columns):
        raise UserError(f"{where}: {len(fields)} tab-separated fields, the header has {len(columns)}")
    row = {}
    for name, text in zip(columns, fields):
        if name not in _PARSERS:
            continue
        parse, expected = _PARSERS[name]
        try:
            row[name] = parse(text)
        except ValueError:
            raise UserError(f"{where}: {name}={text!r} is not {expected}") from None
    if row["correct"] != int(row["predict"] == row["label"]):
        raise UserError(f"{where}: correct={row['correct']} but predict={row['predict']}, label={row['label']}; "
                        f"correct must be 1 exactly when predict == label (this column means something else here)")
    return row


def read_tsv(path: str | Path, *, foreign: bool = False) -> list[dict]:
    """Rows of a certify.tsv as dicts (idx, label, predict, radius, correct, time in seconds, and
    samples when the file has that column; other extra columns are read past). A missing file has no
    rows; a torn last line (a killed run) is dropped, except in a `foreign` log (written by another
    tool, which may not end its last line), where it is a row; any other malformed line is a
    UserError naming the file and the line."""
    path = Path(path)
    lines = _complete_lines(path, foreign) if path.is_file() else []
    if not lines:
        return []
    columns = _parse_header(lines[0], path)
    rows, first_seen = [], {}
    for number, line in enumerate(lines[1:], start=2):
        row = _parse_row(line, columns, f"{path}:{number}")
        if row["idx"] in first_seen:
            raise UserError(f"{path}:{number}: image idx {row['idx']} again (first on line {first_seen[row['idx']]})")
        first_seen[row["idx"]] = number
        rows.append(row)
    return rows


def read_columns(path: str | Path) -> tuple[str, ...] | None:
    """The columns of a certify.tsv's header; None when there is no complete header line yet."""
    path = Path(path)
    lines = _complete_lines(path)[:1] if path.is_file() else []
    return _parse_header(lines[0], path) if lines else None


def read_radius_texts(path: str | Path, *, foreign: bool = False) -> dict[int, str]:
    """The radius column as printed, by image index (after `read_tsv` has checked the file): how many
    digits were printed tells how far the true radius may lie below the printed one."""
    path = Path(path)
    lines = _complete_lines(path, foreign) if path.is_file() else []
    if not lines:
        return {}
    columns = _parse_header(lines[0], path)
    at_idx, at_radius = columns.index("idx"), columns.index("radius")
    return {int(fields[at_idx]): fields[at_radius] for fields in (line.split("\t") for line in lines[1:])}
