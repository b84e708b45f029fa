"""Checkpoints that resume bit-for-bit: atomic folders, everything the next step depends on.

Layout: ``output_dir/checkpoints/step-<global step>/`` holding ``model.pt``, ``optimizer.pt``,
``trainer_state.pt`` and ``meta.json`` (written last; lists every file's size). A folder is built
as ``.tmp-step-<N>`` and renamed when complete, so a crash while saving never damages the
checkpoints already there.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from .distributed import barrier
from .run_state import TrainState

# Settings that fix the data's order or the optimisation: resuming with other values would not continue the
# same run. n_epochs may be raised (the schedule is rebuilt for the new total).
RUN_SETTINGS = ("batch_size", "gradient_accumulation_steps", "shuffle", "random_seed", "group_by_length",
                "max_tokens_per_batch", "learning_rate", "weight_decay", "lr_schedule", "use_lr_schedule", "warmup_ratio",
                "warmup_steps", "max_grad_norm", "mixed_precision", "use_amp", "precision")
STEP_PREFIX = "step-"


def data_fingerprint(source) -> str:
    """sha256 over every token, mask and label: a resume must see the same data.

    A user's DataLoader is not read ahead of training: its first batch and its length stand for it.
    """
    digest = hashlib.sha256()
    if hasattr(source, "examples"):
        tensors = [t for ex in source.examples for t in (ex.input_ids, ex.attention_mask, ex.labels)]
    else:
        digest.update(f"loader of {len(source)} batches".encode())
        tensors = list(source.first_batch().values())
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().long().numpy().tobytes())
        else:
            digest.update(b"-")
    return digest.hexdigest()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_file(obj, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
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


def _write_folder(final: Path, payload: dict[str, object], meta: dict) -> None:
    """Write every file under a temporary name, fsync, then rename the folder into place."""
    tmp = final.with_name(".tmp-" + final.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, obj in payload.items():
        _save_file(obj, tmp / name)
    meta = dict(meta, files={name: (tmp / name).stat().st_size for name in payload},
                sha256={name: _sha256(tmp / name) for name in payload})
    _write_text_synced(tmp / "meta.json", json.dumps(meta, indent=1, default=str))
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


def save_checkpoint(checkpoints_dir: Path, step: int, *, model_state, optimizer_state, trainer_state: dict, meta: dict) -> Path:
    final = checkpoints_dir / f"{STEP_PREFIX}{step}"
    _write_folder(final, {"model.pt": model_state, "optimizer.pt": optimizer_state, "trainer_state.pt": trainer_state},
                  dict(meta, step=step))
    return final


def save_best(checkpoints_dir: Path, *, model_state, meta: dict) -> Path:
    final = checkpoints_dir / "best"
    _write_folder(final, {"model.pt": model_state}, meta)
    return final


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` step folders; ``best`` is separate and always kept.

    Also removes ``.tmp-*``/``.old-*`` leftovers of saves that a crash interrupted (called right after a
    complete save, so none of them is in use).
    """
    for folder in step_folders(checkpoints_dir)[keep:]:
        shutil.rmtree(folder, ignore_errors=True)
    for leftover in list(checkpoints_dir.glob(".tmp-*")) + list(checkpoints_dir.glob(".old-*")):
        shutil.rmtree(leftover, ignore_errors=True)


