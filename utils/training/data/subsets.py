"""Which rows a part of the data holds: every rule that leaves rows out or gives them to one part, in one place.

- the hold-out for ``val_data=None`` (:func:`split_positions`: a seeded ``val_fraction`` of the positions);
- each process's shard under torchrun: :func:`shard_batches` for examples in memory or on disk (as
  ``DistributedSampler`` does), :func:`stream_shard` for a stream (a ``datasets`` stream's own shards, else
  every k-th row); token-budget steps are divided among processes inside each step (:func:`batch_plans.token_plan`,
  part of the plan); a user's DataLoader is not sharded by the package;
- rows gone past: rows without a real target (:func:`keep_with_real_targets`: warned, or refused when none is
  left), and a stream's rows that fail their checks (:class:`RowChecks`, ``bad_examples``).

Examples in memory or on disk are checked before the first step; a stream cannot be read ahead, so each of its
rows is checked as it is read, and ``bad_examples`` says what a row that fails does: ``"error"`` (the default)
stops the run naming the row, ``"skip"`` goes past it, ``"truncate"`` cuts a too-long row to the model's
positions (a row with ids outside the vocabulary is skipped). Rows gone past are counted and reported in
``results["bad_examples"]``. The checks themselves (ids, lengths) are :mod:`rows`'.
"""
from __future__ import annotations

import warnings
from itertools import islice

import numpy as np
import torch

from ..warn import caller_stacklevel
from .batch_plans import Plan
from .data_settings import BAD_EXAMPLES
from .rows import check_length, first_id_outside, ids_error


# -- the hold-out -------------------------------------------------------------------------------------------------
def split_positions(n: int, val_fraction: float, seed: int):
    """Positions of a seeded random hold-out, each part in the original order (``shuffle=False`` stays meaningful)."""
    if n < 2:
        raise ValueError("Need at least 2 training examples to hold out a validation set; pass val_data explicitly.")
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise ValueError(f"val_fraction={val_fraction} of {n} examples holds out {n_val}, leaving none to "
                         "train on. Lower val_fraction, pass more training data, or pass val_data explicitly.")
    held_out = np.zeros(n, bool)
    held_out[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_val].numpy()] = True
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)


# -- each process's shard -----------------------------------------------------------------------------------------
def shard_batches(order, batch_size: int, world_size: int = 1, rank: int = 0) -> Plan:
    """This rank's batches of ``(example index, counts)``, sharded exactly as DistributedSampler does.

    Rank ``r`` takes global positions ``r, r+W, ...``; the sampler repeats the first positions to
    even out shards, and those repeats are marked ``counts=False`` so no example counts twice.
    """
    order = np.asarray(order, dtype=np.int64)
    total = -(-len(order) // world_size) * world_size
    positions = np.arange(rank, total, world_size)
    return Plan.from_batches(order[positions % len(order)], positions < len(order), batch_size)


def _all_rows(rows):
    return rows


def stream_shard(data, world_size: int, rank: int):
    """Process ``rank``'s part of a stream: ``(what to iterate, its rows -> this process's rows)``. A ``datasets``
    stream is split along its own shards (``split_dataset_by_node``); any other stream gives the process every
    ``world_size``-th row from row ``rank`` on."""
    if world_size > 1 and hasattr(data, "n_shards") and hasattr(data, "_ex_iterable"):
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(data, rank=rank, world_size=world_size), _all_rows
    if world_size > 1:
        return data, lambda rows: islice(rows, rank, None, world_size)
    return data, _all_rows


# -- rows gone past -----------------------------------------------------------------------------------------------
def no_real_target_error(what: str, pad_token_id: int) -> ValueError:
    return ValueError(f"No example of the {what} has a real target token (each needs at least 2 non-padding tokens, "
                      f"pad_token_id={pad_token_id}). Check the pad id and that the data is not all padding.")


def keep_with_real_targets(has_target: np.ndarray, what: str, pad_token_id: int) -> np.ndarray:
    """Which rows of data in memory or on disk are kept: those with a real target. The others are skipped with one
    warning (naming the first); none left is refused."""
    if not has_target.any():
        raise no_real_target_error(what, pad_token_id)
    if not has_target.all():
        skipped = int((~has_target).sum())
        warnings.warn(f"Skipped {skipped} of {len(has_target)} examples of the {what} (the first: example "
                      f"{int(np.argmax(~has_target))}): they have no real target token (all padding, masked, or a "
                      "single token).", UserWarning, stacklevel=caller_stacklevel())
    return has_target


class RowChecks:
    """The checks of a stream's rows as they are read, and what ``bad_examples`` does with a row that fails.

    ``counts`` says how many rows the run went past (or cut) and why; a checkpoint carries them.
    """

    def __init__(self, what: str, bad_examples: str = "error"):
        if bad_examples not in BAD_EXAMPLES:
            raise ValueError(f"Unknown bad_examples {bad_examples!r}; "
                             f"choose one of {', '.join(map(repr, BAD_EXAMPLES))}.")
        self.what, self.policy = what, bad_examples
        self.vocab_size = self.max_length = None  # set by the start-up checks
        self.counts = {"too_long": 0, "ids_outside_vocabulary": 0, "no_real_target": 0, "truncated": 0}

    def fix(self) -> str:
        return (", or pass bad_examples='skip' (go past such rows, counted in results['bad_examples']) or "
                "bad_examples='truncate' (cut too-long rows to the model's positions)")

    def check(self, example, where: str):
        """The example to use, a shorter one (``"truncate"``), or None to go past it; raises under ``"error"``."""
        if self.vocab_size is not None:
            for key, labels in (("input_ids", False), ("labels", True)):
                tensor = getattr(example, key)
                value = None if tensor is None else first_id_outside(tensor, self.vocab_size, labels)
                if value is not None:
                    if self.policy == "error":
                        raise ids_error(value, self.vocab_size, where, labels, self.fix())
                    self.counts["ids_outside_vocabulary"] += 1
                    return None
        if self.max_length is not None and len(example) > self.max_length:
            if self.policy == "error":
                check_length(len(example), self.max_length, where, self.fix())
            if self.policy == "skip":
                self.counts["too_long"] += 1
                return None
            self.counts["truncated"] += 1
            example = example.truncated(self.max_length)
        if example.real_targets() == 0:  # dropped as data in memory drops them (there with a warning)
            self.counts["no_real_target"] += 1
            return None
        return example
