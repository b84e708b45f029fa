"""Checkpoint folders as durable files: written atomically, fsynced, verified by sha256, listed, pruned, loaded.

Layout: ``output_dir/checkpoints/step-<global step>/`` (and ``best/``) holding one ``.pt`` file per entry
of the payload and ``meta.json`` (written last; every file's size and sha256). A folder is built as
``.tmp-<name>`` and renamed when complete, so a crash while saving never damages the checkpoints already
there. What goes into a checkpoint is the trainer's business (``Trainer.state_dict``), not this module's.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import threading
import time
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from .checkpoint_format import FORMAT_VERSION, META_KEY, SEALED_FROM
from ..warn import caller_stacklevel

STEP_PREFIX = "step-"
CHECKPOINTS = "checkpoints"  # a run's checkpoints: output_dir/checkpoints/step-N (and best/)
META_SEAL = "meta_sha256"  # meta.json's own sha256, over its content without this key (canonical JSON)


# Linux's sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a range to disk, do not wait for it.
_START_WRITEBACK = 2
try:
    _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
except (AttributeError, OSError, TypeError):  # not Linux: the final fsync does all the writing
    _sync_file_range = None
WRITEBACK_CHUNK = 64 << 20  # bytes handed to the disk at a time while the rest is still being serialised
# One write() call, hashed just before it while still in the CPU's cache: on ext4, 64 MiB calls took twice the
# CPU time of 256 KiB ones for the same bytes (1 GiB: 2.6-2.9 s against 1.3-1.45 s, hash included). Hashing in a
# second thread beside the write did not pay: 17M's AdamW state took 0.31 s that way against 0.22 s, 124M's 1.70
# against 1.80 s (medians of 7 and 4 alternating writes).
WRITE_PIECE = 256 << 10


class _HashingWriter:
    """Files that hash what passes through them: the sha256 comes with the write, not from reading it back.

    Each ``WRITEBACK_CHUNK`` is handed to the disk once written: the kernel would otherwise keep a checkpoint's
    gigabytes in memory until the fsync and write them only then, so the disk's time would add to the
    serialisation's instead of running beside it. Every handle receives the same bytes (a step's ``model.pt``
    and ``best/model.pt``: one serialisation, one hash)."""

    def __init__(self, handles):
        self.handles, self.digest = handles, hashlib.sha256()
        self.written = self.handed = 0  # bytes written; bytes of them handed to the disk

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        for offset in range(0, len(view), WRITE_PIECE):
            part = view[offset:offset + WRITE_PIECE]
            self.digest.update(part)
            for handle in self.handles:
                handle.write(part)
            self.written += len(part)
            if self.written - self.handed >= WRITEBACK_CHUNK:
                self.start_writeback()
        return len(view)

    def start_writeback(self) -> None:
        if _sync_file_range is None:
            return
        for handle in self.handles:
            handle.flush()  # the buffered tail reaches the kernel first
            # A hint only (its result is not checked): the fsync after the last write makes the file durable.
            _sync_file_range(handle.fileno(), self.handed, self.written - self.handed, _START_WRITEBACK)
        self.handed = self.written

    def flush(self) -> None:
        for handle in self.handles:
            handle.flush()


_CRC32_OPTION = threading.Lock()  # one save at a time switches torch's process-wide option


def checkpoints_folder(output_dir) -> Path:
    """Where a run writing into ``output_dir`` keeps its checkpoints (the one place the layout is spelled)."""
    return Path(output_dir) / CHECKPOINTS


def run_folder_of(checkpoint_folder) -> Path:
    """The output_dir a checkpoint folder (``.../checkpoints/step-N``) belongs to: the inverse of
    :func:`checkpoints_folder`."""
    return Path(checkpoint_folder).parent.parent


@contextmanager
def _without_zip_crc32():
    """``torch.save`` without the zip format's CRC32 of every record: the file's sha256, taken as it is written and
    checked before every load, already covers each byte, and the CRC32 was a fifth of a checkpoint's write (17M:
    0.326 s against 0.258 s, 124M: 2.05 against 1.64 s, medians of 7 and 3). torch.load reads such files as any.
    torch keeps the option process-wide: a ``torch.save`` of another thread meanwhile also leaves it out."""
    if not hasattr(torch.serialization, "set_crc32_options"):  # before torch 2.6: always computed
        yield
        return
    with _CRC32_OPTION:
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            yield
        finally:
            torch.serialization.set_crc32_options(before)


def _save_file(obj, path: Path, copy_to: Path | None = None) -> str:
    """``torch.save`` into ``path`` (and the same bytes into ``copy_to``), fsynced; returns the file's sha256."""
    with ExitStack() as files:
        handles = [files.enter_context(open(target, "wb")) for target in (path, copy_to) if target is not None]
        writer = _HashingWriter(handles)
        with _without_zip_crc32():
            torch.save(obj, writer)
        for handle in handles:
            handle.flush()
            os.fsync(handle.fileno())
    return writer.digest.hexdigest()


