"""MetricsTracker: per-step and per-epoch metrics, CSV that survives a crash, W&B, plots, progress.

Every loss and accuracy here is over real target tokens only, and every name says so
("excl_padding"): numbers from loops that counted padding are not comparable.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

from .warn import warnings_through

EPOCH_COLUMNS = [
    "epoch", "global_step",
    "train/loss_excl_padding", "val/loss_excl_padding", "val/perplexity",
    "train/accuracy_excl_padding", "val/accuracy_excl_padding", "learning_rate",
    "train/real_tokens", "train/padded_tokens", "train/pad_fraction",
    "val/real_tokens", "val/padded_tokens", "train/real_tokens_per_sec", "epoch_time_s", "train/distinct_batch_shapes",
]
# W&B's x-axis for every row: the package's optimizer step. W&B's own ``step=`` must only increase, so rows sent
# out of order (or again, after a resume) were dropped; a custom step metric takes any order.
STEP_KEY = "train/global_step"
STEP_COLUMNS = ["step", "epoch", "train/step_loss_excl_padding", "train/learning_rate", "train/grad_norm",
                "train/step_real_tokens", "train/step_real_tokens_per_sec"]


def safe_exp(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def import_wandb():
    import wandb

    return wandb


class _WandbLogger:
    """Thin wrapper: any failure of wandb (missing, no key, no network) turns it off with one warning.

    ``module_getter`` returns the ``wandb`` module to use; the entry point passes one that honours a
    caller who replaced ``wandb`` with a mock.
    """

    def __init__(self, module_getter=import_wandb):
        self.module_getter = module_getter
        self.module = None
        self.run = None
        self.failed_reason = None

    def start(self, *, project, name, mode, config, run_id=None, directory=None, group=None) -> None:
        try:
            self.module = self.module_getter()
            kwargs = dict(project=project or "tier3-fine-tuning", name=name, config=config, dir=directory)
            if group:
                kwargs["group"] = group
            if mode:
                kwargs["mode"] = mode
            if run_id:
                kwargs.update(id=run_id, resume="allow")
            self.run = self.module.init(**kwargs)
        except Exception as error:  # noqa: BLE001 - W&B must never stop training
            self._fail(error)
            return
        define = getattr(self.run, "define_metric", None)
        if callable(define):  # absent in old wandb versions; then rows still arrive, plotted against W&B's own step
            try:
                define(STEP_KEY)
                define("*", step_metric=STEP_KEY)
            except Exception:  # noqa: BLE001 - the axis is a nicety, the rows matter
                pass

    def log_to_active_run(self, values: dict) -> None:
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

    def finish(self, summary: dict) -> None:
        if self.run is None:
            return
        try:
            for key, value in summary.items():
                self.run.summary[key] = value
            self.run.finish()
        except KeyboardInterrupt:  # a Ctrl-C while W&B uploads must not lose the results being returned
            warnings.warn("W&B was interrupted while closing its run; run `wandb sync` on its folder to upload the rest.",
                          UserWarning, stacklevel=3)
        except Exception as error:  # noqa: BLE001
            self._fail(error)
        self.run = None

    def _fail(self, error: Exception) -> None:
        self.failed_reason = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"W&B logging is off for the rest of this run ({self.failed_reason}). Training continues; every metric "
            "is still in the returned results and in the CSV files of output_dir. Install wandb, run `wandb login`, "
            "or pass wandb_mode='offline' to log without a network.",
            UserWarning,
            stacklevel=3,
        )
        self.run = None

    @property
    def run_id(self):
        return getattr(self.run, "id", None)


class MetricsTracker:
    """Collects metrics; on the main process it also writes files, logs to W&B and shows progress."""

    def __init__(self, output_dir: str, *, is_main: bool = True, use_wandb: bool = False, progress: bool = True,
                 wandb_module_getter=import_wandb):
        self.output_dir = Path(output_dir)
        self.is_main = is_main
        self.step_rows: list[dict] = []
        self.epoch_rows: list[dict] = []
        self.eval_rows: list[dict] = []  # mid-epoch validations (eval_every)
        self._step_rows_on_disk = None  # rows of steps_csv written by this process; None: rewrite it whole first
        self.wandb = _WandbLogger(wandb_module_getter) if (use_wandb and is_main) else None
        self.wandb_run_id = None
        self.run_name = self.output_dir.name  # the plots' title; the W&B run name when there is one
        self.show_progress = progress and is_main
        self.bar = None
        self._last_flush_time = None
        self._gradients: dict[int, dict] = {}  # optimizer step -> its gradient statistics, on the device until flushed
        self._bar_warnings = contextlib.ExitStack()

    # -- run lifecycle -------------------------------------------------------------------------
    def start(self, config: dict, *, total_steps: int, wandb_project=None, wandb_run_name=None, wandb_mode=None,
              wandb_group=None) -> None:
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.wandb is not None:
            # W&B's local run folder goes under output_dir, not the working directory (unless WANDB_DIR says).
            self.wandb.start(project=wandb_project, name=wandb_run_name, mode=wandb_mode, config=config,
                             run_id=self.wandb_run_id, directory=os.environ.get("WANDB_DIR") or str(self.output_dir),
                             group=wandb_group)
            self.wandb_run_id = self.wandb.run_id or self.wandb_run_id
        self.run_name = wandb_run_name or self.run_name
        if self.show_progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=len(self.step_rows), desc="fine-tuning", unit="step", dynamic_ncols=True)
            self._bar_warnings.enter_context(warnings_through(self.bar))
        self._last_flush_time = time.perf_counter()

    def finish(self, summary: dict) -> None:
        self._bar_warnings.close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.write_files(final=True)
        if self.wandb is not None:
            for step in sorted(self._gradients):  # a step that never got its row (it stopped on a non-finite loss)
                self.wandb.log(self._gradient_values(step), step=step)
            self.wandb.finish({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})

    # -- recording -------------------------------------------------------------------------------
    def log_steps(self, rows: list[dict]) -> None:
        """Rows of optimizer steps already read from the device (one host sync per flush)."""
        now = time.perf_counter()
        elapsed = max(now - (self._last_flush_time or now), 1e-9)
        self._last_flush_time = now
        tokens_per_sec = sum(r["train/step_real_tokens"] for r in rows) / elapsed
        for row in rows:
            row["train/step_real_tokens_per_sec"] = tokens_per_sec
            self.step_rows.append(row)
            if self.wandb is not None:
                values = {k: v for k, v in row.items() if k != "step"}
                self.wandb.log({**values, **self._gradient_values(row["step"])}, step=row["step"])
        if self.bar is not None and rows:
            self.bar.update(len(rows))
            self.bar.set_postfix(loss_excl_pad=f"{rows[-1]['train/step_loss_excl_padding']:.4f}",
                                 tok_s=f"{tokens_per_sec:,.0f}")

    def log_eval(self, row: dict) -> None:
        """A validation inside an epoch (``eval_every``): its own rows and CSV, the same W&B names."""
        self.eval_rows.append(row)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k not in ("step", "epoch")}, step=row["step"])
        self.write_files()

    @property
    def logs_gradients(self) -> bool:
        return self.wandb is not None and self.wandb.run is not None

    def log_gradients(self, model, step: int, histograms: bool) -> None:
        """Per-layer gradient norms (and histograms) of optimizer ``step``, before clipping, after AMP unscaling.

        Held on the device and sent inside that step's row when the rows are flushed: logged at once they reached
        W&B before the buffered rows of earlier steps, which W&B then dropped as out of order. No host sync here.
        """
        names, norms, counts, ranges = [], [], [], []
        for name, parameter in model.named_parameters():
            if parameter.grad is None:
                continue
            grad = parameter.grad.detach().float().flatten()
            names.append(name)
            norms.append(torch.linalg.vector_norm(grad))
            if histograms:
                # torch.histc's own range (min == max == 0) reads the data's min and max back to the host: scale instead.
                low, high = torch.aminmax(grad)
                scaled = (grad - low) / (high - low).clamp_min(torch.finfo(torch.float32).tiny)
                counts.append(torch.histc(scaled, bins=64, min=0.0, max=1.0))
                ranges.append(torch.stack([low, high]))
        if names:
            self._gradients[step] = {"names": names, "norms": torch.stack(norms),
                                     "counts": torch.stack(counts) if counts else None,
                                     "ranges": torch.stack(ranges) if ranges else None}

    def _gradient_values(self, step: int) -> dict:
        """W&B values of ``step``'s held gradient statistics (one host read per step that has them), else {}."""
        held = self._gradients.pop(step, None)
        if held is None:
            return {}
        values = {f"gradients/{name}.norm": norm for name, norm in zip(held["names"], held["norms"].cpu().tolist())}
        if held["counts"] is not None:
            counts, ranges = held["counts"].cpu().numpy(), held["ranges"].cpu().double().numpy()
            for name, count, (low, high) in zip(held["names"], counts, ranges):
                edges = low + (high - low) * torch.linspace(0, 1, len(count) + 1, dtype=torch.float64).numpy()
                values[f"gradients/{name}"] = self.wandb.module.Histogram(np_histogram=(count, edges))
        return values

    def log_config_lines(self, values: dict) -> None:
        if self.wandb is not None:
            self.wandb.log_to_active_run(values)

    def log_epoch(self, row: dict) -> dict:
        row = {column: row.get(column) for column in EPOCH_COLUMNS}
        self.epoch_rows.append(row)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if v is not None and k != "global_step"}, step=row["global_step"])
        self.write_files()
        return row

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    # -- outputs -----------------------------------------------------------------------------------
    def epochs_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.epoch_rows, columns=EPOCH_COLUMNS)

    def steps_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.step_rows, columns=STEP_COLUMNS)

    @property
    def epochs_csv(self) -> Path:
        return self.output_dir / "metrics_epochs.csv"

    @property
    def steps_csv(self) -> Path:
        return self.output_dir / "metrics_steps.csv"

    def write_files(self, final: bool = False) -> None:
        """The CSVs, after every epoch: the small epoch and eval files rewritten atomically (a crash mid-write
        leaves the previous version); the step file appended, after being rewritten whole once per process (so a
        resume, or a line torn by a kill, starts clean). ``metrics_history.json`` (all rows in one file) is written
        at the end only: rewritten whole every epoch it took 1.6 s at 300k steps."""
        if not self.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.epochs_csv, self.epochs_frame().to_csv(index=False))
        self._write_step_rows()
        if self.eval_rows:
            _write_atomically(self.output_dir / "metrics_evals.csv", pd.DataFrame(self.eval_rows).to_csv(index=False))
        if final:
            history = {"epochs": self.epoch_rows, "steps": self.step_rows, "evals": self.eval_rows}
            _write_atomically(self.output_dir / "metrics_history.json", json.dumps(history, default=float))

    def _write_step_rows(self) -> None:
        written = self._step_rows_on_disk
        if written is None or written > len(self.step_rows) or not self.steps_csv.exists():
            _write_atomically(self.steps_csv, self.steps_frame().to_csv(index=False))
        elif written < len(self.step_rows):
            new_rows = pd.DataFrame(self.step_rows[written:], columns=STEP_COLUMNS)
            with open(self.steps_csv, "a") as handle:
                handle.write(new_rows.to_csv(index=False, header=False))
        self._step_rows_on_disk = len(self.step_rows)

    def state_dict(self) -> dict:
        return {"step_rows": list(self.step_rows), "epoch_rows": list(self.epoch_rows), "eval_rows": list(self.eval_rows),
                "wandb_run_id": self.wandb_run_id}

    def load_state_dict(self, state: dict) -> None:
        self.step_rows = list(state["step_rows"])
        self.epoch_rows = list(state["epoch_rows"])
        self.eval_rows = list(state.get("eval_rows", []))
        self.wandb_run_id = state.get("wandb_run_id")

    def plot(self) -> dict[str, str]:
        from .plots import save_training_plots

        if not self.is_main or not self.epoch_rows:
            return {}
        evals = pd.DataFrame(self.eval_rows) if self.eval_rows else None
        return save_training_plots(self.epochs_frame(), self.steps_frame(), self.output_dir, evals=evals, title=self.run_name)
