"""From whatever the user passes to padded batches: examples, collator, batch order.

The collator pads with the same pad id the loss uses and marks excluded targets with -100,
so the collator and :mod:`utils.training.loss` share one definition of "ignored".
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, DistributedSampler

from .loss import IGNORE_INDEX, real_token_mask, shifted_targets

MEGA_BATCH_FACTOR = 50  # batches per length-sorted mega-batch (as in HF's LengthGroupedSampler)


@dataclass
class Example:
    """One sequence, already cut to its real span; ``attention_mask`` marks its real positions."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None  # None: every position is real
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.numel()

    def real_targets(self) -> int:
        """Targets that count; the pad rule was applied when the example was cut, so only the mask is read."""
        row = lambda t: None if t is None else t[None]  # noqa: E731
        targets = shifted_targets(self.input_ids[None], row(self.labels), row(self.attention_mask))
        return int((targets != IGNORE_INDEX).sum())


def _as_long_1d(value, what: str, index: int) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]  # a tokenizer's return_tensors="pt" output for one text
    if tensor.dim() != 1:
        raise ValueError(
            f"Example {index}: {what} has shape {tuple(tensor.shape)}; expected a 1-D sequence of token ids. "
            "Pass one sequence per example (a list of lists, or a list of dicts)."
        )
    if tensor.numel() == 0:
        raise ValueError(f"Example {index}: {what} is empty. Remove empty examples (e.g. blank lines) before passing the data.")
    if tensor.is_floating_point():
        raise TypeError(f"Example {index}: {what} holds floats ({tensor.dtype}); token ids must be integers.")
    return tensor.long()


def _to_example(item, index: int) -> Example:
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise ValueError(f"Example {index} is a dict without 'input_ids' (keys: {sorted(item)}). Add the token ids under 'input_ids'.")
        ids = _as_long_1d(item["input_ids"], "input_ids", index)
        fields = {}
        for key in ("attention_mask", "labels"):
            if item.get(key) is None:
                continue
            value = _as_long_1d(item[key], key, index)
            if value.shape != ids.shape:
                raise ValueError(
                    f"Example {index}: {key} has shape {tuple(value.shape)} but input_ids has {tuple(ids.shape)}. "
                    f"Give {key} one entry per input token (labels are aligned with input_ids; the loss shifts them)."
                )
            fields[key] = value
        return Example(ids, **fields)
    if isinstance(item, (torch.Tensor, Sequence)) and not isinstance(item, (str, bytes)):
        return Example(_as_long_1d(item, "the sequence", index))
    raise TypeError(
        f"Example {index} is a {type(item).__name__}. Expected a sequence of token ids (list or 1-D tensor) "
        "or a dict with 'input_ids' (and optional 'attention_mask', 'labels'). Tokenize text first."
    )


def _cut_to_real_span(example: Example, pad_token_id: int, pad_is_eos: bool) -> Example:
    """Apply the real-token rule once and drop padding on either side.

    Exact for a causal model: right padding changes no real logit, and removing left padding
    gives the positions the unpadded text has (the collator re-pads on the right).
    """
    mask = None if example.attention_mask is None else example.attention_mask[None]
    real = real_token_mask(example.input_ids[None], mask, pad_token_id, pad_is_eos)[0]
    where = real.nonzero()
    start, end = (int(where[0]), int(where[-1]) + 1) if where.numel() else (0, 0)
    span = real[start:end]
    cut = lambda t: None if t is None else t[start:end]  # noqa: E731
    return Example(example.input_ids[start:end], None if bool(span.all()) else span.long(), cut(example.labels))


def _columns_to_rows(data: Mapping) -> list[dict]:
    columns = {key: data[key] for key in ("input_ids", "attention_mask", "labels") if data.get(key) is not None}
    rows = len(columns["input_ids"])
    for key, column in columns.items():
        if len(column) != rows:
            raise ValueError(f"The '{key}' column has {len(column)} rows but 'input_ids' has {rows}. Give every column "
                             "one row per example (tokenize all texts in one call).")
    return [{key: column[i] for key, column in columns.items()} for i in range(rows)]


def to_examples(data, pad_token_id: int, what: str = "training data", pad_is_eos: bool = False) -> list[Example]:
    """Examples from a list/Dataset of sequences or dicts; examples with no real target are skipped (warned)."""
    if isinstance(data, Mapping) and "input_ids" in data:  # columns, e.g. a tokenizer's output for many texts
        data = _columns_to_rows(data)
    try:
        items = [data[i] for i in range(len(data))]
    except TypeError as error:
        raise TypeError(
            f"The {what} is a {type(data).__name__}; expected a list of token sequences, a list of dicts with "
            "'input_ids', a torch Dataset of those, or a DataLoader yielding dict batches."
        ) from error
    if not items:
        raise ValueError(f"The {what} is empty. Pass at least one tokenized sequence.")
    examples = [_cut_to_real_span(_to_example(item, i), pad_token_id, pad_is_eos) for i, item in enumerate(items)]
    kept = [ex for ex in examples if ex.real_targets() > 0]
    if not kept:
        raise ValueError(
            f"No example of the {what} has a real target token (each needs at least 2 non-padding tokens, "
            f"pad_token_id={pad_token_id}). Check the pad id and that the data is not all padding."
        )
    if len(kept) < len(examples):
        warnings.warn(
            f"Skipped {len(examples) - len(kept)} of {len(examples)} examples of the {what}: they have no real "
            "target token (all padding, masked, or a single token).",
            UserWarning,
            stacklevel=3,
        )
    return kept