def step_folders(checkpoints_dir: Path) -> list[Path]:
    """Complete-looking step folders, newest first."""
    if not checkpoints_dir.is_dir():
        return []
    folders = [p for p in checkpoints_dir.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
               and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(folders, key=lambda p: int(p.name[len(STEP_PREFIX):]), reverse=True)


def load_checkpoint(folder: Path) -> dict:
    """Read one folder; raise if any file is missing, truncated, altered or unreadable."""
    meta = json.loads((folder / "meta.json").read_text())
    for name, size in meta["files"].items():
        actual = (folder / name).stat().st_size
        if actual != size:
            raise OSError(f"{name} has {actual} bytes, expected {size} (truncated)")
        expected_hash = meta.get("sha256", {}).get(name)
        if expected_hash is not None and _sha256(folder / name) != expected_hash:
            raise OSError(f"{name} does not match its sha256 in meta.json (the file was altered or corrupted)")
    loaded = {name: torch.load(folder / name, map_location="cpu", weights_only=False) for name in meta["files"]}
    return {"meta": meta, "folder": folder, **loaded}


def find_resumable(checkpoints_dir: Path) -> dict | None:
    """The newest checkpoint that loads; unreadable ones are skipped with a warning naming them."""
    for folder in step_folders(checkpoints_dir):
        try:
            return load_checkpoint(folder)
        except Exception as error:  # noqa: BLE001 - any damage means: try the next one
            warnings.warn(f"Skipping checkpoint {folder}: it is incomplete or unreadable ({type(error).__name__}: {error}).",
                          UserWarning, stacklevel=2)
    return None


def check_compatible(meta: dict, *, settings: dict, fingerprint: str, val_fingerprint: str, world_size: int) -> None:
    """Refuse a resume that would not continue the same run, naming what differs."""
    if meta["data_fingerprint"] != fingerprint:
        raise ValueError("Cannot resume: the checkpoint was made on different training data (its fingerprint differs). "
                         "Pass the same train_data, or start fresh with resume_from_checkpoint=False.")
    if meta.get("val_fingerprint", val_fingerprint) != val_fingerprint:
        raise ValueError("Cannot resume: the checkpoint was made with different validation data (its fingerprint "
                         "differs), so best-model and early-stopping decisions would compare other numbers. Pass the "
                         "same val_data, or start fresh with resume_from_checkpoint=False.")
    for name in RUN_SETTINGS:
        if meta["settings"][name] != settings[name]:
            raise ValueError(f"Cannot resume: the checkpoint was made with {name}={meta['settings'][name]!r}, this run "
                             f"has {name}={settings[name]!r}. Use the checkpoint's value, or start fresh.")
    if meta.get("world_size", 1) != world_size:
        raise ValueError(f"Cannot resume: the checkpoint was made with {meta.get('world_size', 1)} processes, this run "
                         f"has {world_size}. Launch the same number of processes, or start fresh.")


# ----------------------------------------------------------------------------------------------
# A run's checkpoints: save and resume
# ----------------------------------------------------------------------------------------------
def save_run(run, best: bool = False) -> None:
    """Only at optimizer-step boundaries, after pending steps are recorded. Rank 0 writes; all ranks wait."""
    rng_states = [rng_state()]
    if run.ctx.enabled:
        rng_states = [None] * run.ctx.world_size
        torch.distributed.all_gather_object(rng_states, rng_state())
    if run.ctx.is_main:
        meta = {"settings": run.settings.as_dict(), "data_fingerprint": run.data_fingerprint,
                "val_fingerprint": run.val_fingerprint, "run_id": run.run_id, "world_size": run.ctx.world_size,
                "epoch": run.state.epoch, "step_in_epoch": run.state.step_in_epoch,
                "best_epoch": run.state.best_epoch, "best_val_loss": run.state.best_val_loss}
        if best:  # before the step folder that records it: after any kill, a step folder's best/ exists
            run.best_checkpoint = str(save_best(run.checkpoints_dir, model_state=run.model.state_dict(), meta=meta))
        trainer_state = {"state": asdict(run.state), "scheduler": run.scheduler.state_dict(),
                         "scaler": run.scaler.state_dict(), "rng": rng_states, "tracker": run.tracker.state_dict()}
        folder = save_checkpoint(run.checkpoints_dir, run.state.global_step, model_state=run.model.state_dict(),
                                 optimizer_state=run.optimizer.state_dict(), trainer_state=trainer_state, meta=meta)
        run.last_checkpoint = str(folder)
        prune_checkpoints(run.checkpoints_dir, run.settings.keep_checkpoints)
    barrier(run.ctx)


def resume_run(run) -> dict | None:
    """Load the checkpoint ``resume_from_checkpoint`` names into ``run``; None when starting fresh."""
    target = run.settings.resume_from_checkpoint
    if not target:
        return None
    if target is True:
        loaded = find_resumable(run.checkpoints_dir)
        if loaded is None:
            run.tracker.message(f"resume_from_checkpoint=True: no checkpoint under {run.checkpoints_dir}; starting fresh.")
            return None
    else:
        try:
            loaded = load_checkpoint(Path(target))
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"Cannot resume from {target}: {type(error).__name__}: {error}. Pass a checkpoint folder "
                             f"(…/checkpoints/step-N) or resume_from_checkpoint=True for the newest.") from error
    check_compatible(loaded["meta"], settings=run.settings.as_dict(), fingerprint=run.data_fingerprint,
                     val_fingerprint=run.val_fingerprint, world_size=run.ctx.world_size)
    try:
        run.model.load_state_dict(loaded["model.pt"])
    except RuntimeError as error:
        raise ValueError(f"Cannot resume: the checkpoint's parameters do not match this model ({error}). "
                         "Build the same architecture, or start fresh.") from error
    run.optimizer.load_state_dict(loaded["optimizer.pt"])
    trainer_state = loaded["trainer_state.pt"]
    run.scheduler.load_state_dict(trainer_state["scheduler"])
    _rate_from_schedule(run.optimizer, run.scheduler)
    run.scaler.load_state_dict(trainer_state["scaler"])
    run.state = TrainState.from_dict(trainer_state["state"])
    run.tracker.load_state_dict(trainer_state["tracker"])
    run.last_checkpoint = str(loaded["folder"])
    _restore_best(run, loaded)
    return loaded


def _rate_from_schedule(optimizer, scheduler) -> None:
    """The next step's learning rate from the (possibly rebuilt) schedule, not the one saved with the optimizer.

    Equal for a plain resume; after raising n_epochs the saved rate belongs to the old curve (0 at a cosine's
    end), and the first resumed step would otherwise run at it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # get_lr() outside step() warns
        for group, rate in zip(optimizer.param_groups, scheduler.get_lr()):
            group["lr"] = rate


def _restore_best(run, loaded: dict) -> None:
    """``best/`` counts only if it is the best the checkpoint recorded; else the checkpoint's own weights may be."""
    state, best = run.state, run.checkpoints_dir / "best"
    if state.best_epoch is None:
        return
    try:
        best_meta = json.loads((best / "meta.json").read_text())
        matches = (best_meta.get("best_epoch"), best_meta.get("best_val_loss")) == (state.best_epoch, state.best_val_loss)
    except (OSError, ValueError):
        matches = False
    if matches:
        run.best_checkpoint = str(best)
        if run.settings.load_best_model_at_end:
            run.best_weights = load_checkpoint(best)["model.pt"]
    elif state.best_epoch == state.epoch and state.step_in_epoch == 0:
        # The checkpoint ends the best epoch: its own weights are the best.
        run.best_checkpoint = str(loaded["folder"])
        if run.settings.load_best_model_at_end:
            run.best_weights = loaded["model.pt"]
    elif run.settings.load_best_model_at_end:
        warnings.warn(f"{best} does not hold the best epoch ({state.best_epoch}) that {loaded['folder']} records; the "
                      "best weights are lost unless a later epoch improves on them.", UserWarning, stacklevel=3)
