"""Batch sources: where training and validation batches come from.

``ExampleBatches`` holds examples and plans its own batches; ``LoaderBatches`` reads a user's DataLoader
as given. Both collate to the same batch form, check ids and lengths as batches are built, and can
fingerprint themselves so a resume sees the same data.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch.utils.data import DataLoader

import numpy as np

from .batch_plans import (MEGA_BATCH_FACTOR, Plan, PlanSettings, epoch_order, resolve_grouping, shard_batches,
                          token_budget_steps, token_plan)
from .example_tables import ExampleList, example_table
from .examples import PaddingCollator, check_batch_ids, check_length, pad_id_among_real_tokens, split_positions
from .loss import IGNORE_INDEX, real_token_mask
from .streaming import DEFAULT_BUFFER_SIZE, StreamBatches, is_stream, stream_positions  # noqa: F401 (for the trainer)


def _digest_tensors(digest, tensors) -> None:
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().long().numpy().tobytes())
        else:
            digest.update(b"-")


def _batch_hash(batch) -> str:
    digest = hashlib.sha256()
    if isinstance(batch, Mapping):
        _digest_tensors(digest, (torch.as_tensor(batch[key]) for key in ("input_ids", "attention_mask", "labels")
                                 if batch.get(key) is not None))
    return digest.hexdigest()[:16]


def _chain_first(first, iterator):
    if first is None:
        return
    yield first
    yield from iterator


class ExampleBatches:
    """Examples planned (shuffled, grouped, sharded) over one array of lengths, read and collated per batch.

    ``examples`` is a table (:mod:`example_tables`): a list of token lists or an Arrow ``Dataset`` is read per
    batch; a list of ``Example`` is taken as it is.
    """

    plannable = True

    def __init__(self, examples, collator: PaddingCollator, what: str = "training data"):
        self.examples = ExampleList(examples) if isinstance(examples, list) else examples
        self.collator = collator
        self.what = what
        self.lengths = self.examples.lengths  # numpy int64, one entry per example
        # What the start-up checks passed, so a search's trials do not rescan the same examples.
        self._checked = {"vocab_size": None, "max_length": None}
        self._last_plan = (None, None)

    def plan(self, spec: PlanSettings, epoch: int) -> Plan:
        """This rank's micro-batches of one epoch, in order; consecutive ``accumulation`` of them form a step."""
        if self._last_plan[0] != (spec, epoch):  # counted before the run, then run: made once
            self._last_plan = ((spec, epoch), self._make_plan(spec, epoch))
        return self._last_plan[1]

    def _make_plan(self, spec: PlanSettings, epoch: int) -> Plan:
        grouping = resolve_grouping(spec.group_by_length, spec.shuffle)
        if grouping == "tokens":
            per_step = spec.micro_batches_per_step
            indices, bounds = token_budget_steps(
                self.lengths, step_budget=self.step_token_budget(spec), micro_batches_per_step=per_step,
                examples_per_mega_batch=spec.batch_size * per_step * MEGA_BATCH_FACTOR, shuffle=spec.shuffle,
                seed=spec.seed, epoch=epoch)
            return token_plan(indices, bounds, spec.accumulation, spec.world_size, spec.rank)
        order = epoch_order(self.lengths, spec.batch_size * spec.micro_batches_per_step, shuffle=spec.shuffle,
                            group_by_length=bool(grouping), seed=spec.seed, epoch=epoch)
        return shard_batches(order, spec.batch_size, spec.world_size, spec.rank)

    def step_token_budget(self, spec: PlanSettings) -> int:
        """Tokens of one optimizer step: ``max_tokens_per_batch`` per micro-batch, else ``batch_size`` x the
        mean example length, so the mean micro-batch holds about ``batch_size`` lines and learning rates tuned
        for ``batch_size`` carry over. Computed per step, so 8 x 1 and 2 x 4 get the same budget exactly."""
        per_step = spec.micro_batches_per_step
        if spec.max_tokens_per_batch is not None:
            return spec.max_tokens_per_batch * per_step
        # Python ints: the same rounding as the list code had, for any corpus size.
        return max(1, round(spec.batch_size * per_step * int(self.lengths.sum()) / len(self.lengths)))

    def eval_plan(self, batch_size, world_size=1, rank=0) -> Plan:
        """Validation order does not change token-weighted sums, so sort by length: least padding."""
        return shard_batches(np.argsort(-self.lengths, kind="stable"), batch_size, world_size, rank)

    def collate(self, planned_batch):
        examples = self.examples.examples([i for i, _ in planned_batch])
        return self.collator([(example, counts) for example, (_, counts) in zip(examples, planned_batch)])

    def first_batch(self) -> dict:
        return self.collate(self.plan(PlanSettings(batch_size=2), epoch=0)[0])

    def padded_batch(self) -> dict:
        """The longest and the shortest example together: a batch that surely holds padding."""
        by_length = np.argsort(self.lengths, kind="stable")
        return self.collate([(int(by_length[-1]), True), (int(by_length[0]), True)])

    def check_ids(self, vocab_size: int) -> None:
        """Every token id fits the vocabulary, naming the first example that does not."""
        if self._checked["vocab_size"] != vocab_size:
            self.examples.check_ids(vocab_size, self.what)
            self._checked["vocab_size"] = vocab_size

    def check_lengths(self, limit: int | None) -> None:
        if limit is not None and self._checked["max_length"] != limit:
            too_long = np.flatnonzero(self.lengths > limit)
            if len(too_long):
                check_length(int(self.lengths[too_long[0]]), limit, f"Example {int(too_long[0])} of the {self.what}")
            self._checked["max_length"] = limit

    def pad_id_inside_real_tokens(self, pad_token_id: int) -> bool:
        """Whether the pad id occurs where a token is real (then it is a real token of the vocabulary)."""
        return self.examples.pad_inside(pad_token_id)

    def fingerprint(self) -> str:
        """Identifies the data, so a resume sees the same: every token for data in memory, the Dataset's own
        fingerprint and the lengths for an Arrow ``Dataset``."""
        return self.examples.fingerprint()

    def split(self, val_fraction: float, seed: int) -> tuple["ExampleBatches", "ExampleBatches"]:
        """Seeded random hold-out; both parts keep the original order (``shuffle=False`` stays meaningful)."""
        train, val = split_positions(len(self), val_fraction, seed)
        return (ExampleBatches(self.examples.subset(train), self.collator, "training data"),
                ExampleBatches(self.examples.subset(val), self.collator, "validation data"))

    def __len__(self) -> int:
        return len(self.examples)


