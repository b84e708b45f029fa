"""Examples in memory or on disk as a source: the user's rows in one table, planned over one array of lengths,
read and collated per batch.

:class:`ExampleBatches` is the source: its epochs are planned (shuffled, grouped, sharded: :mod:`batch_plans`,
:mod:`subsets`) over the table's lengths. Every token was hashed before the run (the fingerprint), so a resume
needs nothing but the plan, which is recomputed from the settings.

A table knows, before the first step, only what a plan and the start-up checks need: each kept row's real length
(one numpy array) and whether every token id fits the vocabulary; the examples of a batch are read
(:func:`rows.read_example`) when the batch is collated. Three kinds (:func:`example_table` picks one):

- :class:`TokenLists`: a list of plain token sequences (lists, tuples or 1-D tensors). Lengths come from
  ``len()``; only rows ending in the pad id need the pad rule applied up front (a trailing run of pad ids).
- :class:`ArrowRows`: a Hugging Face ``datasets.Dataset`` (memory-mapped Arrow). Lengths, last tokens, masks and
  id ranges are read from the Arrow buffers in vectorised passes; rows are read per batch with ``dataset[indices]``.
- :class:`ExampleList`: examples built up front (:func:`to_examples`: lists of dicts, columns, other indexables).

A table's rows are a subset of the user's: those with a real target (:func:`subsets.keep_with_real_targets`), then
the hold-out's part (:meth:`ExampleBatches.split`, positions from :func:`subsets.split_positions`).
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Mapping

import numpy as np
import torch

from ..loss import IGNORE_INDEX
from .batch_plans import (MEGA_BATCH_FACTOR, Plan, PlanSettings, epoch_order, resolve_grouping, token_budget_steps,
                          token_plan)
from .collate import PaddingCollator, padded_probe
from .rows import (Example, check_batch_ids, check_length, cut_to_real_span, pad_id_among_real_tokens,
                   read_example, rows_of_columns, to_example, warn_if_eos_padding_is_ambiguous)
from .source_contract import BatchSource, group_into_steps
from .subsets import keep_with_real_targets, shard_batches, split_positions

SCAN_ROWS = 65_536  # rows per chunk of the id scan: bounded memory whatever the corpus size

class ExampleBatches(BatchSource):
    """Examples planned (shuffled, grouped, sharded) over one array of lengths, read and collated per batch.

    ``examples`` is a table (see the module docstring); a list of ``Example`` is taken as it is.
    """

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

    def steps_in_epoch(self, spec: PlanSettings, epoch: int) -> int:
        return -(-len(self.plan(spec, epoch)) // spec.accumulation)

    def steps(self, spec: PlanSettings, epoch: int, start: int):
        """The plan's steps from ``start`` on: the plan is a pure function of the settings and the epoch."""
        return group_into_steps(self.plan(spec, epoch), spec.accumulation, start, self.collate)

    def first_batch(self) -> dict:
        return self.collate(self.plan(PlanSettings(batch_size=2), epoch=0)[0])

    def padded_batch(self) -> dict:
        by_length = np.argsort(self.lengths, kind="stable")
        return padded_probe(self.examples.examples([int(by_length[-1]), int(by_length[0])]), self.collator)

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


class ExampleList:
    """Examples already in memory."""

    def __init__(self, examples: list[Example]):
        self.items = examples
        self.lengths = np.fromiter(map(len, examples), np.int64, len(examples))

    def __len__(self) -> int:
        return len(self.items)

    def examples(self, positions) -> list[Example]:
        return [self.items[i] for i in positions]

    def subset(self, positions) -> "ExampleList":
        return ExampleList([self.items[i] for i in positions])

    def pad_inside(self, pad_token_id: int) -> bool:
        return any(pad_id_among_real_tokens(ex.input_ids, ex.attention_mask, pad_token_id) for ex in self.items)

    def check_ids(self, vocab_size: int, what: str) -> None:
        for i, example in enumerate(self.items):
            check_batch_ids({"input_ids": example.input_ids, "labels": example.labels}, vocab_size,
                            f"Example {i} of the {what}")

    def fingerprint(self) -> str:
        """sha256 over every token, mask and label: a resume must see the same data."""
        digest = hashlib.sha256()
        for example in self.items:
            for tensor in (example.input_ids, example.attention_mask, example.labels):
                if tensor is None:
                    digest.update(b"-")
                else:
                    digest.update(str(tuple(tensor.shape)).encode())
                    digest.update(tensor.detach().cpu().long().numpy().tobytes())
        return digest.hexdigest()


