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

from .batch_plans import MEGA_BATCH_FACTOR, PlanSettings, epoch_order, resolve_grouping, shard_batches, token_budget_steps
from .examples import (Example, PaddingCollator, check_batch_ids, check_length, split_train_val,
                       to_examples)
from .loss import IGNORE_INDEX, real_token_mask


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
    """Examples held in memory: planned (shuffled, grouped, sharded) batches, collated on the fly."""

    plannable = True

    def __init__(self, examples: list[Example], collator: PaddingCollator, what: str = "training data"):
        self.examples = examples
        self.collator = collator
        self.what = what
        self.lengths = [len(ex) for ex in examples]
        # What the start-up checks passed, so a search's trials do not rescan the same examples.
        self._checked = {"vocab_size": None, "max_length": None}

    def plan(self, spec: PlanSettings, epoch: int):
        """This rank's micro-batches of one epoch, in order; consecutive ``accumulation`` of them form a step."""
        grouping = resolve_grouping(spec.group_by_length, spec.shuffle)
        if grouping == "tokens":
            return self._token_plan(spec, epoch)
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
        return max(1, round(spec.batch_size * per_step * sum(self.lengths) / len(self.lengths)))

    def _token_plan(self, spec: PlanSettings, epoch: int):
        per_step = spec.micro_batches_per_step
        steps = token_budget_steps(self.lengths, step_budget=self.step_token_budget(spec), micro_batches_per_step=per_step,
                                   examples_per_mega_batch=spec.batch_size * per_step * MEGA_BATCH_FACTOR,
                                   shuffle=spec.shuffle, seed=spec.seed, epoch=epoch)
        # Rank r runs micro-batches r*a .. r*a+a-1 of each step. An empty one becomes a repeat that does not
        # count (labels all -100), so every process runs the same number of forwards and backwards.
        a, r = spec.accumulation, spec.rank
        mine = [micro for step in steps for micro in step[r * a:(r + 1) * a]]
        return [[(i, True) for i in micro] if micro else [(steps[0][0][0], False)] for micro in mine]

    def eval_plan(self, batch_size, world_size=1, rank=0):
        """Validation order does not change token-weighted sums, so sort by length: least padding."""
        order = sorted(range(len(self.examples)), key=lambda i: -self.lengths[i])
        return shard_batches(order, batch_size, world_size, rank)

    def collate(self, planned_batch):
        return self.collator([(self.examples[i], counts) for i, counts in planned_batch])

    def first_batch(self) -> dict:
        return self.collate(self.plan(PlanSettings(batch_size=2), epoch=0)[0])

    def padded_batch(self) -> dict:
        """The longest and the shortest example together: a batch that surely holds padding."""
        by_length = sorted(range(len(self.examples)), key=self.lengths.__getitem__)
        return self.collate([(by_length[-1], True), (by_length[0], True)])

    def check_ids(self, vocab_size: int) -> None:
        """Every token id fits the vocabulary, naming the first example that does not."""
        if self._checked["vocab_size"] != vocab_size:
            for i, example in enumerate(self.examples):
                check_batch_ids({"input_ids": example.input_ids, "labels": example.labels}, vocab_size,
                                f"Example {i} of the {self.what}")
            self._checked["vocab_size"] = vocab_size

    def check_lengths(self, limit: int | None) -> None:
        if limit is not None and self._checked["max_length"] != limit:
            for i, length in enumerate(self.lengths):
                check_length(length, limit, f"Example {i} of the {self.what}")
            self._checked["max_length"] = limit

    def pad_id_inside_real_tokens(self, pad_token_id: int) -> bool:
        """Whether the pad id occurs where a token is real (then it is a real token of the vocabulary)."""
        return any(bool(((ex.input_ids == pad_token_id) & (True if ex.attention_mask is None else ex.attention_mask.bool()))
                        .any()) for ex in self.examples)

    def fingerprint(self) -> str:
        """sha256 over every token, mask and label: a resume must see the same data."""
        digest = hashlib.sha256()
        _digest_tensors(digest, (t for ex in self.examples for t in (ex.input_ids, ex.attention_mask, ex.labels)))
        return digest.hexdigest()

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
        try:
            return self.collate(next(iter(self.loader)))
        except StopIteration:
            raise ValueError(f"The DataLoader given as {self.what} yields no batch. Pass a non-empty DataLoader.") from None

    def check_ids(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size  # not read ahead: each batch is checked as it is collated

    def pad_id_inside_real_tokens(self, pad_token_id: int) -> bool:
        batch = self.first_batch()
        return bool(((batch["input_ids"] == pad_token_id) & batch["attention_mask"].bool()).any())

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
                 pad_is_eos: bool = False):
    if isinstance(data, (ExampleBatches, LoaderBatches)):
        return data  # prepared once (the hyperparameter search reuses it for every trial)
    if isinstance(data, DataLoader):
        return LoaderBatches(data, pad_token_id, pad_is_eos, what)
    return ExampleBatches(to_examples(data, pad_token_id, what, pad_is_eos), PaddingCollator(pad_token_id, pad_to_multiple_of),
                          what)


def train_and_val_sources(train_data, val_data, pad_token_id: int, pad_to_multiple_of: int | None, pad_is_eos: bool,
                          val_fraction: float, seed: int):
    """Batch sources for training and validation; ``val_data=None`` holds out a seeded ``val_fraction``."""
    train = batch_source(train_data, pad_token_id, pad_to_multiple_of, "training data", pad_is_eos)
    if val_data is not None:
        return train, batch_source(val_data, pad_token_id, pad_to_multiple_of, "validation data", pad_is_eos)
    if not isinstance(train, ExampleBatches):
        raise ValueError("val_data=None needs train_data as a list of examples to hold out from; pass val_data.")
    train_examples, val_examples = split_train_val(train.examples, val_fraction, seed)
    return (ExampleBatches(train_examples, train.collator, "training data"),
            ExampleBatches(val_examples, train.collator, "validation data"))