class LoaderBatches:
    """A user's DataLoader of dict batches, used as given (its own order and padding), read lazily.

    Nothing is materialised: ``len(loader)`` gives the step count and each epoch is one pass.
    Batches get the package's real-token rule as an attention mask when they carry none, and
    left-padded rows are moved to the right (exact for a causal model, and the only form in which a
    model without ``attention_mask``/``position_ids`` arguments sees the positions of the unpadded text).
    """

    plannable = False

    def __init__(self, loader: DataLoader, pad_token_id: int, pad_is_eos: bool = False, what: str = "training data"):
        try:
            len(loader)
        except TypeError:
            raise TypeError(
                f"The DataLoader given as {what} has no length (it reads an IterableDataset), so the number of steps "
                "and the learning-rate schedule cannot be known. Pass a map-style Dataset, a list of tokenized "
                "sequences, or a DataLoader over one.") from None
        self.loader = loader
        self.pad_token_id = pad_token_id
        self.pad_is_eos = pad_is_eos
        self.what = what
        self.vocab_size = None  # set once known: every batch's ids are then checked as it is collated
        self.max_length = None  # likewise the model's positions

    def plan(self, spec=None, epoch=None):
        return self.loader

    def iterate(self, order_state: dict | None = None, batch_hashes: list | None = None):
        """``(order_state, batches)``: one pass over the loader, its order drawn from ``order_state``.

        A shuffling DataLoader draws its permutation (and worker seeds) from torch's RNG when the pass starts.
        ``order_state=None`` records the state it draws from now (an epoch's start); a resumed epoch passes
        the recorded one, so it replays the same order, and torch's RNG is then set back to where the
        checkpoint left it. Each batch's hash is appended to ``batch_hashes``; hashes already there (from
        the interrupted run) must match the batches replayed, or the loader is not the one trained on.
        """
        resumed_state = order_state is not None
        if not resumed_state:
            order_state = self._order_state()
        current = torch.get_rng_state()
        self._set_order_state(order_state)
        iterator = iter(self.loader)
        first = next(iterator, None)  # a sampler draws its permutation when the first batch is asked for
        if resumed_state:
            torch.set_rng_state(current)
        return order_state, self._checked_pass(first, iterator, [] if batch_hashes is None else batch_hashes)

    def _checked_pass(self, first, iterator, batch_hashes: list):
        recorded, index = len(batch_hashes), 0
        for batch in _chain_first(first, iterator):
            digest = _batch_hash(batch)
            if index < recorded and batch_hashes[index] != digest:
                raise ValueError(
                    f"Cannot resume: batch {index + 1} of this epoch from the DataLoader given as {self.what} differs "
                    "from the one trained on before the interruption. Pass the same DataLoader (same data, batch size, "
                    "sampler and generator), or start fresh with resume_from_checkpoint=False.")
            if index >= recorded:
                batch_hashes.append(digest)
            index += 1
            yield batch

    def _order_state(self) -> dict:
        return {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in self._generators()]}

    def _set_order_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        for generator, saved in zip(self._generators(), state["generators"]):
            generator.set_state(saved)

    def _generators(self) -> list:
        """The generators a user gave the loader or its sampler (their states advance with each epoch's draw)."""
        found = []
        for generator in (getattr(self.loader, "generator", None), getattr(self.loader.sampler, "generator", None)):
            if isinstance(generator, torch.Generator) and not any(generator is g for g in found):
                found.append(generator)
        return found

    def eval_plan(self, batch_size=None, world_size=1, rank=0):
        return self.loader

    def first_batch(self) -> dict:
        """The loader's first batch, drawn without moving any random state: a shuffling loader's first batch (and so
        the fingerprint) must not depend on when it is taken, and training must draw its order as if it had not been."""
        generators = self._generators()
        saved = [generator.get_state() for generator in generators]
        try:
            with torch.random.fork_rng(devices=[]):
                for generator in [torch.default_generator] + generators:
                    generator.manual_seed(0)
                batch = next(iter(self.loader))
        except StopIteration:
            raise ValueError(f"The DataLoader given as {self.what} yields no batch. Pass a non-empty DataLoader.") from None
        finally:
            for generator, state in zip(generators, saved):
                generator.set_state(state)
        return self.collate(batch)

    def check_ids(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size  # not read ahead: each batch is checked as it is collated

    def pad_id_inside_real_tokens(self, pad_token_id: int) -> bool:
        batch = self.first_batch()
        return pad_id_among_real_tokens(batch["input_ids"], batch["attention_mask"], pad_token_id)

    def check_lengths(self, limit: int | None) -> None:
        self.max_length = limit

    def fingerprint(self) -> str:
        """A training DataLoader is not read ahead: its length and first batch stand for it (a resume then
        compares every batch it replays). A validation loader is read whole, checking every batch now: it
        is read every epoch anyway, and a bad batch found after an epoch of training wastes that epoch."""
        digest = hashlib.sha256(f"loader of {len(self)} batches".encode())
        batches = [self.first_batch()] if self.what == "training data" else (self.collate(b) for b in self.loader)
        for batch in batches:
            _digest_tensors(digest, (batch.get(key) for key in ("input_ids", "attention_mask", "labels")))
        return digest.hexdigest()

    def collate(self, batch) -> dict:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(f"The DataLoader given as {self.what} yields {type(batch).__name__} batches; it must yield "
                            "dicts with 'input_ids' (and optional 'attention_mask', 'labels'). Pass a list of sequences "
                            "instead to let the package pad them.")
        batch = dict(batch)
        input_ids = batch["input_ids"]
        for key in ("attention_mask", "labels"):
            if batch.get(key) is not None and tuple(batch[key].shape) != tuple(input_ids.shape):
                raise ValueError(f"A batch of the {self.what} has {key} of shape {tuple(batch[key].shape)} but input_ids "
                                 f"of shape {tuple(input_ids.shape)}. Give {key} one entry per input token.")
        if self.vocab_size is not None:
            check_batch_ids(batch, self.vocab_size, f"A batch of the {self.what}")
        check_length(input_ids.shape[1], self.max_length, f"A batch of the {self.what}")
        batch["attention_mask"] = real_token_mask(input_ids, batch.get("attention_mask"), self.pad_token_id, self.pad_is_eos).long()
        batch = self._left_padding_moved_right(batch)
        mask = batch["attention_mask"]
        batch["right_padded"] = bool((mask[:, 1:] <= mask[:, :-1]).all())  # on the CPU, before the device copy
        return batch

    def _left_padding_moved_right(self, batch: dict) -> dict:
        mask = batch["attention_mask"]
        leading = (mask.cumsum(-1) == 0).sum(-1, keepdim=True)  # padding before each row's first real token
        if not bool(leading.any()):
            return batch
        source = torch.arange(mask.shape[1]) + leading
        inside = source < mask.shape[1]
        source = source.clamp(max=mask.shape[1] - 1)
        fills = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX, "position_ids": 0}
        for key, fill in fills.items():
            if batch.get(key) is not None:
                batch[key] = torch.where(inside, batch[key].gather(1, source), fill)
        return batch

    def __len__(self) -> int:
        return len(self.loader)

    padded_batch = first_batch


