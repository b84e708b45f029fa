"""The run's metric rows: one record per optimizer step, per mid-epoch evaluation and per epoch, in memory.

The trainer appends rows here; sinks consume each one as it arrives (``metrics_files``: the CSV and JSON files,
``wandb_sink``: W&B, ``progress``: the bar and messages). Only rank 0 has sinks; every rank holds the rows (the
results are built from them). A checkpoint carries only how many rows there are (``state_dict``); a resume reads
the rows back from the CSV files on rank 0 and shares them with the other ranks.

Every loss and accuracy here is over real target tokens only, and every name says so ("excl_padding"): numbers
from loops that counted padding are not comparable.
"""
from __future__ import annotations

import math
import time
import warnings

import pandas as pd

from ..distributed import DistContext, broadcast_object
from ..warn import caller_stacklevel

EPOCH_COLUMNS = [
    "epoch", "global_step",
    "train/loss_excl_padding", "val/loss_excl_padding", "val/perplexity",
    "train/accuracy_excl_padding", "val/accuracy_excl_padding", "learning_rate",
    "train/real_tokens", "train/padded_tokens", "train/pad_fraction",
    "val/real_tokens", "val/padded_tokens", "train/real_tokens_per_sec", "epoch_time_s", "train/distinct_batch_shapes",
]
# Columns only runs that measure them have (then after the others): bits per byte needs to know what a token weighs.
OPTIONAL_EPOCH_COLUMNS = ["val/bits_per_byte"]
STEP_COLUMNS = ["step", "epoch", "train/step_loss_excl_padding", "train/learning_rate", "train/grad_norm",
                "train/step_real_tokens", "train/step_real_tokens_per_sec"]


