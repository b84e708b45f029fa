"""A user's map-style DataLoader as a source: its batches used as given (its order, its padding), read lazily.

Batches get the package's real-token rule as an attention mask and left-padded rows are moved to the right
(:func:`rows.batch_with_pad_rule`). A resumed epoch draws its
order from the random state recorded at the epoch's start, replays the batches already trained (each row is
compared with the digest recorded for it) and goes on; a resume at an epoch's end replays that epoch's pass the
same way before the next one. The loader's own generators (``generator=``, the sampler's) are restored from the
checkpoint, so an epoch that starts after a resume draws the order it would have.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from itertools import chain

import torch
from torch.utils.data import DataLoader

from .batch_plans import PlanSettings
from .collate import PaddingCollator, padded_probe
from .rows import (ROW_KEYS, batch_rows, batch_with_pad_rule, check_batch_ids, check_batch_shapes, check_length,
                   check_loader_batch, pad_id_among_real_tokens, read_example)
from .source_contract import BatchSource, ReadLog, group_into_steps


class LoaderBatches(BatchSource):
    """A user's DataLoader of dict batches (see the module docstring). ``len(loader)`` gives the step count."""

    shards_itself = False  # under torchrun the package cannot know which batches another process reads

    def __init__(self, loader: DataLoader, pad_token_id: int, pad_is_eos: bool = False, what: str = "training data"):
        try:
            len(loader)
        except TypeError:
            raise TypeError(
                f"The DataLoader given as {what} has no length (it reads an IterableDataset), so the number of steps "
                "and the learning-rate schedule cannot be known. Pass a map-style Dataset, a list of tokenized "
                "sequences, or a DataLoader over one.") from None
        self.loader, self.pad_token_id, self.pad_is_eos, self.what = loader, pad_token_id, pad_is_eos, what
        self.vocab_size = None  # set once known: every batch's ids are then checked as it is collated
        self.max_length = None  # likewise the model's positions
        self.log = ReadLog(what, unit="row")  # the rows of the current epoch's batches, as read
        self.epoch, self.order_state, self.resume_at = None, None, None

    # -- the run -------------------------------------------------------------------------------------
    def steps_in_epoch(self, spec: PlanSettings, epoch: int) -> int:
        return -(-len(self.loader) // spec.accumulation)

    def steps(self, spec: PlanSettings, epoch: int, start: int):
        """One pass over the loader; a resumed epoch (``start`` > 0) replays the order recorded at its start."""
        recorded, self.resume_at = self.resume_at, None
        resumed = recorded if recorded and recorded["epoch"] == epoch else None
        if start and resumed is None:
            raise ValueError(f"Cannot resume the DataLoader given as {self.what} {start} steps into epoch {epoch + 1}: "
                             "the checkpoint holds no record of its order there. Start fresh with "
                             "resume_from_checkpoint=False.")
        self.epoch = epoch
        self.log.start(epoch, recorded and recorded["read"], to_end=True,  # an epoch reads the whole loader
                       replay=lambda finished: self._replayed(recorded["order"], finished))
        self.order_state = resumed["order"] if resumed else self._order_state()
        batches = self._pass(self.order_state, restore_rng=resumed is not None)
        where = lambda k: f"batch {k + 1} of epoch {epoch + 1}, in its optimizer step {k // spec.accumulation + 1}"  # noqa: E731
        return group_into_steps(self._logged(batches, epoch), spec.accumulation, start,
                                lambda item: self.collate(item[1], where(item[0])))

    def _pass(self, order_state: dict, restore_rng: bool):
        """The loader's batches, the order drawn from ``order_state`` now (a sampler draws its permutation, and
        workers their seeds, when the first batch is asked for); a replay sets torch's RNG back afterwards."""
        current = torch.get_rng_state()
        self._set_order_state(order_state)
        iterator = iter(self.loader)
        first = next(iterator, None)
        if restore_rng:
            torch.set_rng_state(current)
        return iter(()) if first is None else chain([first], iterator)

    def _replayed(self, order_state: dict, epoch: int):
        """A finished epoch's pass read again from the order state recorded at its start. The sampler draws again
        when it ends (torch's ``RandomSampler``), so torch's RNG and the generators are set back only after it."""
        current = self._order_state()
        try:
            yield from self._logged(self._pass(order_state, restore_rng=False), epoch)
        finally:
            self._set_order_state(current)

    def _logged(self, batches, epoch: int):
        where = f"epoch {epoch + 1}"
        for k, batch in enumerate(batches):
            check_loader_batch(batch, self.what)
            for row, values in enumerate(batch_rows(batch)):
                self.log.note(values, where, f" (in batch {k + 1} of this epoch as its row {row})")
            yield k, batch
        self.log.replay_ended(where)

    def eval_plan(self, batch_size=None, world_size=1, rank=0):
        return self.loader

    # -- random state --------------------------------------------------------------------------------
    def _generators(self) -> list:
        """The generators a user gave the loader or its sampler (their states advance with each epoch's draw)."""
        batch_sampler = getattr(self.loader, "batch_sampler", None)
        candidates = (getattr(self.loader, "generator", None), getattr(self.loader.sampler, "generator", None),
                      getattr(getattr(batch_sampler, "sampler", None), "generator", None))
        found = []
        for generator in candidates:
            if isinstance(generator, torch.Generator) and not any(generator is g for g in found):
                found.append(generator)
        return found

    def _order_state(self) -> dict:
        return {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in self._generators()]}

    def _set_order_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        for generator, saved in zip(self._generators(), state["generators"]):
            generator.set_state(saved)

    @contextmanager
    def _random_state_kept(self):
        """Read batches without moving any random state: what is read at start-up must not depend on when, and
        training must draw its order as if nothing had been read."""
        generators = self._generators()
        saved = [generator.get_state() for generator in generators]
        try:
            with torch.random.fork_rng(devices=[]):
                for generator in [torch.default_generator] + generators:
                    generator.manual_seed(0)
                yield
        finally:
            for generator, state in zip(generators, saved):
                generator.set_state(state)

    # -- checkpoint ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The epoch's order state and what it has read, and the generators' states now."""
        return {"epoch": self.epoch, "order": self.order_state, "read": self.log.state_dict(),
                "generators": [g.get_state() for g in self._generators()]}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        for generator, saved in zip(self._generators(), state["generators"]):
            generator.set_state(saved)  # where the next epoch draws its order from
        self.resume_at = state

    # -- start-up ------------------------------------------------------------------------------------
    def first_batch(self) -> dict:
        """The loader's first batch, drawn without moving any random state."""
        with self._random_state_kept():
            batch = next(iter(self.loader), None)
        if batch is None:
            raise ValueError(f"The DataLoader given as {self.what} yields no batch. Pass a non-empty DataLoader.")
        return self.collate(batch)

    def padded_batch(self) -> dict:
        """The first batch if it holds padding; else its rows, cut to their real span, as a padded probe."""
        batch = self.first_batch()
        if not bool(batch["attention_mask"].all()):
            return batch
        rows = [read_example(row, r, self.pad_token_id, self.pad_is_eos) for r, row in enumerate(batch_rows(batch))]
        return padded_probe(rows, PaddingCollator(self.pad_token_id))

    def check_ids(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size  # not read ahead: each batch is checked as it is collated

    def check_lengths(self, limit: int | None) -> None:
        self.max_length = limit

    def pad_id_inside_real_tokens(self, pad_token_id: int) -> bool:
        batch = self.first_batch()
        return pad_id_among_real_tokens(batch["input_ids"], batch["attention_mask"], pad_token_id)

    def fingerprint(self) -> str:
        """A training DataLoader is not read ahead: its length and first batch stand for it (a resume then
        compares every row it replays). A validation loader is read whole, checking every batch now: it
        is read every epoch anyway, and a bad batch found after an epoch of training wastes that epoch."""
        digest = hashlib.sha256(f"loader of {len(self)} batches".encode())
        if self.what == "training data":
            batches = [self.first_batch()]
        else:
            with self._random_state_kept():
                batches = [self.collate(b) for b in self.loader]
        for batch in batches:
            for key in ROW_KEYS:
                tensor = batch.get(key)
                digest.update(b"-" if tensor is None else
                              str(tuple(tensor.shape)).encode() + tensor.detach().cpu().long().numpy().tobytes())
        return digest.hexdigest()

    # -- batches -------------------------------------------------------------------------------------
    def collate(self, batch, where: str | None = None) -> dict:
        check_loader_batch(batch, self.what)
        batch = dict(batch)
        input_ids = batch["input_ids"]
        check_batch_shapes(batch, self.what)
        place = f"A batch of the {self.what}" + (f" ({where})" if where else "")
        if self.vocab_size is not None:
            check_batch_ids(batch, self.vocab_size, place)
        check_length(input_ids.shape[1], self.max_length, place)
        return batch_with_pad_rule(batch, self.pad_token_id, self.pad_is_eos)

    def __len__(self) -> int:
        return len(self.loader)
