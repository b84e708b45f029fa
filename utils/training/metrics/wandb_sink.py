"""W&B as a sink of the metric rows: every row keyed by the package's optimizer step, never stopping training.

Any failure of wandb (missing, no key, no network) turns it off with one warning; the rows stay in the results and
the CSV files.
"""
from __future__ import annotations

import warnings

from .gradient_stats import GradientStats
from .rows import RowSink
from ..warn import caller_stacklevel

# W&B's x-axis for every row: the package's optimizer step. W&B's own ``step=`` must only increase, so rows sent
# out of order (or again, after a resume) were dropped; a custom step metric takes any order.
STEP_KEY = "train/global_step"


def import_wandb():
    import wandb

    return wandb


class WandbSink(RowSink):
    """One W&B run per call (the same run again after a resume: its id travels in the checkpoints).

    ``module_getter`` returns the ``wandb`` module to use; the entry point passes one that honours a caller who
    replaced ``wandb`` with a mock. ``gradients`` are sent inside the row of their step."""

    def __init__(self, *, project=None, name=None, mode=None, group=None, directory=None, module_getter=import_wandb):
        self.options = dict(project=project or "tier3-fine-tuning", name=name, dir=directory)
        self.options.update({key: value for key, value in (("group", group), ("mode", mode)) if value})
        self.module_getter = module_getter
        self.gradients = GradientStats()
        self.module = self.run = self.failed_reason = None

    def start(self, rows, config, total_steps) -> None:
        try:
            self.module = self.module_getter()
            kwargs = dict(self.options, config=config)
            if rows.wandb_run_id:
                kwargs.update(id=rows.wandb_run_id, resume="allow")
            self.run = self.module.init(**kwargs)
        except Exception as error:  # noqa: BLE001 - W&B must never stop training
            self._fail(error)
            return
        rows.wandb_run_id = getattr(self.run, "id", None) or rows.wandb_run_id
        self.gradients.enabled = True
        define = getattr(self.run, "define_metric", None)
        if callable(define):  # absent in old wandb versions; then rows still arrive, plotted against W&B's own step
            try:
                define(STEP_KEY)
                define("*", step_metric=STEP_KEY)
            except Exception:  # noqa: BLE001 - the axis is a nicety, the rows matter
                pass

    def steps(self, rows, new_rows) -> None:
        for row in new_rows:
            values = {k: v for k, v in row.items() if k != "step"}
            self.log({**values, **self._gradient_values(row["step"])}, step=row["step"])

    def evaluation(self, rows, row) -> None:
        self.log({k: v for k, v in row.items() if k not in ("step", "epoch") and v is not None}, step=row["step"])

    def epoch(self, rows, row) -> None:
        self.log({k: v for k, v in row.items() if v is not None and k != "global_step"}, step=row["global_step"])

    def config_lines(self, values: dict) -> None:
        """Through the module-level ``wandb.log`` (the active run), as the previous module logged its config lines."""
        if self.run is None:
            return
        try:
            self.module.log(values)
        except Exception as error:  # noqa: BLE001
            self._fail(error)

    def log(self, values: dict, step: int) -> None:
        """One row keyed by the package's ``step`` (no ``step=``: W&B would drop a row below its current step)."""
        if self.run is None:
            return
        try:
            self.run.log({**values, STEP_KEY: step})
        except Exception as error:  # noqa: BLE001
            self._fail(error)

    def finish(self, rows, summary) -> None:
        for step in self.gradients.held_steps():  # a step that never got its row (it stopped on a non-finite loss)
            self.log(self._gradient_values(step), step=step)
        if self.run is None:
            return
        try:
            for key, value in summary.items():
                if isinstance(value, (int, float, str, bool)):
                    self.run.summary[key] = value
            self.run.finish()
        except KeyboardInterrupt:  # a Ctrl-C while W&B uploads must not lose the results being returned
            warnings.warn("W&B was interrupted while closing its run; run `wandb sync` on its folder to upload the "
                          "rest.", UserWarning, stacklevel=caller_stacklevel())
        except Exception as error:  # noqa: BLE001
            self._fail(error)
        self.run, self.gradients.enabled = None, False

    def _gradient_values(self, step: int) -> dict:
        if self.run is None:
            return {}
        return self.gradients.pop_values(step, self.module.Histogram)

    def _fail(self, error: Exception) -> None:
        self.failed_reason = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"W&B logging is off for the rest of this run ({self.failed_reason}). Training continues; every metric "
            "is still in the returned results and in the CSV files of output_dir. Install wandb, run `wandb login`, "
            "or pass wandb_mode='offline' to log without a network.",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
        self.run, self.gradients.enabled = None, False
