"""The metrics files of rank 0: ``metrics_epochs.csv``, ``metrics_steps.csv``, ``metrics_evals.csv`` and, at the
end, ``metrics_history.json``; and reading the CSVs back to where a checkpoint stands.

The files are the rows' only copy on disk (checkpoints carry their number, not the rows). Before a checkpoint is
written the CSVs hold, fsynced, every row it counts; rows written after it (by a run that was then killed, or a
line torn by the kill) are cut off when a resume reads the files back.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import time
import warnings
from pathlib import Path

import pandas as pd

from .plots import FILE_NAMES as PLOT_FILE_NAMES
from .rows import STEP_COLUMNS, RowSink
from ..warn import caller_stacklevel

# What a run writes at the top of its output_dir (checkpoints, run.json and W&B's folders are kept apart: W&B names
# each run's folder itself, wandb/run-<time>-<id>).
RUN_OUTPUT_FILES = ("metrics_epochs.csv", "metrics_steps.csv", "metrics_evals.csv", "metrics_history.json",
                    *PLOT_FILE_NAMES.values())
EARLIER_RUNS = "earlier_runs"


def set_aside_earlier_outputs(output_dir) -> Path | None:
    """A fresh run's first act on its output_dir: an earlier run's metrics files and plots are moved into
    ``output_dir/earlier_runs/<their time>/`` (returned; None when there were none), so running the same cell twice
    loses nothing and the newest run's files are always at the top."""
    output_dir = Path(output_dir)
    present = [output_dir / name for name in RUN_OUTPUT_FILES if (output_dir / name).is_file()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(max(path.stat().st_mtime for path in present)))
    target, number = output_dir / EARLIER_RUNS / stamp, 1
    while target.exists():  # two runs ended in the same second
        number += 1
        target = output_dir / EARLIER_RUNS / f"{stamp}-{number}"
    target.mkdir(parents=True)
    for path in present:
        os.replace(path, target / path.name)
    _fsync(target)
    _fsync(output_dir)
    return target


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    """A file's data, or a folder's renames, on disk; a missing file (or a folder a network mount cannot open) is
    left alone."""
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def parse_value(text: str, blank):
    """One CSV cell as pandas wrote it: an int column has no point, a float column always has one (or inf/e)."""
    if text == "":
        return blank
    try:
        return int(text)
    except ValueError:
        return float(text)


class MetricsFiles(RowSink):
    """The CSV files after every epoch, evaluation and before every checkpoint; the JSON history at the end.

    The small epoch and eval files are rewritten atomically (a crash mid-write leaves the previous version); the
    step file is appended, after being rewritten whole once per process unless a resume cut it to its rows.
    ``metrics_history.json`` (all rows in one file) is written at the end only: rewritten whole every epoch it took
    1.6 s at 300k steps."""

    def __init__(self, output_dir):
        self.output_dir = Path(output_dir)
        self._step_rows_on_disk = None  # rows of steps_csv this process wrote or read back; None: rewrite it whole

    @property
    def epochs_csv(self) -> Path:
        return self.output_dir / "metrics_epochs.csv"

    @property
    def steps_csv(self) -> Path:
        return self.output_dir / "metrics_steps.csv"

    @property
    def evals_csv(self) -> Path:
        return self.output_dir / "metrics_evals.csv"

    # -- the sink's hooks -------------------------------------------------------------------------
    def start(self, rows, config, total_steps) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def evaluation(self, rows, row) -> None:
        self.write(rows)

    def epoch(self, rows, row) -> None:
        self.write(rows)

    def checkpoint(self, rows) -> None:
        self.write(rows)
        for path in (self.epochs_csv, self.steps_csv, self.evals_csv):
            _fsync(path)
        _fsync(self.output_dir)  # the renames of the atomically written files

    def finish(self, rows, summary) -> None:
        self.write(rows, final=True)

    # -- writing -------------------------------------------------------------------------------------
    def write(self, rows, final: bool = False) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.epochs_csv, rows.epochs_frame().to_csv(index=False))
        self._write_step_rows(rows)
        if rows.eval_rows:
            _write_atomically(self.evals_csv, rows.evals_frame().to_csv(index=False))
        if final:
            history = {"epochs": rows.epoch_rows, "steps": rows.step_rows, "evals": rows.eval_rows}
            _write_atomically(self.output_dir / "metrics_history.json", json.dumps(history, default=float))

    def _write_step_rows(self, rows) -> None:
        written, total = self._step_rows_on_disk, len(rows.step_rows)
        if written is None or written > total or not self.steps_csv.exists():
            _write_atomically(self.steps_csv, rows.steps_frame().to_csv(index=False))
        elif written < total:
            new_rows = pd.DataFrame(rows.step_rows[written:], columns=STEP_COLUMNS)
            with open(self.steps_csv, "a") as handle:
                handle.write(new_rows.to_csv(index=False, header=False))
        self._step_rows_on_disk = total

    # -- reading back on resume ---------------------------------------------------------------------------
    def read_back(self, counts: dict, run_dir) -> dict:
        """The first rows of each CSV of ``run_dir`` as the checkpoint counts them; in this run's own folder the
        files are cut to them, so every row is in them once."""
        run_dir = Path(run_dir) if run_dir is not None else self.output_dir
        own = run_dir.resolve() == self.output_dir.resolve()
        found = {}
        for key, path, blank in (("steps", "metrics_steps.csv", math.nan), ("evals", "metrics_evals.csv", None),
                                 ("epochs", "metrics_epochs.csv", None)):
            found[key], complete = self._read_rows(run_dir / path, counts[key], blank, cut=own)
            if key == "steps":
                header_ok = complete and (not found[key] or list(found[key][0]) == STEP_COLUMNS)
                self._step_rows_on_disk = counts[key] if (own and header_ok) else None
        return found

    def _read_rows(self, path: Path, count: int, blank, cut: bool) -> tuple[list[dict], bool]:
        """The first ``count`` data rows of ``path``, and whether all of them were there; with ``cut`` the file is
        truncated after them (a missing or empty file stands for no rows)."""
        data = path.read_bytes() if path.exists() else b""
        end = 0  # the byte after the header line and ``count`` complete lines
        for _ in range(count + 1):
            newline = data.find(b"\n", end)
            if newline < 0:
                break
            end = newline + 1
        rows = [{k: parse_value(v, blank) for k, v in r.items()}
                for r in csv.DictReader(io.StringIO(data[:end].decode(errors="replace")))]
        if len(rows) < count:
            warnings.warn(f"{path} holds {len(rows)} of the {count} rows the checkpoint counts (it was changed or "
                          "lost since); the results and the files hold only those. Keep the metrics files beside "
                          "the checkpoints to resume with every row.", UserWarning, stacklevel=caller_stacklevel())
        if cut and len(data) > end:
            if count == 0 and path.name == "metrics_evals.csv":
                path.unlink()  # an uninterrupted run has no evals file before its first evaluation
            else:
                os.truncate(path, end)
        return rows, len(rows) == count
