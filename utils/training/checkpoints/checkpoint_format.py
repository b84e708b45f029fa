"""The checkpoint format version: one number, recorded in every checkpoint's ``meta.json``.

A resume compares a checkpoint's recorded facts (data fingerprints, settings, positions) with this run's only
when both were written in the same format; a checkpoint of another format is refused naming both versions, so a
user is never told that their data changed when it is the package that did.

Bump ``FORMAT_VERSION`` (and add a line below) in the same commit as any change to what a checkpoint carries
(``Trainer.state_dict``, ``Trainer.checkpoint_meta``, the files of a folder) or to how a recorded fact is computed
(a fingerprint, a plan).

1  (no ``format_version`` in meta.json) everything written before versions were recorded
2  ``format_version`` recorded; a run ended by ``max_steps`` inside an epoch keeps its position in that epoch
"""
from __future__ import annotations

FORMAT_VERSION = 2
UNVERSIONED = 1  # what a meta.json without the key was written in
META_KEY = "format_version"


def format_of(meta: dict) -> int:
    return int(meta.get(META_KEY, UNVERSIONED))


def check_format(meta: dict, folder) -> None:
    """Refuse a checkpoint written in another format, naming both versions and the ways out."""
    version = format_of(meta)
    if version == FORMAT_VERSION:
        return
    written = ("before checkpoint formats were recorded (format 1)" if META_KEY not in meta
               else f"in checkpoint format {version}")
    newer = "a newer" if version > FORMAT_VERSION else "an older"
    raise ValueError(
        f"Cannot resume from {folder}: it was written {written}, by {newer} version of this package; this version "
        f"reads checkpoint format {FORMAT_VERSION}. Its recorded data fingerprints and settings are not comparable "
        "across formats. Resume it with the package version that wrote it, or start fresh "
        "(resume_from_checkpoint=False, or another output_dir).")
