"""The checkpoint format version: one number, recorded in every checkpoint's ``meta.json``.

A resume compares a checkpoint's recorded facts (data fingerprints, settings, positions) with this run's only
when both were written in a format whose facts are computed as this version computes them; a checkpoint of another
format is refused naming both versions, so a user is never told that their data changed when it is the package
that did.

Bump ``FORMAT_VERSION`` (and add a line below) in the same commit as any change to what a checkpoint carries
(``Trainer.state_dict``, ``Trainer.checkpoint_meta``, the files of a folder) or to how a recorded fact is computed
(a fingerprint, a plan). Add the old number to ``READABLE_FORMATS`` only when every fact it records is computed
as now (the change added something, as 3 did).

1  (no ``format_version`` in meta.json) everything written before versions were recorded
2  ``format_version`` recorded; a run ended by ``max_steps`` inside an epoch keeps its position in that epoch
3  ``meta.json`` carries the sha256 of its own content (``meta_sha256``); facts as in 2, so 2 is still read
"""
from __future__ import annotations

FORMAT_VERSION = 3
READABLE_FORMATS = (2, 3)  # formats whose recorded facts this version computes the same way
UNVERSIONED = 1  # what a meta.json without the key was written in
META_KEY = "format_version"
SEALED_FROM = 3  # from this format on a meta.json without its own sha256 was altered


def format_of(meta: dict, folder=None) -> int:
    """The format a ``meta.json`` records; a value no version writes (null, "abc") means the file was altered."""
    version = meta.get(META_KEY, UNVERSIONED)
    if isinstance(version, bool) or not isinstance(version, int):
        where = f"{folder}/meta.json" if folder is not None else "meta.json"
        raise ValueError(f"Cannot resume from {folder or 'this checkpoint'}: {where} records {META_KEY}={version!r}, "
                         "which no version of this package writes: the file was edited or damaged (tampered or "
                         "unreadable meta.json). Resume from another checkpoint folder, restore the file from a "
                         "copy, or start fresh (resume_from_checkpoint=False).")
    return version


def check_format(meta: dict, folder) -> None:
    """Refuse a checkpoint written in another format, naming both versions and the ways out."""
    version = format_of(meta, folder)
    if version in READABLE_FORMATS:
        return
    written = ("before checkpoint formats were recorded (format 1)" if META_KEY not in meta
               else f"in checkpoint format {version}")
    newer = "a newer" if version > FORMAT_VERSION else "an older"
    raise ValueError(
        f"Cannot resume from {folder}: it was written {written}, by {newer} version of this package; this version "
        f"reads checkpoint format {FORMAT_VERSION}. Its recorded data fingerprints and settings are not comparable "
        "across formats. Resume it with the package version that wrote it, or start fresh "
        "(resume_from_checkpoint=False, or another output_dir).")