def _copy_file_synced(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)  # an in-kernel copy where the filesystem has one
    with open(target, "rb+") as handle:
        os.fsync(handle.fileno())


def _write_text_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a crash right after must not undo it)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some filesystems (network mounts) cannot open folders; the rename is still atomic
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def start_folder(final: Path) -> Path:
    """The empty temporary folder that becomes ``final`` when :func:`write_folder` completes it."""
    tmp = final.with_name(".tmp-" + final.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_folder(final: Path, payload: dict[str, object], meta: dict, *, started: bool = False) -> Path:
    """Write every file under a temporary name, fsync, then rename the folder into place.

    ``started``: :func:`start_folder` made the temporary folder and others wrote files into it already (each
    process its shards of a sharded checkpoint, fsynced); they are hashed and renamed with the payload.
    """
    tmp = final.with_name(".tmp-" + final.name) if started else start_folder(final)
    hashes = {name: _save_file(obj, tmp / name) for name, obj in payload.items()}
    hashes.update({p.name: _sha256(p) for p in tmp.iterdir() if p.name not in hashes})  # the shards of others
    return _finish_folder(tmp, final, meta, dict(sorted(hashes.items())))


def _finish_folder(tmp: Path, final: Path, meta: dict, hashes: dict[str, str]) -> Path:
    """``meta.json`` (sizes and sha256 of the files in ``tmp``) written last, then ``tmp`` renamed to ``final``."""
    meta = dict(meta, files={name: (tmp / name).stat().st_size for name in hashes}, sha256=hashes)
    _write_text_synced(tmp / "meta.json", json.dumps(sealed_meta(meta), indent=1))
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (or 'best'): move the old one aside first
        old = final.with_name(".old-" + final.name)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    _VERIFIED.add(_file_stamps(final))  # just written and hashed
    return final


def save_step(checkpoints_dir: Path, step: int, payload: dict[str, object], meta: dict,
              best: bool = False, before_publish=None) -> tuple[Path, Path | None]:
    """``step-<step>/`` and, when ``best``, ``best/`` (a copy of its ``model.pt``) written before it: after a
    kill at any moment, a step folder that records a best epoch finds that epoch in ``best/``.
    ``before_publish()`` runs once the files are written, before either folder is renamed into place; an error it
    raises leaves only ``.tmp-`` folders."""
    final = checkpoints_dir / f"{STEP_PREFIX}{step}"
    tmp = start_folder(final)
    best_tmp = start_folder(checkpoints_dir / "best") if best else None
    # The step's weights go into best/ as they are written: one serialisation and one hash serve both folders.
    hashes = {name: _save_file(obj, tmp / name, best_tmp / name if best and name == "model.pt" else None)
              for name, obj in payload.items()}
    if before_publish is not None:
        before_publish()
    best_folder = None
    if best:
        best_folder = _finish_folder(best_tmp, checkpoints_dir / "best", meta, {"model.pt": hashes["model.pt"]})
    return _finish_folder(tmp, final, dict(meta, step=step), hashes), best_folder


def publish_folder(source: Path, target_dir: Path) -> Path:
    """Copy a complete checkpoint folder into ``target_dir`` (a staging folder's into ``output_dir``): files into
    ``.tmp-<name>``, each checked against the source's sha256 after the copy, ``meta.json`` last, then renamed.
    A copy cut short stays a ``.tmp-`` folder, which is never taken for a checkpoint."""
    meta = json.loads((source / "meta.json").read_text())
    final = target_dir / source.name
    tmp = start_folder(final)
    for name in meta["files"]:
        _copy_file_synced(source / name, tmp / name)
        if _sha256(tmp / name) != meta["sha256"][name]:
            raise OSError(f"{tmp / name} differs from {source / name} after copying (sha256); the storage under "
                          f"{target_dir} corrupted it")
    return _finish_folder(tmp, final, {k: v for k, v in meta.items() if k not in ("files", "sha256", META_SEAL)},
                          meta["sha256"])


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` intact step folders; ``best`` is separate and always kept.

    A damaged folder never holds one of the ``keep`` slots: it is moved aside (``damaged-step-N-<time>``, its intact
    files with it), or a run whose newest checkpoint was damaged would delete every new checkpoint right after
    writing it. Also removes ``.tmp-*``/``.old-*`` leftovers of saves that a crash interrupted (called right after
    a complete save, so none is in use).
    """
    kept = 0
    for folder in step_folders(checkpoints_dir):
        if not _verified(folder):
            set_aside([folder], checkpoints_dir, "damaged-" + folder.name)
        elif kept < keep:
            kept += 1
        else:  # renamed first: a kill while deleting leaves a .old- leftover, never a half-deleted step folder
            doomed = folder.with_name(".old-" + folder.name)
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(folder, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    for leftover in list(checkpoints_dir.glob(".tmp-*")) + list(checkpoints_dir.glob(".old-*")):
        shutil.rmtree(leftover, ignore_errors=True)


def set_aside(folders: list[Path], checkpoints_dir: Path, name: str) -> Path:
    """Move ``folders`` into ``checkpoints_dir/<name>-<time>/`` (renames: nothing is copied or deleted). Only folders
    named ``step-N`` directly in ``checkpoints_dir`` count as checkpoints, so these no longer take part in pruning
    or in ``resume_from_checkpoint=True``; their files stay as they were."""
    aside = checkpoints_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    while aside.exists():
        aside = aside.with_name(aside.name + "-")
    aside.mkdir()
    for folder in folders:
        os.replace(folder, aside / folder.name)
    _fsync_dir(aside)
    _fsync_dir(checkpoints_dir)
    return aside


def step_of(folder: Path) -> int:
    return int(folder.name[len(STEP_PREFIX):])


_VERIFIED: set[tuple] = set()  # folders whose files matched their sha256 in this process, as they were then


def _file_stamps(folder: Path) -> tuple:
    """Name, size and modification time of every file: a file changed since it was hashed changes its stamp."""
    return (str(folder),) + tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()))


def _verified(folder: Path) -> bool:
    try:
        stamps = _file_stamps(folder)
        if stamps not in _VERIFIED:
            verify_folder(folder)
            _VERIFIED.add(stamps)
        return True
    except Exception:  # noqa: BLE001 - any damage means: not intact
        return False


def step_folders(checkpoints_dir: Path) -> list[Path]:
    """Complete-looking step folders, newest first."""
    if not checkpoints_dir.is_dir():
        return []
    folders = [p for p in checkpoints_dir.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
               and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(folders, key=lambda p: int(p.name[len(STEP_PREFIX):]), reverse=True)


def _meta_digest(meta: dict) -> str:
    content = {key: value for key, value in meta.items() if key != META_SEAL}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed_meta(meta: dict) -> dict:
    """``meta`` as JSON reads it back, with the sha256 of that content: an edit of any recorded fact (a setting,
    a best loss, the format) is then found before the checkpoint is used."""
    content = json.loads(json.dumps({k: v for k, v in meta.items() if k != META_SEAL}, default=str))
    return dict(content, **{META_SEAL: _meta_digest(content)})


def _check_seal(meta: dict, path: Path) -> None:
    version = meta.get(META_KEY)
    known_sealed = type(version) is int and SEALED_FROM <= version <= FORMAT_VERSION
    if META_SEAL not in meta:
        if known_sealed:  # written by a version that seals every meta.json: the key was removed
            raise OSError(f"{path} was edited or damaged (tampered meta.json): format {version} records {META_SEAL}, "
                          "this one has none")
        return  # written before meta.json was sealed (formats 1-2): read as before
    if meta[META_SEAL] != _meta_digest(meta):
        raise OSError(f"{path} was edited or damaged after it was written (tampered meta.json): its content does not "
                      f"match the {META_SEAL} recorded in it")


def verify_folder(folder: Path) -> dict:
    """The folder's meta, after checking it and every file's size and sha256; raise ``OSError`` naming the damage."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as error:
        raise OSError(f"{folder / 'meta.json'} is missing or unreadable ({error})") from error
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise OSError(f"{folder / 'meta.json'} is unreadable (tampered meta.json): it lists no files")
    _check_seal(meta, folder / "meta.json")
    for name, size in meta["files"].items():
        actual = (folder / name).stat().st_size
        if actual != size:
            raise OSError(f"{folder / name} has {actual} bytes, expected {size} (truncated)")
        expected_hash = meta.get("sha256", {}).get(name)
        if expected_hash is not None and _sha256(folder / name) != expected_hash:
            raise OSError(f"{folder / name} does not match its sha256 in meta.json (the file was altered or corrupted)")
    return meta


def load_checkpoint(folder: Path) -> dict:
    """Read one folder; raise if any file is missing, truncated, altered or unreadable."""
    meta = verify_folder(folder)
    # A sharded checkpoint's shard files are verified here and read by sharded_checkpoint into the sharded model.
    loaded = {name: torch.load(folder / name, map_location="cpu", weights_only=False) for name in meta["files"]
              if name.endswith(".pt")}
    return {"meta": meta, "folder": folder, **loaded}


def find_resumable(checkpoints_dir: Path, damaged: list | None = None) -> dict | None:
    """The newest checkpoint that loads; unreadable ones are skipped with a warning naming them (and appended to
    ``damaged`` as (folder, reason))."""
    for folder in step_folders(checkpoints_dir):
        try:
            return load_checkpoint(folder)
        except Exception as error:  # noqa: BLE001 - any damage means: try the next one
            reason = f"{type(error).__name__}: {error}"
            if damaged is not None:
                damaged.append((folder, reason))
            warnings.warn(f"Skipping checkpoint {folder}: it is damaged ({reason}).", UserWarning,
                          stacklevel=caller_stacklevel())
    return None