class _LazyRows:
    """Rows of ``self.rows`` at positions ``self.kept``, cut to their real span when a batch is built."""

    rows: object
    kept: np.ndarray
    lengths: np.ndarray
    pad_token_id: int
    pad_is_eos: bool

    def __len__(self) -> int:
        return len(self.kept)

    def _read(self, rows: list) -> list:
        return [self.rows[j] for j in rows]

    def examples(self, positions) -> list[Example]:
        rows = self.kept[np.asarray(positions, dtype=np.int64)].tolist()
        return [read_example(item, j, self.pad_token_id, self.pad_is_eos) for j, item in zip(rows, self._read(rows))]

    def subset(self, positions):
        part = object.__new__(type(self))
        part.__dict__.update(self.__dict__, kept=self.kept[positions], lengths=self.lengths[positions],
                             given_lengths=self.given_lengths[positions])
        return part

    def _settle(self, raw_lengths: np.ndarray, needs_rule: np.ndarray, what: str) -> None:
        """Keep rows with a real target: rows the fast rule cannot decide (``needs_rule``) are read one by one."""
        lengths, has_target, parsed, cut = raw_lengths.copy(), raw_lengths >= 2, [], []
        for k in np.flatnonzero(needs_rule).tolist():
            parsed.append(to_example(self._read([k])[0], k))
            cut.append(cut_to_real_span(parsed[-1], self.pad_token_id, self.pad_is_eos))
            lengths[k], has_target[k] = len(cut[-1]), cut[-1].real_targets() > 0
        if self.pad_is_eos:
            warn_if_eos_padding_is_ambiguous(parsed, cut, self.pad_token_id, what)
        kept = keep_with_real_targets(has_target, what, self.pad_token_id)
        self.kept, self.lengths, self.given_lengths = np.flatnonzero(kept), lengths[kept], raw_lengths[kept]

    def _first_bad(self, candidates: np.ndarray, vocab_size: int, what: str) -> None:
        """Name the first kept example among physical rows ``candidates`` whose ids do not fit."""
        for position in np.flatnonzero(np.isin(self.kept, candidates)).tolist():
            example = self.examples([position])[0]
            check_batch_ids({"input_ids": example.input_ids, "labels": example.labels}, vocab_size,
                            f"Example {position} of the {what}")


class TokenLists(_LazyRows):
    """A list of plain token sequences, read per batch."""

    def __init__(self, rows, pad_token_id: int, pad_is_eos: bool, what: str):
        self.rows, self.pad_token_id, self.pad_is_eos = rows, pad_token_id, pad_is_eos
        n = len(rows)
        raw = np.fromiter(map(len, rows), np.int64, n)
        if (raw == 0).any():
            to_example(rows[int(np.argmax(raw == 0))], int(np.argmax(raw == 0)))  # raises, naming the example
        last = np.fromiter((int(row[-1]) for row in rows), np.int64, n)
        # Only a trailing run of pad ids is padding in this form: other rows are real as they are.
        self._settle(raw, last == pad_token_id, what)

    @staticmethod
    def accepts(data) -> bool:
        """Plain sequences of integers, all of one kind; anything else takes the in-memory path (and its checks)."""
        if not isinstance(data, (list, tuple)) or not data:
            return False
        kinds = set(map(type, data))
        if kinds <= {list, tuple}:
            return np.asarray([row[-1] for row in data[:1000] if len(row)]).dtype.kind in "iu" and all(
                isinstance(v, int) and not isinstance(v, bool) for v in data[0])
        if kinds == {torch.Tensor}:
            return {(t.dim(), t.dtype.is_floating_point) for t in data} == {(1, False)}
        return False

    def _flat(self, rows: list) -> np.ndarray:
        if isinstance(rows[0], torch.Tensor):
            return torch.cat(rows).long().numpy()
        flat = array("q")
        for row in rows:  # array.fromlist is about twice as fast as np.fromiter over a chain of the lists
            flat.fromlist(row) if type(row) is list else flat.extend(row)
        return np.frombuffer(flat, np.int64)

    def _scan(self) -> tuple[str, list]:
        """One pass over the tokens in chunks (bounded memory): the fingerprint and each chunk's id range."""
        if getattr(self, "_scanned", None) is None:
            digest, ranges, self._pad_inside = hashlib.sha256(b"token lists"), [], False
            digest.update(self.kept.tobytes())
            digest.update(self.lengths.tobytes())
            for start in range(0, len(self.kept), SCAN_ROWS):
                rows = self.kept[start:start + SCAN_ROWS]
                flat = self._flat(self._read(rows.tolist()))
                digest.update(flat.tobytes())
                ranges.append((rows, int(flat.min()), int(flat.max())))
                # Pad ids beyond the trailing run (cut off) are real tokens: is the pad id a word of the vocabulary?
                given = self.given_lengths[start:start + SCAN_ROWS]
                pads = np.add.reduceat(flat == self.pad_token_id, np.concatenate([[0], np.cumsum(given)[:-1]]))
                self._pad_inside |= bool((pads > given - self.lengths[start:start + SCAN_ROWS]).any())
            self._scanned = digest.hexdigest(), ranges
        return self._scanned

    def subset(self, positions):
        part = super().subset(positions)
        part._scanned = None
        return part

    def check_ids(self, vocab_size: int, what: str) -> None:
        for rows, low, high in self._scan()[1]:
            if low < 0 or high >= vocab_size:
                self._first_bad(rows, vocab_size, what)

    def fingerprint(self) -> str:
        return self._scan()[0]

    def pad_inside(self, pad_token_id: int) -> bool:
        self._scan()
        return self._pad_inside


