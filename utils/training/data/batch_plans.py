"""Which examples go into which micro-batch and optimizer step: pure functions of lengths, seed and epoch.

A plan is recomputed, not stored: a resumed run gets the same plan from the same settings. Plans are numpy
arrays over one array of lengths (no per-example Python objects: 2M examples plan in well under a second);
the random draws are torch's (``randperm`` on a generator seeded ``seed + epoch``), as they always were, so
the order of every earlier run is kept bit for bit (tests/test_large_data.py compares with the list code). A
stream's buffer (:func:`buffer_steps`) is planned the same way, with numpy's generator seeded by its number too.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

MEGA_BATCH_FACTOR = 50  # batches per length-sorted mega-batch (as in HF's LengthGroupedSampler)


@dataclass(frozen=True)
class PlanSettings:
    """What decides an epoch's batches (with the epoch number): the batching settings and this process's place."""

    batch_size: int
    shuffle: bool = False
    group_by_length: object = False
    seed: int = 0
    accumulation: int = 1
    world_size: int = 1
    rank: int = 0
    max_tokens_per_batch: int | None = None

    @property
    def micro_batches_per_step(self) -> int:
        return self.accumulation * self.world_size


class Plan(Sequence):
    """This process's micro-batches of one epoch: micro-batch ``k`` is ``[(example index, counts), ...]`` read from
    positions ``bounds[k]:bounds[k+1]`` of two flat arrays, so a plan of millions of examples is three arrays."""

    def __init__(self, indices: np.ndarray, counts: np.ndarray, bounds: np.ndarray):
        self.indices, self.counts, self.bounds = indices, counts, bounds

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        k = k + len(self) if k < 0 else k
        if not 0 <= k < len(self):
            raise IndexError(f"micro-batch {k} of a plan of {len(self)}")
        a, b = self.bounds[k], self.bounds[k + 1]
        return list(zip(self.indices[a:b].tolist(), self.counts[a:b].tolist()))

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    @classmethod
    def from_batches(cls, indices, counts, batch_size: int) -> "Plan":
        bounds = np.append(np.arange(0, len(indices), batch_size), len(indices))
        return cls(np.asarray(indices, dtype=np.int64), np.asarray(counts, dtype=bool), bounds)


def _randperm(n: int, generator) -> np.ndarray:
    return torch.randperm(n, generator=generator).numpy()


def _sorted_in_chunks(order: np.ndarray, lengths: np.ndarray, chunk: int) -> np.ndarray:
    """Each run of ``chunk`` consecutive entries of ``order`` sorted longest first, ties kept in their given order
    (what Python's stable ``sorted(key=-length)`` did per mega-batch)."""
    keys, out = -lengths[order], np.empty_like(order)
    for start in range(0, len(order), chunk):  # per chunk: about 10x faster than one lexsort over all of them
        out[start:start + chunk] = order[start:start + chunk][np.argsort(keys[start:start + chunk], kind="stable")]
    return out


def _length_grouped(order: np.ndarray, lengths: np.ndarray, step_size: int, generator,
                    shuffle_batches: bool) -> np.ndarray:
    """Mega-batches of many optimizer steps, sorted by length inside, so each step holds similar lengths.

    Grouping works on whole optimizer steps (``batch_size * accumulation * processes`` examples), so
    how a step is split into micro-batches and processes does not change which examples it holds.
    """
    grouped = _sorted_in_chunks(order, lengths, step_size * MEGA_BATCH_FACTOR)
    # Only the very last step can be short; it stays last so shards stay aligned to steps.
    n_full = len(grouped) // step_size
    full, tail = grouped[:n_full * step_size].reshape(n_full, step_size), grouped[n_full * step_size:]
    if shuffle_batches:
        full = full[_randperm(n_full, generator)]
    return np.concatenate([full.reshape(-1), tail])


def resolve_grouping(group_by_length, shuffle: bool):
    """``"auto"``: token budgets when shuffling, the given order otherwise; ``True`` means token budgets."""
    if group_by_length == "auto":
        return "tokens" if shuffle else False
    return "tokens" if group_by_length is True else group_by_length


def epoch_order(lengths, step_size, *, shuffle, group_by_length, seed, epoch) -> np.ndarray:
    """Global example order of one epoch: a pure function of the settings, so a resume can replay it."""
    lengths = np.asarray(lengths, dtype=np.int64)
    generator = torch.Generator().manual_seed(seed + epoch)
    order = _randperm(len(lengths), generator) if shuffle else np.arange(len(lengths))
    if group_by_length:
        order = _length_grouped(order, lengths, step_size, generator, shuffle_batches=shuffle)
    return order


def _segments(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Positions ``starts[0]..starts[0]+sizes[0]-1, starts[1].., ...`` as one array."""
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return np.repeat(starts - bounds[:-1], sizes) + np.arange(bounds[-1])


def budget_step_bounds(sorted_lengths: np.ndarray, step_budget: int, chunk: int) -> np.ndarray:
    """Start positions of the steps (and the end) over examples sorted longest first inside chunks of ``chunk``.

    Consecutive examples fill a step while its size (rows x the first, longest, real length) stays within
    ``step_budget``; an example longer than that is a step of its own. Real lengths, not padded ones: the plan
    must not change with pad_to_multiple_of (a GPU checkpoint resumed on a CPU keeps its plan).
    """
    starts, n = [], len(sorted_lengths)
    for chunk_start in range(0, n, chunk):
        position, chunk_end = chunk_start, min(chunk_start + chunk, n)
        while position < chunk_end:
            starts.append(position)
            position = min(position + max(1, step_budget // int(sorted_lengths[position])), chunk_end)
    return np.array(starts + [n], dtype=np.int64)


def token_budget_steps(lengths, *, step_budget: int, micro_batches_per_step: int, examples_per_mega_batch: int,
                       shuffle: bool, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Optimizer steps of one epoch as ``(example indices, step bounds)``: step ``s`` is
    ``indices[bounds[s]:bounds[s+1]]``.

    Inside mega-batches sorted by length, steps hold similar numbers of tokens (:func:`budget_step_bounds`);
    their order is shuffled. Splitting a step into micro-batches happens afterwards (:func:`token_plan`), so how
    a step is divided (accumulation, processes) never changes which examples it holds.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    generator = torch.Generator().manual_seed(seed + epoch)
    order = _randperm(len(lengths), generator) if shuffle else np.arange(len(lengths))
    ordered = _sorted_in_chunks(order, lengths, examples_per_mega_batch)
    bounds = budget_step_bounds(lengths[ordered], step_budget, examples_per_mega_batch)
    if not shuffle:
        return ordered, bounds
    starts, sizes = bounds[:-1], np.diff(bounds)
    permutation = _randperm(len(sizes), generator)
    shuffled = ordered[_segments(starts[permutation], sizes[permutation])]
    return shuffled, np.concatenate([[0], np.cumsum(sizes[permutation])])


def token_plan(indices: np.ndarray, bounds: np.ndarray, accumulation: int, world_size: int, rank: int) -> Plan:
    """This rank's micro-batches of token-budget steps: each step is split into ``accumulation * world_size``
    micro-batches of ``ceil(size / that)`` rows, and rank ``r`` runs micro-batches ``r*a .. r*a+a-1``. An empty one
    becomes a repeat that does not count (labels all -100), so every process runs the same number of forwards."""
    per_step = accumulation * world_size
    starts, ends = bounds[:-1], bounds[1:]
    rows = -(-(ends - starts) // per_step)
    k = rank * accumulation + np.arange(accumulation)
    lo = np.minimum(starts[:, None] + k[None, :] * rows[:, None], ends[:, None]).reshape(-1)
    hi = np.minimum(lo + np.repeat(rows, accumulation), np.repeat(ends, accumulation))
    empty = hi == lo
    sizes = np.where(empty, 1, hi - lo)
    positions = _segments(lo, sizes)
    repeated = np.repeat(empty, sizes)
    chosen = np.where(repeated, indices[0] if len(indices) else 0, indices[np.minimum(positions, len(indices) - 1)])
    return Plan(chosen, ~repeated, np.concatenate([[0], np.cumsum(sizes)]))


def buffer_steps(lengths: np.ndarray, spec: PlanSettings, epoch: int, buffer: int, step_budget: int) -> list:
    """The optimizer steps of one buffer of a stream, as arrays of positions in the buffer: a pure function of the
    lengths, the settings, the epoch and the buffer's number (its generator is seeded ``(seed, epoch, buffer)``).
    Token grouping sorts the shuffled buffer by length and cuts it by :func:`budget_step_bounds`; otherwise steps
    are ``batch_size * accumulation`` consecutive rows. With ``shuffle`` the steps' order is shuffled too."""
    if not len(lengths):
        return []
    rng = np.random.default_rng([spec.seed, epoch, buffer])
    order = rng.permutation(len(lengths)) if spec.shuffle else np.arange(len(lengths))
    if resolve_grouping(spec.group_by_length, spec.shuffle) == "tokens":
        order = order[np.argsort(-lengths[order], kind="stable")]
        bounds = budget_step_bounds(lengths[order], step_budget, len(order))
    else:
        bounds = np.append(np.arange(0, len(order), spec.batch_size * spec.accumulation), len(order))
    steps = [order[a:b] for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
    return [steps[i] for i in rng.permutation(len(steps))] if spec.shuffle else steps
