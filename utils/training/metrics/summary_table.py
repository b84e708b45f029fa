"""The results' epoch table as a DataFrame that prints whole in a terminal."""
from __future__ import annotations

import shutil

import pandas as pd


class MetricsSummary(pd.DataFrame):
    """``results["metrics_summary"]``: one row per epoch. Printing it shows every column, wrapped to the terminal's
    width: pandas' terminal default elides the middle columns of a wide table, which are the losses here."""

    @property
    def _constructor(self):
        return MetricsSummary

    def __repr__(self) -> str:
        width = shutil.get_terminal_size().columns
        with pd.option_context("display.max_columns", None, "display.expand_frame_repr", True, "display.width", width):
            return super().__repr__()
