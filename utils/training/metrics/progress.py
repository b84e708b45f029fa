"""The progress bar of rank 0 (a sink of the step rows) and the run's messages, written above the bar while it is
open (warnings too), printed otherwise."""
from __future__ import annotations

import contextlib

from .rows import RowSink
from ..warn import warnings_through


class Progress(RowSink):
    def __init__(self, show_bar: bool = True):
        self.show_bar = show_bar
        self.bar = None
        self._bar_warnings = contextlib.ExitStack()

    def start(self, rows, config, total_steps) -> None:
        if self.show_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=len(rows.step_rows), desc="fine-tuning", unit="step",
                            dynamic_ncols=True)
            self._bar_warnings.enter_context(warnings_through(self.bar))

    def steps(self, rows, new_rows) -> None:
        if self.bar is not None and new_rows:
            self.bar.update(len(new_rows))
            self.bar.set_postfix(loss_excl_pad=f"{new_rows[-1]['train/step_loss_excl_padding']:.4f}",
                                 tok_s=f"{new_rows[-1]['train/step_real_tokens_per_sec']:,.0f}")

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def finish(self, rows, summary) -> None:
        self._bar_warnings.close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