def split_train_val(examples: list[Example], val_fraction: float, seed: int):
    """Seeded random hold-out; both parts keep the original order (``shuffle=False`` stays meaningful)."""
    if len(examples) < 2:
        raise ValueError("Need at least 2 training examples to hold out a validation set; pass val_data explicitly.")
    n_val = max(1, int(round(len(examples) * val_fraction)))
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    val_ids = set(perm[:n_val])
    train = [ex for i, ex in enumerate(examples) if i not in val_ids]
    val = [ex for i, ex in enumerate(examples) if i in val_ids]
    return train, val


def synthetic_sequences(vocab_size: int, pad_token_id: int, n: int = 256, min_len: int = 8, max_len: int = 64, seed: int = 0):
    """Learnable variable-length sequences (arithmetic progressions mod vocab) that never use the pad id."""
    g = torch.Generator().manual_seed(seed)
    usable = vocab_size - 1
    sequences = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        start, step = (int(v) for v in torch.randint(0, usable, (2,), generator=g))
        values = (start + step % 7 * torch.arange(length) + torch.arange(length)) % usable
        sequences.append(values + (values >= pad_token_id).long())  # skip the pad id
    return sequences


@dataclass
class PaddingCollator:
    """List of ``(Example, counts)`` -> dict of ``input_ids``, ``attention_mask``, ``labels`` tensors.

    Pads on the right to the longest example (rounded up to ``pad_to_multiple_of``) with the pad id.
    Which targets count is the loss's rule (it reads the attention mask); the collator only sets
    ``labels`` to -100 on padding and everywhere in an example whose ``counts`` is False (the
    duplicates a distributed sampler adds to even out shards).

    >>> PaddingCollator(pad_token_id=0)([(Example(torch.tensor([5, 6, 7])), True), (Example(torch.tensor([8, 9])), True)])["labels"]
    tensor([[   5,    6,    7],
            [   8,    9, -100]])
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, items) -> dict[str, torch.Tensor]:
        width = max(len(example) for example, _ in items)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        for row, (example, counts) in enumerate(items):
            n = len(example)
            input_ids[row, :n] = example.input_ids
            attention_mask[row, :n] = 1 if example.attention_mask is None else example.attention_mask
            if counts:
                labels[row, :n] = example.input_ids if example.labels is None else example.labels
        # Known here without a device read: rows are real then padding, unless an example kept a mask of its own.
        right_padded = all(example.attention_mask is None for example, _ in items)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "right_padded": right_padded}


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
                       shuffle: bool, seed: int, epoch: int, multiple: int | None = None) -> list[list[list[int]]]:
    """Optimizer steps of one epoch, each ``micro_batches_per_step`` lists of example indices.

    Inside mega-batches sorted by length, consecutive examples fill a step while its padded size
    (rows x longest, rounded up to ``multiple``) stays within ``step_budget``; an example longer than
    that is a step of its own. The step's examples are then split into its micro-batches,
    so how a step is divided (accumulation, processes) never changes which examples it holds. Steps
    carry similar numbers of tokens; their order is shuffled. Micro-batches a short step cannot fill
    are empty: the caller gives them a non-counting repeat so every process runs the same count.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist() if shuffle else list(range(len(lengths)))
    padded = (lambda n: math.ceil(n / multiple) * multiple) if multiple else (lambda n: n)
    steps = []
    for start in range(0, len(order), examples_per_mega_batch):
        current = []
        for index in sorted(order[start:start + examples_per_mega_batch], key=lambda i: -lengths[i]):
            # Sorted longest first: the step's first example sets its width.
            if current and padded(lengths[current[0]]) * (len(current) + 1) > step_budget:
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


