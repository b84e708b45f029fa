"""Resuming a run: which checkpoint, and whether it belongs to this run.

What a checkpoint holds is ``Trainer.state_dict()`` and ``Trainer.load_state_dict`` takes all of it back; this
module decides whether to load one.
"""
from __future__ import annotations

from pathlib import Path

from . import checkpoint as ckpt
from .checkpoint_format import check_format
from .sharded_checkpoint import check_world_size_change
from ..setting_rules import MATCH, PER_PROCESS


def resume(trainer) -> dict | None:
    """Load the checkpoint ``resume_from_checkpoint`` names; None when starting fresh.

    Lines of training: a resume from a checkpoint older than the newest in this run's ``checkpoints`` folder starts
    a new line; the newer folders (the abandoned continuation) are moved aside (:func:`abandon_newer`), so pruning
    and ``resume_from_checkpoint=True`` follow the new line. Damaged folders are moved aside too, never deleted."""
    target, folder = trainer.settings.checkpoints.resume_from_checkpoint, trainer.checkpoints.folder
    if not target:
        return None
    if target is True:
        damaged = []
        loaded = ckpt.find_resumable(folder, damaged)
        kept_aside = _set_damaged_aside(trainer, damaged)
        if damaged:
            names = "; ".join(f"{f.name}: {reason}" for f, reason in damaged)
            trainer.tracker.message(
                ("resume_from_checkpoint=True: every checkpoint under " + str(folder) + " is damaged (" + names
                 + "), so training starts fresh." if loaded is None else "Damaged checkpoints skipped (" + names + ").")
                + (f" Their files are kept in {kept_aside}." if kept_aside else ""))
        elif loaded is None:
            trainer.tracker.message(f"resume_from_checkpoint=True: no checkpoint under {folder}; starting fresh.")
        if loaded is None:
            return None
    else:
        try:
            loaded = ckpt.load_checkpoint(Path(target))
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"Cannot resume from {target}: {type(error).__name__}: {error}. Pass a checkpoint folder "
                             f"(…/checkpoints/step-N) or resume_from_checkpoint=True for the newest.") from error
    check_format(loaded["meta"], loaded["folder"])  # first: the facts below compare only within one format
    check_resumable(trainer, loaded["meta"])
    trainer.load_state_dict(loaded)  # the run's whole state, its random state included
    abandon_newer(trainer, Path(loaded["folder"]))  # after: best/ stays when it is the resumed line's
    return loaded


def _set_damaged_aside(trainer, damaged: list) -> Path | None:
    folders = [folder for folder, _ in damaged if folder.is_dir()]
    if not folders or not trainer.ctx.is_main:
        return None
    return ckpt.set_aside(folders, trainer.checkpoints.folder, "damaged")


def abandon_newer(trainer, resumed: Path) -> None:
    """A resume from an older checkpoint of this run: the newer step folders belong to a continuation that is
    abandoned now. They are moved to ``checkpoints/abandoned-after-step-N-<time>/`` (with ``best/`` when it is not
    the new line's), never deleted: pruning ranks step folders by number, and would otherwise delete the new line's
    checkpoints right after writing them, and ``resume_from_checkpoint=True`` would continue the abandoned run."""
    folder = trainer.checkpoints.folder
    if not trainer.ctx.is_main or resumed.parent.resolve() != folder.resolve():
        return
    newer = [f for f in ckpt.step_folders(folder) if ckpt.step_of(f) > ckpt.step_of(resumed)]
    if not newer:
        return
    best = folder / "best"
    if best.is_dir() and trainer.checkpoints.best_checkpoint != str(best):
        newer.append(best)  # written by the abandoned continuation: the new line writes its own
    aside = ckpt.set_aside(newer, folder, f"abandoned-after-{resumed.name}")
    trainer.tracker.message(
        f"Resuming from {resumed.name}, older than the newest checkpoint: this run continues a new line of training "
        f"from there. The newer checkpoints of the abandoned line ({', '.join(f.name for f in newer)}) were moved to "
        f"{aside}; pruning and resume_from_checkpoint=True follow the new line. Delete that folder when it is not "
        "needed.")


def check_resumable(trainer, meta: dict) -> None:
    """Refuse a resume that would not continue the same run, naming what differs and the way out."""
    check_settings(trainer, meta)  # first: a setting that shapes the data is named, not blamed on the data
    if meta["data_fingerprint"] != trainer.fingerprints["train"]:
        raise ValueError("Cannot resume: the checkpoint was made on different training data (its fingerprint "
                         "differs). Pass the same train_data, or start fresh with resume_from_checkpoint=False.")
    if meta.get("val_fingerprint", trainer.fingerprints["val"]) != trainer.fingerprints["val"]:
        raise ValueError("Cannot resume: the checkpoint was made with different validation data (its fingerprint "
                         "differs), so best-model and early-stopping decisions would compare other numbers. Pass "
                         "the same val_data, or start fresh with resume_from_checkpoint=False.")
    world_changed = meta.get("world_size", 1) != trainer.ctx.world_size
    if world_changed:
        check_world_size_change(meta, trainer.settings, trainer.ctx.world_size, trainer.data.train.state_per_process)
    step, max_steps = meta.get("step", 0), trainer.settings.run.max_steps
    if max_steps is not None and step > max_steps:
        raise ValueError(f"Cannot resume: the checkpoint is at optimizer step {step}, past max_steps={max_steps} (it "
                         f"was made with max_steps={meta['settings'].get('max_steps')}). Pass max_steps >= {step}, or "
                         "resume from an earlier checkpoint folder, or start fresh.")
    epoch, step_in_epoch, n_epochs = meta.get("epoch", 0), meta.get("step_in_epoch", 0), trainer.length.n_epochs
    past_the_end = epoch > n_epochs or (epoch == n_epochs and step_in_epoch > 0)
    if max_steps is None and past_the_end:  # with max_steps, the steps decide the run's end
        raise ValueError(f"Cannot resume: the checkpoint is {step_in_epoch} step(s) into epoch {epoch + 1}, past "
                         f"n_epochs={n_epochs}. Pass n_epochs >= {epoch + (1 if step_in_epoch else 0)}, or resume from "
                         "an earlier checkpoint folder, or start fresh.")

def compared_on_resume(rules: dict) -> tuple[str, ...]:
    """The settings a resume compares with the checkpoint's (declared MATCH or PER_PROCESS): resuming with other
    values would not continue the same run. RAISE (n_epochs, max_steps) is checked against the position."""
    return tuple(name for name, rule in rules.items() if rule.resume in (MATCH, PER_PROCESS))


def check_settings(trainer, meta: dict) -> None:
    """The settings declared MATCH (and PER_PROCESS, on the same number of processes) equal the checkpoint's; a
    setting declared MATCH only while it is used (``when``) is compared only then."""
    settings, rules = trainer.settings.as_dict(), trainer.settings.rules()
    world_changed = meta.get("world_size", 1) != trainer.ctx.world_size
    used = {None: True, "stream": any(source.state_per_process for source in (trainer.data.train, trainer.data.val)),
            "held_out": trainer.data.val_held_out}
    for name in compared_on_resume(rules):
        if world_changed and rules[name].resume == PER_PROCESS:
            continue  # compared per optimizer step (all processes) by check_world_size_change
        if not used[rules[name].when]:
            continue
        if name in meta["settings"] and meta["settings"][name] != settings[name]:
            raise ValueError(f"Cannot resume: the checkpoint was made with {name}={meta['settings'][name]!r}, this "
                             f"run has {name}={settings[name]!r}. Use the checkpoint's value, or start fresh.")
