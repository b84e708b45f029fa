"""Sharded checkpoints (``fsdp=True``) through ``torch.distributed.checkpoint`` (DCP): every process writes its shards.

A folder is complete-or-ignored and verified as :mod:`checkpoint`'s: built as ``.tmp-<name>``, each process writes
its shards of the model and of AdamW's moments into it (DCP's ``FileSystemWriter``, fsynced) and rank 0 DCP's one
``.metadata`` file; then rank 0 adds ``trainer_state.pt``, hashes every file into ``meta.json`` and renames the
folder. All processes need to see the folder (one machine, or a file system they share), as DCP itself does.

DCP reshards on load: a folder written by N processes loads on M processes, and into an unsharded model (one
process, ``fsdp=False``). The data order then follows one rule (:func:`check_world_size_change`).
"""
from __future__ import annotations

from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from . import checkpoint as ckpt
from ..distributed import barrier
from ..setting_rules import PER_PROCESS



def _dcp_state(model, optimizer=None) -> dict:
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def write_sharded_folder(final: Path, state: dict, payload: dict, meta: dict, ctx) -> Path:
    """A collective: every process writes its shards of ``state``; rank 0 writes ``payload`` and completes the
    folder."""
    if ctx.is_main:
        ckpt.start_folder(final)
    barrier(ctx)  # the temporary folder exists before anyone writes into it
    dcp.save(state, storage_writer=FileSystemWriter(final.with_name(".tmp-" + final.name), sync_files=True))
    # dcp.save returns on rank 0 after every process's shards are written (it gathers their results to write .metadata).
    if ctx.is_main:
        ckpt.write_folder(final, payload, dict(meta, sharded=True), started=True)
    return final


def save_checkpoint(trainer, best: bool) -> None:
    """``RunCheckpoints.save`` for a sharded model: ``best/`` (weights only) first, then the step folder."""
    ctx, state, model = trainer.ctx, trainer.state, trainer.model
    trainer_state = trainer.state_dict()["trainer_state.pt"]  # gathers every process's RNG state (a collective)
    meta = trainer.checkpoint_meta()
    folders = trainer.checkpoints
    if best:  # before the step folder that records it, as checkpoint.py's
        folders.best_checkpoint = str(write_sharded_folder(folders.folder / "best", _dcp_state(model), {}, meta,
                                                           ctx))
    final = folders.folder / f"{ckpt.STEP_PREFIX}{state.global_step}"
    write_sharded_folder(final, _dcp_state(model, trainer.optimizer), {"trainer_state.pt": trainer_state},
                         dict(meta, step=state.global_step), ctx)
    folders.last_checkpoint = str(final)
    if ctx.is_main:
        ckpt.prune_checkpoints(folders.folder, trainer.settings.checkpoints.keep_checkpoints)
    barrier(ctx)


def load_model_and_optimizer(model, optimizer, folder: Path) -> None:
    """Weights and AdamW state from a sharded folder into this model (sharded over any number of processes, or not)."""
    state = _dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load_model_weights(model, folder: Path) -> dict:
    """A sharded folder's weights as a state dict shaped like ``model.state_dict()`` (the model is left as it is)."""
    state = {"model": {name: value.detach().clone() for name, value in get_model_state_dict(model).items()}}
    dcp.load(state, checkpoint_id=str(folder))
    return state["model"]


def check_world_size_change(meta: dict, settings, world_size: int, streamed: bool) -> None:
    """The rule for resuming on another number of processes: only a sharded checkpoint, only a planned (not
    streamed) source, and every optimizer step must hold the same examples, i.e. ``batch_size x processes`` (and
    ``max_tokens_per_batch x processes`` when set) stay what they were. Then the plan of every remaining step is
    the one the checkpoint's run would have made; otherwise the resume cannot be exact and is refused."""
    before = meta.get("world_size", 1)
    changed = f"the checkpoint was made with {before} process(es), this run has {world_size}"
    if not meta.get("sharded"):
        raise ValueError(f"Cannot resume: {changed}. Only checkpoints of fsdp=True runs (sharded) move between numbers "
                         f"of processes. Launch {before} process(es), or start fresh.")
    if streamed:
        raise ValueError(f"Cannot resume: {changed}, and a stream's position is recorded per process. Launch {before} "
                         "process(es), or start fresh.")
    values = settings.as_dict()
    for name in settings.names_where(resume=PER_PROCESS):  # with another number of processes, x processes stays
        old, new = meta["settings"].get(name), values[name]
        if old is None and new is None:
            continue
        if old is None or new is None or old * before != new * world_size:
            exact = (old * before) % world_size == 0 if old is not None else False
            fix = (f"pass {name}={old * before // world_size} (the same examples per optimizer step)" if exact else
                   f"no {name} gives every step the same examples on {world_size} processes; launch {before}")
            raise ValueError(f"Cannot resume exactly: {changed}, and {name} is per process ({old} then, {new} now), so "
                             f"the optimizer steps would hold other examples. {fix.capitalize()}, or start fresh.")