def batch_source(data, pad_token_id: int, pad_to_multiple_of: int | None = None, what: str = "training data",
                 pad_is_eos: bool = False, buffer_size: int = DEFAULT_BUFFER_SIZE):
    if isinstance(data, (ExampleBatches, LoaderBatches, StreamBatches)):
        return data  # prepared once (the hyperparameter search reuses it for every trial)
    if is_stream(data):
        return StreamBatches(data, PaddingCollator(pad_token_id, pad_to_multiple_of), pad_is_eos, what, buffer_size)
    if isinstance(data, DataLoader):
        return LoaderBatches(data, pad_token_id, pad_is_eos, what)
    return ExampleBatches(example_table(data, pad_token_id, what, pad_is_eos), PaddingCollator(pad_token_id, pad_to_multiple_of),
                          what)


def train_and_val_sources(train_data, val_data, pad_token_id: int, pad_to_multiple_of: int | None, pad_is_eos: bool,
                          val_fraction: float, seed: int, buffer_size: int = DEFAULT_BUFFER_SIZE):
    """Batch sources for training and validation; ``val_data=None`` holds out a seeded ``val_fraction``."""
    train = batch_source(train_data, pad_token_id, pad_to_multiple_of, "training data", pad_is_eos, buffer_size)
    if val_data is not None:
        return train, batch_source(val_data, pad_token_id, pad_to_multiple_of, "validation data", pad_is_eos, buffer_size)
    if not isinstance(train, ExampleBatches):
        raise ValueError("val_data=None needs train_data as a list of examples or a Dataset to hold out from (a stream or "
                         "a DataLoader cannot be split); pass val_data.")
    return train.split(val_fraction, seed)


