"""Which source serves what the user passed, and how long a run over it is.

Every source implements :class:`source_contract.BatchSource`: examples in memory or on disk
(:class:`tables.ExampleBatches`), a user's map-style DataLoader (:class:`loaders.LoaderBatches`), a stream
(:class:`streaming.StreamBatches`). Nothing after this module asks which kind it holds.

The path of ``train_data`` (and ``val_data``) to its first batch, for every form: :func:`train_and_val_sources` ->
:func:`batch_source` picks the source -> each row is read by :func:`rows.read_example` (tables: per batch, or up
front for lists of dicts; streams: as read; a DataLoader: its batches are used as they are) -> which rows a part
holds (the hold-out, each process's shard, rows gone past) is :mod:`subsets`' -> plans (:mod:`batch_plans`) ->
:mod:`collate`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from .batch_plans import PlanSettings
from .collate import PaddingCollator
from .data_settings import DataSettings
from .loaders import LoaderBatches
from .source_contract import BatchSource
from .streaming import DEFAULT_BUFFER_SIZE, StreamBatches, is_stream
from .tables import ExampleBatches, example_table


def batch_source(data, pad_token_id: int, pad_to_multiple_of: int | None = None, what: str = "training data",
                 pad_is_eos: bool = False, buffer_size: int = DEFAULT_BUFFER_SIZE,
                 bad_examples: str = "error") -> BatchSource:
    if isinstance(data, BatchSource):
        return data  # prepared once (the hyperparameter search reuses it for every trial)
    if is_stream(data):
        return StreamBatches(data, PaddingCollator(pad_token_id, pad_to_multiple_of), pad_is_eos, what, buffer_size,
                             bad_examples)
    if isinstance(data, DataLoader):
        return LoaderBatches(data, pad_token_id, pad_is_eos, what)
    return ExampleBatches(example_table(data, pad_token_id, what, pad_is_eos),
                          PaddingCollator(pad_token_id, pad_to_multiple_of), what)


def synthetic_sequences(vocab_size: int, pad_token_id: int, n: int = 256, min_len: int = 8, max_len: int = 64,
                        seed: int = 0):
    """Learnable variable-length sequences (arithmetic progressions mod vocab) that never use the pad id: the
    training data of a run given none."""
    g = torch.Generator().manual_seed(seed)
    usable = vocab_size - 1
    sequences = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        start, step = (int(v) for v in torch.randint(0, usable, (2,), generator=g))
        values = (start + step % 7 * torch.arange(length) + torch.arange(length)) % usable
        sequences.append(values + (values >= pad_token_id).long())  # skip the pad id
    return sequences


@dataclass(frozen=True)
class SourceOptions:
    """What the data seam takes from a run's settings, the device and the pad id to build its sources."""

    pad_token_id: int
    pad_to_multiple_of: int | None
    pad_is_eos: bool
    val_fraction: float
    seed: int
    buffer_size: int = DEFAULT_BUFFER_SIZE
    bad_examples: str = "error"


def source_options(data: DataSettings, seed: int, device, pad_token_id: int, pad_is_eos: bool) -> SourceOptions:
    """A run's data settings and seed on ``device``, in the one form the sources take."""
    return SourceOptions(pad_token_id, data.padding_multiple(device), pad_is_eos, data.val_fraction, seed,
                         data.stream_buffer_size, data.bad_examples)


def train_and_val_sources(train_data, val_data, options: SourceOptions):
    """Batch sources for training and validation; ``val_data=None`` holds out a seeded ``val_fraction``."""
    def source(data, what):
        return batch_source(data, options.pad_token_id, options.pad_to_multiple_of, what, options.pad_is_eos,
                            options.buffer_size, options.bad_examples)

    train = source(train_data, "training data")
    if val_data is not None:
        return train, source(val_data, "validation data")
    return train.split(options.val_fraction, options.seed)


def steps_per_epoch(source: BatchSource, spec: PlanSettings, n_epochs: int, max_steps: int | None) -> list:
    """Steps of each epoch, known up front so the schedule, progress bar and resume know them. Token-budget steps
    vary in number from epoch to epoch: each epoch's plan (a pure function) is counted. ``max_steps`` ends the
    run inside the epoch that reaches it; a stream's epochs end when it does (``[None]``: only ``max_steps`` is
    known)."""
    if source.steps_in_epoch(spec, 0) is None:
        if max_steps is None:
            raise TypeError(f"The {source.what} has no length (a stream: a datasets.IterableDataset, a torch "
                            "IterableDataset or a loader over one), so the run's length and the learning-rate schedule "
                            "need max_steps: pass max_steps=N optimizer steps.")
        return [None]
    if max_steps is None:  # epoch 0 last: its plan stays cached
        return [source.steps_in_epoch(spec, epoch) for epoch in reversed(range(n_epochs))][::-1]
    counts = []
    while sum(counts) < max_steps:
        counts.append(min(source.steps_in_epoch(spec, len(counts)), max_steps - sum(counts)))
    return counts


@dataclass(frozen=True)
class RunLength:
    """How long a run is and where it ends (its last epoch, or ``max_steps``)."""

    steps_per_epoch: list  # [None]: a stream's, unknown (its epochs end with the data)
    n_epochs: int  # the epochs the run may take (a stream: until max_steps)
    total_steps: int  # optimizer steps: the schedule's span
    max_steps: int | None

    def steps_in(self, epoch: int) -> int | None:
        return self.steps_per_epoch[epoch] if epoch < len(self.steps_per_epoch) else None

    def steps_done(self, global_step: int) -> bool:
        return global_step >= (self.max_steps or math.inf)

    def ends_after(self, epoch: int, global_step: int) -> bool:
        return epoch + 1 >= self.n_epochs or self.steps_done(global_step)

    def cut_short(self, state, planned_steps) -> bool:
        """Whether ``max_steps`` ended the run before the end of the epoch ``state`` is in; ``planned_steps()``
        gives that epoch's steps (None: a stream's, whose end is unknown), asked only when max_steps was reached."""
        if self.max_steps is None or not self.steps_done(state.global_step):
            return False
        planned = planned_steps()
        return planned is None or state.step_in_epoch < planned

    def nothing_left(self, epoch: int, global_step: int) -> bool:
        """Whether a resumed run (at ``epoch``, ``global_step``) has already trained all it is asked for."""
        return epoch >= self.n_epochs or self.steps_done(global_step)


def run_length(source: BatchSource, spec: PlanSettings, n_epochs: int, max_steps: int | None) -> RunLength:
    counts = steps_per_epoch(source, spec, n_epochs, max_steps)
    return RunLength(counts, 2**62 if counts == [None] else len(counts), max_steps or sum(counts), max_steps)