class ExampleBatches:
    """Examples held in memory: planned (shuffled, grouped, sharded) batches, collated on the fly."""

    plannable = True

    def __init__(self, examples: list[Example], collator: PaddingCollator):
        self.examples = examples
        self.collator = collator
        self.lengths = [len(ex) for ex in examples]
        # Set by the start-up checks once passed, so a search's trials do not rescan the same examples.
        self.checked_vocab_size = self.checked_max_length = None

    def plan(self, batch_size, *, shuffle, group_by_length, seed, epoch, accumulation=1, world_size=1, rank=0,
             max_tokens_per_batch=None):
        """This rank's micro-batches of one epoch, in order; consecutive ``accumulation`` of them form a step."""
        grouping = resolve_grouping(group_by_length, shuffle)
        if grouping == "tokens":
            return self._token_plan(batch_size, max_tokens_per_batch, shuffle, seed, epoch, accumulation, world_size, rank)
        order = epoch_order(self.lengths, batch_size * accumulation * world_size, shuffle=shuffle,
                            group_by_length=bool(grouping), seed=seed, epoch=epoch)
        return shard_batches(order, batch_size, world_size, rank)

    def step_token_budget(self, batch_size: int, per_step: int, max_tokens_per_batch: int | None) -> int:
        """Padded tokens of one optimizer step: ``max_tokens_per_batch`` per micro-batch, else ``batch_size`` x the
        mean example length, so the mean micro-batch holds about ``batch_size`` lines and learning rates tuned
        for ``batch_size`` carry over. Computed per step, so 8 x 1 and 2 x 4 get the same budget exactly."""
        if max_tokens_per_batch is not None:
            return max_tokens_per_batch * per_step
        return max(1, round(batch_size * per_step * sum(self.lengths) / len(self.lengths)))

    def _token_plan(self, batch_size, max_tokens_per_batch, shuffle, seed, epoch, accumulation, world_size, rank):
        per_step = accumulation * world_size
        steps = token_budget_steps(self.lengths, step_budget=self.step_token_budget(batch_size, per_step, max_tokens_per_batch),
                                   micro_batches_per_step=per_step,
                                   examples_per_mega_batch=batch_size * per_step * MEGA_BATCH_FACTOR, shuffle=shuffle,
                                   seed=seed, epoch=epoch, multiple=self.collator.pad_to_multiple_of)
        # Rank r runs micro-batches r*a .. r*a+a-1 of each step. An empty one becomes a repeat that does not
        # count (labels all -100), so every process runs the same number of forwards and backwards.
        mine = [micro for step in steps for micro in step[rank * accumulation:(rank + 1) * accumulation]]
        return [[(i, True) for i in micro] if micro else [(steps[0][0][0], False)] for micro in mine]

    def eval_plan(self, batch_size, world_size=1, rank=0):
        """Validation order does not change token-weighted sums, so sort by length: least padding."""
        order = sorted(range(len(self.examples)), key=lambda i: -self.lengths[i])
        return shard_batches(order, batch_size, world_size, rank)

    def collate(self, planned_batch):
        return self.collator([(self.examples[i], counts) for i, counts in planned_batch])

    def first_batch(self) -> dict:
        return self.collate(self.plan(2, shuffle=False, group_by_length=False, seed=0, epoch=0)[0])

    def padded_batch(self) -> dict:
        """The longest and the shortest example together: a batch that surely holds padding."""
        by_length = sorted(range(len(self.examples)), key=self.lengths.__getitem__)
        return self.collate([(by_length[-1], True), (by_length[0], True)])

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
        self.loader = loader
        self.pad_token_id = pad_token_id
        self.pad_is_eos = pad_is_eos
        self.what = what
        self.vocab_size = None  # set once known: every batch's ids are then checked as it is collated
        self.max_length = None  # likewise the model's positions

    def plan(self, batch_size=None, **_):
        return self.loader

    eval_plan = plan

    def first_batch(self) -> dict:
        try:
            return self.collate(next(iter(self.loader)))
        except StopIteration:
            raise ValueError(f"The DataLoader given as {self.what} yields no batch. Pass a non-empty DataLoader.") from None

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
            from .checks import check_batch_ids

            check_batch_ids(batch, self.vocab_size, f"A batch of the {self.what}")
        if self.max_length is not None and input_ids.shape[1] > self.max_length:
            raise ValueError(f"A batch of the {self.what} is {input_ids.shape[1]} tokens wide, more than the model's "
                             f"{self.max_length} positions. Tokenize with truncation=True, max_length={self.max_length}.")
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
    return ExampleBatches(to_examples(data, pad_token_id, what, pad_is_eos), PaddingCollator(pad_token_id, pad_to_multiple_of))


def train_and_val_sources(train_data, val_data, pad_token_id: int, pad_to_multiple_of: int | None, pad_is_eos: bool,
                          val_fraction: float, seed: int):
    """Batch sources for training and validation; ``val_data=None`` holds out a seeded ``val_fraction``."""
    train = batch_source(train_data, pad_token_id, pad_to_multiple_of, "training data", pad_is_eos)
    if val_data is not None:
        return train, batch_source(val_data, pad_token_id, pad_to_multiple_of, "validation data", pad_is_eos)
    if not isinstance(train, ExampleBatches):
        raise ValueError("val_data=None needs train_data as a list of examples to hold out from; pass val_data.")
    train_examples, val_examples = split_train_val(train.examples, val_fraction, seed)
    return ExampleBatches(train_examples, train.collator), ExampleBatches(val_examples, train.collator)


def to_device(batch: Mapping, device: torch.device) -> dict:
    non_blocking = device.type == "cuda"
    return {k: (v.pin_memory() if non_blocking else v).to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
