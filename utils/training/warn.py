"""Warnings that point at the user's line, and that do not break a progress bar."""
from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent.parent)  # .../utils


def _in_package(filename: str) -> bool:
    return str(Path(filename).resolve()).startswith(_PACKAGE)


def caller_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` made by the function calling this: the caller of the OUTERMOST
    frame inside ``utils``, so a warning names the user's line even when the package is re-entered through
    Optuna or another library in between (a search trial). In a background thread (the checkpoint writer, a
    watch) no user's line called it: the warning names its own line."""
    if threading.current_thread() is not threading.main_thread():
        return 1
    frame, level, outermost = sys._getframe(1), 1, 1
    while frame is not None:
        if _in_package(frame.f_code.co_filename):
            outermost = level
        frame, level = frame.f_back, level + 1
    return outermost + 1


def _recording() -> bool:
    # ``catch_warnings(record=True)`` (pytest.warns, pytest's own capture) appends to a list; a replaced
    # ``showwarning`` would take the warnings away from it.
    return isinstance(getattr(getattr(warnings, "_showwarnmsg_impl", None), "__self__", None), list)


@contextlib.contextmanager
def warnings_through(bar):
    """While a tqdm bar is open, warnings are written above it (``bar.write``) instead of onto its line."""
    if bar is None or _recording():
        yield
        return
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n")
        bar.write(text, file=getattr(bar, "fp", None) or sys.stderr)  # the stream the bar draws on

    warnings.showwarning = show
    try:
        yield
    finally:
        if warnings.showwarning is show:  # leave alone a hook someone else installed meanwhile
            warnings.showwarning = previous
