"""The contract between a run and its data: what every training and validation source provides, and the
guarantee kept once for all of them (every example read is fingerprinted; a replay that reads other data is
refused, naming the example).

The trainer, the engine, evaluation and the start-up checks talk to a source only through :class:`BatchSource`;
nothing outside the sources asks which kind of source it holds. Implementations: :class:`tables.ExampleBatches`
(lists, dicts, tokenizer output, Arrow ``Dataset``s), :class:`loaders.LoaderBatches` (a user's map-style
``DataLoader``), :class:`streaming.StreamBatches` (streams, iterable loaders).
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from .batch_plans import PlanSettings
from .rows import ROW_KEYS


class BatchSource(ABC):
    """Where a run's batches come from. What the trainer may assume:

    - ``steps(spec, epoch, start)`` yields the epoch's optimizer steps from step ``start`` on, each as
      ``(step index in the epoch, [collated micro-batch, ...])``, ``spec.accumulation`` micro-batches per step on
      every process; a resumed run (after ``load_state_dict``) gets exactly the steps an uninterrupted run gets.
    - ``steps_in_epoch`` is known before the epoch (None: the epoch ends when the data does).
    - a collated batch is a dict of CPU tensors ``input_ids``, ``attention_mask`` (the pad rule applied),
      ``labels`` (-100 where a target does not count) and ``right_padded``; its ids fit the vocabulary and its
      rows the model's positions once the start-up checks ran.
    - ``state_dict()`` is what a checkpoint must hold for the source to continue exactly and to prove, on a
      resume, that it reads the same data (``load_state_dict`` refuses otherwise, naming the first example that
      differs).
    """

    what: str = "training data"
    shards_itself: bool = True  # under torchrun: gives each process its own shard (a user's DataLoader does not)
    state_per_process: bool = False  # its state is each process's own (a stream's position in its shard): a resume
    # needs the same number of processes

    # -- start-up: checks and probes ----------------------------------------------------------------
    @abstractmethod
    def check_lengths(self, limit: int | None) -> None:
        """Refuse (or, for a stream, arrange to handle as read) examples longer than ``limit`` positions."""

    @abstractmethod
    def check_ids(self, vocab_size: int) -> None:
        """Refuse (or arrange to handle as read) token ids outside ``[0, vocab_size)``."""

    @abstractmethod
    def first_batch(self) -> dict:
        """A collated batch for the start-up forward, read without moving any random state."""

    @abstractmethod
    def padded_batch(self) -> dict:
        """A collated batch that holds padding (see :func:`collate.padded_probe`), for the start-up probes."""

    @abstractmethod
    def pad_id_inside_real_tokens(self, pad_token_id: int) -> bool:
        """Whether the pad id occurs where a token is real (then it is a word of the vocabulary)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """Identifies the data before the run starts (compared on resume and by a search's set-up)."""

    # -- the run -------------------------------------------------------------------------------------
    @abstractmethod
    def steps_in_epoch(self, spec: PlanSettings, epoch: int) -> int | None:
        """Optimizer steps of ``epoch``; None when the epoch ends with the data (a stream)."""

    @abstractmethod
    def steps(self, spec: PlanSettings, epoch: int, start: int) -> Iterator[tuple[int, list[dict]]]:
        """``(step index, micro-batches)`` of ``epoch`` from step ``start`` on (see the class docstring)."""

    @abstractmethod
    def eval_plan(self, batch_size: int, world_size: int = 1, rank: int = 0) -> Iterable:
        """One validation pass over this process's shard, in units :meth:`collate` turns into batches."""

    @abstractmethod
    def collate(self, planned) -> dict:
        """One unit of :meth:`eval_plan` as a collated batch."""

    def split(self, val_fraction: float, seed: int) -> tuple["BatchSource", "BatchSource"]:
        """A seeded random hold-out for ``val_data=None``: training and validation sources."""
        raise ValueError("val_data=None needs train_data as a list of examples or a Dataset to hold out from (a stream "
                         "or a DataLoader cannot be split); pass val_data.")

    # -- checkpoint ----------------------------------------------------------------------------------
    def state_dict(self) -> dict | None:
        """What a checkpoint must carry for this source (None: the source is a pure function of the settings)."""
        return None

    def load_state_dict(self, state: dict | None) -> None:
        """Take back :meth:`state_dict`; refuse, naming the first differing example, when the data differ."""

    def report(self) -> dict:
        """Counts for the results: examples the run went past or cut (``bad_examples``)."""
        return {}


def group_into_steps(micro_batches: Iterable, accumulation: int, start: int = 0, collate=None):
    """``(step index, micro-batches)`` of an epoch read lazily, from step ``start`` on (earlier steps are read
    past, not collated)."""
    step, group = 0, []
    for planned in micro_batches:
        group.append(planned)
        if len(group) == accumulation:
            if step >= start:
                yield step, group if collate is None else [collate(p) for p in group]
            step, group = step + 1, []
    if group and step >= start:
        yield step, group if collate is None else [collate(p) for p in group]