def _list_chunks(column) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(offsets, values)`` of each chunk of an Arrow list column, zero-copy where Arrow allows: values are the
    chunk's backing buffer (memory-mapped for a saved dataset), offsets index into it."""
    chunks = []
    for chunk in column.chunks:
        if hasattr(chunk.type, "list_size"):  # a fixed-size list column (Sequence(..., length=n)) has no offsets
            size = chunk.type.list_size
            offsets = (np.arange(len(chunk) + 1, dtype=np.int64) + chunk.offset) * size
        else:
            offsets = chunk.offsets.to_numpy().astype(np.int64)
        chunks.append((offsets, chunk.values.to_numpy(zero_copy_only=False)))
    return chunks


def _row_spans(chunks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a 0/1 mask column: first real position, one past the last, and the number of real positions."""
    firsts, ends, ones = [], [], []
    for offsets, values in chunks:
        n = len(offsets) - 1
        real = np.flatnonzero(values[offsets[0]:offsets[-1]]) + offsets[0]
        row = np.searchsorted(offsets, real, side="right") - 1
        first, end = np.zeros(n, np.int64), np.zeros(n, np.int64)
        first[row[::-1]] = real[::-1] - offsets[:-1][row[::-1]]  # repeated indices: the last write (the smallest) wins
        end[row] = real + 1 - offsets[:-1][row]
        firsts.append(first), ends.append(end), ones.append(np.bincount(row, minlength=n))
    return np.concatenate(firsts), np.concatenate(ends), np.concatenate(ones)


class ArrowRows(_LazyRows):
    """A Hugging Face ``datasets.Dataset``, read per batch; nothing per example is kept but its length and index."""

    def __init__(self, dataset, pad_token_id: int, pad_is_eos: bool, what: str):
        columns = [c for c in ("input_ids", "attention_mask", "labels") if c in dataset.column_names]
        if "input_ids" not in columns:
            raise ValueError(f"The {what} is a datasets.Dataset without an 'input_ids' column (columns: "
                             f"{dataset.column_names}). Tokenize it first (dataset.map(tokenize, batched=True)).")
        self.dataset = dataset.select_columns(columns).with_format(None)
        self.pad_token_id, self.pad_is_eos = pad_token_id, pad_is_eos
        # A selected or shuffled Dataset reads its rows through an indices mapping over the stored table.
        mapping = None if dataset._indices is None else dataset._indices.column(0).to_numpy()
        physical = lambda values: values if mapping is None else values[mapping]  # noqa: E731
        ids = _list_chunks(self.dataset.data.column("input_ids"))
        raw = physical(np.concatenate([np.diff(offsets) for offsets, _ in ids]))
        if (raw == 0).any():
            raise ValueError(f"Example {int(np.argmax(raw == 0))}: the sequence is empty. Remove empty examples (e.g. "
                             "blank lines) before passing the data.")
        if np.concatenate([values[:0] for _, values in ids]).dtype.kind not in "iu":
            raise TypeError(f"The {what}'s input_ids are not integers; token ids must be integers.")
        if "attention_mask" in columns:
            first, end, ones = (physical(a)
                                for a in _row_spans(_list_chunks(self.dataset.data.column("attention_mask"))))
            # Rows with a hole inside their real span keep a mask after the cut: built one by one below.
            needs_rule, real = ones < end - first, end - first
        else:
            last = physical(np.concatenate([values[offsets[1:] - 1] for offsets, values in ids]))
            needs_rule, real = last == pad_token_id, raw
        if "labels" in columns:
            needs_rule = needs_rule | physical(self._rows_with(IGNORE_INDEX, "labels"))
        self.rows = self.dataset
        self._settle(real, needs_rule, what)

    def _rows_with(self, value: int, column: str) -> np.ndarray:
        flags = []
        for offsets, values in _list_chunks(self.dataset.data.column(column)):
            hits = np.flatnonzero(values[offsets[0]:offsets[-1]] == value) + offsets[0]
            flag = np.zeros(len(offsets) - 1, bool)
            flag[np.searchsorted(offsets, hits, side="right") - 1] = True
            flags.append(flag)
        return np.concatenate(flags)

    def _read(self, rows: list) -> list:
        batch = self.dataset[rows]
        return [{key: column[k] for key, column in batch.items()} for k in range(len(rows))]

    def check_ids(self, vocab_size: int, what: str) -> None:
        """Vectorised over the Arrow buffers; a violation is then located and named like the in-memory path."""
        mapping = None if self.dataset._indices is None else self.dataset._indices.column(0).to_numpy()
        for column, allowed in (("input_ids", None), ("labels", IGNORE_INDEX)):
            if column not in self.dataset.column_names:
                continue
            start = 0  # the chunk's first row in the stored table
            for offsets, values in _list_chunks(self.dataset.data.column(column)):
                span = values[offsets[0]:offsets[-1]]
                bad = (span < 0) | (span >= vocab_size)
                if allowed is not None:
                    bad &= span != allowed
                if bad.any():
                    rows = np.unique(np.searchsorted(offsets, np.flatnonzero(bad) + offsets[0],
                                                     side="right") - 1) + start
                    self._first_bad(rows if mapping is None else np.flatnonzero(np.isin(mapping, rows)),
                                    vocab_size, what)
                start += len(offsets) - 1

    def pad_inside(self, pad_token_id: int) -> bool:
        """Whether the pad id occurs among real tokens, over the stored rows (a vectorised pass)."""
        ids = _list_chunks(self.dataset.data.column("input_ids"))
        if "attention_mask" in self.dataset.column_names:
            masks = _list_chunks(self.dataset.data.column("attention_mask"))
            return any(bool(((v[o[0]:o[-1]] == pad_token_id) & (m[mo[0]:mo[-1]] != 0)).any())
                       for (o, v), (mo, m) in zip(ids, masks))
        mapping = None if self.dataset._indices is None else self.dataset._indices.column(0).to_numpy()
        counts = np.concatenate([np.add.reduceat(v[o[0]:o[-1]] == pad_token_id, o[:-1] - o[0]) for o, v in ids])
        counts = (counts if mapping is None else counts[mapping])[self.kept]
        return bool((counts > self.given_lengths - self.lengths).any())

    def fingerprint(self) -> str:
        """A hash of the stored token, mask and label buffers (and the row mapping and plan inputs). Not the
        Dataset's own ``_fingerprint``: ``datasets`` makes that random when a map function cannot be hashed, and
        a resume in a new process would then be refused as other data. blake2b reads ~1 GB/s."""
        digest = hashlib.blake2b(digest_size=32)
        for column in ("input_ids", "attention_mask", "labels"):
            if column in self.dataset.column_names:
                for offsets, values in _list_chunks(self.dataset.data.column(column)):
                    digest.update(column.encode())
                    digest.update(np.diff(offsets).tobytes())
                    digest.update(np.ascontiguousarray(values[offsets[0]:offsets[-1]]).tobytes())
        if self.dataset._indices is not None:
            digest.update(self.dataset._indices.column(0).to_numpy().tobytes())
        digest.update(self.kept.tobytes())
        digest.update(self.lengths.tobytes())
        return digest.hexdigest()


def example_table(data, pad_token_id: int, what: str, pad_is_eos: bool):
    """The table for ``data``: read per batch where the form allows it, else examples built up front."""
    if type(data).__name__ == "Dataset" and hasattr(data, "_fingerprint") and hasattr(data, "column_names"):
        return ArrowRows(data, pad_token_id, pad_is_eos, what)
    if TokenLists.accepts(data):
        return TokenLists(data, pad_token_id, pad_is_eos, what)
    return ExampleList(to_examples(data, pad_token_id, what, pad_is_eos))


def to_examples(data, pad_token_id: int, what: str = "training data", pad_is_eos: bool = False) -> list[Example]:
    """Examples from a list/Dataset of sequences or dicts; examples with no real target are skipped (warned)."""
    if isinstance(data, Mapping) and "input_ids" in data:  # columns, e.g. a tokenizer's output for many texts
        data = rows_of_columns(data)
    try:
        items = [data[i] for i in range(len(data))]
    except TypeError as error:
        raise TypeError(
            f"The {what} is a {type(data).__name__}; expected a list of token sequences, a list of dicts with "
            "'input_ids', a torch Dataset of those, or a DataLoader yielding dict batches."
        ) from error
    if not items:
        raise ValueError(f"The {what} is empty. Pass at least one tokenized sequence.")
    parsed = [to_example(item, i) for i, item in enumerate(items)]
    examples = [cut_to_real_span(example, pad_token_id, pad_is_eos) for example in parsed]
    if pad_is_eos:
        warn_if_eos_padding_is_ambiguous(parsed, examples, pad_token_id, what)
    has_target = np.fromiter((example.real_targets() > 0 for example in examples), bool, len(examples))
    kept = keep_with_real_targets(has_target, what, pad_token_id)
    return [example for example, keep in zip(examples, kept.tolist()) if keep]
