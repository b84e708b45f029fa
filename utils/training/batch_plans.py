"""Which examples go into which micro-batch and optimizer step: pure functions of lengths, seed and epoch.

A plan is recomputed, not stored: a resumed run gets the same plan from the same settings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DistributedSampler

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


def _length_grouped(order: list[int], lengths: list[int], step_size: int, generator, shuffle_batches: bool) -> list[int]:
    """Mega-batches of many optimizer steps, sorted by length inside, so each step holds similar lengths.

    Grouping works on whole optimizer steps (``batch_size * accumulation * processes`` examples), so
    how a step is split into micro-batches and processes does not change which examples it holds.
    """
    mega = step_size * MEGA_BATCH_FACTOR
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i:i + step_size] for i in range(0, len(chunk), step_size)]
    # Only the very last step can be short; it stays last so shards stay aligned to steps.
    full, tail = (batches[:-1], batches[-1:]) if len(batches[-1]) < step_size else (batches, [])
    if shuffle_batches:
        full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    return [i for batch in full + tail for i in batch]


def resolve_grouping(group_by_length, shuffle: bool):
    """``"auto"``: token budgets when shuffling, the given order otherwise; ``True`` means token budgets."""
    if group_by_length == "auto":
        return "tokens" if shuffle else False
    return "tokens" if group_by_length is True else group_by_length


def epoch_order(lengths, step_size, *, shuffle, group_by_length, seed, epoch) -> list[int]:
    """Global example order of one epoch: a pure function of the settings, so a resume can replay it."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist() if shuffle else list(range(len(lengths)))
    if group_by_length:
        order = _length_grouped(order, lengths, step_size, generator, shuffle_batches=shuffle)
    return order


def token_budget_steps(lengths, *, step_budget: int, micro_batches_per_step: int, examples_per_mega_batch: int,
                       shuffle: bool, seed: int, epoch: int) -> list[list[list[int]]]:
    """Optimizer steps of one epoch, each ``micro_batches_per_step`` lists of example indices.

    Inside mega-batches sorted by length, consecutive examples fill a step while its size (rows x
    longest real length) stays within ``step_budget``; an example longer than
    that is a step of its own. The step's examples are then split into its micro-batches,
    so how a step is divided (accumulation, processes) never changes which examples it holds. Steps
    carry similar numbers of tokens; their order is shuffled. Micro-batches a short step cannot fill
    are empty: the caller gives them a non-counting repeat so every process runs the same count.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist() if shuffle else list(range(len(lengths)))
    steps = []
    for start in range(0, len(order), examples_per_mega_batch):
        current = []
        for index in sorted(order[start:start + examples_per_mega_batch], key=lambda i: -lengths[i]):
            # Sorted longest first: the step's first example sets its width. Real lengths, not padded ones: the
            # plan must not change with pad_to_multiple_of (a GPU checkpoint resumed on a CPU keeps its plan).
            if current and lengths[current[0]] * (len(current) + 1) > step_budget:
                steps.append(current)
                current = []
            current.append(index)
        steps.append(current)
    if shuffle:
        steps = [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]
    rows = lambda step: math.ceil(len(step) / micro_batches_per_step)  # noqa: E731
    return [[step[k * rows(step):(k + 1) * rows(step)] for k in range(micro_batches_per_step)] for step in steps]


def shard_batches(order: list[int], batch_size: int, world_size: int = 1, rank: int = 0):
    """This rank's batches of ``(example index, counts)``, sharded exactly as DistributedSampler does.

    Rank ``r`` takes global positions ``r, r+W, ...``; the sampler repeats the first positions to
    even out shards, and those repeats are marked ``counts=False`` so no example counts twice.
    """
    positions = list(DistributedSampler(order, num_replicas=world_size, rank=rank, shuffle=False))
    slots = [(order[p], rank + k * world_size < len(order)) for k, p in enumerate(positions)]
    return [slots[i:i + batch_size] for i in range(0, len(slots), batch_size)]