def row_digest(row) -> int:
    """8 bytes identifying one example as read (a token sequence or a dict of them), before any processing."""
    digest = hashlib.blake2b(digest_size=8)
    fields = row if isinstance(row, Mapping) else {"input_ids": row}
    for key in ROW_KEYS:
        value = fields.get(key)
        digest.update(b"-" if value is None else np.asarray(value, dtype=np.int64).tobytes())
        digest.update(b"|")
    return int.from_bytes(digest.digest(), "little")


CHANGED = ("(the data changed since the checkpoint). Pass the same data, or start fresh with "
           "resume_from_checkpoint=False.")


class ReadLog:
    """What a source has read in the current epoch (or validation pass): one 8-byte digest per example.

    A checkpoint carries it; a resume reads the source again and compares every example with the digest recorded
    for it, so a changed, inserted or removed example is refused and named (its index in that epoch's reading),
    wherever it lies. A checkpoint inside an epoch: the epoch is read again from its start to the position. A
    checkpoint at an epoch's end (its position: that epoch read to its end): that epoch's pass is read again before
    the next one starts (:meth:`start`), as a resume at its last step would. Epoch k+1's reading is never compared
    with epoch k's: a stream may reshuffle each epoch. 8 bytes an example of an epoch (8 MB a million rows of a
    stream's epoch); data in memory or on disk is hashed whole up front instead and needs none.
    """

    def __init__(self, what: str, unit: str = "example"):
        self.what, self.unit = what, unit
        self.epoch, self.digests, self.expected, self.to_end = None, array("Q"), None, False

    def start(self, epoch: int, recorded: dict | None = None, replay=None, to_end: bool = False) -> None:
        """A new epoch's reading. ``recorded`` is the log a checkpoint carries. Of this epoch: what the rows read
        again must match. Of an earlier epoch (the checkpoint at its end): ``replay(that epoch)`` reads that epoch's
        pass again now, through this log (:meth:`read`, or :meth:`note` per row and :meth:`replay_ended` at the
        data's end), drawing nothing; every recorded row must come back. ``to_end``: that epoch read its data to
        the end, so a row after the recorded ones is a change too (not so for a shard that stopped with the
        others)."""
        if recorded is not None and recorded.get("epoch") is not None and recorded["epoch"] < epoch:
            if replay is None:
                raise TypeError("ReadLog.start: a record of a finished epoch needs replay, the epoch's pass read again")
            self._expect(recorded["epoch"], recorded)
            self.to_end = to_end
            for _ in replay(recorded["epoch"]):
                if not (to_end or self.replaying):
                    break  # every recorded row compared; the rows after them were not read in that epoch
            self.replay_ended()
        self._expect(epoch, recorded if recorded is not None and recorded.get("epoch") == epoch else None)

    def _expect(self, epoch: int, recorded: dict | None) -> None:
        self.epoch, self.digests, self.expected, self.to_end = epoch, array("Q"), None, False
        if recorded is not None:
            self.expected = array("Q")
            self.expected.frombytes(recorded["digests"])

    def note(self, row, where: str = "", detail: str = "") -> None:
        """Record one example as it is read; during a replay, compare it with the recorded one (``detail``: where
        else it stands, e.g. its batch)."""
        value, index = row_digest(row), len(self.digests)
        place = f"{self.unit} {index} of {where or 'this epoch'} of the {self.what}{detail}"
        if self.expected is not None and index < len(self.expected) and self.expected[index] != value:
            raise ValueError(f"Cannot resume: {place} differs from the one read before the interruption {CHANGED}")
        if self.expected is not None and index >= len(self.expected) and self.to_end:
            raise ValueError(f"Cannot resume: {place} was not there when that epoch was read to its end before the "
                             f"interruption: it had {len(self.expected)} {self.unit}s {CHANGED}")
        self.digests.append(value)

    def read(self, rows: Iterable, where: str = "") -> Iterator:
        """``rows`` as they are read, each noted; at their end, a replay must have reached every recorded one."""
        for row in rows:
            self.note(row, where)
            yield row
        self.replay_ended(where)

    def replay_ended(self, where: str = "") -> None:
        """The reading ended: a replay must have reached every recorded example."""
        if self.expected is not None and len(self.digests) < len(self.expected):
            raise ValueError(f"Cannot resume: the {self.what} ended after {len(self.digests)} {self.unit}s of "
                             f"{where or 'this epoch'}, but {len(self.expected)} were read there before the "
                             f"interruption {CHANGED}")
        self.expected = None

    @property
    def replaying(self) -> bool:
        return self.expected is not None and len(self.digests) < len(self.expected)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "digests": self.digests.tobytes()}