def safe_exp(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def _bits_per_byte(val: dict) -> dict:
    """The validation's bits per byte as a row entry, none when no tokenizer or ``token_bytes`` says what a token
    weighs (the column then does not exist: a run's rows, files and resumes stay as they were)."""
    measured = val.get("bits_per_byte")
    return {} if measured is None else {"val/bits_per_byte": measured}


def step_row(step: int, epoch: int, sums, learning_rate: float, grad_norm: float) -> dict:
    """The row of optimizer ``step`` (``sums``: its ``TokenSums``, read from the device with its neighbours)."""
    return {"step": step, "epoch": epoch + 1, "train/step_loss_excl_padding": sums.loss,
            "train/learning_rate": learning_rate, "train/grad_norm": grad_norm,
            "train/step_real_tokens": int(sums.real_targets)}


def eval_row(step: int, epoch: int, val: dict) -> dict:
    """The row of a validation inside an epoch (``eval_every``)."""
    return {"step": step, "epoch": epoch + 1, "val/loss_excl_padding": val["loss"], "val/perplexity": val["perplexity"],
            "val/accuracy_excl_padding": val["accuracy"], **_bits_per_byte(val)}


def epoch_row(epoch: int, state, val: dict, *, epoch_seconds: float, learning_rate: float | None) -> dict:
    """The row of an epoch from its ``TrainState`` (training sums and seconds) and its validation."""
    sums = state.epoch_sums
    return {
        "epoch": epoch + 1, "global_step": state.global_step,
        "train/loss_excl_padding": sums.loss, "val/loss_excl_padding": val["loss"], "val/perplexity": val["perplexity"],
        "train/accuracy_excl_padding": sums.accuracy, "val/accuracy_excl_padding": val["accuracy"],
        "learning_rate": learning_rate,  # the rate the epoch's last step used
        "train/real_tokens": int(sums.real_targets), "train/padded_tokens": int(sums.padded_positions),
        "train/pad_fraction": sums.pad_fraction, "val/real_tokens": val["real_tokens"],
        "val/padded_tokens": val["padded_tokens"],
        "train/real_tokens_per_sec": float(sums.real_targets) / max(state.train_seconds, 1e-9),  # training phase only
        "epoch_time_s": epoch_seconds,  # training and validation of this epoch (after a resume: only the part run now)
        "train/distinct_batch_shapes": len(state.batch_shapes),  # so far in the run
        **_bits_per_byte(val),
    }


def epoch_line(row: dict, n_epochs: int | None) -> str:
    """The message printed at an epoch's end (``n_epochs`` None: a stream's run, whose epochs are not counted)."""
    of = "" if n_epochs is None else f"/{n_epochs}"
    return (f"epoch {row['epoch']}{of}: train loss (excl. padding) {row['train/loss_excl_padding']:.4f} | "
            f"val loss (excl. padding) {row['val/loss_excl_padding']:.4f} | "
            f"val perplexity {row['val/perplexity']:.2f} | padded positions {row['train/pad_fraction']:.1%}")


class RowSink:
    """What consumes rows. Every hook is optional: this base does nothing. ``rows`` is the :class:`MetricRows`."""

    def start(self, rows: MetricRows, config: dict, total_steps: int) -> None: ...
    def steps(self, rows: MetricRows, new_rows: list[dict]) -> None: ...
    def evaluation(self, rows: MetricRows, row: dict) -> None: ...
    def epoch(self, rows: MetricRows, row: dict) -> None: ...
    def checkpoint(self, rows: MetricRows) -> None:
        """Called before a checkpoint is written: what the checkpoint counts must be durable when this returns."""
    def finish(self, rows: MetricRows, summary: dict) -> None: ...
    def message(self, text: str) -> None: ...
    def config_lines(self, values: dict) -> None:
        """Values outside any row (the effective batch size and accumulation)."""

    def read_back(self, counts: dict, run_dir) -> dict | None:
        """The first ``counts`` rows as written by the run in ``run_dir`` ({"steps", "evals", "epochs": lists}),
        or None when this sink keeps no rows."""
        return None


class MetricRows:
    """The rows of a run, in order, each given to every sink as it is added."""

    def __init__(self, sinks: list[RowSink] | tuple = ()):
        self.sinks = list(sinks)
        self.step_rows: list[dict] = []
        self.eval_rows: list[dict] = []  # mid-epoch validations (eval_every)
        self.epoch_rows: list[dict] = []
        self.wandb_run_id = None  # carried by checkpoints so that a resume continues the same W&B run
        self._last_flush_time = None

    # -- the run ----------------------------------------------------------------------------------
    def start(self, config: dict, *, total_steps: int) -> None:
        for sink in self.sinks:
            sink.start(self, config, total_steps)
        self._last_flush_time = time.perf_counter()

    def finish(self, summary: dict) -> None:
        for sink in self.sinks:
            sink.finish(self, summary)

    def message(self, text: str) -> None:
        for sink in self.sinks:
            sink.message(text)

    def log_config_lines(self, values: dict) -> None:
        for sink in self.sinks:
            sink.config_lines(values)

    def before_checkpoint(self) -> None:
        for sink in self.sinks:
            sink.checkpoint(self)

    # -- adding rows --------------------------------------------------------------------------------
    def log_steps(self, rows: list[dict]) -> None:
        """Rows of optimizer steps already read from the device (one host sync per flush, in the trainer)."""
        now = time.perf_counter()
        elapsed = max(now - (self._last_flush_time or now), 1e-9)
        self._last_flush_time = now
        tokens_per_sec = sum(r["train/step_real_tokens"] for r in rows) / elapsed
        for row in rows:
            row["train/step_real_tokens_per_sec"] = tokens_per_sec
        self.step_rows.extend(rows)
        for sink in self.sinks:
            sink.steps(self, rows)

    def log_eval(self, row: dict) -> None:
        """A validation inside an epoch (``eval_every``): its own rows and CSV, the same W&B names."""
        self.eval_rows.append(row)
        for sink in self.sinks:
            sink.evaluation(self, row)

    def drop_epoch_row(self, epoch: int) -> None:
        """Forget the last epoch row when it is ``epoch``'s: a resume that continues an epoch which ``max_steps``
        had cut records its row again at the epoch's real end."""
        if self.epoch_rows and self.epoch_rows[-1]["epoch"] == epoch:
            self.epoch_rows.pop()

    def log_epoch(self, row: dict) -> dict:
        row = {column: row.get(column) for column in EPOCH_COLUMNS + [c for c in OPTIONAL_EPOCH_COLUMNS if c in row]}
        self.epoch_rows.append(row)
        for sink in self.sinks:
            sink.epoch(self, row)
        return row

    # -- reading them -------------------------------------------------------------------------------
    def epochs_frame(self) -> pd.DataFrame:
        optional = [c for c in OPTIONAL_EPOCH_COLUMNS if any(c in row for row in self.epoch_rows)]
        return pd.DataFrame(self.epoch_rows, columns=EPOCH_COLUMNS + optional)

    def steps_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.step_rows, columns=STEP_COLUMNS)

    def evals_frame(self) -> pd.DataFrame | None:
        return pd.DataFrame(self.eval_rows) if self.eval_rows else None

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """How far the rows go, not the rows: their number is what a resume reads back from the CSV files."""
        counts = {"steps": len(self.step_rows), "evals": len(self.eval_rows), "epochs": len(self.epoch_rows)}
        return {"rows": counts, "wandb_run_id": self.wandb_run_id}

    def load_state_dict(self, state: dict, *, ctx: DistContext | None = None, run_dir=None) -> None:
        """The rows a checkpoint counts, read back by rank 0's sinks from ``run_dir`` and shared with every rank.

        A checkpoint written before the rows moved out of them carries the rows themselves."""
        self.wandb_run_id = state.get("wandb_run_id")
        if "rows" not in state:
            rows = {"steps": state["step_rows"], "evals": state.get("eval_rows", []), "epochs": state["epoch_rows"]}
        else:
            rows = self._read_back(state["rows"], run_dir)
            rows = broadcast_object(rows, ctx) if ctx is not None else rows  # rank 0's, on every rank
            if rows is None:
                warnings.warn("The metric rows before the checkpoint could not be read back from the metrics CSVs of "
                              "its run folder; the results and files hold only the rows from here on. Keep the CSVs "
                              "beside the checkpoints (in output_dir) to resume with every row.", UserWarning,
                              stacklevel=caller_stacklevel())
                rows = {"steps": [], "evals": [], "epochs": []}
        self.step_rows, self.eval_rows, self.epoch_rows = (list(rows[k]) for k in ("steps", "evals", "epochs"))

    def _read_back(self, counts: dict, run_dir) -> dict | None:
        try:
            return next((found for sink in self.sinks if (found := sink.read_back(counts, run_dir)) is not None), None)
        except Exception as error:  # noqa: BLE001 - an unreadable file must not stop the resume (nor hang other ranks)
            warnings.warn(f"The metrics files could not be read back ({type(error).__name__}: {error}).", UserWarning,
                          stacklevel=caller_stacklevel())
            return None