def steps_per_epoch(source, spec: PlanSettings, n_epochs: int, max_steps: int | None) -> list:
    """Steps of each epoch, known up front so the schedule, progress bar and resume know them. Token-budget steps
    vary in number from epoch to epoch: each epoch's plan (a pure function) is counted. ``max_steps`` ends the
    run inside the epoch that reaches it; a stream's epochs end when it does (``[None]``: only ``max_steps`` is known)."""
    if getattr(source, "streamed", False):
        if max_steps is None:
            raise TypeError(f"The {source.what} has no length (a stream: a datasets.IterableDataset, a torch IterableDataset "
                            "or a loader over one), so the run's length and the learning-rate schedule need max_steps: pass "
                            "max_steps=N optimizer steps.")
        return [None]
    count = lambda epoch: -(-len(source.plan(spec, epoch)) // spec.accumulation)  # noqa: E731
    if max_steps is None:
        return [count(epoch) for epoch in reversed(range(n_epochs))][::-1]  # epoch 0 last: its plan stays cached
    counts = []
    while sum(counts) < max_steps:
        counts.append(min(count(len(counts)), max_steps - sum(counts)))
    return counts


def run_length(source, spec: PlanSettings, settings) -> tuple[list, int, int, bool]:
    """Steps of each epoch, the epochs the run may take (a stream: until ``max_steps``), its optimizer steps, and
    whether the source is streamed."""
    counts = steps_per_epoch(source, spec, settings.n_epochs, settings.max_steps)
    streamed = counts == [None]
    return counts, 2**62 if streamed else len(counts), settings.max_steps or sum(counts), streamed
